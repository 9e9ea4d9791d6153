"""The plans' per-step checks compiled against torch's C++ API, built on first use.

A cached plan checks every parameter and gradient it reuses at every step (see
:mod:`adamkit.optim._plan`). Through torch's Python getters that costs 0.1-0.45 µs per
property read, ~1.5 µs per parameter: 30 ms a step for 20,000 parameters, more than
their update. ``_native_checks.cpp`` does the same checks through torch's C++ API
(no raw reads of torch's memory: the headers of the installed torch), ~0.1 µs per
parameter.

It is compiled once per (source, torch, Python) with the system's C++ compiler into
adamkit's cache directory (``$ADAMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamkit``
or ``~/.cache/adamkit``), in a background thread started by the first plan of at
least :data:`MIN_PARAMS` parameters: steps never wait for it, they use the checks in
Python until it is loaded. Without a compiler, or with ``ADAMKIT_NATIVE_CHECKS=0``,
the Python checks stay; :data:`status` says which and why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import torch

#: Plans with fewer parameters do not start the build (their Python checks cost < 1 ms).
MIN_PARAMS = 1024
SOURCE = Path(__file__).with_name("_native_checks.cpp")
_NAME = "adamkit_native_checks"

#: "not built", "building", "loaded: PATH", "off (ADAMKIT_NATIVE_CHECKS=0)" or
#: "unavailable: REASON"
status = "not built"
_module: ModuleType | None = None
_lock = threading.RLock()  # a module already built is loaded by the caller, holding it
_builder: threading.Thread | None = None


def _forget_in_child() -> None:
    global _lock, _builder, status
    _lock, _builder = threading.RLock(), None  # the parent's build thread does not exist here
    if status == "building":
        status = "not built"


os.register_at_fork(after_in_child=_forget_in_child)


def cache_dir() -> Path:
    if os.environ.get("ADAMKIT_CACHE_DIR"):
        return Path(os.environ["ADAMKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamkit"


@functools.cache
def _target() -> Path:
    """Where the module for this source, torch and Python lives."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(f"{torch.__version__} {torch.__file__} {sys.version} {sysconfig.get_platform()}".encode())
    return cache_dir() / f"{_NAME}-{key.hexdigest()[:16]}{sysconfig.get_config_var('EXT_SUFFIX')}"


def compiler() -> str | None:
    """The C++ compiler the build uses: ``$CXX``, else ``c++`` or ``g++`` on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _compile(target: Path) -> None:
    """Compile the source into ``target`` (through a temporary file: another process
    building it at the same time never sees a partial one)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or $CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        cmd += [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
        cmd += [str(SOURCE), "-o", str(out)]
        cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
        cmd += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)


def _load(target: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(target))
    spec = importlib.util.spec_from_file_location(_NAME, str(target), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build() -> None:
    global _module, status
    try:
        target = _target()
        if not target.exists():
            _compile(target)
        module = _load(target)
        with _lock:
            _module, status = module, f"loaded: {target}"
    except Exception as err:  # noqa: BLE001  (no compiler, no headers, ...: the Python checks stay)
        with _lock:
            status = f"unavailable: {type(err).__name__}: {err}"


def module(start: bool = True, wait: bool = False) -> ModuleType | None:
    """The compiled checks if loaded, else None; ``start``: begin building them in the
    background if not begun (a module already in the cache loads at once); ``wait``:
    until they are loaded or have failed."""
    global _builder, status
    if _module is not None:
        return _module
    if os.environ.get("ADAMKIT_NATIVE_CHECKS", "1") == "0":
        status = "off (ADAMKIT_NATIVE_CHECKS=0)"
        return None
    with _lock:
        if _builder is None and (start or wait) and not status.startswith("unavailable"):
            target = _target()
            if target.exists():  # built before: load it here, now
                _builder = threading.Thread(target=_build)
                _builder.run()
                return _module
            status = "building"
            _builder = threading.Thread(target=_build, name="adamkit-native-build", daemon=True)
            _builder.start()
        builder = _builder
    if wait and builder is not None and builder.is_alive():
        builder.join()
    return _module
