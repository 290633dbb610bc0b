"""Writing rebuilt tasks out as checkpoints: what `extract` writes where, and writing it safely.

The target's name decides what is written (the rules `tallzip extract --help` states):
- `NAME.safetensors`: one safetensors file of all the task's tensors (a sharded task unsharded);
- `NAME.pt`, `.pth`, `.bin`: one torch state dict, a plain dict of tensors;
- any other name: a folder holding the task as it came (its shards and index, its side files, or
  its one checkpoint file under its input's name); `fmt` picks the model file's format there.
Side files and sharding come back only in a folder. A folder target may exist: only the files
written are moved into it (atomic_output), so nothing else in it is ever touched.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tallzip.errors import TallzipError
from tallzip.formats.checkpoints.folders import SAFETENSORS_EXT, TORCH_EXTS, shard_index
from tallzip.formats.checkpoints.outputs import SafetensorsStream, atomic_output, save_tensors, write_shard_index
from tallzip.formats.errors import CorruptArchiveError
from tallzip.formats.container.constants import ROLE_FILE
from tallzip.formats.tensors import torch_dtype
from tallzip.run.chunks import BufferPool, ordered_map
from tallzip.run.threads import resolve_device

FORMATS = ("safetensors", "pt")
_SCRATCH = BufferPool()  # per thread: the chunk being rebuilt for writing


@dataclass
class ExtractReport:
    """What an extract wrote: each task's output (file or folder) and every file, with sizes."""

    output: Path
    tasks: list[str]
    paths: list[Path]
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"output": str(self.output), "tasks": self.tasks, "paths": [str(p) for p in self.paths],
                "files": [{"path": str(p), "bytes": p.stat().st_size} for p in self.files],
                "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def file_format(path) -> str | None:
    """The format a file target's extension names, or None: the target is a folder."""
    suffix = Path(path).suffix
    if suffix == SAFETENSORS_EXT:
        return "safetensors"
    if suffix in TORCH_EXTS:
        return "pt"
    return None


def _checked_format(fmt: str | None):
    if fmt is not None and fmt not in FORMATS:
        raise TallzipError(f"unknown output format {fmt!r} (expected safetensors or pt)")


def _task_format(entry: dict, fmt: str | None) -> str:
    return fmt or ("pt" if entry["format"] == "pt" else "safetensors")


def _model_file_name(entry: dict, fmt: str) -> str:
    """The task's checkpoint file inside a folder: its input's name, with the extension of `fmt`."""
    name = Path(entry.get("file_name") or (entry["name"] + SAFETENSORS_EXT if entry["layout"] == "file"
                                           else "model" + SAFETENSORS_EXT))
    if fmt == "safetensors":
        return name.with_suffix(SAFETENSORS_EXT).name
    return (name if name.suffix in TORCH_EXTS else name.with_suffix(".pt")).name


def folder_files(entry: dict, fmt: str | None) -> list[str]:
    """Relative names of the files a task is written as inside a folder."""
    fmt = _task_format(entry, fmt)
    sharding = entry.get("sharding")
    if sharding and fmt == "safetensors":
        model = [*sharding["files"], shard_index(sharding)]
    else:
        model = [_model_file_name(entry, fmt)]
    return model + [f for f in _side_files(entry, fmt) if f not in model]


def _side_files(entry: dict, fmt: str) -> list[str]:
    """The task's side files that come back; a shard index kept as bytes only with its shards."""
    index = shard_index(entry.get("sharding"))
    return [f for f in entry.get("files", []) if f != index or fmt == "safetensors"]


class _Counter:
    """Turns 'one more tensor written' into the progress(label, done, total) callback."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, count: int = 1):
        self.done += count
        if self.progress:
            self.progress("extracting", self.done, self.total)


def _tensor_count(archive, tasks) -> int:
    return sum(len(archive.task_entry(t)["tensors"]) for t in tasks)


def _finish(report: ExtractReport, begin: float) -> ExtractReport:
    report.bytes = sum(p.stat().st_size for p in report.files)
    report.seconds = time.perf_counter() - begin
    return report


def extract_task(archive, task: str, output, *, fmt=None, force=False, device="cpu", progress=None) -> ExtractReport:
    """One task at `output`: a file if its name ends in a checkpoint extension, else a folder."""
    begin = time.perf_counter()
    entry = archive.task_entry(task)
    output = Path(output)
    _checked_format(fmt)
    named = file_format(output)
    if named and fmt and fmt != named:
        raise TallzipError(f"{output}: --format {fmt} contradicts the extension {output.suffix} "
                           f"(.safetensors is safetensors; {', '.join(TORCH_EXTS)} a torch state dict)")
    device = resolve_device(device)
    tick = _Counter(progress, _tensor_count(archive, [task]))
    if named:
        with atomic_output(output, force=force, inputs=archive.local_files()) as tmp:
            _write_file(archive, task, tmp, named, device, tick)
        return _finish(ExtractReport(output, [task], [output], [output]), begin)
    files = folder_files(entry, fmt)
    with atomic_output(output, force=force, folder=True, files=files, inputs=archive.local_files()) as tmp:
        _write_folder(archive, task, tmp, _task_format(entry, fmt), device, tick)
    return _finish(ExtractReport(output, [task], [output], [output / f for f in files]), begin)


def extract_all(archive, folder, *, fmt=None, force=False, device="cpu", progress=None) -> ExtractReport:
    """Every task into `folder`, each named as its input was: `TASK.safetensors` / `TASK.pt` for a
    task that was one file, a sub-folder `TASK/` (its own layout) for one that was a folder."""
    begin = time.perf_counter()
    folder = Path(folder)
    _checked_format(fmt)
    if file_format(folder):
        raise TallzipError(f"{folder}: --all writes a folder of tasks; give a folder name, not a {folder.suffix} file")
    device = resolve_device(device)
    tasks = archive.tasks
    outputs, files = {}, []
    for task in tasks:
        entry = archive.task_entry(task)
        if entry["layout"] == "folder":
            outputs[task] = task
            files += [f"{task}/{f}" for f in folder_files(entry, fmt)]
        else:
            outputs[task] = _model_file_name(entry, _task_format(entry, fmt))
            files.append(outputs[task])
    tick = _Counter(progress, _tensor_count(archive, tasks))
    with atomic_output(folder, force=force, folder=True, files=files, inputs=archive.local_files()) as tmp:
        together = {}
        for task in tasks:
            entry = archive.task_entry(task)
            task_fmt = _task_format(entry, fmt)
            if entry["layout"] == "folder":
                _write_folder(archive, task, tmp / outputs[task], task_fmt, device, tick)
            elif task_fmt == "safetensors":
                together[task] = tmp / outputs[task]  # written together: each base and mtv decoded once
            else:
                _write_file(archive, task, tmp / outputs[task], task_fmt, device, tick)
        if together:
            extract_together(archive, together, device, tick=tick)
    return _finish(ExtractReport(folder, tasks, [folder / outputs[t] for t in tasks], [folder / f for f in files]),
                   begin)


def _write_file(archive, task: str, path: Path, fmt: str, device, tick):
    """All of the task's tensors as one file at `path` (streamed, for safetensors)."""
    entry = archive.task_entry(task)
    if fmt == "safetensors":
        _stream(archive, task, {path: [name for name, _ in entry["tensors"]]}, entry.get("metadata"), device, tick)
    else:
        save_tensors(_state(archive, task, device, tick), path, "pt")


def _write_folder(archive, task: str, root: Path, fmt: str, device, tick):
    """The task in its own layout inside `root` (created): model file(s), then its side files."""
    entry = archive.task_entry(task)
    root.mkdir(parents=True, exist_ok=True)
    sharding = entry.get("sharding")
    if sharding and fmt == "safetensors":
        _stream(archive, task, {root / f: names for f, names in sharding["files"].items()},
                entry.get("metadata"), device, tick)
        if shard_index(sharding) not in entry.get("files", []):  # archives before the index was kept as bytes
            write_shard_index(root, sharding)
    else:
        _write_file(archive, task, root / _model_file_name(entry, fmt), fmt, device, tick)
    for name in _side_files(entry, fmt):
        data = archive.read_tensor(archive.section_entry(ROLE_FILE, name, task))
        (root / name).write_bytes(data.numpy().tobytes())


def _state(archive, task, device, tick) -> "OrderedDict":
    state = OrderedDict()
    for name, tensor in archive.iter_task(task, device):
        state[name] = tensor.cpu()
        tick()
    return state


def _stream(archive, task: str, files: dict, metadata, device, tick):
    """Write the task's tensors into safetensors files ({path: names}), each chunk as it is rebuilt."""
    entry = archive.task_entry(task)
    dtypes = dict(entry["tensors"])
    streams, where = [], {}
    try:
        for path, names in files.items():
            unknown = [n for n in names if n not in dtypes]
            if unknown:
                raise CorruptArchiveError(f"{archive.path}: damaged archive (shard {path.name} of task {task!r} "
                                          f"names tensor {unknown[0]!r}, which the task lacks)")
            stream = SafetensorsStream(path, [(n, dtypes[n], archive.task_shape(task, n)) for n in names], metadata)
            streams.append(stream)
            where.update(dict.fromkeys(names, stream))
        if device.type == "cpu":
            _write_chunks_in_place(archive, task, where, tick)
            for stream in streams:
                stream.close()
            return
        # chunk by chunk: each chunk is written in place while the next ones are decoded, so no
        # tensor is ever held whole
        for name, start, flat in archive.iter_task_chunks(task, device):
            if name not in where:
                raise CorruptArchiveError(f"{archive.path}: damaged archive (tensor {name!r} of task {task!r} "
                                          "is in none of its shards)")
            where[name].write_part(name, start, flat)
            if start + flat.numel() == math.prod(archive.task_shape(task, name)):
                tick()
        for stream in streams:
            stream.close()
    except BaseException:
        for stream in streams:
            stream.abort()
        raise


def _write_chunks_in_place(archive, task: str, where: dict, tick):
    """On a CPU: the pool's threads decode each chunk, rebuild it into a buffer of their own (reused from chunk to
    chunk: no fresh pages per chunk) and pwrite it at its place in its file, while it is in their caches; this
    thread only counts finished tensors. The bytes are those of the chunk-by-chunk stream (tested)."""
    names = [name for name, _ in archive.task_entry(task)["tensors"]]
    missing = [name for name in names if name not in where]
    if missing:
        raise CorruptArchiveError(f"{archive.path}: damaged archive (tensor {missing[0]!r} of task {task!r} "
                                  "is in none of its shards)")
    dtypes = {name: torch_dtype(dtype) for name, dtype in archive.task_dtypes(task).items()}

    def job(item):
        name, index, start, count = item
        dtype = dtypes[name]
        size = dtype.itemsize
        scratch = _SCRATCH.get(dtype, count * size, lambda nbytes: torch.empty(max(nbytes // size, 1), dtype=dtype))
        where[name].write_part_here(name, start, archive.chunk_into(task, name, index, scratch[:count]))
        return item

    items = [(name, i, start, count) for name in names for i, (start, count) in enumerate(archive.plan(task, name))]
    for name, _, start, count in ordered_map(job, items, cost=lambda it: archive.chunk_cost(it[0], it[3]),
                                             budget=archive.memory):
        if start + count == math.prod(archive.task_shape(task, name)):
            tick()


def extract_together(archive, files: dict, device, tick=None):
    """Write several tasks as safetensors files at once, chunk by chunk, so that each base and
    mtv chunk is read and decoded once for all of them rather than once per task."""
    tasks = list(files)
    specs = {t: [(n, d, archive.task_shape(t, n)) for n, d in archive.task_entry(t)["tensors"]] for t in tasks}
    streams = {}
    try:
        for t in tasks:
            streams[t] = SafetensorsStream(files[t], specs[t], archive.task_entry(t).get("metadata"))
        for name, start, parts in archive.iter_tasks_chunks(tasks, device):
            done = 0
            for task, flat in parts.items():
                streams[task].write_part(name, start, flat)
                done += start + flat.numel() == math.prod(archive.task_shape(task, name))
            if tick and done:
                tick(done)
        for stream in streams.values():
            stream.close()
    except BaseException:
        for stream in streams.values():
            stream.abort()
        raise
