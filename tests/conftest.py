"""Without a GPU, Triton's interpreter runs the CUDA kernels on CPU tensors.

It must be switched on before triton is imported (adamkit imports it when it is
installed and either a GPU or the interpreter is there), so here, first.
"""

import os
from pathlib import Path

# Tests run in parallel processes (pytest -n auto), each with torch's threads: idle
# OpenMP threads that spin while another process has the cores slow small torch ops
# (an MLP's matmuls) by 5-30x. Set before torch is imported; results do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


#: The Triton kernels' tests (Triton's interpreter on CPU tensors without a GPU).
CUDA_TESTS = Path(__file__).resolve().parent / "kernels" / "cuda"


def pytest_collection_modifyitems(config, items) -> None:
    """Every case that runs Triton's interpreter (a ``triton`` backend parameter or
    test name, or a test under tests/kernels/cuda/) is ``heavy``: in the default run,
    not in the fast tier (``-m "not slow and not heavy"``)."""
    import pytest

    for item in items:
        if "triton" in item.nodeid or CUDA_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.heavy)
