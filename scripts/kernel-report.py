"""What the Triton kernels cost on an H100/H200 (sm_90), read off the compiler without a
GPU: per variant, ptxas' registers per thread and spills, the resident warps per SM
they allow, and the SASS instructions per element along a whole tile's path (the
unmasked, vectorized one every full tile takes), loads among them.

    python scripts/kernel-report.py        # needs triton (the test extra); no GPU

The counts are static: the main path up to its exit, the few instructions that set up
a division's or square root's rare slow-path call included. A proxy for the step's
issue cost, not a timing: an H100 issues about 4 warp instructions per SM per cycle,
so at ~1.8 GHz and 132 SMs, 100 instructions per element is ~300 G elements/s, about
what 3 TB/s moves at 10 bytes per element.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from compile_sm90 import DENSE, QUANT, TARGET, options, resources  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import adamkit.kernels.cuda.triton_kernels as tc  # noqa: E402

REGS_PER_SM, MAX_WARPS = 65536, 64


@triton.jit
def _dense_full(meta, work, scal, consts, count, amp,
                P: tl.constexpr, S: tl.constexpr, W: tl.constexpr, RULE: tl.constexpr, AMSGRAD: tl.constexpr,
                MASK: tl.constexpr, SR: tl.constexpr, FTZ: tl.constexpr, SCALED: tl.constexpr,
                BLOCK: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """``_dense_kernel``'s whole-block branch alone."""
    w = tl.program_id(0)
    t = tl.load(work + 2 * w)
    start = tl.multiple_of(tl.load(work + 2 * w + 1), BLOCK)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    tc._dense_body(meta + t * 10, t, offs, tc._go(amp + 1, offs, SCALED), scal, consts, count, amp, P, S, W, RULE,
                   AMSGRAD, MASK, SR, FTZ, SCALED, ALIGNED)  # fmt: skip


@triton.jit
def _quant_full(meta, work, scal, consts, books, count, amp, block, tops,
                P: tl.constexpr, RULE: tl.constexpr, AMSGRAD: tl.constexpr, MASK: tl.constexpr,
                SR: tl.constexpr, SCALED: tl.constexpr, BITS: tl.constexpr, ROOT: tl.constexpr,
                ROWS: tl.constexpr, E: tl.constexpr, TILES: tl.constexpr, ALIGNED: tl.constexpr,
                PASS: tl.constexpr):  # fmt: skip
    """``_quant_kernel`` on a work item of whole tiles: its prologue, then the whole-tile
    branch TILES times (unrolled, so that static counts are the item's)."""
    w = tl.program_id(0)
    t = tl.load(work + 2 * w)
    row = meta + t * 10
    first = tl.load(work + 2 * w + 1)
    ptrs = (tc._ptr(row, 2, P, ALIGNED), tc._ptr(row, 3, P, ALIGNED), tc._ptr(row, 4, tl.uint8, ALIGNED),
            tc._ptr(row, 5, tl.float32), tc._ptr(row, 6, tl.uint8, ALIGNED), tc._ptr(row, 7, tl.float32),
            tc._ptr(row, 8, tl.uint8, ALIGNED), tc._ptr(row, 9, tl.float32))  # fmt: skip
    scal_row = scal + tc.SCALARS * t
    s = (tl.load(scal_row).to(tl.float32), tl.load(scal_row + 1).to(tl.float32),
         tl.load(scal_row + 2).to(tl.uint32), tl.load(scal_row + 3).to(tl.uint32),
         tl.load(row + 1).to(tl.uint32), tl.load(scal_row + 4).to(tl.float32))  # fmt: skip
    c = tc._consts(consts, tl.float32)
    go = tc._go(amp + 1, tl.arange(0, ROWS), SCALED)
    cols = tl.arange(0, E).to(tl.int64)
    pairs = tl.arange(0, E * BITS // 8).to(tl.int64)
    bad = tl.zeros([ROWS, E], tl.int32)
    for i in tl.static_range(TILES):
        blk = first + i * ROWS + tl.arange(0, ROWS).to(tl.int64)
        bad += tc._quant_body(ptrs, s, c, blk, go, blk[:, None] * E + cols[None, :],
                              tl.broadcast_to(go[:, None], [ROWS, E]), blk[:, None] * (E * BITS // 8) + pairs[None, :],
                              tl.broadcast_to(go[:, None], [ROWS, E * BITS // 8]), books, amp, tops, P, RULE,
                              AMSGRAD, MASK, SR, SCALED, BITS, ROOT, ROWS, E, PASS)  # fmt: skip
    if MASK:
        total = tl.sum(tl.sum(bad, axis=1), axis=0)
        tl.atomic_add(count, total, mask=total > 0, sem="relaxed")


def _compile(fn, args: dict, const: dict):
    signature = {**args, **{k: "constexpr" for k in const}}
    src = ASTSource(fn=fn, signature=signature, constexprs=const)
    return triton.compile(src, target=TARGET, options=options(fn))


def _sass(cubin: bytes) -> list[str]:
    """The main path's instructions (up to the first EXIT)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([str(nvdisasm), "-c", path], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", text, re.M)
    return ops[: ops.index("EXIT") + 1] if "EXIT" in ops else ops


def _row(name: str, fn, args: dict, const: dict, elements: int) -> list[str]:
    full = _compile(fn, args, const)
    whole = {"_dense_full": tc._dense_kernel, "_quant_full": tc._quant_kernel}[fn.__name__]
    regs, spilled = resources(_compile(whole, args, const).asm["ptx"])
    ops = _sass(full.asm["cubin"])
    per_program = options(fn)["num_warps"]
    per_thread = elements / (32 * per_program)
    warps = min(MAX_WARPS, REGS_PER_SM // (32 * (-(-regs // 8) * 8)) // per_program * per_program)
    loads = sum(op.startswith("LDG") for op in ops)
    return [name, str(regs), str(spilled), str(warps), f"{len(ops) / per_thread:.0f}", f"{loads / per_thread:.1f}"]


def main() -> None:
    T = {"fp32": tl.float32, "bf16": tl.bfloat16}
    title = f"Triton kernels on sm_90 (warps per program: dense {tc.DENSE_WARPS}, quantized {tc.QUANT_WARPS}, "
    table = Table(title=title + f"at most {tc.QUANT_MAXNREG} registers; static, from ptxas and nvdisasm)")
    for col in ("variant", "registers", "spilled bytes", "warps / SM", "SASS / element", "loads / element"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for p, s, algo, label in [("fp32", "fp32", 0, "AdamW"), ("fp32", "fp32", 1, "Adam amsgrad"),
                              ("bf16", "bf16", 0, "AdamW")]:  # fmt: skip
        const = dict(P=T[p], S=T[s], W=tl.float32, RULE="adam", AMSGRAD=algo == 1, MASK=True, SR=False,
                     FTZ=s == "bf16", SCALED=False, BLOCK=tc.BLOCK, ALIGNED=True)  # fmt: skip
        table.add_row(*_row(f"dense {p} params, {s} state, {label}", _dense_full, DENSE, const, tc.BLOCK))
    for bits, algo, label in [(8, 0, "AdamW"), (8, 1, "Adam amsgrad"), (4, 0, "AdamW")]:
        width = 256 if bits == 8 else 128
        const = dict(P=tl.float32, RULE="adam", AMSGRAD=algo == 1, MASK=True, SR=False, SCALED=False, BITS=bits,
                     ROOT=bits == 4, ROWS=max(1, tc.QUANT_TILE // width), E=width, TILES=tc.QUANT_TILES, PASS=0,
                     ALIGNED=True)  # fmt: skip
        tile = const["ROWS"] * width * tc.QUANT_TILES
        table.add_row(*_row(f"{bits}-bit state, fp32 params, {label}", _quant_full, QUANT, const, tile))
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
