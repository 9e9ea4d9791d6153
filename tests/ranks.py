"""Run a function on several gloo ranks, each a fresh process (``spawn``), and collect
what each rank returns. The functions live in :mod:`dist_workers`; a rank's exception,
a crash or a hang fails the calling test with the rank's traceback."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: str, args: tuple[Any, ...], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as torchrun: no oversubscription
        import dist_workers

        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = getattr(dist_workers, target)(rank, world, *args)
        with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # done, results written: leave without running C++ static destructors, whose gloo
    # threads abort a process now and then at exit ("terminate called without an active
    # exception", exit code -6) after everything has finished
    os._exit(0)


def run_ranks(world: int, target: str, *args: Any, timeout: float = 600) -> list[Any]:
    """``dist_workers.<target>(rank, world, *args)`` on ``world`` gloo ranks (the process
    group initialized, ``RANK``/``WORLD_SIZE`` set): the ranks' results, in rank order."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(r, world, port, target, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = []
        for r in range(world):
            path = os.path.join(out, f"{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"rank {r}:\n{f.read()}")
        if errors or hung or any(p.exitcode for p in procs):
            codes = [p.exitcode for p in procs]
            raise AssertionError(f"{target} on {world} ranks: exit codes {codes}, hung {hung}\n" + "\n".join(errors))
        results = []
        for r in range(world):
            with open(os.path.join(out, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
