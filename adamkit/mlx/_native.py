"""The quantized step as an MLX primitive in C++, built on first use.

MLX has no way to write a fused CPU kernel from Python (its custom kernels are Metal
and CUDA only), and its compiled graphs do not fuse gathers or reductions: in MLX
operations the 8-bit step runs the codec's stages as separate passes over memory
(see :mod:`adamkit.mlx._codec`). ``_native_step.cpp`` is the whole step of one
parameter with quantized state as one MLX primitive (MLX's documented extension
mechanism: a ``Primitive`` subclass bound with nanobind in MLX's nanobind domain),
one pass per block; it is an ordinary node of MLX's graph, so it runs lazily, on
MLX's CPU streams, and inside a user's ``mx.compile``.

It is compiled once per (source, MLX, nanobind, Python, CPU) into adamkit's cache
directory in a background thread (:mod:`adamkit._native_build`), started by the first
quantized step; until it is loaded (and without a compiler, without ``nanobind``, or
with ``ADAMKIT_MLX_NATIVE=0``) steps take the path in MLX operations. The two paths
give the same codes up to ties (tested).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx

from .._native_build import NativeModule, compiler
from ..quant import Codebook, QuantFormat
from . import _codec
from ._rules import HUGE

#: The largest block size the compiled step takes (its scratch rows live on the stack).
MAX_BLOCK = 4096
_FLOATS = (mx.float32, mx.bfloat16, mx.float16)
_DITHER_TABLES = ("values", "rate", "offset", "first", "threshold", "slopes", "cell")  # the C++ order

SOURCE = Path(__file__).with_name("_native_step.cpp")


def _paths() -> tuple[Path, Path]:
    """MLX's package directory (where ``mlx.core`` lives: ``mlx`` is a namespace package,
    and other directories named ``mlx`` may come first on its path) and nanobind's."""
    import nanobind

    return Path(mx.__file__).parent, Path(nanobind.__path__[0])


def _key() -> str:
    import nanobind

    root, nb = _paths()
    return f"mlx {mx.__version__} {root} nanobind {nanobind.__version__} {nb}"


def _command(source: Path, out: Path) -> list[str]:
    root, nb = _paths()
    lib = root / "lib"
    # the rule's float32 arithmetic as written (no fused multiply-adds); the binary is
    # keyed to this CPU (adamkit._native_build.cpu_key); MLX's nanobind domain: its types
    cmd = [str(compiler()), "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++20"]
    cmd += ["-shared", "-fPIC", "-fvisibility=hidden", "-w", "-DNB_DOMAIN=mlx", "-DNDEBUG"]
    cmd += [f"-I{nb / 'include'}", f"-I{nb / 'ext' / 'robin_map' / 'include'}"]
    cmd += [f"-I{sysconfig.get_paths()['include']}", f"-I{root / 'include'}"]
    cmd += [str(source), str(nb / "src" / "nb_combined.cpp"), "-o", str(out)]
    cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lmlx"]
    return cmd + (["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else [])  # Python's symbols


def _check(module: ModuleType) -> None:
    """A module that loads but cannot take MLX's arrays (a nanobind whose ABI differs
    from MLX's) is refused here, not at the first step."""
    probe = mx.array([1.0])
    try:  # algorithm 9 does not exist: the C++ checks refuse it with ValueError
        flags = dict(amsgrad=False, maximize=False, mask=False, block=2, threads=1, huge=1.0)
        lists = dict(bits=[], dither=[], root=[], clamp_zero=[], lowest=[], layout=[])
        module.quantized_step(probe, probe, probe, probe, probe, [], [], algorithm=9, **flags, **lists)
    except ValueError:  # the arguments reached the C++ checks: the arrays were accepted
        return
    except TypeError as err:
        raise RuntimeError(f"the built module does not accept MLX's arrays (nanobind ABI?): {err}") from err


_build = NativeModule("adamkit_mlx_native", SOURCE, _key, _command, "ADAMKIT_MLX_NATIVE", _check)


def module(start: bool = True, wait: bool = False) -> ModuleType | None:
    """The compiled step if loaded, else None (see :meth:`adamkit._native_build.NativeModule.module`)."""
    if os.environ.get("ADAMKIT_MLX_NATIVE", "1") != "0":
        try:
            import nanobind  # noqa: F401
        except ImportError:
            _build.status = "unavailable: nanobind is not installed (pip install 'adamkit[mlx]')"
            return None
    return _build.module(start, wait)


def cached() -> bool:
    """Whether the module is built already (it then loads at once)."""
    try:
        return _build.target().exists()
    except ImportError:  # no nanobind
        return False


def __getattr__(name: str) -> Any:
    if name == "status":
        return _build.status
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ALGORITHMS = {"adam": 0, "adamax": 1, "nadam": 2}
_OK = 14  # adamkit.mlx._rules.CONSTS.index("ok")
_MU = 12  # CONSTS.index("mu")


def supports(algorithm: str, fmt: QuantFormat, p: mx.array, g: mx.array) -> bool:
    """Whether the compiled step takes this parameter (the rest take the MLX path):
    float32/bfloat16/float16 parameters and gradients, whole blocks of an even size,
    dithered 4-bit or nearest 8-bit codes, sizes that fit MLX's int32 shapes."""
    block = fmt.block_size
    return (
        algorithm in ALGORITHMS
        and block is not None
        and 2 <= block <= MAX_BLOCK
        and block % 2 == 0
        and fmt.dither == (fmt.bits == 4)
        and p.dtype in _FLOATS
        and g.dtype in _FLOATS
        and 0 < p.size < 2**31 - 1
    )


def tables_for(books: Sequence[Codebook]) -> list[mx.array]:
    """The codebooks' tables in the order the primitive reads them (8-bit: values and the
    encoder table; 4-bit: :data:`_DITHER_TABLES`)."""
    out: list[mx.array] = []
    for book in books:
        t = _codec.tables(book.name)
        out += [t[name] for name in (_DITHER_TABLES if book.dither else ("values", "packed"))]
    return out


def attributes(
    algorithm: str, books: Sequence[Codebook], fmt: QuantFormat, maximize: bool, amsgrad: bool, mask: bool
) -> dict[str, Any]:
    """The primitive's keyword arguments besides the arrays."""
    return dict(
        algorithm=ALGORITHMS[algorithm],
        amsgrad=amsgrad,
        maximize=maximize,
        mask=mask,
        block=fmt.block_size,
        threads=threads(),
        huge=HUGE,
        bits=[b.bits for b in books],
        dither=[int(b.dither) for b in books],
        root=[int(b.root) for b in books],
        clamp_zero=[int(not b.signed and float(b.values[0]) == 0.0) for b in books],
        lowest=[float(b.values[0]) for b in books],
        layout=list(_codec.LAYOUT),
    )


@cache
def step_fn(
    native: ModuleType,
    algorithm: str,
    keys: tuple[str, ...],
    fmt: QuantFormat,
    maximize: bool,
    amsgrad: bool,
    mask: bool,
) -> Callable[..., tuple]:
    """The quantized step of :func:`adamkit.mlx._rules.compiled`'s signature, ``(g, p, c,
    t, *state, streams=()) -> (p, *state, *history, masked)``, as one primitive;
    ``mask``: masks non-finite gradient elements (``nonfinite="mask"``)."""
    books = [fmt.codebook(k) for k in keys]
    tables = tables_for(books)
    kwargs = attributes(algorithm, books, fmt, maximize, amsgrad, mask)
    history = algorithm == "nadam"
    zero = mx.array(0.0, mx.float32)

    def step(g: mx.array, p: mx.array, c: mx.array, t: mx.array, *state: mx.array, streams: Sequence = ()) -> tuple:
        product = None
        if history:  # NAdam's mu_product, multiplied here (and kept by a skipped step)
            old = state[2 * len(keys)]
            product = mx.where(c[_OK] > 0, old * c[_MU], old).astype(old.dtype)
        arg = zero if product is None else product.astype(mx.float32)
        out = native.quantized_step(g, p, c, t, arg, list(state[: 2 * len(keys)]), tables, **kwargs)
        return (*out[:-1], *([] if product is None else [product]), out[-1])

    return step


def threads() -> int:
    """Threads one large tensor's blocks are split over: ``ADAMKIT_MLX_STREAMS`` or the
    core count (at most 8, as the streams)."""
    return max(1, min(int(os.environ.get("ADAMKIT_MLX_STREAMS", os.cpu_count() or 1)), 8))
