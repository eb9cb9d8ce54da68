"""Parallelism across tiles for the blockwise engine on CPUs.

PyTorch parallelises each operation over its intra-op threads and joins them at the end of
every operation. A tile loop issues many small operations, so when another process holds one of
the cores (a data-loader worker, a second job) every join waits for the thread that lost its
core, and the loop slows by far more than the core it lost. Here the loop's independent pieces
(groups of row blocks) go instead to a pool of worker threads, each running PyTorch on one
thread: a worker that loses its core delays only the piece it holds, and the others take the
remaining pieces. PyTorch releases the GIL inside its operations, so the workers run in
parallel.

The pieces and the order their results are combined in depend only on the shapes, never on
which worker ran what, so results are bitwise identical from run to run and for any thread
count (one thread runs the same pieces in the calling thread).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: Dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child (a DataLoader worker): the parent's worker threads do not exist there,
    so its pools would never run a job; start afresh."""
    global _lock
    _pools.clear()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, each set to one intra-op thread, created once per size."""
    with _lock:
        pool = _pools.get(workers)
        if pool is not None:
            return pool
        before = torch.get_num_threads()
        ready = threading.Barrier(workers + 1)

        def init():
            # run one operation first: PyTorch sets a thread's thread count at its first
            # parallel operation, which would undo a setting made before it
            torch.ones(2).sum()
            torch.set_num_threads(1)
            ready.wait()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="fastcl-tiles", initializer=init)
        for _ in range(workers):  # start every worker now, so the setting below is the last one
            pool.submit(int)
        ready.wait()
        # torch.set_num_threads also sets the default for threads created later: restore it
        torch.set_num_threads(before)
        _pools[workers] = pool
        return pool


def workers_for(device: torch.device) -> int:
    """How many workers a tile loop on ``device`` may use: the intra-op thread count on a CPU,
    1 elsewhere (a GPU queues the work itself)."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def map_in_order(job: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``job(item)`` for every item, results yielded in the items' order.

    With ``workers > 1`` the jobs run on the pool under the caller's grad mode; otherwise one by
    one in the calling thread (each result is produced when it is consumed).
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return map(job, items)
    grad = torch.is_grad_enabled()

    def run(item):
        with torch.set_grad_enabled(grad):
            return job(item)

    return _pool(workers).map(run, items)
