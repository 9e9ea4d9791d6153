"""The ``adamkit`` command line: ``adamkit demo`` (also ``python -m adamkit``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adamkit", description="Fast, memory-lean Adam-family optimizers.")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="train a small model with each optimizer beside torch.optim")
    demo.add_argument("--steps", type=int, default=200, help="training steps per optimizer (default 200)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from . import demo as demo_module

    return demo_module.main(steps=getattr(args, "steps", 200))


if __name__ == "__main__":
    sys.exit(main())
