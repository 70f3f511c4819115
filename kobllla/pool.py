"""Process pools for the corpus builders: results in input order, a bounded number in flight.

``kobllla.wiki.build`` (dump -> text) and ``kobllla.pretokenized`` (text -> tokens) both stream
an input far larger than memory through worker processes and must write results in input
order, so the output is the same for any number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def start_pool(workers: int, *, initializer: Callable[..., None] | None = None,
               initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes (forked where the platform can), started now.

    The workers are started before returning, so they fork before tqdm's monitor thread exists.
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)
    pool.submit(int).result()
    return pool


def ordered_map(
    pool: ProcessPoolExecutor | None, fn: Callable[[T], R], items: Iterable[T], *, window: int
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, at most ``window`` items in flight; no pool: in this process.

    A worker killed by the OS (out of memory) raises ``BrokenProcessPool`` instead of hanging.
    """
    if pool is None:
        for item in items:
            yield item, fn(item)
        return
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()
