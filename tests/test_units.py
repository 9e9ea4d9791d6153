"""Small units: step scalars, the kernel registry, the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import adamkit
from adamkit import _memory
from adamkit._scalars import adam_scalars, adamax_scalars
from adamkit.kernels import _tables, reference
from adamkit.kernels.cpu import dense as numba_cpu
from adamkit.kernels.registry import resolve


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


def test_auto_resolution() -> None:
    for algorithm in ("adam", "adamax"):
        assert resolve(algorithm, "cpu", 32).fn is getattr(numba_cpu, f"{algorithm}_")
        assert resolve(algorithm, "cpu", 32, fused=False).fn is getattr(reference, f"{algorithm}_")
        assert resolve(algorithm, "meta", 32).backend == "reference"


def test_nonfinite_indices() -> None:
    ts = [
        torch.ones(3),
        torch.tensor([1.0, float("nan")]),
        torch.empty(0),
        torch.tensor([float("inf")], dtype=torch.float64),
    ]
    assert reference.nonfinite_indices(ts) == [1, 3]
    assert reference.nonfinite_indices([torch.tensor([3e38, 3e38])]) == []  # large but finite


@pytest.mark.parametrize("nonfinite", ["mask", "skip", "raise", "propagate"])
def test_reference_runs_on_the_meta_device(nonfinite: str) -> None:
    """The reference is pure torch: any device works, as far as its ops are implemented.
    Meta tensors have no values: the non-finite screening passes them (as torch, which
    steps meta parameters with ``fused=None``)."""
    p = torch.nn.Parameter(torch.zeros(4, device="meta"))
    p.grad = torch.zeros(4, device="meta")
    opt = adamkit.AdamW([p], nonfinite=nonfinite)
    opt.step()
    assert opt.state[p]["exp_avg"].device.type == "meta" and opt.state[p]["step"].item() == 1


def test_cli_demo_runs_and_agrees_with_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adamkit", "demo", "--steps", "30"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "OK: largest parameter difference from torch.optim" in out.stdout
    assert out.stdout.count("\n") >= 6


def test_bench_ratio_pairs_rounds_and_run_workload_reports_every_contender() -> None:
    from adamkit import bench

    # a slow spell (rounds 2-3) hits both contenders: paired ratios stay 2.0
    torch_times, ours = [2.0, 20.0, 30.0, 2.0, 2.0], [1.0, 10.0, 15.0, 1.0, 1.0]
    assert bench._paired_ratio(torch_times, ours) == 2.0
    chosen = [c for c in bench.contenders() if c.name in ("adamkit", "torch fused")]
    ticks = []
    results, bandwidth = bench.run_workload("small-2k", "fp32", 2, chosen, lambda: ticks.append(1))
    assert [r.optimizer for r in results] == ["adamkit", "torch fused"]
    assert len(ticks) == 3 * 3  # (reps + warm-up) x (contenders + roofline)
    assert bandwidth > 0
    for r in results:
        assert len(r.samples_ms) == 2 and r.median_ms > 0 and r.elements_per_s > 0
        assert r.vs_torch_fused is not None and r.vs_torch_fused > 0
    assert results[1].vs_torch_fused == 1.0


def test_bench_new_grads_gives_every_parameter_a_new_gradient_each_round(monkeypatch) -> None:
    """--new-grads: each round assigns new gradient tensors (alternating two sets)."""
    import dataclasses

    from adamkit import bench

    seen: list[list[int]] = []
    real_params = bench._params

    def spy(shapes, dtype, grads, device="cpu", channels_last=False):
        ps = real_params(shapes, dtype, grads, device, channels_last)
        seen.append(ps)
        return ps

    monkeypatch.setattr(bench, "_params", spy)
    ids_per_step: list[list[int]] = []

    def spying(make):
        def make_spy(ps):
            opt = make(ps)
            step = opt.step

            def stepped():
                ids_per_step.append([id(p.grad) for p in ps])
                return step()

            opt.step = stepped
            return opt

        return make_spy

    chosen = [
        dataclasses.replace(c, make=spying(c.make)) for c in bench.contenders() if c.name in ("adamkit", "torch fused")
    ]
    results, _ = bench.run_workload("small-2k", "fp32", 2, chosen, lambda: None, new_grads=True)
    assert len(results) == 2 and len(seen) == 2
    adamkit_steps = ids_per_step[0::2]
    assert adamkit_steps[0] != adamkit_steps[1] and adamkit_steps[0] == adamkit_steps[2]  # two sets, alternating
    assert set(adamkit_steps[0]).isdisjoint(adamkit_steps[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_bench_on_cuda_without_a_gpu_says_so() -> None:
    from adamkit import bench

    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--quick", "--device", "cuda"])


def test_bench_plot_without_matplotlib_says_so_before_timing(monkeypatch) -> None:
    import sys

    from adamkit import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    timed = []
    monkeypatch.setattr(bench, "run_workload", lambda *a, **k: timed.append(a) or ([], 1.0))
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench.main(["--quick", "--plot", "x.png"])
    assert not timed


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


def test_huge_pages_can_be_switched_off() -> None:
    code = "from adamkit import _memory; print(_memory._madvise is None)"
    env = {**os.environ, "ADAMKIT_HUGE_PAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(
    "numels", [[16_777_216], [1000] * 20_000, [5], [40_000, 10, 70_000, 0, 3], [_tables.UNIT] * 3, []]
)
def test_work_units_cover_every_chunk_once_in_runs_of_about_unit_elements(numels) -> None:
    chunks = _tables.chunk_table(numels)
    units = _tables.unit_table(chunks)
    assert units[0] == 0 and units[-1] == chunks.shape[0]
    assert (np.diff(units) > 0).all()  # no empty unit, none claimed twice
    sizes = [int((chunks[a:b, 2] - chunks[a:b, 1]).sum()) for a, b in zip(units[:-1], units[1:])]
    assert sum(sizes) == sum(numels)
    assert all(s <= _tables.UNIT + _tables.CHUNK for s in sizes)
    assert all(s > _tables.UNIT - _tables.CHUNK for s in sizes[:-1])  # only the last one is short


def test_bench_reads_state_bytes_and_measures_low_bit_accuracy() -> None:
    from adamkit import bench

    p = torch.zeros(1 << 16, requires_grad=True)
    p.grad = torch.ones_like(p)
    for bits, want in ((32, 8.0), (8, 2 * (1 + 4 / 256)), (4, 2 * (0.5 + 4 / 128))):
        opt = adamkit.AdamW([p], state_bits=bits)
        opt.step()
        assert bench.state_bytes(opt, p.numel()) == pytest.approx(want)
    errors = bench.accuracy(rows=64, cols=256, steps=5)
    assert {"adamkit 8-bit", "adamkit 4-bit"} <= errors.keys()
    assert 0 < errors["adamkit 8-bit"] < errors["adamkit 4-bit"] < 0.5
    chosen = [c for c in bench.contenders() if c.name in ("adamkit 8-bit", "torch fused")]
    results, _ = bench.run_workload("flat-1M", "fp32", 1, chosen, lambda: None)
    assert [r.optimizer for r in results] == ["adamkit 8-bit", "torch fused"]
    assert results[0].state_bytes_per_param == pytest.approx(2 * (1 + 4 / 256))


def test_bench_resnet50_workload_is_torchvisions_in_channels_last() -> None:
    """resnet50-cl: torchvision's ResNet-50 parameter count, its 4-D weights and their
    gradients in channels_last (the rest contiguous)."""
    from adamkit import bench

    shapes = bench.WORKLOADS["resnet50-cl"]()
    assert len(shapes) == 161 and sum(int(np.prod(s)) for s in shapes) == 25_557_032
    small = [(8, 4, 3, 3), (8,), (3, 5)]
    grads = [bench._layout(torch.randn(s), True) for s in small]
    ps = bench._params(small, torch.float32, grads, "cpu", channels_last=True)
    assert ps[0].is_contiguous(memory_format=torch.channels_last) and not ps[0].is_contiguous()
    assert grads[0].stride() == ps[0].stride() and ps[1].is_contiguous() and ps[2].is_contiguous()
