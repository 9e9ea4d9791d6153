"""The CPU kernels: Numba loops over address tables (:mod:`.dense`: 32/16-bit state;
:mod:`.quantized`: 8/4-bit block-wise state), the explicit SIMD code they call
(``_avx2_*``, ``_avx512_*``, chosen by :mod:`._simd`), the worker pool (:mod:`._pool`)
and Numba's on-disk cache keyed on every source they compile from (:mod:`._cache`)."""

from . import _cache

_cache.install()  # before any cached kernel is defined: the cache follows every source they use

from . import dense, quantized  # noqa: E402, F401  (register their kernels)
