"""A family of checkpoints opened together: the base and its tasks, checked against each other.

This is the lazy loader the pack, merge and verify passes stream over, one tensor at a time.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tallzip.errors import TallzipError, TaskMismatchError
from tallzip.formats.checkpoints.checkpoint import Checkpoint, open_checkpoint
from tallzip.formats.checkpoints.folders import discover_tasks
from tallzip.formats.container.constants import FLOAT_DTYPES
from tallzip.formats.tensors import torch_dtype



class Family:
    def __init__(self, base: Checkpoint, tasks: dict[str, Checkpoint]):
        if len(tasks) < 2:
            raise TallzipError(f"need at least 2 task checkpoints, found {len(tasks)}")
        self.base = base
        self.tasks = tasks
        self.names = list(tasks)
        for task, ckpt in tasks.items():
            for name in base.names:
                if name not in ckpt:
                    raise TaskMismatchError(f"task {task!r} has no tensor {name!r}, which the base has")
                if ckpt.shapes[name] != base.shapes[name]:
                    raise TaskMismatchError(
                        f"task {task!r}: tensor {name!r} has shape {list(ckpt.shapes[name])}, "
                        f"the base has {list(base.shapes[name])}")

    @classmethod
    def open(cls, tasks, base) -> "Family":
        """`tasks`: a folder of checkpoints or a {name: path} mapping; `base`: the pretrained checkpoint."""
        if base is None:
            raise TallzipError("missing base: give the pretrained checkpoint (--base PATH)")
        base_ckpt = open_checkpoint(base)
        if isinstance(tasks, (str, Path)):
            tasks = discover_tasks(tasks, exclude=[base])
        return cls(base_ckpt, {name: open_checkpoint(path, exclude=[base]) for name, path in tasks.items()})

    def is_mergeable(self, name: str) -> bool:
        """Float in the base and in every task: the tensors that task vectors, masks and merges cover."""
        return (self.base.dtypes[name] in FLOAT_DTYPES
                and all(ckpt.dtypes[name] in FLOAT_DTYPES for ckpt in self.tasks.values()))

    def own_names(self, task: str) -> list[str]:
        """Tensors of a task that the base does not have (its classification head, say)."""
        return [n for n in self.tasks[task].names if n not in self.base]

    def tensors(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.base.get(name), [ckpt.get(name) for ckpt in self.tasks.values()]

    def local_files(self) -> list:
        """Every local file the family is read from (base and tasks, model files and side files)."""
        return [p for ckpt in (self.base, *self.tasks.values()) for p in ckpt.local_files()]

    @property
    def input_bytes(self) -> int:
        return sum(ckpt.nbytes for ckpt in self.tasks.values())


def base_digest(ckpt, chunk_elements: int = 1 << 22) -> str:
    """tensors_digest of a checkpoint, read chunk by chunk (the same bytes, bounded memory)."""
    from tallzip.formats.container.chunking import chunk_plan
    digest = hashlib.sha256()
    for name in sorted(ckpt.names):
        dtype = torch_dtype(ckpt.dtypes[name])
        digest.update(f"{name}\0{dtype}\0{list(ckpt.shapes[name])}\0".encode())
        for start, count in chunk_plan(ckpt.shapes[name], chunk_elements):
            if count:
                digest.update(ckpt.read_range(name, start, count).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def tensors_digest(names, get) -> str:
    """sha256 over the names, dtypes, shapes and bits of tensors: a format-independent checkpoint identity."""
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = get(name).contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
