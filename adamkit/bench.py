"""``adamkit bench``: optimizer step times of adamkit and its peers, in one process.

Every contender steps the same parameters' shapes with the same gradients,
round-robin (one step of each, repeated), because this machine is shared and noisy:
what matters is the ratio measured side by side. Reported per contender: the median
step time, elements per second, the ratio against ``torch.optim.AdamW(fused=True)``
(the median of the per-round ratios: both ran in the same round) and the share of
the memory roofline — the bandwidth a streaming kernel that reads 4 arrays and
writes 3 (fp32 AdamW's traffic) reaches over the same number of
elements in the same run.

Workloads: ``flat-16M`` (one 16M tensor), ``gpt2`` (GPT-2 small: 124M parameters in
148 tensors), ``small`` (20,000 tensors of 1,000). ``--quick`` runs scaled-down ones
in seconds.

Progress goes to stderr (a bar on a terminal, plain lines otherwise: CI, a pipe, a
file) and, with timestamps, to a log file (``adamkit-bench.log`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import IO, Any

import numpy as np
import torch
from numba import njit

import adamkit
from adamkit.optim import _native

# ------------------------------------------------------------------------ workloads


def gpt2_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2 small's parameter shapes (HF layout): 124,439,808 elements in 148 tensors."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50's parameter shapes (torchvision's layout): 25,557,032 elements in 161
    tensors, 53 of them 4-D convolution weights."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:  # the downsampling shortcut
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(1000, 2048), (1000,)]


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "flat-16M": lambda: [(16 * 1024 * 1024,)],
    "gpt2": gpt2_shapes,
    "small": lambda: [(1000,)] * 20_000,
    # convolution weights in channels_last, as CNNs are trained on GPUs (not a default)
    "resnet50-cl": resnet50_shapes,
    # --quick
    "flat-1M": lambda: [(1024 * 1024,)],
    "gpt2-mini": lambda: gpt2_shapes(layers=2, d=256, vocab=8192, ctx=256),
    "small-2k": lambda: [(1000,)] * 2000,
}
DEFAULT_WORKLOADS = ("flat-16M", "gpt2", "small")
QUICK_WORKLOADS = ("flat-1M", "gpt2-mini", "small-2k")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------- contenders
@dataclass(frozen=True)
class Contender:
    """An optimizer to time: how to build it and what one step moves per element."""

    name: str
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    #: bytes read + written per element (param, grad, moments) for this dtype
    bytes_per_element: Callable[[torch.dtype], int]
    #: optimizer-state bytes per parameter element, nominal (the bench reports what
    #: the optimizer's state actually holds when it can read it)
    state_bytes: Callable[[torch.dtype], float]
    slow: bool = False  # skipped with --quick
    dtypes: tuple[str, ...] = ("fp32", "bf16")  # parameter dtypes it is timed with


def _adam_bytes(state_size: Callable[[torch.dtype], int]) -> Callable[[torch.dtype], int]:
    # read p, g, m, v; write p, m, v
    return lambda dt: 2 * dt.itemsize + dt.itemsize + 2 * 2 * state_size(dt)


def _fp32_state(dt: torch.dtype) -> int:
    return 8 if dt == torch.float64 else 4


def _param_dtype_state(dt: torch.dtype) -> int:
    return dt.itemsize


def _bf16_state(dt: torch.dtype) -> int:
    return 2


def _quant_bytes(bits: int) -> Callable[[torch.dtype], int]:
    # read p, g and two moments' codes; write p and the codes (absmax: 1/64 of that)
    return lambda dt: 3 * dt.itemsize + 2 * 2 * bits // 8


def _quant_state(bits: int) -> Callable[[torch.dtype], float]:
    block = 256 if bits == 8 else 128
    return lambda dt: 2 * (bits / 8 + 4 / block)


def _quant_peers() -> list[Contender]:
    """bitsandbytes' and torchao's 8/4-bit AdamW, where installed (fp32 only: slow)."""
    out = []
    try:
        import bitsandbytes as bnb

        out.append(
            Contender(
                "bitsandbytes AdamW8bit",
                lambda ps: bnb.optim.AdamW8bit(ps),
                _quant_bytes(8),
                _quant_state(8),
                slow=True,
                dtypes=("fp32",),
            )
        )
    except Exception:  # noqa: BLE001 - any import failure means "not installed"
        pass
    try:
        from torchao.optim import AdamW4bit, AdamW8bit

        for bits, cls in ((8, AdamW8bit), (4, AdamW4bit)):
            out.append(
                Contender(
                    f"torchao AdamW{bits}bit",
                    cls,
                    _quant_bytes(bits),
                    _quant_state(bits),
                    slow=True,
                    dtypes=("fp32",),
                )
            )
    except Exception:  # noqa: BLE001
        pass
    return out


def contenders() -> list[Contender]:
    """adamkit's configurations, torch's three implementations, and installed peers."""
    out = [
        Contender(
            "adamkit",
            lambda ps: adamkit.AdamW(ps),
            _adam_bytes(_fp32_state),
            lambda dt: 2.0 * _fp32_state(dt),
        ),
        Contender(
            "adamkit state_bits=16",
            lambda ps: adamkit.AdamW(ps, state_bits=16),
            _adam_bytes(_bf16_state),
            lambda dt: 4.0,
        ),
        Contender(
            "adamkit 8-bit",
            lambda ps: adamkit.AdamW(ps, state_bits=8),
            _quant_bytes(8),
            _quant_state(8),
        ),
        Contender(
            "adamkit 8-bit tapered",
            lambda ps: adamkit.AdamW(ps, state_bits=8, quant_map="tapered"),
            _quant_bytes(8),
            _quant_state(8),
        ),
        Contender(
            "adamkit 4-bit",
            lambda ps: adamkit.AdamW(ps, state_bits=4),
            _quant_bytes(4),
            _quant_state(4),
        ),
        Contender(
            "torch fused",
            lambda ps: torch.optim.AdamW(ps, fused=True),
            _adam_bytes(_param_dtype_state),
            lambda dt: 2.0 * dt.itemsize,
        ),
        Contender(
            "torch foreach",
            lambda ps: torch.optim.AdamW(ps, foreach=True),
            _adam_bytes(_param_dtype_state),
            lambda dt: 2.0 * dt.itemsize,
        ),
        Contender(
            "torch for-loop",
            lambda ps: torch.optim.AdamW(ps, foreach=False),
            _adam_bytes(_param_dtype_state),
            lambda dt: 2.0 * dt.itemsize,
            slow=True,
        ),
    ]
    try:  # optional peer: pip install 'adamkit[bench]'
        import bitsandbytes as bnb  # noqa: F401

        out.append(
            Contender(
                "bitsandbytes AdamW32bit",
                lambda ps: bnb.optim.AdamW32bit(ps, weight_decay=1e-2),
                _adam_bytes(_fp32_state),
                lambda dt: 8.0,
                slow=True,
            )
        )
    except Exception:  # noqa: BLE001 - any import failure means "not installed"
        pass
    return out + _quant_peers()


REFERENCE = "torch fused"
#: Pause before each timed step. torch's OpenMP threads keep spinning for ~2 ms after
#: a parallel region; a step started inside that window shares its cores with them
#: (measured: adamkit on flat-16M 2.5 ms slower right after a torch step), so
#: without the pause the round-robin order decided who paid for whom.
PAUSE_S = 0.005


# ------------------------------------------------------------------------ roofline
@njit(nogil=True, cache=True, error_model="numpy")
def _stream(p, g, m, v, lo, hi):  # pragma: no cover - jitted
    """Read 4 arrays, write 3, as fp32 AdamW does, with the least arithmetic."""
    p, g, m, v = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]  # loops over views from 0 vectorize
    for i in range(p.shape[0]):
        gi = g[i]
        p[i] = p[i] + gi
        m[i] = m[i] + gi
        v[i] = v[i] + gi
    return 0


def roofline(n: int) -> tuple[float, Callable[[], None]]:
    """(bytes per element, a step that streams them over ``n`` fp32 elements on all threads)."""
    from concurrent.futures import ThreadPoolExecutor

    # numpy puts arrays this large on huge pages (the machine's best case); the values
    # are not zero: streams of zeros ran 20% faster here (7.5 vs 9.3 ms on 16M)
    arrays = [np.full(n, 1.0 if i != 1 else 1e-3, np.float32) for i in range(4)]
    threads = max(1, torch.get_num_threads())
    cuts = np.linspace(0, n, threads + 1).astype(np.int64).tolist()
    pool = ThreadPoolExecutor(max(1, threads - 1))

    def step() -> None:
        futures = [pool.submit(_stream, *arrays, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
        _stream(*arrays, cuts[0], cuts[1])
        for f in futures:
            f.result()

    return 28.0, step


# ----------------------------------------------------------------------- measuring
@dataclass
class Result:
    workload: str
    dtype: str
    optimizer: str
    elements: int
    tensors: int
    median_ms: float
    elements_per_s: float
    vs_torch_fused: float | None
    roofline_share: float
    state_bytes_per_param: float
    samples_ms: list[float] = field(default_factory=list)


def cuda_roofline(n: int, device: torch.device) -> tuple[float, Callable[[], None]]:
    """On a GPU: a device-to-device copy of 3.5·n float32 (28 bytes moved per element, as
    fp32 AdamW's), the bandwidth figure the GPU goals are stated against."""
    src = torch.ones(7 * n // 2, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 28.0, lambda: dst.copy_(src)


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t``, or its channels_last copy if asked for and 4-D."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _params(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    grads: list[torch.Tensor],
    device: str = "cpu",
    channels_last: bool = False,
) -> list[torch.Tensor]:
    ps = [_layout(torch.zeros(s, dtype=dtype, device=device), channels_last).requires_grad_() for s in shapes]
    for p, g in zip(ps, grads):
        p.grad = g  # shared: optimizers only read gradients
    return ps


def run_workload(
    workload: str,
    dtype_name: str,
    reps: int,
    chosen: list[Contender],
    progress: Callable[[], None],
    new_grads: bool = False,
    device: str = "cpu",
    before_step: Callable[[str, int], None] | None = None,
) -> tuple[list[Result], float]:
    """Time every contender on one workload, round-robin, plus the roofline stream.

    ``new_grads``: every round gives every parameter a new gradient tensor (as
    ``zero_grad()`` then ``backward()`` do), untimed, then streams the roofline arrays
    once so that no contender finds the tensors' metadata in cache; by default the
    gradients are the same tensors every step.

    ``device="cuda"``: parameters and gradients on the GPU, each step timed between
    synchronizations, the roofline a device-to-device copy (:func:`cuda_roofline`).

    ``progress()`` is called after each step, ``before_step(name, round)`` before it
    (round 0 is the warm-up), both outside the timed part.

    Returns the results and the roofline bandwidth (bytes/s) measured beside them.
    """
    shapes = WORKLOADS[workload]()
    dtype = DTYPES[dtype_name]
    n = sum(int(np.prod(s)) for s in shapes)
    gen = torch.Generator().manual_seed(0)
    channels_last = workload.endswith("-cl")
    grads = [_layout((torch.randn(s, generator=gen) * 1e-3).to(device, dtype), channels_last) for s in shapes]
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grad_sets = [grads, [g.clone() for g in grads]] if new_grads else [grads]
    steps: dict[str, Callable[[], Any]] = {}
    params: list[list[torch.Tensor]] = []
    optimizers: dict[str, torch.optim.Optimizer] = {}
    chosen = [c for c in chosen if dtype_name in c.dtypes]
    for c in chosen:
        try:
            ps = _params(shapes, dtype, grads, device, channels_last)
            optimizers[c.name] = c.make(ps)
            steps[c.name] = optimizers[c.name].step
            params.append(ps)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot take this case is reported, not fatal
            print(f"  {c.name}: skipped on {workload}/{dtype_name} ({type(exc).__name__}: {exc})", file=sys.stderr)
    if len(shapes) >= _native.MIN_PARAMS:  # time the checks users get once they are built
        _native.module(wait=True)
    stream_bytes, stream = cuda_roofline(n, torch.device(device)) if cuda else roofline(n)
    steps["roofline"] = stream
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(reps + 1):  # one warm-up round: compilation, first touch of the state
        if new_grads:
            for ps in params:
                for p, g in zip(ps, grad_sets[rep % 2]):
                    p.grad = g
            stream()
        for name, step in steps.items():
            if before_step is not None:
                before_step(name, rep)
            time.sleep(PAUSE_S)
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            progress()
    med = {k: statistics.median(v) for k, v in times.items()}
    bandwidth = stream_bytes * n / med.pop("roofline")
    out = []
    for c in chosen:
        if c.name not in med:
            continue
        t = med[c.name]
        out.append(
            Result(
                workload=workload,
                dtype=dtype_name,
                optimizer=c.name,
                elements=n,
                tensors=len(shapes),
                median_ms=t * 1e3,
                elements_per_s=n / t,
                vs_torch_fused=_paired_ratio(times[REFERENCE], times[c.name]) if REFERENCE in med else None,
                roofline_share=c.bytes_per_element(dtype) * n / t / bandwidth,
                state_bytes_per_param=state_bytes(optimizers[c.name], n) or c.state_bytes(dtype),
                samples_ms=[x * 1e3 for x in times[c.name]],
            )
        )
    return out, bandwidth


def state_bytes(opt: torch.optim.Optimizer, n: int) -> float | None:
    """Optimizer-state bytes per parameter element, read from ``opt.state`` (codes,
    absmax and maps included; ``step`` counters not), or None if it cannot be read."""
    total = 0
    try:
        for st in opt.state.values():
            for key, value in st.items():
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                inner = getattr(value, "__tensor_flatten__", None)  # torchao's quantized subclasses
                parts = [getattr(value, a) for a in inner()[0]] if inner else [value]
                total += sum(t.nbytes for t in parts)
    except Exception:  # noqa: BLE001 - a peer's state we cannot read: fall back to nominal
        return None
    return total / n if total else None


def write_json(path: str, payload: dict[str, Any], default: Callable[[Any], Any] | None = None) -> None:
    """Write a bench's results as JSON to ``path`` (``-``: stdout)."""
    text = json.dumps(payload, indent=2, default=default)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def _paired_ratio(reference: list[float], ours: list[float]) -> float:
    """Median over rounds of (reference time / our time) in the same round.

    Both ran back to back in each round, so a slow spell of this shared machine
    slows both and cancels out of the round's ratio; a ratio of medians taken from
    different rounds does not cancel it.
    """
    return statistics.median(r / o for r, o in zip(reference, ours))


# ------------------------------------------------------------------------ accuracy
def accuracy_contenders() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """Low-bit AdamWs whose total update is compared with fp32 AdamW's."""
    out: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "adamkit 8-bit": lambda ps: adamkit.AdamW(ps, state_bits=8),
        "adamkit 8-bit tapered": lambda ps: adamkit.AdamW(ps, state_bits=8, quant_map="tapered"),
        "adamkit 4-bit": lambda ps: adamkit.AdamW(ps, state_bits=4),
    }
    for c in _quant_peers():
        out[c.name] = c.make
    return out


def accuracy(rows: int = 2048, cols: int = 512, steps: int = 100) -> dict[str, float]:
    """Relative L2 error of the total parameter update after ``steps`` AdamW steps
    (defaults, lr 1e-3) against fp32 AdamW, per low-bit optimizer.

    The parameter's rows have gradient scales spread log-evenly from 1e-4 to 1e-1 and
    each gradient is ``scale · (signal + noise)``: a persistent signal plus fresh
    standard-normal noise every step, the same for every contender.
    """
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-4, -1, rows)[:, None]
    signal = torch.randn(rows, cols, generator=gen)
    start = torch.randn(rows, cols, generator=gen) * 0.02
    makers = {"fp32": lambda ps: torch.optim.AdamW(ps), **accuracy_contenders()}
    params = {name: torch.nn.Parameter(start.clone()) for name in makers}
    opts = {}
    for name, make in makers.items():
        try:
            opts[name] = make([params[name]])
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"  accuracy: {name} skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        g = scales * (signal + torch.randn(rows, cols, generator=noise))
        for name, opt in opts.items():
            params[name].grad = g.clone()
            opt.step()
    exact = params["fp32"].detach() - start
    return {
        name: float((params[name].detach() - start - exact).norm() / exact.norm()) for name in opts if name != "fp32"
    }


_COMPILE_PROBE = """
import time, torch, adamkit
p = torch.zeros({n}, dtype=torch.{dtype}).requires_grad_()
p.grad = torch.ones_like(p)
opt = adamkit.AdamW([p])
t0 = time.perf_counter(); opt.step(); print(time.perf_counter() - t0)
"""


def compile_times(dtype: str = "float32") -> dict[str, float]:
    """First-step time in a fresh process: with an empty numba cache, then from it."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = {}
        for label in ("cold", "cached"):
            code = _COMPILE_PROBE.format(n=1000, dtype=dtype)
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[label] = float(done.stdout.strip().splitlines()[-1])
        return out


# -------------------------------------------------------------------------- output
def _table(results: list[Result], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    grads = "new gradient tensors every step" if meta.get("new_grads") else "gradients kept"
    where = meta["device"] if meta.get("device", "cpu") != "cpu" else f"{meta['threads']} threads"
    table = Table(title=f"optimizer step, AdamW, median of {meta['reps']} ({where}; {grads})")
    for col in ("workload", "dtype", "optimizer", "state B/param", "ms/step", "G el/s", "vs fused", "roofline"):
        table.add_column(col, justify="left" if col in ("workload", "dtype", "optimizer") else "right")
    for r in results:
        ratio = "" if r.vs_torch_fused is None else f"{r.vs_torch_fused:.2f}x"
        table.add_row(
            r.workload,
            r.dtype,
            r.optimizer,
            f"{r.state_bytes_per_param:g}",
            f"{r.median_ms:.2f}",
            f"{r.elements_per_s / 1e9:.2f}",
            ratio,
            f"{r.roofline_share:.0%}",
        )
    console = Console(width=max(132, Console().width))
    console.print(table)
    if meta.get("compile_s"):
        c = meta["compile_s"]
        console.print(
            f"first step in a fresh process: {c['cold']:.2f} s cold (empty numba cache), {c['cached']:.2f} s cached"
        )
    if meta.get("accuracy"):
        acc = meta["accuracy"]
        errors = ", ".join(f"{k} {v:.3f}" for k, v in acc["relative_update_error"].items())
        console.print(
            f"update error vs fp32 AdamW after {acc['steps']} steps on {acc['rows']}x{acc['cols']} "
            f"(relative L2, lower is better): {errors}"
        )
    bw = ", ".join(f"{k} {v:.1f} GB/s" for k, v in meta["roofline_GBps"].items())
    console.print(f"roofline (stream 4 reads + 3 writes, fp32): {bw}")


def _plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r.workload, r.dtype) for r in results}, key=lambda c: (c[1], c[0]))
    names = list(dict.fromkeys(r.optimizer for r in results))
    width = 0.8 / max(1, len(names))
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: tab10's cycle repeats after 10 contenders
    palette = palette[0::2] + palette[1::2]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2) + 2.5, 4.5))
    for k, name in enumerate(names):
        ys = []
        for case in cases:
            match = [r for r in results if (r.workload, r.dtype) == case and r.optimizer == name]
            ys.append(match[0].vs_torch_fused if match and match[0].vs_torch_fused else 0.0)
        ax.bar([i + k * width for i in range(len(cases))], ys, width, label=name, color=palette[k % len(palette)])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cases))], [f"{w}\n{d}" for w, d in cases])
    ax.set_ylabel("speed vs torch.optim.AdamW(fused=True)")
    ax.set_yscale("log")
    ax.set_title("adamkit bench: optimizer step speed (higher is better)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------ progress
class Progress:
    """A run's progress: a bar when ``stream`` (stderr) is a terminal, plain lines
    otherwise (at every warm-up step, where kernels compile, and at most every
    ``interval`` seconds in between), and every line, timestamped, in a log file."""

    def __init__(self, total: int, log: str | None = None, stream: IO[str] | None = None, interval: float = 5.0):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done, self.interval = total, 0, interval
        self.t0 = self.last = time.perf_counter()
        self.file = open(log, "w", encoding="utf-8", buffering=1) if log else None
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from rich.console import Console
            from rich.progress import Progress as Bar

            self.bar = Bar(console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task("starting", total=total)
            self.bar.start()

    def line(self, text: str, always: bool = True) -> None:
        now = time.perf_counter()
        minutes, seconds = divmod(int(now - self.t0), 60)
        stamped = f"[{minutes:3d}m{seconds:02d}s] {text}"
        if self.file is not None:
            self.file.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {stamped}\n")
        if self.bar is not None:
            self.bar.update(self.task, description=text)
        elif always or now - self.last >= self.interval:
            print(stamped, file=self.stream, flush=True)
            self.last = now

    def step(self, case: str, name: str, rep: int, reps: int) -> None:
        """Before a step of contender ``name`` in round ``rep`` (0: the warm-up)."""
        which = "warm-up" if rep == 0 else f"round {rep}/{reps}"
        self.line(f"{case}: {name}, {which} (step {self.done + 1}/{self.total})", always=rep == 0)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamkit bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="scaled-down workloads, 3 reps, no slow peers: seconds")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), help="default: flat-16M gpt2 small")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, help="timed rounds per workload (default 9; --quick 3)")
    parser.add_argument("--optimizers", nargs="+", help="only these contenders (names as printed)")
    parser.add_argument("--no-compile", action="store_true", help="skip the cold/cached first-step measurement")
    parser.add_argument(
        "--no-accuracy", action="store_true", help="skip the low-bit update-error measurement (see accuracy())"
    )
    parser.add_argument(
        "--new-grads",
        action="store_true",
        help="a new gradient tensor per parameter every step (zero_grad's set_to_none), not kept ones",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: on a GPU, the Triton kernels against torch's and peers'"
    )
    parser.add_argument(
        "--mlx",
        action="store_true",
        help="adamkit.mlx against mlx.optimizers.AdamW on MLX's device instead (needs MLX: .[mlx])",
    )
    parser.add_argument(
        "--paged",
        action="store_true",
        help="paged (memory-mapped) state against in-RAM state on the CPU, and training past a memory limit",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="adamkit.CPUOffload's step against torchao's CPUOffloadOptimizer (GPT-2 small's parameters)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="FILE.png", help="plot the ratios against torch fused (matplotlib)")
    parser.add_argument(
        "--log", metavar="PATH", default="adamkit-bench.log", help="progress lines, timestamped (default: %(default)s)"
    )
    parser.add_argument("--no-log", action="store_true", help="write no log file")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "offload", False):
        from . import bench_offload

        return bench_offload.run(args)
    if getattr(args, "paged", False):
        from . import bench_paged

        return bench_paged.run(args)
    if getattr(args, "mlx", False):
        try:
            from .mlx import bench as mlx_bench
        except ImportError as err:
            raise SystemExit(f"adamkit bench --mlx: {err}") from None
        return mlx_bench.run(args)
    if args.plot:  # before the minutes of timing, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("adamkit bench --plot needs matplotlib (pip install matplotlib)") from None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("adamkit bench --device cuda: torch sees no CUDA GPU here")
    workloads = args.workloads or (QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
    reps = args.reps or (3 if args.quick else 9)
    chosen = [c for c in contenders() if not (args.quick and c.slow)]
    if args.optimizers:
        unknown = set(args.optimizers) - {c.name for c in chosen}
        if unknown:
            raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {[c.name for c in chosen]}")
        chosen = [c for c in chosen if c.name in args.optimizers or c.name == REFERENCE]
    meta: dict[str, Any] = {
        "adamkit": adamkit.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "reps": reps,
        "new_grads": args.new_grads,
        "roofline_GBps": {},
    }
    results: list[Result] = []
    cases = [(w, d) for d in args.dtypes for w in workloads]
    total = sum((reps + 1) * (len([c for c in chosen if d in c.dtypes]) + 1) for _, d in cases)
    log = None if getattr(args, "no_log", False) else getattr(args, "log", None)
    progress = Progress(total, log)
    try:
        progress.line(
            f"adamkit bench: {len(cases)} cases x {len(chosen)} contenders + roofline, {reps} rounds after a warm-up"
            + (f"; log: {os.path.abspath(log)}" if log else "")
        )
        for workload, dtype in cases:
            case = f"{workload} {dtype}"
            rows, bandwidth = run_workload(
                workload,
                dtype,
                reps,
                chosen,
                progress.advance,
                new_grads=args.new_grads,
                device=args.device,
                before_step=lambda name, rep, case=case: progress.step(case, name, rep, reps),
            )
            results += rows
            meta["roofline_GBps"][f"{workload}/{dtype}"] = bandwidth / 1e9
        if not args.no_compile:
            progress.line("first step in fresh processes (empty numba cache, then cached)")
            meta["compile_s"] = compile_times()
        if not args.no_accuracy:
            progress.line("low-bit update error against fp32 AdamW")
            shape = dict(rows=256, cols=512, steps=20) if args.quick else dict(rows=2048, cols=512, steps=100)
            meta["accuracy"] = {"relative_update_error": accuracy(**shape), **shape}
        progress.line("done")
    finally:
        progress.close()
    _table(results, meta)
    if args.json:
        write_json(args.json, {"meta": meta, "results": [asdict(r) for r in results]})
    if args.plot:
        _plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
