"""Without a GPU, Triton's interpreter runs the CUDA kernels on CPU tensors.

It must be switched on before triton is imported (adamkit imports it when it is
installed and either a GPU or the interpreter is there), so here, first.

Also: every case that runs Triton's interpreter is marked ``heavy``, and the
``fast_tier`` fixture tells a test whether this run leaves the heavy cases out (the
fast tier), so that it can do a smaller share of its work there.
"""

import os
from pathlib import Path

# Tests run in parallel processes (pytest -n auto), each with torch's threads: idle
# OpenMP threads that spin while another process has the cores slow small torch ops
# (an MLP's matmuls) by 5-30x. Set before torch is imported; results do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


#: The Triton kernels' tests (Triton's interpreter on CPU tensors without a GPU).
CUDA_TESTS = Path(__file__).resolve().parent / "kernels" / "cuda"


def _runs_heavy_cases(markexpr: str) -> bool:
    """Whether the ``-m`` expression selects a case marked only ``heavy``: true for the
    full suite (``-m "not slow"``, or none), false for the fast tier (``-m "not slow and
    not heavy"``)."""
    if not markexpr:
        return True
    try:
        from _pytest.mark.expression import Expression
    except ImportError:  # pytest's own parser moved: read the expression as the README writes it
        return "not heavy" not in markexpr
    return Expression.compile(markexpr).evaluate(lambda name, **_: name == "heavy")


def pytest_configure(config) -> None:
    config.fast_tier = not _runs_heavy_cases(config.getoption("markexpr", ""))


@pytest.fixture(scope="session")
def fast_tier(request) -> bool:
    """True in the fast tier (the heavy cases deselected by ``-m``): a test may then run a
    smaller share of its examples; the full suite runs them all."""
    return request.config.fast_tier


def pytest_collection_modifyitems(config, items) -> None:
    """Every case that runs Triton's interpreter (a ``triton`` backend parameter or
    test name, or a test under tests/kernels/cuda/) is ``heavy``: in the default run,
    not in the fast tier (``-m "not slow and not heavy"``)."""
    for item in items:
        if "triton" in item.nodeid or CUDA_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.heavy)
