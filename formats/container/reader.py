"""Reading a tallzip archive: header, manifest, and any one chunk of a section, each checked before use.

Nothing is trusted before it is checked: the header's manifest checksum, the manifest's structure
and bounds (before any allocation they imply), and each chunk's checksum before it is decoded.
Format versions 1 (one unchunked section per entry, sha256) and 2 (chunked, blake3) both read; a
version-1 section is seen as one chunk covering the whole tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import blake3
import numpy as np

from tallzip.formats.codecs import registry as codecs
from tallzip.formats.container.chunking import chunk_count, chunk_plan, chunk_shape, mask_context
from tallzip.formats.container.constants import (DTYPE_SIZES, FLOAT_DTYPES, HEADER_SIZE, HEADER_STRUCT, KIND_MASKED, KIND_PER_TASK, KIND_SHARED, MAGIC, MAX_CHUNK_ELEMENTS, MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, MAX_TENSOR_ELEMENTS, MIN_CHUNK_ELEMENTS, QUANT_BITS, READABLE_VERSIONS, REPRESENTATION_LOWRANK, REPRESENTATION_TALL, REPRESENTATIONS, ROLE_BASE, ROLE_DELTA, ROLE_FILE, ROLE_LRCODES, ROLE_LRSCALES, ROLE_MASK, ROLE_MTV, ROLE_OWN, ROLE_QCODES, ROLE_QOFFSETS, ROLE_QSCALES, SCALE_DTYPES)
from tallzip.formats.container.lowrank_layout import lowrank_params_problem, stream_totals
from tallzip.formats.container.manifest import check_flags, decode_manifest
from tallzip.formats.container.quant_layout import scales_plan
from tallzip.formats.checkpoints.sources import is_url, location, open_source
from tallzip.formats.errors import CorruptArchiveError, FormatError, UnsupportedVersionError
from tallzip.formats.tensors import bits_dtype

# An honest zstandard frame expands at most ~32768x (one RLE byte per 128 KiB block); a section
# that declares more than that over its stored length is a bomb, refused before decoding.
MAX_EXPANSION = 1 << 15
_SLACK = 1 << 20
# json.loads makes a Python object of every value, ~70 bytes for an empty {} or []: 256 MiB of "{},"
# would take ~6 GB. An honest manifest has ~19 values per section (~330 bytes), so 16M values is
# more than any archive within MAX_MANIFEST_BYTES holds, and bounds the parse to ~1 GB.
MAX_MANIFEST_VALUES = 16_000_000
# Section roles and tensor kinds (SPEC.md); the manifest is checked against them before use.
_ROLES = {ROLE_BASE, ROLE_MTV, ROLE_MASK, ROLE_OWN, ROLE_FILE, ROLE_QCODES, ROLE_QSCALES, ROLE_QOFFSETS, ROLE_DELTA,
          ROLE_LRCODES, ROLE_LRSCALES}
_KINDS = {KIND_MASKED, KIND_SHARED, KIND_PER_TASK}


class Chunk(NamedTuple):
    """One independently coded element range of a section, as checked against the manifest."""
    index: int
    start: int       # first element, in the flattened tensor
    count: int       # elements
    offset: int      # where its stored bytes lie in the file
    length: int      # stored bytes
    params: dict     # codec parameters of this chunk
    digest: str      # hex digest of the stored bytes
    algorithm: str   # "blake3" (version 2) or "sha256" (version 1)
    ones: int | None  # masks: set bits in this chunk
    shape: tuple     # the chunk as context codecs see it (rows of the tensor, or flat)
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


def decoded_size(entry: dict, count: int | None = None) -> int:
    """Bytes of the plain form of a section (or of `count` of its elements): bit-packed for masks,
    itemsize x count otherwise."""
    count = math.prod(entry["shape"]) if count is None else count
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


def _is_quant(value, bits: int) -> bool:
    """A q* task's "quant" entry: what its codes and scales mean (SPEC.md, representations)."""
    return (isinstance(value, dict) and value.get("bits") == bits and value.get("grid") in ("symmetric", "asymmetric", "sign")
            and (value.get("grid") == "sign") == (bits == 1)  # q1 is a sign code, and only q1
            and (value.get("group") is None or (_is_count(value.get("group")) and value["group"] >= 1))
            and _one_of(value.get("scale_dtype"), SCALE_DTYPES) and isinstance(value.get("method", "rtn"), str))


def _is_sharding(value, names) -> bool:
    """{"files": {shard file: [tensor names of this task]}, "metadata": {...}, optional "index": file name}."""
    files = value.get("files") if isinstance(value, dict) else None
    return (isinstance(files, dict) and isinstance(value.get("metadata", {}), dict)
            and (value.get("index") is None or is_plain_file_name(value["index"]))
            and all(is_plain_file_name(file) and isinstance(part, list)
                    and all(isinstance(n, str) and n in names for n in part)
                    for file, part in files.items()))


class ArchiveReader:
    def __init__(self, path, storage_options: dict | None = None):
        self._fd = self._source = None
        if is_url(path):  # ranged requests through fsspec: only the header, the manifest and the chunks read
            self.path = location(path)
            self._source = open_source(path, storage_options)
            self.size = self._source.size
        else:
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
        if version not in READABLE_VERSIONS:
            raise UnsupportedVersionError(
                f"{self.path}: archive format version {version}; this tallzip reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}")
        self.version = version
        check_flags(flags, self.path)
        if length > MAX_MANIFEST_BYTES or offset < HEADER_SIZE or offset + length != self.size:
            raise CorruptArchiveError(f"{self.path}: damaged or truncated archive (manifest out of bounds)")
        blob = self._pread(offset, length)
        if hashlib.sha256(blob).digest() != digest:
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest checksum mismatch)")
        blob = decode_manifest(blob, flags, self.path)  # checked above as stored: damage caught before decoding
        if blob.count(b",") + blob.count(b"[") + blob.count(b"{") > MAX_MANIFEST_VALUES:
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest holds more than "
                                      f"{MAX_MANIFEST_VALUES:,} values)")
        try:
            self.manifest = json.loads(blob)
        except (ValueError, RecursionError):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest is not valid JSON)") from None
        _depth(self.manifest)
        if not isinstance(self.manifest, dict) or self.manifest.get("version", 1) != version:
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest and header disagree on the version)")
        self._data_end = offset
        self._index = {}
        self._chunks = {}
        self.chunk_elements = self.manifest.get("chunk_elements") if version >= 2 else None
        if version >= 2 and not (_is_count(self.chunk_elements)
                                 and MIN_CHUNK_ELEMENTS <= self.chunk_elements <= MAX_CHUNK_ELEMENTS):
            raise CorruptArchiveError(f"{self.path}: damaged archive (bad chunk_elements)")
        self._check_sections()
        self._check_tables()

    def _pread(self, offset: int, length: int) -> bytes:
        if self._source is not None:  # as os.pread: a range past the end comes back short
            length = max(0, min(length, self.size - offset))
            return self._source.pread(offset, length)
        return os.pread(self._fd, length, offset)

    @property
    def bytes_read(self) -> int | None:
        """Bytes fetched so far from a URL (None for a local file)."""
        return self._source.bytes_read if self._source is not None else None

    def _check_sections(self):
        sections = self.manifest.get("sections") if isinstance(self.manifest, dict) else None
        if not isinstance(sections, list):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest has no section table)")
        for entry in sections:
            try:
                ok = (entry["role"] in _ROLES and isinstance(entry["tensor"], str)
                      and (entry["task"] is None or isinstance(entry["task"], str))
                      and entry["dtype"] in DTYPE_SIZES and entry["codec"] in codecs.names()
                      and _is_shape(entry["shape"])
                      and math.prod(entry["shape"]) <= MAX_TENSOR_ELEMENTS and _is_count(entry["length"]))
                chunks = (self._chunks_v2(entry) if self.version >= 2 else self._chunks_v1(entry)) if ok else None
                ok = chunks is not None
            except (KeyError, TypeError):
                ok = False
            if not ok:
                label = section_label(entry) if isinstance(entry, dict) else "?"
                raise CorruptArchiveError(f"{self.path}: damaged archive (bad entry for section {label})")
            key = (entry["role"], entry.get("tensor"), entry.get("task"))
            if key in self._index:
                raise CorruptArchiveError(f"{self.path}: damaged archive (section {section_label(entry)} twice)")
            self._index[key] = entry
            self._chunks[key] = chunks

    def _chunk_ok(self, entry, offset, length, count) -> bool:
        return (_is_count(offset) and _is_count(length) and HEADER_SIZE <= offset
                and offset + length <= self._data_end
                and decoded_size(entry, count) <= MAX_EXPANSION * length + _SLACK)

    def _chunks_v1(self, entry):
        count = math.prod(entry["shape"])
        ones = entry.get("ones")
        if not (self._chunk_ok(entry, entry["offset"], entry["length"], count) and isinstance(entry["sha256"], str)
                and isinstance(entry.get("params", {}), dict) and (ones is None or (_is_count(ones) and ones <= count))):
            return None
        return [Chunk(0, 0, count, entry["offset"], entry["length"], entry.get("params", {}), entry["sha256"],
                      "sha256", ones, tuple(entry["shape"]))]

    def _chunks_v2(self, entry):
        shape, listed = entry["shape"], entry["chunks"]
        if entry["role"] in (ROLE_QSCALES, ROLE_QOFFSETS):  # one chunk per chunk of the tensor (quant_layout.py)
            of_shape, group = entry.get("of_shape"), entry.get("group")
            if not (_is_shape(of_shape) and math.prod(of_shape) <= MAX_TENSOR_ELEMENTS and len(shape) == 1
                    and (group is None or (_is_count(group) and group >= 1))
                    and isinstance(listed, list) and len(listed) == chunk_count(of_shape, self.chunk_elements)):
                return None
            layout = scales_plan(of_shape, self.chunk_elements, group)
            if sum(count for _, count, _ in layout) != shape[0]:
                return None
            plan = [(start, count) for start, count, _ in layout]
            shapes = [rows_groups for _, _, rows_groups in layout]
        else:
            if not isinstance(listed, list) or len(listed) != chunk_count(shape, self.chunk_elements):
                return None  # checked before the plan is built: a huge shape would make a huge plan
            plan = chunk_plan(shape, self.chunk_elements)
            shapes = None
        is_mask = entry["role"] == ROLE_MASK
        chunks, total, total_ones = [], 0, 0
        for index, ((start, count), item) in enumerate(zip(plan, listed)):
            if not isinstance(item, dict):
                return None
            ones = item.get("ones") if is_mask else None
            if not (self._chunk_ok(entry, item["offset"], item["length"], count)
                    and isinstance(item["blake3"], str) and isinstance(item.get("params", {}), dict)
                    and (not is_mask or (_is_count(ones) and ones <= count))):
                return None
            total += item["length"]
            total_ones += ones or 0
            chunks.append(Chunk(index, start, count, item["offset"], item["length"], item.get("params", {}),
                                item["blake3"], "blake3", ones,
                                shapes[index] if shapes else chunk_shape(shape, start, count)))
        if total != entry["length"] or (is_mask and entry.get("ones") != total_ones):
            return None
        return chunks

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
        task_names, reps, quants = set(), {}, {}
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
            representation = task.get("representation", REPRESENTATION_TALL)
            if not _one_of(representation, REPRESENTATIONS):
                raise UnsupportedVersionError(f"{self.path}: task {name!r} is stored as {representation!r}, "
                                              f"which this tallzip cannot rebuild (it knows {', '.join(REPRESENTATIONS)})")
            if representation in QUANT_BITS and not _is_quant(task.get("quant"), QUANT_BITS[representation]):
                refuse(f"bad quant parameters for task {name!r}")
            if representation == REPRESENTATION_LOWRANK:
                self._check_lowrank(task, tensors, refuse)
            reps[name], quants[name] = representation, task.get("quant")
        tasks_by_name = {task["name"]: task for task in tasks}
        for entry in self._index.values():
            role, info, task = entry["role"], tensors.get(entry["tensor"]), entry["task"]
            if role in (ROLE_BASE, ROLE_MTV):
                ok = (task is None and info is not None and entry["shape"] == info["shape"]
                      and (entry["dtype"] == info["dtype"] if role == ROLE_BASE else entry["dtype"] in FLOAT_DTYPES))
            elif role == ROLE_MASK:
                ok = task in task_names and info is not None and entry["shape"] == info["shape"] and entry["dtype"] == "BOOL"
            elif role == ROLE_OWN:
                ok = task in task_names and (info is None or entry["shape"] == info["shape"])
            elif role == ROLE_QCODES:
                quant = quants.get(task) if reps.get(task) in QUANT_BITS else None
                ok = (quant is not None and info is not None and entry["shape"] == info["shape"]
                      and entry["dtype"] == ("U8" if quant["grid"] == "asymmetric" else "I8"))
            elif role in (ROLE_QSCALES, ROLE_QOFFSETS):
                quant = quants.get(task) if reps.get(task) in QUANT_BITS else None
                ok = (quant is not None and info is not None and entry["of_shape"] == info["shape"]
                      and entry["dtype"] == quant["scale_dtype"] and entry["group"] == quant["group"]
                      and (role == ROLE_QSCALES or quant["grid"] == "asymmetric"))
            elif role in (ROLE_LRCODES, ROLE_LRSCALES):
                params = tasks_by_name.get(task, {}).get("lowrank")
                ok = (reps.get(task) == REPRESENTATION_LOWRANK and entry["tensor"] == "" and len(entry["shape"]) == 1
                      and entry["dtype"] == ("I8" if role == ROLE_LRCODES else params["scale_dtype"]))
            elif role == ROLE_DELTA:
                ok = (reps.get(task) == "exact" and info is not None and entry["shape"] == info["shape"]
                      and entry["dtype"] == info["dtype"] and entry["codec"] == "delta")
            else:  # a side file
                ok = task in task_names and is_plain_file_name(entry["tensor"]) and entry["dtype"] == "U8" \
                    and len(entry["shape"]) == 1
            if not ok:
                refuse(f"section {section_label(entry)} does not fit its tensor or task")

    def _check_lowrank(self, task: dict, tensors: dict, refuse):
        """A lowrank task: its parameters decodable, every tensor it rebuilds from the base listed, and its two
        streams holding exactly what the list says (lowrank_layout.py)."""
        name, params = task["name"], task.get("lowrank")
        problem = lowrank_params_problem(params, {n: info["shape"] for n, info in tensors.items()})
        if problem is None:
            listed = {record[0] for record in params["tensors"]}
            missing = [n for n, _ in task["tensors"] if tensors.get(n, {}).get("kind") == KIND_MASKED
                       and self.section(ROLE_OWN, n, name) is None and n not in listed]
            codes, scales = self.section(ROLE_LRCODES, "", name), self.section(ROLE_LRSCALES, "", name)
            totals = stream_totals(params["tensors"], {n: tensors[n]["shape"] for n in listed}, params["group"])
            if missing:
                problem = f"tensor {missing[0]!r} has no lowrank record"
            elif codes is None or scales is None or (codes["shape"], scales["shape"]) != ([totals[0]], [totals[1]]):
                problem = "lowrank sections missing or of the wrong size"
        if problem is not None:
            refuse(f"task {name!r}: {problem}")

    def section(self, role: str, tensor: str | None, task: str | None = None) -> dict | None:
        return self._index.get((role, tensor, task))

    def chunks(self, entry: dict) -> list[Chunk]:
        """The section's chunks, in element order (one for a version-1 section)."""
        return self._chunks[(entry["role"], entry["tensor"], entry["task"])]

    def _refuse_chunk(self, entry, chunk, what):
        where = f" chunk {chunk.index + 1} of {len(self.chunks(entry))}" if self.version >= 2 else ""
        raise CorruptArchiveError(f"{self.path}: damaged archive ({what} in section {section_label(entry)}{where})")

    def read_chunk_bytes(self, entry: dict, chunk: Chunk) -> bytes:
        """The chunk's stored bytes, checked against its digest."""
        data = self._pread(chunk.offset, chunk.length)
        if chunk.algorithm == "blake3":
            good = blake3.blake3(data).hexdigest() == chunk.digest
        else:
            good = hashlib.sha256(data).hexdigest() == chunk.digest
        if len(data) != chunk.length or not good:
            self._refuse_chunk(entry, chunk, "checksum mismatch")
        return data

    def chunk_context(self, mtv_entry: dict, chunk: Chunk, mtv_bits: np.ndarray) -> dict:
        """The side information a mask chunk is coded with (chunking.mask_context): the same chunk
        of the mtv section, as read (its stored bits), and the chunk's shape."""
        return mask_context(mtv_bits, mtv_entry["dtype"], chunk.shape)

    def read_chunk(self, entry: dict, chunk: Chunk, context=None) -> np.ndarray:
        """One chunk decoded, flat: uint views of float bits, bool for masks."""
        data = self.read_chunk_bytes(entry, chunk)
        dtype = bool if entry["role"] == ROLE_MASK else bits_dtype(entry["dtype"])
        try:
            return codecs.decode(entry["codec"], data, dtype=dtype, count=chunk.count, params=chunk.params,
                                 context=context)
        except (codecs.CodecError, ValueError, KeyError, TypeError) as exc:
            self._refuse_chunk(entry, chunk, str(exc))

    def read_chunk_mask_bits(self, entry: dict, chunk: Chunk, context=None) -> np.ndarray:
        """A mask chunk as bit-packed bytes (uint8, little bit order, as np.packbits).

        A codec that stores these bytes as they are (bits+zstd) only decompresses them; other mask codecs
        decode to booleans, packed here."""
        if not codecs.codes_packed_bits(entry["codec"]):
            return np.packbits(self.read_chunk(entry, chunk, context), bitorder="little")
        data = self.read_chunk_bytes(entry, chunk)
        try:
            packed = codecs.decode_packed(entry["codec"], data, count=chunk.count)
        except codecs.CodecError as exc:
            self._refuse_chunk(entry, chunk, str(exc))
        return packed

    def check(self, entry: dict):
        """Every chunk's checksum, one chunk in memory at a time; raises naming the section and chunk."""
        for chunk in self.chunks(entry):
            self.read_chunk_bytes(entry, chunk)

    # --- whole sections (all chunks joined): for small tensors and callers that need them whole ---
    def read_bytes(self, entry: dict) -> bytes:
        """Every chunk's stored bytes, checked, joined (a version-1 section: its bytes)."""
        return b"".join(self.read_chunk_bytes(entry, chunk) for chunk in self.chunks(entry))

    def _chunk_contexts(self, entry, context):
        """Per-chunk contexts cut from a whole-tensor context {"mtv": float32 of the tensor}, made one
        at a time as they are used (what a codec derives from one is dropped with it, so memory
        stays at one chunk's working set whatever the tensor's size)."""
        chunks = self.chunks(entry)
        if context is None or len(chunks) == 1:
            for chunk in chunks:
                yield chunk, context
            return
        flat = np.ascontiguousarray(context["mtv"], dtype=np.float32).reshape(-1)
        for chunk in chunks:
            yield chunk, mask_context(flat[chunk.start:chunk.start + chunk.count], "F32", chunk.shape)

    def read(self, entry: dict, context=None) -> np.ndarray:
        """The section decoded, flat. A mask's context is the whole tensor's ({"mtv": float32 mtv})."""
        chunks = self.chunks(entry)
        if len(chunks) == 1:
            return self.read_chunk(entry, chunks[0], context)
        dtype = bool if entry["role"] == ROLE_MASK else bits_dtype(entry["dtype"])
        out = np.empty(math.prod(entry["shape"]), dtype=dtype)
        for chunk, ctx in self._chunk_contexts(entry, context):
            out[chunk.start:chunk.start + chunk.count] = self.read_chunk(entry, chunk, ctx)
        return out

    def read_mask_bits(self, entry: dict, context=None) -> np.ndarray:
        """A mask section as bit-packed bytes (uint8, little bit order, as np.packbits)."""
        chunks = self.chunks(entry)
        if len(chunks) == 1:
            return self.read_chunk_mask_bits(entry, chunks[0], context)
        out = np.empty((math.prod(entry["shape"]) + 7) // 8, dtype=np.uint8)
        for chunk, ctx in self._chunk_contexts(entry, context):
            bits = self.read_chunk_mask_bits(entry, chunk, ctx)
            if chunk.start % 8 == 0:
                out[chunk.start // 8:chunk.start // 8 + bits.size] = bits
            else:  # only a version-2 plan with rows not a multiple of 8 gets here: repack
                return np.packbits(self.read(entry, context), bitorder="little")
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._source is not None:
            self._source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
