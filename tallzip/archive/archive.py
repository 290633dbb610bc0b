"""Reading an archive back: `tallzip.open(path)` lists tasks and rebuilds any one of them.

Rebuilding a task reads the base, the mtv, that task's masks and its own tensors, nothing else,
chunk by chunk: chunks are decoded and rebuilt on a thread pool, as many at once as the memory
budget holds, and handed over in order (iter_task_chunks), so extracting to a file never holds
more than the budget, and load() the model plus the budget.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from tallzip.ops import taskvec
from tallzip.errors import TallzipError, UnknownTaskError
from tallzip.run.chunks import chunk_plan, ordered_map, parse_memory
from tallzip.family import base_digest
from tallzip.ops.rebuild import rebuild_from_bits
from tallzip.formats import codecs as codec_registry
from tallzip.formats.checkpoints.checkpoint import open_checkpoint
from tallzip.formats.container.constants import (DTYPE_SIZES, KIND_MASKED, KIND_PER_TASK, KIND_SHARED, REPRESENTATION_EXACT, REPRESENTATION_LOWRANK, REPRESENTATION_TALL, ROLE_BASE, ROLE_DELTA, ROLE_MASK, ROLE_MTV, ROLE_OWN, ROLE_QCODES, ROLE_QOFFSETS, ROLE_QSCALES)
from tallzip.formats.errors import CorruptArchiveError
from tallzip.formats.checkpoints.sources import is_url, location
from tallzip.formats.container.reader import ArchiveReader
from tallzip.formats.tensors import from_bits, to_bits, torch_dtype
from tallzip.ops.representations import dequantize_chunk, rebuild_quantized
from tallzip.run.threads import resolve_device
from tallzip.archive.lowrank_read import LowRankStreams
from tallzip.archive.deprecated import DeprecatedAliases


def open(path, *, base=None, memory=None) -> "Archive":  # noqa: A001 - mirrors the builtin on purpose
    return Archive(path, base=base, memory=memory)


class _LazyContext:
    """A mask chunk's codec context (reader.chunk_context), built the first time a mask codec asks
    for it: 'bits+zstd' needs none, and building it costs a float32 copy of the mtv chunk."""

    def __init__(self, reader, entry, chunk, bits):
        self._args, self._value = (reader, entry, chunk, bits), None

    def value(self) -> dict:
        if self._value is None:
            reader, entry, chunk, bits = self._args
            self._value = reader.chunk_context(entry, chunk, bits)
        return self._value


class Archive(DeprecatedAliases):
    def __init__(self, path, *, base=None, memory=None):
        self.path = location(path)
        if not is_url(path) and not self.path.is_file():  # say which path and what was expected, not the OS's bare "Is a directory"
            what = "is a folder" if self.path.is_dir() else "not a regular file" if self.path.exists() else "no such file"
            raise TallzipError(f"{self.path}: {what}, expected a .tallz archive file")
        self.memory = parse_memory(memory)  # budget for chunks decoded at once
        self.reader = ArchiveReader(self.path)
        m = self.reader.manifest
        try:
            self.tensors: dict = m["tensors"]
            self.base_info: dict = m["base"]
            self._tasks = {t["name"]: t for t in m["tasks"]}
            self.merge_info: dict = m["merge"]
        except (KeyError, TypeError):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest lacks tasks, tensors or base)") from None
        self.base_checkpoint = None
        self._dtypes: dict = {}
        self._context_cache, self._lowrank = None, {}
        if self.base_info.get("by_reference"):
            if base is not None:
                self.attach_base(base)
        elif base is not None:
            raise TallzipError(f"{self.path}: stores its own base; --base is only for archives packed with --base-ref")

    # --- what is inside ---------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self.reader.manifest

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def lambdas(self) -> dict[str, float]:
        return {t: e["lambda"] for t, e in self._tasks.items()}

    def task_entry(self, task: str) -> dict:
        if task not in self._tasks:
            raise UnknownTaskError(f"no task {task!r} in {self.path.name}; tasks: {', '.join(self._tasks)}")
        return self._tasks[task]

    def local_files(self) -> list:
        """The files this archive reads: itself, and an attached base's."""
        own = [self.path] if isinstance(self.path, Path) else []
        return own + (self.base_checkpoint.local_files() if self.base_checkpoint is not None else [])

    # --- the base ---------------------------------------------------------------------------
    def attach_base(self, base):
        """For an archive packed with base_ref: use this checkpoint as the base, if its hash matches."""
        ckpt = open_checkpoint(base)
        digest = base_digest(ckpt)
        if digest != self.base_info.get("sha256"):
            raise TallzipError(f"{base}: is not the base this archive was packed with (sha256 differs)")
        self.base_checkpoint = ckpt

    def section_entry(self, role, name, task=None) -> dict:
        entry = self.reader.section(role, name, task)
        if entry is None:
            what = f"{role} of tensor {name!r}" + (f" for task {task!r}" if task else "")
            raise CorruptArchiveError(f"{self.path}: damaged archive (no section for the {what})")
        return entry

    def read_tensor(self, entry, context=None) -> torch.Tensor:
        if entry["role"] == ROLE_MASK:
            return torch.from_numpy(self.reader.read(entry, context)).reshape(entry["shape"])
        return from_bits(self.reader.read(entry, context), entry["dtype"], entry["shape"])

    # --- chunks -----------------------------------------------------------------------------
    def plan(self, task: str | None, name: str) -> list[tuple[int, int]]:
        """[(start, count)]: the chunks every section of this tensor is cut into (its own section's
        for a task's own or per-task tensor)."""
        info = self.tensors.get(name)
        if info is None or info["kind"] == KIND_PER_TASK:
            return [(c.start, c.count) for c in self.reader.chunks(self.section_entry(ROLE_OWN, name, task))]
        if self.reader.version < 2:
            return [(0, math.prod(info["shape"]))]
        return chunk_plan(info["shape"], self.reader.chunk_elements)

    def base_chunk(self, name: str, index: int) -> torch.Tensor:
        """Chunk `index` of the base tensor, flat, in the base's dtype."""
        if self.base_info.get("by_reference"):
            if self.base_checkpoint is None:
                raise TallzipError(f"{self.path}: was packed with --base-ref; give the base checkpoint (--base PATH)")
            start, count = self.plan(None, name)[index]
            return self.base_checkpoint.read_range(name, start, count)
        entry = self.section_entry(ROLE_BASE, name)
        chunk = self.reader.chunks(entry)[index]
        return from_bits(self.reader.read_chunk(entry, chunk), entry["dtype"], (chunk.count,))

    def mtv_chunk(self, name: str, index: int):
        """Chunk `index` of the stored mtv: (flat, in the compute dtype; the mask codecs' context,
        which mask_chunk_bits takes)."""
        mtv, context = self._stored_mtv_chunk(name, index)
        return taskvec.as_compute(mtv), context

    def _stored_mtv_chunk(self, name: str, index: int):
        """mtv_chunk with the mtv in its stored dtype (rebuild_from_bits widens it as it adds)."""
        entry = self.section_entry(ROLE_MTV, name)
        chunk = self.reader.chunks(entry)[index]
        bits = self.reader.read_chunk(entry, chunk)
        return from_bits(bits, entry["dtype"], (chunk.count,)), _LazyContext(self.reader, entry, chunk, bits)

    def mask_chunk_bits(self, task: str, name: str, index: int, context) -> np.ndarray:
        """Chunk `index` of a task's mask, bit-packed (uint8, little bit order); `context` as
        mtv_chunk gives it (or the context dict itself)."""
        entry = self.section_entry(ROLE_MASK, name, task)
        if isinstance(context, _LazyContext):
            context = context.value() if codec_registry.uses_context(entry["codec"]) else None
        return self.reader.read_chunk_mask_bits(entry, self.reader.chunks(entry)[index], context)

    def chunk_parts(self, task: str, name: str, index: int, shared=None):
        """What one chunk of one tensor of a task is made of, decoded on the CPU (thread-safe: the
        reader uses pread, and decoding releases the GIL). `shared`: (base, mtv, context) of this
        chunk already decoded for another task."""
        dtype = self.task_dtypes(task).get(name)
        if dtype is None:
            raise UnknownTaskError(f"task {task!r} has no tensor {name!r}")
        info = self.tensors.get(name)
        if info is None or info["kind"] == KIND_PER_TASK or self.reader.section(ROLE_OWN, name, task) is not None:
            entry = self.section_entry(ROLE_OWN, name, task)
            chunk = self.reader.chunks(entry)[index]
            return dtype, from_bits(self.reader.read_chunk(entry, chunk), entry["dtype"], (chunk.count,)), None
        rep = self.representation(task)
        if rep != REPRESENTATION_TALL and (info["kind"] == KIND_MASKED or self.has_own_rebuild(task, name)):
            base = shared[0] if shared else self.base_chunk(name, index)
            return dtype, self._represented_chunk(task, rep, name, index, base), None
        if info["kind"] == KIND_SHARED:
            return dtype, shared[0] if shared else self.base_chunk(name, index), None
        if info["kind"] == KIND_MASKED:
            base, mtv, context = shared if shared else (self.base_chunk(name, index), *self._stored_mtv_chunk(name, index))
            return dtype, base, (mtv, self.mask_chunk_bits(task, name, index, context))
        raise CorruptArchiveError(f"{self.path}: damaged archive (tensor {name!r} of unknown kind)")

    def representation(self, task: str) -> str:
        """How the task is rebuilt: tall, q8, q4, q3, q2, q1, lowrank or exact (SPEC.md)."""
        return self.task_entry(task).get("representation", REPRESENTATION_TALL)

    def has_own_rebuild(self, task: str, name: str) -> bool:
        """A q*/lowrank/exact task added later may carry a rebuild of a tensor the other tasks share."""
        if self.representation(task) == REPRESENTATION_LOWRANK:
            return self.lowrank(task).has(name)
        return any(self.reader.section(role, name, task) is not None for role in (ROLE_QCODES, ROLE_DELTA))

    def lowrank(self, task: str) -> LowRankStreams:
        """A lowrank task's streams, decoded on first use and kept (archive/lowrank_read.py)."""
        return self._lowrank.get(task) or self._lowrank.setdefault(task, LowRankStreams(self, task))

    def quant_chunk(self, task: str, name: str, index: int):
        """(codes, scales float32, offsets float32 or None, chunk shape) of one chunk of a q* task's
        tensor, range-checked."""
        quant = self.task_entry(task)["quant"]
        symmetric = quant["grid"] != "asymmetric"  # "sign" (q1): codes -1/+1, decoded as symmetric
        codes_entry = self.section_entry(ROLE_QCODES, name, task)
        chunk = self.reader.chunks(codes_entry)[index]
        codes = torch.from_numpy(self.reader.read_chunk(codes_entry, chunk).view(np.int8 if symmetric else np.uint8)
                                 .astype(np.int16))

        def side(role):
            entry = self.section_entry(role, name, task)
            part = self.reader.chunks(entry)[index]
            return from_bits(self.reader.read_chunk(entry, part), entry["dtype"], (part.count,)).to(torch.float32)

        scales = side(ROLE_QSCALES)
        offsets = None if symmetric else side(ROLE_QOFFSETS)
        top = max(1, 2 ** (quant["bits"] - 1) - 1)
        low, high = (-top, top) if symmetric else \
            (0, 2 ** quant["bits"] - 1)
        if (codes.numel() and (int(codes.min()) < low or int(codes.max()) > high)) or \
                not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()) or \
                (offsets is not None and (offsets.numel() != scales.numel() or not bool(torch.isfinite(offsets).all()))):
            raise CorruptArchiveError(f"{self.path}: damaged archive (codes out of range, or a negative or "
                                      f"non-finite scale, in task {task!r} tensor {name!r})")
        return codes, scales, offsets, chunk.shape

    def _represented_chunk(self, task: str, rep: str, name: str, index: int, base: torch.Tensor) -> torch.Tensor:
        """One chunk of a q*, lowrank or exact task, flat, in the compute dtype (q*, lowrank) or the task's (exact)."""
        if rep == REPRESENTATION_LOWRANK:
            return rebuild_quantized(base, self.lowrank(task).value(name, *self.plan(task, name)[index]))
        if rep == REPRESENTATION_EXACT:
            entry = self.section_entry(ROLE_DELTA, name, task)
            chunk = self.reader.chunks(entry)[index]
            bits = self.reader.read_chunk(entry, chunk, {"base": to_bits(base)})
            return from_bits(bits, entry["dtype"], (chunk.count,))
        codes, scales, offsets, shape = self.quant_chunk(task, name, index)
        value = dequantize_chunk(codes, scales, shape, self.task_entry(task)["quant"]["group"], offsets)
        return rebuild_quantized(base, value)

    def chunk_cost(self, name: str, count: int, tasks: int = 1) -> int:
        """Bytes one chunk job holds at its peak: base, mtv (stored, float32, compute), the mask,
        the rebuilt chunk per task, and the mask codec's working set (~20 bytes per element)."""
        info = self.tensors.get(name)
        itemsize = DTYPE_SIZES.get(info["dtype"], 4) if info else 4
        return max(count, 1) * (itemsize + 2 + 8 + 24 + tasks * (itemsize + 5)) + (1 << 20)

    def iter_task_chunks(self, task: str, device="cpu", names=None):
        """Yield (name, start, flat tensor in the task's dtype) for every chunk of the task's tensors
        (or of `names`), in order; decoded and rebuilt on a thread pool within the memory budget."""
        device = resolve_device(device)
        names = [n for n, _ in self.task_entry(task)["tensors"]] if names is None else names
        items = [(name, i, start, count) for name in names for i, (start, count) in enumerate(self.plan(task, name))]
        # on a CPU the rebuild runs on the pool's threads too; a GPU is fed from this thread
        here = device.type != "cpu"
        job = lambda item: (item, self._assembled_in_worker(self.chunk_parts(task, item[0], item[1]), device))  # noqa: E731
        for (name, _, start, _), parts in ordered_map(job, items, cost=lambda it: self.chunk_cost(it[0], it[3]),
                                                       budget=self.memory):
            yield name, start, (self.assemble(parts, device) if here else parts).reshape(-1)

    def _assembled_in_worker(self, parts, device: torch.device):
        return parts if device.type != "cpu" else self.assemble(parts, device)

    def iter_tasks_chunks(self, tasks: list, device="cpu"):
        """Yield (name, start, {task: flat tensor}) for several tasks at once, each chunk's base and
        mtv decoded once for all of them (tensors in the order of their first appearance)."""
        device = resolve_device(device)
        names = list(dict.fromkeys(n for t in tasks for n, _ in self.task_entry(t)["tensors"]))
        having = {n: [t for t in tasks if n in self.task_dtypes(t)] for n in names}
        items = []
        for name in names:
            info = self.tensors.get(name)
            if info is None or info["kind"] == KIND_PER_TASK:  # own sections: each task its own plan
                items += [(name, t, i, start, count) for t in having[name]
                          for i, (start, count) in enumerate(self.plan(t, name))]
            else:
                items += [(name, None, i, start, count) for i, (start, count) in enumerate(self.plan(None, name))]

        def job(item):
            name, only, index, _, _ = item
            if only is not None:
                return {only: self.chunk_parts(only, name, index)}
            info = self.tensors[name]
            base = self.base_chunk(name, index)
            tall = any(self.representation(t) == REPRESENTATION_TALL for t in having[name])
            shared = (base, *self._stored_mtv_chunk(name, index)) if info["kind"] == KIND_MASKED and tall else (base,)
            return {t: self.chunk_parts(t, name, index, shared) for t in having[name]}

        def assembled(item):  # on a CPU the rebuilds run on the pool's threads too
            return item, {t: self._assembled_in_worker(p, device) for t, p in job(item).items()}

        here = device.type != "cpu"
        cost = lambda it: self.chunk_cost(it[0], it[4], len(having[it[0]]))  # noqa: E731
        for (name, _, _, start, _), parts in ordered_map(assembled, items, cost=cost, budget=self.memory):
            yield name, start, {t: (self.assemble(p, device) if here else p).reshape(-1) for t, p in parts.items()}

    # --- whole tensors (assembled from their chunks) ----------------------------------------
    def base_tensor(self, name: str) -> torch.Tensor:
        if self.base_info.get("by_reference"):
            if self.base_checkpoint is None:
                raise TallzipError(f"{self.path}: was packed with --base-ref; give the base checkpoint (--base PATH)")
            return self.base_checkpoint.get(name)
        return self.read_tensor(self.section_entry(ROLE_BASE, name))

    def mtv(self, name: str) -> torch.Tensor:
        """The stored multi-task vector of a masked tensor, in the compute dtype."""
        return taskvec.as_compute(self.read_tensor(self.section_entry(ROLE_MTV, name)))

    def mask(self, task: str, name: str, mtv: torch.Tensor | None = None) -> torch.Tensor:
        if mtv is None:
            mtv = self.mtv(name)
        return self.read_tensor(self.section_entry(ROLE_MASK, name, task), self.mask_context(name, mtv))

    def mask_context(self, name: str, mtv: torch.Tensor) -> dict:
        """The decoded mtv (whole tensor, float32) as the mask codecs' side information; the reader
        cuts it into each chunk's context as it decodes. Kept while the same mtv is asked about (a
        one-chunk tensor's codec then derives its grouping once for all tasks)."""
        cached = self._context_cache
        if cached is None or cached[0] != name or cached[1] is not mtv:
            context = {"mtv": mtv.to(torch.float32).reshape(-1).cpu().numpy(), "shape": tuple(mtv.shape)}
            self._context_cache = cached = (name, mtv, context)
        return cached[2]

    def mask_bits(self, task: str, name: str, mtv: torch.Tensor | None = None) -> np.ndarray:
        """The task's mask of `name` bit-packed (uint8, little bit order): what a GPU unpacks."""
        if mtv is None:
            mtv = self.mtv(name)
        return self.reader.read_mask_bits(self.section_entry(ROLE_MASK, name, task), self.mask_context(name, mtv))

    # --- rebuilding tasks -------------------------------------------------------------------
    def task_tensor(self, task: str, name: str, device="cpu") -> torch.Tensor:
        """One tensor of a rebuilt task, in the task's dtype."""
        return self.assemble(self._task_parts(task, name), resolve_device(device))

    def _task_parts(self, task: str, name: str):
        """What one whole tensor of a task is made of (for callers that want tensors whole)."""
        entry = self.task_entry(task)
        dtype = self.task_dtypes(task).get(name)
        if dtype is None:
            raise UnknownTaskError(f"task {task!r} has no tensor {name!r}")
        info = self.tensors.get(name)
        if info is None or info["kind"] == KIND_PER_TASK or self.reader.section(ROLE_OWN, name, task) is not None:
            return dtype, self.read_tensor(self.section_entry(ROLE_OWN, name, entry["name"])), None
        if self.representation(task) != REPRESENTATION_TALL and (info["kind"] == KIND_MASKED
                                                                 or self.has_own_rebuild(task, name)):
            flats = [self.assemble(self.chunk_parts(task, name, i), torch.device("cpu")).reshape(-1)
                     for i in range(len(self.plan(task, name)))]
            return dtype, torch.cat(flats).reshape(info["shape"]), None
        if info["kind"] == KIND_SHARED:
            return dtype, self.base_tensor(name), None
        if info["kind"] == KIND_MASKED:
            mtv = self.mtv(name)
            return dtype, self.base_tensor(name), (mtv, self.mask_bits(task, name, mtv))
        raise CorruptArchiveError(f"{self.path}: damaged archive (tensor {name!r} of unknown kind)")

    @staticmethod
    def assemble(parts, device: torch.device) -> torch.Tensor:
        dtype, tensor, masked = parts
        if masked is not None:
            mtv, bits = masked
            tensor = rebuild_from_bits(tensor, bits, mtv, device)
        return tensor.to(device=device, dtype=torch_dtype(dtype))

    def task_dtypes(self, task: str) -> dict:
        if task not in self._dtypes:
            self._dtypes[task] = dict(self.task_entry(task)["tensors"])
        return self._dtypes[task]

    def task_shape(self, task: str, name: str) -> list:
        info = self.tensors.get(name)
        if info is not None and info["kind"] != KIND_PER_TASK:
            return info["shape"]
        return self.section_entry(ROLE_OWN, name, task)["shape"]

    def iter_task(self, task: str, device="cpu"):
        """Yield (name, tensor) of one rebuilt task, in its original order. Worker threads decode the next
        chunks while the caller uses this tensor; only it and the budget's chunks are held."""
        device = resolve_device(device)
        if device.type == "cpu":
            yield from self._iter_task_in_place(task)
            return
        shapes = {name: self.task_shape(task, name) for name, _ in self.task_entry(task)["tensors"]}
        current, filled = None, 0
        for name, start, flat in self.iter_task_chunks(task, device):
            shape, total = shapes[name], math.prod(shapes[name])
            if start == 0 and flat.numel() == total:
                yield name, flat.reshape(shape)
                continue
            if start == 0:
                current, filled = torch.empty(total, dtype=flat.dtype, device=flat.device), 0
            current[start:start + flat.numel()] = flat
            filled += flat.numel()
            if filled == total:
                yield name, current.reshape(shape)
                current = None

    def _iter_task_in_place(self, task: str):
        """iter_task on a CPU: each chunk decoded and rebuilt by the pool's threads into its tensor's slice."""
        names = [name for name, _ in self.task_entry(task)["tensors"]]
        shapes, dtypes = {name: self.task_shape(task, name) for name in names}, self.task_dtypes(task)
        # allocated up front (their pages are touched only as chunks land in them)
        outputs = {name: torch.empty(math.prod(shapes[name]), dtype=torch_dtype(dtypes[name])) for name in names}

        def job(item):
            name, index, start, count = item
            out = outputs[name][start:start + count]
            made = self.chunk_into(task, name, index, out)
            if made is not out:
                out.copy_(made)
            return item

        items = [(name, i, start, count) for name in names for i, (start, count) in enumerate(self.plan(task, name))]
        filled = dict.fromkeys(names, 0)
        for name, _, _, count in ordered_map(job, items, cost=lambda it: self.chunk_cost(it[0], it[3]),
                                             budget=self.memory):
            filled[name] += count
            if filled[name] == math.prod(shapes[name]):  # every chunk job of it is done
                yield name, outputs.pop(name).reshape(shapes[name])

    def chunk_into(self, task: str, name: str, index: int, out: torch.Tensor) -> torch.Tensor:
        """One chunk of a task decoded on the CPU, a masked one rebuilt straight into `out` (flat, the task's dtype:
        no chunk-sized allocation, issue 21); returns `out`, or the decoded chunk itself (flat) where it needs no
        rebuild (the caller then uses it as it is: no copy)."""
        _, tensor, masked = parts = self.chunk_parts(task, name, index)
        if masked is not None and tensor.dtype == out.dtype:  # masked: (mtv, bits)
            return rebuild_from_bits(tensor, masked[1], masked[0], torch.device("cpu"), out=out)
        return self.assemble(parts, torch.device("cpu")).reshape(-1)

    def load(self, task: str, device="cpu") -> "OrderedDict[str, torch.Tensor]":
        """The task's rebuilt state dict: base + mask * mtv, its own tensors as they were."""
        return OrderedDict(self.iter_task(task, device))

    def resident(self, device="auto", tasks=None):
        """Keep the family on `device` for serving many tasks from one process (all tasks, or
        `tasks`): the base, and per task what its representation needs (tall: its bit-packed mask,
        with base + mtv once; q*: its codes and scales; exact: its tensors). `switch(task)` then
        rewrites the weights in place, bit for bit what load(task) gives (see resident.py)."""
        from tallzip.serve.resident import Resident
        return Resident(self, device, tasks)

    def extract(self, task: str | None, output, *, fmt: str | None = None, force: bool = False, device="cpu",
                progress=None):
        """Write one task (or, with task None, every task) and return the ExtractReport: the output, every
        file written, bytes, seconds.

        Args:
            task: the task to rebuild; None writes every task into the folder `output`, each named as
                its input was (an existing folder keeps every file this does not write).
            output: `.safetensors` or `.pt`/`.pth`/`.bin` make one file in that format (`fmt` must agree);
                any other name is a folder holding the task as it came (shards, side files), its model
                file in `fmt` (default: the task's input format).
            force: replace files of the same names as those written.
        Returns:
            ExtractReport (`.output`, `.paths`, `.files`, `.bytes`, `.seconds`, `.as_dict()`).
        Example:
            report = tallzip.open("family.tallz").extract("cars", "cars.safetensors")
        """
        from tallzip.archive import extract as extracting
        if task is None:
            return extracting.extract_all(self, output, fmt=fmt, force=force, device=device, progress=progress)
        return extracting.extract_task(self, task, output, fmt=fmt, force=force, device=device, progress=progress)

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

