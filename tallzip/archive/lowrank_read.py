"""Reading a `lowrank` task (SPEC.md "lowrank"): its two streams, decoded once, and any chunk of its tensors.

The streams of a task are small next to the model (r(m + n) codes per factored matrix, one per weight of a 1-d
tensor), so they are decoded whole on first use and kept while the archive is open; each tensor's part is
range-checked (codes within the grid, scales finite and >= 0, offsets finite) the first time it is read. A chunk
of a tensor is then decoded by ops/lowrank_store.decode_range, the one decode every reader uses.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from tallzip.formats.container.constants import ROLE_LRCODES, ROLE_LRSCALES
from tallzip.formats.container.lowrank_layout import record_grid, stream_spans
from tallzip.formats.errors import CorruptArchiveError
from tallzip.formats.tensors import from_bits
from tallzip.ops.lowrank_store import TensorCode, check_codes, decode_range


class LowRankStreams:
    """One lowrank task of an open archive (Archive.lowrank(task) makes and keeps it)."""

    def __init__(self, archive, task: str):
        self.archive, self.task = archive, task
        params = archive.task_entry(task)["lowrank"]
        self.group = params["group"]
        self.records = {record[0]: record for record in params["tensors"]}
        shapes = {name: archive.tensors[name]["shape"] for name in self.records}
        self.spans = stream_spans(params["tensors"], shapes, self.group)
        self._lock = threading.Lock()
        self._streams = None
        self._checked: set = set()

    def has(self, name: str) -> bool:
        return name in self.records

    def _read(self, role: str) -> torch.Tensor:
        archive = self.archive
        entry = archive.section_entry(role, "", self.task)
        bits = archive.reader.read(entry)
        if role == ROLE_LRCODES:
            return torch.from_numpy(np.ascontiguousarray(bits).view(np.int8).copy())
        return from_bits(bits, entry["dtype"], entry["shape"]).to(torch.float32)

    def code(self, name: str) -> TensorCode:
        """One tensor's code (codes int8, scales float32 (then offsets, asymmetric), rank, bits, grid), checked."""
        if name not in self.records:
            raise CorruptArchiveError(f"{self.archive.path}: damaged archive (no lowrank record of tensor {name!r} "
                                      f"for task {self.task!r})")
        with self._lock:
            if self._streams is None:
                self._streams = (self._read(ROLE_LRCODES), self._read(ROLE_LRSCALES))
        codes, scales = self._streams
        c_start, c_count, s_start, s_count = self.spans[name]
        record = self.records[name]
        own_codes, own_scales = codes[c_start:c_start + c_count], scales[s_start:s_start + s_count]
        code = TensorCode(tuple(self.archive.tensors[name]["shape"]), record[1], record[2], own_codes, own_scales,
                          float(record[3]), record_grid(record))
        if name not in self._checked:
            if not check_codes(own_codes, own_scales, code.bits, code.grid):
                raise CorruptArchiveError(f"{self.archive.path}: damaged archive (codes out of range, or a negative or "
                                          f"non-finite scale or offset, in task {self.task!r} tensor {name!r})")
            self._checked.add(name)
        return code

    def value(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the tensor's decoded task vector, float32, flat."""
        code = self.code(name)
        return decode_range(code.codes, code.scales, code.shape, code.rank, self.group, start, count, code.grid)

    def rel_error(self, name: str) -> float:
        """The relative error ||tau - value|| / ||tau|| the encoder recorded (rounded up)."""
        return float(self.records[name][3])


__all__ = ["LowRankStreams"]
