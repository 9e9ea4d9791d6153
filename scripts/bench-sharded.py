"""Time one optimizer step on FSDP2-sharded GPT-2 shapes, on gloo ranks of this machine.

    python scripts/bench-sharded.py [--world 2] [--layers 4] [--reps 7]

Each rank holds a module of GPT-2 small's parameter shapes (``--layers`` blocks),
``fully_shard``-ed over the ranks, with random gradients. Timed round-robin in the same
processes, medians over ``--reps`` steps after a warm-up: adamkit.AdamW at 32 and 8 bits
and torch.optim.AdamW (its default foreach path on DTensors; torch's fused kernels take
no DTensors on the CPU). Prints each median and its ratio to torch's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adamkit
from adamkit.bench import gpt2_shapes


def _rank(rank: int, world: int, port: int, layers: int, reps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    contenders = {
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
        "adamkit.AdamW": lambda ps: adamkit.AdamW(ps, lr=1e-4),
        "adamkit.AdamW 8-bit": lambda ps: adamkit.AdamW(ps, lr=1e-4, state_bits=8),
    }
    runs = {}
    for name, make in contenders.items():
        module = nn.Module()
        for i, shape in enumerate(gpt2_shapes(layers=layers)):
            module.register_parameter(f"p{i}", nn.Parameter(torch.randn(shape) * 0.02))
        fully_shard(module)
        for p in module.parameters():
            p.grad = distribute_tensor(torch.randn(p.shape) * 1e-3, p.device_mesh, p.placements, src_data_rank=None)
        runs[name] = make(list(module.parameters()))
        runs[name].step()  # warm-up: state created, kernels loaded
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(reps):
        for name, opt in runs.items():
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        base = statistics.median(times["torch.optim.AdamW"])
        params = sum(torch.Size(s).numel() for s in gpt2_shapes(layers=layers))
        print(f"{params / 1e6:.1f}M parameters (GPT-2 small shapes, {layers} blocks), {world} gloo ranks, "
              f"{torch.get_num_threads()} threads each; medians of {reps} steps")  # fmt: skip
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:22s} {med * 1e3:8.1f} ms   {base / med:5.2f}x torch")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(args.world, port, args.layers, args.reps), nprocs=args.world)


if __name__ == "__main__":
    main()
