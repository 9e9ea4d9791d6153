"""adamkit.CPUOffload with CPU tensors standing in for the device: the same numbers as the
optimizer it wraps (bit for bit), in both modes, with schedulers, clipping, accumulation,
GradScaler and checkpoints; hooks and ordering; bad input changes nothing."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

import adamkit
from adamkit.offload import CPUOffload

MODES = [False, True]  # step_in_backward


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 80), torch.nn.Tanh(), torch.nn.Linear(80, 1)
    )


def _batch(i):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 64, generator=gen), torch.randn(16, 1, generator=gen)


def _loss(model, i):
    x, y = _batch(i)
    return ((model(x) - y) ** 2).mean()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _groups(model):
    ps = list(model.parameters())
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.1}]


def _train(
    model, opt, steps=5, clip=None, sched=None, scaler=None, micro=1, accumulate=None, unscale=True, poison=None
):
    for i in range(steps):
        opt.zero_grad()
        for k in range(micro):
            ctx = accumulate() if accumulate is not None and k < micro - 1 else _nothing()
            with ctx:
                loss = _loss(model, i * micro + k) / micro
                (loss if scaler is None else scaler.scale(loss)).backward()
        if poison == i:  # an overflowed gradient: GradScaler skips the step
            next(model.parameters()).grad[0, 0] = float("inf")
        if scaler is not None and unscale:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched is not None:
            sched.step()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("step_in_backward", MODES)
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_same_numbers_as_the_wrapped_optimizer(bits, step_in_backward):
    a, b = _model(), _model()
    kw = dict(lr=1e-2, state_bits=bits, min_quant_size=1000)
    plain = adamkit.AdamW(_groups(a), **kw)
    off = CPUOffload(_groups(b), chunk_size=3000, step_in_backward=step_in_backward, **kw)
    assert len(off._runs) > len(off.param_groups)  # several runs per group: stepped run by run
    for m, o in ((a, plain), (b, off)):
        _train(m, o, sched=torch.optim.lr_scheduler.StepLR(o, 2, 0.5))
    assert _same(a, b)
    assert off.param_groups[1]["lr"] == plain.param_groups[1]["lr"] == 3e-3 * 0.25
    p = next(iter(b.parameters()))
    assert off.state[p]["step"] == 5
    ours, theirs = off.state_dict(), plain.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for k, st in theirs["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(ours["state"][k][key]), torch.as_tensor(v)), (k, key)


def test_clipping_and_gradscaler_wait_for_the_end_of_backward():
    a, b = _model(), _model()
    plain, off = adamkit.AdamW(a.parameters(), lr=1e-2), CPUOffload(b.parameters(), lr=1e-2)
    for m, o in ((a, plain), (b, off)):
        _train(m, o, clip=0.05)
    assert _same(a, b)
    for unscale in (True, False):  # unscaled by the user (then clipped), or left to the step
        for m, o in ((a, plain), (b, off)):
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
            _train(m, o, steps=6, scaler=scaler, unscale=unscale, clip=0.05 if unscale else None, poison=2)
        assert _same(a, b)
    assert off.state[next(b.parameters())]["step"] == plain.state[next(a.parameters())]["step"] == 15


def test_gradscaler_refused_when_stepping_in_backward():
    b = _model()
    off = CPUOffload(b.parameters(), lr=1e-2, step_in_backward=True)
    with pytest.raises(RuntimeError, match="GradScaler"):
        _train(b, off, steps=1, scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("step_in_backward", MODES)
def test_gradient_accumulation(step_in_backward):
    a, b = _model(), _model()
    plain = adamkit.AdamW(a.parameters(), lr=1e-2)
    off = CPUOffload(b.parameters(), lr=1e-2, chunk_size=5000, step_in_backward=step_in_backward)
    _train(a, plain, micro=3, clip=0.1 if not step_in_backward else None)
    _train(b, off, micro=3, accumulate=off.accumulate, clip=0.1 if not step_in_backward else None)
    assert _same(a, b)
    if not step_in_backward:  # without accumulate(): each micro-batch's copy is made again, same result
        c = _model()
        _train(c, CPUOffload(c.parameters(), lr=1e-2), micro=3, clip=0.1)
        assert _same(a, c)


def test_step_in_backward_steps_during_backward():
    b = _model()
    off = CPUOffload(b.parameters(), lr=1e-2, chunk_size=1, step_in_backward=True)
    before = [p.detach().clone() for p in b.parameters()]
    _loss(b, 0).backward()
    for run in off._runs:  # every run was handed to the worker by the hooks
        assert run.pending is not None
        run.pending.result()
    assert all(not torch.equal(p, q) for p, q in zip(b.parameters(), before))  # stepped before step()
    stepped = [p.detach().clone() for p in b.parameters()]
    off.step()  # collects, steps nothing again
    assert _same_list(list(b.parameters()), stepped)
    assert all(off.state[p]["step"] == 1 for p in b.parameters())


def _same_list(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_default_mode_copies_gradients_during_backward():
    b = _model()
    off = CPUOffload(b.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in b.parameters()]
    _loss(b, 0).backward()
    for p in b.parameters():  # on the host already; the parameters not stepped yet
        assert torch.equal(off._host[p].grad, p.grad)
        assert off._fresh(p, p.grad)
    assert _same_list(list(b.parameters()), before)
    p = next(iter(b.parameters()))
    p.grad.mul_(0.5)  # changed after its copy: copied again at step()
    assert not off._fresh(p, p.grad)


def test_unused_parameters_and_partial_runs():
    for step_in_backward in MODES:
        a, b = _model(), _model()
        unused = [torch.nn.Parameter(torch.ones(10)) for _ in range(2)]  # never gets a gradient
        plain = adamkit.AdamW([*a.parameters(), unused[0]], lr=1e-2)
        off = CPUOffload([*b.parameters(), unused[1]], lr=1e-2, step_in_backward=step_in_backward)  # one run
        for m, o in ((a, plain), (b, off)):
            for i in range(3):
                o.zero_grad()
                _loss(m, i).backward()  # the run never completes in backward: stepped by step()
                o.step()
        assert _same(a, b)
        assert unused[1] not in off.state and torch.equal(unused[1], torch.ones(10))
        assert off.state[b[0].bias]["step"] == 3


def test_parameters_changed_outside_are_picked_up():
    a, b = _model(), _model()
    plain, off = adamkit.AdamW(a.parameters(), lr=1e-2), CPUOffload(b.parameters(), lr=1e-2)
    _train(a, plain, steps=2)
    _train(b, off, steps=2)
    new = _model(7).state_dict()
    a.load_state_dict(new)
    b.load_state_dict(new)  # in place: the device copies' versions change
    with torch.no_grad():
        a[2].weight.data = a[2].weight.data * 0 + 0.01
        b[2].weight.data = b[2].weight.data * 0 + 0.01  # a new storage
    _train(a, plain, steps=2)
    _train(b, off, steps=2)
    assert _same(a, b)


def test_checkpoints_load_both_ways():
    a, b = _model(), _model()
    plain = adamkit.AdamW(_groups(a), lr=1e-2, state_bits=8, min_quant_size=1000)
    off = CPUOffload(_groups(b), lr=1e-2, state_bits=8, min_quant_size=1000, chunk_size=3000)
    _train(a, plain, steps=3)
    _train(b, off, steps=3)
    # the wrapper's checkpoint into a plain optimizer and a plain one's into the wrapper
    c, d = _model(), _model()
    c.load_state_dict(b.state_dict())
    d.load_state_dict(a.state_dict())
    plain2 = adamkit.AdamW(_groups(c), lr=1, state_bits=8, min_quant_size=1000)
    plain2.load_state_dict(torch.load(_saved(off.state_dict()), weights_only=True))
    off2 = CPUOffload(_groups(d), lr=1, state_bits=8, min_quant_size=1000, chunk_size=5000)
    off2.load_state_dict(torch.load(_saved(plain.state_dict()), weights_only=True))
    assert off2.param_groups[1]["lr"] == 3e-3
    for m, o in ((a, plain), (b, off), (c, plain2), (d, off2)):
        _train(m, o, steps=3)
    assert _same(a, b) and _same(a, c) and _same(a, d)


def test_torch_checkpoint_and_torch_as_optimizer_class():
    a, b = _model(), _model()
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2)
    off = CPUOffload(b.parameters(), torch.optim.AdamW, lr=1e-2)
    _train(a, plain, steps=3, clip=0.1)
    _train(b, off, steps=3, clip=0.1)
    assert _same(a, b)
    c = _model()
    c.load_state_dict(b.state_dict())
    back = torch.optim.AdamW(c.parameters(), lr=1e-2)
    back.load_state_dict(off.state_dict())
    _train(a, plain, steps=2)
    _train(c, back, steps=2)
    assert _same(a, c)
    # torch's checkpoint into adamkit offload
    d = _model()
    d.load_state_dict(a.state_dict())
    off2 = CPUOffload(d.parameters(), lr=1e-2)
    off2.load_state_dict(plain.state_dict())
    _train(a, plain, steps=2)
    _train(d, off2, steps=2)
    assert torch.allclose(a[0].weight, d[0].weight, rtol=0, atol=1e-6)


def _saved(sd):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


def test_add_param_group_and_state_view():
    a, b = _model(), _model()
    pa, pb = list(a.parameters()), list(b.parameters())
    plain = adamkit.AdamW(pa[:2], lr=1e-2)
    off = CPUOffload(pb[:2], lr=1e-2, chunk_size=2000)
    plain.add_param_group({"params": pa[2:], "lr": 1e-3})
    off.add_param_group({"params": pb[2:], "lr": 1e-3})
    assert off.param_groups[1]["betas"] == (0.9, 0.999)
    _train(a, plain)
    _train(b, off)
    assert _same(a, b)
    assert len(off.state) == len(pb) and all(p in off.state for p in pb)
    assert torch.equal(off.state[pb[0]]["exp_avg"], plain.state[pa[0]]["exp_avg"])
    with pytest.raises(ValueError, match="more than once"):
        off.add_param_group({"params": pb[:1]})
    assert len(off.param_groups) == 2 and len(off.optimizer.param_groups) == len(off._runs)


def test_bad_input_changes_nothing():
    b = _model()
    off = CPUOffload(_groups(b), lr=1e-2)
    _train(b, off, steps=1)
    snap = copy.deepcopy(off.state_dict()), [p.detach().clone() for p in b.parameters()]
    _loss(b, 1).backward()
    ps = list(b.parameters())
    good = ps[-1].grad.clone()
    ps[-1].grad.set_(torch.zeros(3))  # resized behind torch's back, in the last group: nothing steps
    with pytest.raises(ValueError, match="must match its parameter"):
        off.step()
    ps[-1].grad = good
    off.param_groups[1]["lr"] = -1.0  # the second group invalid: the first does not step either
    with pytest.raises(ValueError, match="learning rate"):
        off.step()
    assert _same_list(list(b.parameters()), snap[1])
    off.param_groups[1]["lr"] = 3e-3
    _assert_state_equal(off.state_dict(), snap[0])
    off.step()
    assert not _same_list(list(b.parameters()), snap[1])


def _assert_state_equal(x, y):
    assert x["param_groups"] == y["param_groups"]
    for k in y["state"]:
        for key, v in y["state"][k].items():
            assert torch.equal(torch.as_tensor(x["state"][k][key]), torch.as_tensor(v))


def test_construction_errors():
    m = _model()
    with pytest.raises(ValueError, match="empty"):
        CPUOffload([])
    with pytest.raises(ValueError, match="chunk_size"):
        CPUOffload(m.parameters(), chunk_size=0)
    with pytest.raises(TypeError, match="leaf"):
        CPUOffload([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="step_in_backward"):
        CPUOffload(m.parameters(), step_in_backward=True, nonfinite="skip")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        CPUOffload(m.parameters(), lr=-1)
    with pytest.raises(ValueError, match="more than once"):
        p = next(m.parameters())
        CPUOffload([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="param groups"):
        CPUOffload(m.parameters()).load_state_dict({"state": {}, "param_groups": []})


def test_not_picklable_with_a_clear_error():
    off = CPUOffload(_model().parameters())
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(off)
    with pytest.raises(TypeError, match="state_dict"):
        copy.deepcopy(off)


def test_nonfinite_skip_steps_the_whole_step_or_nothing():
    a, b = _model(), _model()
    plain = adamkit.AdamW(a.parameters(), lr=1e-2, nonfinite="skip")
    off = CPUOffload(b.parameters(), lr=1e-2, nonfinite="skip", chunk_size=2000)
    for m, o in ((a, plain), (b, off)):
        for i in range(3):
            o.zero_grad()
            _loss(m, i).backward()
            if i == 1:
                m[-1].bias.grad[0] = float("nan")
            o.step()
    assert _same(a, b)
    assert off.optimizer.skipped_steps == plain.skipped_steps == 1


def test_worker_errors_reach_step_and_training_continues():
    b = _model()
    off = CPUOffload(b.parameters(), lr=1e-2, step_in_backward=True, nonfinite="raise" if False else "mask")
    real = off.optimizer._step_groups
    calls = []

    def failing(only):
        calls.append(threading.current_thread().name)
        raise RuntimeError("boom")

    off.optimizer._step_groups = failing
    _loss(b, 0).backward()
    with pytest.raises(RuntimeError, match="boom"):
        off.step()
    assert calls and all(name.startswith("adamkit-offload") for name in calls)
    off.optimizer._step_groups = real
    off.zero_grad()
    _loss(b, 1).backward()
    off.step()
    assert all(off.state[p]["step"] == 1 for p in b.parameters())


def test_bf16_parameters_and_repr():
    a, b = _model().bfloat16(), _model().bfloat16()
    plain, off = adamkit.AdamW(a.parameters(), lr=1e-2), CPUOffload(b.parameters(), lr=1e-2, step_in_backward=True)
    for m, o in ((a, plain), (b, off)):
        for i in range(3):
            o.zero_grad()
            x, y = _batch(i)
            ((m(x.bfloat16()) - y.bfloat16()) ** 2).mean().backward()
            o.step()
    assert _same(a, b)
    assert "CPUOffload(" in repr(off)
    off.close()


def test_shared_host_copies_step_in_place():
    """The bench's CPU mode: parameters are their own host copies (copies are no-ops)."""

    class Shared(CPUOffload):
        _share_cpu = True

    for step_in_backward in MODES:
        a, b = _model(), _model()
        plain, off = adamkit.AdamW(a.parameters(), lr=1e-2), Shared(b.parameters(), lr=1e-2, chunk_size=3000)
        off.step_in_backward = step_in_backward
        _train(a, plain, clip=0.1 if not step_in_backward else None, steps=2)
        _train(b, off, clip=0.1 if not step_in_backward else None, steps=2)
        assert all(off._host[p].data_ptr() == p.data_ptr() for p in b.parameters())
        with torch.no_grad():
            a[0].weight.data = a[0].weight.data * 0.5
            b[0].weight.data = b[0].weight.data * 0.5
        _train(a, plain, steps=2)
        _train(b, off, steps=2)
        assert _same(a, b)


def test_copy_grads_in_step_only():
    """``copy_grads_in_backward=False``: a gradient written through ``.data`` after backward
    (which autograd does not see) is still the one stepped."""
    a, b, c = _model(), _model(), _model()
    plain = adamkit.AdamW(a.parameters(), lr=1e-2)
    late = CPUOffload(b.parameters(), lr=1e-2, copy_grads_in_backward=False)
    eager = CPUOffload(c.parameters(), lr=1e-2)
    for m, o in ((a, plain), (b, late), (c, eager)):
        o.zero_grad()
        _loss(m, 0).backward()
        for p in m.parameters():
            p.grad.data.mul_(0.25)  # unseen by the version counter
        o.step()
    assert _same(a, b)
    assert not _same(a, c)  # the documented limit of copying in backward


# ---------------------------------------------------------------- other offloaders
def test_adamkit_as_torchaos_optimizer_class():
    """torchao's CPUOffloadOptimizer builds ``optimizer_class([{"params": p_host, **group}],
    **kwargs)`` per parameter (a bare tensor as the group's params), copies each gradient
    into ``p_host.grad`` and steps the parameters in the order their gradients arrived
    (it refuses a machine without CUDA: its loop is run here, the class on a GPU by
    scripts/gpu-check.sh). The same numbers as one optimizer over every parameter."""
    a, b = _model(), _model()
    plain = adamkit.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, state_bits=8, min_quant_size=1000)
    hosts = {p: p.detach().clone() for p in b.parameters()}
    for h in hosts.values():
        h.grad = torch.empty_like(h)
    group = {"lr": 1e-2}
    optims = {
        p: adamkit.AdamW([{"params": h, **group}], weight_decay=0.1, state_bits=8, min_quant_size=1000)
        for p, h in hosts.items()
    }
    queue = {}

    def arrived(p):  # torchao's backward hook, the copy synchronous
        hosts[p].grad.copy_(p.grad)
        queue.pop(p, None)
        queue[p] = True

    for p in hosts:
        p.register_post_accumulate_grad_hook(arrived)
    for i in range(4):
        plain.zero_grad()
        _loss(a, i).backward()
        plain.step()
        for p in hosts:
            p.grad = None
        _loss(b, i).backward()
        assert list(queue) == list(reversed(list(hosts)))  # backward order
        with torch.no_grad():
            for p in queue:
                optims[p].step()
                p.copy_(hosts[p])
        queue.clear()
    assert _same(a, b)
    assert all(o.param_groups[0]["weight_decay"] == 0.1 and len(o.state) == 1 for o in optims.values())
    for o in optims.values():  # per-parameter checkpoints, as torchao saves them
        sd = o.state_dict()
        assert list(sd["state"]) == [0] and sd["param_groups"][0]["params"] == [0]


def test_adamkit_as_deepspeed_client_optimizer():
    """DeepSpeed's ZeRO-Offload with a client optimizer (``zero_force_ds_cpu_optimizer:
    false``): it builds the optimizer over the model's parameters, then reassigns each
    group's ``params`` to one flat fp32 CPU partition, sets its ``.grad`` each step, calls
    ``step()`` and copies the partition back; schedulers write ``param_groups[i]["lr"]``.
    The same numbers as the optimizer over the flat tensors from the start."""
    for bits in (32, 8):
        model = _model()
        groups = _groups(model)
        client = adamkit.AdamW(groups, lr=1e-2, state_bits=bits, min_quant_size=1000)
        flats = [torch.cat([p.detach().reshape(-1) for p in g["params"]]) for g in groups]
        for g, flat in zip(client.param_groups, flats):
            g["params"] = [flat]  # what DeepSpeed does to its client optimizer
        twins = [f.clone() for f in flats]
        ref = adamkit.AdamW(
            [{**{k: v for k, v in g.items() if k != "params"}, "params": [t]} for g, t in zip(groups, twins)],
            lr=1e-2,
            state_bits=bits,
            min_quant_size=1000,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(client, lambda s: 1 / (1 + s))
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1 / (1 + s))
        gen = torch.Generator().manual_seed(3)
        for _ in range(4):
            for flat, twin in zip(flats, twins):
                flat.grad = torch.randn(flat.shape, generator=gen)
                twin.grad = flat.grad.clone()
            client.step()
            ref.step()
            sched.step()
            ref_sched.step()
        assert all(torch.equal(f, t) for f, t in zip(flats, twins))
        assert client.param_groups[1]["lr"] == ref.param_groups[1]["lr"]
        ref2 = adamkit.AdamW([{"params": [t.clone()]} for t in twins], lr=1e-2, state_bits=bits, min_quant_size=1000)
        ref2.load_state_dict(client.state_dict())  # DeepSpeed's checkpoint of the partition's state


@pytest.mark.heavy
def test_bench_offload_quick(tmp_path):
    """``adamkit bench --offload --quick``: every contender timed; the CPU stand-in for
    torchao's loop gives torch's fused AdamW's numbers."""
    import json
    from types import SimpleNamespace

    from adamkit import bench_offload

    out = tmp_path / "offload.json"
    args = SimpleNamespace(workloads=["small-2k"], quick=True, reps=1, json=str(out))
    assert bench_offload.run(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["optimizer"] for r in rows] == list(bench_offload.contenders(torch.device("cpu")))
    assert all(r["median_ms"] > 0 for r in rows)
    assert all(r["vs_torchao"] > 0 for r in rows if r["optimizer"] != bench_offload.BASELINE)
    a, b = _model(), _model()
    loop, fused = bench_offload._PerParameterOffload(list(a.parameters()), lr=1e-2), None
    fused = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    _train(a, loop, steps=3)
    _train(b, fused, steps=3)
    assert _same(a, b)


# ---------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("step_in_backward", MODES)
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_offload_equals_the_host_optimizer(bits, step_in_backward):
    """Parameters and gradients on the GPU, pinned host copies, copies on side streams:
    the numbers of the same optimizer stepping CPU copies with the GPU's gradients."""
    gpu = _model().cuda()
    off = CPUOffload(gpu.parameters(), lr=1e-2, state_bits=bits, min_quant_size=1000, chunk_size=3000,
                     step_in_backward=step_in_backward)  # fmt: skip
    assert all(off._host[p].is_pinned() for p in gpu.parameters())
    _cuda_against_the_host(gpu, off, steps=4, state_bits=bits, min_quant_size=1000)


def _cuda_against_the_host(gpu, off, steps, **kw):
    """Train ``gpu`` with ``off`` and a CPU twin with adamkit.AdamW(**kw) on the GPU's
    gradients; the parameters must end equal (and each next forward sees the copies)."""
    cpu = _model()
    plain = adamkit.AdamW(cpu.parameters(), lr=1e-2, **kw)
    for i in range(steps):
        off.zero_grad()
        x, y = _batch(i)
        ((gpu(x.cuda()) - y.cuda()) ** 2).mean().backward()
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            p.grad = q.grad.cpu()
        off.step()
        plain.step()
        assert torch.isfinite(gpu(x.cuda())).all()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert torch.equal(p, q.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_torchao_offload_with_adamkit():
    torchao_optim = pytest.importorskip("torchao.optim")
    gpu = _model().cuda()
    off = torchao_optim.CPUOffloadOptimizer(gpu.parameters(), adamkit.AdamW, lr=1e-2, minimal_size=0)
    _cuda_against_the_host(gpu, off, steps=3)


# ---------------------------------------------------------------- hostile cases
def test_a_dropped_offload_is_collected_and_its_hooks_go_with_it():
    import gc
    import weakref

    m = _model()
    for step_in_backward in MODES:
        off = CPUOffload(m.parameters(), lr=0.1, step_in_backward=step_in_backward)
        _loss(m, 0).backward()
        off.step()
        off.zero_grad()
        ref = weakref.ref(off)
        del off
        gc.collect()
        assert ref() is None
        before = [p.detach().clone() for p in m.parameters()]
        sgd = torch.optim.SGD(m.parameters(), lr=0.0)
        _loss(m, 1).backward()
        sgd.step()
        sgd.zero_grad()
        assert _same_list(list(m.parameters()), before)


def test_step_in_backward_refuses_a_second_backward_before_step():
    m = _model()
    off = CPUOffload(m.parameters(), lr=0.1, step_in_backward=True)
    _loss(m, 0).backward()
    with pytest.raises(RuntimeError, match="arrived twice"):
        _loss(m, 1).backward()
    off.zero_grad()  # ends that backward: the next one starts afresh
    _loss(m, 2).backward()
    off.step()
    assert all(off.state[p]["step"] == 2 for p in m.parameters())


def test_step_in_backward_after_a_failed_backward():
    """A backward that fails midway (an OOM a loop skips): the runs it stepped stay
    stepped; zero_grad() ends it; the next iteration steps every parameter once."""
    m = _model()
    off = CPUOffload(m.parameters(), lr=0.1, step_in_backward=True, chunk_size=1)

    def boom(grad):
        raise MemoryError("out of memory")

    handle = m[0].weight.register_hook(boom)  # fails after the later layers' gradients arrived
    with pytest.raises(MemoryError):
        _loss(m, 0).backward()
    handle.remove()
    off.zero_grad()
    steps = {p: int(off.state[p]["step"]) if p in off.state else 0 for p in m.parameters()}
    assert steps[m[-1].weight] == 1 and steps[m[0].weight] == 0
    _loss(m, 1).backward()
    off.step()
    assert all(int(off.state[p]["step"]) == steps[p] + 1 for p in m.parameters())


def test_step_in_backward_skips_parameters_frozen_since():
    m = _model()
    off = CPUOffload(m.parameters(), lr=0.1, step_in_backward=True, chunk_size=10**6)
    _loss(m, 0).backward()
    off.step()
    off.zero_grad()
    m[0].bias.requires_grad_(False)
    frozen = m[0].bias.detach().clone()
    _loss(m, 1).backward()
    off.step()
    assert torch.equal(m[0].bias, frozen) and off.state[m[0].bias]["step"] == 1
    assert off.state[m[0].weight]["step"] == 2


def test_writes_through_data_need_reload_parameters():
    a, b = _model(), _model()
    plain, off = adamkit.AdamW(a.parameters(), lr=1e-2), CPUOffload(b.parameters(), lr=1e-2)
    for m, o in ((a, plain), (b, off)):
        for i in range(3):
            o.zero_grad()
            _loss(m, i).backward()
            o.step()
            for p in m.parameters():
                p.data.clamp_(-0.05, 0.05)  # unseen by autograd's version counter
            if o is off:
                off.reload_parameters()
    assert _same(a, b)


def test_hostile_checkpoints_change_nothing():
    m = _model()
    off = CPUOffload(_groups(m), lr=1e-2)
    _train(m, off, steps=2)
    good = off.state_dict()
    snap = copy.deepcopy(good)
    bad = [
        {"param_groups": good["param_groups"]},  # no state: not "start afresh"
        {"state": good["state"], "param_groups": good["param_groups"][:1]},
        {"state": good["state"], "param_groups": [good["param_groups"][0], {"params": [3]}]},
        {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}}, "param_groups": good["param_groups"]},
        "not a checkpoint",
    ]
    for sd in bad:
        with pytest.raises((ValueError, TypeError)):
            off.load_state_dict(sd)
        _assert_state_equal(off.state_dict(), snap)


def test_stochastic_rounding_is_bit_for_bit():
    a, b = _model().bfloat16(), _model().bfloat16()
    kw = dict(lr=1e-3, stochastic_rounding=True)
    plain, off = adamkit.AdamW(a.parameters(), **kw), CPUOffload(b.parameters(), chunk_size=1000, **kw)
    assert len(off._runs) == 1  # one run: one seed, positions in the group
    for m, o in ((a, plain), (b, off)):
        torch.manual_seed(5)
        for i in range(3):
            o.zero_grad()
            x, y = _batch(i)
            ((m(x.bfloat16()) - y.bfloat16()) ** 2).mean().backward()
            o.step()
    assert _same(a, b)
    with pytest.raises(ValueError, match="stochastic_rounding"):
        CPUOffload(b.parameters(), step_in_backward=True, **kw)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: adamkit.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    ],
)
def test_gradscaler_at_any_scale_is_bit_for_bit(make):
    a, b = _model(), _model()
    plain = make(list(a.parameters()))
    off = CPUOffload(b.parameters(), lambda ps, **kw: make(ps))
    for m, o in ((a, plain), (b, off)):
        scaler = torch.amp.GradScaler("cpu", init_scale=3000.0, growth_interval=2)
        _train(m, o, steps=4, scaler=scaler, unscale=False, poison=1)
    assert _same(a, b)


def test_group_edge_cases():
    m = _model()
    ps = list(m.parameters())
    off = CPUOffload([{"params": []}, {"params": ps[:2]}], lr=1e-2)  # an empty group, as torch allows
    off.add_param_group({"params": []})
    with pytest.raises(TypeError, match="leaf"):
        off.add_param_group({"params": [ps[2] * 2]})
    with pytest.raises(ValueError, match="more than once"):
        off.add_param_group({"params": [ps[2], ps[2]]})
    with pytest.raises(ValueError, match="more than once"):
        CPUOffload([ps[0], ps[0]])
    off.add_param_group({"params": ps[2:]})
    assert [len(g["params"]) for g in off.param_groups] == [0, 2, 0, len(ps) - 2]
    _train(m, off, steps=2)
    assert all(off.state[p]["step"] == 2 for p in ps)
    sd = off.state_dict()
    off.load_state_dict(sd)
    with pytest.raises(ValueError, match="copy_grads_in_backward"):
        CPUOffload(ps, step_in_backward=True, copy_grads_in_backward=False)


def test_step_in_backward_checks_options_before_stepping():
    m = _model()
    off = CPUOffload(_groups(m), lr=1e-2, step_in_backward=True, chunk_size=1)
    before = [p.detach().clone() for p in m.parameters()]
    off.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        _loss(m, 0).backward()
    off.zero_grad()
    assert _same_list(list(m.parameters()), before)


def test_a_worker_error_is_raised_once():
    m = _model()
    off = CPUOffload(m.parameters(), lr=1e-2, step_in_backward=True)
    real = off.optimizer._step_groups

    def failing(only):
        raise RuntimeError("boom")

    off.optimizer._step_groups = failing
    _loss(m, 0).backward()
    with pytest.raises(RuntimeError, match="boom"):
        off.state_dict()
    off.optimizer._step_groups = real
    off.state_dict()  # raised once, not forever
    off.zero_grad()
    _loss(m, 1).backward()
    off.step()


def test_state_dict_hooks_run():
    m = _model()
    off = CPUOffload(m.parameters(), lr=1e-2)
    seen = []
    off.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    off.register_state_dict_post_hook(lambda o, sd: seen.append("post"))
    off.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    off.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    off.load_state_dict(off.state_dict())
    assert seen == ["pre", "post", "load-pre", "load-post"]


def test_gradscaler_after_direct_steps():
    """A loop that steps without a scaler first (a warm-up), then with one."""
    a, b = _model(), _model()
    plain, off = adamkit.AdamW(a.parameters(), lr=1e-2), CPUOffload(b.parameters(), lr=1e-2)
    for m, o in ((a, plain), (b, off)):
        _train(m, o, steps=2)
        _train(m, o, steps=3, scaler=torch.amp.GradScaler("cpu", init_scale=3000.0), unscale=False)
        _train(m, o, steps=1)
    assert _same(a, b)


def test_reload_parameters_mid_step_in_backward():
    a, b = _model(), _model()
    plain = adamkit.AdamW(a.parameters(), lr=1e-2)
    off = CPUOffload(b.parameters(), lr=1e-2, step_in_backward=True, chunk_size=300)
    _train(a, plain, steps=2)
    for i in range(2):
        off.zero_grad()
        _loss(b, i).backward()
        off.reload_parameters()  # the runs stepped in this backward are not stepped again
        off.step()
    assert _same(a, b) and all(off.state[p]["step"] == 2 for p in b.parameters())


def test_options_that_decide_for_the_whole_step_set_later():
    m = _model().bfloat16()
    off = CPUOffload(m.parameters(), lr=1e-2, chunk_size=300)
    off.param_groups[0]["stochastic_rounding"] = True  # several runs: one seed each would differ
    x, y = _batch(0)
    ((m(x.bfloat16()) - y.bfloat16()) ** 2).mean().backward()
    with pytest.raises(ValueError, match="stochastic_rounding was switched on"):
        off.step()
    m = _model()
    off = CPUOffload(m.parameters(), lr=1e-2, step_in_backward=True)
    off.optimizer.nonfinite = "skip"
    with pytest.raises(ValueError, match="step_in_backward"):
        _loss(m, 0).backward()


@pytest.mark.parametrize("step_in_backward", MODES)
def test_frozen_parameters_with_stale_gradients_step_as_without_offload(step_in_backward):
    a, b = _model(), _model()
    plain = adamkit.AdamW(a.parameters(), lr=1e-2, weight_decay=0.5)
    off = CPUOffload(b.parameters(), lr=1e-2, weight_decay=0.5, chunk_size=300, step_in_backward=step_in_backward)
    for m, o in ((a, plain), (b, off)):
        for i in range(3):
            o.zero_grad(set_to_none=False)  # a frozen parameter keeps a zeroed gradient
            if i == 1:
                m[0].weight.requires_grad_(False)
            _loss(m, i).backward()
            o.step()
    assert _same(a, b)
    assert off.state[b[0].weight]["step"] == plain.state[a[0].weight]["step"] == 3


def test_global_optim_manager_overrides_follow_the_device_parameters():
    emb, lin = torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 1000)
    m = torch.nn.Sequential(emb, lin)
    try:
        adamkit.keep_embeddings_32bit(m)  # registered for the device parameter, not its host copy
        off = CPUOffload(m.parameters(), state_bits=8, min_quant_size=1024)
        m(torch.randint(0, 1000, (8,))).sum().backward()
        off.step()
    finally:
        adamkit.GlobalOptimManager.get_instance().initialize()
    assert "exp_avg" in off.state[emb.weight] and "exp_avg_codes" in off.state[lin.weight]


def test_state_assigned_by_a_framework_stays_on_the_host():
    m = _model()
    off = CPUOffload(m.parameters(), lr=1e-2)
    _train(m, off, steps=1)
    p = next(m.parameters())
    off.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in off.state[p].items()}
    assert all(v.device.type == "cpu" for v in off.state[p].values() if isinstance(v, torch.Tensor))
    _train(m, off, steps=1)
    assert off.state[p]["step"] == 2
