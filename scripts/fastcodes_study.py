"""Feasibility study: block-wise 8- and 4-bit optimizer-state formats whose encode and
decode are pure vector arithmetic on float32 bits (no tables, searches or gathers).

Not part of adamkit: a prototype to measure accuracy (torch model of the formats, on
``adamkit bench``'s accuracy workload) and speed (a standalone Numba AdamW step) before
any integration. Run:

    python scripts/fastcodes_study.py accuracy          # update error of each candidate
    python scripts/fastcodes_study.py accuracy --workload wide      # (or outliers) see grad_scales
    python scripts/fastcodes_study.py speed [--n N]     # ns/element vs torch fused and adamkit
    python scripts/fastcodes_study.py check             # numba codes == torch model codes

Formats ("minifloat" codes of ``x / 2^k`` per block, ``k`` a power of two chosen from
the block's largest finite magnitude, see ``Fmt``): the code of an element is computed
on the float32 bit pattern of its magnitude: ``P = |bits| - ((T - EMAX) << 23)`` is the
element's position in units of ``2^-(23 - M)`` codes (linear inside each binade, as the
float32 mantissa is), and the code is ``(P + r) >> (23 - M)`` with ``r = 2^(22-M) - 1``
(nearest value, ties toward zero) or a dither ``r = u · 2^(23-M)`` (``floor(P + u)``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------- formats
DITHER_ALONG = 3242174889  # adamkit's dither sequence (adamkit/quant/codebooks.py)
DITHER_STEP = 2654435769


@dataclass(frozen=True)
class Fmt:
    """A sign-magnitude minifloat code of ``E`` exponent and ``M`` mantissa bits.

    zero: "flush" -- exponent field 0 holds only 0 (nearest of {0, normals}: a value at
        or below half the smallest normal is 0); "sub" -- field 0 holds subnormals (linear
        from 0 with the first binade's spacing); "clamp" -- no zero, field 0 is a normal
        binade and smaller values take the smallest code (second moments: never 0).
    dither: codes ``floor(P + u)`` instead of nearest; decoding adds ``1/2 - u`` back.
    root: the code holds ``sqrt(v)`` (second moments).
    """

    name: str
    E: int
    M: int
    signed: bool
    zero: str = "flush"
    dither: bool = False
    root: bool = False
    scale: str = "abs"

    @property
    def emax(self) -> int:  # the top binade's exponent field
        return (1 << self.E) - 1

    @property
    def cmax(self) -> int:  # the largest magnitude code
        return (1 << (self.E + self.M)) - 1

    @property
    def bits(self) -> int:
        return self.E + self.M + int(self.signed)


def _i32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its bits as int64 (0 .. 2^32-1)."""
    return x.contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _f32(b: torch.Tensor) -> torch.Tensor:
    b = b & 0xFFFFFFFF
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def dither_units(n: int, step: int, shift: int) -> torch.Tensor:
    """u in units of 2^-shift codes: the top ``shift`` bits of adamkit's dither hash."""
    j = torch.arange(n, dtype=torch.int64)
    h = (j * DITHER_ALONG + step * DITHER_STEP) & 0xFFFFFFFF
    return h >> (32 - shift)


def block_top(mag: torch.Tensor, f: Fmt) -> torch.Tensor:
    """pow2 scaling: T, the biased float32 exponent of the top binade, from the block's
    largest finite magnitude (rounded as the codes round: nearest, so that it never
    overflows the top code; truncated for dithered codes, which saturate), at least
    EMAX + 1 (every code's value a normal float32; an all-zero block too)."""
    fin = torch.where(mag < 0x7F800000, mag, 0)
    a = fin.amax(dim=1)
    s = 23 - f.M
    r = 0 if f.dither else (1 << (s - 1)) - 1
    return torch.clamp((a + r) >> 23, min=f.emax + 1)


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """abs scaling: the block's largest finite magnitude (float32)."""
    return torch.where(x.isfinite(), x.abs(), 0.0).amax(dim=1)


def topv(f: Fmt) -> float:
    """The largest code's value on the grid whose top binade is [1, 2)."""
    if f.E == 0 and f.zero == "sub":  # linear codes only: 0 .. (2^M - 1) / 2^(M-1)
        return 2.0 - 2.0 ** (1 - f.M)
    return 2.0 - 2.0**-f.M


def encode(x: torch.Tensor, f: Fmt, block: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x flat float32 -> (codes int64 [n], scale [blocks]); n a multiple of block.

    scale: pow2 -- T (int64), the grid's top binade is the float32 exponent T;
    abs -- absmax (float32), the grid's top binade is 2^0 and the element is y = |x| *
    fl(topv / absmax) (0 for an all-zero block), so the block's max lands on the top code.
    """
    if f.root:
        x = x.sqrt()
    xb = x.view(-1, block)
    b = _i32(xb)
    mag = b & 0x7FFFFFFF
    if f.scale == "pow2":
        t = block_top(mag, f)[:, None]
        sc = t.view(-1)
    else:
        am = block_absmax(xb)
        sc = am
        inv = torch.where(am > 0, torch.tensor(topv(f), dtype=torch.float32) / am, 0.0)
        mag = _i32(xb.abs() * inv[:, None]) & 0x7FFFFFFF
        t = torch.full_like(mag[:, :1], 127)
    off = (t - f.emax) << 23
    s = 23 - f.M
    p = mag - off  # position in 2^-s codes (may be negative)
    if f.dither:
        r = dither_units(b.numel(), step, s).view_as(b)
    else:
        r = (1 << (s - 1)) - 1
    if f.zero == "sub":
        # below the first normal binade the position is linear: |x| / 2^(T-127-emax+1-M) codes
        lin = (_f32(mag) * torch.exp2(-(t - 127 - f.emax + 1 - f.M - s).double()).float()).long()
        p = torch.where(p < (1 << 23), lin, p)
    c = (p + r) >> s
    if f.zero == "flush":
        c = torch.where(mag > off, torch.clamp(c, min=1 << f.M), 0)
    else:
        c = torch.clamp(c, min=0)
    c = torch.clamp(c, max=f.cmax)
    if f.signed:
        c = c | ((b >> 31) << (f.E + f.M))
    return c.view(-1), sc


def decode(c: torch.Tensor, sc: torch.Tensor, f: Fmt, block: int, step: int = 0) -> torch.Tensor:
    c = c.view(-1, block)
    t = sc[:, None] if f.scale == "pow2" else torch.full_like(c[:, :1], 127)
    s = 23 - f.M
    cm = c & f.cmax
    ph = cm << s
    if f.dither:
        ph = ph + (1 << (s - 1)) - dither_units(c.numel(), step, s).view_as(c)
    off = (t - f.emax) << 23
    val = _f32(torch.clamp(ph + off, min=0))
    if f.zero == "sub":
        lin = ph.float() * torch.exp2((t - 127 - f.emax + 1 - f.M - s).double()).float()
        val = torch.where(ph < (1 << 23), lin, val)
    elif f.zero == "flush":
        if f.dither:
            raise ValueError("dither needs sub or clamp")
        val = torch.where(cm == 0, 0.0, val)
    if f.signed:
        val = torch.where((c >> (f.E + f.M)) & 1 == 1, -val, val)
    if f.scale == "abs":
        val = val * (sc / torch.tensor(topv(f), dtype=torch.float32))[:, None]
    val = val.reshape(-1)
    return val * val if f.root else val


# ------------------------------------------------------------------------ candidates
def F(spec: str) -> Fmt:
    """'m e4m3 flush [dither] [pow2]' / 'r e4m4 clamp ...' (r: sqrt(v)) / 'v e5m3 clamp'."""
    w = spec.split()
    e, m = int(w[1][1]), int(w[1][3])
    return Fmt(spec, e, m, w[0] == "m", w[2], "dither" in w, w[0] == "r", "pow2" if "pow2" in w else "abs")


COMBOS8 = [
    ("m e4m3 flush pow2", "r e4m4 clamp pow2"),
    ("m e4m3 flush", "r e4m4 clamp"),
    ("m e4m3 flush", "r e4m4 clamp dither"),
    ("m e4m3 flush", "r e3m5 clamp dither"),
    ("m e3m4 flush", "r e4m4 clamp dither"),
    ("m e3m4 flush", "r e3m5 clamp dither"),
    ("m e3m4 sub", "r e3m5 clamp dither"),
    ("m e2m5 sub", "r e3m5 clamp dither"),
    ("m e3m4 flush", "r e2m6 clamp dither"),
    ("m e4m3 flush", "v e5m3 clamp dither"),
    ("m e4m3 flush", "r e2m6 clamp"),
    ("m e4m3 flush pow2", None),
    ("m e4m3 flush", None),
    ("m e3m4 flush", None),
    ("m e3m4 sub", None),
    ("m e4m3 flush dither", None) if False else ("m e4m3 sub dither", None),
    (None, "r e4m4 clamp dither"),
    (None, "r e3m5 clamp dither"),
    (None, "r e3m5 clamp dither pow2"),
    (None, "v e5m3 clamp dither"),
    (None, "r e2m6 clamp"),
    (None, "r e3m5 clamp"),
]
COMBOS4 = [
    ("m e2m1 sub dither", "r e1m3 clamp dither"),
    ("m e1m2 sub dither", "r e1m3 clamp dither"),
    ("m e0m3 sub dither", "r e1m3 clamp dither"),
    ("m e2m1 sub dither", "r e2m2 clamp dither"),
    ("m e2m1 sub dither", None),
    ("m e1m2 sub dither", None),
    ("m e0m3 sub dither", None),
    ("m e2m1 sub", None),
    (None, "r e1m3 clamp dither"),
    (None, "r e2m2 clamp dither"),
    (None, "r e0m4 clamp dither"),
]


#: (first moment, sqrt(v), block) of the kernels timed and checked
CANDIDATES = [
    ("m e2m5 sub", "r e3m5 clamp dither", 256),
    ("m e3m4 flush", "r e3m5 clamp dither", 256),
    ("m e4m3 flush", "r e4m4 clamp", 256),
    ("m e2m1 sub dither", "r e1m3 clamp dither", 128),
]


class ModelAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's rule (defaults) with moments stored in formats ``fm``, ``fv``
    (None: float32): each step decodes, updates in float32, steps the parameter with
    the updated moments, and stores them encoded (as adamkit's kernels do)."""

    def __init__(
        self,
        params,
        fm: Fmt | None,
        fv: Fmt | None,
        block: int,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fm, self.fv, self.block = fm, fv, block

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                st = self.state[p]
                n = p.numel()
                if not st:
                    st["step"] = 0
                    z = torch.zeros(n)
                    st["m"] = z if self.fm is None else encode(z, self.fm, self.block)
                    st["v"] = z if self.fv is None else encode(z, self.fv, self.block)
                t = st["step"]
                m = st["m"] if self.fm is None else decode(*st["m"], self.fm, self.block, t)
                v = st["v"] if self.fv is None else decode(*st["v"], self.fv, self.block, t)
                g = p.grad.reshape(-1).float()
                t += 1
                m = m * b1 + g * (1 - b1)
                v = v * b2 + g * g * (1 - b2)
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                flat = p.view(-1)
                flat.mul_(1 - lr * wd)
                flat.sub_(lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps))
                st["m"] = m if self.fm is None else encode(m, self.fm, self.block, t)
                st["v"] = v if self.fv is None else encode(v, self.fv, self.block, t)
                st["step"] = t


def grad_scales(rows: int, cols: int, workload: str) -> torch.Tensor:
    """Per-element gradient scales [rows, cols] of the accuracy workloads.

    rows -- adamkit bench's: row i's scale log-spread 1e-4..1e-1 over the rows (every
        block of a row has one scale: a narrow spread of second moments per block);
    wide -- each row holds the log-spread 1e-4..1e-1 over its columns, in a random
        column order per row, so every block (128 or 256) spans about three decades;
    outliers -- ``rows``, with 2 random elements of every aligned 128 (4 per 256) 100x
        larger (each block's max is an outlier; its bulk sits 100x below in sqrt(v)).
    """
    gen = torch.Generator().manual_seed(2)
    if workload == "rows":
        return torch.logspace(-4, -1, rows)[:, None].expand(rows, cols).contiguous()
    if workload == "wide":
        perm = torch.rand(rows, cols, generator=gen).argsort(dim=1)
        return torch.logspace(-4, -1, cols)[perm]
    if workload == "outliers":
        s = torch.logspace(-4, -1, rows)[:, None].expand(rows, cols).contiguous()
        seg = s.view(rows, cols // 128, 128)
        pos = torch.rand(rows, cols // 128, 128, generator=gen).argsort(dim=2)[..., :2]
        seg.scatter_(2, pos, seg.gather(2, pos) * 100)
        return s
    raise ValueError(workload)


def accuracy(
    rows: int = 2048, cols: int = 512, steps: int = 100, only=(), peers=True, extra=(), workload="rows"
) -> None:
    """adamkit bench's accuracy workload (adamkit/bench.py accuracy()), same seeds;
    ``workload`` picks the gradient scales (see ``grad_scales``; "rows": bench's). Prints
    the relative L2 error of the total update vs fp32 AdamW, over all elements and over
    the third with the smallest gradient scales (where a clamped sqrt(v) overestimates)."""
    import adamkit

    combos: dict[str, callable] = {}
    if peers:
        combos["adamkit 8-bit (dynamic8/udynamic8)"] = lambda ps: adamkit.AdamW(ps, state_bits=8)
        combos["adamkit 4-bit (normal4/sqrt_geo4, dithered)"] = lambda ps: adamkit.AdamW(ps, state_bits=4)
    for bits, combos_b, block in ((8, COMBOS8, 256), (4, COMBOS4, 128)):
        mine = [(fm, fv) for fm, fv, blk in extra if F(fm or fv).bits == bits]
        for fm, fv in combos_b + mine:
            if (fm, fv) not in mine and only and not any(o in f"{bits}b: {fm} | {fv}" for o in only):
                continue
            blk = next((b for m_, v_, b in extra if (m_, v_) == (fm, fv)), block)
            combos[f"{bits}b/{blk}: {fm or 'm fp32'} | {fv or 'v fp32'}"] = lambda ps, fm=fm, fv=fv, block=blk: (
                ModelAdamW(ps, fm and F(fm), fv and F(fv), block)
            )
    gen = torch.Generator().manual_seed(0)
    scales = grad_scales(rows, cols, workload)
    low = scales <= scales.flatten().kthvalue(scales.numel() // 3).values
    signal = torch.randn(rows, cols, generator=gen)
    start = torch.randn(rows, cols, generator=gen) * 0.02
    makers = {"fp32": lambda ps: torch.optim.AdamW(ps), **combos}
    params = {k: torch.nn.Parameter(start.clone()) for k in makers}
    opts = {k: mk([params[k]]) for k, mk in makers.items()}
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        g = scales * (signal + torch.randn(rows, cols, generator=noise))
        for k, opt in opts.items():
            params[k].grad = g.clone()
            opt.step()
    exact = params["fp32"].detach() - start
    print(f"workload {workload}; error: all, smallest-scale third ({int(low.sum())} elements)")
    for k in combos:
        diff = params[k].detach() - start - exact
        err = float(diff.norm() / exact.norm())
        err_low = float(diff[low].norm() / exact[low].norm())
        print(f"{err:.4f}  {err_low:.4f}  {k}", flush=True)


# ------------------------------------------------------------------ numba kernels
def _bitcasts():
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def f2i(typingctx, x):
        sig = types.int32(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.int32))

        return sig, codegen

    @intrinsic
    def i2f(typingctx, x):
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return sig, codegen

    return f2i, i2f


def make_codec(f: Fmt):
    """njit (encode, decode) of one element of format ``f`` (abs scaling):
    encode(x, s, u) -> code for the scaled x·s (u: the dither in 2^-(23-M) codes, or
    ignored); decode(code, u) -> the grid value (times absmax / topv by the caller)."""
    from numba import njit

    f2i, i2f = _bitcasts()
    assert f.scale == "abs"
    S = 23 - f.M
    OFF = (127 - f.emax) << 23
    R = (1 << (S - 1)) - 1
    HALF = 1 << (S - 1)
    MINN = 1 << f.M
    CMAX = f.cmax
    SIGN = CMAX + 1
    SUB = f.zero == "sub"
    FLUSH = f.zero == "flush"
    DITHER = f.dither
    SIGNED = f.signed
    LINK = np.float32(2.0 ** (f.emax - 1 + 23))  # y -> position in 2^-S codes, linear zone
    LINKI = np.float32(2.0 ** -(f.emax - 1 + 23))
    ONE23 = 1 << 23
    SSH = 31 - (f.E + f.M)

    @njit(inline="always", error_model="numpy")
    def enc(x, s, u):
        xs = x * s
        xb = f2i(xs)
        yb = xb & 0x7FFFFFFF
        p = yb - OFF
        if SUB:
            lin = np.int32(abs(xs) * LINK)
            p = lin if p < ONE23 else p
        r = u if DITHER else R
        c = (p + r) >> S
        if FLUSH:
            c = max(c, MINN) if yb > OFF else 0
        else:
            c = max(c, 0)
        c = min(c, CMAX)
        if SIGNED:
            c = c | ((xb >> SSH) & SIGN)
        return c

    @njit(inline="always", error_model="numpy")
    def dec(c, u):
        cm = c & CMAX
        ph = cm << S
        if DITHER:
            ph = ph + HALF - u
        val = i2f(ph + OFF)
        if SUB:
            val = np.float32(np.int32(ph)) * LINKI if ph < ONE23 else val
        if FLUSH:
            val = val if cm != 0 else np.float32(0.0)
        if SIGNED:
            val = -val if (c & SIGN) != 0 else val
        return val

    return enc, dec


def make_step(fm: Fmt, fv: Fmt, block: int):
    """A fused AdamW step for one flat float32 parameter whose moments are stored in
    formats ``fm`` and ``fv`` (``fv.root``: sqrt(v)), one float32 absmax per block and
    moment. 8-bit: one code per byte. 4-bit: block element i < block/2 in the low
    nibble of byte i, element i + block/2 in its high nibble ("split halves", so that
    packing is contiguous). Dither ``u`` as adamkit's sequence over the element index
    and step (codes read: step t-1; written: step t)."""
    from numba import njit, prange

    f2i, i2f = _bitcasts()
    assert fm.bits == fv.bits and fv.root and fm.signed
    encm, decm = make_codec(fm)
    encv, decv = make_codec(fv)
    B = block
    H = B // 2
    FOUR = fm.bits == 4
    DM, DV = fm.dither, fv.dither
    SHM, SHV = 32 - (23 - fm.M), 32 - (23 - fv.M)
    TOPM, TOPV = np.float32(topv(fm)), np.float32(topv(fv))
    along = (np.arange(B, dtype=np.uint64) * np.uint64(DITHER_ALONG) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    along = along.view(np.int32)

    @njit(inline="always", error_model="numpy")
    def phase(j0, t):
        return np.int32(np.uint32((j0 * DITHER_ALONG + t * DITHER_STEP) & 0xFFFFFFFF))

    @njit(parallel=True, fastmath=False, nogil=True, error_model="numpy")
    def step(p, g, mc, ma, vc, va, lr, b1, b2, eps, wd, t, chunks):
        f32 = np.float32
        nb = p.size // B
        decay = f32(1.0 - lr * wd)
        c1, c2, d1, d2 = f32(b1), f32(b2), f32(1.0 - b1), f32(1.0 - b2)
        stepsize = f32(lr / (1.0 - b1**t))
        inv_bc2 = f32(1.0 / math.sqrt(1.0 - b2**t))
        epsf = f32(eps)
        per = (nb + chunks - 1) // chunks
        for ch in prange(chunks):
            smf = np.empty(B, np.float32)
            svf = np.empty(B, np.float32)
            for b in range(ch * per, min(nb, (ch + 1) * per)):
                j0 = b * B
                pb = p[j0 : j0 + B]
                gb = g[j0 : j0 + B]
                mcb = mc[(j0 >> 1) : (j0 >> 1) + H] if FOUR else mc[j0 : j0 + B]
                vcb = vc[(j0 >> 1) : (j0 >> 1) + H] if FOUR else vc[j0 : j0 + B]
                ph0 = phase(j0, t - 1)
                ph1 = phase(j0, t)
                km = ma[b] / TOPM * c1  # decoded m times b1
                kv = va[b] / TOPV
                kv = kv * kv * c2  # decoded sqrt(v), squared, times b2
                am = np.int32(0)
                av = np.int32(0)
                if FOUR:
                    for k in range(H):  # decode, the AdamW rule, the largest finite magnitudes
                        byte_m = np.int32(mcb[k])
                        byte_v = np.int32(vcb[k])
                        u = np.int32(along[k] + ph0)
                        smf[k] = decm(byte_m & 15, (u >> SHM) & ((1 << (32 - SHM)) - 1))
                        svf[k] = decv(byte_v & 15, (u >> SHV) & ((1 << (32 - SHV)) - 1))
                        u = np.int32(along[k + H] + ph0)
                        smf[k + H] = decm((byte_m >> 4) & 15, (u >> SHM) & ((1 << (32 - SHM)) - 1))
                        svf[k + H] = decv((byte_v >> 4) & 15, (u >> SHV) & ((1 << (32 - SHV)) - 1))
                    for i in range(B):  # the AdamW rule, the largest finite magnitudes
                        gi = gb[i]
                        mo = smf[i]
                        ro = svf[i]
                        m = mo * km + gi * d1
                        v = ro * ro * kv + gi * gi * d2
                        rr = np.sqrt(v)
                        pb[i] = pb[i] * decay - stepsize * m / (rr * inv_bc2 + epsf)
                        smf[i] = m
                        svf[i] = rr
                        a = f2i(m) & 0x7FFFFFFF
                        am = max(am, a if a < 0x7F800000 else 0)
                        a = f2i(rr) & 0x7FFFFFFF
                        av = max(av, a if a < 0x7F800000 else 0)
                else:
                    for i in range(B):  # decode, the AdamW rule, the largest finite magnitudes
                        u = np.int32(along[i] + ph0)
                        mo = decm(np.int32(mcb[i]), (u >> SHM) & ((1 << (32 - SHM)) - 1) if DM else 0)
                        ro = decv(np.int32(vcb[i]), (u >> SHV) & ((1 << (32 - SHV)) - 1) if DV else 0)
                        gi = gb[i]
                        m = mo * km + gi * d1
                        v = ro * ro * kv + gi * gi * d2
                        rr = np.sqrt(v)
                        pb[i] = pb[i] * decay - stepsize * m / (rr * inv_bc2 + epsf)
                        smf[i] = m
                        svf[i] = rr
                        a = f2i(m) & 0x7FFFFFFF
                        am = max(am, a if a < 0x7F800000 else 0)
                        a = f2i(rr) & 0x7FFFFFFF
                        av = max(av, a if a < 0x7F800000 else 0)
                amf = i2f(am)
                avf = i2f(av)
                ma[b] = amf
                va[b] = avf
                sm = TOPM / amf if am > 0 else f32(0.0)
                sv = TOPV / avf if av > 0 else f32(0.0)
                if FOUR:
                    for k in range(H):
                        u = np.int32(along[k] + ph1)
                        u2 = np.int32(along[k + H] + ph1)
                        lo = encm(smf[k], sm, (u >> SHM) & ((1 << (32 - SHM)) - 1))
                        hi = encm(smf[k + H], sm, (u2 >> SHM) & ((1 << (32 - SHM)) - 1))
                        mcb[k] = np.uint8(lo | (hi << 4))
                        lo = encv(svf[k], sv, (u >> SHV) & ((1 << (32 - SHV)) - 1))
                        hi = encv(svf[k + H], sv, (u2 >> SHV) & ((1 << (32 - SHV)) - 1))
                        vcb[k] = np.uint8(lo | (hi << 4))
                else:
                    for i in range(B):
                        u = np.int32(along[i] + ph1)
                        mcb[i] = np.uint8(encm(smf[i], sm, (u >> SHM) & ((1 << (32 - SHM)) - 1)))
                        vcb[i] = np.uint8(encv(svf[i], sv, (u >> SHV) & ((1 << (32 - SHV)) - 1)))

    return step


def _state(f: Fmt, n: int, block: int):
    return np.zeros(n if f.bits == 8 else n // 2, np.uint8), np.zeros(n // block, np.float32)


def speed(n: int, reps: int, threads: int, cands: list[tuple[str, str, int]]) -> None:
    """Interleaved rounds: one step of each contender per round; medians."""
    import numba

    import adamkit

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen) * torch.logspace(-4, -1, n // 4096).repeat_interleave(4096)
    runs = {}
    widths = {F(fm).bits for fm, _, _ in cands}
    for label, kw in (("torch fused", None), ("adamkit 8-bit", 8), ("adamkit 4-bit", 4)):
        if kw is not None and kw not in widths:
            continue
        prm = torch.nn.Parameter(torch.randn(n, generator=gen) * 0.02)
        prm.grad = grad.clone()
        opt = torch.optim.AdamW([prm], fused=True) if kw is None else adamkit.AdamW([prm], state_bits=kw)
        runs[label] = opt.step
    for fm, fv, block in cands:
        f_m, f_v = F(fm), F(fv)
        kern = make_step(f_m, f_v, block)
        pa = (torch.randn(n, generator=gen) * 0.02).numpy()
        ga = grad.numpy().copy()
        mc, ma = _state(f_m, n, block)
        vc, va = _state(f_v, n, block)
        box = [0]

        def run(kern=kern, pa=pa, ga=ga, mc=mc, ma=ma, vc=vc, va=va, box=box):
            box[0] += 1
            kern(pa, ga, mc, ma, vc, va, 1e-3, 0.9, 0.999, 1e-8, 1e-2, box[0], threads * 8)

        runs[f"{f_m.bits}b: {fm} | {fv}"] = run
    for fn in runs.values():  # compile and warm up
        fn()
        fn()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            time.sleep(0.005)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(times["torch fused"], v)) for k, v in times.items()}
    for k in runs:
        ref = "adamkit 8-bit" if k.startswith("8b") else "adamkit 4-bit" if k.startswith("4b") else None
        vs = "" if ref is None else f"  {statistics.median(a / b for a, b in zip(times[ref], times[k])):.2f}x {ref}"
        print(
            f"{threads} thr  {base[k] * 1e3:8.2f} ms  {base[k] / n * 1e9:6.3f} ns/el  "
            f"{ratios[k]:.2f}x torch fused{vs}  {k}",
            flush=True,
        )


def check(cands: list[tuple[str, str, int]], n: int = 1 << 20, steps: int = 3) -> None:
    """The numba kernel against the torch model: same start, same gradients; fraction of
    codes that agree after each step (float rounding in the rule may differ by an ulp)."""
    for fm, fv, block in cands:
        f_m, f_v = F(fm), F(fv)
        kern = make_step(f_m, f_v, block)
        gen = torch.Generator().manual_seed(0)
        start = torch.randn(n, generator=gen) * 0.02
        prm = torch.nn.Parameter(start.clone())
        opt = ModelAdamW([prm], f_m, f_v, block)
        pa = start.numpy().copy()
        mc, ma = _state(f_m, n, block)
        vc, va = _state(f_v, n, block)
        for t in range(1, steps + 1):
            g = torch.randn(n, generator=gen) * torch.logspace(-4, -1, n // 4096).repeat_interleave(4096)
            prm.grad = g
            opt.step()
            kern(pa, g.numpy(), mc, ma, vc, va, 1e-3, 0.9, 0.999, 1e-8, 1e-2, t, 8)
            out = []
            for codes, st in ((mc, opt.state[prm]["m"]), (vc, opt.state[prm]["v"])):
                c = torch.from_numpy(codes).long()
                if f_m.bits == 4:
                    c = torch.cat([c.view(-1, block // 2) & 15, c.view(-1, block // 2) >> 4], dim=1).reshape(-1)
                out.append(float((c == st[0]).double().mean()))
            dp = float((torch.from_numpy(pa) - prm.detach()).abs().max())
            print(f"step {t}: codes equal m {out[0]:.6f} v {out[1]:.6f}; max |param diff| {dp:.2e}  {fm} | {fv}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["accuracy", "speed", "check"])
    ap.add_argument("--n", type=int, default=1 << 24)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--only", nargs="*", default=())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--cand",
        action="append",
        default=[],
        help="'FM|FV|BLOCK' (as F() reads them, '-': fp32): replaces CANDIDATES (speed, check), "
        "the only combos run (accuracy)",
    )
    ap.add_argument("--no-peers", action="store_true", help="accuracy: skip the adamkit baselines")
    ap.add_argument(
        "--workload",
        choices=["rows", "wide", "outliers"],
        default="rows",
        help="accuracy: gradient scales per row (bench's), spread within every block, or per row with 100x outliers",
    )
    a = ap.parse_args()
    cands = [tuple(None if w == "-" else w for w in c.split("|")[:2]) + (int(c.split("|")[2]),) for c in a.cand]
    if a.what == "accuracy":
        accuracy(only=a.only or ([] if not cands else ["\0"]), peers=not a.no_peers, extra=cands, workload=a.workload)
    elif a.what == "speed":
        speed(a.n, a.reps, a.threads, cands or CANDIDATES)
    else:
        check(cands or CANDIDATES)
