"""Host time of a Triton-backed step, without a GPU: the Triton kernels' launches are
stubbed out and the tensors live on the CPU (under Triton's interpreter, which lets the
``triton`` backend take them), so what is timed is adamkit's own Python per step:
checks, plans, tables, scalars. Medians of 20 steps after 5 warm-up steps.

    python scripts/host-time.py
"""

from __future__ import annotations

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import adamkit  # noqa: E402
import adamkit.kernels.cuda.triton_kernels as tc  # noqa: E402

#: GPT-2 small's 148 parameter tensors (124M elements): embeddings, 12 blocks, final norm
_BLOCK = [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,), (768, 3072)]
GPT2 = [(50257, 768), (1024, 768), *(_BLOCK + [(768,)]) * 12, (768,), (768,)]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def median_ms(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, **kw) -> float:
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = adamkit.AdamW(params, backend="triton", **kw)
    for _ in range(5):  # warm-up: state, plans, tables, caches
        opt.step()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    tc._dense_kernel = tc._quant_kernel = _NoLaunch()
    median_ms(GPT2)  # the process's first steps run slower whatever they are
    table = Table(title="adamkit's host time per step, kernel launches stubbed (ms, median of 20)")
    for col in ("tensors", "state", "host path", "capturable=True"):
        table.add_column(col, justify="left" if col in ("tensors", "state") else "right")
    for name, shapes in (("GPT-2 (148)", GPT2), ("20,000 x 10", [(10,)] * 20_000)):
        for bits in (32, 8):
            row = [median_ms(shapes, state_bits=bits, capturable=cap) for cap in (False, True)]
            table.add_row(name, f"{bits}-bit", *(f"{t:.2f}" for t in row))
        if name.startswith("GPT-2"):  # stochastic rounding: a new seed every step (capturable rejects it)
            t = median_ms(shapes, torch.bfloat16, stochastic_rounding=True)
            table.add_row(f"{name}, bf16, stochastic rounding", "32-bit", f"{t:.2f}", "-")
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
