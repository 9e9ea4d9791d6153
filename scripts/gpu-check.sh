#!/usr/bin/env bash
# The GPU checks as one command on a machine with a CUDA GPU (allow ~590 s: the tests
# compile every kernel variant they use first). In order of importance, each
# with its own time limit (at most 560 s in all): the CUDA kernel tests, the paged
# state and offload tests, the bench, the offload bench, the launch-settings sweep.
# That machine's python3 has torch (CUDA), triton, numba and rich; adamkit runs from
# the checkout. Wheels carried in wheels/ (cuda-bindings for paged state, torchao and
# bitsandbytes for the peers) are installed first, without dependencies.
# Results land in $OUT: the tests' logs, the CUDA benches and the sweep (JSON).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out="${OUT:-/tmp/adamkit-gpu}"
mkdir -p "$out"
if compgen -G "wheels/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-deps --no-index wheels/*.whl 2>&1 | tail -3
fi
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
# the compiled kernels against the reference on the GPU, and a CUDA-graph capture;
# in 4 processes where pytest-xdist is there (the image has it), so that the kernel
# variants (~50) compile side by side
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n 4)
timeout 200 python3 -m pytest -q "${workers[@]}" -m cuda tests/kernels/cuda/test_triton.py 2>&1 | tee "$out/tests-cuda.log"
# paged state in CUDA managed memory, and CPU offload with real copies (and torchao's)
timeout 60 python3 -m pytest -q -m cuda tests/optim/test_paged.py tests/test_offload.py 2>&1 | tee "$out/tests-offload.log"
# adamkit vs torch fused/foreach (and bitsandbytes, when its wheel was carried) on the
# GPU; not torch's for-loop, which takes seconds per step on 20,000 tensors
opts=("adamkit" "adamkit state_bits=16" "adamkit 8-bit" "adamkit 4-bit" "torch fused" "torch foreach")
if python3 -c "import bitsandbytes" 2>/dev/null; then
    opts+=("bitsandbytes AdamW8bit" "bitsandbytes AdamW32bit")
fi
timeout 150 python3 -m adamkit bench --device cuda --no-compile --no-accuracy --reps 20 \
    --optimizers "${opts[@]}" --json "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.log"
# offloaded AdamW on GPT-2 small's parameters: adamkit.CPUOffload (32/8/4 bits) against
# torchao's CPUOffloadOptimizer with torch's fused AdamW (when its wheel was carried)
timeout 70 python3 -m adamkit bench --offload --reps 5 --json "$out/bench-offload.json" 2>&1 | tee "$out/bench-offload.log"
# the kernels' launch settings, timed (scripts/tune-cuda.py; its table says what to set)
timeout 80 python3 scripts/tune-cuda.py --budget 60 --json "$out/tune-cuda.json" 2>&1 | tee "$out/tune-cuda.log"
