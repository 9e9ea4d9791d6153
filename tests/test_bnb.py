"""bitsandbytes' names (``adamkit/bnb.py``): its classes' signatures and positional
order, ``args``, the ``Paged*`` errors, ``GlobalOptimManager``'s overrides, and
percentile clipping as bitsandbytes clips."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import adamkit


def test_bnb_signatures_and_mapping() -> None:
    p = torch.zeros(5000, requires_grad=True)
    # bitsandbytes' positional order: params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, ...
    opt = adamkit.bnb.Adam([p], 1e-2, (0.8, 0.9), 1e-6, 0.1, True, 8, None, 100, 95, False)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"]) == (1e-2, (0.8, 0.9), 1e-6, 0.1, True)
    assert (g["state_bits"], g["min_quant_size"], g["percentile_clipping"], g["block_wise"]) == (8, 100, 95, False)
    assert adamkit.AdamW8bit([p], optim_bits=32).param_groups[0]["state_bits"] == 8
    assert adamkit.AdamW8bit([p]).param_groups[0]["weight_decay"] == 1e-2
    assert adamkit.Adam32bit([p]).param_groups[0]["state_bits"] == 32
    args = SimpleNamespace(optim_bits=8, min_8bit_size=16, percentile_clipping=50, block_wise=True)
    assert adamkit.bnb.AdamW([p], args=args).param_groups[0]["min_quant_size"] == 16
    assert isinstance(adamkit.AdamW8bit([p]), adamkit.AdamW)
    for cls in (adamkit.PagedAdamW8bit, adamkit.PagedAdam, adamkit.PagedAdamW32bit):
        assert cls([p]).param_groups[0]["paged"] is True
    assert adamkit.AdamW8bit([p], is_paged=True).param_groups[0]["paged"] is True
    assert adamkit.AdamW8bit([p]).param_groups[0]["paged"] is False
    assert adamkit.bnb.AdamW([p], args=SimpleNamespace(is_paged=True)).param_groups[0]["paged"] is True


@pytest.fixture
def manager():
    mng = adamkit.GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


def test_global_optim_manager_overrides(manager) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 128), torch.nn.Linear(128, 128))
    with pytest.raises(RuntimeError, match="get_instance"):
        adamkit.GlobalOptimManager()
    manager.register_parameters(model.parameters())
    opt = adamkit.Adam8bit(model.parameters())
    manager.override_config(model[0].weight, "optim_bits", 32)
    manager.register_module_override(model[2], "weight", {"optim_bits": 32})
    with pytest.raises(ValueError, match="param group"):
        manager.override_config(model[1].weight, "lr", 0.1)
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert "exp_avg" in opt.state[model[0].weight] and "exp_avg" in opt.state[model[2].weight]
    assert "exp_avg_codes" in opt.state[model[1].weight]
    # the native way: a param group
    native = adamkit.Adam([{"params": model[0].parameters(), "state_bits": 32}, {"params": model[1].parameters()}],
                          state_bits=8)  # fmt: skip
    native.step()
    assert "exp_avg" in native.state[model[0].weight] and "exp_avg_codes" in native.state[model[1].weight]


def test_percentile_clipping_follows_bitsandbytes() -> None:
    p = torch.zeros(1000, requires_grad=True)
    q = torch.zeros(1000, requires_grad=True)
    opt = adamkit.Adam([p], percentile_clipping=5, backend="reference")
    plain = adamkit.Adam([q], backend="reference")
    history = torch.zeros(100)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 30):
        g = torch.randn(1000, generator=gen) * (100.0 if step in (12, 20) else 1.0)
        sq = float(g.norm()) ** 2
        if step == 1:
            history.fill_(sq)
        else:
            history[step % 100] = sq
        current, clip = math.sqrt(sq), math.sqrt(float(history.sort().values[5]))
        p.grad = g.clone()
        q.grad = g * (clip / current) if current > clip else g.clone()
        opt.step()
        plain.step()
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)
        assert torch.equal(p.grad, g)  # the user's gradient is left alone
    torch.testing.assert_close(opt.state[p]["gnorm_vec"], history)
