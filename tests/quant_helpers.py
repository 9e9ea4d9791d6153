"""Quantized state (8 and 4 bits) on a fused backend beside the reference, in lockstep;
the configurations those tests run; the encoders' probe values. Shared by the Numba
tests, the Triton tests and the optimizer's tests of quantized state."""

from __future__ import annotations

import numpy as np
import torch
from helpers import round_trip

import adamkit
from adamkit.quant import QuantFormat, codebook, quantize, unpack

QCONFIGS = [
    (adamkit.AdamW, {}),
    (adamkit.Adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True)),
    (adamkit.AdamW, dict(weight_decay=0.1, amsgrad=True)),
    (adamkit.Adamax, dict(weight_decay=0.05)),
    (adamkit.Adamax, dict(maximize=True, betas=(0.5, 0.9))),
]
QIDS = ["AdamW", "Adam-ams-max", "AdamW-ams", "Adamax", "Adamax-max"]
QUANT_SIZES = [4096, 4097, 300, 70_001]  # one block's multiple, ragged, tiny, several chunks


def quant_pair(cls, kw, bits, dtype=torch.float32, sizes=QUANT_SIZES, backend="numba", **extra):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    common = dict(state_bits=bits, min_quant_size=0, **kw, **extra)
    return params, twins, cls(params, backend=backend, **common), cls(twins, backend="reference", **common)


def quant_lockstep(cls, kw, bits, dtype=torch.float32, steps=7, bad=None, sizes=QUANT_SIZES, backend="numba",
                   scales=None, **extra):  # fmt: skip
    """Step a fused backend and the reference together; compare after every step (8-bit
    codes within one, on rounding ties only; dithered 4-bit codes equal), then copy the
    kernel's state into the reference. ``scales(i, n)``: tensor ``i``'s gradient scales
    (default ``10^(i-3)``)."""
    params, twins, fused, ref = quant_pair(cls, kw, bits, dtype, sizes, backend, **extra)
    gen = torch.Generator().manual_seed(11)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    off_by_one = total = 0
    for step in range(steps):
        for i, (p, q) in enumerate(zip(params, twins)):
            scale = 10.0 ** (i - 3) if scales is None else scales(i, p.numel())
            g = (torch.randn(p.shape, generator=gen) * scale).to(dtype)
            if bad is not None and step % 2 == 1 and g.numel():
                g[bad % g.numel()] = float("nan")
                g[(bad * 7) % g.numel()] = float("inf")
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
        assert fused.nonfinite_count == ref.nonfinite_count
        for p, q in zip(params, twins):
            torch.testing.assert_close(p.detach(), q.detach(), **tol)
            sf, sr = fused.state[p], ref.state[q]
            assert sf.keys() == sr.keys()
            fmt = QuantFormat.from_key(sf["quant_bits"], sf["quant_block"])
            for key, value in sf.items():
                if key.endswith("_codes"):
                    d = (unpack(value, fmt, p.numel()) - unpack(sr[key], fmt, p.numel())).abs()
                    assert (int(d.max()) if d.numel() else 0) <= (0 if fmt.dither else 1), key
                    off_by_one += int(d.sum())
                    total += p.numel()
                elif key.endswith("_absmax"):
                    torch.testing.assert_close(value, sr[key], atol=0, rtol=2e-6)
            with torch.no_grad():
                q.copy_(p)
            for key, value in sf.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    sr[key].copy_(value)
    assert off_by_one <= 1e-3 * total, (off_by_one, total)  # ties and float rounding are rare
    return params


def tiny_and_subnormal(i: int, n: int) -> torch.Tensor:
    """Gradient scales from 1 down to 1e-12 within blocks (second moments far below the
    block's largest, which 8-bit codes must not round to zero) and, in the first 512
    elements, 1e-20 (second moments of 1e-43: a subnormal absmax)."""
    scale = torch.logspace(0, -12, 37).repeat(n // 37 + 1)[:n]
    scale[:512] = 1e-20
    return scale


def save_load_continue(bits: int, sizes=QUANT_SIZES, backend: str = "numba") -> None:
    """Quantized state saved (through bytes) after 3 steps, loaded into a second
    optimizer; both step on, bit for bit alike."""
    params, twins, opt, _ = quant_pair(adamkit.AdamW, {}, bits, sizes=sizes, backend=backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = round_trip(opt.state_dict())
    assert all(isinstance(saved["state"][0][k], int) for k in ("quant_bits", "quant_block"))
    clones = [p.detach().clone().requires_grad_() for p in params]
    other = adamkit.AdamW(clones, state_bits=bits, min_quant_size=0, backend=backend)
    other.load_state_dict(saved)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, c, g in zip(params, clones, grads):
            p.grad, c.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    for p, c in zip(params, clones):
        assert torch.equal(p, c)
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other.state[c][key])), key


def encoder_probe(name: str) -> np.ndarray:
    """float32 inputs for an encoder: random magnitudes over 18 decades, the ends, every
    midpoint and its float neighbours (sign folded away for unsigned codebooks)."""
    mids = codebook(name).midpoints.numpy()
    gen = np.random.default_rng(1)
    y = np.concatenate(
        [gen.standard_normal(200_000) * np.exp(gen.uniform(-18, 0, 200_000)), gen.uniform(-1, 1, 50_000),
         [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1e-9, 2.75e-7, -2.75e-7], mids, np.nextafter(mids, np.float32(2)),
         np.nextafter(mids, np.float32(-2))]
    ).astype(np.float32)  # fmt: skip
    y = np.clip(y, -1, 1)
    return (y if codebook(name).signed else np.abs(y)).astype(np.float32)


def any_float_probe(name: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    """64 normalized values with NaN of either sign, ±inf, -3, -1e-45 and 1e30 at odd
    places, and the codes a dithered 4-bit encoder must give them: NaN and anything
    below ``L[0]`` as ``L[0]``, +inf and 1e30 code 15 (the reference's codes of the
    values otherwise). Other finite values above 1 + 2^-22 reach no encoder (the
    codec's are at most 1 + 2^-23): the SIMD ones give them a code of 0-15, not
    necessarily 15 (their cell is past the 32-cell tables)."""
    book = codebook(name)
    low = float(book.values[0])
    y = np.random.default_rng(step).uniform(low, 1.0, 64).astype(np.float32)
    y[0] = 1.0
    specials = [np.nan, np.uint32(0xFFC00000).view(np.float32), np.inf, -np.inf, -3.0, 1e30, -1e-45]
    y[1 : 2 * len(specials) : 2] = specials
    with np.errstate(invalid="ignore"):
        high = y > 1.0
        tame = np.where(np.isnan(y) | (y < low), low, np.where(high, 1.0, y)).astype(np.float32)
    fmt = QuantFormat(4, None)
    codes, absmax = quantize(torch.from_numpy(tame), fmt, book, step)
    assert float(absmax) == 1.0
    want = unpack(codes, fmt, y.size).numpy()
    want[high] = 15
    return y, want
