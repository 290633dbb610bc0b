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

SAFETENSORS_EXT = ".safetensors"
TORCH_EXTS = (".pt", ".pth", ".bin")
CHECKPOINT_EXTS = (SAFETENSORS_EXT,) + TORCH_EXTS
SHARD_INDEX = "model.safetensors.index.json"
# config.json, tokenizer files and the like travel with a task (Gemma's tokenizer.json is 17-33 MB)
MAX_EXTRA_FILE_BYTES = 64 * 1024 * 1024


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

    def __init__(self, folder: Path, storage_options: dict | None = None):
        super().__init__(folder)
        self.path = location(folder)
        try:
            if is_url(folder):
                with open_source(self.path / SHARD_INDEX, storage_options) as src:
                    index = json.loads(src.pread(0, src.size))
            else:
                index = json.loads((self.path / SHARD_INDEX).read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise FormatError(f"{self.path / SHARD_INDEX}: not a valid shard index") from None
        files: dict[str, list[str]] = OrderedDict()
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        self._shards = {}
        for file in files:
            if Path(file).name != file:
                raise FormatError(f"{self.path / SHARD_INDEX}: shard {file!r} is not a plain file name")
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
                         "metadata": index.get("metadata", {})}

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


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_EXTS)


_HF_SAME_MODEL = {"model.safetensors", "pytorch_model.bin"}


def _pick_in_folder(folder: Path) -> Path:
    """The one checkpoint file of a task folder (the paper's release keeps `nonlinear_finetuned.pt` there)."""
    files = _checkpoint_files(folder)
    if {p.name for p in files} == _HF_SAME_MODEL:
        return folder / "model.safetensors"  # Hugging Face keeps one model in both spellings
    if len(files) > 1:
        finetuned = [p for p in files if "finetuned" in p.stem and not p.stem.startswith("linear")]
        files = finetuned if len(finetuned) == 1 else files
    if len(files) != 1:
        what = "no checkpoint file" if not files else f"{len(files)} checkpoint files ({', '.join(p.name for p in files)})"
        raise FormatError(f"{folder}: holds {what}; a task folder needs exactly one, or a sharded index")
    return files[0]


def _open_remote_checkpoint(url: str, storage_options: dict | None = None) -> Checkpoint:
    """A safetensors file or folder behind a URL (torch pickles are read locally only)."""
    url = RemotePath(str(url).rstrip("/"))
    if url.suffix == SAFETENSORS_EXT:
        return SafetensorsCheckpoint(url, storage_options)
    if url.suffix in TORCH_EXTS:
        raise FormatError(f"{url}: torch checkpoints are read from local files only; download it, or use safetensors")
    entries = {e.name: e for e in list_folder(url, storage_options)}
    if SHARD_INDEX in entries:
        ckpt = ShardedCheckpoint(url, storage_options)
        checkpoint_files = set(ckpt.sharding["files"])
    else:
        models = sorted(n for n, e in entries.items() if not e.is_dir and RemotePath(n).suffix in CHECKPOINT_EXTS)
        if {*models} == _HF_SAME_MODEL:
            models = ["model.safetensors"]
        if len(models) != 1:
            what = "no checkpoint file" if not models else f"{len(models)} checkpoint files ({', '.join(models)})"
            raise FormatError(f"{url}: holds {what}; a task folder needs exactly one, or a sharded index")
        ckpt = _open_remote_checkpoint(entries[models[0]].location, storage_options)
        checkpoint_files = {models[0]}
    for name, e in entries.items():
        if (not e.is_dir and name not in checkpoint_files and RemotePath(name).suffix not in CHECKPOINT_EXTS
                and name != SHARD_INDEX and not name.startswith(".")
                and (e.size or 0) <= MAX_EXTRA_FILE_BYTES):
            ckpt.extra_files[name] = RemoteFile(e.location, e.size, storage_options)
    return ckpt


def open_checkpoint(path) -> Checkpoint:
    """A file (.safetensors, .pt/.pth/.bin) or a folder (sharded index, or one checkpoint file);
    a URL (s3://, https://, memory://...: safetensors only) is read by ranged requests."""
    if is_url(path):
        return _open_remote_checkpoint(path)
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / SHARD_INDEX).exists():
            ckpt = ShardedCheckpoint(path)
        else:
            ckpt = open_checkpoint(_pick_in_folder(path))
        checkpoint_files = set(ckpt.sharding["files"]) if ckpt.sharding else {ckpt.path.name}
        for p in sorted(path.iterdir()):
            if (p.is_file() and p.name not in checkpoint_files and p.suffix not in CHECKPOINT_EXTS
                    and p.name != SHARD_INDEX and not p.name.startswith(".")
                    and p.stat().st_size <= MAX_EXTRA_FILE_BYTES):
                ckpt.extra_files[p.name] = p
        head = release_head(path)
        if head is not None and head.stat().st_size <= MAX_EXTRA_FILE_BYTES:
            ckpt.extra_files[head.name] = head  # kept as bytes, never unpickled
        return ckpt
    if path.suffix == SAFETENSORS_EXT:
        return SafetensorsCheckpoint(path)
    if path.suffix in TORCH_EXTS:
        return TorchCheckpoint(path)
    raise FormatError(f"{path}: unknown checkpoint type (expected {', '.join(CHECKPOINT_EXTS)} or a folder)")


def release_head(task_folder: Path) -> Path | None:
    """The classification head that the authors' releases keep beside a task folder.

    Both the task-vector release (`{model}/{Dataset}/finetuned.pt`, `{model}/head_{Dataset}.pt`) and
    the TALL-mask release (`{model}/{Dataset}Val/nonlinear_finetuned.pt`, `{model}/head_{Dataset}Val.pt`)
    do so; the head then travels with its task as a side file."""
    for ext in TORCH_EXTS:
        head = task_folder.parent / f"head_{task_folder.name}{ext}"
        if head.is_file():
            return head
    return None


def discover_tasks(folder, exclude=()) -> dict[str, Path]:
    """Task name -> checkpoint path: each checkpoint file (name = stem) or sub-folder (name = folder name).

    A `head_{X}.pt` beside a task folder `{X}/` is that task's classification head (the released
    layouts), not a task of its own."""
    if is_url(folder):
        return _discover_remote_tasks(folder, exclude)
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder of checkpoints")
    excluded = {Path(p).resolve() for p in exclude}
    tasks = {}
    for entry in sorted(folder.iterdir()):
        if entry.resolve() in excluded or entry.name.startswith("."):
            continue
        task_folder = folder / entry.stem[len("head_"):]
        if entry.stem.startswith("head_") and task_folder.is_dir() and release_head(task_folder) == entry:
            continue
        if entry.is_file() and entry.suffix in CHECKPOINT_EXTS:
            name = entry.stem
        elif entry.is_dir() and ((entry / SHARD_INDEX).exists() or _checkpoint_files(entry)):
            if any(p.resolve() in excluded for p in _checkpoint_files(entry)) and len(_checkpoint_files(entry)) == 1:
                continue
            name = entry.name
        else:
            continue
        if name in tasks:
            raise FormatError(f"{folder}: two checkpoints are named {name!r} ({tasks[name].name}, {entry.name})")
        tasks[name] = entry
    return tasks


def _discover_remote_tasks(folder, exclude=()) -> dict:
    """discover_tasks for a URL: each .safetensors file (name = stem) or sub-folder holding one or a
    sharded index (name = folder name). Torch pickles and release heads are local-only."""
    excluded = {str(p).rstrip("/") for p in exclude}
    tasks = {}
    for entry in list_folder(folder):
        if entry.location.rstrip("/") in excluded or entry.name.startswith("."):
            continue
        if not entry.is_dir and RemotePath(entry.name).suffix == SAFETENSORS_EXT:
            name = entry.name[:-len(SAFETENSORS_EXT)]
        elif entry.is_dir and any(e.name == SHARD_INDEX or (not e.is_dir and RemotePath(e.name).suffix in CHECKPOINT_EXTS)
                                  for e in list_folder(entry.location)):
            name = entry.name
        else:
            continue
        if name in tasks:
            raise FormatError(f"{folder}: two checkpoints are named {name!r}")
        tasks[name] = RemotePath(entry.location)
    if not tasks and not list_folder(folder):
        raise FormatError(f"{folder}: not a folder of checkpoints (empty or missing)")
    return tasks
