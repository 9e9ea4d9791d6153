"""The CPU kernels' SIMD code (``adamkit/kernels/cpu``: ``_simd.py``, ``_avx2_*.py``,
``_avx512_*.py``) against the numba loops and the numpy models it replaces, bit for
bit; the levels below this CPU's (``ADAMKIT_SIMD``) and an AVX-512 target built in
fresh processes; Numba's disk cache (``_cache.py``) keyed on every kernel source and
the SIMD setting."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers import ROOT, fast_share
from quant_helpers import encoder_probe

import adamkit
from adamkit.quant import codebook

_CARRIER = {"f32": np.float32, "bf16": np.uint16, "f16": np.int16}


def _carried(values: torch.Tensor, kind: str) -> np.ndarray:
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    x = values.to(dtype)
    return (x if kind == "f32" else x.view(torch.int16)).numpy().view(_CARRIER[kind]).copy()


# ------------------------------------------------------------ in this process
STREAM_KINDS = [("f32", "f32"), ("f32", "bf16"), ("f32", "f16"), ("bf16", "f32"), ("bf16", "bf16"), ("f16", "f16")]
STREAM_IDS = [f"{p}-{s}" for p, s in STREAM_KINDS]


# each case compiles its loops afresh (seconds): the fast tier runs fp32 and bf16 throughout
@pytest.mark.parametrize("pkind,skind", fast_share(STREAM_KINDS, STREAM_IDS, keep={"f32-f32", "bf16-bf16"}))
def test_avx2_stream_is_bit_identical_to_the_numba_loop(pkind: str, skind: str) -> None:
    """The explicit AVX2 loop of Adam/AdamW's 32/16-bit state (``_avx2_adam.adam_stream``)
    against the numba loop it replaces on AVX2 CPUs, bit for bit: both lerp forms,
    maximize and L2, values from 1e-45 to 1e38 (bf16 state flushes subnormals), NaN,
    ±inf and negative second moments (what ``mask_nonfinite=False`` lets through)."""
    from numba import njit

    from adamkit.kernels.cpu import dense as numba_cpu
    from adamkit.kernels.cpu._avx2_adam import adam_stream

    if not numba_cpu.STREAM:
        pytest.skip("the AVX2 loop runs only where AVX2 is the SIMD in use")

    @njit(error_model="numpy")
    def both(p, g, m, v, p2, m2, v2, k):
        low, c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv = k
        done = adam_stream(p.ctypes.data, g.ctypes.data, m.ctypes.data, v.ctypes.data, p.size // 8, low, c1, b2, b2w,
                           eps, decay, l2, gsign, lr_t, inv, p, m)  # fmt: skip
        sc = (low, c1, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, False, lr_t * 0)
        numba_cpu._adam_loop(p2, g, m2, v2, v2, 0, sc, numba_cpu._U(0), False, False)
        return done

    gen = torch.Generator().manual_seed(0)
    n = 8 * 600

    def values(low: int, high: int) -> torch.Tensor:
        scale = torch.pow(10.0, torch.randint(low, high, (n,), generator=gen).double()).float()
        x = torch.randn(n, generator=gen) * scale
        x[torch.randint(0, n, (20,), generator=gen)] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])[
            torch.randint(0, 4, (20,), generator=gen)
        ]  # fmt: skip
        return x

    f32 = np.float32
    for low, c1, l2, gsign in ((True, 0.1, 0.0, 1.0), (False, -0.4, 0.01, -1.0)):
        k = (low, f32(c1), f32(0.999), f32(0.001), f32(1e-8), f32(0.99), f32(l2), f32(gsign), f32(1e-3), f32(31.6))
        p, g = _carried(values(-3, 3), pkind), _carried(values(-45, 38), pkind)
        m, v = _carried(values(-45, 38), skind), _carried(values(-45, 38).abs(), skind)
        v[:40] = _carried(-values(-3, 3)[:40].abs(), skind)
        p0, p2, m2, v2 = p.copy(), p.copy(), m.copy(), v.copy()
        assert both(p, g, m, v, p2, m2, v2, k) == n // 8
        for a, b in ((p, p2), (m, m2), (v, v2)):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert (p.view(np.uint8) != p0.view(np.uint8)).mean() > 0.5  # the parameters did move


@pytest.mark.skipif(adamkit.kernels.cpu._simd.ISA is None, reason="the CPU has neither AVX-512 nor AVX2")
@pytest.mark.parametrize("name", ["dynamic8", "udynamic8"])
def test_simd_encoders(name: str) -> None:
    """The 8-bit SIMD row encoders (AVX-512's and AVX2's decade encoders, the tables
    looked up differently) equal their numpy model bit for bit; AVX-512's unsigned one
    also gives values above 0 code 1 at least (tiny ones, the model's code 0, included)."""
    from numba import njit

    from adamkit.kernels.cpu import _simd
    from adamkit.quant.codebooks import decade_encode, decade_tables

    encoder = _simd.encode_rows_m8 if name == "dynamic8" else _simd.encode_rows_v8

    @njit
    def run(y, table, codes):
        encoder(y.ctypes.data, y.size // _simd.LANES, np.float32(1.0), table.ctypes.data, codes.ctypes.data)

    def model(y):
        codes = decade_encode(y, decade_tables(name))
        floored = name == "udynamic8" and _simd.FLOORED8
        return np.maximum(codes, (y > 0).astype(np.uint8)) if floored else codes

    y = encoder_probe(name)
    lanes = _simd.LANES  # the ISA in use: 8 with AVX2, 16 with AVX-512
    whole = y.size // (4 * lanes) * (4 * lanes)
    for size in (whole, whole - lanes):  # pairs of vectors (the AVX2 encoder's unit), and an odd vector
        codes = np.zeros(size, dtype=np.uint8)
        run(y[:size], _simd.encoder_constants[name](), codes)
        np.testing.assert_array_equal(codes, model(y[:size]))
    odd = [np.nan, -np.nan, np.inf, -np.inf, 1.0000001, -1.0000001, 1.9, -0.0, 1e-7, 3e-8, 1e-30, 1e-45, -1e-9, 0.0]
    odd = np.array(odd * 2, dtype=np.float32)[:16]
    odd = odd if codebook(name).signed else np.abs(odd)
    codes = np.zeros(odd.size, dtype=np.uint8)
    run(odd, _simd.encoder_constants[name](), codes)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(codes, model(odd))
        if name == "udynamic8" and _simd.FLOORED8:  # the floor is exercised: the model's code 0 became 1
            assert ((decade_encode(odd, decade_tables(name)) == 0) & (codes == 1)).sum() >= 3


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "packed"])
@pytest.mark.parametrize("name", ["tapered8", "utapered8"])
def test_tapered_row_encoders(name: str, simd: bool) -> None:
    """The tapered maps' row encoders, AVX-512's (shift, bias and offset from the
    exponent) and the packed search-free table's (AVX2, portable), give the binary
    search's codes bit for bit; the unsigned one with AVX-512 also gives values above 0
    code 1 at least; non-finite and out-of-range inputs still get a code."""
    from numba import njit

    from adamkit.kernels.cpu import _simd
    from adamkit.kernels.cpu import quantized as nq
    from adamkit.quant.codebooks import encoder_table

    if simd and not _simd.TAPERED8:
        pytest.skip("the tapered SIMD encoder needs AVX-512")
    encoder = _simd.encode_rows_tm8 if name == "tapered8" else _simd.encode_rows_tv8
    table = _simd.encoder_constants[name]() if simd else encoder_table(name)[0]

    if simd:

        @njit
        def run(y, table, codes):
            encoder(y.ctypes.data, y.size // 16, np.float32(1.0), table.ctypes.data, codes.ctypes.data)

    else:

        @njit
        def run(y, table, codes):
            nq._packed8(y.ctypes.data, y.size // nq.LANES, np.float32(1.0), table.ctypes.data, codes.ctypes.data)

    book = codebook(name)
    y = encoder_probe(name)
    y = y[: y.size // 64 * 64]
    codes = np.zeros(y.size, dtype=np.uint8)
    run(y, table, codes)
    want = np.searchsorted(book.midpoints.numpy(), y, side="left")
    if simd and not book.signed:  # the floor
        want = np.maximum(want, (y > 0).astype(np.int64))
    np.testing.assert_array_equal(codes, want)
    odd = [np.nan, -np.nan, np.inf, -np.inf, 1.0000001, -1.0000001, 1.9, -0.0, 1e-7, 3e-8, 1e-30, 1e-45, -1e-9, 0.0]
    odd = np.array(odd * 2, dtype=np.float32)[:16]
    odd = odd if book.signed else np.abs(odd)
    codes = np.full(odd.size, 77, dtype=np.uint8)
    run(odd, table, codes)
    finite = np.isfinite(odd) & (np.abs(odd) <= 1)
    expect = np.searchsorted(book.midpoints.numpy(), odd[finite], side="left")
    if not book.signed:
        expect = np.maximum(expect, (odd[finite] > 0).astype(np.int64)) if simd else expect
    np.testing.assert_array_equal(codes[finite], expect)


@pytest.mark.parametrize(
    "name,features,expected",
    [
        ("skylake-avx512", "", False),  # the named CPU's own features: no VBMI
        ("znver4", "", True),
        ("icelake-server", "", True),
        ("x86-64-v4", "", False),
        ("znver4", "+avx512f,-avx512vbmi", False),  # an explicit features string decides
        ("skylake-avx512", "+avx512f,+avx512vbmi", True),
        (None, "+avx2,-avx512vbmi", False),
    ],
)
def test_byte_planes_follow_numbas_target(name, features, expected, monkeypatch) -> None:
    """The byte-plane decoder is compiled only for a target with AVX512-VBMI, whatever the
    host has: ``NUMBA_CPU_FEATURES`` when set, else the CPU ``NUMBA_CPU_NAME`` names (LLVM
    aborts the process on ``vpermi2b`` for a target without it)."""
    from numba.core import config

    from adamkit.kernels.cpu._avx512_codes import _target_has_vbmi

    monkeypatch.setattr(config, "CPU_NAME", name)
    monkeypatch.setattr(config, "CPU_FEATURES", features)
    assert _target_has_vbmi() is expected


@pytest.mark.skipif(not adamkit.kernels.cpu._simd.PLANES8, reason="the CPU has no AVX512-VBMI")
@pytest.mark.parametrize("name", ["dynamic8", "udynamic8"])
def test_byte_plane_decoder_is_a_table_lookup(name: str) -> None:
    """``decode_rows8_planes`` gives ``values[codes]`` bit for bit: every code at every
    position of a 64-code group (the byte order and the two rounds of interleaving), and
    a run of random codes with NaN and subnormal bits planted in the table; scaled (and
    squared), ``decode_rows8``'s gathers bit for bit."""
    import numba

    from adamkit.kernels.cpu._avx512_codes import (
        decode_rows8,
        decode_rows8_planes,
        decode_rows8_planes_scaled,
        plane_table,
    )
    from adamkit.quant import encoder_table

    @numba.njit
    def run(codes, planes, out):
        decode_rows8_planes(codes.ctypes.data, codes.size // 64, planes.ctypes.data, out.ctypes.data)

    @numba.njit
    def scaled(codes, planes, values, scale, root, out, twin):
        n = codes.size
        decode_rows8_planes_scaled(codes.ctypes.data, n // 64, planes.ctypes.data, scale, root, out.ctypes.data)
        decode_rows8(codes.ctypes.data, n // 16, values.ctypes.data, scale, root, twin.ctypes.data)

    values = np.ascontiguousarray(encoder_table(name)[2], dtype=np.float32)
    planted = values.copy()
    planted.view(np.uint32)[[0, 77, 128, 255]] = [0x7FC01234, 0x00000001, 0x80000000, 0xFF800000]
    rng = np.random.default_rng(0)
    shifted = (np.arange(64 * 256) + np.repeat(np.arange(256), 64)) % 256  # code c at every position
    for table, codes in ((values, shifted), (planted, rng.integers(0, 256, 64 * 1000))):
        codes = codes.astype(np.uint8)
        out = np.full(codes.size, np.nan, dtype=np.float32)
        run(codes, plane_table(table), out)
        np.testing.assert_array_equal(out.view(np.uint32), table[codes].view(np.uint32))
        for scale, root in ((np.float32(0.37), False), (np.float32(3e-20), True)):  # the gathers' decode_rows8
            twin = np.full(codes.size, np.nan, dtype=np.float32)
            scaled(codes, plane_table(table), table, scale, root, out, twin)
            np.testing.assert_array_equal(out.view(np.uint32), twin.view(np.uint32))


@pytest.mark.skipif(not adamkit.kernels.cpu._simd.SIMD, reason="the CPU has neither AVX-512 nor AVX2")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "cls,kw",
    [
        (adamkit.AdamW, {}),
        (adamkit.Adam, dict(weight_decay=0.1, maximize=True, betas=(0.3, 0.99))),
        (adamkit.AdamW, dict(quant_map="tapered")),
    ],
    ids=["AdamW", "Adam-max", "AdamW-tapered"],
)
def test_simd_blocks_equal_numba_loop(cls, kw, bits, dtype, monkeypatch) -> None:
    """Blocks through the SIMD block loop (``_avx512_adam`` or ``_avx2_quant``: decode,
    update and store in one loop) give the numba loop's parameters, codes and absmax bit
    for bit (AVX-512's division by a refined reciprocal included), masked NaN/±inf
    gradients too (blocks holding one take the masked loop, the others the plain one).
    With AVX512-VBMI, 8-bit blocks of a multiple of 64 elements are decoded from byte
    planes first, the others (the 48-element last block of the first size) by gathers."""
    from adamkit.kernels.cpu import _simd
    from adamkit.kernels.cpu import quantized as numba_quant

    if bits == 4 and not _simd.FUSED4:
        pytest.skip("no 4-bit SIMD block loop with this ISA (AVX2: the numba loop is faster)")

    sizes = [4096 + 48, 4097, 70_001]
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    simd, loop = (cls(ps, state_bits=bits, min_quant_size=0, **kw) for ps in (params, twins))
    for step in range(6):
        for i, (p, q) in enumerate(zip(params, twins)):
            g = (torch.randn(p.shape, generator=gen) * 10.0 ** (i - 2)).to(dtype)
            if step % 2:
                g[[5, 300, 4100 % p.numel()]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        with pytest.warns(RuntimeWarning, match="non-finite") if step == 1 else contextlib.nullcontext():
            monkeypatch.setattr(numba_quant, "FUSED_BLOCKS", True)
            simd.step()
            monkeypatch.setattr(numba_quant, "FUSED_BLOCKS", False)
            loop.step()
        assert simd.nonfinite_count == loop.nonfinite_count == 9 * ((step + 1) // 2)
        for p, q in zip(params, twins):
            assert torch.equal(p, q)
            for key, value in simd.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(loop.state[q][key])), key


@pytest.mark.skipif(not adamkit.kernels.cpu._avx512_codes.HAS_AVX512, reason="the CPU has no AVX-512")
def test_simd_division_correctly_rounded() -> None:
    """``_avx512_adam._divide`` (``vrcp14ps``, a Newton step, a residual correction)
    equals float32 division on 4M quotients spread over 10^±30."""
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from adamkit.kernels.cpu._avx512_adam import _divide
    from adamkit.kernels.cpu._avx512_codes import _F16

    @intrinsic
    def divide_rows(typingctx, a_at, b_at, out_at, count):  # noqa: ARG001
        def codegen(context, builder, signature, args):
            a_at, b_at, out_at, count = args
            with cgutils.for_range(builder, count) as loop:
                off = builder.mul(loop.index, ir.Constant(count.type, 64))
                a, b = (
                    builder.load(builder.inttoptr(builder.add(x, off), _F16.as_pointer()), align=4)
                    for x in (a_at, b_at)
                )
                q = _divide(builder, a, b)
                builder.store(q, builder.inttoptr(builder.add(out_at, off), _F16.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64, types.int64, types.int64), codegen

    @njit
    def run(a, b, out):
        divide_rows(a.ctypes.data, b.ctypes.data, out.ctypes.data, a.size // 16)

    rng = np.random.default_rng(0)
    n = 1 << 22
    a = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    b = (rng.uniform(1, 2, n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)
    out = np.empty_like(a)
    run(a, b, out)
    np.testing.assert_array_equal(out, a / b)


# ------------------------- in fresh processes: other SIMD levels, an AVX-512 target, the cache
_SUBPROCESS = """
import sys, torch, adamkit
from adamkit.kernels.cpu import _simd
from adamkit.quant import QuantFormat, unpack
assert _simd.ISA == (None if sys.argv[1] == "none" else sys.argv[1]), _simd.ISA
for bits in (8, 4):
    gen = torch.Generator().manual_seed(bits)
    ps = [torch.randn(n, generator=gen).requires_grad_() for n in (4097, 300)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a = adamkit.AdamW(ps, state_bits=bits, min_quant_size=0, backend="numba")
    b = adamkit.AdamW(qs, state_bits=bits, min_quant_size=0, backend="reference")
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step(); b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        fmt = QuantFormat(bits, 256 if bits == 8 else 128)
        for key in ("exp_avg_codes", "exp_avg_sq_codes"):
            d = (unpack(a.state[p][key], fmt, p.numel()) - unpack(b.state[q][key], fmt, p.numel())).abs()
            assert int(d.max()) <= 1 and int(d.sum()) <= (0 if bits == 4 else 3), (bits, key, int(d.sum()))
print("subprocess ok")
"""


@pytest.mark.heavy
@pytest.mark.parametrize("simd", ["none", "avx2"])
def test_capped_simd_in_a_fresh_process(simd: str, tmp_path) -> None:
    """The portable scalar path (``ADAMKIT_SIMD=none``) and, on an AVX-512 CPU, the AVX2
    path (``ADAMKIT_SIMD=avx2``), each in a fresh process with its own Numba cache,
    against the reference."""
    import os
    import subprocess
    import sys

    from adamkit.kernels.cpu import _avx2_quant, _simd

    if simd == "avx2" and (not _avx2_quant.CPU_HAS_AVX2 or _simd.ISA == "avx2"):
        pytest.skip("the CPU has no AVX2" if not _avx2_quant.CPU_HAS_AVX2 else "this process runs AVX2 already")
    env = {**os.environ, "ADAMKIT_SIMD": simd, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _SUBPROCESS, simd], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "subprocess ok" in done.stdout


_AVX512_BUILD = """
import sys

import llvmlite.binding as ll

bf16 = sys.argv[1] == "1"
dtypes = sys.argv[2].split(",")
vbmi = sys.argv[3] == "1"
host = ll.get_host_cpu_features


def features():  # what adamkit reads to choose its SIMD code: an AVX-512 CPU's
    f = host()
    for name in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"):
        f[name] = True
    f["avx512bf16"] = bf16
    if vbmi:  # Zen 4's; without, the host's own: a VBMI host must still build for skylake-avx512
        f["avx512vbmi"] = True
    return f


ll.get_host_cpu_features = features

import numba
import torch

from adamkit._scalars import adam_scalars
from adamkit.kernels.cpu import _simd
from adamkit.kernels.cpu import dense as numba_cpu
from adamkit.kernels.cpu import quantized as numba_quant
from adamkit.quant import QuantFormat

assert _simd.ISA == "avx512" and numba_cpu.HW_BF16 == bf16, (_simd.ISA, numba_cpu.HW_BF16)
assert _simd.PLANES8 == vbmi, _simd.PLANES8
built = []


def build_only(kernel, args, n_units):  # compiled for the target CPU, never run
    kernel.compile(tuple(numba.typeof(a) for a in args))
    built.append((kernel, kernel.signatures[-1]))
    return [0]


numba_cpu.on_threads = build_only
s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, step=2.0)
n = 4096
for dtype in (getattr(torch, d) for d in dtypes):
    p, g = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    state = {k: [torch.zeros(n, dtype=dtype)] for k in ("exp_avg", "exp_avg_sq")}
    numba_cpu.adam_([p], [g], state, s, amsgrad=False, maximize=False, mask_nonfinite=True)
    for bits, tapered in ((8, False), (8, True), (4, False)):
        fmt = QuantFormat(bits, 256 if bits == 8 else 128, tapered=tapered)
        state = {}
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}_codes"] = [torch.zeros(fmt.code_bytes(n), dtype=torch.uint8)]
            state[f"{key}_absmax"] = [torch.zeros(fmt.blocks(n))]
        numba_quant.adam_quantized_([p], [g], state, s, fmt=fmt, amsgrad=False, maximize=False, mask_nonfinite=True)
for kernel, sig in built:
    assert "zmm" in kernel.inspect_asm(sig), kernel
print("built", len(built))
"""


@pytest.mark.heavy
@pytest.mark.parametrize(
    "cpu,bf16,dtypes,vbmi", [("znver4", True, "float32,bfloat16", True), ("skylake-avx512", False, "float32", False)]
)
def test_avx512_kernels_compile_for_an_avx512_cpu(cpu: str, bf16: bool, dtypes: str, vbmi: bool, tmp_path) -> None:
    """Where the CPU has no AVX-512 its code cannot run, but it must still build: a
    fresh process that reads the features of an AVX-512 CPU (AMD Zen 4's, with
    AVX512-BF16, and Intel's) compiles the fused kernels for it, 32-bit and quantized
    state (fp32 and bf16 parameters on Zen 4), with every AVX-512 intrinsic (the block
    loops, the row encoders and decoders; the byte-plane decoder with Zen 4's
    AVX512-VBMI, the gathers without it, even on a host that has it: the target named
    decides), without running them; their machine code
    uses zmm registers. On an AVX-512 CPU the other tests run this code."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ADAMKIT_SIMD": "auto", "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": "",
           "NUMBA_CACHE_DIR": str(tmp_path)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _AVX512_BUILD, str(int(bf16)), dtypes, str(int(vbmi))], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"built {4 * len(dtypes.split(','))}" in done.stdout


@pytest.mark.heavy
def test_edge_cases_under_every_instruction_set_below_this_cpus(tmp_path) -> None:
    """The non-finite and second-moment edge cases with the numba kernels under the
    SIMD levels below this CPU's (``ADAMKIT_SIMD``: AVX2 on an AVX-512 CPU, and the
    portable loops), each in a fresh process with its own Numba cache (sharing this
    one would replace its kernels: the cache is keyed on the SIMD level): pytest on a
    focused subset (AdamW and Adam at every state width; the rest of their tests runs at
    this CPU's level)."""
    import os
    import subprocess
    import sys

    from adamkit.kernels.cpu import _avx2_quant, _simd

    levels = {"avx512": ["avx2", "none"], "avx2": ["none"]}.get(_simd.ISA, [])
    if _simd.ISA == "avx512" and not _avx2_quant.CPU_HAS_AVX2:
        levels = ["none"]
    if not levels:
        pytest.skip("this process runs the portable loops already")
    subset = (  # the code the SIMD level changes: quantized state, and 32/16-bit Adam/AdamW (AVX2's loop)
        "(test_a_gradient_whose_moments_overflow and AdamW-numba and fp32) or (test_propagate_leaves and AdamW-numba)"
        " or (test_an_infinite_parameter and (AdamW-numba or Adam-numba)) or test_dither_encoders_take_any_float"
        " or ((test_kernels_match_reference_on_tiny or test_kernels_mask_nonfinite_like_reference)"
        " and (AdamW-8 or AdamW-4))"
    )
    files = [
        str(ROOT / "tests" / "optim" / "test_nonfinite.py"),
        str(ROOT / "tests" / "kernels" / "cpu" / "test_quantized.py"),
    ]
    for simd in levels:
        env = {**os.environ, "ADAMKIT_SIMD": simd, "NUMBA_CACHE_DIR": str(tmp_path / simd)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", subset, *files]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        assert done.returncode == 0, f"ADAMKIT_SIMD={simd}:\n{done.stdout[-3000:]}"
        assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-500:]


_CACHE_PROBE = """
import torch, adamkit
from adamkit.kernels.cpu import _cache
from adamkit.kernels.cpu import dense as numba_cpu
assert _cache.INSTALLED
p = torch.randn(5000)
p.grad = torch.randn(5000)
adamkit.Adam([p]).step()
stats = [d.stats for d in numba_cpu._KERNELS.values()]
print(sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
"""


@pytest.mark.heavy
def test_numba_cache_follows_every_kernel_source(tmp_path, monkeypatch) -> None:
    """Numba's on-disk cache of adamkit's kernels is keyed on all their sources and the
    SIMD setting (``adamkit.kernels.cpu._cache``), not only on the defining file: a second
    process loads the compiled kernel; one with another ``ADAMKIT_SIMD`` recompiles
    instead of running the other setting's machine code; and a change to a source the
    kernel file does not define changes the key."""
    import os
    import subprocess
    import sys

    from adamkit.kernels.cpu import _cache

    def run(simd: str) -> tuple[int, int]:
        env = {**os.environ, "ADAMKIT_SIMD": simd, "NUMBA_CACHE_DIR": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        hits, misses = map(int, done.stdout.split())
        return hits, misses

    assert run("auto") == (0, 1)  # compiled and saved
    assert run("auto") == (1, 0)  # loaded
    assert run("none") == (0, 1)  # another setting: compiled again, not loaded
    assert run("none") == (1, 0)
    # the key changes with a file the kernels do not live in (here the SIMD code), on a
    # copy of the sources
    import shutil

    copy = tmp_path / "adamkit"
    shutil.copytree(_cache._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_cache, "_PACKAGE", copy)
    try:
        _cache.digest.cache_clear()
        before = _cache.digest()
        for changed in ("kernels/cpu/_avx2_quant.py", "spec.py", "_scalars.py"):  # SIMD code, spec, RuleConsts
            source = copy / changed
            source.write_text(source.read_text() + "\n# changed\n")
            _cache.digest.cache_clear()
            assert _cache.digest() != before, changed
            before = _cache.digest()
    finally:
        monkeypatch.undo()
        _cache.digest.cache_clear()
