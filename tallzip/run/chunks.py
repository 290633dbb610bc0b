"""Chunks as units of work: the memory budget, and a bounded pipeline that runs chunk jobs on a
thread pool and hands their results back in order.

pack, extract, load, verify and merge all walk a model chunk by chunk (formats/chunking.py cuts
tensors the same way on every machine). Each job says what it costs in bytes; the pipeline starts
a job only while the jobs in flight, and the results not yet taken, fit the budget (always at least
one), and never more than a few per CPU. zstandard, blake3, numpy, torch and pread release the
GIL, so threads keep every core busy.
"""
from __future__ import annotations

import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from tallzip.errors import TallzipError
from tallzip.formats.container.chunking import chunk_plan, chunk_shape, chunk_step  # noqa: F401 - re-exported
from tallzip.formats.container.constants import DEFAULT_CHUNK_ELEMENTS, MAX_CHUNK_ELEMENTS, MIN_CHUNK_ELEMENTS
from tallzip.run.threads import available_cpus

# Above the interpreter and the model a command is asked to hold (load() holds the model itself).
DEFAULT_MEMORY = 3 << 29  # 1.5 GiB
MIN_MEMORY = 64 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(value) -> int:
    """Bytes from 1610612736, '1.5G', '256M', '512MiB', '2GB' (binary units); None: the default."""
    if value is None:
        return DEFAULT_MEMORY
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", str(value))
        if not match:
            raise TallzipError(f"memory budget {value!r}: expected a size such as 1.5G or 256M")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if number < MIN_MEMORY:
        raise TallzipError(f"memory budget {value!r} is below the minimum of {MIN_MEMORY >> 20}M")
    return int(number)


def checked_chunk_elements(value) -> int:
    value = DEFAULT_CHUNK_ELEMENTS if value is None else value
    if type(value) is not int or not MIN_CHUNK_ELEMENTS <= value <= MAX_CHUNK_ELEMENTS:
        raise TallzipError(f"chunk elements must be an integer from {MIN_CHUNK_ELEMENTS} to {MAX_CHUNK_ELEMENTS}, "
                           f"got {value!r}")
    return value


def ordered_map(job: Callable, items: Iterable, *, cost: Callable, budget: int,
                workers: int | None = None) -> Iterator:
    """Yield job(item) for every item, in order, computing up to a few ahead on `workers` threads.

    A job starts only while the costs of the jobs started and not yet handed back stay within
    `budget` (the first one always starts). A result is charged until the caller asks for the next
    one, so the caller should be done with it by then. The first error is raised in order; the jobs
    after it are cancelled."""
    workers = max(1, workers or available_cpus())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tallzip-chunk") as pool:
        yield from ordered_window(items, submit=lambda item: pool.submit(job, item),
                                  result=lambda future, item: future.result(), cancel=lambda future: future.cancel(),
                                  cost=cost, budget=budget, max_ahead=2 * workers)


def ordered_window(items: Iterable, *, submit: Callable, result: Callable, cancel: Callable, cost: Callable,
                   budget: int | None, max_ahead: int) -> Iterator:
    """THE ordered, bounded window (ordered_map's threads and the engines' workers both run through it):
    yields result(submit(item), item) for every item, in order. An item is submitted only while fewer than
    `max_ahead` are in flight and the costs of those submitted and not yet handed back stay within `budget`
    (None: no byte bound); with none in flight one always starts, however costly. A result stays charged
    until the caller asks for the next one. The first error is raised in order; cancel(handle) is called
    for every item still in flight."""
    items = iter(items)
    pending: deque = deque()  # (handle, item, cost), in item order
    charged = 0
    upcoming = next(items, _END)
    try:
        while True:
            while upcoming is not _END and len(pending) < max_ahead:
                c = cost(upcoming)
                if pending and budget is not None and charged + c > budget:
                    break
                pending.append((submit(upcoming), upcoming, c))
                charged += c
                upcoming = next(items, _END)
            if not pending:
                return
            handle, item, c = pending.popleft()
            value = result(handle, item)
            yield value
            del value
            charged -= c
    finally:
        for handle, _, _ in pending:
            cancel(handle)


_END = object()


def workers_within(budget: int, largest_cost: int, workers: int | None = None) -> int:
    """How many chunk threads a budget holds. Each thread's malloc arena keeps about the memory of the
    largest job it ran, freed or not (glibc raises its mmap threshold after the first big free, so
    later chunk-sized buffers come from the arena; measured: 2 threads with 1 job in flight held 2
    jobs' RSS): a thread costs its job in flight plus what its arena keeps, two largest jobs. At
    least one thread; the default 1.5G budget holds two for jobs up to ~375 MB."""
    return max(1, min(workers or available_cpus(), budget // (2 * max(largest_cost, 1))))


class BufferPool:
    """Per-thread scratch buffers reused from one chunk job to the next: a fresh buffer of tens of
    MB costs its page faults every time (they were ~45% of pack's CPU with whole-tensor temporaries)."""

    def __init__(self):
        self._local = threading.local()

    def get(self, key, nbytes: int, factory):
        """A buffer of at least `nbytes` made by factory(nbytes), kept for this thread under `key`."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = {}
        buf = store.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = store[key] = factory(nbytes)
        return buf
