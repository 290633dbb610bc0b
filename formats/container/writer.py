"""Writing a tallzip archive (format version 2): chunks stream out as they are coded, the manifest goes last.

The file is written under a temporary name beside the target and renamed only when complete, so
an interrupted pack leaves nothing at the target path. The writer only places bytes: callers code
chunks (encode_chunk, on any thread) and hand them over in the order they are to lie in the file,
which makes the archive's bytes independent of how the coding was scheduled.
"""
from __future__ import annotations

import hashlib
import os
import struct

import blake3
import numpy as np

from tallzip.formats.codecs import registry as codecs
from tallzip.formats.container.manifest import encode_manifest
from tallzip.formats.checkpoints.outputs import atomic_output
from tallzip.formats.container.constants import (DEFAULT_CHUNK_ELEMENTS, FORMAT_VERSION, HEADER_SIZE, HEADER_STRUCT, MAGIC, SECTION_ALIGNMENT)


def chunk_digest(data) -> str:
    return blake3.blake3(data).hexdigest()


def encode_chunk(codec: str, array: np.ndarray, level: int = 3, context=None):
    """One chunk coded: (stored bytes, codec params, blake3 hex digest). Thread-safe; releases the GIL
    in zstandard, numpy and blake3."""
    data, params = codecs.encode(codec, array, level=level, context=context)
    return data, params, chunk_digest(data)


def encode_packed_mask_chunk(codec: str, packed: np.ndarray, count: int, level: int = 3, context=None):
    """A mask chunk handed over bit-packed (little bit order): a codec that stores these bytes as they are
    (bits+zstd) codes them directly; any other mask codec gets the booleans back."""
    if packed.dtype != np.uint8 or packed.size != (count + 7) // 8:
        raise ValueError(f"packed mask: expected {(count + 7) // 8} uint8 bytes, got {packed.size} x {packed.dtype}")
    if codecs.codes_packed_bits(codec):
        data, params = codecs.encode_packed(codec, packed, level=level)
    else:
        mask = np.unpackbits(packed, count=count, bitorder="little").view(bool)
        data, params = codecs.encode(codec, mask, level=level, context=context)
    return data, params, chunk_digest(data)


class ArchiveWriter:
    def __init__(self, target, *, force: bool = False, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, inputs=()):
        self.chunk_elements = chunk_elements
        self.sections: list[dict] = []
        self._output = atomic_output(target, force=force, inputs=inputs)
        self._tmp = self._output.__enter__()
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._position = HEADER_SIZE
        self._closed = False

    def section(self, *, role: str, tensor: str, task: str | None, dtype: str, shape, codec: str, **extra) -> dict:
        """A new section's manifest entry; its chunks follow with write_chunk, in plan order."""
        entry = {"role": role, "tensor": tensor, "task": task, "dtype": dtype, "shape": list(shape),
                 "codec": codec, "length": 0, **extra, "chunks": []}
        if role == "mask":
            entry["ones"] = 0
        self.sections.append(entry)
        return entry

    def write_chunk(self, entry: dict, data, params: dict, digest: str, ones: int | None = None):
        """Append one coded chunk of `entry` to the file (64-byte aligned) and record it."""
        self._position += -self._position % SECTION_ALIGNMENT
        chunk = {"offset": self._position, "length": len(data), "params": params, "blake3": digest}
        if ones is not None:
            chunk["ones"] = int(ones)
            entry["ones"] += int(ones)
        self._pwrite(data, self._position)
        self._position += len(data)
        entry["length"] += len(data)
        entry["chunks"].append(chunk)
        return chunk

    def drop(self, entry: dict):
        """Stop listing a section (its bytes stay in the file, named by no section: readers skip them)."""
        self.sections = [e for e in self.sections if e is not entry]

    def _pwrite(self, data, offset):
        view = memoryview(data).cast("B")
        while len(view):
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def finish(self, manifest: dict):
        """Write the manifest and the header, then move the archive onto its target path."""
        manifest = dict(manifest, version=FORMAT_VERSION, chunk_elements=self.chunk_elements, sections=self.sections)
        blob, flags = encode_manifest(manifest)
        self._position += -self._position % SECTION_ALIGNMENT
        offset = self._position
        self._pwrite(blob, offset)
        os.ftruncate(self._fd, offset + len(blob))  # the manifest runs to the end of the file
        header = struct.pack(HEADER_STRUCT, MAGIC, FORMAT_VERSION, flags, offset, len(blob),
                             hashlib.sha256(blob).digest(), b"\0" * 8)
        self._pwrite(header, 0)  # last: an interrupted write leaves no valid header
        os.close(self._fd)
        self._closed = True
        self._output.__exit__(None, None, None)
        return manifest

    def abort(self, exc=None):
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self._fd)
        except OSError:
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
