"""Tensors of a torch zip checkpoint read by offset, whole or by element ranges, never the file whole.

torch.save stores each storage as an uncompressed zip record (`archive/data/KEY`), so a tensor's
bytes lie at a known place in the file: the record's data offset plus the tensor's element offset.
The restricted unpickler (safe_pickle.read_lazy) resolves every name to a TensorSpec without
reading a storage; this reads the bytes with os.pread into fresh tensors. A record's CRC is checked
once, before any of its bytes are handed out: reading a whole record checks it on the way; a
first read of part of a record first streams the record through the CRC (one extra read of it).
"""
from __future__ import annotations

import math
import threading

import torch

from tallzip.formats.checkpoints.safe_pickle import TensorSpec
from tallzip.formats.checkpoints.torch_zip import Member, TorchZip


def is_contiguous(spec: TensorSpec) -> bool:
    expected = 1
    for size, stride in zip(reversed(spec.shape), reversed(spec.stride)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def span_elements(spec: TensorSpec) -> int:
    """Elements from the tensor's first to its last one in its storage (0 for an empty tensor)."""
    if not all(spec.shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(spec.shape, spec.stride))


def aliases(specs: dict[str, TensorSpec]) -> dict[str, str]:
    """name -> the first name that is the very same tensor (one tensor saved under two names)."""
    first, tied = {}, {}
    for name, spec in specs.items():
        if math.prod(spec.shape) == 0:
            continue
        key = (spec.key, spec.offset, tuple(spec.shape), tuple(spec.stride), spec.dtype)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


class LazyTorchFile:
    """get / read_range / will_need over the specs of one zip checkpoint."""

    def __init__(self, container: TorchZip, specs: dict[str, TensorSpec]):
        self.container = container
        self.specs = specs
        self._materialised: tuple[str, torch.Tensor] | None = None  # last non-contiguous tensor read
        self._lock = threading.Lock()

    def _member(self, spec: TensorSpec) -> Member:
        return self.container.members[f"data/{spec.key}"]

    def _read_elements(self, spec: TensorSpec, first: int, out: torch.Tensor):
        """Fill the contiguous `out` with the storage's elements from spec.offset + first on."""
        if not out.numel():
            return
        member, item = self._member(spec), spec.dtype.itemsize
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        start = (spec.offset + first) * item
        if start == 0 and len(buffer) == member.size and not self.container.is_verified(member):
            self.container.read_member_into(member, buffer)  # the whole record: CRC on the way
            return
        self.container.verify(member)
        self.container.pread_into(buffer, member.data_offset + start)

    def get(self, name: str, *, pin_memory: bool = False) -> torch.Tensor:
        spec = self.specs[name]
        if is_contiguous(spec):
            out = torch.empty(tuple(spec.shape), dtype=spec.dtype, pin_memory=pin_memory)
            self._read_elements(spec, 0, out)
            return out
        raw = torch.empty(span_elements(spec), dtype=spec.dtype)
        self._read_elements(spec, 0, raw)
        out = raw.as_strided(tuple(spec.shape), tuple(spec.stride)).clone(memory_format=torch.contiguous_format)
        return out.pin_memory() if pin_memory else out

    def read_range(self, name: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.specs[name]
        if is_contiguous(spec):
            out = torch.empty(count, dtype=spec.dtype) if out is None else out[:count]
            self._read_elements(spec, start, out)
            return out
        with self._lock:  # a view: read it once, whole, and serve its ranges from that copy
            if self._materialised is None or self._materialised[0] != name:
                self._materialised = None  # drop the previous one before reading the next
                self._materialised = (name, self.get(name).reshape(-1))
            flat = self._materialised[1][start:start + count]
        return flat.clone() if out is None else out[:count].copy_(flat)

    def will_need(self, name: str):
        spec = self.specs[name]
        member, item = self._member(spec), spec.dtype.itemsize
        self.container.will_need(member.data_offset + spec.offset * item, span_elements(spec) * item)

    def close(self):
        self.container.close()
