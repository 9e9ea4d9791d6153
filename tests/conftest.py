"""Without a GPU, Triton's interpreter runs the CUDA kernels on CPU tensors.

It must be switched on before triton is imported (adamkit imports it when it is
installed and either a GPU or the interpreter is there), so here, first.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
