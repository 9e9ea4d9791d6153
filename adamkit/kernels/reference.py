"""The reference implementation: pure torch, multi-tensor, any device.

This module is the specification. Every fused kernel (Numba on the CPU, Triton on
CUDA) is tested against it, and it is tested against ``torch.optim`` in float64.
The rules are straight-line ``torch._foreach_*`` code in torch's notation; the
per-step scalars arrive precomputed (:mod:`adamkit._scalars`).

A kernel entry point has the signature::

    kernel(params, grads, state, scalars, *, amsgrad, maximize, mask_nonfinite) -> int

where ``state`` maps torch's state names (``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``exp_inf``) to lists parallel to ``params``. All tensors of one
call share a device, a parameter dtype and a state dtype. It returns the number of
gradient elements it masked because they were not finite.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._scalars import StepScalars
from ..quant import QUANT_BITS, QuantFormat, dequantize, quantize
from .registry import register

TensorList = list[Tensor]


def adam_rule_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    max_exp_avg_sqs: TensorList,
    s: StepScalars,
    *,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """Adam / AdamW, as ``torch.optim.Adam``::

    g ← -g if maximize;  g ← g + l2·θ;  θ ← decay·θ
    m ← lerp(m, g, 1-β1);  v ← β2·v + (1-β2)·g²;  v_max ← max(v_max, v)
    θ ← θ - step_size · m / (sqrt(v or v_max)·inv_bc2_sqrt + ε)
    """
    if maximize:
        grads = torch._foreach_neg(grads)
    if s.l2 != 0.0:
        grads = torch._foreach_add(grads, params, alpha=s.l2)
    if s.decay != 1.0:
        torch._foreach_mul_(params, s.decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - s.beta1)
    torch._foreach_mul_(exp_avg_sqs, s.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - s.beta2)
    second = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second = max_exp_avg_sqs
    denom = torch._foreach_sqrt(second)
    torch._foreach_mul_(denom, s.inv_bc2_sqrt)
    torch._foreach_add_(denom, s.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-s.step_size)


def adamax_rule_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_infs: TensorList,
    s: StepScalars,
    *,
    maximize: bool,
) -> None:
    """Adamax, as ``torch.optim.Adamax`` (bias correction on ``m`` only)::

    g ← -g if maximize;  g ← g + l2·θ
    m ← lerp(m, g, 1-β1);  u ← max(β2·u, |g| + ε)
    θ ← θ - step_size · m / u
    """
    if maximize:
        grads = torch._foreach_neg(grads)
    if s.l2 != 0.0:
        grads = torch._foreach_add(grads, params, alpha=s.l2)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - s.beta1)
    torch._foreach_mul_(exp_infs, s.beta2)
    abs_g = torch._foreach_abs(grads)
    torch._foreach_add_(abs_g, s.eps)
    torch._foreach_maximum_(exp_infs, abs_g)
    torch._foreach_addcdiv_(params, exp_avgs, exp_infs, value=-s.step_size)


def nadam_rule_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    s: StepScalars,
    *,
    maximize: bool,
) -> None:
    """NAdam, as ``torch.optim.NAdam`` (``grad_step`` and ``step_size`` are its two
    Nesterov coefficients, from ``mu_product``: :mod:`adamkit.spec`)::

    g ← -g if maximize;  g ← g + l2·θ;  θ ← decay·θ
    m ← lerp(m, g, 1-β1);  v ← β2·v + (1-β2)·g²;  d ← sqrt(v)·inv_bc2_sqrt + ε
    θ ← θ - grad_step · g / d - step_size · m / d
    """
    if maximize:
        grads = torch._foreach_neg(grads)
    if s.l2 != 0.0:
        grads = torch._foreach_add(grads, params, alpha=s.l2)
    if s.decay != 1.0:
        torch._foreach_mul_(params, s.decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - s.beta1)
    torch._foreach_mul_(exp_avg_sqs, s.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - s.beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(denom, s.inv_bc2_sqrt)
    torch._foreach_add_(denom, s.eps)
    torch._foreach_addcdiv_(params, grads, denom, value=-s.grad_step)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-s.step_size)


def nonfinite_indices(tensors: Sequence[Tensor], limit: float = math.inf) -> list[int]:
    """Indices of the tensors holding at least one NaN or ±inf, or with ``limit``, one
    element of magnitude ``>= limit`` (one read pass each).

    The infinity norm propagates NaN, so one ``_foreach_norm`` per (device, dtype)
    and one host sync answer for the whole list. Tensors on the meta device (shapes
    without values) have none.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.numel() and t.device.type != "meta":  # the inf-norm of an empty tensor is undefined; meta has no values
            groups[(t.device, t.dtype)].append(i)
    bad: list[int] = []
    for idx in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in idx], float("inf"))
        tame = torch.stack(norms) < limit  # NaN compares False
        tame = tame.tolist() if type(tame) is Tensor else [bool(x) for x in tame]  # subclasses: one by one
        bad.extend(i for i, ok in zip(idx, tame) if not ok)
    return sorted(bad)


def _real(t: Tensor) -> Tensor:
    """Complex tensors are updated as pairs of reals, as torch does."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x · c) mod 2^32`` for int64 ``x < 2^32`` without int64 overflow (16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 mixer on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(seed: int, salt: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """32 random bits per element ``j < n`` of the tensor with ``salt`` at step seed ``seed``.

    A counter-based stream (no state, any order, any thread count): the tensor's
    stream is ``hash(seed + hash(salt))`` and element ``j`` draws
    ``hash(stream + j·0x9E3779B1)``, all modulo 2^32. The numba kernels compute the
    same integers, so stochastic rounding is reproducible and testable bit for bit.
    """
    salt_hash = int(_hash32(torch.tensor(salt & _M32, dtype=torch.int64)))
    stream = _hash32(torch.tensor((seed + salt_hash) & _M32, dtype=torch.int64))
    j = torch.arange(n, dtype=torch.int64, device=device) & _M32
    return _hash32((stream.to(device) + _mul32(j, 0x9E3779B1)) & _M32)


def stochastic_round_bf16_(dst: Tensor, src: Tensor, seed: int, salt: int) -> None:
    """``dst`` (bf16) ← ``src`` (fp32) rounded up with probability equal to the dropped
    fraction of the mantissa, so ``E[dst] = src``; NaN stays NaN."""
    bits = src.detach().reshape(-1).view(torch.int32).to(torch.int64) & _M32
    noise = random_bits(seed, salt, bits.numel(), bits.device) & 0xFFFF
    rounded = ((bits + noise) >> 16).to(torch.int32).to(torch.int16)  # wraps like a uint16
    out = rounded.view(torch.bfloat16).view(dst.shape)
    dst.copy_(torch.where(src.isnan(), src.to(torch.bfloat16), out))


def _work_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The math dtype: at least float32 (half types are widened, as torch's opmath)."""
    return torch.promote_types(torch.promote_types(param_dtype, state_dtype), torch.float32)


#: Gradient magnitudes from which masking looks at the new moments, per math dtype:
#: below, a finite gradient's square and moments cannot overflow (2^120 < 2^128; the
#: kernels find such blocks in the same scan as NaN/±inf, by the float's bits).
HUGE = {torch.float32: 2.0**60, torch.float64: 2.0**508}


def masked_elements(g: Tensor, new_state: Sequence[Tensor]) -> Tensor:
    """Which elements ``nonfinite="mask"`` leaves alone, given the gradient and the
    rule's new state in the math dtype (real views): a gradient that is NaN/±inf, or
    of magnitude ``>= HUGE`` with a new moment that is not finite (its square
    overflowed). Every kernel decides so, element by element."""
    finite = torch.isfinite(new_state[0])
    for t in new_state[1:]:
        finite &= torch.isfinite(t)
    return ~torch.isfinite(g) | ((g.abs() >= HUGE[g.dtype]) & ~finite)


def _run(
    rule: Callable[[TensorList, TensorList, list[TensorList]], None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Apply ``rule(params, grads, states)`` with what every rule needs around it.

    Complex tensors are viewed as real. The math runs in at least float32: bf16/fp16
    parameters or state are widened and stored back rounded to nearest even (bf16
    state with subnormals flushed to zero; bf16 parameters stochastically when
    ``sr_seed`` is given; ``salts`` name the tensors'
    random streams, by default their positions). With ``mask_nonfinite``, elements
    whose gradient is not finite get their parameter and state restored afterwards,
    and so are those whose gradient is so large that their new moments overflowed
    (:func:`masked_elements`); they are counted (a complex element with such a part is
    one element, restored whole).
    """
    if not params:
        return 0
    ps = [_real(p) for p in params]
    gs = [_real(g) for g in grads]
    sts = [[_real(t) for t in ts] for ts in states]
    work = _work_dtype(ps[0].dtype, sts[0][0].dtype)
    work_ps = [p.to(work) for p in ps] if ps[0].dtype != work else ps
    work_gs = [g.to(work) for g in gs] if gs[0].dtype != work else gs
    work_sts = [[t.to(work) for t in ts] for ts in sts] if sts[0][0].dtype != work else sts

    # the tensors that may hold elements to mask, saved before the rule
    bad = nonfinite_indices(gs, HUGE[work]) if mask_nonfinite else []
    saved = {i: [work_ps[i].clone()] + [ts[i].clone() for ts in work_sts] for i in bad}
    rule(work_ps, work_gs, work_sts)
    masked = 0
    for i, old in saved.items():
        keep = masked_elements(work_gs[i], [ts[i] for ts in work_sts])
        if grads[i].is_complex():  # a complex element counts once, restored whole
            keep = keep.any(-1, keepdim=True).expand_as(keep)
            masked += int(keep[..., 0].sum())
        else:
            masked += int(keep.sum())
        for new, before in zip([work_ps[i]] + [ts[i] for ts in work_sts], old):
            new.copy_(torch.where(keep, before, new))
    if work_ps is not ps:
        if sr_seed is not None and ps[0].dtype == torch.bfloat16:
            for i, (p, w) in enumerate(zip(ps, work_ps)):
                stochastic_round_bf16_(p, w, sr_seed, i if salts is None else salts[i])
        else:
            torch._foreach_copy_(ps, work_ps)
    if work_sts is not sts:
        for ts, ws in zip(sts, work_sts):
            if ts[0].dtype == torch.bfloat16:
                flush_subnormals_(ws)
            torch._foreach_copy_(ts, ws)
    return masked


def flush_subnormals_(tensors: TensorList) -> None:
    """Replace values below float32's smallest normal (2^-126, ~1.2e-38) in magnitude by
    zeros of the same sign: bf16 state is stored so (see the numba kernels'
    ``_f32_to_bf16_ftz``), as x86's one-instruction conversion does."""
    for t in tensors:
        t.mul_(~(t.abs() < 2.0**-126))  # NaN and inf compare False: kept


@register("adam", backend="reference", state_bits=(32, 16))
def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Reference Adam/AdamW step over one bucket; returns the masked element count."""
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    def rule(ps: TensorList, gs: TensorList, sts: list[TensorList]) -> None:
        m, v, *vmax = sts
        adam_rule_(ps, gs, m, v, vmax[0] if amsgrad else [], s, amsgrad=amsgrad, maximize=maximize)

    return _run(rule, params, grads, [state[k] for k in keys], mask_nonfinite, sr_seed, salts)


@register("adamax", backend="reference", state_bits=(32, 16))
def adamax_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Reference Adamax step over one bucket; returns the masked element count.

    ``amsgrad`` is accepted for a uniform kernel signature and must be False.
    """
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")

    def rule(ps: TensorList, gs: TensorList, sts: list[TensorList]) -> None:
        m, u = sts
        adamax_rule_(ps, gs, m, u, s, maximize=maximize)

    return _run(rule, params, grads, [state["exp_avg"], state["exp_inf"]], mask_nonfinite, sr_seed, salts)


@register("nadam", backend="reference", state_bits=(32, 16))
def nadam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Reference NAdam step over one bucket (``amsgrad`` must be False)."""
    if amsgrad:
        raise ValueError("NAdam has no AMSGrad variant")

    def rule(ps: TensorList, gs: TensorList, sts: list[TensorList]) -> None:
        nadam_rule_(ps, gs, sts[0], sts[1], s, maximize=maximize)

    return _run(rule, params, grads, [state["exp_avg"], state["exp_avg_sq"]], mask_nonfinite, sr_seed, salts)


# ---------------------------------------------------------------- quantized state
def _quantized_step(dense_kernel: Callable[..., int]) -> Callable[..., int]:
    """The reference step on quantized state: decode every state tensor to float32, run
    ``dense_kernel`` (the rule above, masking included), encode the results with new
    block absmax values. Fused kernels do the same in one pass per block."""

    def step(
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: Mapping[str, Sequence[Tensor]],
        s: StepScalars,
        *,
        fmt: QuantFormat,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
        sr_seed: int | None = None,
        salts: Sequence[int] | None = None,
    ) -> int:
        keys = [k[: -len("_codes")] for k in state if k.endswith("_codes")]
        step = int(s.step)
        dense = {
            k: [
                dequantize(c, a, fmt, fmt.codebook(k), p.numel(), step - 1, s.first_index).view(p.shape)
                for p, c, a in zip(params, state[f"{k}_codes"], state[f"{k}_absmax"])
            ]
            for k in keys
        }
        masked = dense_kernel(
            params, grads, dense, s, amsgrad=amsgrad, maximize=maximize, mask_nonfinite=mask_nonfinite,
            sr_seed=sr_seed, salts=salts,
        )  # fmt: skip
        for k in keys:
            book = fmt.codebook(k)
            for x, c, a in zip(dense[k], state[f"{k}_codes"], state[f"{k}_absmax"]):
                codes, absmax = quantize(x, fmt, book, step, s.first_index)
                c.copy_(codes.view(c.shape))
                a.copy_(absmax.view(a.shape))
        return masked

    step.__doc__ = f"Reference step on block-quantized state around :func:`{dense_kernel.__name__}`."
    return step


adam_quantized_ = register("adam", backend="reference", state_bits=QUANT_BITS)(_quantized_step(adam_))
adamax_quantized_ = register("adamax", backend="reference", state_bits=QUANT_BITS)(_quantized_step(adamax_))
nadam_quantized_ = register("nadam", backend="reference", state_bits=QUANT_BITS)(_quantized_step(nadam_))


# ------------------------------------------------------------- differentiable=True
# A step autograd records: one tensor at a time (torch's _foreach ops have no
# derivatives), in place on the parameter and the state as the rules above, never on
# the gradient, and out of place wherever autograd saves a value that this step would
# then overwrite. Hyperparameters may be tensors that autograd follows (their bias
# corrections computed here, from the step count ``t``).

Hyper = float | Tensor


def _hyper(value: float | Tensor, like: Tensor) -> Hyper:
    """A float as a float; a 1-element tensor as a 0-d tensor of ``like``'s dtype and device
    (a cast autograd records, so gradients reach the tensor the group holds)."""
    return value.reshape(()).to(like.device, like.dtype) if isinstance(value, Tensor) else float(value)


def _coupled_l2(g: Tensor, p: Tensor, wd: Hyper) -> Tensor:
    """``g + λ·θ``, out of place; with a tensor λ autograd keeps θ, so a copy of it (the
    step overwrites θ)."""
    return g + wd * p.clone() if isinstance(wd, Tensor) else g.add(p, alpha=wd)


def adam_single_(
    p: Tensor,
    g: Tensor,
    state: Sequence[Tensor],
    t: float,
    h: Mapping[str, float | Tensor],
    *,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> None:
    """Adam / AdamW on one tensor at step ``t``, differentiably: :func:`adam_rule_` with
    ``step_size = lr / (1 - β1^t)`` and ``1 / sqrt(1 - β2^t)`` computed from ``h``.
    ``m`` enters the update, and the old ``v_max`` the maximum, as copies."""
    lr, beta1, beta2, eps, wd = (_hyper(h[k], p) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    m, v, *vmax = state
    if maximize:
        g = -g
    if isinstance(wd, Tensor) or wd != 0.0:
        if decoupled:
            p.mul_(1 - lr * wd)
        else:
            g = _coupled_l2(g, p, wd)
    m.lerp_(g, 1 - beta1)
    if isinstance(beta2, Tensor):
        v.lerp_(g * g, 1 - beta2)  # β2·v + (1-β2)·g², where addcmul_ takes no tensor factor
    else:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if amsgrad:
        vmax[0].copy_(torch.maximum(vmax[0].clone(), v))
        v = vmax[0]
    bc2 = 1 - beta2**t
    inv_bc2_sqrt = bc2.rsqrt() if isinstance(bc2, Tensor) else 1.0 / math.sqrt(bc2)
    denom = v.sqrt() * inv_bc2_sqrt + eps
    p.sub_(m.clone() / denom * (lr / (1 - beta1**t)))


def adamax_single_(
    p: Tensor,
    g: Tensor,
    state: Sequence[Tensor],
    t: float,
    h: Mapping[str, float | Tensor],
    *,
    amsgrad: bool = False,
    maximize: bool,
    decoupled: bool = False,
) -> None:
    """Adamax on one tensor at step ``t``, differentiably: :func:`adamax_rule_` with
    ``step_size = lr / (1 - β1^t)`` computed from ``h`` (``amsgrad`` and ``decoupled``
    are accepted for one signature, and unused)."""
    lr, beta1, beta2, eps, wd = (_hyper(h[k], p) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    m, u = state
    if maximize:
        g = -g
    if isinstance(wd, Tensor) or wd != 0.0:
        g = _coupled_l2(g, p, wd)
    m.lerp_(g, 1 - beta1)
    decayed = (u.clone() if isinstance(beta2, Tensor) else u) * beta2  # u is overwritten next
    u.copy_(torch.maximum(decayed, g.abs() + eps))
    p.sub_(m / u * (lr / (1 - beta1**t)))


def nadam_single_(
    p: Tensor,
    g: Tensor,
    state: Sequence[Tensor],
    t: float,
    h: Mapping[str, float | Tensor],
    *,
    amsgrad: bool = False,
    maximize: bool,
    decoupled: bool,
) -> None:
    """NAdam on one tensor at step ``t``, differentiably: :func:`nadam_rule_` with its
    coefficients computed from ``h``: ``momentum_decay`` and the parameter's
    ``mu_product`` state tensor, which this step multiplies by μ_t in place (recorded
    by autograd when β1 is a tensor, as torch's is); ``m`` enters the update as a copy."""
    lr, beta1, beta2, eps, wd = (_hyper(h[k], p) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    m, v = state
    if maximize:
        g = -g
    if isinstance(wd, Tensor) or wd != 0.0:
        if decoupled:
            p.mul_(1 - lr * wd)
        else:
            g = _coupled_l2(g, p, wd)
    psi, product = float(h["momentum_decay"]), h["mu_product"]
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    product.mul_(mu)
    product = product.to(p.dtype)  # the coefficients in the math dtype, as torch's float64 host math
    m.lerp_(g, 1 - beta1)
    if isinstance(beta2, Tensor):
        v.lerp_(g * g, 1 - beta2)
    else:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc2 = 1 - beta2**t
    denom = v.sqrt() * (bc2.rsqrt() if isinstance(bc2, Tensor) else 1.0 / math.sqrt(bc2)) + eps
    p.sub_(g * (lr * (1.0 - mu) / (1.0 - product)) / denom)
    p.sub_(m.clone() * (lr * mu_next / (1.0 - product * mu_next)) / denom)


#: The differentiable rule of each algorithm (``AdamFamily.algorithm``).
DIFFERENTIABLE_RULES: dict[str, Callable[..., None]] = {
    "adam": adam_single_,
    "adamax": adamax_single_,
    "nadam": nadam_single_,
}


def differentiable_step_(
    rule: Callable[..., None],
    p: Tensor,
    g: Tensor,
    state: Sequence[Tensor],
    t: float,
    h: Mapping[str, float | Tensor],
    *,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    mask_nonfinite: bool,
) -> int:
    """One parameter's step with ``rule`` (from :data:`DIFFERENTIABLE_RULES`), with what
    :func:`_run` does around a rule, in ops autograd records: complex tensors viewed as
    real, math in at least float32 (bf16/fp16 values widened, stored back rounded), and
    with ``mask_nonfinite`` the elements whose gradient is not finite restored (and
    counted). Returns the number masked."""
    ps, gs, sts = _real(p), _real(g), [_real(t_) for t_ in state]
    work = _work_dtype(ps.dtype, sts[0].dtype)
    wp, wg, wsts = ps.to(work), gs.to(work), [s.to(work) for s in sts]
    bad = ~torch.isfinite(g) if mask_nonfinite and g.device.type != "meta" else None
    masked = int(bad.sum()) if bad is not None else 0
    saved = [x.clone() for x in (wp, *wsts)] if masked else []
    rule(wp, wg, wsts, t, h, amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)
    if masked:
        keep = bad.unsqueeze(-1).expand_as(gs) if g.is_complex() else bad  # a complex element counts once
        for new, before in zip((wp, *wsts), saved):
            new.copy_(torch.where(keep, before, new))
    for stored, new in zip((ps, *sts), (wp, *wsts)):
        if new is not stored:
            stored.copy_(new)
    return masked
