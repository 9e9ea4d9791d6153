"""Small units of the package's top-level modules: the step scalars (``_scalars.py``),
the state buffers on huge pages (``_memory.py``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from adamkit import _memory
from adamkit._scalars import adam_scalars, adamax_scalars


def test_adam_scalars() -> None:
    s = adam_scalars(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5, decoupled=False, step=3)
    assert s.step_size == pytest.approx(0.1 / (1 - 0.9**3), rel=1e-15)
    assert s.inv_bc2_sqrt == pytest.approx(1 / math.sqrt(1 - 0.99**3), rel=1e-15)
    assert (s.decay, s.l2) == (1.0, 0.5)
    w = adam_scalars(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5, decoupled=True, step=3)
    assert (w.decay, w.l2) == (pytest.approx(0.95), 0.0)


def test_adamax_scalars_have_no_second_bias_correction() -> None:
    s = adamax_scalars(lr=0.2, beta1=0.5, beta2=0.9, eps=1e-8, weight_decay=0.1, step=2)
    assert (s.step_size, s.inv_bc2_sqrt, s.decay, s.l2) == (0.2 / 0.75, 1.0, 1.0, 0.1)


def test_state_buffers_are_zeros_on_huge_pages_where_linux_allows() -> None:
    big = _memory.zeros(3 * _memory.HUGE_PAGE // 4 + 5, torch.float32)  # 6 MiB and a bit
    assert big.dtype == torch.float32 and big.numel() == 3 * _memory.HUGE_PAGE // 4 + 5
    assert not big.any()
    like = _memory.zeros_like(torch.ones(4, 1 << 20, dtype=torch.bfloat16).t(), torch.float32)
    assert like.shape == (1 << 20, 4) and like.stride() == (1, 1 << 20) and not like.any()
    small = torch.ones(10)
    assert _memory.advise_huge_pages(small) is False  # under MIN_BYTES: left alone
    if sys.platform.startswith("linux") and _memory._madvise is not None:
        # the 2 MiB-aligned part of a 12 MiB buffer spans huge pages: advised
        assert _memory.advise_huge_pages(torch.empty(3 * _memory.HUGE_PAGE // 4, dtype=torch.float64))


@pytest.mark.heavy  # a fresh process: seconds
def test_huge_pages_can_be_switched_off() -> None:
    code = "from adamkit import _memory; print(_memory._madvise is None)"
    env = {**os.environ, "ADAMKIT_HUGE_PAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
