"""The threads the CPU kernels run on: the caller and a kept pool.

A kernel call is split into work units that every thread claims from one shared
counter (see :func:`adamkit.kernels.cpu.dense._claim`), so any thread may arrive late
or not at all and the call still completes: the caller's own share covers whatever
the pool does not take. That makes the pool simple to share:

* several Python threads may step optimizers at once: choosing the pool and submitting
  to it happen under a lock, and a pool is never shut down under a caller that is
  using it (it only grows: a call that needs more threads replaces it, and the old
  one finishes the work already queued before its threads exit);
* after ``os.fork()`` the child has none of the parent's pool threads: the pool is
  forgotten in the child (``os.register_at_fork``) and a new one is started there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_workers = 0


def _forget_in_child() -> None:
    global _lock, _pool, _workers
    _lock, _pool, _workers = threading.Lock(), None, 0


os.register_at_fork(after_in_child=_forget_in_child)


def on_threads(kernel: Callable[..., int], args: tuple, n_units: int) -> list[int]:
    """``kernel(*args)`` on up to ``torch.get_num_threads()`` threads (the caller is one
    of them, the rest from the kept pool), no more than there are work units; the
    results, the caller's first."""
    global _pool, _workers
    threads = max(1, min(torch.get_num_threads(), n_units))
    if threads == 1:
        return [int(kernel(*args))]
    with _lock:
        if _pool is None or _workers < threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its queued work still runs
            _pool, _workers = ThreadPoolExecutor(threads - 1, thread_name_prefix="adamkit"), threads - 1
        futures = [_pool.submit(kernel, *args) for _ in range(threads - 1)]
    return [int(kernel(*args))] + [int(f.result()) for f in futures]
