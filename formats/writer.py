"""Writing a tallzip archive: sections stream out as they are produced, the manifest goes last.

The file is written under a temporary name beside the target and renamed only when complete, so
an interrupted pack leaves nothing at the target path. Encoding and hashing run on a thread pool
sized to the machine (zstandard and hashlib release the GIL) while the caller computes the next
tensor; the caller only ever waits for the file writes, in order.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import codecs
from .checkpoints import atomic_output
from .constants import FORMAT_VERSION, HEADER_SIZE, HEADER_STRUCT, MAGIC, SECTION_ALIGNMENT

# Sections queued but not yet written hold their input arrays (and, once encoded, their output):
# bound them by bytes per worker (memory) and by count, while keeping every worker busy.
_PENDING_BYTES_PER_WORKER = 32 << 20
_MAX_PENDING = 64
# A context codec keeps the mtv and what it derives from it (bits-ctx: ~5x the mtv's bytes) alive
# while any mask of that tensor waits: charged once per context in flight.
_CONTEXT_COST = 6


def _context_bytes(codec, context) -> int:
    mtv = context.get("mtv") if isinstance(context, dict) else None
    return 0 if codec == "bits+zstd" or mtv is None else _CONTEXT_COST * getattr(mtv, "nbytes", 0)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _encode(codec, array, level, context):
    data, params = codecs.encode(codec, array, level=level, context=context)
    return data, params, hashlib.sha256(data).hexdigest()


def _encode_packed_mask(codec, packed, count, level, context):
    """A mask handed over bit-packed (little bit order, as packed on a GPU, say).

    'bits+zstd' is zstandard over exactly these bytes, so they go to zstandard as they are; any
    other mask codec gets the booleans back."""
    if codec == "bits+zstd":
        data, params = codecs.encode("zstd", packed, level=level)
    else:
        mask = np.unpackbits(packed, count=count, bitorder="little").view(bool)
        data, params = codecs.encode(codec, mask, level=level, context=context)
    return data, params, hashlib.sha256(data).hexdigest()


class ArchiveWriter:
    def __init__(self, target, *, force: bool = False, level: int = 3, workers: int | None = None):
        self.level = level
        self.sections: list[dict] = []
        self._output = atomic_output(target, force=force)
        self._tmp = self._output.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(b"\0" * HEADER_SIZE)
        self._position = HEADER_SIZE
        self.workers = max(1, workers or available_cpus())
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tallzip-encode")
        # One thread writes the encoded sections in the order they were added, so the caller
        # never waits for the disk unless too much is in flight.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tallzip-write")
        self._pending: deque = deque()
        self._pending_bytes = 0
        self._contexts: dict[int, list] = {}  # id(context) -> [sections waiting on it, bytes charged, context]
        self._closed = False

    def add(self, array, *, role: str, tensor: str | None, task: str | None, dtype: str, shape,
            codec: str, context=None, **extra) -> dict:
        """Queue one section; returns its manifest entry (offset, length and checksum fill in when written).

        `array` must not change until the section is written (finish() or later add() calls)."""
        future = self._pool.submit(_encode, codec, array, self.level, context)
        return self._queue(future, array.nbytes, context, role=role, tensor=tensor, task=task, dtype=dtype,
                           shape=shape, codec=codec, **extra)

    def add_packed_mask(self, packed, *, count: int, tensor: str | None, task: str | None, shape,
                        codec: str, context=None, **extra) -> dict:
        """Queue one mask given as little-bit-order packed bytes (numpy uint8) of `count` booleans."""
        if packed.dtype != np.uint8 or packed.size != (count + 7) // 8:
            raise ValueError(f"packed mask: expected {(count + 7) // 8} uint8 bytes, got {packed.size} x {packed.dtype}")
        future = self._pool.submit(_encode_packed_mask, codec, packed, count, self.level, context)
        return self._queue(future, packed.nbytes, context, role="mask", tensor=tensor, task=task, dtype="BOOL",
                           shape=shape, codec=codec, **extra)

    def _queue(self, future, nbytes, context, *, role, tensor, task, dtype, shape, codec, **extra) -> dict:
        entry = {"role": role, "tensor": tensor, "task": task, "dtype": dtype, "shape": list(shape),
                 "codec": codec, **extra}
        written = self._io.submit(self._write, entry, future)
        key = None
        if _context_bytes(codec, context):
            key = id(context)
            if key not in self._contexts:
                self._contexts[key] = [0, _context_bytes(codec, context), context]  # held: its id stays unique
                self._pending_bytes += self._contexts[key][1]
            self._contexts[key][0] += 1
        self._pending.append((written, future, nbytes, key))
        self._pending_bytes += nbytes
        self.sections.append(entry)
        budget = _PENDING_BYTES_PER_WORKER * self.workers
        while self._pending and (len(self._pending) > _MAX_PENDING or self._pending_bytes > budget):
            self._wait_oldest()
        return entry

    def _wait_oldest(self):
        written, _, nbytes, key = self._pending.popleft()
        self._pending_bytes -= nbytes
        if key is not None:
            self._contexts[key][0] -= 1
            if not self._contexts[key][0]:
                self._pending_bytes -= self._contexts.pop(key)[1]
        written.result()  # raises what encoding or writing raised

    def _write(self, entry, future):  # on the writing thread, one section at a time, in order
        data, params, digest = future.result()
        self._align()
        entry["offset"] = self._position
        entry["length"] = len(data)
        entry["params"] = params
        entry["sha256"] = digest
        self._fh.write(data)
        self._position += len(data)

    def _align(self):
        pad = -self._position % SECTION_ALIGNMENT
        if pad:
            self._fh.write(b"\0" * pad)
            self._position += pad

    def finish(self, manifest: dict):
        """Write the manifest and the header, then move the archive onto its target path."""
        while self._pending:
            self._wait_oldest()
        self._io.shutdown()
        manifest = dict(manifest, sections=self.sections)
        blob = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        self._align()
        offset = self._position
        self._fh.write(blob)
        header = struct.pack(HEADER_STRUCT, MAGIC, FORMAT_VERSION, 0, offset, len(blob),
                             hashlib.sha256(blob).digest(), b"\0" * 8)
        self._fh.seek(0)
        self._fh.write(header)
        self._fh.close()
        self._pool.shutdown()
        self._closed = True
        self._output.__exit__(None, None, None)
        return manifest

    def abort(self, exc=None):
        if self._closed:
            return
        self._closed = True
        for written, future, _, _ in self._pending:
            written.cancel()
            future.cancel()
        self._io.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        try:
            self._fh.close()
        except OSError:  # flushing what is buffered fails again on a full disk; the file goes anyway
            pass
        err = exc or RuntimeError("aborted")
        try:
            self._output.__exit__(type(err), err, None)
        except BaseException:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort(exc)
        elif not self._closed:
            self.abort()
        return False
