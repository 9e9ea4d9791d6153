"""Compile the Triton kernels for an H100/H200 (sm_90) with Triton's real compiler,
no GPU needed, and check their PTX and ptxas' resource report: what the interpreter
cannot show (front-end rules, lowering, rounding modes, vector accesses, register
spills). Run by ``test_triton.py`` in a process without TRITON_INTERPRET; prints one
line per problem and exits non-zero if there is any."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import adamkit.kernels.cuda.triton_kernels as tc  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
T = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
DENSE = {"meta": "*i64", "work": "*i64", "scal": "*fp64", "consts": "*fp64", "count": "*i32", "amp": "*fp32"}
QUANT = {**{k: v for k, v in DENSE.items() if k != "amp"}, "books": "*fp32", "amp": "*fp32", "block": "i32",
         "tops": "*i32"}  # fmt: skip
APPROXIMATE = ("div.full", "div.approx", "sqrt.approx", "rsqrt.approx")


def options(fn) -> dict:
    """The compiler options the launchers give ``fn`` (warps, register cap)."""
    if fn is tc._quant_kernel or "quant" in fn.__name__:
        return {"enable_fp_fusion": False, "num_warps": tc.QUANT_WARPS, **tc._maxnreg()}
    return {"enable_fp_fusion": False, "num_warps": tc.DENSE_WARPS}


def build(fn, args: dict, const: dict) -> str:
    signature = {**args, **{k: "constexpr" for k in const}}
    src = ASTSource(fn=fn, signature=signature, constexprs=const)
    return triton.compile(src, target=TARGET, options=options(fn)).asm["ptx"]


def resources(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes spilled) of ``ptx`` for sm_90, from Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True, check=True)  # fmt: skip
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    assert regs and spills, done.stderr
    return int(regs.group(1)), int(spills.group(1))


def checked(name: str, ptx: str) -> list[str]:
    """Problems every variant must not have: approximate division or square root, and
    register spills (local memory traffic in a memory-bound step)."""
    problems = [f"{name}: {op}" for op in APPROXIMATE if op in ptx]
    regs, spilled = resources(ptx)
    if spilled:
        problems.append(f"{name}: {spilled} bytes of registers spilled ({regs} registers)")
    return problems


def main() -> int:
    problems = []
    variants = 0
    for (p, s), (algo, mask, sr, scaled) in itertools.product(
        [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"), ("fp64", "fp64")],
        [("adam", True, False, False), ("amsgrad", True, False, True), ("adamax", False, True, False),
         ("nadam", True, False, True)],
    ):  # fmt: skip
        rule = "adam" if algo == "amsgrad" else algo
        const = dict(P=T[p], S=T[s], W=T["fp64" if p == "fp64" else "fp32"], RULE=rule, AMSGRAD=algo == "amsgrad",
                     MASK=mask, SR=sr and p == "bf16", FTZ=s == "bf16", SCALED=scaled, BLOCK=tc.BLOCK,
                     ALIGNED=True)  # fmt: skip
        ptx = build(tc._dense_kernel, DENSE, const)
        variants += 1
        problems += checked(f"dense {p}/{s} algo {algo}", ptx)
        wide = ("v2.b64", "v2.f64") if p == "fp64" else ("v4",)  # full blocks: 16-byte accesses
        if not any(f"ld.global.{w}" in ptx for w in wide) or not any(f"st.global.{w}" in ptx for w in wide):
            problems.append(f"dense {p}/{s} algo {algo}: no 16-byte loads and stores")
        if p != "fp64" and "div.rn.f32" not in ptx:
            problems.append(f"dense {p}/{s} algo {algo}: no correctly rounded division")
    for bits, (p, algo, scaled, sr) in itertools.product(
        (8, 4),
        [("fp32", "adam", False, False), ("bf16", "amsgrad", True, True), ("fp16", "adamax", False, False),
         ("bf16", "nadam", True, False)],
    ):  # fmt: skip
        width = 256 if bits == 8 else 128
        rule = "adam" if algo == "amsgrad" else algo
        const = dict(P=T[p], RULE=rule, AMSGRAD=algo == "amsgrad", MASK=True, SR=sr, SCALED=scaled, BITS=bits,
                     ROOT=bits == 4 and algo != "adamax", ROWS=tc.QUANT_TILE // width, E=width,
                     TILES=tc.QUANT_TILES, PASS=0, ALIGNED=True)  # fmt: skip
        ptx = build(tc._quant_kernel, QUANT, const)
        variants += 1
        name = f"quant {bits} bits {p} algo {algo}"
        problems += checked(name, ptx)
        if "ld.global.nc.b32" not in ptx:  # the codebooks' lookups (_gather), not Triton's 2-D gathers
            problems.append(f"{name}: table lookups not by _gather's ld.global.nc")
        wide = ("v4",) if p == "fp32" else ("v2", "v4")  # whole tiles: 4 or more elements per access
        if not any(f"ld.global.{w}" in ptx for w in wide) or not any(f"st.global.{w}" in ptx for w in wide):
            problems.append(f"{name}: parameters not loaded and stored 4 elements at a time")
    for step_pass in (1, 2):  # one absmax per tensor (block_wise=False): two launches
        const = dict(P=T["fp32"], RULE="adam", AMSGRAD=True, MASK=True, SR=False, SCALED=True, BITS=8, ROOT=False,
                     ROWS=tc.QUANT_TILE // 256, E=256, TILES=tc.QUANT_TILES, ALIGNED=True, PASS=step_pass)  # fmt: skip
        variants += 1
        problems += checked(
            f"quant 8 bits, one absmax per tensor, pass {step_pass}", build(tc._quant_kernel, QUANT, const)
        )
    for line in problems:
        print(line)
    print(f"{variants} kernel variants compiled for sm_90, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
