"""Checkpoint readers: safetensors (single and sharded) and torch pickles (the writers: outputs.py).

Readers are lazy: they list names, dtypes and shapes from headers and read one tensor, or one
range of a tensor's elements, at a time (pread into fresh buffers), so a caller can stream a model
without holding it whole. Torch zip checkpoints are read by offset too (formats/torch_lazy.py),
their records CRC-checked before use.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch

from tallzip.formats.errors import FormatError
from tallzip.formats.container.constants import DTYPE_SIZES
from tallzip.formats.checkpoints.sources import RemoteFile, RemotePath, is_url, list_folder, location, open_source
from tallzip.formats.tensors import dtype_name, torch_dtype
from tallzip.formats.checkpoints.folders import (CHECKPOINT_EXTS, SAFETENSORS_EXT, SHARD_INDEX, TORCH_EXTS, checked_side_file,
                                                model_in, refuse_sub_folders, release_head)



class Checkpoint:
    """Common view of one checkpoint: ordered names, dtype names, shapes, lazy tensors."""

    format = ""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.names: list[str] = []
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, str] | None = None
        self.sharding: dict | None = None    # {"files": {file: [names]}, "metadata": {...}} when sharded
        self.extra_files: dict[str, Path] = {}  # small side files of a folder checkpoint, by relative name
        # name -> the earlier name holding the very same tensor (a .pt that saved one tensor, e.g.
        # tied embeddings, under two names); Hugging Face safetensors instead leave the tied name out.
        self.tied: dict[str, str] = {}

    def get(self, name: str, *, pin_memory: bool = False) -> torch.Tensor:
        """One tensor, read now; pin_memory=True puts it in page-locked memory (fast, asynchronous
        copies to a GPU)."""
        raise NotImplementedError

    def read_range(self, name: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """`count` elements of the flattened tensor from element `start` on, as a 1-D tensor of its
        dtype (what get(name).reshape(-1)[start:start + count] holds), into `out` (a 1-D tensor of
        that dtype with at least `count` elements) when given. Readers that can read a range by
        offset override this; this fallback reads the tensor whole."""
        self._check_range(name, start, count)
        flat = self.get(name).reshape(-1)[start:start + count]
        return flat.clone() if out is None else out[:count].copy_(flat)

    def _check_range(self, name: str, start: int, count: int) -> int:
        """The tensor's element count, after checking that [start, start + count) lies inside it."""
        numel = math.prod(self.shapes[name])
        if not (type(start) is int and type(count) is int and 0 <= start and 0 <= count
                and start + count <= numel):
            raise ValueError(f"{self.path}: range [{start}, {start}+{count}) is outside tensor {name!r} "
                             f"of {numel} elements")
        return numel

    def will_need(self, name: str):
        """Hint that `name` is read soon, so the OS can start reading it in the background."""

    @property
    def nbytes(self) -> int:
        """Size of the input files on disk."""
        if self.sharding:
            return sum((self.path / f).stat().st_size for f in self.sharding["files"])
        return self.path.stat().st_size

    def __contains__(self, name):
        return name in self.dtypes

    def local_files(self) -> list:
        """The files this checkpoint is read from: its model file or shards, and its side files."""
        model = [self.path / f for f in self.sharding["files"]] if self.sharding else [self.path]
        return [p for p in model + list(self.extra_files.values()) if isinstance(p, Path)]


def _read_safetensors_header(path, source=None) -> tuple[dict, int]:
    """The header and the offset where tensor data starts (read through `source` for a URL)."""
    if source is not None:
        file_size = source.size
        if file_size < 8:
            raise FormatError(f"{path}: not a safetensors file (too short)")
        size = int.from_bytes(source.pread(0, 8), "little")
        if size > 100_000_000 or size > file_size - 8:
            raise FormatError(f"{path}: not a safetensors file (bad header size)")
        raw = source.pread(8, size)
    else:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise FormatError(f"{path}: not a safetensors file (too short)")
            size = int.from_bytes(prefix, "little")
            if size > 100_000_000 or size > path.stat().st_size - 8:
                raise FormatError(f"{path}: not a safetensors file (bad header size)")
            raw = fh.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (bad header)")
    return header, 8 + size


def _tensor_span(path: Path, name, info, data_start: int, file_size: int) -> tuple[int, int]:
    """Absolute byte range of one tensor, checked against its dtype, shape and the file's size."""
    try:
        begin, end = info["data_offsets"]
        shape = info["shape"]
        ok = (type(begin) is int and type(end) is int and 0 <= begin <= end
              and data_start + end <= file_size and all(type(d) is int and d >= 0 for d in shape)
              and isinstance(info["dtype"], str))
        itemsize = DTYPE_SIZES.get(info["dtype"]) if ok else None
        ok = ok and (itemsize is None or end - begin == math.prod(shape) * itemsize)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FormatError(f"{path}: not a safetensors file (bad entry for tensor {name!r})")
    return data_start + begin, data_start + end


def _pread_into(fd: int, buffer: memoryview, offset: int, path):
    """Fill `buffer` from the file at `offset` (pread loops: one call may return less)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path}: truncated file")
        done += got


class SafetensorsCheckpoint(Checkpoint):
    format = "safetensors"

    # Tensors are read with pread into fresh buffers rather than through a memory map: the process
    # then holds only the tensors it is using (mapped file pages would count as its memory until
    # unmapped), and reads release the GIL, so a reader thread can prefetch while others compute.

    def __init__(self, path: Path, storage_options: dict | None = None):
        # A URL is read through formats.sources (ranged requests); a local file with os.preadv into
        # the tensor's own buffer (no copy), the fast path.
        remote = is_url(path)
        super().__init__(Path(path) if not remote else path)
        if remote:
            self.path = location(path)
            self._source = open_source(path, storage_options)
        else:
            self._source = None
        header, data_start = _read_safetensors_header(self.path, self._source)
        self.metadata = header.pop("__metadata__", None)
        file_size = self._source.size if remote else self.path.stat().st_size
        self._spans: dict[str, tuple[int, int]] = {}
        for name, info in header.items():  # header order: the writer's own order
            self._spans[name] = _tensor_span(self.path, name, info, data_start, file_size)
            self.names.append(name)
            self.dtypes[name] = info["dtype"]
            self.shapes[name] = tuple(info["shape"])
        self._fd = None if remote else os.open(self.path, os.O_RDONLY)

    def _read_into(self, buffer: memoryview, offset: int):
        if self._fd is not None:
            _pread_into(self._fd, buffer, offset, self.path)
        else:
            buffer[:] = self._source.pread(offset, len(buffer))

    @property
    def nbytes(self) -> int:
        return self._source.size if self._source is not None else self.path.stat().st_size

    def get(self, name, *, pin_memory=False):
        begin, end = self._spans[name]
        tensor = torch.empty(self.shapes[name], dtype=torch_dtype(self.dtypes[name]), pin_memory=pin_memory)
        if end > begin:
            self._read_into(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), begin)
        return tensor

    def read_range(self, name, start, count, out=None):
        """pread of just those elements' bytes (looped: Linux returns at most ~2 GiB per call)."""
        begin, end = self._spans[name]
        dtype = torch_dtype(self.dtypes[name])
        itemsize = DTYPE_SIZES[self.dtypes[name]]
        if start < 0 or count < 0 or begin + (start + count) * itemsize > end:
            raise FormatError(f"{self.path}: elements {start}..{start + count} lie outside tensor {name!r}")
        tensor = torch.empty(count, dtype=dtype) if out is None else out[:count]
        if count:
            self._read_into(memoryview(tensor.view(torch.uint8).numpy()), begin + start * itemsize)
        return tensor

    def will_need(self, name):
        begin, end = self._spans[name]
        if end > begin and self._fd is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, begin, end - begin, os.POSIX_FADV_WILLNEED)

    def __getstate__(self):
        # A checkpoint sent to another process (a Ray worker) travels as its parsed header; the
        # receiver opens the file itself (the same path must be readable there).
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._source is not None:  # a URL: its source reopens itself on first use
            return
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot open on this worker ({exc.strerror})") from None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


class ShardedCheckpoint(Checkpoint):
    format = "safetensors-sharded"

    def __init__(self, folder: Path, storage_options: dict | None = None, index_name: str = SHARD_INDEX):
        super().__init__(folder)
        self.path = location(folder)
        try:
            if is_url(folder):
                with open_source(self.path / index_name, storage_options) as src:
                    index = json.loads(src.pread(0, src.size))
            else:
                index = json.loads((self.path / index_name).read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise FormatError(f"{self.path / index_name}: not a valid shard index") from None
        files: dict[str, list[str]] = OrderedDict()
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        self._shards = {}
        for file in files:
            if Path(file).name != file:
                raise FormatError(f"{self.path / index_name}: shard {file!r} is not a plain file name")
            self._shards[file] = SafetensorsCheckpoint(self.path / file, storage_options)
        self._where = {}
        for file, shard in self._shards.items():
            for name in shard.names:
                if weight_map.get(name) == file:
                    self._where[name] = shard
                    self.names.append(name)
                    self.dtypes[name] = shard.dtypes[name]
                    self.shapes[name] = shard.shapes[name]
        missing = [n for n in weight_map if n not in self._where]
        if missing:
            raise FormatError(f"{self.path}: index names {missing[0]!r} but its shard does not hold it")
        self.metadata = next(iter(self._shards.values())).metadata
        self.sharding = {"files": {f: s.names for f, s in self._shards.items()},
                         "metadata": index.get("metadata", {}),
                         **({"index": index_name} if index_name != SHARD_INDEX else {})}

    @property
    def nbytes(self) -> int:
        return sum(shard.nbytes for shard in self._shards.values())

    def get(self, name, *, pin_memory=False):
        return self._where[name].get(name, pin_memory=pin_memory)

    def read_range(self, name, start, count, out=None):
        return self._where[name].read_range(name, start, count, out)

    def will_need(self, name):
        self._where[name].will_need(name)


class TorchCheckpoint(Checkpoint):
    """A torch.save'd state dict (or a pickled module, read by the restricted unpickler).

    Zip checkpoints with stored records (what torch.save writes) are read lazily, by offset, each
    record's CRC checked before use; others (re-zipped with compression, legacy pre-1.6 files,
    pickles only torch's own loader takes) are loaded whole, after a CRC check of every record."""

    format = "pt"

    def __init__(self, path: Path):
        super().__init__(path)
        from tallzip.formats.checkpoints.safe_pickle import load_state_dict, read_lazy  # heavy-ish and only needed for pickles
        from tallzip.formats.checkpoints.torch_lazy import LazyTorchFile, aliases
        lazy = read_lazy(self.path)
        self._lazy, self._tensors = None, None
        if lazy is not None:
            specs, self.pickle_kind, container = lazy
            self._lazy = LazyTorchFile(container, specs)
            entries = ((name, spec.dtype, spec.shape) for name, spec in specs.items())
            self.tied = aliases(specs)
        else:
            self._tensors, self.pickle_kind = load_state_dict(self.path)
            entries = ((name, t.dtype, t.shape) for name, t in self._tensors.items())
            self.tied = _eager_aliases(self._tensors)
        for name, dtype, shape in entries:
            self.names.append(name)
            self.dtypes[name] = dtype_name(dtype)
            self.shapes[name] = tuple(shape)

    def get(self, name, *, pin_memory=False):
        if self._lazy is not None:
            return self._lazy.get(name, pin_memory=pin_memory)
        tensor = self._tensors[name]
        return tensor.pin_memory() if pin_memory else tensor

    def read_range(self, name, start, count, out=None):
        self._check_range(name, start, count)
        if self._lazy is not None:
            return self._lazy.read_range(name, start, count, out)
        flat = self._tensors[name].reshape(-1)[start:start + count]
        return flat.clone() if out is None else out[:count].copy_(flat)

    def will_need(self, name):
        if self._lazy is not None:
            self._lazy.will_need(name)


def _eager_aliases(tensors: dict) -> dict[str, str]:
    """name -> first name that is the very same tensor (same memory, shape, strides and dtype)."""
    first, tied = {}, {}
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        tied[name] = first.setdefault(key, name)
        if tied[name] == name:
            del tied[name]
    return tied


def _open_remote_checkpoint(url: str, storage_options: dict | None = None) -> Checkpoint:
    """A safetensors file or folder behind a URL (torch pickles are read locally only)."""
    url = RemotePath(str(url).rstrip("/"))
    if url.suffix == SAFETENSORS_EXT:
        return SafetensorsCheckpoint(url, storage_options)
    if url.suffix in TORCH_EXTS:
        raise FormatError(f"{url}: torch checkpoints are read from local files only; download it, or use safetensors")
    entries = {e.name: e for e in list_folder(url, storage_options)}
    refuse_sub_folders(url, [n for n, e in entries.items() if e.is_dir])
    kind, name = model_in(url, {n for n, e in entries.items() if not e.is_dir})
    if kind == "sharded":
        ckpt = ShardedCheckpoint(url, storage_options, index_name=name)
        model_files = set(ckpt.sharding["files"])
    else:
        ckpt = _open_remote_checkpoint(entries[name].location, storage_options)
        model_files = {name}
    for name, e in entries.items():
        if not e.is_dir and name not in model_files:
            checked_side_file(e.location, e.size or 0)
            ckpt.extra_files[name] = RemoteFile(e.location, e.size, storage_options)
    return ckpt


def open_checkpoint(path, exclude=()) -> Checkpoint:
    """A file (.safetensors, .pt/.pth/.bin) or a folder (sharded index, or its model file, and side files);
    a URL (s3://, https://, memory://...: safetensors only) is read by ranged requests. Files in
    `exclude` (the family's base, kept inside a task folder by the paper's release) are not side files."""
    if is_url(path):
        return _open_remote_checkpoint(path)
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if path.is_dir():
        excluded = {Path(p).resolve() for p in exclude if not is_url(p)}
        entries = [p for p in sorted(path.iterdir()) if p.resolve() not in excluded]
        refuse_sub_folders(path, [p.name for p in entries if p.is_dir()])
        files = [p for p in entries if p.is_file()]
        kind, name = model_in(path, {p.name for p in files})
        if kind == "sharded":
            ckpt = ShardedCheckpoint(path, index_name=name)
            model_files = set(ckpt.sharding["files"])
        else:
            ckpt = open_checkpoint(path / name)
            model_files = {name}
        for p in files:
            if p.name not in model_files:  # the shard index too: it comes back byte for byte
                checked_side_file(p, p.stat().st_size)
                ckpt.extra_files[p.name] = p
        head = release_head(path)
        if head is not None:
            checked_side_file(head, head.stat().st_size)
            ckpt.extra_files[head.name] = head  # kept as bytes, never unpickled
        return ckpt
    if path.suffix == SAFETENSORS_EXT:
        return SafetensorsCheckpoint(path)
    if path.suffix in TORCH_EXTS:
        return TorchCheckpoint(path)
    raise FormatError(f"{path}: unknown checkpoint type (expected {', '.join(CHECKPOINT_EXTS)} or a folder)")
