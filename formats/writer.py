"""Writing a tallzip archive: sections stream out as they are produced, the manifest goes last.

The file is written under a temporary name beside the target and renamed only when complete, so
an interrupted pack leaves nothing at the target path. Encoding runs on a small thread pool (the
codecs release the GIL) while the caller computes the next tensor.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from . import codecs
from .checkpoints import atomic_output
from .constants import FORMAT_VERSION, HEADER_SIZE, HEADER_STRUCT, MAGIC, SECTION_ALIGNMENT

_MAX_PENDING = 8  # encoded sections waiting to be written: bounds memory, keeps the pool busy


class ArchiveWriter:
    def __init__(self, target, *, force: bool = False, level: int = 3, workers: int = 2):
        self.level = level
        self.sections: list[dict] = []
        self._output = atomic_output(target, force=force)
        self._tmp = self._output.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(b"\0" * HEADER_SIZE)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers))
        self._pending: deque = deque()
        self._closed = False

    def add(self, array, *, role: str, tensor: str | None, task: str | None, dtype: str, shape,
            codec: str, context=None, **extra) -> dict:
        """Queue one section; returns its manifest entry (offset, length and checksum fill in when written)."""
        entry = {"role": role, "tensor": tensor, "task": task, "dtype": dtype, "shape": list(shape),
                 "codec": codec, **extra}
        future = self._pool.submit(codecs.encode, codec, array, level=self.level, context=context)
        self._pending.append((entry, future))
        self.sections.append(entry)
        while len(self._pending) > _MAX_PENDING:
            self._write_next()
        return entry

    def _write_next(self):
        entry, future = self._pending.popleft()
        data, params = future.result()
        self._align()
        entry["offset"] = self._fh.tell()
        entry["length"] = len(data)
        entry["params"] = params
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        self._fh.write(data)

    def _align(self):
        pad = -self._fh.tell() % SECTION_ALIGNMENT
        if pad:
            self._fh.write(b"\0" * pad)

    def finish(self, manifest: dict):
        """Write the manifest and the header, then move the archive onto its target path."""
        while self._pending:
            self._write_next()
        manifest = dict(manifest, sections=self.sections)
        blob = json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode()
        self._align()
        offset = self._fh.tell()
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
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._fh.close()
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
