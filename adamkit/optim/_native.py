"""The plans' per-step checks compiled against torch's C++ API, built on first use.

A cached plan checks every parameter and gradient it reuses at every step (see
:mod:`adamkit.optim._plan`). Through torch's Python getters that costs 0.1-0.45 µs per
property read, ~1.5 µs per parameter: 30 ms a step for 20,000 parameters, more than
their update. ``_native_checks.cpp`` does the same checks through torch's C++ API
(no raw reads of torch's memory: the headers of the installed torch), ~0.1 µs per
parameter.

It is compiled on first use (:mod:`adamkit._native_build`: once per source, torch,
Python and CPU, into adamkit's cache directory, in a background thread started by the
first plan of at least :data:`MIN_PARAMS` parameters): steps never wait for it, they
use the checks in Python until it is loaded. Without a compiler, or with
``ADAMKIT_NATIVE_CHECKS=0``, the Python checks stay; :data:`status` says which and why.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .._native_build import NativeModule, compiler

__all__ = ["MIN_PARAMS", "SOURCE", "compiler", "module"]

#: Plans with fewer parameters do not start the build (their Python checks cost < 1 ms).
MIN_PARAMS = 1024
SOURCE = Path(__file__).with_name("_native_checks.cpp")


def _key() -> str:
    return f"{torch.__version__} {torch.__file__}"


def _command(source: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    cmd = [str(compiler()), "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd += [str(source), "-o", str(out)]
    cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
    return cmd + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


_build = NativeModule("adamkit_native_checks", SOURCE, _key, _command, "ADAMKIT_NATIVE_CHECKS")


def module(start: bool = True, wait: bool = False) -> ModuleType | None:
    """The compiled checks if loaded, else None; ``start``: begin building them in the
    background if not begun (a module already in the cache loads at once); ``wait``:
    until they are loaded or have failed."""
    return _build.module(start, wait)


def __getattr__(name: str) -> Any:
    if name == "status":  # "not built", "building", "loaded: PATH", "off (...)" or "unavailable: REASON"
        return _build.status
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
