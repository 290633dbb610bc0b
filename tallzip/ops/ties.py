"""The mtv of a family: the sum of its task vectors, or TIES-merging's, whose trim thresholds and elected-sign
tie-breaker are statistics of WHOLE task vectors, gathered first (chunk by chunk, memory a chunk) and then
applied tensor by tensor. `MtvMerger` is what pack, merge and verify use.

A family here is anything with .base and .tasks checkpoints (tallzip.family.Family): read by range.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from tallzip.errors import TallzipError
from tallzip.formats.container.chunking import chunk_plan
from tallzip.formats.container.constants import DEFAULT_CHUNK_ELEMENTS
from tallzip.ops import taskvec

if TYPE_CHECKING:
    from tallzip.family import Family

MERGE_METHODS = ("sum", "ties")


class MtvMerger:
    """Computes the mtv of one tensor; TIES needs whole-vector statistics gathered first."""

    def __init__(self, family: Family, method: str, density: float, device, progress):
        if method not in MERGE_METHODS:
            raise TallzipError(f"unknown merge {method!r} (expected one of {', '.join(MERGE_METHODS)})")
        self.family, self.method, self.density, self.device = family, method, density, device
        if method == "ties":
            self.thresholds = ties_thresholds(family, density, device, progress)
            self.majority = ties_majority(family, self.thresholds, device)

    def mtv(self, base, tasks):
        if self.method == "sum":
            return taskvec.sum_task_vectors(base, tasks)
        taus = [taskvec.task_vector(base, t) for t in tasks]
        return taskvec.ties_merge(taus, self.thresholds, self.majority, reduce="sum")


def read_range(ckpt, name, start, count):
    """Elements start .. start+count of a tensor, flat: by range where the checkpoint reads by range."""
    reader = getattr(ckpt, "read_range", None)
    return reader(name, start, count) if reader else ckpt.get(name).reshape(-1)[start:start + count]


def chunks_of(family: Family, names, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """(name, start, count) of every chunk of the named tensors, in order."""
    for name in names:
        for start, count in chunk_plan(family.base.shapes[name], chunk_elements):
            yield name, start, count


def ties_thresholds(family: Family, density: float, device, progress=None) -> list[float]:
    """Each task's TIES trim threshold, ranked over its whole task vector, exactly, reading it chunk
    by chunk twice (taskvec.magnitude_histogram): memory is a chunk, not the model."""
    names = [n for n in family.base.names if family.is_mergeable(n)]
    if any(family.base.dtypes[n] == "F64" or any(c.dtypes[n] == "F64" for c in family.tasks.values()) for n in names):
        return _ties_thresholds_whole(family, names, density, device, progress)
    count = sum(math.prod(family.base.shapes[n]) for n in names)
    kth = taskvec.ties_kth(count, density)
    thresholds = []
    for i, ckpt in enumerate(family.tasks.values()):
        if kth <= 0:
            thresholds.append(0.0)
            continue

        def magnitudes():
            for name, start, n in chunks_of(family, names):
                base = read_range(family.base, name, start, n).to(device)
                yield taskvec.task_vector(base, read_range(ckpt, name, start, n).to(device)).abs()

        coarse = sum(taskvec.magnitude_histogram(m).cpu() for m in magnitudes())
        top, rank = taskvec.kth_bin(coarse, kth)
        fine = sum(taskvec.magnitude_histogram(m, top).cpu() for m in magnitudes())
        low, _ = taskvec.kth_bin(fine, rank)
        thresholds.append(taskvec.magnitude_from_bins(top, low))
        if progress:
            progress("ties thresholds", i + 1, len(family.tasks))
    return thresholds


def _ties_thresholds_whole(family, names, density, device, progress):
    """float64 task vectors: ranked whole, one task in memory at a time."""
    thresholds = []
    for i, ckpt in enumerate(family.tasks.values()):
        magnitudes = torch.cat([
            taskvec.task_vector(family.base.get(n).to(device), ckpt.get(n).to(device)).abs().reshape(-1)
            for n in names])
        thresholds.append(taskvec.ties_threshold(magnitudes, density))
        del magnitudes
        if progress:
            progress("ties thresholds", i + 1, len(family.tasks))
    return thresholds


def ties_majority(family: Family, thresholds, device) -> float:
    """The sign that wins over the whole vector, which entries with no elected sign take (chunk by chunk)."""
    total = 0
    names = [n for n in family.base.names if family.is_mergeable(n)]
    for name, start, n in chunks_of(family, names):
        base = read_range(family.base, name, start, n).to(device)
        trimmed = [taskvec.ties_trim(taskvec.task_vector(base, read_range(c, name, start, n).to(device)), thr)
                   for c, thr in zip(family.tasks.values(), thresholds)]
        total += int(torch.sign(taskvec.ties_sign_mass(trimmed)).sum())
    return 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)
