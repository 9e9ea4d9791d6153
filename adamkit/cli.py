"""The ``adamkit`` command line: ``adamkit bench`` (the main job) and ``adamkit demo``.

Also ``python -m adamkit ...``; with no subcommand, ``bench`` runs.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import bench

    parser = argparse.ArgumentParser(prog="adamkit", description="Fast, memory-lean Adam-family optimizers.")
    sub = parser.add_subparsers(dest="command")
    bench.add_arguments(sub.add_parser("bench", help="time adamkit and its peers (torch, bitsandbytes) side by side"))
    demo = sub.add_parser("demo", help="train a small model with each optimizer beside torch.optim")
    demo.add_argument("--steps", type=int, default=200, help="training steps per optimizer (default 200)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["bench"])
    if args.command == "demo":
        from . import demo as demo_module

        return demo_module.main(steps=args.steps)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
