"""Reading an archive back: `tallzip.open(path)` lists tasks and rebuilds any one of them.

Rebuilding a task reads the base, the mtv, that task's masks and its own tensors, nothing else.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch

from . import taskvec
from .errors import TallzipError, UnknownTaskError
from .family import tensors_digest
from .formats.checkpoints import atomic_output, open_checkpoint, save_sharded, save_tensors
from .formats.constants import KIND_MASKED, KIND_SHARED, ROLE_BASE, ROLE_MASK, ROLE_MTV, ROLE_OWN
from .formats.errors import CorruptArchiveError
from .formats.reader import ArchiveReader
from .formats.tensors import from_bits, torch_dtype
from .packing import KIND_PER_TASK, ROLE_FILE, resolve_device


def open(path, *, base=None) -> "Archive":  # noqa: A001 - mirrors the builtin on purpose
    return Archive(path, base=base)


class Archive:
    def __init__(self, path, *, base=None):
        self.path = Path(path)
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

    # --- rebuilding tasks -------------------------------------------------------------------
    def task_tensor(self, task: str, name: str, device="cpu") -> torch.Tensor:
        """One tensor of a rebuilt task, in the task's dtype."""
        entry = self.task_entry(task)
        dtype = self._task_dtypes(task).get(name)
        if dtype is None:
            raise UnknownTaskError(f"task {task!r} has no tensor {name!r}")
        info = self.tensors.get(name)
        if info is None or info["kind"] == KIND_PER_TASK:
            tensor = self._read_tensor(self._section(ROLE_OWN, name, entry["name"]))
        elif info["kind"] == KIND_SHARED:
            tensor = self.base_tensor(name)
        elif info["kind"] == KIND_MASKED:
            mtv = self.mtv(name)
            mask = self.mask(task, name, mtv)
            return taskvec.rebuild(self.base_tensor(name).to(device), mask.to(device),
                                   mtv.to(device)).to(torch_dtype(dtype))
        else:
            raise CorruptArchiveError(f"{self.path}: damaged archive (tensor {name!r} of unknown kind)")
        return tensor.to(device=device, dtype=torch_dtype(dtype))

    def _task_dtypes(self, task: str) -> dict:
        if task not in self._dtypes:
            self._dtypes[task] = dict(self.task_entry(task)["tensors"])
        return self._dtypes[task]

    def iter_task(self, task: str, device="cpu"):
        """Yield (name, tensor) of one rebuilt task, in its original order."""
        device = resolve_device(device)
        for name, _ in self.task_entry(task)["tensors"]:
            yield name, self.task_tensor(task, name, device)

    def load(self, task: str, device="cpu") -> "OrderedDict[str, torch.Tensor]":
        """The task's rebuilt state dict: base + mask * mtv, its own tensors as they were."""
        return OrderedDict(self.iter_task(task, device))

    def extract(self, task: str, output, *, fmt: str | None = None, force: bool = False, device="cpu") -> Path:
        """Write one task as a checkpoint at `output`, in its input format unless `fmt` says otherwise.

        A task that came as a folder (sharded, or with config files beside it) is written as a folder.
        """
        entry = self.task_entry(task)
        state = OrderedDict((n, t.cpu()) for n, t in self.iter_task(task, device))
        output = Path(output)
        fmt = fmt or ("pt" if entry["format"] == "pt" else "safetensors")
        if entry["layout"] == "folder":
            with atomic_output(output, force=force, folder=True) as tmp:
                if entry.get("sharding") and fmt == "safetensors":
                    save_sharded(state, tmp, entry["sharding"], entry.get("metadata"))
                else:
                    name = Path(entry.get("file_name") or "model.safetensors")
                    name = name.with_suffix(".safetensors" if fmt == "safetensors" else name.suffix if name.suffix != ".safetensors" else ".pt")
                    save_tensors(state, tmp / name.name, fmt, entry.get("metadata"))
                for fname in entry.get("files", []):
                    data = self._read_tensor(self._section(ROLE_FILE, fname, task))
                    (tmp / fname).write_bytes(data.numpy().tobytes())
        else:
            with atomic_output(output, force=force) as tmp:
                save_tensors(state, tmp, fmt, entry.get("metadata") if fmt == "safetensors" else None)
        return output

    def extract_all(self, folder, *, fmt: str | None = None, force: bool = False, device="cpu") -> list[Path]:
        """Every task into `folder` (created atomically), each named as its input was."""
        paths = []
        with atomic_output(folder, force=force, folder=True) as tmp:
            for task in self.tasks:
                entry = self.task_entry(task)
                name = task if entry["layout"] == "folder" else task + (".pt" if (fmt or entry["format"]) == "pt" else ".safetensors")
                self.extract(task, tmp / name, fmt=fmt, device=device)
                paths.append(Path(folder) / name)
        return paths

    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

