"""The MLX tests run with adamkit.mlx's compiled quantized step when it can be built
(it is built once, here, so that every test sees the same path rather than whichever
one a background build had reached); test_mlx_native.py compares it with the path in
MLX operations."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _mlx_native_built() -> None:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return
    from adamkit.mlx import _native

    _native.module(wait=True)
