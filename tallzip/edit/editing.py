"""`add` and `remove`: change the tasks of an archive without touching the other tasks' sections.

Both write a new archive beside the old one and rename it over it (formats.writer, atomic_output):
every kept section is copied chunk by chunk as its stored bytes (checked against their digests on
the way), with the same codec params and digests, so the other tasks rebuild bit for bit as before.
kill -9 at any moment leaves the old archive or the new one (at most a hidden temporary beside it,
which the next write there removes). The cost is one copy of the archive; a removed task's bytes
go with the old file, so nothing needs compacting.

A task added later cannot be `tall`: it is not in the stored mtv, and `base + mask * mtv` with a
mask chosen for it would rebuild the other tasks' sum on those weights, not its own vector; putting
it into the mtv would change every tall task's rebuild and their masks' decoding context.
"""
from __future__ import annotations

import math
import os
import time

import torch

from tallzip.ops import taskvec
from tallzip.archive.archive import Archive
from tallzip.errors import TallzipError, TaskMismatchError
from tallzip.formats.checkpoints.checkpoint import open_checkpoint
from tallzip.formats.container.constants import (FLOAT_DTYPES, KIND_PER_TASK, KIND_SHARED, REPRESENTATION_LOWRANK, REPRESENTATION_TALL, REPRESENTATIONS, ROLE_FILE, ROLE_MASK, ROLE_MTV, ROLE_OWN)
from tallzip.formats.container.reader import is_plain_file_name
from tallzip.formats.container.writer import ArchiveWriter, encode_chunk
from tallzip.formats.container.chunking import chunk_plan
from tallzip.formats.tensors import to_bits
from tallzip.options import DEFAULT_CODECS, LowRankOptions
from tallzip.packing.manifest import task_entry
from tallzip.packing.jobs import representation_chunk
from tallzip.packing.lowrank_pack import write_lowrank_tasks
from tallzip.ops import quality
from tallzip.ops.representations import ADD_DEFAULT, representation_section

_SECTION_FIELDS = ("role", "tensor", "task", "dtype", "shape", "codec", "length", "chunks", "ones")
PAUSE_ENV = "TALLZIP_EDIT_PAUSE"  # tests: "STAGE:FILE" touches FILE and sleeps at STAGE (copied, added, written)


def _pause(stage: str):
    """A test hook: lets a test kill -9 the process at a known point of the edit."""
    value = os.environ.get(PAUSE_ENV, "")
    want, _, marker = value.partition(":")
    if want == stage and marker:
        open(marker, "w").close()
        time.sleep(60)


def _copy_sections(arc: Archive, writer: ArchiveWriter, keep):
    """Every section for which keep(entry) holds, its chunks' stored bytes copied as they are."""
    reader = arc.reader
    for entry in arc.manifest["sections"]:
        if not keep(entry):
            continue
        extra = {k: v for k, v in entry.items() if k not in _SECTION_FIELDS}
        new = writer.section(role=entry["role"], tensor=entry["tensor"], task=entry["task"], dtype=entry["dtype"],
                             shape=entry["shape"], codec=entry["codec"], **extra)
        for chunk in reader.chunks(entry):
            data = reader.read_chunk_bytes(entry, chunk)  # refused here if damaged
            writer.write_chunk(new, data, chunk.params, chunk.digest, chunk.ones)


def _edited_manifest(arc: Archive, tasks: list) -> dict:
    m = {k: v for k, v in arc.manifest.items() if k not in ("sections", "version", "chunk_elements")}
    merge = dict(m["merge"])
    merge.setdefault("mtv_tasks", [t["name"] for t in arc.manifest["tasks"]])
    m["merge"], m["tasks"] = merge, tasks
    names = {t["name"] for t in tasks}
    if isinstance(m.get("lambda_scores"), dict):
        m["lambda_scores"] = {t: v for t, v in m["lambda_scores"].items() if t in names}
    return m


def _open_v2(path, base, need_base: bool = True) -> Archive:
    arc = Archive(path, base=base)
    if arc.reader.version < 2:
        arc.close()
        raise TallzipError(f"{path}: a version-1 archive; add and remove need version 2 (repack it)")
    if need_base and arc.base_info.get("by_reference") and arc.base_checkpoint is None:
        arc.close()
        raise TallzipError(f"{path}: was packed with --base-ref; give the base checkpoint (--base PATH)")
    return arc


def add(archive, checkpoint, task: str, *, keep: str = ADD_DEFAULT, base=None, progress=None,
        lowrank: LowRankOptions | None = None) -> dict:
    """Add `checkpoint` as task `task`, kept as `keep` (q8/q4/q3/q2/q1/lowrank/exact; lowrank: how, LowRankOptions);
    returns the new manifest."""
    if keep == REPRESENTATION_TALL:
        raise TallzipError("a task added later cannot be kept tall: it is not in the stored mtv, so a mask would "
                           "select another vector (the other tasks' sum); use q8, q4, q3, q2, q1, lowrank or exact")
    if keep not in REPRESENTATIONS:
        raise TallzipError(f"unknown representation {keep!r} (expected one of q8, q4, q3, q2, q1, lowrank, exact)")
    if not is_plain_file_name(task):
        raise TallzipError(f"task name {task!r} cannot be a file name (no '/', '\\', NUL, '.' or '..')")
    arc = _open_v2(archive, base)
    try:
        if task in arc.tasks:
            raise TallzipError(f"{archive}: already has a task {task!r} (remove it first)")
        ckpt = open_checkpoint(checkpoint)
        for name in arc.base_info["names"]:
            if name not in ckpt:
                raise TaskMismatchError(f"{checkpoint}: has no tensor {name!r}, which the base has")
            if list(ckpt.shapes[name]) != list(arc.tensors[name]["shape"]):
                raise TaskMismatchError(f"{checkpoint}: tensor {name!r} has shape {list(ckpt.shapes[name])}, "
                                        f"the base has {arc.tensors[name]['shape']}")
        level = arc.manifest.get("level", 3)
        chunk_elements = arc.reader.chunk_elements
        float_codec = next((s["codec"] for s in arc.manifest["sections"] if s["role"] == "base"
                            and s["dtype"] in FLOAT_DTYPES), DEFAULT_CODECS["float"])
        with ArchiveWriter(archive, force=True, chunk_elements=chunk_elements) as writer:
            _copy_sections(arc, writer, lambda entry: True)
            _pause("copied")
            sums, fields = _write_task(arc, writer, ckpt, task, keep, level, float_codec, chunk_elements,
                                       lowrank or LowRankOptions())
            _pause("added")
            entry = task_entry(task, ckpt, keep, taskvec.DEFAULT_LAMBDA, quality.estimate(sums), fields)
            manifest = writer.finish(_edited_manifest(arc, [*arc.manifest["tasks"], entry]))
        _pause("written")
        return manifest
    finally:
        arc.close()


def _write_task(arc: Archive, writer, ckpt, task, rep, level, float_codec, chunk_elements, lowrank):
    """The new task's sections: its representation of every base tensor it changes, its own tensors
    and side files. Returns (the rebuild's sums (ops/quality.py) over the tensors it keeps as `rep`, a lowrank
    task's "lowrank" field or None)."""
    sums, lowrank_names, fields = quality.zero_sums(), [], None

    def own(name, shape, dtype, read):
        codec = float_codec if dtype in FLOAT_DTYPES else "zstd"
        entry = writer.section(role=ROLE_OWN, tensor=name, task=task, dtype=dtype, shape=shape, codec=codec)
        for start, count in chunk_plan(shape, chunk_elements):
            writer.write_chunk(entry, *encode_chunk(codec, read(start, count), level))

    for name in arc.base_info["names"]:
        info = arc.tensors[name]
        shape, dtype = info["shape"], ckpt.dtypes[name]
        read = lambda start, count, n=name: to_bits(ckpt.read_range(n, start, count))  # noqa: E731
        plan = chunk_plan(shape, chunk_elements)
        if info["kind"] == KIND_PER_TASK or dtype not in FLOAT_DTYPES or info["dtype"] not in FLOAT_DTYPES:
            if info["kind"] == KIND_SHARED and dtype == info["dtype"] and _equal_to_base(arc, ckpt, name, plan):
                continue
            own(name, shape, dtype, read)
            continue
        if info["kind"] == KIND_SHARED and dtype == info["dtype"] and _equal_to_base(arc, ckpt, name, plan):
            continue  # unchanged: the base is this task's tensor too
        if rep == REPRESENTATION_LOWRANK:
            lowrank_names.append(name)  # coded whole, after this loop
            continue
        entries = {}
        for index, (start, count) in enumerate(plan):
            pieces, chunk_sums = representation_chunk(rep, arc.base_chunk(name, index),
                                                      ckpt.read_range(name, start, count), shape, start, count,
                                                      level, float_codec)
            sums += chunk_sums
            for role, _, coded, _ in pieces:
                if role not in entries:
                    entries[role] = (writer.section(role=ROLE_OWN, tensor=name, task=task, dtype=dtype, shape=shape,
                                                    codec=float_codec) if role == ROLE_OWN else
                                     representation_section(writer, role, name, task, shape, info["dtype"],
                                                            chunk_elements, rep))
                writer.write_chunk(entries[role], *coded)
    if rep == REPRESENTATION_LOWRANK:
        coded = write_lowrank_tasks(writer, {task: lowrank_names}, lambda _, n: (arc.base_tensor(n), ckpt.get(n)),
                                    lowrank, level, chunk_elements, budget=arc.memory,
                                    sizes={n: math.prod(arc.tensors[n]["shape"]) for n in lowrank_names})
        fields, task_sums = coded[task]
        sums += task_sums
    for name in ckpt.names:
        if name not in arc.tensors:
            own(name, list(ckpt.shapes[name]), ckpt.dtypes[name],
                lambda start, count, n=name: to_bits(ckpt.read_range(n, start, count)))
    for fname, path in ckpt.extra_files.items():
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) if path.stat().st_size else \
            torch.empty(0, dtype=torch.uint8)
        entry = writer.section(role=ROLE_FILE, tensor=fname, task=task, dtype="U8", shape=[data.numel()], codec="zstd")
        for start, count in chunk_plan([data.numel()], chunk_elements):
            writer.write_chunk(entry, *encode_chunk("zstd", data[start:start + count].numpy(), level))
    return sums, fields


def _equal_to_base(arc, ckpt, name, plan) -> bool:
    for index, (start, count) in enumerate(plan):
        if not torch.equal(arc.base_chunk(name, index), ckpt.read_range(name, start, count)):
            return False
    return True


def remove(archive, task: str, *, base=None) -> dict:
    """Remove task `task`; the others' sections are copied byte for byte. The mtv stays (the tall tasks'
    masks were made against it) unless no tall task is left, when it and the masks go."""
    arc = _open_v2(archive, base, need_base=False)  # sections are copied as stored: no base needed
    try:
        arc.task_entry(task)  # an unknown task: named, with the ones there are
        if len(arc.tasks) == 1:
            raise TallzipError(f"{archive}: {task!r} is its only task; an archive needs one (delete the file instead)")
        tasks = [t for t in arc.manifest["tasks"] if t["name"] != task]
        tall_left = any(t.get("representation", REPRESENTATION_TALL) == REPRESENTATION_TALL for t in tasks)

        def kept(entry):
            if entry["task"] == task:
                return False
            return tall_left or entry["role"] not in (ROLE_MTV, ROLE_MASK)

        with ArchiveWriter(archive, force=True, chunk_elements=arc.reader.chunk_elements) as writer:
            _copy_sections(arc, writer, kept)
            _pause("copied")
            manifest = writer.finish(_edited_manifest(arc, tasks))
        _pause("written")
        return manifest
    finally:
        arc.close()
