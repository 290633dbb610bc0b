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

import numpy as np

from . import codecs
from .constants import (DTYPE_SIZES, FLOAT_DTYPES, FORMAT_VERSION, HEADER_SIZE, HEADER_STRUCT, KIND_MASKED, KIND_SHARED,
                        MAGIC, MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, MAX_TENSOR_ELEMENTS, ROLE_BASE, ROLE_MASK,
                        ROLE_MTV, ROLE_OWN)
from .errors import CorruptArchiveError, FormatError, UnsupportedVersionError
from .tensors import bits_dtype

# An honest zstandard frame expands at most ~32768x (one RLE byte per 128 KiB block); a section
# that declares more than that over its stored length is a bomb, refused before decoding.
MAX_EXPANSION = 1 << 15
_SLACK = 1 << 20
# json.loads makes a Python object of every value, ~70 bytes for an empty {} or []: 256 MiB of "{},"
# would take ~6 GB. An honest manifest has ~19 values per section (~330 bytes), so 16M values is
# more than any archive within MAX_MANIFEST_BYTES holds, and bounds the parse to ~1 GB.
MAX_MANIFEST_VALUES = 16_000_000
# Section roles and tensor kinds (SPEC.md); the manifest is checked against them before use.
_ROLES = {ROLE_BASE, ROLE_MTV, ROLE_MASK, ROLE_OWN, "file"}
_KINDS = {KIND_MASKED, KIND_SHARED, "per-task"}
_LAYOUTS = {"file", "folder"}


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
    role = entry.get("role")
    parts = [role if isinstance(role, str) else "?"]
    if entry.get("task") is not None:
        parts.append(f"task {entry['task']!r}")
    if entry.get("tensor") is not None:
        parts.append(f"tensor {entry['tensor']!r}")
    return " ".join(parts)


def decoded_size(entry: dict) -> int:
    """Bytes of the section's plain form: bit-packed for masks, itemsize x count otherwise."""
    count = math.prod(entry["shape"])
    return (count + 7) // 8 if entry["role"] == "mask" else count * DTYPE_SIZES[entry["dtype"]]


def _one_of(value, allowed) -> bool:
    return isinstance(value, str) and value in allowed  # a list in a set lookup would raise


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # bool is an int to isinstance; not here


def _is_shape(value) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(_is_count(d) for d in value)


def is_plain_file_name(name) -> bool:
    """A name that extract may create inside its output folder: no path, nothing hidden behind it."""
    return (isinstance(name, str) and name not in ("", ".", "..") and len(name) <= 255
            and not any(c in name for c in "/\\\0"))


def _is_metadata(value) -> bool:
    return value is None or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))


def _is_dtype_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and _one_of(pair[1], DTYPE_SIZES)
        for pair in value)


def _is_sharding(value, names) -> bool:
    """{"files": {shard file: [tensor names of this task]}, "metadata": {...}}."""
    files = value.get("files") if isinstance(value, dict) else None
    return (isinstance(files, dict) and isinstance(value.get("metadata", {}), dict)
            and all(is_plain_file_name(file) and isinstance(part, list)
                    and all(isinstance(n, str) and n in names for n in part)
                    for file, part in files.items()))


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
        if blob.count(b",") + blob.count(b"[") + blob.count(b"{") > MAX_MANIFEST_VALUES:
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest holds more than "
                                      f"{MAX_MANIFEST_VALUES:,} values)")
        try:
            self.manifest = json.loads(blob)
        except (ValueError, RecursionError):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest is not valid JSON)") from None
        _depth(self.manifest)
        self._data_end = offset
        self._index = {}
        self._check_sections()
        self._check_tables()

    def _pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def _check_sections(self):
        sections = self.manifest.get("sections") if isinstance(self.manifest, dict) else None
        if not isinstance(sections, list):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest has no section table)")
        for entry in sections:
            try:
                ok = (_is_count(entry["offset"]) and _is_count(entry["length"])
                      and HEADER_SIZE <= entry["offset"] and 0 <= entry["length"]
                      and entry["offset"] + entry["length"] <= self._data_end
                      and entry["role"] in _ROLES and isinstance(entry["tensor"], str)
                      and (entry["task"] is None or isinstance(entry["task"], str))
                      and entry["dtype"] in DTYPE_SIZES and entry["codec"] in codecs.names()
                      and _is_shape(entry["shape"])
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

    def _check_tables(self):
        """The tensor table, the base and the tasks: the types readers rely on, names that are safe
        to create files from (task names, side files and shards become paths on extract), and
        sections that fit the tensor they belong to (so no rebuild can broadcast to another shape)."""
        m = self.manifest

        def refuse(what):
            raise CorruptArchiveError(f"{self.path}: damaged archive ({what})")

        tensors, base, tasks, merge = m.get("tensors"), m.get("base"), m.get("tasks"), m.get("merge")
        if not (isinstance(tensors, dict) and isinstance(base, dict) and isinstance(tasks, list)
                and isinstance(merge, dict) and isinstance(merge.get("method"), str)):
            refuse("manifest lacks tasks, tensors, base or merge")
        for name, info in tensors.items():
            if not (isinstance(info, dict) and _one_of(info.get("kind"), _KINDS) and _one_of(info.get("dtype"), DTYPE_SIZES)
                    and _is_shape(info.get("shape"))):
                refuse(f"bad entry for tensor {name!r}")
        names = base.get("names")
        if not (isinstance(names, list) and all(isinstance(n, str) and n in tensors for n in names)
                and isinstance(base.get("by_reference", False), bool) and _is_metadata(base.get("metadata"))
                and _is_count(base.get("input_bytes", 0))
                and (base.get("sha256") is None or isinstance(base.get("sha256"), str))):
            refuse("bad base entry")
        task_names = set()
        for task in tasks:
            name = task.get("name") if isinstance(task, dict) else None
            if not is_plain_file_name(name) or name in task_names:
                refuse(f"bad or repeated task name {name!r}")
            task_names.add(name)
            own = task.get("tensors")
            files, sharding, lam = task.get("files", []), task.get("sharding"), task.get("lambda")
            ok = (type(lam) in (int, float) and math.isfinite(lam) and lam >= 0
                  and _is_dtype_list(own) and len({n for n, _ in own}) == len(own)
                  and _one_of(task.get("layout"), _LAYOUTS) and isinstance(task.get("format"), str)
                  and (task.get("file_name") is None or is_plain_file_name(task.get("file_name")))
                  and isinstance(files, list) and all(is_plain_file_name(f) for f in files)
                  and len(set(files)) == len(files)
                  and _is_metadata(task.get("metadata")) and _is_count(task.get("input_bytes", 0))
                  and (sharding is None or _is_sharding(sharding, {n for n, _ in own})))
            if not ok:
                refuse(f"bad entry for task {name!r}")
        for entry in self._index.values():
            role, info, task = entry["role"], tensors.get(entry["tensor"]), entry["task"]
            if role in (ROLE_BASE, ROLE_MTV):
                ok = (task is None and info is not None and entry["shape"] == info["shape"]
                      and (entry["dtype"] == info["dtype"] if role == ROLE_BASE else entry["dtype"] in FLOAT_DTYPES))
            elif role == ROLE_MASK:
                ok = task in task_names and info is not None and entry["shape"] == info["shape"] and entry["dtype"] == "BOOL"
            elif role == ROLE_OWN:
                ok = task in task_names and (info is None or entry["shape"] == info["shape"])
            else:  # a side file
                ok = task in task_names and is_plain_file_name(entry["tensor"]) and entry["dtype"] == "U8" \
                    and len(entry["shape"]) == 1
            if not ok:
                refuse(f"section {section_label(entry)} does not fit its tensor or task")

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

    def read_mask_bits(self, entry: dict, context=None) -> np.ndarray:
        """A mask section as bit-packed bytes (uint8, little bit order, as np.packbits).

        'bits+zstd' stores exactly these bytes compressed, so they are only decompressed (a GPU
        then unpacks an eighth of the bytes); other mask codecs decode to booleans, packed here."""
        if entry["codec"] != "bits+zstd":
            return np.packbits(self.read(entry, context), bitorder="little")
        data = self.read_bytes(entry)
        try:
            packed = codecs.zstd_decompress(data, (math.prod(entry["shape"]) + 7) // 8)
        except codecs.CodecError as exc:
            raise CorruptArchiveError(f"{self.path}: damaged archive (section {section_label(entry)}: {exc})") from None
        return np.frombuffer(packed, dtype=np.uint8)

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
