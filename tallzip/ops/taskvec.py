"""The math of TALL masks and model merging: plain functions over tensors, no I/O.

All functions work on one parameter tensor at a time, so a caller can stream a model tensor by
tensor. Arithmetic is done in float32 (float64 stays float64) in the order the TALL-masks authors'
reference code uses, so masks agree with theirs bit for bit.
"""
from __future__ import annotations

import math

import torch

from tallzip.errors import TallzipError

from tallzip.options import DEFAULT_LAMBDA, DEFAULT_TIES_DENSITY, LAMBDA_CANDIDATES  # noqa: F401 - used as taskvec.X



def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_compute(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(compute_dtype(tensor.dtype))


def stored_mtv(mtv: torch.Tensor, mtv_dtype: str) -> torch.Tensor:
    """The mtv as an archive stores it: rounded to `mtv_dtype` ("float32" keeps it, and so does a
    float64 mtv, which is stored as it is)."""
    if mtv_dtype == "float32" or mtv.dtype == torch.float64:
        return mtv
    return mtv.to(getattr(torch, mtv_dtype))


def task_vector(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    return as_compute(finetuned) - as_compute(base)


def sum_task_vectors(base: torch.Tensor, finetuned: list[torch.Tensor]) -> torch.Tensor:
    """mtv = sum_t (theta_t - theta_0), summed in task order."""
    total = task_vector(base, finetuned[0])
    for tensor in finetuned[1:]:
        total = total + task_vector(base, tensor)
    return total


def rebuild(base: torch.Tensor, mask: torch.Tensor, mtv: torch.Tensor) -> torch.Tensor:
    """theta_0 + m_t * mtv, cast back to the base's dtype; unmasked entries are the base's bits exactly."""
    base_c = as_compute(base)
    return torch.where(mask, base_c + mtv, base_c).to(base.dtype)


def apply_vector(base: torch.Tensor, vector: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """theta_0 + alpha * vector, cast back to the base's dtype."""
    return (as_compute(base) + alpha * vector).to(base.dtype)


# --- TIES-merging --------------------------------------------------------------------------------
# The trim threshold and the elected sign's tie-breaker are properties of WHOLE task vectors, so a
# streaming caller first collects them (ties_threshold, majority_sign) and then merges tensor by tensor.

def ties_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """The magnitude at which a task vector keeps its top `density` share of entries.

    `magnitudes` is |tau_t| over the whole task vector (all mergeable tensors, flattened). Entries
    with |tau| >= threshold are kept, as in the TIES authors' code (kthvalue of the bottom share).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    count = magnitudes.numel()
    keep = int(count * density)
    kth = count - keep
    if kth <= 0:
        return 0.0
    return float(magnitudes.reshape(-1).kthvalue(kth).values)


# The threshold of a whole task vector without holding it: |tau| as float32 bits is an integer that
# orders like the value (non-negative floats), so two passes of 2^16-bin histograms -- by the top 16
# bits, then by the low 16 bits inside the bin holding the k-th value -- find it exactly.
MAGNITUDE_BINS = 1 << 16


def magnitude_histogram(magnitudes: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """Counts of float32 magnitudes (>= 0) by their top 16 bits, or (top given) by the low 16 bits of
    those whose top 16 bits are `top`. int64, MAGNITUDE_BINS long."""
    bits = magnitudes.to(torch.float32).contiguous().reshape(-1).view(torch.int32)
    high = bits >> 16
    if top is None:
        return torch.bincount(high, minlength=MAGNITUDE_BINS)
    return torch.bincount(bits[high == top] & 0xFFFF, minlength=MAGNITUDE_BINS)


def kth_bin(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th smallest element, 1-based; k's rank inside that bin)."""
    cumulative = torch.cumsum(histogram, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor(k, dtype=cumulative.dtype)))
    before = int(cumulative[index - 1]) if index else 0
    return index, k - before


def magnitude_from_bins(top: int, low: int) -> float:
    return float(torch.tensor([(top << 16) | low], dtype=torch.int32).view(torch.float32))


def ties_kth(count: int, density: float) -> int:
    """Rank (1-based) of the threshold among a task vector's `count` magnitudes; 0: keep everything."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return count - int(count * density)


def ties_trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties_sign_mass(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry sum of the trimmed task vectors; its sign is the elected sign."""
    total = trimmed[0]
    for tensor in trimmed[1:]:
        total = total + tensor
    return total


def ties_elect_sign(sign_mass: torch.Tensor, majority: float) -> torch.Tensor:
    """Sign of the summed trimmed vectors; entries whose sum is 0 take the majority sign of the whole vector."""
    sign = torch.sign(sign_mass)
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def ties_disjoint(trimmed: list[torch.Tensor], sign: torch.Tensor, reduce: str) -> torch.Tensor:
    """Disjoint merge: sum ('sum') or average ('mean') of the entries that agree with the elected sign."""
    total = torch.zeros_like(trimmed[0])
    agreeing = torch.zeros_like(trimmed[0])
    for tensor in trimmed:
        agree = torch.where(sign > 0, tensor > 0, tensor < 0)
        total = total + torch.where(agree, tensor, torch.zeros_like(tensor))
        agreeing = agreeing + agree.to(tensor.dtype)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / agreeing.clamp(min=1)
    raise ValueError(f"unknown TIES reduction {reduce!r}")


def ties_merge(taus: list[torch.Tensor], thresholds: list[float], majority: float, reduce: str) -> torch.Tensor:
    trimmed = [ties_trim(tau, thr) for tau, thr in zip(taus, thresholds)]
    sign = ties_elect_sign(ties_sign_mass(trimmed), majority)
    return ties_disjoint(trimmed, sign, reduce)


# --- Consensus merging ---------------------------------------------------------------------------

def mask_count(masks: list[torch.Tensor]) -> torch.Tensor:
    """How many tasks use each weight."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for mask in masks:
        count += mask.to(torch.int32)
    return count


def consensus_mask(masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """Keep the weights that at least k tasks use (k=0 keeps all, k > N keeps none)."""
    return mask_count(masks) >= k


# --- the sum merge and every task's TALL mask in one pass (pack's hot loop) ---------------------


# --- finite inputs --------------------------------------------------------------------------------

def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite: a NaN or an infinity anywhere makes the sum NaN or infinite,
    so a finite sum proves it in one cheap reduction (only an overflowing sum needs the full check)."""
    if not tensor.is_floating_point() or math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def refuse_nonfinite(name: str, tensors, labels, verb: str = "pack"):
    """The rule of pack and merge: NaN or Inf in an input is refused, naming where (unless the caller
    allows it and does not call this)."""
    for tensor, label in zip(tensors, labels):
        if not all_finite(tensor):
            raise TallzipError(f"{label}: tensor {name!r} holds NaN or Inf (use --allow-nonfinite to {verb} anyway)")
