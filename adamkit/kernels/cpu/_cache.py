"""Numba's on-disk cache for adamkit's kernels, keyed on all the code they compile from.

``@njit(cache=True)`` reuses a compiled function while the file that defines it is
unchanged (its modification time and size). adamkit's kernels are assembled from
several modules (the rules in ``dense``, the SIMD code in ``_avx2_quant`` and
``_avx512_*``, the codebooks' constants in ``adamkit.quant``) and from the SIMD choice
(``ADAMKIT_SIMD``), so a change to any of them, e.g. a ``git pull`` that leaves
``quantized.py`` untouched, or another ``ADAMKIT_SIMD``, would run stale machine code
against new tables. :func:`install` puts locators in front of numba's own, for files
of this package only, whose source stamp adds a digest of every ``.py`` file in
``adamkit/kernels`` and ``adamkit/quant`` and the ``ADAMKIT_SIMD`` setting: any change
recompiles (numba then rewrites the entry).

It uses numba's locator list (``numba.core.caching.CacheImpl._locator_classes``), an
internal hook; if a numba release moves it, :func:`install` leaves numba's behaviour
as it is and says so in :data:`INSTALLED`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent.parent  # adamkit/
#: What the compiled kernels are made of: the kernels' and codebooks' sources, the
#: algorithm spec and the step scalars' named constants (a field added to RuleConsts
#: changes the type the kernels were compiled for)
_SOURCES = ("kernels/**/*.py", "quant/*.py", "spec.py", "_scalars.py")

#: Whether the locators are in place (False: numba's own, keyed on each file alone).
INSTALLED = False


@functools.cache
def digest() -> str:
    """A digest of the kernels' sources and the SIMD setting (computed once per process:
    a change takes effect in the next one, as an import would)."""
    h = hashlib.sha256()
    for pattern in _SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            h.update(path.relative_to(_PACKAGE).as_posix().encode())
            h.update(path.read_bytes())
    h.update(os.environ.get("ADAMKIT_SIMD", "auto").encode())
    return h.hexdigest()


def _ours(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().is_relative_to(_PACKAGE)
    except OSError:
        return False


def _locator(base: type) -> type:
    class Locator(base):
        def get_source_stamp(self):
            return (super().get_source_stamp(), digest())

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _ours(py_file):
                return None
            return super().from_function(py_func, py_file)

    Locator.__name__ = Locator.__qualname__ = f"Adamkit{base.__name__}"
    return Locator


def install() -> bool:
    """Put the locators in front of numba's (once); call before any cached kernel is
    defined (numba picks a function's locator when it is decorated)."""
    global INSTALLED
    if INSTALLED:
        return True
    try:
        from numba.core import caching

        classes = caching.CacheImpl._locator_classes
        bases = [caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator]
    except (ImportError, AttributeError):  # numba moved its internals: keep its own keying
        return False
    classes[:0] = [_locator(base) for base in bases]
    INSTALLED = True
    return True
