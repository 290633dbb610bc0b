"""The math of `verify --against`: the TALL rule's rounding margin, bit comparisons and the rebuild
error, as plain functions over (chunks of) tensors; verification.py walks the archive with them.

The rule used the full-precision mtv at pack time and the archive keeps it rounded (bfloat16 by
default), so the mask recomputed with the stored mtv may disagree with the stored one only where the
decision lies within that rounding (`mask_check`); a float32 mtv leaves no margin at all.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tallzip.ops import taskvec
from tallzip.errors import TallzipError
from tallzip.formats.tensors import torch_bits_dtype, torch_dtype
from tallzip.ops.bits import bit_select

# Unit roundoff of the dtype the mtv is stored at (round to nearest): |mtv - stored| <= u * |mtv|.
MTV_ROUNDING = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": 0.0, "F64": 0.0}
# Below the smallest normal number the rounding error is absolute: half the spacing of subnormals.
_SUBNORMAL_HALF_SPACING = {"BF16": 2.0 ** -134, "F16": 2.0 ** -25}
# The mask rule rounds three times in float32 (base + mtv, minus the task, times lambda): a change of
# the mtv by d moves the right-hand side by lambda * d plus at most a few float32 ulps of the operands.
_FLOAT32_SLACK = 2.0 ** -21
# Elements per slice when comparing a masked chunk: every operand of all tasks stays in the caches.
SLICE = 1 << 18


def mtv_rounding_bound(stored_mtv: torch.Tensor, stored_dtype: str) -> torch.Tensor | None:
    """Per weight, the most the full-precision mtv can differ from the stored one; None where the
    stored dtype is the full precision (float32, float64): no difference at all."""
    u = MTV_ROUNDING.get(stored_dtype)
    if u is None:
        raise TallzipError(f"mtv stored as {stored_dtype}: no rounding bound known for it")
    if u == 0.0:
        return None
    # u * |exact| <= u / (1 - u) * |stored|: the bound in terms of what the archive holds
    return torch.clamp(stored_mtv.abs() * (u / (1.0 - u)), min=_SUBNORMAL_HALF_SPACING[stored_dtype])


def within_rounding(own, rhs, base_c, task_c, stored_mtv, lam: float, stored_dtype: str) -> torch.Tensor:
    """Per weight: whether the TALL decision `own > rhs`, computed with the stored mtv, lies so close to
    its edge that the stored mtv's rounding could have moved it (all False for a float32 mtv)."""
    bound = mtv_rounding_bound(stored_mtv, stored_dtype)
    if bound is None:
        return torch.zeros(own.shape, dtype=torch.bool)
    slack = _FLOAT32_SLACK * lam * (base_c.abs() + stored_mtv.abs() + task_c.abs() + bound)
    return (own - rhs).abs() <= bound * lam + slack


def split_disagreement(disagree, own, rhs, base_c, task_c, stored_mtv, lam: float, stored_dtype: str):
    """(outside, within): the flat indices where the stored mask disagrees with `own > rhs` (the TALL
    rule computed with the stored mtv), beyond what the stored mtv's rounding can move the decision, or
    within it. Only the disagreeing weights are looked at (a few in a thousand where nothing changed)."""
    # numpy's flatnonzero: several times faster than torch's nonzero on a CPU
    where = torch.from_numpy(np.flatnonzero(disagree.reshape(-1).cpu().numpy()))
    if not where.numel():
        return where, where
    pick = (lambda t: t.reshape(-1)[where])
    near = within_rounding(pick(own), pick(rhs), pick(base_c), pick(task_c), pick(stored_mtv), lam, stored_dtype)
    return where[~near], where[near]


def mask_check(base, task, stored_mask, stored_mtv, lam: float, stored_dtype: str):
    """(outside, within): the weights where the TALL rule with the stored mtv disagrees with the stored
    mask, split by whether the decision lies beyond what the stored mtv's rounding can move (a real
    difference of the task's checkpoint) or within it. Both bool tensors of the tensor's shape.

    The rule is taskvec.tall_mask's: |base - task| > lambda * |(base + mtv) - task|, in float32."""
    base_c, task_c = taskvec.as_compute(base), taskvec.as_compute(task)
    own = (base_c - task_c).abs()
    rhs = ((base_c + stored_mtv) - task_c).abs() * lam
    outside, within = split_disagreement((own > rhs) != stored_mask, own, rhs, base_c, task_c, stored_mtv, lam,
                                         stored_dtype)
    return _flags(outside, own.shape), _flags(within, own.shape)


def _flags(indices: torch.Tensor, shape) -> torch.Tensor:
    flags = torch.zeros(math.prod(shape), dtype=torch.bool)
    flags[indices] = True
    return flags.reshape(shape)


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().reshape(-1)
    return flat if not flat.is_floating_point() else flat.view(torch_bits_dtype(flat.element_size()))


def count_unequal(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (NaN equals the same NaN); tensors of one dtype and shape."""
    return int((as_bits(a) != as_bits(b)).sum())


class ErrorSums:
    """Sums for the relative L2 distance of rebuilt tensors to the originals, added chunk by chunk."""

    def __init__(self):
        self.diff_sq, self.ref_sq, self.max_abs = 0.0, 0.0, 0.0

    def add(self, rebuilt: torch.Tensor, original: torch.Tensor):
        if original.is_floating_point() and original.numel():
            ref = taskvec.as_compute(original).reshape(-1)
            self.add_difference(taskvec.as_compute(rebuilt).reshape(-1) - ref, ref)

    def add_difference(self, diff: torch.Tensor, ref: torch.Tensor):
        """Flat tensors: sums of squares by dot products (each slice's in its dtype, the total in Python's)."""
        if diff.numel():
            self.diff_sq += float(torch.dot(diff, diff))
            self.ref_sq += float(torch.dot(ref, ref))
            low, high = torch.aminmax(diff)
            self.max_abs = max(self.max_abs, -float(low), float(high))

    def merge(self, other: "ErrorSums"):
        self.diff_sq += other.diff_sq
        self.ref_sq += other.ref_sq
        self.max_abs = max(self.max_abs, other.max_abs)

    def result(self) -> dict:
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq else 0.0
        return {"rel_l2": rel, "max_abs": self.max_abs}


def compare_masked_chunk(base, mtv, mtv_dtype: str, masks: dict, originals: dict, lambdas: dict, errors: dict,
                         recompute=None):
    """The mask checks and the rebuild error of one chunk of a masked tensor, for the tasks of `masks`
    (flat bool, as stored) whose `originals` (flat, the folder's) are given; with `recompute` (the
    mtv of every task's original, in the archive's task order: originals must hold them all) also the
    mtv recomputed. Slice by slice, so that every operand stays in the CPU's caches across the tasks.

    Returns ({task: [outside, within, unlike the recomputed mtv]}, stored mtv weights unlike the
    recomputed one); the rebuild errors are added into `errors` ({task: ErrorSums})."""
    tasks = [t for t in masks if t in originals]
    stored_torch = torch_dtype(mtv_dtype)
    # with a float32 mtv the rule with the recomputed mtv, where it equals the stored one, is the rule
    # with the stored mtv: checked already
    rounded = mtv_dtype not in ("F32", "F64")
    same_dtype = {t: base.dtype == taskvec.compute_dtype(base.dtype) == originals[t].dtype for t in tasks}
    counts = {t: [0, 0, 0] for t in tasks}
    mtv_differing = 0
    count = base.numel()
    for start in range(0, count, SLICE):
        stop = min(count, start + SLICE)
        base_c, mtv_c = taskvec.as_compute(base[start:stop]), mtv[start:stop]
        tasks_c = {t: taskvec.as_compute(originals[t][start:stop]) for t in tasks}
        plus = base_c + mtv_c
        plus_exact = agree = None
        if recompute is not None:
            exact = recompute(base_c, [tasks_c[t] if t in tasks_c else taskvec.as_compute(o[start:stop])
                                       for t, o in originals.items()])
            # what pack would have stored: the recomputed mtv cast to the stored dtype (and widened back)
            agree = as_bits(taskvec.as_compute(exact.to(stored_torch))) == as_bits(mtv_c)
            differing_here = int(agree.numel() - torch.count_nonzero(agree))
            all_agree = differing_here == 0
            mtv_differing += differing_here
            plus_exact = base_c + exact if rounded else None
        for t in tasks:
            task_c, stored, lam = tasks_c[t], masks[t][start:stop], lambdas[t]
            d_own, d_plus = base_c - task_c, plus - task_c
            own, rhs = d_own.abs(), d_plus.abs().mul_(lam)
            disagree = (own > rhs) != stored
            outside, within = split_disagreement(disagree, own, rhs, base_c, task_c, mtv_c, lam, mtv_dtype)
            counts[t][0] += outside.numel()
            counts[t][1] += within.numel()
            if agree is not None:
                unlike = (own > (plus_exact - task_c).abs_().mul_(lam)) != stored if rounded else disagree
                counts[t][2] += int(torch.count_nonzero(unlike if all_agree else unlike & agree))
            if same_dtype[t]:  # rebuilt - original: (base + mtv) - task where masked, base - task elsewhere
                errors[t].add_difference(bit_select(stored, d_plus, d_own), task_c)
            else:
                rebuilt = bit_select(stored, plus, base_c).to(base.dtype).to(originals[t].dtype)
                errors[t].add(rebuilt, originals[t][start:stop])
    return counts, mtv_differing
