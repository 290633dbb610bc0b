"""Checkpoint readers and writers: safetensors (single and sharded) and torch pickles.

Readers are lazy: they list names, dtypes and shapes from headers and read one tensor, or one
range of a tensor's elements, at a time (pread into fresh buffers), so a caller can stream a model
without holding it whole. Torch zip checkpoints are read by offset too (formats/torch_lazy.py),
their records CRC-checked before use.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import FormatError
from .constants import DTYPE_SIZES
from .sources import RemoteFile, RemotePath, is_url, list_folder, location, open_source
from .tensors import dtype_name, torch_dtype

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
        from .safe_pickle import load_state_dict, read_lazy  # heavy-ish and only needed for pickles
        from .torch_lazy import LazyTorchFile, aliases
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


# --- writing, atomically -------------------------------------------------------------------------

def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def new_file_mode() -> int:
    """The mode any new file gets here (0666 less the umask): what every output gets."""
    return 0o666 & ~_umask()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(parent: Path, target_name: str) -> list[Path]:
    """Delete what killed writers of `target_name` left in `parent`; returns what was deleted.

    Temporaries are named `.{target}.{pid}.{random}.tmp` and their writer holds an flock on them
    while it runs, so one is stale only if its pid is gone and nobody holds the lock (the pid check
    alone could be fooled by a pid namespace or a reused pid, the lock alone by the instant between
    creating the file and locking it)."""
    prefix, removed = f".{target_name}.", []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        parts = entry.name[len(prefix):].split(".") if entry.name.startswith(prefix) else []
        if len(parts) != 3 or parts[2] != "tmp" or not parts[0].isdigit() or _process_alive(int(parts[0])):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # locked: its writer is alive after all
            pass
        finally:
            os.close(fd)
    return removed


def _name_the_target(exc: BaseException, tmp: Path | None, target: Path):
    """Make an error about the hidden temporary (or a file inside it) name the user's target instead."""
    if isinstance(exc, OSError):
        for attr in ("filename", "filename2"):
            name = getattr(exc, attr)
            if tmp is not None and isinstance(name, str) and (name == str(tmp) or name.startswith(f"{tmp}{os.sep}")):
                setattr(exc, attr, str(target) + name[len(str(tmp)):])
        if not exc.filename:
            exc.filename = str(target)
    elif tmp is not None and isinstance(exc, FormatError) and exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(str(tmp), str(target)),) + exc.args[1:]


def _check_target(target: Path, *, force: bool, folder: bool, files):
    """Refuse, before any work, a target that this write must not or cannot replace."""
    if not folder:
        if target.is_dir():
            raise FormatError(f"{target}: is a folder (a file is written there)")
        if os.path.lexists(target) and not force:
            raise FormatError(f"{target}: already exists (use --force to overwrite)")
        return
    if os.path.lexists(target) and not target.is_dir():
        raise FormatError(f"{target}: exists and is not a folder (a folder is written there)")
    if not target.is_dir():
        return
    for rel in files or ():
        dest = target / rel
        _check_in_folder(target, dest, force)


def _check_in_folder(target: Path, dest: Path, force: bool):
    """`dest`, a file to be written inside the existing folder `target`, may be (re)placed."""
    for folder in reversed([p for p in dest.parents if target in p.parents]):
        if os.path.lexists(folder) and not folder.is_dir():
            raise FormatError(f"{folder}: exists and is not a folder (a folder is written there)")
    if dest.is_dir():
        raise FormatError(f"{dest}: is a folder (a file is written there)")
    if os.path.lexists(dest) and not force:
        raise FormatError(f"{dest}: already exists (use --force to replace it)")


@contextlib.contextmanager
def atomic_output(target, *, force: bool = False, folder: bool = False, files=None):
    """Yield a temporary path for `target`; put it in place only if the block succeeds.

    A file is written beside the target and renamed onto it. A folder is built in a temporary
    folder: renamed into place if the target does not exist; else only the files the block wrote
    are moved into the existing folder (nothing else there is touched), replacing same-named files
    only with `force`. `files` (relative paths) lets a clash be refused before the work starts.
    A failure leaves the target as it was; an interrupted write leaves at most a hidden
    `.target.PID.*.tmp` (beside the target, or inside an existing target folder), which the next
    write to the same target removes once its writer is gone. Errors name the target, never the
    temporary.
    """
    target = Path(target)
    _check_target(target, force=force, folder=folder, files=files)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FormatError(f"{parent}: no such folder")
    into_existing = folder and target.is_dir()
    where = target if into_existing else parent
    remove_stale_temporaries(parent, target.name)
    if into_existing:
        remove_stale_temporaries(target, target.name)
    prefix = f".{target.name}.{os.getpid()}."
    try:
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=where))
            lock_fd = os.open(tmp, os.O_RDONLY)
        else:
            lock_fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=where)
            tmp = Path(name)
    except OSError as exc:  # read-only, no permission...: say so about the target
        exc.filename = str(target)
        raise
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # held until we are done: tells others we are alive
        # mkstemp/mkdtemp make owner-only files; the result should get the permissions any new file gets
        os.fchmod(lock_fd, (0o777 if folder else 0o666) & ~_umask())
        yield tmp
        if not folder:
            os.fsync(lock_fd)
            os.replace(tmp, target)
        elif into_existing or not _rename_folder(tmp, target):
            _move_into(tmp, target, force=force, prefix=prefix)
    except BaseException as exc:
        _name_the_target(exc, tmp, target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink(missing_ok=True)
        os.close(lock_fd)


def _rename_folder(tmp: Path, target: Path) -> bool:
    """Rename the built folder onto a target that did not exist; False if one appeared meanwhile."""
    try:
        os.rename(tmp, target)
        return True
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
            return False
        raise


def _written_files(root: Path) -> list[Path]:
    """Every file under `root`, relative to it, in a stable order."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        files.extend(Path(folder, n).relative_to(root) for n in sorted(names))
    return files


def _move_into(tmp: Path, target: Path, *, force: bool, prefix: str):
    """Move the files built in `tmp` into the existing folder `target`, each by one rename.

    A file already there is replaced only with `force`, and is kept (hard-linked) aside until every
    file is in, so that a failure half way puts every replaced file back and removes the new ones:
    the folder ends as it began, or with all of the new files."""
    backups = None
    moved: list[tuple[Path, Path | None]] = []
    made: list[Path] = []
    try:
        for i, rel in enumerate(_written_files(tmp)):
            dest = target / rel
            _check_in_folder(target, dest, force)  # again: the folder may have changed while we worked
            for folder in reversed([p for p in dest.parents if target in p.parents]):
                if not folder.exists():
                    folder.mkdir()
                    made.append(folder)
            backup = None
            if os.path.lexists(dest):
                if backups is None:
                    backups = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target))
                backup = backups / str(i)
                _keep_aside(dest, backup)
                os.replace(tmp / rel, dest)
            else:
                _rename_no_replace(tmp / rel, dest)
            moved.append((dest, backup))
    except BaseException:
        for dest, backup in reversed(moved):
            try:
                os.replace(backup, dest) if backup else os.unlink(dest)
            except OSError:
                pass
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        if backups is not None:
            shutil.rmtree(backups, ignore_errors=True)


# A file system without hard links says so with one of these.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _keep_aside(dest: Path, backup: Path):
    """Keep the file about to be replaced at `backup`: a hard link, so `dest` never goes missing."""
    try:
        os.link(dest, backup, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        shutil.copy2(dest, backup, follow_symlinks=False)


def _rename_no_replace(src: Path, dest: Path):
    """Rename, failing if `dest` appeared since it was checked (a hard link cannot replace a file)."""
    try:
        os.link(src, dest)
    except FileExistsError:
        raise FormatError(f"{dest}: already exists (use --force to replace it)") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        os.rename(src, dest)  # a file system without hard links: checked just before
        return
    os.unlink(src)


def _save_safetensors(tensors: dict, path: Path, metadata: dict | None):
    """Write a safetensors file into `path` itself (safetensors' save_file writes a temporary file
    of mode 0600 and renames it over the path: the output would lose its mode and its inode, which
    atomic_output has locked), in the tensors' own order."""
    specs = [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsStream(path, specs, metadata) as stream:
        for name, tensor in tensors.items():
            stream.write(name, tensor)


def _plain_state_dict(tensors: dict) -> dict:
    """A plain dict (what any torch.load(weights_only=True) reads) of tensors that own their storage:
    torch.save writes a view's whole storage."""
    return {name: t if t.untyped_storage().nbytes() == t.nbytes else t.clone() for name, t in tensors.items()}


def save_tensors(tensors: dict, path: Path, fmt: str, metadata: dict | None = None):
    """Write one checkpoint file: 'safetensors' or 'pt' (a plain state dict)."""
    if fmt == "safetensors":
        _save_safetensors(tensors, path, metadata)
    elif fmt == "pt":
        # Through a Python file: torch then fails with the OSError of a failed write as the context
        # of its RuntimeError (writing to a path, it only says "unexpected pos").
        with open(path, "wb") as fh:
            try:
                torch.save(_plain_state_dict(tensors), fh)
            except RuntimeError as exc:
                if isinstance(exc.__context__, OSError):
                    raise exc.__context__ from None
                raise
    else:
        raise FormatError(f"unknown output format {fmt!r} (expected safetensors or pt)")


class SafetensorsStream:
    """Write one safetensors file tensor by tensor, each as soon as it is ready.

    The header is laid out first from (name, dtype name, shape) specs, so every tensor has a known
    place; write() hands its bytes to a background thread that pwrites them there. Memory is what
    the caller holds plus a bounded number of writes in flight, and producing the next tensor
    overlaps writing this one. Header entries keep the specs' order; the data is laid out widest
    dtype first so that every tensor is aligned for readers that map the file.
    """

    _MAX_IN_FLIGHT = 128 << 20  # bytes handed to the writing thread and not yet written

    def __init__(self, path, specs, metadata: dict | None = None):
        self.path = Path(path)
        self._specs = {}
        header = {"__metadata__": dict(metadata)} if metadata else {}
        order = sorted(range(len(specs)), key=lambda i: -DTYPE_SIZES.get(specs[i][1], 1))  # stable
        spans, position = {}, 0
        for i in order:
            name, dtype, shape = specs[i]
            if dtype not in DTYPE_SIZES:
                raise FormatError(f"{self.path}: cannot write tensor {name!r} of dtype {dtype!r} as safetensors")
            size = math.prod(shape) * DTYPE_SIZES[dtype]
            spans[name] = (position, position + size)
            position += size
        for name, dtype, shape in specs:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": list(spans[name])}
            self._specs[name] = (dtype, tuple(shape), spans[name][0])
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the format's writers do
        self._data_start = 8 + len(blob)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tallzip-save")
        self._in_flight: deque = deque()
        self._in_flight_bytes = 0
        self._written: set = set()
        self._parts: dict = {}  # name -> elements written so far
        os.ftruncate(self._fd, self._data_start + position)
        self._pwrite(len(blob).to_bytes(8, "little") + blob, 0)

    def _pwrite(self, data, offset):
        view = memoryview(data).cast("B")
        while len(view):
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def write(self, name: str, tensor: torch.Tensor):
        if name not in self._specs or name in self._written:
            raise FormatError(f"{self.path}: tensor {name!r} is not expected here (unknown, or written twice)")
        dtype, shape, offset = self._specs[name]
        if dtype_name(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise FormatError(f"{self.path}: tensor {name!r} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, "
                              f"expected {dtype} {list(shape)}")
        self.write_part(name, 0, tensor.reshape(-1))

    def write_part(self, name: str, start: int, flat: torch.Tensor):
        """Elements start .. start+len(flat) of a tensor's flattened data (chunks may come in any
        order; the tensor is complete once every element was written exactly once, by count)."""
        if name not in self._specs or name in self._written:
            raise FormatError(f"{self.path}: tensor {name!r} is not expected here (unknown, or written twice)")
        dtype, shape, offset = self._specs[name]
        count = flat.numel()
        if dtype_name(flat.dtype) != dtype or start < 0 or start + count > math.prod(shape):
            raise FormatError(f"{self.path}: part of tensor {name!r} ({dtype_name(flat.dtype)}, elements {start}.."
                              f"{start + count}) does not fit {dtype} {list(shape)}")
        done = self._parts.get(name, 0) + count
        self._parts[name] = done
        if done == math.prod(shape):
            self._written.add(name)
        flat = flat.detach().to("cpu").contiguous().reshape(-1)
        if not count:
            return
        data = flat.view(torch.uint8).numpy()  # kept alive by the job until written
        position = self._data_start + offset + start * DTYPE_SIZES[dtype]
        self._in_flight.append((self._pool.submit(self._pwrite, data, position), data.nbytes))
        self._in_flight_bytes += data.nbytes
        while self._in_flight and self._in_flight_bytes > self._MAX_IN_FLIGHT:
            self._wait_oldest()

    def _wait_oldest(self):
        future, size = self._in_flight.popleft()
        self._in_flight_bytes -= size
        future.result()

    def close(self):
        """Wait for every write; the file is complete only if every spec'd tensor was written."""
        if self._fd is None:
            return
        try:
            while self._in_flight:
                self._wait_oldest()
            missing = [name for name in self._specs if name not in self._written]
            if missing:
                raise FormatError(f"{self.path}: tensor {missing[0]!r} was never written")
        finally:
            self._release()

    def abort(self):
        """Stop without completing the file (the caller removes it)."""
        if self._fd is None:
            return
        for future, _ in self._in_flight:
            future.cancel()
        self._release()

    def _release(self):
        self._pool.shutdown(wait=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def save_sharded(tensors: dict, folder: Path, sharding: dict, metadata: dict | None = None):
    """Write the shards named in `sharding` and their index, as the input had them."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, names in sharding["files"].items():
        _save_safetensors({n: tensors[n] for n in names}, folder / file, metadata)
    write_shard_index(folder, sharding)


def write_shard_index(folder: Path, sharding: dict):
    """The `model.safetensors.index.json` of the shards in `sharding` (its metadata kept)."""
    weight_map = {n: file for file, names in sharding["files"].items() for n in names}
    index = {"metadata": sharding.get("metadata", {}), "weight_map": weight_map}
    (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2))
