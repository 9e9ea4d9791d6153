"""Stateful property test: random sequences of what users do, against a torch.optim twin.

A small model is trained by an adamkit optimizer and, beside it, by a copy trained
with ``torch.optim`` (the twin). Hypothesis drives both through random sequences of
ordinary operations — new, kept and missing gradients, gradients re-pointed
(``.grad.data = t``, ``.grad.set_(t)``), parameters' data replaced, the model moved
between float32 and float64, ``zero_grad`` both ways, a checkpoint saved and loaded
mid-run, hyperparameters edited, a param group added, and NaN, ±inf and huge
gradients under each ``nonfinite`` policy — and after every operation compares:

* 32 and 16 bits: the parameters (and at 32 bits the moments) equal the twin's to
  float tolerance;
* 8 and 4 bits: the parameters stay within the quantization bound of the twin's — each
  step moves a parameter by at most ``K · lr`` on either side (Adam's normalized step
  is bounded for the betas drawn here), so their distance grows by at most ``2 K lr``
  per step: a second moment decoded as zero (a step of ``lr · m / eps``) or a block
  spoiled by one element breaks it;
* no NaN where the twin has none; an operation that fails must fail on both sides
  with the same exception type and change nothing.

The twin emulates adamkit's documented policies: under ``"mask"`` the elements whose
gradient is non-finite (or so large that their moments overflow) get their parameter
and moments back after torch's step; under ``"skip"`` a step with any such element is
not taken; under ``"raise"`` adamkit raises and the twin does nothing. Where adamkit
deliberately differs from torch (it creates AMSGrad's maximum when ``amsgrad`` is
switched on, it keeps state dtypes when the model moves), the twin is given the same.

The default run drives the Numba kernels and the reference (derandomized: the same
sequences every run), 250 sequences per state width and path (25 in the fast tier);
``-m slow`` runs longer, random sequences and Triton's interpreter.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import adamkit
from adamkit.spec import HISTORY

#: Elements above which a finite gradient counts as huge (adamkit masks it when its
#: moments overflow): 2^60 in float32 math.
HUGE = 2.0**60
#: A bound on Adam's normalized step |m̂| / (sqrt(v̂) + ε) for the betas drawn here.
K = 10.0
SHAPES = [(300,), (17, 19), (5,)]
TORCH = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "Adamax": torch.optim.Adamax,
    "NAdam": torch.optim.NAdam,
}
AMSGRAD = ("Adam", "AdamW")
ALGORITHMS = list(TORCH)


def _round_trip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Twins(RuleBasedStateMachine):
    """One adamkit optimizer and its torch twin; subclasses fix ``BITS`` and ``BACKEND``."""

    BITS = 32
    BACKEND = "auto"

    @initialize(
        algorithm=st.sampled_from(ALGORITHMS),
        policy=st.sampled_from(["mask", "skip", "propagate", "raise"]),
        amsgrad=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def build(self, algorithm: str, policy: str, amsgrad: bool, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.algorithm, self.policy = algorithm, policy
        self.amsgrad = amsgrad and algorithm in AMSGRAD
        dtype = torch.float32
        self.ours = [torch.randn(s, generator=self.gen, dtype=dtype).requires_grad_() for s in SHAPES]
        self.twin = [p.detach().clone().requires_grad_() for p in self.ours]
        hyper = {"lr": 1e-2, "weight_decay": 0.01}
        if self.amsgrad:
            hyper["amsgrad"] = True
        extra = {"min_quant_size": 0} if self.BITS in (8, 4) else {}
        self.opt = getattr(adamkit, algorithm)(
            self.ours, **hyper, nonfinite=policy, state_bits=self.BITS, backend=self.BACKEND, **extra
        )
        self.ref = TORCH[algorithm](self.twin, **hyper, foreach=False)
        self.bound = 0.0  # how far apart the parameters may be (8/4 bits)
        self.steps = 0

    # ------------------------------------------------------------------ helpers
    def _pairs(self):
        return list(zip(self.ours, self.twin))

    def _grad(self, p: torch.Tensor, special: str | None = None) -> torch.Tensor:
        g = torch.randn(p.shape, generator=self.gen, dtype=torch.float64) * 10.0 ** float(
            torch.randint(-4, 2, (), generator=self.gen)
        )
        if special == "dead":  # units that stopped firing: exact zeros (ReLU), the rest as before
            return (g * (torch.rand(g.shape, generator=self.gen, dtype=torch.float64) < 0.5)).to(p.dtype)
        if special is not None and g.numel():
            where = torch.randint(0, g.numel(), (2,), generator=self.gen)
            value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e21, "big": 1e19}[special]
            g.view(-1)[where] = value
        return g.to(p.dtype)

    # -------------------------------------------------------------------- rules
    @rule(which=st.lists(st.booleans(), min_size=3, max_size=3), special=st.sampled_from([None] * 4 + ["dead"] * 2 + [
          "nan", "inf", "-inf", "huge", "big"]))  # fmt: skip
    def new_gradients(self, which: list[bool], special: str | None) -> None:
        """New gradient tensors for some parameters (None for the others)."""
        for k, (p, q) in enumerate(self._pairs()):
            if k < len(which) and which[k]:
                g = self._grad(p, special if k == 0 or special == "dead" else None)
                p.grad, q.grad = g.clone(), g.clone().to(q.dtype)
            else:
                p.grad = q.grad = None

    @rule()
    def refill_kept_gradients(self) -> None:
        """The same gradient tensors, refilled in place (``zero_grad(set_to_none=False)``)."""
        for p, q in self._pairs():
            if p.grad is not None and q.grad is not None:
                g = self._grad(p)
                p.grad.copy_(g)
                q.grad.copy_(g)

    @rule(how=st.sampled_from(["data", "set_"]))
    def repoint_a_gradient(self, how: str) -> None:
        """A kept gradient re-pointed at new storage."""
        for p, q in self._pairs():
            if p.grad is not None and q.grad is not None:
                g = self._grad(p)
                for t, v in ((p, g.clone()), (q, g.clone().to(q.dtype))):
                    if how == "set_":
                        t.grad.set_(v)
                    else:
                        t.grad.data = v
                return

    @rule(k=st.integers(0, 2))
    def replace_parameter_data(self, k: int) -> None:
        """``p.data = new`` (same values, a new storage)."""
        with torch.no_grad():
            self.ours[k].data = self.ours[k].data.clone()
            self.twin[k].data = self.twin[k].data.clone()

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none: bool) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)
        self.ref.zero_grad(set_to_none=set_to_none)

    @precondition(lambda self: self.BITS == 32 and self.BACKEND in ("auto", "reference"))
    @rule()
    def move_model(self) -> None:
        """``model.to(dtype)`` between float32 and float64: adamkit keeps its state's
        dtype (documented), the twin's state is cast so that torch can step it. (A
        forced fused backend refuses float64 parameters with float32 state, as it says.)"""
        dtype = torch.float64 if self.ours[0].dtype == torch.float32 else torch.float32
        for p, q in self._pairs():
            with torch.no_grad():
                p.data, q.data = p.data.to(dtype), q.data.to(dtype)
            for t in (p, q):
                if t.grad is not None:
                    t.grad = t.grad.to(dtype)
        for state in self.ref.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    state[key] = value.to(dtype)

    @rule()
    def save_and_load(self) -> None:
        """A checkpoint mid-run, through bytes, loaded back (both sides)."""
        self.opt.load_state_dict(_round_trip(self.opt.state_dict()))
        self.ref.load_state_dict(_round_trip(self.ref.state_dict()))

    @rule(
        lr=st.sampled_from([1e-3, 1e-2, 3e-2]),
        beta1=st.sampled_from([0.0, 0.5, 0.9]),
        beta2=st.sampled_from([0.9, 0.99, 0.999]),
        wd=st.sampled_from([0.0, 0.01, 0.1]),
    )
    def edit_hyperparameters(self, lr: float, beta1: float, beta2: float, wd: float) -> None:
        for group in (*self.opt.param_groups, *self.ref.param_groups):
            group.update(lr=lr, betas=(beta1, beta2), weight_decay=wd)

    @precondition(lambda self: self.algorithm in AMSGRAD)
    @rule()
    def switch_amsgrad(self) -> None:
        """amsgrad switched on or off mid-run; adamkit creates the running maximum of a
        parameter with state (torch would fail on the missing key: the twin gets a zero one)."""
        self.amsgrad = not self.amsgrad
        for group in (*self.opt.param_groups, *self.ref.param_groups):
            group["amsgrad"] = self.amsgrad
        if self.amsgrad:
            for state in self.ref.state.values():
                if state and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])

    @precondition(lambda self: len(self.opt.param_groups) == 1)
    @rule()
    def add_param_group(self) -> None:
        p = torch.randn(40, generator=self.gen, dtype=self.ours[0].dtype).requires_grad_()
        q = p.detach().clone().requires_grad_()
        self.ours.append(p)
        self.twin.append(q)
        self.opt.add_param_group({"params": [p]})
        self.ref.add_param_group({"params": [q]})

    @rule()
    def step(self) -> None:
        pairs = self._pairs()
        bad = {id(p): self._masked(p) for p, _ in pairs if p.grad is not None}
        any_bad = any(not bool(torch.isfinite(p.grad).all()) for p, _ in pairs if p.grad is not None)  # skip, raise
        before = [(p.detach().clone(), q.detach().clone()) for p, q in pairs]
        if self.policy == "raise" and any_bad:
            with pytest.raises(FloatingPointError):
                self.opt.step()
            for (p, _), (b, _) in zip(pairs, before):
                assert torch.equal(p.isnan(), b.isnan()) and torch.equal(p[~p.isnan()], b[~b.isnan()])
            return
        if self.policy == "skip" and any_bad:
            self.opt.step()
            return
        saved = self._twin_saved(pairs, bad) if self.policy == "mask" else {}
        self.opt.step()
        self.ref.step()
        for q, (mask, values) in saved.items():  # the twin emulates "mask"
            self._restore(q, mask, values)
        self.steps += 1
        lr = max(float(g["lr"]) for g in self.opt.param_groups)
        self.bound += 2 * K * lr

    def _masked(self, p: torch.Tensor) -> torch.Tensor:
        """The elements adamkit masks under "mask": a non-finite gradient, or one so
        large that the moments torch computes from it overflow."""
        g = p.grad.double()
        return ~torch.isfinite(g) | (g.abs() >= HUGE)

    def _twin_saved(self, pairs, bad) -> dict:
        out = {}
        for p, q in pairs:
            mask = bad.get(id(p))
            if mask is None or not bool(mask.any()):
                continue
            state = {k: v.clone() for k, v in self.ref.state[q].items() if k != "step"} if q in self.ref.state else {}
            out[q] = (mask, (q.detach().clone(), state))
        return out

    def _restore(self, q: torch.Tensor, mask: torch.Tensor, values) -> None:
        """Undo torch's step where adamkit masks: elements with a non-finite gradient,
        and huge ones whose new moments are not finite."""
        old_p, old_state = values
        state = self.ref.state[q]
        grad = q.grad.double()
        overflow = torch.zeros_like(mask)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf"):
            if key in state:
                overflow |= ~torch.isfinite(state[key].double())
        keep = ~torch.isfinite(grad) | ((grad.abs() >= HUGE) & overflow)
        with torch.no_grad():
            q.copy_(torch.where(keep, old_p, q))
            for key, value in state.items():
                if key == "step" or key in HISTORY:  # advance whatever is masked
                    continue
                old = old_state.get(key, torch.zeros_like(value))
                value.copy_(torch.where(keep, old, value))

    # --------------------------------------------------------------- invariants
    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "opt"):
            return
        for k, (p, q) in enumerate(self._pairs()):
            a, b = p.detach().double(), q.detach().double()
            assert torch.equal(a.isnan(), b.isnan()), f"parameter {k}: NaN unlike the twin"
            finite = torch.isfinite(a) & torch.isfinite(b)
            if self.BITS in (8, 4):
                gap = float((a - b)[finite].abs().max()) if finite.any() else 0.0
                assert gap <= self.bound + 1e-6, (k, gap, self.bound)
            else:
                tol = 1e-3 if self.BITS == 16 else 1e-4
                torch.testing.assert_close(a[finite], b[finite], atol=tol, rtol=tol, msg=f"parameter {k}")


#: Sequences per (state width, path): 250 in the full suite, 25 in the fast tier
#: (``-m "not slow and not heavy"``); ``ADAMKIT_STATEFUL_SEQUENCES`` sets both.
SEQUENCES = int(os.environ.get("ADAMKIT_STATEFUL_SEQUENCES", "250"))
FAST_SEQUENCES = int(os.environ.get("ADAMKIT_STATEFUL_SEQUENCES", "25"))


def _machine(bits: int, backend: str) -> type:
    name = f"Twins{bits}{backend.capitalize()}"
    return type(name, (Twins,), {"BITS": bits, "BACKEND": backend})


@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["numba", "reference"])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_random_sequences_agree_with_torch(bits: int, backend: str, fast_tier: bool) -> None:
    """250 derandomized sequences per (state width, path): 2,000 in the full suite (25
    per case, 200, in the fast tier)."""
    machine = _machine(bits, backend)
    machine.TestCase.settings = settings(
        max_examples=FAST_SEQUENCES if fast_tier else SEQUENCES,
        stateful_step_count=12,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    machine.TestCase().runTest()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"], ids=["numba", "reference", "triton"])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_longer_random_sequences_agree_with_torch(bits: int, backend: str) -> None:
    """``-m slow``: new random sequences every run, longer, and Triton's kernels (in its
    interpreter without a GPU)."""
    if backend == "triton" and not adamkit.kernels.HAS_TRITON:
        pytest.skip("triton is not installed, or neither a GPU nor its interpreter is there")
    machine = _machine(bits, backend)
    machine.TestCase.settings = settings(
        max_examples=SEQUENCES if backend != "triton" else 40,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    machine.TestCase().runTest()
