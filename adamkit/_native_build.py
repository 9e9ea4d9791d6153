"""C++ extension modules compiled on first use, cached, and loaded in the background.

adamkit ships C++ sources, not binaries: each is compiled once per (source, the
libraries it is built against, Python, CPU) with the system's C++ compiler into
adamkit's cache directory (``$ADAMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/adamkit`` or
``~/.cache/adamkit``), in a background thread: callers never wait for it and use
their Python path until it is loaded. Without a compiler (or its headers), or with the
module's switch set to ``0``, the Python path stays; ``status`` says which and why.
A module already in the cache loads at once.

Users: :mod:`adamkit.optim._native` (the plans' checks in torch's C++ API) and
:mod:`adamkit.mlx._native` (the MLX side's quantized step).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType


def cache_dir() -> Path:
    if os.environ.get("ADAMKIT_CACHE_DIR"):
        return Path(os.environ["ADAMKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamkit"


def compiler() -> str | None:
    """The C++ compiler builds use: ``$CXX``, else ``c++`` or ``g++`` on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


#: /proc/cpuinfo's fields that tell CPUs apart: x86's model and flags, arm64's implementer,
#: part, variant and features, and others' ISA lines.
_CPU_FIELDS = (
    "model name",
    "flags",
    "CPU implementer",
    "CPU architecture",
    "CPU variant",
    "CPU part",
    "Features",
    "isa",
    "uarch",
)


@cache
def cpu_key() -> str:
    """What a binary built with ``-march=native`` depends on: the CPU's model and features
    (a cache directory shared between machines must not hand one CPU's build to another)."""
    parts = [platform.machine(), platform.processor()]
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        parts += sorted({line for line in lines if line.split(":")[0].strip() in _CPU_FIELDS})
    except OSError:
        pass
    if sys.platform == "darwin":
        for name in ("machdep.cpu.brand_string", "hw.cpufamily", "hw.optional.arm64"):
            try:
                done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
                parts.append(done.stdout.strip())
            except (OSError, subprocess.SubprocessError):
                pass
    return "\n".join(parts)


class NativeModule:
    """One C++ source built into an extension module named ``name``.

    ``key()`` returns what the build depends on besides the source, Python and the
    platform (library versions and paths); ``command(source, output)`` the compiler's
    argument list; ``check(module)`` may raise to refuse a module that loads but does
    not work (an ABI mismatch)."""

    def __init__(
        self,
        name: str,
        source: Path,
        key: Callable[[], str],
        command: Callable[[Path, Path], list[str]],
        switch: str,
        check: Callable[[ModuleType], None] | None = None,
    ) -> None:
        self.name, self.source, self._key, self._command = name, source, key, command
        self.switch, self._check = switch, check
        #: "not built", "building", "loaded: PATH", "off (SWITCH=0)" or "unavailable: REASON"
        self.status = "not built"
        self._module: ModuleType | None = None
        self._lock = threading.RLock()  # a module already built is loaded by the caller, holding it
        self._builder: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forget_in_child)

    def _forget_in_child(self) -> None:
        self._lock, self._builder = threading.RLock(), None  # the parent's build thread does not exist here
        if self.status == "building":
            self.status = "not built"

    @cache  # noqa: B019  (module-level singletons)
    def target(self) -> Path:
        """Where the module for this source and key lives."""
        key = hashlib.sha256()
        key.update(self.source.read_bytes())
        key.update(f"{self._key()} {sys.version} {sysconfig.get_platform()} {cpu_key()}".encode())
        key.update(" ".join(self._command(self.source, Path("out"))).encode())  # the compiler and its flags
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        return cache_dir() / f"{self.name}-{key.hexdigest()[:16]}{suffix}"

    def _compile(self, target: Path) -> None:
        """Compile into ``target`` (through a temporary file: another process never sees a
        partial one; processes building the same target at once take turns, and the
        later ones find it built)."""
        if compiler() is None:
            raise RuntimeError("no C++ compiler (c++, g++ or $CXX)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".lock"), "w") as lock:
            try:  # a POSIX record lock: a process's own (a forked child does not hold its parent's)
                import fcntl

                fcntl.lockf(lock, fcntl.LOCK_EX)
            except (ImportError, OSError):  # no POSIX locks (or a file system without them): build anyway
                pass
            if not target.exists():
                self._compile_unlocked(target)

    def _compile_unlocked(self, target: Path) -> None:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = self._command(self.source, out)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {done.stderr.strip()[-500:]}")
            os.replace(out, target)

    def _load(self, target: Path) -> ModuleType:
        loader = importlib.machinery.ExtensionFileLoader(self.name, str(target))
        spec = importlib.util.spec_from_file_location(self.name, str(target), loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        if self._check is not None:
            self._check(module)
        return module

    def _build(self) -> None:
        try:
            target = self.target()
            if not target.exists():
                self._compile(target)
            try:
                module = self._load(target)
            except ImportError:  # a damaged file in the cache (a full disk, a killed build): once more
                target.unlink(missing_ok=True)
                self._compile(target)
                module = self._load(target)
            with self._lock:
                self._module, self.status = module, f"loaded: {target}"
        except Exception as err:  # noqa: BLE001  (no compiler, no headers, ...: the Python path stays)
            with self._lock:
                self.status = f"unavailable: {type(err).__name__}: {err}"

    def module(self, start: bool = True, wait: bool = False) -> ModuleType | None:
        """The module if loaded, else None; ``start``: begin building it in the background
        if not begun (one already in the cache loads at once); ``wait``: until it is
        loaded or has failed."""
        if self._module is not None:
            return self._module
        if os.environ.get(self.switch, "1") == "0":
            self.status = f"off ({self.switch}=0)"
            return None
        with self._lock:
            if self._builder is None and (start or wait) and not self.status.startswith("unavailable"):
                if self.target().exists():  # built before: load it here, now
                    self._builder = threading.Thread(target=self._build)
                    self._builder.run()
                    return self._module
                self.status = "building"
                self._builder = threading.Thread(target=self._build, name=f"adamkit-build-{self.name}", daemon=True)
                self._builder.start()
            builder = self._builder
        if wait and builder is not None and builder.is_alive():
            builder.join()
        return self._module
