"""The convergence check of ``stdlib_char_lm.py`` in MLX: a character-level transformer
trained on the source of Python's standard library with ``mlx.optimizers.AdamW``
(``bias_correction=True``: torch's math, the fp32 baseline) and ``adamkit.mlx.AdamW``
at 32, 8 and 4 bits of optimizer state.

Every run starts from the same weights and sees the same batches, with a warm-up and
cosine schedule, gradient clipping at 1 and weight decay 0.1; the training step,
optimizer update included, is one ``mx.compile``d function with the model and
optimizer state as its inputs and outputs. Final losses (mean training loss of the
last 10 % of the steps, and the held-out loss) go to the console and to a JSON file;
``--plot`` draws the curves (matplotlib).

The model is smaller than the torch example's (width 64, 2 layers, context 64, batch
16: 120K parameters): MLX's Linux CPU build multiplies matrices at about 4 GFLOP/s on
the 2-core machines adamkit is tested on (torch: 86), so the torch example's model
would take 12 s a step.

    python examples/mlx_char_lm.py --out docs/mlx-char-lm.json --plot docs/mlx-char-lm.png
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import adamkit.mlx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from stdlib_char_lm import stdlib_text  # noqa: E402  (the same text as the torch example)


class CharTransformer(nn.Module):
    """A small GPT: byte embeddings, learned positions, pre-norm blocks, tied head."""

    def __init__(self, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.TransformerEncoder(layers, d, heads, 4 * d, norm_first=True)
        self.norm = nn.LayerNorm(d)

    def __call__(self, x: mx.array) -> mx.array:
        t = x.shape[1]
        h = self.tok(x) + self.pos(mx.arange(t))
        mask = nn.MultiHeadAttention.create_additive_causal_mask(t)
        return self.tok.as_linear(self.norm(self.blocks(h, mask)))


OPTIMIZERS = {
    "mlx AdamW (fp32)": lambda lr: optim.AdamW(lr, weight_decay=0.1, bias_correction=True),
    "adamkit.mlx AdamW 32-bit": lambda lr: adamkit.mlx.AdamW(lr, weight_decay=0.1),
    "adamkit.mlx AdamW 8-bit": lambda lr: adamkit.mlx.AdamW(lr, weight_decay=0.1, state_bits=8),
    "adamkit.mlx AdamW 4-bit": lambda lr: adamkit.mlx.AdamW(lr, weight_decay=0.1, state_bits=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bytes", type=int, default=4_000_000, help="how much of the stdlib to read")
    parser.add_argument("--out", default="mlx-char-lm.json", help="the results (JSON)")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot the loss curves (matplotlib)")
    args = parser.parse_args()
    if args.plot:  # before minutes of training, not after them
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("--plot needs matplotlib: pip install matplotlib")

    data = np.frombuffer(stdlib_text(args.bytes), dtype=np.uint8).astype(np.int32)
    split = int(len(data) * 0.95)
    train, held = data[:split], data[split:]
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(train) - args.ctx - 1, (args.steps, args.batch))
    eval_starts = rng.integers(0, len(held) - args.ctx - 1, (16, args.batch))

    def batch(src: np.ndarray, idx: np.ndarray) -> tuple[mx.array, mx.array]:
        rows = np.stack([src[i : i + args.ctx + 1] for i in idx])
        return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])

    mx.random.seed(0)
    init = tree_flatten(CharTransformer(args.ctx, args.d, args.layers, 4).parameters())
    n_params = sum(v.size for _, v in init)
    print(f"{len(data):,} bytes of stdlib source, {n_params:,} parameters, {args.steps} steps")
    warmup = max(1, args.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(args.lr / warmup, args.lr, warmup), optim.cosine_decay(args.lr, args.steps - warmup)],
        [warmup],
    )

    def loss_fn(model: CharTransformer, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    results, curves = {}, {}
    for name, make in OPTIMIZERS.items():
        model = CharTransformer(args.ctx, args.d, args.layers, 4)
        model.load_weights(init)
        opt = make(schedule)
        loss_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x: mx.array, y: mx.array, opt=opt, model=model, loss_and_grad=loss_and_grad) -> mx.array:
            loss, grads = loss_and_grad(model, x, y)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            return loss

        losses, t0 = [], time.perf_counter()
        for s in range(args.steps):
            loss = step(*batch(train, starts[s]))
            mx.eval(state, loss)
            losses.append(loss.item())
        held_loss = sum(loss_fn(model, *batch(held, idx)).item() for idx in eval_starts) / len(eval_starts)
        tail = losses[-max(1, args.steps // 10) :]
        state_bytes = sum(v.nbytes for k, v in tree_flatten(opt.state) if "." in k)
        results[name] = {
            "final_train_loss": sum(tail) / len(tail),
            "held_out_loss": held_loss,
            "state_bytes_per_param": state_bytes / n_params,
            "seconds": time.perf_counter() - t0,
        }
        curves[name] = losses
        r = results[name]
        print(
            f"{name:26s} train {r['final_train_loss']:.4f}  held-out {r['held_out_loss']:.4f}  "
            f"state {r['state_bytes_per_param']:.2f} B/param  {r['seconds']:.0f} s",
            flush=True,
        )
    base = results["mlx AdamW (fp32)"]["held_out_loss"]
    for name, r in results.items():
        r["held_out_vs_fp32"] = r["held_out_loss"] / base - 1
        print(f"{name:26s} held-out loss {r['held_out_vs_fp32']:+.2%} vs mlx AdamW fp32")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "parameters": n_params, "results": results, "losses": curves}, f, indent=1)
    print(f"results written to {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        k = max(1, args.steps // 60)
        for name, values in curves.items():
            smooth = [float(np.mean(values[max(0, i - k) : i + 1])) for i in range(len(values))]
            ax.plot(smooth, label=f"{name}: held-out {results[name]['held_out_loss']:.3f}", linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (nats/char, mean of {k + 1} steps)")
        ax.set_title("char-level transformer on Python's stdlib source (MLX)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    if not all(math.isfinite(r["held_out_loss"]) for r in results.values()):
        sys.exit("a run diverged")


if __name__ == "__main__":
    main()
