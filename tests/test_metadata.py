"""The metadata walker: offsets found on this torch, what it reads, and the kept-gradient
path it enables, each checked against torch's own accessors and the reference optimizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import adamkit
from adamkit.kernels import metadata
from adamkit.kernels.metadata import Walker

TOL = dict(rtol=1e-5, atol=1e-6)
LINUX = sys.platform.startswith("linux")


@pytest.fixture(autouse=True)
def _walk_small_groups(monkeypatch):
    """The walker skips groups of fewer than MIN_PARAMS parameters; these tests use few."""
    monkeypatch.setattr(metadata, "MIN_PARAMS", 1)


def test_small_groups_are_not_walked(monkeypatch) -> None:
    monkeypatch.setattr(metadata, "MIN_PARAMS", 512)
    assert not Walker([torch.zeros(3).requires_grad_() for _ in range(511)]).active
    assert Walker([torch.zeros(3).requires_grad_() for _ in range(512)]).active == (metadata.layout() is not None)


@pytest.mark.skipif(not LINUX, reason="/proc/self/mem is Linux's")
def test_layout_is_found_on_this_torch() -> None:
    offs = metadata.layout()
    assert offs is not None and len(offs) == 5 and all(o % 8 == 0 and 0 <= o < 256 for o in offs)


def test_the_environment_variable_turns_it_off() -> None:
    code = "from adamkit.kernels import metadata; print(metadata.layout() is None)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "ADAMKIT_PREFETCH_METADATA": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(not LINUX, reason="/proc/self/mem is Linux's")
def test_walker_finds_every_gradient_as_torch_does() -> None:
    """Mixed dtypes, sizes (0 included), Parameters, views, no gradient, no autograd."""
    base = torch.zeros(50)
    params = [
        torch.zeros(3).requires_grad_(),
        torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16)),
        torch.zeros(0, dtype=torch.float64).requires_grad_(),
        torch.zeros(4, 5).requires_grad_(),  # no gradient
        base[10:20].requires_grad_(),  # a leaf view with a storage offset
        torch.zeros(2),  # no autograd metadata at all
    ]
    for i in (0, 1, 2, 4):
        params[i].grad = torch.ones_like(params[i])
    walker = Walker(params)
    assert walker.active and walker.finds_grads
    found = walker.grads(0, len(params)).tolist()
    # no gradient: torch's undefined-tensor singleton, or 0 without autograd metadata
    undefined = Walker([torch.zeros(1).requires_grad_()]).grads(0, 1)[0]
    assert undefined not in (0, *(p.grad._cdata for p in params if p.grad is not None))
    expected = [undefined if p.grad is None else p.grad._cdata for p in params[:5]] + [0]
    assert found == expected
    assert walker.grads(2, 5).tolist() == expected[2:5]
    params[3].grad = torch.ones(4, 5)
    walker.warm(0, len(params))  # prefetching only: changes nothing, fails nothing
    assert walker.grads(0, len(params))[3] == params[3].grad._cdata


def test_walker_leaves_subclasses_to_python() -> None:
    class Tagged(torch.Tensor):
        pass

    p = torch.zeros(3).as_subclass(Tagged).requires_grad_()
    assert not Walker([p, torch.zeros(2).requires_grad_()]).finds_grads


def _twins(n=6, size=300):
    fp = [torch.randn(size).requires_grad_() for _ in range(n)]
    rp = [p.detach().clone().requires_grad_() for p in fp]
    return fp, rp, adamkit.AdamW(fp, backend="numba"), adamkit.AdamW(rp, backend="reference")


def _refill(fp, rp, seed):
    gen = torch.Generator().manual_seed(seed)
    for p, q in zip(fp, rp):
        g = torch.randn(p.shape, generator=gen)
        p.grad.copy_(g)
        q.grad.copy_(g)


def _agree(fp, rp, fo, ro):
    fo.step()
    ro.step()
    for p, q in zip(fp, rp):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)
        torch.testing.assert_close(fo.state[p]["exp_avg_sq"], ro.state[q]["exp_avg_sq"], **TOL)


@pytest.mark.parametrize("walk", [True, False], ids=["walker", "python"])
@pytest.mark.parametrize("event", ["replaced_alive", "param_moved", "none", "resized_param"])
def test_kept_gradients_follow_changes(walk: bool, event: str, monkeypatch) -> None:
    """Gradients kept across steps (the walker's path when it is on): a gradient
    replaced while the old one lives on, a parameter moved by ``p.data =``, a gradient
    set to None, each noticed on the next step."""
    if not walk:
        monkeypatch.setattr(metadata, "layout", lambda: None)
    fp, rp, fo, ro = _twins()
    for p, q in zip(fp, rp):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    for seed in range(3):
        _refill(fp, rp, seed)
        _agree(fp, rp, fo, ro)
    plan = fo._plans[0]
    reads = []
    monkeypatch.setattr(plan, "read", lambda real=plan.read, **kw: reads.append(1) or real(**kw))
    _refill(fp, rp, 3)
    _agree(fp, rp, fo, ro)
    assert reads == ([] if walk and LINUX else [1])  # kept gradients: no .grad read with the walker
    old = [p.grad for p in fp]  # kept alive: nothing is freed, ids and TensorImpls stay taken
    if event == "replaced_alive":
        fp[2].grad, rp[2].grad = torch.full_like(fp[2], 0.5), torch.full_like(rp[2], 0.5)
    elif event == "param_moved":
        fp[4].data, rp[4].data = fp[4].detach().clone() + 1, rp[4].detach().clone() + 1
    elif event == "none":
        fp[1].grad = rp[1].grad = None
    elif event == "resized_param":
        fp[0].data, rp[0].data = torch.zeros(3, 100)[0], torch.zeros(3, 100)[0]
        fp[0].grad, rp[0].grad = torch.ones(100), torch.ones(100)
    if event == "resized_param":  # the general path explains it, nothing changes
        with pytest.raises(RuntimeError, match="shape"):
            fo.step()
        return
    _agree(fp, rp, fo, ro)
    assert len(old) == len(fp)
