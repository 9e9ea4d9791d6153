"""Convergence check on real data: a character-level transformer trained on the
source of Python's own standard library (on every machine; nothing to download) with
``torch.optim.AdamW`` and adamkit's AdamW at 32, 8 and 4 bits of optimizer state.

Every run starts from the same weights and sees the same batches; the loss curves go
to a PNG and the final losses (mean training loss of the last 10% of the steps, and
the loss on held-out text) to the console and to a JSON file, rewritten after each
optimizer, so a run cut short keeps what it finished. The plot needs matplotlib
(``pip install -e '.[bench]'``), checked before training starts; ``--no-plot`` writes
the JSON alone.

    python examples/stdlib_char_lm.py --steps 800 --out docs/stdlib-char-lm.png
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import sysconfig
import time

import torch
from torch import nn

import adamkit


def stdlib_text(limit: int) -> bytes:
    """Up to ``limit`` bytes of the standard library's .py files, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(out)[:limit]


class CharTransformer(nn.Module):
    """A small GPT: byte embeddings, learned positions, pre-norm blocks, tied head."""

    def __init__(self, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        h = self.norm(self.blocks(h, mask=self.mask[:t, :t], is_causal=True))
        return h @ self.tok.weight.T


OPTIMIZERS = {
    "torch AdamW (fp32)": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1),
    "adamkit AdamW 32-bit": lambda ps, lr: adamkit.AdamW(ps, lr=lr, weight_decay=0.1),
    "adamkit AdamW 8-bit": lambda ps, lr: adamkit.AdamW(ps, lr=lr, weight_decay=0.1, state_bits=8),
    "adamkit AdamW 4-bit": lambda ps, lr: adamkit.AdamW(ps, lr=lr, weight_decay=0.1, state_bits=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=96)
    parser.add_argument("--d", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bytes", type=int, default=4_000_000, help="how much of the stdlib to read")
    parser.add_argument("--out", default="stdlib-char-lm.png", help="the plot; a .json beside it")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    args = parser.parse_args()
    if not args.no_plot:  # before minutes of training, not after them
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit(
                "stdlib_char_lm.py plots with matplotlib, which is not installed: pip install matplotlib "
                "(or pip install -e '.[bench]'), or pass --no-plot to write the JSON alone"
            )
    json_path = pathlib.Path(args.out).with_suffix(".json")

    def save(results: dict, curves: dict) -> None:
        with open(json_path, "w") as f:
            json.dump({"args": vars(args), "parameters": n_params, "results": results, "losses": curves}, f, indent=1)

    data = torch.frombuffer(bytearray(stdlib_text(args.bytes)), dtype=torch.uint8).long()
    split = int(len(data) * 0.95)
    train, held = data[:split], data[split:]
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(train) - args.ctx - 1, (args.steps, args.batch), generator=gen)
    eval_starts = torch.randint(0, len(held) - args.ctx - 1, (16, args.batch), generator=gen)

    def batch(src: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([src[i : i + args.ctx + 1] for i in idx.tolist()])
        return rows[:, :-1], rows[:, 1:]

    torch.manual_seed(0)
    init = CharTransformer(args.ctx, args.d, args.layers, 4).state_dict()
    n_params = sum(v.numel() for v in init.values())
    print(f"{len(data):,} bytes of stdlib source, {n_params:,} parameters, {args.steps} steps")
    warmup = max(1, args.steps // 20)

    def schedule(s: int) -> float:  # linear warm-up, cosine decay
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))

    curves, results = {}, {}
    for name, make in OPTIMIZERS.items():
        model = CharTransformer(args.ctx, args.d, args.layers, 4)
        model.load_state_dict(init)
        opt = make(model.parameters(), args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        losses, t0 = [], time.perf_counter()
        for step in range(args.steps):
            x, y = batch(train, starts[step])
            loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        with torch.no_grad():
            held_loss = sum(
                nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
                for x, y in (batch(held, idx) for idx in eval_starts)
            ) / len(eval_starts)
        tail = losses[-max(1, args.steps // 10) :]
        state_bytes = sum(
            v.nbytes for st in opt.state.values() for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step"
        )
        results[name] = {
            "final_train_loss": sum(tail) / len(tail),
            "held_out_loss": held_loss,
            "state_bytes_per_param": state_bytes / n_params,
            "seconds": time.perf_counter() - t0,
        }
        curves[name] = losses
        save(results, curves)
        r = results[name]
        print(
            f"{name:24s} train {r['final_train_loss']:.4f}  held-out {r['held_out_loss']:.4f}  "
            f"state {r['state_bytes_per_param']:.2f} B/param  {r['seconds']:.0f} s"
        )
    base = results["torch AdamW (fp32)"]["held_out_loss"]
    for name, r in results.items():
        r["held_out_vs_fp32"] = r["held_out_loss"] / base - 1
        print(f"{name:24s} held-out loss {r['held_out_vs_fp32']:+.2%} vs torch AdamW fp32")
    save(results, curves)
    print(f"results written to {json_path}")
    if args.no_plot:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    k = max(1, args.steps // 60)
    for name, losses in curves.items():
        smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
        label = f"{name}: held-out {results[name]['held_out_loss']:.3f}"
        ax.plot(smooth, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (nats/char, mean of {k + 1} steps)")
    ax.set_title("char-level transformer on Python's stdlib source")
    low = min(min(c) for c in curves.values())
    ax.set_ylim(bottom=low - 0.1, top=min(4.0, max(max(c[k:]) for c in curves.values())))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
