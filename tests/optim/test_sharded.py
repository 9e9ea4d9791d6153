"""DTensor parameters (FSDP2's fully_shard) on 2 gloo ranks and on 1: the same numbers
at any world size and as a single-process run, global options, distributed checkpoints.

Each scenario runs once per module (fresh processes are seconds each); the tests read
its results. Gradients are set directly (see :mod:`dist_workers`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

import dist_workers as W  # noqa: E402
from ranks import run_ranks  # noqa: E402

pytestmark = pytest.mark.heavy  # fresh processes: in the full suite


def _tensor(v):
    return v if isinstance(v, torch.Tensor) else torch.tensor(float(v))


def assert_same(a: dict, b: dict, names=tuple(W.SHAPES), exact: bool = True, flat_state: bool = False) -> None:
    """Two snapshots' parameters and state of ``names`` equal bit for bit (``exact``) or
    to float32 rounding; ``flat_state``: state compared as flat tensors (a sharded run's
    row-shaped codes against a plain one's flat codes)."""
    for name in names:
        pairs = [("param", a["params"][name], b["params"][name])]
        assert set(a["state"][name]) == set(b["state"][name]), name
        pairs += [(k, _tensor(v), _tensor(b["state"][name][k])) for k, v in a["state"][name].items()]
        for key, x, y in pairs:
            if flat_state:
                x, y = x.reshape(-1), y.reshape(-1)
            if exact:
                assert x.shape == y.shape and torch.equal(x, y), f"{name} {key}: {(x.float() - y.float()).abs().max()}"
            else:
                torch.testing.assert_close(x.float(), y.float(), atol=1e-5, rtol=1e-5, msg=f"{name} {key}")


@pytest.fixture(scope="module")
def parity():
    configs = list(W.CONFIGS)
    return run_ranks(2, "fsdp_parity", configs, True), run_ranks(1, "fsdp_parity", configs, True)


@pytest.mark.parametrize("config", list(W.CONFIGS))
def test_fsdp2_same_numbers_at_any_world_size(parity, config):
    two, one = parity
    assert_same(two[0][config], two[1][config])  # both ranks gathered the same tensors
    assert_same(two[0][config], one[0][config])
    assert two[0][config]["nonfinite_count"] == one[0][config]["nonfinite_count"] == 2  # one NaN, one inf
    plain = W.plain_parity(config, True)
    assert_same(two[0][config], plain, flat_state=True)  # as a single-process run, codes included
    assert plain["nonfinite_count"] == 2


@pytest.mark.parametrize("config", list(W.CONFIGS))
def test_fsdp2_state_is_sharded_like_the_parameter(parity, config):
    kinds = parity[0][0][config]["kinds"]
    bits = W.CONFIGS[config][1].get("state_bits", 32)
    for name in W.SHAPES:
        tensors = {k: v for k, v in kinds[name].items() if k not in ("step", "mu_product") and v != "int"}
        assert tensors and set(tensors.values()) == {"DTensor"}, (name, kinds[name])
        quantized = any(k.endswith("_codes") for k in tensors)
        assert quantized == (bits in (8, 4) and name in W.ROW_BLOCKED), (name, sorted(tensors))
    state = parity[0][0][config]["state"]["even"]
    conv = parity[0][0][config]["state"]["conv"]
    if bits in (8, 4):  # global rows: (8, 512) -> codes (8, 512 * bits / 8), absmax (8, 512 / block)
        block = 256 if bits == 8 else 128
        assert tuple(state["exp_avg_codes"].shape) == (8, 512 * bits // 8)
        assert tuple(state["exp_avg_absmax"].shape) == (8, 512 // block)
        assert tuple(conv["exp_avg_codes"].shape) == (6, 256 * bits // 8)  # rows after the sharded dimension
        assert tuple(conv["exp_avg_absmax"].shape) == (6, 256 // block)
    else:
        assert tuple(state["exp_avg"].shape) == (8, 512)


@pytest.fixture(scope="module")
def global_options():
    return run_ranks(2, "fsdp_global")


def test_nonfinite_skip_decided_on_all_ranks(global_options):
    for rank in global_options:  # the inf is in rank 1's shard only
        assert rank["unchanged_by_skip"]
        assert rank["skip"]["skipped_steps"] == 1
        assert rank["skip"]["nonfinite_count"] == 1
    assert_same(global_options[0]["skip"], global_options[1]["skip"])


def test_nonfinite_raise_on_all_ranks(global_options):
    for rank in global_options:
        assert rank["raised"] is not None and "1 non-finite gradient element(s) over all ranks" in rank["raised"]
        assert all(not st for st in rank["raise"]["state"].values())  # nothing changed
    assert "in 0 tensor(s) on this rank;" in global_options[0]["raised"]  # the inf is in rank 1's shard
    assert "in 1 tensor(s) on this rank, the first in param group 0, parameter 1" in global_options[1]["raised"]


def test_percentile_clipping_uses_global_norms(global_options):
    plain = W.plain_global("percentile")
    assert_same(global_options[0]["percentile"], plain, exact=False, flat_state=True)


def test_clip_grad_norm_composes(global_options):
    plain = W.plain_global("clip")
    torch.testing.assert_close(torch.tensor(global_options[0]["clip_norms"]), torch.tensor(plain["norms"]))
    assert_same(global_options[0]["clip"], plain, exact=False)


def test_global_optim_manager_survives_fully_shard(global_options):
    kinds = global_options[0]["manager"]
    assert "exp_avg" in kinds["even"] and "exp_avg" in kinds["uneven"]  # overridden: 32-bit
    assert "exp_avg_codes" in kinds["lonely"]


CHECKPOINTED = ["adamw32", "adamw16", "adamw8", "adamw4", "adamw32+tensor-lr"]


@pytest.fixture(scope="module")
def dcp_runs(tmp_path_factory):
    out = {}
    for config in CHECKPOINTED:
        path = str(tmp_path_factory.mktemp("dcp") / config)
        uninterrupted = run_ranks(2, "dcp_save", config, path)[0]
        out[config] = (
            uninterrupted,
            run_ranks(2, "dcp_load", config, path)[0],
            run_ranks(1, "dcp_load", config, path)[0],
        )
    return out


@pytest.mark.parametrize("config", CHECKPOINTED)
def test_dcp_save_on_two_ranks_load_on_one_and_two(dcp_runs, config):
    uninterrupted, two, one = dcp_runs[config]
    assert_same(two, uninterrupted)
    assert_same(one, uninterrupted)
    plain, _ = W.plain_run(config)  # the same numbers as one process without sharding
    names = W.SHAPES if "8" not in config and "4" not in config else W.ROW_BLOCKED
    assert_same(uninterrupted, plain, names=names, flat_state=True)
    for kind in two["loaded"]["kinds"].values():  # loaded state is sharded, as made
        assert {v for k, v in kind.items() if k.endswith(("exp_avg", "_codes", "_absmax"))} <= {"DTensor"}


@pytest.mark.parametrize("direction", ["torch-to-adamkit", "adamkit-to-torch"])
def test_dcp_checkpoints_cross_with_torch_optim(tmp_path, direction):
    writer, reader = ("torch", "adamw32") if direction == "torch-to-adamkit" else ("adamw32", "torch")
    path = str(tmp_path / "ckpt")
    uninterrupted = run_ranks(2, "dcp_save", writer, path)[0]
    # torch's groups lack adamkit's keys (state_bits, backend, ...): DCP's partial load keeps ours
    resumed = run_ranks(2, "dcp_load", reader, path, 3, direction == "torch-to-adamkit")[0]
    assert_same(resumed, uninterrupted, exact=False)


@pytest.mark.parametrize("config", ["adamw32", "adamw8", "adamw4"])
def test_full_state_dict_crosses_between_sharded_and_plain(config):
    names = W.ROW_BLOCKED if config != "adamw32" else tuple(W.SHAPES)  # other formats differ when sharded
    sharded = run_ranks(2, "fsdp_parity", [config], False)[0][config]
    # sharded -> plain: the gathered state dict loads into a single-process optimizer
    saved = run_ranks(2, "full_save", config)[0]
    resumed, _ = W.plain_run(config, first=4, sd=saved["sd"], params=saved["params"])
    assert_same(resumed, sharded, names=names, flat_state=True)
    # plain -> sharded: a single-process state_dict loads with load_state_dict, cut locally
    half, plain_sd = W.plain_run(config, last=3)
    for world in (2, 1):
        out = run_ranks(world, "full_load", config, plain_sd, half["params"])[0]
        assert_same(out, sharded, names=names, flat_state=True)


def test_param_groups_rewritten_in_place_after_fully_shard():
    """Accelerate's FSDP2 path swaps the DTensors into an optimizer made before sharding."""
    rewritten = run_ranks(2, "rewritten_groups")[0]
    made_after = run_ranks(2, "fsdp_parity", ["adamw8"], False)[0]["adamw8"]
    assert_same(rewritten, made_after)


def test_ddp_zero_and_dcp_of_plain_tensors_keep_working(tmp_path):
    ranks = run_ranks(2, "ddp_family", str(tmp_path / "ddp"))
    twin = W.ddp_twin(2)
    for kind in ("ddp", "zero32", "zero8"):
        for a, b in zip(ranks[0][kind], ranks[1][kind]):
            assert torch.equal(a, b), kind  # replicas agree
    for a, b in zip(ranks[0]["ddp"], twin):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(ranks[0]["zero8"], ranks[0]["ddp"]):  # ZeRO steps each parameter as one optimizer does
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert "exp_avg_codes" in ranks[0]["zero8_state_keys"] and "exp_avg" in ranks[0]["zero32_state_keys"]
    assert ranks[0]["dcp_equal"] and ranks[1]["dcp_equal"]


def test_tensor_parallel_placements():
    """Shard(1) (the last dimension: 32-bit state), Replicate and Shard(0) parameters:
    the same numbers on 1 and 2 ranks; a replicated tensor's non-finite elements counted once."""
    configs = ["adamw32", "adamw8", "adamw4"]
    two, one = run_ranks(2, "tensor_parallel", configs), run_ranks(1, "tensor_parallel", configs)
    names = tuple(W.TP_PLACEMENTS)
    for config in configs:
        assert_same(two[0][config], two[1][config], names=names)
        assert_same(two[0][config], one[0][config], names=names)
        assert two[0][config]["nonfinite_count"] == one[0][config]["nonfinite_count"] == 2
        kinds = two[0][config]["kinds"]
        quantized = W.CONFIGS[config][1].get("state_bits", 32) in (8, 4)
        assert ("exp_avg_codes" in kinds["uneven"]) == quantized and ("exp_avg_codes" in kinds["lonely"]) == quantized
        assert "exp_avg" in kinds["even"]  # its last dimension is sharded


@pytest.mark.parametrize("variant", ["reshard", "keep", "mixed", "offload"])
def test_fsdp2_training_policies(variant):
    """FSDP2 with real forward and backward: the 2-rank run equals the 1-rank run to the
    rounding of the reduce-scatter's sum (bf16 compute: to bf16's), which can move an
    8-bit code by one step (a fraction of one step's update, lr = 1e-2)."""
    two = run_ranks(2, "fsdp_training", variant)
    one = run_ranks(1, "fsdp_training", variant)[0]
    tol = dict(atol=2e-2, rtol=2e-2) if variant == "mixed" else dict(atol=2e-3, rtol=1e-2)
    assert all(d == torch.float32 for d in one["dtypes"])  # fp32 sharded parameters
    for a, b, c in zip(two[0]["params"], two[1]["params"], one["params"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, **tol)


def test_hostile_sharded_state_is_refused_before_anything_changes():
    cases = run_ranks(2, "hostile_sharded")
    expected = {
        "plain state": r"RuntimeError: state 'exp_avg' is a Tensor, not a DTensor as its parameter",
        "other placements": r"RuntimeError: state 'exp_avg_codes' is sharded as \(Replicate\(\),\)",
        "lying shard": r"RuntimeError: state 'exp_avg' holds a local \(1, 1024\) shard for a local \(\d, 1024\)",
        "plain gradient": r"RuntimeError: gradient is a Tensor but the parameter is a DTensor",
        "dtensor state for a plain parameter": r"ValueError: .*DTensor state for a parameter that is not a DTensor",
        "whole state of the wrong size": r"ValueError: .*state 'exp_avg' has shape \(1,",
    }
    import re

    for out in cases:
        for case, pattern in expected.items():
            assert out[case] is not None and re.search(pattern, out[case]), (case, out[case])
            assert out[case + ":unchanged"], case
        assert out["fresh untouched"]


def test_hsdp_on_a_2x2_mesh():
    """Replicate x Shard(0) (HSDP) on 4 ranks: the 1-rank numbers, counts of replicated shards once."""
    configs = ["adamw32", "adamw8", "adamw4"]
    four = run_ranks(4, "fsdp_parity", configs, True, True)
    one = run_ranks(1, "fsdp_parity", configs, True)[0]
    for config in configs:
        for rank in four:
            assert_same(rank[config], one[config])
            assert rank[config]["nonfinite_count"] == 2
        assert "DTensor" in four[0][config]["kinds"]["even"].values()


def test_mask_counts_with_a_rank_holding_only_empty_shards():
    """A rank whose every shard is empty still takes part in the step's count reduction."""
    ranks = run_ranks(2, "empty_shards")
    assert ranks[0]["nonfinite_count"] == ranks[1]["nonfinite_count"] == 1


def test_stochastic_rounding_replicas_agree():
    ranks = run_ranks(2, "sr_replicas")
    assert ranks[0]["changed"]
    assert torch.equal(ranks[0]["local"], ranks[1]["local"])
