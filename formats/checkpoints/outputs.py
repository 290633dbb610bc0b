"""Writing checkpoints safely: atomic outputs (a temporary beside the target, renamed into place,
never replacing what tallzip did not write), safetensors streamed tensor by tensor or part by part,
torch state dicts, and sharded folders with their index.
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
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tallzip.formats.checkpoints.folders import shard_index
from tallzip.formats.checkpoints.sources import is_url
from tallzip.formats.container.constants import DTYPE_SIZES
from tallzip.formats.errors import FormatError
from tallzip.formats.tensors import dtype_name


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


def _input_identities(inputs) -> set[tuple[int, int]]:
    """(device, inode) of each local input file: the same file under any name, link or symlink."""
    found = set()
    for path in inputs:
        if isinstance(path, (str, os.PathLike)) and not is_url(path):
            try:
                st = os.stat(path)
            except OSError:
                continue
            found.add((st.st_dev, st.st_ino))
    return found


def refuse_inputs_as_output(dests, inputs):
    """A write never replaces a file its own command reads, not even with --force."""
    identities = _input_identities(inputs)
    for dest in dests:
        try:
            st = os.stat(dest)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in identities:
            raise FormatError(f"{dest}: is one of this command's input files; write the output elsewhere")


def _check_target(target: Path, *, force: bool, folder: bool, files, inputs=()):
    """Refuse, before any work, a target that this write must not or cannot replace."""
    refuse_inputs_as_output([target] if not folder else [target / rel for rel in files or ()], inputs)
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
def atomic_output(target, *, force: bool = False, folder: bool = False, files=None, inputs=()):
    """Yield a temporary path for `target`; put it in place only if the block succeeds.

    A file is written beside the target and renamed onto it. A folder is built in a temporary
    folder: renamed into place if the target does not exist; else only the files the block wrote
    are moved into the existing folder (nothing else there is touched), replacing same-named files
    only with `force`. `files` (relative paths) lets a clash be refused before the work starts. A target
    (or, for a folder, one of `files` in it) that is one of `inputs` (the command's input files) is refused.
    A failure leaves the target as it was; an interrupted write leaves at most a hidden
    `.target.PID.*.tmp` (beside the target, or inside an existing target folder), which the next
    write to the same target removes once its writer is gone. Errors name the target, never the
    temporary.
    """
    target = Path(target)
    _check_target(target, force=force, folder=folder, files=files, inputs=inputs)
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
        self._lock = threading.Lock()
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

    def _claim(self, name: str, start: int, flat: torch.Tensor) -> int:
        """Check that elements start .. start+len(flat) of `name` fit, count them, and return their file offset."""
        with self._lock:
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
            return self._data_start + offset + start * DTYPE_SIZES[dtype]

    def write_part_here(self, name: str, start: int, flat: torch.Tensor):
        """write_part, written by this thread before it returns (any thread may call it: extract's pool threads
        write the chunk they rebuilt while it is in their caches; `flat` may be reused after)."""
        position = self._claim(name, start, flat)
        if flat.numel():
            self._pwrite(flat.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), position)

    def write_part(self, name: str, start: int, flat: torch.Tensor):
        """Elements start .. start+len(flat) of a tensor's flattened data (chunks may come in any
        order; the tensor is complete once every element was written exactly once, by count)."""
        position = self._claim(name, start, flat)
        flat = flat.detach().to("cpu").contiguous().reshape(-1)
        if not flat.numel():
            return
        data = flat.view(torch.uint8).numpy()  # kept alive by the job until written
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
    """The index (`model.safetensors.index.json`) of the shards in `sharding`, its metadata kept: for an
    archive that did not keep the input's index as bytes, and for merge's folder output."""
    weight_map = {n: file for file, names in sharding["files"].items() for n in names}
    index = {"metadata": sharding.get("metadata", {}), "weight_map": weight_map}
    (folder / shard_index(sharding)).write_text(json.dumps(index, indent=2))
