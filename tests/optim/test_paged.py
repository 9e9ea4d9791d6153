"""Paged optimizer state on the CPU (``paged=True``, bitsandbytes' ``Paged*`` classes):
moments in a memory-mapped file, bit for bit the results of ordinary state."""

from __future__ import annotations

import copy
import errno
import gc
import io
import os
import pickle

import pytest
import torch
from helpers import round_trip, run_isolated

import adamkit
from adamkit import _paged

CLASSES = {"adam": adamkit.Adam, "adamw": adamkit.AdamW, "adamax": adamkit.Adamax, "nadam": adamkit.NAdam}
BIG = _paged.MIN_PAGED_NUMEL


def _params(seed=0, shapes=((BIG + 3,), (400, 300), (1000,), (7,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


def _run(cls, params, steps=4, seed=1, **kw):
    opt = cls(params, lr=0.01, **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def _moments(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k not in ("step", "mu_product")}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("name", list(CLASSES))
def test_paged_equals_unpaged_bit_for_bit(name, bits, backend):
    """Every algorithm and width, through the fused kernels' plans and the reference:
    the same parameters and state, bit for bit; large moments live in the mapped file,
    small tensors and block scales in ordinary memory."""
    a, b = _params(), _params()
    kw = dict(state_bits=bits, backend=backend)
    opt_a = _run(CLASSES[name], a, paged=True, **kw)
    opt_b = _run(CLASSES[name], b, **kw)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        mine, theirs = _moments(opt_a, pa), _moments(opt_b, pb)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
            moment = not key.endswith("_absmax") and key != "gnorm_vec"
            if not moment:
                assert not _paged.is_paged(mine[key]), key
            elif mine[key].numel() >= BIG:
                assert _paged.is_paged(mine[key]), key
            elif backend == "reference":  # per-parameter tensors: small ones in ordinary memory
                assert not _paged.is_paged(mine[key]), key
            assert not _paged.is_paged(theirs[key])


def test_the_file_is_unlinked_holds_the_state_and_is_freed():
    """One unlinked file per optimizer: its bytes are the state's, and its space and
    mappings go with the optimizer."""
    params = _params(shapes=((BIG * 2,),))
    opt = _run(adamkit.AdamW, params, paged=True)
    arena = opt._paged_arena
    info = os.fstat(arena.fd)
    assert info.st_nlink == 0 and info.st_size >= 2 * BIG * 2 * 4
    exp_avg = opt.state[params[0]]["exp_avg"]
    storage = exp_avg.untyped_storage()
    address = storage.data_ptr()
    offset = _paged._regions[address].offset
    raw = os.pread(arena.fd, 4 * exp_avg.numel(), offset + exp_avg.storage_offset() * 4)
    assert raw == exp_avg.detach().contiguous().numpy().tobytes()
    maps = open("/proc/self/maps").read()
    assert "adamkit-paged-" in maps and "(deleted)" in maps
    fd = arena.fd
    del opt, arena, exp_avg, storage
    gc.collect()
    assert address not in _paged._regions
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its last mapping (unless reused: then not our file)
    assert f"{address:x}-" not in open("/proc/self/maps").read()


@pytest.mark.heavy
def test_nothing_is_left_after_a_crash(tmp_path):
    """Killed with state mapped: the directory holds nothing (unlinked at creation)."""
    code = f"""
import os, signal, torch, adamkit
p = torch.nn.Parameter(torch.randn(300_000))
opt = adamkit.AdamW([p], paged=True, paged_dir={str(tmp_path)!r})
p.grad = torch.randn(300_000)
opt.step()
assert os.listdir({str(tmp_path)!r}) == []
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = run_isolated(code)
    assert done.returncode == -9, done.stderr
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_a_clear_error_and_changes_nothing(monkeypatch):
    """Reserving the file's space fails: OSError naming the directory, at the step that
    creates the state; the parameters and the (empty) state are as they were."""
    params = _params()
    opt = adamkit.AdamW(params, lr=0.01, paged=True)
    for p in params:
        p.grad = torch.ones_like(p)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="paged optimizer state: cannot reserve .*No space left"):
        opt.step()
    monkeypatch.undo()
    for p, q in zip(params, _params()):
        assert torch.equal(p, q)
    assert all(not st for st in opt.state.values())
    opt.step()  # space again: it steps
    assert all(opt.state[p] for p in params)


@pytest.mark.heavy
def test_a_file_size_limit_is_a_clear_error():
    """The same through the kernel: RLIMIT_FSIZE makes posix_fallocate fail (EFBIG)."""
    code = """
import resource, signal, torch, adamkit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
p = torch.nn.Parameter(torch.zeros(1_000_000))
opt = adamkit.AdamW([p], paged=True)
p.grad = torch.ones(1_000_000)
try:
    opt.step()
except OSError as err:
    assert "paged optimizer state: cannot reserve" in str(err), err
    assert not opt.state[p] and bool((p == 0).all())
    print("refused")
"""
    done = run_isolated(code)
    assert done.returncode == 0 and "refused" in done.stdout, done.stderr


def test_a_forked_child_never_writes_into_the_parents_state():
    params = _params(shapes=((BIG + 5,),))
    opt = _run(adamkit.AdamW, params, paged=True, state_bits=8)
    p = params[0]
    before = {k: v.clone() for k, v in _moments(opt, p).items()}
    param_before = p.detach().clone()
    parent_fd = opt._paged_arena.fd
    size_before = os.fstat(parent_fd).st_size

    def child() -> bytes:  # steps (writes its copy) and allocates new paged state
        p.grad = torch.randn(p.shape)  # (numpy, not large torch operations: OpenMP hangs after fork)
        opt.step()
        fresh = opt._paged_arena.zeros(BIG, torch.float32)  # a file of the child's own
        fresh.numpy()[:] = 1.0
        assert opt._paged_arena.fd != parent_fd
        changed = bool((opt.state[p]["exp_avg_codes"].numpy() != before["exp_avg_codes"].numpy()).any())
        return b"ok" if changed else b"unchanged"

    assert _in_child(child) == b"ok"
    for key, value in _moments(opt, p).items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(p.detach(), param_before)
    assert opt._paged_arena.fd == parent_fd and os.fstat(parent_fd).st_size == size_before
    p.grad = torch.randn(p.shape)
    opt.step()  # the parent's state is still its own, mapped and writable


def _in_child(fn) -> bytes:
    """Run ``fn`` in a forked child and return the bytes it returned (b"" if it failed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, fn())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    out = os.read(read, 100)
    os.close(read)
    return out


def test_deepcopy_pickle_and_state_dict():
    """As ordinary state: a deep copy and an unpickled copy are paged in arenas of their
    own, with equal values, and independent; ``state_dict`` round trips into unpaged and
    paged optimizers, and the runs continue bit for bit."""
    params = _params()
    opt = _run(adamkit.AdamW, params, paged=True, state_bits=8)
    clone = copy.deepcopy(opt)
    unpickled = pickle.loads(pickle.dumps(opt))
    for other in (clone, unpickled):
        assert other._paged_arena is not opt._paged_arena
        for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
            for key, value in _moments(opt, p).items():
                mine = other.state[q][key]
                assert torch.equal(mine, value) and mine.data_ptr() != value.data_ptr()
                assert _paged.is_paged(mine) == _paged.is_paged(value)
    big = params[0]
    clone.state[clone.param_groups[0]["params"][0]]["exp_avg_codes"].fill_(7)
    assert not bool((opt.state[big]["exp_avg_codes"] == 7).all())

    saved = round_trip(opt.state_dict())
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = adamkit.AdamW(plain_params, lr=0.01, state_bits=8)
    plain.load_state_dict(saved)
    paged_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    paged = adamkit.AdamW(paged_params, lr=0.01, state_bits=8, paged=True)
    paged.load_state_dict(plain.state_dict())
    assert _paged.is_paged(paged.state[paged_params[0]]["exp_avg_codes"])
    assert not _paged.is_paged(plain.state[plain_params[0]]["exp_avg_codes"])
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for group in (params, plain_params, paged_params):
            for p, g in zip(group, grads):
                p.grad = g.clone()
        for o in (opt, plain, paged):
            o.step()
    for a, b, c in zip(params, plain_params, paged_params):
        assert torch.equal(a, b) and torch.equal(a, c)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    for key, value in loaded["state"][0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, opt.state[params[0]][key])


def test_arguments_are_checked(tmp_path):
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(TypeError, match="paged must be a bool"):
        adamkit.AdamW([p], paged="yes")
    with pytest.raises(ValueError, match="not a directory"):
        adamkit.AdamW([p], paged=True, paged_dir=tmp_path / "missing")
    opt = adamkit.PagedAdamW8bit([p], paged_dir=tmp_path)
    assert opt.param_groups[0]["paged"] and opt.paged_dir == str(tmp_path)


@pytest.mark.parametrize(
    "cls",
    [
        adamkit.PagedAdam,
        adamkit.PagedAdamW,
        adamkit.PagedAdam8bit,
        adamkit.PagedAdamW8bit,
        adamkit.PagedAdam32bit,
        adamkit.PagedAdamW32bit,
    ],
)
def test_bitsandbytes_paged_classes_construct_step_and_checkpoint(cls, tmp_path):
    params = _params(shapes=((BIG,), (10, 10)))
    opt = cls(params, lr=0.01, paged_dir=tmp_path)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    key = "exp_avg_codes" if "8bit" in cls.__name__ else "exp_avg"
    assert _paged.is_paged(opt.state[params[0]][key])
    twin = cls([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
    twin.load_state_dict(round_trip(opt.state_dict()))
    assert os.listdir(tmp_path) == []


@pytest.mark.heavy
def test_state_larger_than_the_memory_budget_trains():
    """Under RLIMIT_DATA (anonymous memory) too small for the state, paged state trains
    and ordinary state cannot be allocated (so the budget is real)."""
    code = """
import resource, sys, torch, adamkit
n = 24_000_000  # parameter and gradient: 192 MB; fp32 state: 192 MB more
p = torch.nn.Parameter(torch.zeros(n))
p.grad = torch.full((n,), 1e-3)
data = int([l for l in open("/proc/self/status") if l.startswith("VmData")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (data + (64 << 20), resource.RLIM_INFINITY))
paged = sys.argv[-1] == "paged"
opt = adamkit.AdamW([p], lr=0.01, paged=paged)
try:
    for _ in range(3):
        opt.step()
except (RuntimeError, MemoryError) as err:
    print("out of memory:", type(err).__name__)
    raise SystemExit(0)
assert abs(float(p[0]) + 0.03) < 1e-3, float(p[0])
print("trained")
"""
    paged = run_isolated(code.replace('sys.argv[-1] == "paged"', "True"))
    assert paged.returncode == 0 and "trained" in paged.stdout, paged.stderr[-2000:]
    plain = run_isolated(code.replace('sys.argv[-1] == "paged"', "False"))
    assert "out of memory" in plain.stdout, (plain.stdout, plain.stderr[-2000:])


@pytest.mark.heavy
def test_a_checkpoint_larger_than_the_memory_budget_loads(tmp_path):
    """A checkpoint opened with ``torch.load(mmap=True)`` loads into a paged optimizer
    under an RLIMIT_DATA budget too small for another copy of its state: the moments go
    from the checkpoint's file straight into the arena, never through anonymous memory
    (unpaged: out of memory)."""
    n = 24_000_000
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.full((n,), 1e-3)
    opt = adamkit.AdamW([p], lr=0.01)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "ck.pt")
    del opt, p
    code = f"""
import resource, sys, torch, adamkit
n = {n}
p = torch.nn.Parameter(torch.full((n,), -0.01))
p.grad = torch.full((n,), 1e-3)
# mapped before the limit is set (a private file mapping counts as data)
saved = torch.load({str(tmp_path / "ck.pt")!r}, mmap=True, weights_only=True)
data = int([l for l in open("/proc/self/status") if l.startswith("VmData")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (data + (64 << 20), resource.RLIM_INFINITY))
opt = adamkit.AdamW([p], lr=0.01, paged=sys.argv[-1] == "paged")
try:
    opt.load_state_dict(saved)
    opt.step()
except (RuntimeError, MemoryError) as err:
    print("out of memory:", type(err).__name__)
    raise SystemExit(0)
assert float(opt.state[p]["step"]) == 2 and abs(float(p[0]) + 0.02) < 1e-3, float(p[0])
print("loaded and stepped")
"""
    paged = run_isolated(code.replace('sys.argv[-1] == "paged"', "True"))
    assert paged.returncode == 0 and "loaded and stepped" in paged.stdout, paged.stderr[-2000:]
    plain = run_isolated(code.replace('sys.argv[-1] == "paged"', "False"))
    assert "out of memory" in plain.stdout, (plain.stdout, plain.stderr[-2000:])


def test_a_converted_checkpoint_pages_only_its_final_state(monkeypatch):
    """A 32-bit checkpoint into a paged 8-bit optimizer: the moments are quantized from
    the checkpoint, and only the codes go into the arena (not the fp32 moments first)."""
    p = torch.nn.Parameter(torch.randn(BIG * 2))
    p.grad = torch.randn(BIG * 2)
    dense = adamkit.AdamW([p], lr=0.01)
    dense.step()
    sizes = []
    real = _paged.Arena.zeros
    monkeypatch.setattr(_paged.Arena, "zeros", lambda self, n, dt: sizes.append(n * dt.itemsize) or real(self, n, dt))
    q = torch.nn.Parameter(p.detach().clone())
    paged = adamkit.AdamW([q], lr=0.01, state_bits=8, paged=True)
    paged.load_state_dict(dense.state_dict())
    assert sizes and max(sizes) <= BIG * 2  # uint8 codes, never fp32 moments
    plain = adamkit.AdamW([r := torch.nn.Parameter(p.detach().clone())], lr=0.01, state_bits=8)
    plain.load_state_dict(dense.state_dict())
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        assert _paged.is_paged(paged.state[q][key]) and torch.equal(paged.state[q][key], plain.state[r][key])


@pytest.mark.heavy
def test_bench_paged_quick(tmp_path):
    """``adamkit bench --paged --quick``: the table's numbers, and the budget run: paged
    state trains where in-RAM state runs out of memory."""
    import json
    from types import SimpleNamespace

    from adamkit import bench_paged

    out = tmp_path / "paged.json"
    args = SimpleNamespace(workloads=None, quick=True, reps=2, json=str(out))
    assert bench_paged.run(args) == 0
    data = json.loads(out.read_text())
    assert [(r["workload"], r["bits"]) for r in data["speed"]] == [("flat-1M", 32), ("flat-1M", 8)]
    assert all(r["paged_ms"] > 0 and r["in_ram_ms"] > 0 for r in data["speed"])
    assert data["budget"]["paged"].startswith("trains") and data["budget"]["in-RAM"].startswith("out of memory")


@pytest.mark.heavy
def test_exit_handlers_may_still_read_paged_state():
    """Mappings are not released at interpreter exit: an exit handler registered before
    the optimizer existed reads its state (an emergency checkpoint) without a crash."""
    code = """
import atexit, torch, adamkit
state = {}
atexit.register(lambda: print("sum", float(state["opt"].state[state["p"]]["exp_avg"].sum())))
p = torch.nn.Parameter(torch.zeros(200_000))
opt = adamkit.AdamW([p], paged=True)
p.grad = torch.ones(200_000)
opt.step()
state.update(opt=opt, p=p)
"""
    done = run_isolated(code)
    assert done.returncode == 0 and "sum 20000" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_nested_forks_keep_each_generations_writes():
    """A grandchild sees its parent's (the child's) own writes, not the file's."""
    arena = _paged.Arena()
    t = arena.zeros(BIG, torch.float32)
    t.numpy()[:] = 1.0

    def child() -> bytes:
        t.numpy()[0] = 5.0
        return _in_child(lambda: str(float(t.numpy()[0])).encode())  # the grandchild's view

    assert _in_child(child) == b"5.0"
    assert float(t.numpy()[0]) == 1.0


def test_freed_regions_are_reused():
    """Loading state again and again reuses the file's freed regions: its size stays
    bounded (it matters under a file-size limit)."""
    params = _params(shapes=((BIG + 7,),))
    opt = _run(adamkit.AdamW, params, steps=1, paged=True)
    saved = round_trip(opt.state_dict())
    sizes = []
    for _ in range(6):
        opt.load_state_dict(saved)
        gc.collect()
        sizes.append(os.fstat(opt._paged_arena.fd).st_size)
    assert sizes[-1] == sizes[1], sizes


# ---------------------------------------------------------------- CUDA managed memory
class _FakeRuntime:
    """cuda-bindings' runtime as seen by adamkit._managed: calls recorded, errors on demand."""

    cudaMemAttachGlobal = 1

    class cudaMemLocation:  # noqa: N801 - the bindings' name
        type = None
        id = None

    class cudaMemLocationType:  # noqa: N801
        cudaMemLocationTypeDevice = "device"

    class cudaDeviceAttr:  # noqa: N801
        cudaDevAttrManagedMemory = "managed"
        cudaDevAttrConcurrentManagedAccess = "concurrent"

    def __init__(self, v13=True, fail=None, attributes=None):
        self.calls, self.v13, self.fail, self.next = [], v13, fail, 4096
        self.attributes = {"managed": 1, "concurrent": 1, **(attributes or {})}

    def cudaDeviceGetAttribute(self, attr, device):  # noqa: N802
        self.calls.append(("attribute", attr, device))
        return (_Err(0), self.attributes[attr])

    def cudaMallocManaged(self, size, flags):  # noqa: N802
        self.calls.append(("malloc", size, flags))
        if self.fail == "malloc":
            return (_Err(2, "cudaErrorMemoryAllocation"), None)
        self.next += 4096
        return (_Err(0), self.next)

    def cudaFree(self, ptr):  # noqa: N802
        self.calls.append(("free", ptr))
        return (_Err(0),)

    def cudaMemPrefetchAsync(self, *args):  # noqa: N802
        if self.v13 != (len(args) == 5):
            raise TypeError("wrong number of arguments")
        self.calls.append(("prefetch", *args))
        return (_Err(0),)


class _Err(int):
    def __new__(cls, value, name="cudaSuccess"):
        out = super().__new__(cls, value)
        out.name = name
        return out


def test_managed_buffers_prefetch_free_and_say_what_failed():
    from adamkit import _managed

    for v13 in (True, False):  # CUDA 13's prefetch signature, and CUDA 12's
        rt = _FakeRuntime(v13=v13)
        buf = _managed._Buffer(rt, 1000, 0)
        assert rt.calls == [("malloc", 1000, 1)]
        iface = buf.__cuda_array_interface__
        assert iface["data"] == (buf.ptr, False) and iface["shape"] == (1000,) and iface["typestr"] == "|u1"
        _managed._prefetch(rt, buf.ptr, 1000, 0, 7)
        kind, ptr, size, where, *rest = rt.calls[-1]
        assert (kind, ptr, size) == ("prefetch", buf.ptr, 1000)
        if v13:
            assert (where.type, where.id, rest) == ("device", 0, [0, 7])
        else:
            assert (where, rest) == (0, [7])
        ptr = buf.ptr
        del buf
        gc.collect()
        assert rt.calls[-1] == ("free", ptr)
    with pytest.raises(RuntimeError, match="cudaMallocManaged.*cudaErrorMemoryAllocation"):
        _managed._Buffer(_FakeRuntime(fail="malloc"), 10, 0)


def test_managed_memory_needs_a_capable_gpu_and_prefetches_only_where_it_can(monkeypatch):
    from adamkit import _managed

    monkeypatch.setattr(_managed, "runtime", lambda: _FakeRuntime(attributes={"managed": 0}))
    with pytest.raises(RuntimeError, match="cannot allocate CUDA managed memory"):
        _managed.check_device(0)
    rt = _FakeRuntime(attributes={"concurrent": 0})  # Windows, WSL2: the driver moves pages on access
    monkeypatch.setattr(_managed, "runtime", lambda: rt)
    arena = _managed.ManagedArena()
    buf = _managed._Buffer(rt, 4096, 0)
    arena._buffers.add(buf)
    assert arena.prefetch() == 0 and arena.nbytes == 4096
    assert not any(c[0] == "prefetch" for c in rt.calls)


def test_paged_cuda_state_without_cuda_bindings_says_what_to_install(monkeypatch):
    import sys

    from adamkit import _managed

    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(RuntimeError, match=r"cuda-bindings.*adamkit\[cuda\]"):
        _managed.runtime()


def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    try:
        from adamkit import _managed

        _managed.runtime()
        return True
    except RuntimeError:
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and cuda-bindings")
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_cuda_paged_equals_unpaged_bit_for_bit(bits):
    """On a GPU: large moments in managed memory, prefetched each step; the same numbers
    and the same checkpoint content as ordinary device state."""
    from adamkit import _managed

    a = [p.cuda() for p in _params()]
    b = [p.cuda() for p in _params()]
    a = [torch.nn.Parameter(p.detach()) for p in a]
    b = [torch.nn.Parameter(p.detach()) for p in b]
    opt_a = _run(adamkit.AdamW, a, paged=True, state_bits=bits)
    opt_b = _run(adamkit.AdamW, b, state_bits=bits)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        mine, theirs = _moments(opt_a, pa), _moments(opt_b, pb)
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
            assert _managed.is_managed(mine[key]) == (mine[key].numel() >= BIG and not key.endswith("_absmax")), key
    assert opt_a._managed_arena.nbytes > 0 and opt_a._managed_arena.prefetch() > 0
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for k in sb["state"]:
        for key, v in sb["state"][k].items():
            assert torch.equal(torch.as_tensor(sa["state"][k][key]), torch.as_tensor(v))
    clone = copy.deepcopy(opt_a)  # a copy pages its own state
    p0 = clone.param_groups[0]["params"][0]
    assert _managed.is_managed(clone.state[p0]["exp_avg" if bits in (32, 16) else "exp_avg_codes"])
