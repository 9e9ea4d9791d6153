"""The Adam family's update rules in MLX operations, and their compiled steps.

The rules are :mod:`adamkit.kernels.reference`'s (torch's notation and operation
order), written once for MLX. A step of one parameter is one compiled function: its
gradient, parameter and state in, the new parameter and state out. Every hyperparameter
arrives in one float32 vector (:data:`CONSTS`, computed each step by
:func:`step_consts` from the step count and ``learning_rate`` arrays), so changing the
learning rate, the betas or the weight decay never compiles again; the functions are
compiled once per algorithm and option set (``amsgrad``, ``maximize``, the non-finite
policy), shapeless for dense state and once per shape for quantized state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import mlx.core as mx
import torch

from ..kernels.reference import HUGE as _HUGE
from ..quant import Codebook, QuantFormat
from ..quant.blockwise import DEFAULT_BLOCK
from . import _codec

#: The per-step constants every compiled step receives, in this order (float32).
CONSTS = (
    "step_size",  # lr / (1 - β1^t)
    "bc2_sqrt",  # sqrt(1 - β2^t) (Adamax: 1)
    "bc2",  # 1 - β2^t
    "decay",  # 1 - lr·λ for decoupled weight decay, else 1
    "l2",  # λ for coupled L2, else 0
    "b1w",  # 1 - β1
    "lerp_low",  # 1 if 1 - β1 < 0.5: torch's lerp from m, else from g
    "lerp_c1",  # 1 - β1, or -(β1) from g (see lerp)
    "beta2",
    "b2w",  # 1 - β2
    "eps",
    "lr",
    "mu",  # NAdam's μ_t and μ_{t+1}
    "mu_next",
    "ok",  # 1: apply the step; 0: nonfinite="skip" found a non-finite gradient
)
_C = {name: i for i, name in enumerate(CONSTS)}
#: Gradient magnitudes from which masking looks at the new moments (float32's).
HUGE = _HUGE[torch.float32]


#: The hyperparameters :func:`step_consts` reads, in the order of its ``hyper`` vector:
#: the betas as their complements ``1 - β`` (see :class:`adamkit.mlx.AdamFamily`).
HYPER = ("one_minus_beta1", "one_minus_beta2", "eps", "weight_decay", "momentum_decay")


def step_consts(
    algorithm: str, step: mx.array, lr: mx.array, hyper: mx.array, decoupled: bool, ok: mx.array | None = None
) -> mx.array:
    """The float64 vector of :data:`CONSTS` at step ``step`` (the new step count) from the
    learning rate and the hyperparameter vector ``[1-β1, 1-β2, ε, λ, ψ]`` (arrays:
    the formulas run in MLX, inside a user's ``mx.compile`` too, where these are the
    compiled step's inputs). Computed in float64 on the CPU stream, as torch computes
    them on the host; float32 parameters take them rounded once. One compiled graph
    per algorithm, so a step costs one call here."""
    fn = _consts_fn(algorithm, bool(decoupled) and algorithm != "adamax")
    return fn(step, lr, hyper, mx.array(True) if ok is None else ok)


@cache
def _consts_fn(algorithm: str, decoupled: bool) -> Callable[..., mx.array]:
    def consts(step: mx.array, lr: mx.array, hyper: mx.array, ok: mx.array) -> mx.array:
        f64 = mx.float64
        with mx.stream(mx.cpu):
            t = step.astype(f64)
            lr = lr.astype(f64)
            hyper = hyper.astype(f64)
            c1, c2, eps, wd, psi = (hyper[i] for i in range(len(HYPER)))
            b1, b2 = 1.0 - c1, 1.0 - c2
            one, zero = mx.array(1.0, f64), mx.array(0.0, f64)
            w = c1  # torch's lerp weight 1 - β1, in float32
            bc2 = one if algorithm == "adamax" else 1.0 - mx.power(b2, t)
            mu = mu_next = zero
            if algorithm == "nadam":
                base = mx.array(0.96, f64)
                mu = b1 * (1.0 - 0.5 * mx.power(base, t * psi))
                mu_next = b1 * (1.0 - 0.5 * mx.power(base, (t + 1.0) * psi))
            values = {
                "step_size": lr / (1.0 - mx.power(b1, t)),
                "bc2_sqrt": mx.sqrt(bc2),
                "bc2": bc2,
                "decay": one - lr * wd if decoupled else one,
                "l2": zero if decoupled else wd,
                "b1w": c1,
                "lerp_low": (w < 0.5).astype(f64),
                "lerp_c1": mx.where(w < 0.5, w, -(1.0 - w)),
                "beta2": b2,
                "b2w": c2,
                "eps": eps,
                "lr": lr,
                "mu": mu,
                "mu_next": mu_next,
                "ok": ok.astype(f64),
            }
            return mx.stack([values[k].reshape(()) for k in CONSTS])

    return mx.compile(consts)


# ------------------------------------------------------------------------- rules
# Each rule: (p, g, state, c) -> (p, state), in the math dtype; ``g`` is the gradient
# with ``maximize`` applied, ``state`` the algorithm's keys in its spec's order, ``c``
# the constants. The weight-decay terms are applied unconditionally (λ = 0 adds 0·θ,
# selected away so that an infinite θ stays finite-free of NaN, as torch skips it).


def _decayed(p: mx.array, g: mx.array, c: mx.array) -> tuple[mx.array, mx.array]:
    """``g ← g + l2·θ`` (where l2 is not 0) and ``θ ← decay·θ``."""
    l2 = c[_C["l2"]]
    g = mx.where(l2 != 0, g + l2 * p, g)
    return p * c[_C["decay"]], g


def lerp(m: mx.array, g: mx.array, c: mx.array) -> mx.array:
    """``lerp(m, g, 1-β1)`` as torch computes it: ``m + w·(g-m)`` for a weight ``w`` below
    ½, else ``g - (g-m)·(1-w)`` (so that β1 = 0 gives ``g`` exactly)."""
    return mx.where(c[_C["lerp_low"]] > 0, m, g) + c[_C["lerp_c1"]] * (g - m)


def _moments(g: mx.array, m: mx.array, v: mx.array, c: mx.array) -> tuple[mx.array, mx.array]:
    """``m ← lerp(m, g, 1-β1)``, ``v ← β2·v + (1-β2)·g·g`` (torch's lerp and addcmul)."""
    return lerp(m, g, c), v * c[_C["beta2"]] + (c[_C["b2w"]] * g) * g


def adam_rule(p: mx.array, g: mx.array, state: list[mx.array], c: mx.array, amsgrad: bool) -> tuple:
    """Adam / AdamW: :func:`adamkit.kernels.reference.adam_rule_`."""
    p, g = _decayed(p, g, c)
    m, v = _moments(g, state[0], state[1], c)
    new = [m, v]
    second = v
    if amsgrad:
        second = mx.maximum(state[2], v)
        new.append(second)
    denom = mx.sqrt(second) / c[_C["bc2_sqrt"]] + c[_C["eps"]]
    return p - c[_C["step_size"]] * (m / denom), new


def adamax_rule(p: mx.array, g: mx.array, state: list[mx.array], c: mx.array, amsgrad: bool) -> tuple:
    """Adamax: :func:`adamkit.kernels.reference.adamax_rule_` (no second bias correction,
    ε inside the maximum)."""
    p, g = _decayed(p, g, c)
    m = lerp(state[0], g, c)
    u = mx.maximum(state[1] * c[_C["beta2"]], mx.abs(g) + c[_C["eps"]])
    return p - c[_C["step_size"]] * (m / u), [m, u]


def nadam_rule(p: mx.array, g: mx.array, state: list[mx.array], c: mx.array, amsgrad: bool) -> tuple:
    """NAdam: :func:`adamkit.kernels.reference.nadam_rule_`; the state's last entry is the
    parameter's ``mu_product``, multiplied by μ_t here."""
    p, g = _decayed(p, g, c)
    m, v = _moments(g, state[0], state[1], c)
    product = state[2] * c[_C["mu"]]
    lr, mu, mu_next = c[_C["lr"]], c[_C["mu"]], c[_C["mu_next"]]
    denom = mx.sqrt(v / c[_C["bc2"]]) + c[_C["eps"]]
    p = p - (lr * (1.0 - mu) / (1.0 - product)) * (g / denom)
    p = p - (lr * mu_next / (1.0 - product * mu_next)) * (m / denom)
    return p, [m, v, product]


RULES: dict[str, Callable[..., tuple]] = {"adam": adam_rule, "adamax": adamax_rule, "nadam": nadam_rule}


# ----------------------------------------------------------------- one parameter
def _dense_step(
    rule: Callable[..., tuple],
    moments: int,
    maximize: bool,
    amsgrad: bool,
    mask: bool,
    skip: bool,
    books: Sequence[Codebook] = (),
) -> Callable[..., tuple]:
    """The step of one parameter with dense state: ``(g, p, c, *state) -> (p, *state,
    masked)``; the math in float32 (float64 for float64 parameters), results stored in
    the parameter's and the state's dtypes. ``state[:moments]`` are moments, the rest
    per-parameter history (NAdam's ``mu_product``). With ``books`` (quantized state),
    each moment arrives as its levels and block scales (:func:`adamkit.mlx._codec.levels`)
    and is decoded here, inside the fused loop, and leaves in float32."""

    def step(g: mx.array, p: mx.array, c: mx.array, *state: mx.array) -> tuple:
        work = mx.float64 if p.dtype == mx.float64 else mx.float32
        wg, wp = g.astype(work), p.astype(work)
        if books:
            decoded = [_codec.scaled(state[2 * i], state[2 * i + 1], b) for i, b in enumerate(books)]
            state = (*decoded, *state[2 * len(books) :])
        ws = [s.astype(work) if i < moments else s for i, s in enumerate(state)]
        new_p, new_s = rule(wp, -wg if maximize else wg, ws, c, amsgrad)
        masked = mx.array(0, mx.uint32)
        if mask:
            finite = finite_(new_s[0])
            for s in new_s[1:moments]:
                finite = finite & finite_(s)
            size = mx.abs(wg)
            bad = ~(size < math.inf) | ((size >= HUGE) & ~finite)
            new_p = mx.where(bad, wp, new_p)
            new_s = [mx.where(bad, old, new) if i < moments else new for i, (old, new) in enumerate(zip(ws, new_s))]
            masked = mx.sum(bad).astype(mx.uint32)
        if skip:
            ok = c[_C["ok"]] > 0
            new_p = mx.where(ok, new_p, wp)
            new_s = [mx.where(ok, new, old) for old, new in zip(ws, new_s)]
        out = [
            _stored(s, old.dtype) if i < moments else s.astype(old.dtype)
            for i, (s, old) in enumerate(zip(new_s, state))
        ]
        return (new_p.astype(p.dtype), *out, masked)

    return step


def finite_(x: mx.array) -> mx.array:
    """``isfinite`` as one comparison (NaN compares false): it fuses into the compiled
    step, where ``mx.isfinite`` costs a third of the step on the CPU."""
    return mx.abs(x) < math.inf


def _stored(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """``x`` in the state dtype: bf16 state flushes float32 subnormals to zero, as the torch
    side stores it (:func:`adamkit.kernels.reference.flush_subnormals_`)."""
    if dtype == mx.bfloat16:
        x = mx.where(mx.abs(x) < 2.0**-126, 0.0 * x, x)
    return x.astype(dtype)


def _quant_step(
    rule: Callable[..., tuple],
    keys: Sequence[str],
    fmt: QuantFormat,
    maximize: bool,
    amsgrad: bool,
    mask: bool,
    skip: bool,
    history: int,
    finite: bool,
) -> Callable[..., tuple]:
    """The step of one parameter with quantized state: ``(g, p, c, step, *state) -> (p,
    *state, masked)``, ``state`` the codes and absmax of each key, then the history.
    Decode (codes written at ``step - 1``), the dense step above, encode at ``step``:
    the reference's ``_quantized_step``. ``finite``: the gradient is known to hold
    nothing non-finite or huge, so the new state is finite (the codec's short path)."""
    books = [fmt.codebook(k) for k in keys]
    # per shape: a shapeless graph broadcasts the block scales with strided loops (2x slower)
    dense = mx.compile(_dense_step(rule, len(keys), maximize, amsgrad, mask, skip, books))
    block = fmt.block_size or DEFAULT_BLOCK[fmt.bits]

    def step(g: mx.array, p: mx.array, c: mx.array, t: mx.array, *state: mx.array, streams: Sequence = ()) -> tuple:
        n = p.size
        gb, pb = _codec.blocked(g, block), _codec.blocked(p, block)
        shape = gb.shape
        before = t - 1
        encoded = []
        for i, book in enumerate(books):
            with _on(streams, i):
                encoded += [_codec.levels(state[2 * i], book, shape, before), state[2 * i + 1]]
        new_p, *rest = dense(gb, pb, c, *encoded, *state[2 * len(keys) :])
        new_dense, new_history, masked = rest[: len(keys)], rest[len(keys) : -1], rest[-1]
        out: list[mx.array] = []
        for book, x in zip(books, new_dense):
            with _on(streams, len(out) // 2):
                out.extend(_codec.quantize(x, book, n, t, finite))
        if skip:  # a skipped step keeps the codes written at the step count it keeps
            ok = c[_C["ok"]] > 0
            out = [mx.where(ok, new, old) for new, old in zip(out, state)]
        return (new_p.reshape(-1)[:n].reshape(p.shape), *out, *new_history, masked)

    return step


def _on(streams: Sequence, i: int) -> Any:
    """The context of the ``i``-th of ``streams`` (round robin), or none without streams:
    the moments' codecs run side by side on the CPU's cores."""
    return mx.stream(streams[i % len(streams)]) if streams else contextlib.nullcontext()


@cache
def compiled(
    algorithm: str,
    keys: tuple[str, ...],
    fmt: QuantFormat | None,
    maximize: bool,
    amsgrad: bool,
    mask: bool,
    skip: bool,
    history: int,
    finite: bool = False,
) -> Callable[..., tuple]:
    """The compiled step of one parameter (built once per argument set). Quantized
    state: the dense step and the codec's stages compiled apart (see
    :func:`adamkit.mlx._codec._stages`), joined in Python."""
    rule = RULES[algorithm]
    if fmt is None:
        return mx.compile(_dense_step(rule, len(keys), maximize, amsgrad, mask, skip), shapeless=True)
    return _quant_step(rule, keys, fmt, maximize, amsgrad, mask, skip, history, finite)
