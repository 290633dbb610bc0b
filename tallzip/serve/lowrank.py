"""A `lowrank` task held by a Resident family (resident.py): its tensors' codes and scales on the device (a few
bits per singular vector entry), decoded into the live weights at each switch, chunk by chunk in the archive's
plan with the archive's own decode (ops/lowrank_store.decode_range): on a CPU bit for bit what load(task) gives;
on a GPU the factors' product may round differently from the CPU's (a float32 matrix product's summation order)."""
from __future__ import annotations

import torch

from tallzip.ops.lowrank_store import decode_range
from tallzip.ops.representations import rebuild_quantized


class LowRankTask:
    """One lowrank task's tensors of one dtype group (resident._Group): names it rebuilds, the rest is the base."""

    def __init__(self, archive, task: str, group, names, device: torch.device):
        streams = archive.lowrank(task)
        self.group_size = streams.group
        self.parts = []  # (offset, shape, chunk plan, codes, scales (then offsets: asymmetric), rank, grid)
        for name in names:
            code = streams.code(name)
            offset, _, shape = group.spans[name]
            self.parts.append((offset, shape, archive.plan(None, name), code.codes.to(device), code.scales.to(device),
                               code.rank, code.grid))

    def rebuild_into(self, live: torch.Tensor, base: torch.Tensor):
        """live = base, then base + the decoded task vector over every tensor this task rebuilds."""
        live.copy_(base)
        for offset, shape, plan, codes, scales, rank, grid in self.parts:
            for start, count in plan:
                piece = slice(offset + start, offset + start + count)
                value = decode_range(codes, scales, shape, rank, self.group_size, start, count, grid)
                live[piece] = rebuild_quantized(base[piece], value).to(live.dtype)

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() + s.numel() * s.element_size() for _, _, _, c, s, _, _ in self.parts)


__all__ = ["LowRankTask"]
