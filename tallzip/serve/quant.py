"""Resident q* tasks: each task's codes stay packed on the device, with its scales; a switch
dequantizes them into the live weights, base + f32(code) * f32(scale) [+ f32(offset)], slice by slice.

Codes are held at 8 bits for q8, 4 for q4 and q3, 2 for q2 (as u = code + Q on a symmetric grid,
so every held value is unsigned): a q4 task costs half a byte per weight plus a float32 scale
(and offset) per group of 128, not a float copy of the model.

The groups of SPEC.md never cross a chunk's rows, and chunks cut tensors at rows or at C
elements, so which scale an element takes depends on the chunk plan. A GroupLayout lists the
length of every quantization group along a dtype group's flat layout (alignment padding between
tensors is a group of its own, with scale 0), once per `group` setting; a slice of the layout then
takes its elements' scales by broadcasting over rows of groups where the groups there are all of
one length (the common case), with one repeat_interleave where they are not. A lookup table turns
the held bytes into f32(code) in one gather. The arithmetic is the SPEC's, one float32
operation at a time, so the live weights are bit for bit what Archive.load gives.
"""
from __future__ import annotations

import numpy as np
import torch

from tallzip.formats.container.chunking import chunk_shape
from tallzip.formats.container.constants import ROLE_QCODES
from tallzip.formats.container.quant_layout import group_lengths
from tallzip.ops.taskvec import as_compute

SLICE_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 24}  # a multiple of 8; small on a CPU to stay in cache


def held_bits(bits: int) -> int:
    """Bits per code on the device: a power of two at least `bits` (q3 codes take 4)."""
    return 8 if bits > 4 else 4 if bits > 2 else 2


MIN_UNIFORM = 16  # groups: a shorter run of equal lengths joins its neighbours' repeat_interleave


def _segments(lengths: np.ndarray, step: int) -> list:
    """The layout cut at group boundaries into segments of at most ~`step` elements: (a, b, g0, g1,
    size), elements [a, b) = groups [g0, g1), size > 0 when every group there has that length (the
    scales then broadcast over rows of `size`), 0 when they differ (repeat_interleave)."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    n = lengths.size
    edges = np.flatnonzero(np.diff(lengths)) + 1  # where a run of equal lengths ends
    runs = zip(np.concatenate([[0], edges]).tolist(), np.concatenate([edges, [n]]).tolist()) if n else []
    out, pending = [], None  # pending: groups [g0, g1) of short runs, not yet emitted

    def emit(g0, g1, size):
        per = max(1, step // max(size, 1)) if size else None
        g = g0
        while g < g1:
            if size:
                h = min(g1, g + per)
            else:  # whole groups up to ~step elements
                h = int(np.searchsorted(starts, starts[g] + step, side="right")) - 1
                h = min(g1, max(h, g + 1))
            out.append((int(starts[g]), int(starts[h]), g, h, size))
            g = h

    for g0, g1 in runs:
        if g1 - g0 >= MIN_UNIFORM:
            if pending:
                emit(*pending, 0)
                pending = None
            emit(g0, g1, int(lengths[g0]))
        else:
            pending = (pending[0], g1) if pending else (g0, g1)
    if pending:
        emit(*pending, 0)
    return out


class GroupLayout:
    """The quantization groups of one dtype group's flat layout (resident.Group), for one `group`."""

    def __init__(self, spans: dict, plans: dict, size: int, group: int | None, device: torch.device):
        self.first: dict[str, tuple[int, int]] = {}  # name -> (its first group, its group count)
        lengths, position, groups = [], 0, 0
        for name, (offset, count, shape) in sorted(spans.items(), key=lambda item: item[1][0]):
            if offset > position:  # padding before this tensor
                lengths.append(np.array([offset - position], dtype=np.int64))
                groups += 1
            mine = 0
            for start, c in plans[name]:
                if c == 0:
                    continue
                chunk_groups = group_lengths(chunk_shape(shape, start, c), group)
                lengths.append(chunk_groups)
                mine += len(chunk_groups)
            self.first[name] = (groups, mine)
            groups += mine
            position = offset + count
        if size > position:
            lengths.append(np.array([size - position], dtype=np.int64))
            groups += 1
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        self.groups = groups
        self.lengths = torch.from_numpy(lengths).to(device)
        self.segments = _segments(lengths, SLICE_ELEMENTS["cpu" if device.type == "cpu" else "other"])

    @property
    def nbytes(self) -> int:
        return self.lengths.numel() * self.lengths.element_size()


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Codes u (uint8, each < 2**bits) `8 // bits` to a byte, element 0 in the lowest bits."""
    per = 8 // bits
    if per == 1:
        return u
    u = np.concatenate([u, np.zeros(-u.size % per, dtype=np.uint8)]).reshape(-1, per)
    out = np.zeros(u.shape[0], dtype=np.uint8)
    for k in range(per):
        out |= u[:, k] << np.uint8(k * bits)
    return out


def _table(bits: int, shift: int, device) -> torch.Tensor:
    """(256, 8 // bits) float32: the codes a held byte holds, as f32(code) (u - shift, exact)."""
    per = 8 // bits
    byte = np.arange(256, dtype=np.int64)[:, None]
    u = (byte >> (np.arange(per) * bits)) & ((1 << bits) - 1)
    return torch.from_numpy((u - shift).astype(np.float32)).to(device)


class QuantTask:
    """One q* task's codes, scales and offsets for one dtype group, on the device."""

    def __init__(self, archive, task: str, group, layout: GroupLayout, covered: list, device: torch.device):
        quant = archive.task_entry(task)["quant"]
        self.symmetric = quant["grid"] != "asymmetric"  # q1's sign grid too: codes -1/+1
        self.shift = max(1, 2 ** (quant["bits"] - 1) - 1) if self.symmetric else 0  # u = code + shift
        self.bits = held_bits(quant["bits"])
        self.layout = layout
        codes = torch.zeros(group.size * self.bits // 8, dtype=torch.uint8)
        scales = torch.zeros(layout.groups, dtype=torch.float32)
        offsets = None if self.symmetric else torch.zeros(layout.groups, dtype=torch.float32)
        for name in covered:
            offset, count, _ = group.spans[name]
            parts = [archive.quant_chunk(task, name, i) for i in range(len(archive.plan(task, name)))]
            u = torch.cat([c.reshape(-1) for c, _, _, _ in parts]) + self.shift
            packed = _pack(u.to(torch.uint8).numpy(), self.bits)
            at = offset * self.bits // 8  # offsets are multiples of 64: whole bytes
            codes[at:at + packed.size] = torch.from_numpy(packed)
            first, n = layout.first[name]
            mine = torch.cat([s for _, s, _, _ in parts])
            if mine.numel() != n:
                raise ValueError(f"tensor {name!r} of task {task!r}: {mine.numel()} scales, the layout {n}")
            scales[first:first + n] = mine
            if offsets is not None:
                offsets[first:first + n] = torch.cat([o for _, _, o, _ in parts])
        self.codes, self.scales = codes.to(device), scales.to(device)
        self.table = _table(self.bits, self.shift, device)
        self.offsets = None if offsets is None else offsets.to(device)

    @property
    def nbytes(self) -> int:
        held = [self.codes, self.scales] + ([] if self.offsets is None else [self.offsets])
        return sum(t.numel() * t.element_size() for t in held)

    def rebuild_into(self, live: torch.Tensor, base: torch.Tensor):
        """live = cast(as_compute(base) + value) over the whole layout, one segment at a time."""
        per = 8 // self.bits
        for a, b, g0, g1, size in self.layout.segments:
            first = a // per
            if per == 1:  # a byte a code: a conversion is cheaper than the table
                value = self.codes[a:b].to(torch.float32).sub_(self.shift)  # exact: small integers
            else:
                value = self.table.index_select(0, self.codes[first:-(-b // per)].long()).reshape(-1)
                value = value[a - first * per:b - first * per]
            if size:  # every group of the segment has `size` elements: scales broadcast over rows
                rows = value.view(g1 - g0, size)
                rows.mul_(self.scales[g0:g1, None])
                if self.offsets is not None:
                    rows.add_(self.offsets[g0:g1, None])
            else:
                reps = self.layout.lengths[g0:g1]
                value.mul_(torch.repeat_interleave(self.scales[g0:g1], reps, output_size=b - a))
                if self.offsets is not None:
                    value.add_(torch.repeat_interleave(self.offsets[g0:g1], reps, output_size=b - a))
            base_c = as_compute(base[a:b])
            if base_c.dtype == live.dtype:
                torch.add(base_c, value.to(base_c.dtype), out=live[a:b])
            else:
                live[a:b].copy_(base_c + value.to(base_c.dtype))  # one rounding to the weights' dtype


def quant_covered(archive, task: str, names) -> list:
    """The tensors of `names` for which the task stores codes (the rest it takes from the base)."""
    return [n for n in names if archive.reader.section(ROLE_QCODES, n, task) is not None]


def runs(spans: dict, names) -> list[tuple[int, int]]:
    """[(offset, count)] of the named tensors in the layout, adjacent ones merged."""
    out = []
    for offset, count, _ in sorted(spans[n] for n in names):
        end = offset + -(-count // 64) * 64
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((offset, end - offset))
    return out


__all__ = ["GroupLayout", "QuantTask", "held_bits", "quant_covered", "runs"]
