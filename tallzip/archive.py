"""Reading an archive back: `tallzip.open(path)` lists tasks and rebuilds any one of them.

Rebuilding a task reads the base, the mtv, that task's masks and its own tensors, nothing else.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import taskvec
from .errors import TallzipError, UnknownTaskError
from .family import tensors_digest
from .bits import unpack_bits
from .formats.checkpoints import SafetensorsStream, open_checkpoint
from .formats.constants import KIND_MASKED, KIND_SHARED, ROLE_BASE, ROLE_MASK, ROLE_MTV, ROLE_OWN
from .formats.errors import CorruptArchiveError
from .formats.reader import ArchiveReader
from .formats.tensors import from_bits, torch_bits_dtype, torch_dtype
from .formats.writer import available_cpus
from .packing import KIND_PER_TASK, resolve_device


def open(path, *, base=None) -> "Archive":  # noqa: A001 - mirrors the builtin on purpose
    return Archive(path, base=base)


def rebuild_from_bits(base: torch.Tensor, bits: np.ndarray, mtv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """taskvec.rebuild(base, mask, mtv) with the mask given bit-packed; computed on `device`, where
    the packed mask is unpacked (an eighth of the bytes of a bool mask cross to a GPU)."""
    count = base.numel()
    if device.type == "cpu":
        mask = torch.from_numpy(np.unpackbits(bits, count=count, bitorder="little").view(bool)).view(base.shape)
        base_c = taskvec.as_compute(base)
        out = torch.add(base_c, mtv)  # base + mtv; the unmasked entries then take the base's bits back:
        # where(mask, out, base) done on the bits, base ^ (mask * (out ^ base)), which vectorizes on
        # a CPU (torch.where branches per element there and runs several times slower).
        view = torch_bits_dtype(out.element_size())
        out_bits, base_bits = out.view(view), base_c.view(view)
        out_bits.bitwise_xor_(base_bits).mul_(mask).bitwise_xor_(base_bits)
        return out.to(base.dtype)
    packed = torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True)
    packed.numpy()[:] = bits
    mask = unpack_bits(packed.to(device, non_blocking=True), count).view(base.shape)
    return taskvec.rebuild(base.to(device, non_blocking=True), mask, mtv.to(device, non_blocking=True))


class Archive:
    def __init__(self, path, *, base=None):
        self.path = Path(path)
        if not self.path.is_file():  # say which path and what was expected, not the OS's bare "Is a directory"
            what = "is a folder" if self.path.is_dir() else "not a regular file" if self.path.exists() else "no such file"
            raise TallzipError(f"{self.path}: {what}, expected a .tallz archive file")
        self.reader = ArchiveReader(self.path)
        m = self.reader.manifest
        try:
            self.tensors: dict = m["tensors"]
            self.base_info: dict = m["base"]
            self._tasks = {t["name"]: t for t in m["tasks"]}
            self.merge_info: dict = m["merge"]
        except (KeyError, TypeError):
            raise CorruptArchiveError(f"{self.path}: damaged archive (manifest lacks tasks, tensors or base)") from None
        self._base_ckpt = None
        self._dtypes: dict = {}
        self._context_cache = None
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

    # --- the base ---------------------------------------------------------------------------
    def attach_base(self, base):
        """For an archive packed with base_ref: use this checkpoint as the base, if its hash matches."""
        ckpt = open_checkpoint(base)
        digest = tensors_digest(ckpt.names, ckpt.get)
        if digest != self.base_info.get("sha256"):
            raise TallzipError(f"{base}: is not the base this archive was packed with (sha256 differs)")
        self._base_ckpt = ckpt

    def _section(self, role, name, task=None) -> dict:
        entry = self.reader.section(role, name, task)
        if entry is None:
            what = f"{role} of tensor {name!r}" + (f" for task {task!r}" if task else "")
            raise CorruptArchiveError(f"{self.path}: damaged archive (no section for the {what})")
        return entry

    def _read_tensor(self, entry, context=None) -> torch.Tensor:
        if entry["role"] == ROLE_MASK:
            return torch.from_numpy(self.reader.read(entry, context)).reshape(entry["shape"])
        return from_bits(self.reader.read(entry, context), entry["dtype"], entry["shape"])

    def base_tensor(self, name: str) -> torch.Tensor:
        if self.base_info.get("by_reference"):
            if self._base_ckpt is None:
                raise TallzipError(f"{self.path}: was packed with --base-ref; give the base checkpoint (--base PATH)")
            return self._base_ckpt.get(name)
        return self._read_tensor(self._section(ROLE_BASE, name))

    def mtv(self, name: str) -> torch.Tensor:
        """The stored multi-task vector of a masked tensor, in the compute dtype."""
        return taskvec.as_compute(self._read_tensor(self._section(ROLE_MTV, name)))

    def mask(self, task: str, name: str, mtv: torch.Tensor | None = None) -> torch.Tensor:
        if mtv is None:
            mtv = self.mtv(name)
        return self._read_tensor(self._section(ROLE_MASK, name, task), self._mask_context(name, mtv))

    def _mask_context(self, name: str, mtv: torch.Tensor) -> dict:
        """The decoded mtv as the mask codecs' side information; kept while the same mtv is asked about,
        so decoding all tasks' masks of one tensor derives the context once."""
        cached = self._context_cache
        if cached is None or cached[0] != name or cached[1] is not mtv:
            context = {"mtv": mtv.to(torch.float32).reshape(-1).cpu().numpy(), "shape": tuple(mtv.shape)}
            self._context_cache = cached = (name, mtv, context)
        return cached[2]

    def mask_bits(self, task: str, name: str, mtv: torch.Tensor | None = None) -> np.ndarray:
        """The task's mask of `name` bit-packed (uint8, little bit order): what a GPU unpacks."""
        if mtv is None:
            mtv = self.mtv(name)
        return self.reader.read_mask_bits(self._section(ROLE_MASK, name, task), self._mask_context(name, mtv))

    # --- rebuilding tasks -------------------------------------------------------------------
    def task_tensor(self, task: str, name: str, device="cpu") -> torch.Tensor:
        """One tensor of a rebuilt task, in the task's dtype."""
        return self._assemble(self._task_parts(task, name), resolve_device(device))

    def _task_parts(self, task: str, name: str):
        """What one tensor of a task is made of, read and decoded on the CPU (thread-safe: the
        reader uses pread, and decoding releases the GIL)."""
        entry = self.task_entry(task)
        dtype = self._task_dtypes(task).get(name)
        if dtype is None:
            raise UnknownTaskError(f"task {task!r} has no tensor {name!r}")
        info = self.tensors.get(name)
        if info is None or info["kind"] == KIND_PER_TASK:
            return dtype, self._read_tensor(self._section(ROLE_OWN, name, entry["name"])), None
        if info["kind"] == KIND_SHARED:
            return dtype, self.base_tensor(name), None
        if info["kind"] == KIND_MASKED:
            mtv = self.mtv(name)
            return dtype, self.base_tensor(name), (mtv, self.mask_bits(task, name, mtv))
        raise CorruptArchiveError(f"{self.path}: damaged archive (tensor {name!r} of unknown kind)")

    @staticmethod
    def _assemble(parts, device: torch.device) -> torch.Tensor:
        dtype, tensor, masked = parts
        if masked is not None:
            mtv, bits = masked
            tensor = rebuild_from_bits(tensor, bits, mtv, device)
        return tensor.to(device=device, dtype=torch_dtype(dtype))

    def _task_dtypes(self, task: str) -> dict:
        if task not in self._dtypes:
            self._dtypes[task] = dict(self.task_entry(task)["tensors"])
        return self._dtypes[task]

    def _task_shape(self, task: str, name: str) -> list:
        info = self.tensors.get(name)
        if info is not None and info["kind"] != KIND_PER_TASK:
            return info["shape"]
        return self._section(ROLE_OWN, name, task)["shape"]

    def iter_task(self, task: str, device="cpu"):
        """Yield (name, tensor) of one rebuilt task, in its original order.

        Worker threads read and decode the next few tensors while the caller uses this one."""
        device = resolve_device(device)
        names = [name for name, _ in self.task_entry(task)["tensors"]]
        workers = available_cpus()
        ahead = workers + 1  # tensors being decoded at once: bounds memory, keeps every worker busy
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tallzip-decode") as pool:
            pending = deque(pool.submit(self._task_parts, task, name) for name in names[:ahead])
            for i, name in enumerate(names):
                parts = pending.popleft().result()
                if i + ahead < len(names):
                    pending.append(pool.submit(self._task_parts, task, names[i + ahead]))
                yield name, self._assemble(parts, device)

    def load(self, task: str, device="cpu") -> "OrderedDict[str, torch.Tensor]":
        """The task's rebuilt state dict: base + mask * mtv, its own tensors as they were."""
        return OrderedDict(self.iter_task(task, device))

    def resident(self, device="auto", tasks=None):
        """Keep the base, the mtv and every task's bit-packed mask on `device`, for serving many
        tasks from one process: `switch(task)` then rewrites the weights in place (see Resident)."""
        from .resident import Resident
        return Resident(self, device, tasks)

    def extract(self, task: str, output, *, fmt: str | None = None, force: bool = False, device="cpu",
                progress=None) -> Path:
        """Write one task at `output`: `.safetensors` or `.pt`/`.pth`/`.bin` make one file in that
        format (`fmt` must agree); any other name is a folder holding the task as it came (shards,
        side files), its model file in `fmt` (default: the task's input format). See extracting.py."""
        return self.extract_with_report(task, output, fmt=fmt, force=force, device=device, progress=progress).output

    def extract_with_report(self, task: str, output, *, fmt=None, force=False, device="cpu", progress=None):
        """`extract`, returning the ExtractReport: every file written, bytes, seconds."""
        from . import extracting
        return extracting.extract_task(self, task, output, fmt=fmt, force=force, device=device, progress=progress)

    def extract_all(self, folder, *, fmt: str | None = None, force: bool = False, device="cpu",
                    progress=None) -> list[Path]:
        """Every task into `folder`, each named as its input was; returns each task's path. An
        existing folder keeps every file this does not write; `force` replaces same-named ones."""
        return self.extract_all_with_report(folder, fmt=fmt, force=force, device=device, progress=progress).paths

    def extract_all_with_report(self, folder, *, fmt=None, force=False, device="cpu", progress=None):
        """`extract_all`, returning the ExtractReport."""
        from . import extracting
        return extracting.extract_all(self, folder, fmt=fmt, force=force, device=device, progress=progress)

    def _extract_together(self, files: dict, device: torch.device, tick=None):
        """Write several tasks as safetensors files at once, tensor by tensor, so that each base
        and mtv section is read and decoded once for all of them rather than once per task."""
        tasks = list(files)
        specs = {t: [(n, d, self._task_shape(t, n)) for n, d in self.task_entry(t)["tensors"]] for t in tasks}
        streams = {}
        try:
            for t in tasks:
                streams[t] = SafetensorsStream(files[t], specs[t], self.task_entry(t).get("metadata"))
            names = list(dict.fromkeys(spec[0] for t in tasks for spec in specs[t]))
            ahead = available_cpus() + 1
            with ThreadPoolExecutor(max_workers=available_cpus(), thread_name_prefix="tallzip-decode") as pool:
                pending = deque(pool.submit(self._parts_for_tasks, tasks, n) for n in names[:ahead])
                for i, name in enumerate(names):
                    parts = pending.popleft().result()
                    if i + ahead < len(names):
                        pending.append(pool.submit(self._parts_for_tasks, tasks, names[i + ahead]))
                    for task, part in parts.items():
                        streams[task].write(name, self._assemble(part, device))
                    if tick:
                        tick(len(parts))
            for stream in streams.values():
                stream.close()
        except BaseException:
            for stream in streams.values():
                stream.abort()
            raise

    def _parts_for_tasks(self, tasks: list, name: str) -> dict:
        """_task_parts of one tensor for every task that has it, with its base and mtv decoded once."""
        info = self.tensors.get(name)
        having = [t for t in tasks if name in self._task_dtypes(t)]
        if info is None or info["kind"] == KIND_PER_TASK:
            return {t: self._task_parts(t, name) for t in having}
        base = self.base_tensor(name)
        if info["kind"] == KIND_SHARED:
            return {t: (self._task_dtypes(t)[name], base, None) for t in having}
        mtv = self.mtv(name)
        context = self._mask_context(name, mtv)  # one context for all tasks: the codec reuses what it derives
        return {t: (self._task_dtypes(t)[name], base,
                    (mtv, self.reader.read_mask_bits(self._section(ROLE_MASK, name, t), context))) for t in having}

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

