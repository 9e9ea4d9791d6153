"""What a hostile or unlucky user does to an optimizer between (and during) steps.

Each case is a few lines of ordinary code that once crashed, hung or silently
computed the wrong thing. Cases that could crash the interpreter run in a child
process (:func:`helpers.run_isolated`), so a crash is a failed test, not a lost run.
Those take seconds each (a fresh interpreter): they are ``heavy`` but for one, the
fast tier's share.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import threading

import pytest
import torch
from helpers import fast_share, run_isolated

import adamkit


@pytest.fixture(params=["python", "native"])
def checks(request, monkeypatch) -> str:
    """Run a test with the plans' per-step checks in Python, then in torch's C++ API
    (:mod:`adamkit.optim._native`, built here if not yet: only a missing compiler
    skips it)."""
    from adamkit.optim import _native

    if request.param == "python":
        monkeypatch.setattr(_native, "module", lambda start=True, wait=False: None)
    elif _native.module(wait=True) is None:
        if not _native.compiler():
            pytest.skip(f"no C++ compiler: {_native.status}")
        pytest.fail(f"the native checks did not build: {_native.status}")
    return request.param


def _model_and_twin(cls=adamkit.AdamW, n: int = 3, size: int = 1000, **kw):
    """Parameters with an adamkit optimizer, and a copy of them with torch.optim's."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(size, generator=gen).requires_grad_() for _ in range(n)]
    twin = [p.detach().clone().requires_grad_() for p in params]
    torch_cls = {adamkit.AdamW: torch.optim.AdamW, adamkit.Adam: torch.optim.Adam, adamkit.Adamax: torch.optim.Adamax}
    return params, cls(params, **kw), twin, torch_cls[cls](twin)


def _grads(params, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


# ---------------------------------------------------------------- threads, fork, pickle
def test_two_optimizers_in_two_threads() -> None:
    """Two optimizers stepping at once in two Python threads, with more torch threads
    than cores and the pool resized in between: both finish, as torch.optim does."""
    old = torch.get_num_threads()
    errors: list[BaseException] = []
    results = {}

    def train(name: str, threads: int) -> None:
        try:
            params, opt, twin, ref = _model_and_twin(size=200_000)
            for step in range(20):
                torch.set_num_threads(threads if step % 2 else 4)  # the pool grows while the other thread uses it
                for ps in (params, twin):
                    for p, g in zip(ps, _grads(ps, step)):
                        p.grad = g
                opt.step()
                ref.step()
            results[name] = max(float((a - b).detach().abs().max()) for a, b in zip(params, twin))
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    try:
        workers = [threading.Thread(target=train, args=(f"t{i}", 2 + i)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
        assert not any(w.is_alive() for w in workers), "a step hung"
    finally:
        torch.set_num_threads(old)
    assert not errors, errors
    assert set(results) == {"t0", "t1"} and max(results.values()) < 1e-5, results


@pytest.mark.heavy
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_step_in_a_forked_child() -> None:
    """A step after ``os.fork()`` (a DataLoader worker, a multiprocessing pool) runs in
    the child: the parent's pool threads do not exist there."""
    code = """
import os, sys, numpy as np, torch, adamkit
torch.set_num_threads(2)
p = torch.nn.Parameter(torch.randn(1 << 18))
opt = adamkit.AdamW([p])
p.grad = torch.randn_like(p)
opt.step()  # the pool starts in the parent
pid = os.fork()
if pid == 0:
    import signal
    signal.alarm(60)  # a hung child ends itself (the test's timeout ends only its parent)
    p.grad = torch.randn_like(p)
    opt.step()
    os._exit(0 if np.isfinite(p.detach().numpy()).all() else 3)  # numpy: torch's OpenMP may hang after fork
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    result = run_isolated(code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("bits", [32, 8])
def test_pickle_torch_save_and_deepcopy_after_steps(bits: int) -> None:
    """An optimizer that has stepped pickles, ``torch.save``s and deep-copies; the copy
    steps on as the original does."""
    params, opt, _, _ = _model_and_twin(size=5000, state_bits=bits)
    for step in range(3):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(opt)), torch.load(buf, weights_only=False), copy.deepcopy(opt)]
    for other in copies:
        assert other.nonfinite == opt.nonfinite
        assert other.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
        mine = [p.detach().clone() for p in params]
        theirs = other.param_groups[0]["params"]
        for p, q in zip(theirs, mine):
            assert torch.equal(p, q)
        for ps in (params, theirs):
            for p, g in zip(ps, _grads(ps, 7)):
                p.grad = g
        other.step()
    opt.step()
    for other in copies:
        for p, q in zip(other.param_groups[0]["params"], params):
            assert torch.equal(p, q)


def test_duplicate_parameter_warns_and_is_stepped_once() -> None:
    """A parameter listed twice gets torch's warning and is stepped once per step, on
    every path and state width (two table rows on two threads would race; torch steps
    it twice, which its warning calls a future error): the same result as listing it
    once, every time."""
    for bits, backend in ((32, "auto"), (32, "reference"), (8, "auto"), (4, "auto")):
        results = []
        for _ in range(2):
            gen = torch.Generator().manual_seed(0)
            p = torch.randn(1 << 16, generator=gen).requires_grad_()
            other = torch.randn(1 << 16, generator=gen).requires_grad_()
            twin = [t.detach().clone().requires_grad_() for t in (p, other)]
            kw = dict(state_bits=bits, min_quant_size=0, backend=backend)
            with pytest.warns(UserWarning, match="duplicate parameters"):
                opt = adamkit.AdamW([p, other, p], **kw)
            once = adamkit.AdamW(twin, **kw)
            for step in range(3):
                for ps in ((p, other), twin):
                    for t, g in zip(ps, _grads(ps, step)):
                        t.grad = g
                opt.step()
                once.step()
            assert int(opt.state[p]["step"]) == 3
            assert torch.equal(p, twin[0]) and torch.equal(other, twin[1]), (bits, backend)
            results.append(p.detach().clone())
        assert torch.equal(results[0], results[1])


# ----------------------------------------------- what the fast path reuses between steps
def _lockstep(params, opt, twin, ref, steps, between, seed: int = 0) -> None:
    """Step ``opt`` and its torch twin with kept gradients, calling ``between(step)``
    (which does the same thing to both sides) before each step; they must agree."""
    for ps in (params, twin):
        for p in ps:
            p.grad = torch.zeros_like(p)
    for step in range(steps):
        for ps in (params, twin):
            for p, g in zip(ps, _grads(ps, seed + step)):
                p.grad.copy_(g)
        between(step)
        opt.step()
        ref.step()
        for p, q in zip(params, twin):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["data", "set_"])
def test_kept_gradient_repointed_is_followed(how: str, checks: str) -> None:
    """A kept gradient whose storage is swapped (``p.grad.data = t``, ``p.grad.set_(t)``)
    is read at its new address, not the old one."""
    params, opt, twin, ref = _model_and_twin(size=1000)

    def swap(step: int) -> None:
        if step in (2, 4):
            for ps in (params, twin):
                fresh = torch.randn(ps[1].shape, generator=torch.Generator().manual_seed(step))
                if how == "set_":
                    ps[1].grad.set_(fresh)
                else:
                    ps[1].grad.data = fresh

    _lockstep(params, opt, twin, ref, 6, swap)


@pytest.mark.heavy
@pytest.mark.parametrize("native", ["0", "1"], ids=["python-checks", "native-checks"])
def test_kept_gradient_repointed_at_1m_elements_in_a_child(native: str) -> None:
    """The same at a million elements, where reading the old address crashed: in a
    child process, so that a crash fails this test only."""
    code = """
import torch, adamkit
from adamkit.optim import _native
_native.module(wait=True)
p = torch.nn.Parameter(torch.randn(1 << 20)); q = torch.nn.Parameter(p.detach().clone())
a, b = adamkit.AdamW([p]), torch.optim.AdamW([q])
p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
for step in range(4):
    for t in (p, q):
        fresh = torch.randn(1 << 20, generator=torch.Generator().manual_seed(step))
        t.grad.set_(fresh) if step % 2 else setattr(t.grad, "data", fresh)
    del fresh
    a.step(); b.step()
    big = [torch.randn(1 << 20) for _ in range(8)]  # reuse the freed memory
assert torch.allclose(p, q, atol=1e-6), float((p - q).abs().max())
print("ok")
"""
    result = run_isolated(code, env={"ADAMKIT_NATIVE_CHECKS": native})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_parameter_data_sliced_behind_a_kept_gradient_raises_and_changes_nothing(checks: str) -> None:
    """``p.data = p.data[:k]`` with the old gradient kept: torch's shape error, nothing
    written (before: no error, the old size written)."""
    params, opt, twin, ref = _model_and_twin(size=1000)
    _lockstep(params, opt, twin, ref, 2, lambda step: None)
    with torch.no_grad():
        params[0].data = params[0].data[:500]
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    for p, b, st in zip(params, before, states):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())


def test_parameter_data_replaced_is_followed(checks: str) -> None:
    """``p.data = new`` of the same size (a model moved, a weight re-initialised): the
    next step updates the new data."""
    params, opt, twin, ref = _model_and_twin(size=1000)

    def replace(step: int) -> None:
        if step == 2:
            for ps in (params, twin):
                with torch.no_grad():
                    ps[0].data = torch.full_like(ps[0], 0.5)

    _lockstep(params, opt, twin, ref, 5, replace)


def test_gradient_of_another_dtype_is_refused(checks: str) -> None:
    """A gradient of another dtype — a kept one re-pointed (``p.grad.data = ...``) to
    float16 bits of a bfloat16 parameter's size, or one set after ``p.grad_dtype =
    None`` — is refused as torch.optim refuses it (RuntimeError), nothing changed: its
    bits are never read as the parameter's dtype."""
    params = [torch.randn(1000, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    opt = adamkit.AdamW(params)
    for p in params:
        p.grad = torch.randn(1000, dtype=torch.bfloat16)
    for _ in range(2):
        opt.step()
    params[1].grad.data = params[1].grad.data.to(torch.float16)  # the same size in bytes
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="float16"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    params[1].grad_dtype = None
    params[1].grad = torch.randn(1000, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="float32"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# the fast tier's one case in a child process (the others here are heavy: seconds each)
@pytest.mark.parametrize("native", fast_share([("0",), ("1",)], ["python-checks", "native-checks"], {"python-checks"}))
def test_freed_storage_is_refused_not_read(native: str) -> None:
    """A gradient whose storage was freed under it (``untyped_storage().resize_(0)``, as
    FSDP does) is never read through a stale or null address: an error, in a child."""
    code = """
import torch, adamkit
from adamkit.optim import _native
_native.module(wait=True)
p = torch.nn.Parameter(torch.randn(1 << 20))
opt = adamkit.AdamW([p])
p.grad = torch.randn(2 << 20)[8:8 + (1 << 20)]
opt.step()
p.grad.untyped_storage().resize_(0)
try:
    opt.step()
except (RuntimeError, ValueError) as err:
    print("refused:", err)
"""
    result = run_isolated(code, env={"ADAMKIT_NATIVE_CHECKS": native})
    assert result.returncode == 0 and "refused" in result.stdout, (result.stdout, result.stderr[-2000:])


_WRAPPER = """
import torch, adamkit
from torch.testing._internal.two_tensor import TwoTensor

def two(x):
    return TwoTensor(x.clone(), x.clone())

base = torch.randn(300, dtype=torch.float64)
p, q = torch.nn.Parameter(two(base)), torch.nn.Parameter(two(base))
assert p.data_ptr() == 0
opt, ref = adamkit.AdamW([p], amsgrad=True), torch.optim.AdamW([q], amsgrad=True)
for step in range(4):
    g = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
    p.grad, q.grad = two(g), two(g)
    opt.step()
    ref.step()
torch.testing.assert_close(p.a, q.a, atol=1e-12, rtol=0)
forced = adamkit.AdamW([torch.nn.Parameter(two(base))], backend="numba")
forced.param_groups[0]["params"][0].grad = two(base)
try:
    forced.step()
except adamkit.KernelUnavailableError as err:
    assert "plain" in str(err), err
    print("ok")
"""


@pytest.mark.heavy
def test_wrapper_subclass_parameter_is_stepped_as_torch_steps_it() -> None:
    """A wrapper tensor subclass (``data_ptr()`` 0, its data elsewhere: DTensor is one)
    is stepped by the reference, as torch.optim steps it; a forced fused kernel says it
    cannot take it. Before: a segfault (hence a child process)."""
    result = run_isolated(_WRAPPER)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_kernel_tables_refuse_what_they_cannot_step() -> None:
    """The Numba kernels' boundary: a null address, two dtypes in one column, sizes that
    disagree, a wrapper subclass: ValueError, never a read."""
    from torch.testing._internal.two_tensor import TwoTensor

    from adamkit._scalars import adam_scalars
    from adamkit.kernels import _tables

    s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, step=1)
    p, g, m, v = (torch.zeros(100) for _ in range(4))
    good = ([p], [g], [m], [v])
    _tables.tables_for(good, s, None)
    cases = {
        "float64": ([p], [g], [m.double()], [v]),
        "elements": ([p], [g], [torch.zeros(99)], [v]),
        "no storage": ([p], [torch.zeros(200)[100:]], [m], [v]),
        "plain": ([p], [TwoTensor(g, g)], [m], [v]),
        "laid out": ([p], [torch.zeros(200)[::2]], [m], [v]),
    }
    cases["no storage"][1][0].untyped_storage().resize_(0)
    for what, columns in cases.items():
        with pytest.raises(ValueError, match=what):
            _tables.tables_for(columns, s, None)


# ------------------------------------------------------------------ errors before changes
def test_integer_parameters_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="floating-point.*int64"):
        adamkit.AdamW([torch.zeros(3, dtype=torch.int64)])
    opt = adamkit.AdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="floating-point.*int32"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int32)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 2.5])
def test_a_bad_step_in_a_later_group_changes_no_group(bad: float) -> None:
    """Every group is checked before any is stepped: a corrupt ``step`` in group 1
    (edited in place, so no state entry was replaced) raises with group 0 untouched."""
    a, b = torch.randn(1000, requires_grad=True), torch.randn(1000, requires_grad=True)
    opt = adamkit.AdamW([{"params": [a]}, {"params": [b]}])
    for _ in range(2):
        a.grad, b.grad = torch.randn(1000), torch.randn(1000)
        opt.step()
    opt.state[b]["step"].fill_(bad)
    before = a.detach().clone(), b.detach().clone(), opt.state[a]["exp_avg"].clone()
    with pytest.raises(RuntimeError, match="'step' must be finite, whole and >= 0.*param group 1"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and torch.equal(opt.state[a]["exp_avg"], before[2])


def test_mixed_state_dtypes_are_refused_not_stepped() -> None:
    """State of two dtypes reaching the step (a moment replaced by a float64 one, then
    amsgrad switched on): an error naming the parameter; before, heap corruption. A
    checkpoint holding such state does not load."""
    p = torch.randn(5000, requires_grad=True)
    opt = adamkit.AdamW([p])
    p.grad = torch.randn(5000)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["max_exp_avg_sq"] = torch.zeros(5000, dtype=torch.float64)
    with pytest.raises(ValueError, match="share one dtype"):
        opt.load_state_dict(sd)
    opt.state[p]["max_exp_avg_sq"] = torch.zeros(5000, dtype=torch.float64)
    opt.param_groups[0]["amsgrad"] = True
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="share one dtype"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize(
    "spoil,pattern",
    [
        (lambda sd: sd.update(state=[]), "'state' must be a mapping"),
        (lambda sd: sd["param_groups"][0].pop("params"), "'params'"),
        (lambda sd: sd.update(param_groups=[3]), "list of mappings"),
        (lambda sd: sd["state"][0].update(exp_avg=sd["state"][0]["exp_avg"].to_sparse()), "dense"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(2.5)), "whole"),
        (lambda sd: sd["state"][0].update(step="3"), "number"),
    ],
    ids=["state-list", "no-params", "group-not-mapping", "sparse-moment", "fractional-step", "string-step"],
)
def test_malformed_checkpoints_raise_value_error_and_change_nothing(spoil, pattern: str) -> None:
    p = torch.randn(100, requires_grad=True)
    opt = adamkit.AdamW([p])
    p.grad = torch.randn(100)
    opt.step()
    sd = opt.state_dict()
    sd = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": [dict(g) for g in sd["param_groups"]]}
    spoil(sd)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
    p.grad = torch.randn(100)
    opt.step()  # still steps


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_bad_block_scales_in_a_checkpoint_do_not_load(bits: int, value: float) -> None:
    p = torch.randn(5000, requires_grad=True)
    opt = adamkit.AdamW([p], state_bits=bits)
    p.grad = torch.randn(5000)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq_absmax"] = sd["state"][0]["exp_avg_sq_absmax"].clone()
    sd["state"][0]["exp_avg_sq_absmax"][3] = value
    with pytest.raises(ValueError, match="block scales"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------------ state stays live
@pytest.mark.parametrize("bits", [32, 16, 8])
def test_state_taken_after_a_load_is_the_state_the_optimizer_updates(bits: int, checks: str) -> None:
    """As in torch: after ``load_state_dict``, ``opt.state[p]["exp_avg"]`` (or the
    quantized codes) taken before the next step is the tensor that step updates."""
    params = [torch.randn(5000, requires_grad=True) for _ in range(3)]
    opt = adamkit.AdamW(params, state_bits=bits)
    for p in params:
        p.grad = torch.randn(5000)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    key = "exp_avg_codes" if bits == 8 else "exp_avg"
    held = [opt.state[p][key] for p in params]
    copies = [h.clone() for h in held]
    for p in params:
        p.grad = torch.randn(5000)
    opt.step()
    for p, h, c in zip(params, held, copies):
        assert opt.state[p][key] is h and not torch.equal(h, c)


@pytest.mark.heavy
def test_state_tensor_repointed_never_frees_what_the_kernel_writes() -> None:
    """A state tensor re-pointed in place (``.set_``) under a cached plan: the kernels
    keep writing memory the plan holds, never freed memory (in a child)."""
    code = """
import torch, adamkit
ps = [torch.nn.Parameter(torch.randn(1 << 18)) for _ in range(4)]
opt = adamkit.AdamW(ps)
for step in range(6):
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    if step == 1:
        for p in ps:
            opt.state[p]["exp_avg"].set_(torch.zeros(1))
            opt.state[p]["exp_avg_sq"].untyped_storage()  # still referenced by the plan
    junk = [torch.randn(1 << 18) for _ in range(16)]
print("ok")
"""
    result = run_isolated(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("bits", [32, 8])
def test_checkpoint_taken_after_amsgrad_switched_on_loads(bits: int) -> None:
    """amsgrad switched on mid-run: a parameter not stepped since has no running maximum
    yet; the optimizer's own checkpoint still loads (the maximum is created at the next
    step, as without a checkpoint), also into an optimizer of another state width."""
    a, b = torch.randn(5000, requires_grad=True), torch.randn(5000, requires_grad=True)
    opt = adamkit.Adam([a, b], state_bits=bits)
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    b.grad = None
    opt.step()
    assert "max_exp_avg_sq" in opt.state[a] or "max_exp_avg_sq_codes" in opt.state[a]
    sd = opt.state_dict()
    for other_bits in (bits, 32 if bits == 8 else 8):
        other = adamkit.Adam([a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()],
                             amsgrad=True, state_bits=other_bits)  # fmt: skip
        other.load_state_dict(sd)
        for p in other.param_groups[0]["params"]:
            p.grad = torch.randn(5000)
        other.step()


def test_native_and_python_checks_agree() -> None:
    """The plan's checks in C++ and in Python give the same verdict (launch, general
    path, or rebuild) and the same addresses, for each change a user can make between
    steps."""
    from adamkit.optim import _native

    native = _native.module(wait=True)
    if native is None:
        pytest.skip(f"the native checks are not available: {_native.status}")

    def fresh():
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in [(64,), (8, 8), (3, 5, 7), (0,), (1, 9)]]
        params.append(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_())
        opt = adamkit.AdamW(params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return params, opt._plans[0]

    def grad_data(params, k, make):
        params[k].grad.data = make(params[k].grad)

    edits = {
        "nothing": lambda ps: None,
        "grad None": lambda ps: setattr(ps[2], "grad", None),
        "grad replaced": lambda ps: setattr(ps[1], "grad", torch.randn(8, 8)),
        "grad repointed": lambda ps: grad_data(ps, 0, lambda g: torch.randn(64)),
        "grad set_": lambda ps: ps[0].grad.set_(torch.randn(64)),
        "grad transposed": lambda ps: grad_data(ps, 1, lambda g: g.t().contiguous().t()),
        "grad strided": lambda ps: grad_data(ps, 0, lambda g: torch.randn(128)[::2]),
        "grad dtype": lambda ps: grad_data(ps, 0, lambda g: g.double()),
        "grad reshaped": lambda ps: grad_data(ps, 1, lambda g: g.reshape(64)),
        "grad freed": lambda ps: ps[0].grad.untyped_storage().resize_(0),
        "grad offset freed": lambda ps: (
            grad_data(ps, 0, lambda g: torch.randn(128)[64:]),
            ps[0].grad.untyped_storage().resize_(0),
        ),
        "grad wrapper": lambda ps: grad_data(ps, 0, lambda g: _two(g)),
        "grad channels_last lost": lambda ps: grad_data(ps, 5, lambda g: g.contiguous()),
        "param replaced": lambda ps: setattr(ps[0], "data", torch.randn(64)),
        "param sliced": lambda ps: setattr(ps[0], "data", ps[0].data[:32]),
        "param dtype": lambda ps: setattr(ps[1], "data", ps[1].data.double()),
        "param transposed": lambda ps: setattr(ps[1], "data", ps[1].data.t()),
        "param freed": lambda ps: ps[2].untyped_storage().resize_(0),
    }
    for name, edit in edits.items():
        verdicts = []
        for use_native in (False, True):
            params, plan = fresh()
            plan._record = plan._describe(native) if use_native else None  # as built
            with torch.no_grad():
                edit(params)
            launch, _, stale = plan._prepare_native(native) if use_native else plan._prepare_python()
            ptrs = None if launch is None else (launch.active.tolist(), launch.pptrs[launch.active].tolist(),
                                                launch.gptrs[launch.active].tolist())  # fmt: skip
            verdicts.append((launch is not None, stale, None if ptrs is None else ptrs[0]))
            if use_native and launch is not None:
                present = [k for k, p in enumerate(params) if p.grad is not None]
                assert ptrs[1] == [params[k].data_ptr() for k in present], name
                assert ptrs[2] == [params[k].grad.data_ptr() for k in present], name
        if name in ("grad freed", "grad offset freed", "param freed", "grad wrapper"):
            assert not verdicts[0][0] and not verdicts[1][0], name  # refused (stale or not: either rebuilds safely)
        else:
            assert verdicts[0] == verdicts[1], (name, verdicts)


def _two(g: torch.Tensor) -> torch.Tensor:
    from torch.testing._internal.two_tensor import TwoTensor

    return TwoTensor(g.clone(), g.clone())


@pytest.mark.heavy
def test_gradient_dropped_by_another_thread_during_a_step_is_still_held() -> None:
    """The checks in C++ keep every storage they passed alive until the step is done:
    another thread replacing ``p.grad`` while the kernels run (they release the GIL)
    once freed the gradient they were reading (a segfault)."""
    code = """
import threading, time, torch, adamkit
from adamkit.optim import _native
if _native.module(wait=True) is None:
    raise SystemExit("native checks unavailable: " + str(_native.status))
N = 1 << 20
ps = [torch.nn.Parameter(torch.randn(N)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(10)) for _ in range(1100)]
opt = adamkit.AdamW(ps)
for p in ps:
    p.grad = torch.randn_like(p)
opt.step(); opt.step()
assert opt._plans[0]._record is not None  # the C++ checks are in use
stop = False
def other():
    while not stop:
        for p in ps[:2]:
            p.grad = torch.full((N,), 0.5)
t = threading.Thread(target=other); t.start(); t0 = time.time()
try:
    while time.time() - t0 < 4:
        opt.step()
finally:
    stop = True; t.join()
assert all(torch.isfinite(p).all() for p in ps[:2])
print("ok")
"""
    result = run_isolated(code)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_plans_of_several_groups_stay_cached(monkeypatch) -> None:
    """A plan's own writes of its parameters' state do not invalidate another group's
    plan: two groups build two plans, once (they once rebuilt each other every step)."""
    from adamkit.optim import _plan

    built = []
    init = _plan.GroupPlan.__init__
    monkeypatch.setattr(_plan.GroupPlan, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    a, b = torch.randn(100, requires_grad=True), torch.randn(50, requires_grad=True)
    opt = adamkit.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}])
    for _ in range(5):
        a.grad, b.grad = torch.randn(100), torch.randn(50)
        opt.step()
    assert len(built) == 2


def test_a_stepped_parameter_fails_autograd_like_torchs_in_place_step() -> None:
    """The kernels write through addresses; the step bumps the parameters' version
    counters as torch's in-place step does, so a graph that saved a parameter before the
    step refuses to backpropagate (it once used the new values silently)."""
    for make in (torch.optim.AdamW, adamkit.AdamW):
        w = torch.nn.Parameter(torch.randn(10))
        opt = make([w], lr=0.1)
        w.grad = torch.randn(10)
        opt.step()
        x = torch.randn(10, requires_grad=True)
        loss = (w * x).sum()
        before = w._version
        opt.step()
        assert w._version > before, make
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("bits", [32, 8])
def test_state_reset_by_reassignment_starts_over_as_torchs(bits: int) -> None:
    """``opt.state = defaultdict(dict)`` (a common reset) starts the moments over, as in
    torch; it once raised AttributeError, and a new state whose mutation count matched
    the old plan's could have been taken for the old one."""
    from collections import defaultdict

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4096, generator=gen, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours = adamkit.AdamW([p], state_bits=bits)
    fresh = adamkit.AdamW([q], state_bits=bits)
    grads = [torch.randn(4096, generator=gen) for _ in range(5)]
    for g in grads[:3]:
        p.grad = g.clone()
        ours.step()
    ours.state = defaultdict(dict)
    with torch.no_grad():
        q.copy_(p)
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        fresh.step()
    assert torch.equal(p, q)
    assert float(ours.state[p]["step"]) == 2.0


@pytest.mark.heavy
@pytest.mark.parametrize("checks", ["python", "native"])
@pytest.mark.parametrize("what", ["gradient", "parameter"])
def test_storage_shrunk_under_a_tensor_is_refused(what: str, checks: str) -> None:
    """A storage resized smaller under a parameter or a kept gradient (to a size that is
    not 0): a clear ValueError, nothing read or written past its end (it once read or
    wrote the old size: a segfault or heap corruption; torch.optim crashes too)."""
    code = f"""
import torch, adamkit
from adamkit.optim import _native
if {checks!r} == "native" and _native.module(wait=True) is None:
    raise SystemExit("native checks unavailable: " + str(_native.status))
p = torch.nn.Parameter(torch.randn(1 << 20))
opt = adamkit.AdamW([p]); p.grad = torch.randn_like(p); opt.step(); opt.step()
tensor = p.grad if {what!r} == "gradient" else p
tensor.untyped_storage().resize_(4)
try:
    opt.step()
except ValueError as e:
    assert "storage holds 4 bytes" in str(e), e
    print("refused")
"""
    env = {"ADAMKIT_NATIVE_CHECKS": "0"} if checks == "python" else None
    result = run_isolated(code, env=env)
    assert result.returncode == 0 and "refused" in result.stdout, (result.returncode, result.stderr[-2000:])


@pytest.mark.heavy
@pytest.mark.parametrize("how", ["grow", "storage to 0"])
@pytest.mark.parametrize("source", ["plan", "checkpoint"])
@pytest.mark.parametrize("bits", [32, 8])
def test_state_tensor_resized_in_place_is_refused(bits: int, source: str, how: str) -> None:
    """``exp_avg.resize_`` to a larger size, or its storage resized to 0, moves the
    memory the plan's table points at: the next step refuses it (torch's size error, or
    the storage's), nothing written (it once wrote the old, freed memory: a segfault)."""
    code = f"""
import torch, adamkit
p = torch.nn.Parameter(torch.randn(1 << 18))
opt = adamkit.AdamW([p], state_bits={bits}); p.grad = torch.randn_like(p); opt.step()
if {source!r} == "checkpoint":
    opt.load_state_dict(opt.state_dict()); opt.step()
key = "exp_avg" if {bits} == 32 else "exp_avg_codes"
t = opt.state[p][key]
if {how!r} == "grow":
    t.resize_(1 << 22)
else:
    t.untyped_storage().resize_(0)
before = p.detach().clone()
try:
    opt.step()
except RuntimeError as e:
    assert "has shape" in str(e) or "storage holds fewer" in str(e), e
    assert torch.equal(p, before)
    print("refused")
"""
    result = run_isolated(code)
    assert result.returncode == 0 and "refused" in result.stdout, (result.returncode, result.stderr[-2000:])
