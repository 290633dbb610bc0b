"""Reading a tallzip archive: header, manifest, and any one section, each checked before use.

Nothing is trusted before it is checked: the header's manifest checksum, the manifest's structure
and bounds (before any allocation they imply), and each section's checksum before it is decoded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

from . import codecs
from .constants import (DTYPE_SIZES, FORMAT_VERSION, HEADER_SIZE, HEADER_STRUCT, MAGIC,
                        MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, MAX_TENSOR_ELEMENTS)
from .errors import CorruptArchiveError, FormatError, UnsupportedVersionError
from .tensors import bits_dtype

# An honest zstandard frame expands at most ~32768x (one RLE byte per 128 KiB block); a section
# that declares more than that over its stored length is a bomb, refused before decoding.
MAX_EXPANSION = 1 << 15
_SLACK = 1 << 20


def _depth(value, level=0):
    if level > MAX_JSON_DEPTH:
        raise CorruptArchiveError(f"manifest is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _depth(item, level + 1)
    elif isinstance(value, list):
        for item in value:
            _depth(item, level + 1)


def section_label(entry: dict) -> str:
    parts = [entry.get("role", "?")]
    if entry.get("task") is not None:
        parts.append(f"task {entry['task']!r}")
    if entry.get("tensor") is not None:
        parts.append(f"tensor {entry['tensor']!r}")
    return " ".join(parts)


def decoded_size(entry: dict) -> int:
    """Bytes of the section's plain form: bit-packed for masks, itemsize x count otherwise."""
    count = math.prod(entry["shape"])
    return (count + 7) // 8 if entry["role"] == "mask" else count * DTYPE_SIZES[entry["dtype"]]


class ArchiveReader:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such archive") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a folder, not an archive") from None
        self.size = os.fstat(self._fd).st_size
        header = self._pread(0, HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[:8] != MAGIC:
            raise FormatError(f"{self.path}: not a tallzip archive")
        _, version, flags, offset, length, digest, _ = struct.unpack(HEADER_STRUCT, header)
        if version != FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"{self.path}: archive format version {version}; this tallzip reads version {FORMAT_VERSION}")
        if flags != 0:
            raise CorruptArchiveError(f"{self.path}: damaged header (unknown flags {flags:#x})")
        if length > MAX_MANIFEST_BYTES or offset < HEADER_SIZE or offset + length != self.size:
            raise CorruptArchiveError(f"{self.path}: damaged or truncated archive (manifest out of bounds)")
        blob = self._pread(offset, length)
        if hashlib.sha256(blob).digest() != digest:
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest checksum mismatch)")
        try:
            self.manifest = json.loads(blob)
        except (ValueError, RecursionError):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest is not valid JSON)") from None
        _depth(self.manifest)
        self._data_end = offset
        self._index = {}
        self._check_sections()

    def _pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def _check_sections(self):
        sections = self.manifest.get("sections") if isinstance(self.manifest, dict) else None
        if not isinstance(sections, list):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest has no section table)")
        for entry in sections:
            try:
                ok = (isinstance(entry["offset"], int) and isinstance(entry["length"], int)
                      and HEADER_SIZE <= entry["offset"] and 0 <= entry["length"]
                      and entry["offset"] + entry["length"] <= self._data_end
                      and entry["dtype"] in DTYPE_SIZES and entry["codec"] in codecs.names()
                      and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
                      and math.prod(entry["shape"]) <= MAX_TENSOR_ELEMENTS
                      and decoded_size(entry) <= MAX_EXPANSION * entry["length"] + _SLACK
                      and isinstance(entry["sha256"], str) and isinstance(entry.get("params", {}), dict))
            except (KeyError, TypeError):
                ok = False
            if not ok:
                label = section_label(entry) if isinstance(entry, dict) else "?"
                raise CorruptArchiveError(f"{self.path}: damaged archive (bad entry for section {label})")
            key = (entry["role"], entry.get("tensor"), entry.get("task"))
            if key in self._index:
                raise CorruptArchiveError(f"{self.path}: damaged archive (section {section_label(entry)} twice)")
            self._index[key] = entry

    def section(self, role: str, tensor: str | None, task: str | None = None) -> dict | None:
        return self._index.get((role, tensor, task))

    def read_bytes(self, entry: dict) -> bytes:
        data = self._pread(entry["offset"], entry["length"])
        if len(data) != entry["length"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptArchiveError(f"{self.path}: damaged archive (checksum mismatch in section {section_label(entry)})")
        return data

    def read(self, entry: dict, context=None):
        """The section's decoded flat array: uint views of float bits, bool for masks."""
        data = self.read_bytes(entry)
        dtype = bool if entry["role"] == "mask" else bits_dtype(entry["dtype"])
        try:
            return codecs.decode(entry["codec"], data, dtype=dtype, count=math.prod(entry["shape"]),
                                 params=entry.get("params", {}), context=context)
        except (codecs.CodecError, ValueError, KeyError, TypeError) as exc:
            raise CorruptArchiveError(f"{self.path}: damaged archive (section {section_label(entry)}: {exc})") from None

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
