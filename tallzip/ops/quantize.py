"""Quantized task vectors: tau = theta_t - theta_0 as small integer codes times a scale. Math only, no I/O.

Layout. A tensor is seen as rows: its last dimension is a row (a 1-d tensor is one row, a 0-d tensor
one row of one element), so shape (d0, ..., dk) gives rows = d0*...*d(k-1) and cols = dk. Each row
is cut into groups of `group` consecutive elements (the last group of a row is shorter when cols is
not a multiple of `group`; group=None: the whole row is one group). Groups never cross rows, so any
run of whole rows quantizes alone, to the same codes and scales as inside the whole tensor: a chunk
of whole rows [r0, r1) owns codes [r0*cols, r1*cols) and scales [r0*G, r1*G) with
G = ceil(cols / group).

Grids (b bits):
* symmetric: code q in [-Q, Q], Q = 2**(b-1) - 1, value q * scale (2**b - 1 levels, zero exact);
* asymmetric: code q in [0, L], L = 2**b - 1, value offset + q * scale (2**b levels).

Methods:
* "rtn": round to nearest with the scale that just covers the group (scale >= max|x| / Q, resp.
  (max - offset) / L, after rounding the scale to its storage dtype upwards): |x - value| <= scale/2;
* "mse": the same, with the scale shrunk by the clip ratio (of CLIP_RATIOS) that minimises the
  group's squared error; codes of entries beyond the clip saturate at the grid's end.

Every step is elementwise or per group with a fixed order of float32 operations, so results do not
depend on how many rows are quantized at once, and a plain numpy computation reproduces the decode
bit for bit: value = float32(q) * float32(scale) [+ float32(offset)], rounded once per operation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tallzip.formats.container.quant_layout import quant_rows as row_layout  # (rows, cols, group, groups per row)
from tallzip.ops.taskvec import as_compute

BITS = {"q8": 8, "q4": 4, "q3": 3, "q2": 2}
GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("rtn", "mse")
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Candidate clip ratios for "mse", largest first (ties keep the larger, i.e. the less clipped, scale).
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))  # 1.00, 0.95, ..., 0.30


@dataclass(frozen=True)
class QuantSpec:
    """How a task vector is quantized: bits, group size (None: per row), grid, method, scale precision."""

    bits: int
    group: int | None = 64
    symmetric: bool = True
    method: str = "rtn"
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.bits not in BITS.values():
            raise ValueError(f"bits must be one of {sorted(BITS.values())}, got {self.bits}")
        if self.group is not None and (type(self.group) is not int or self.group < 1):
            raise ValueError(f"group must be a positive integer or None (per row), got {self.group!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.symmetric and self.bits < 2:
            raise ValueError("a symmetric grid needs at least 2 bits")

    @property
    def code_max(self) -> int:
        """Q (symmetric: codes -Q..Q) or L (asymmetric: codes 0..L)."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    def label(self) -> str:
        group = "row" if self.group is None else f"g{self.group}"
        return f"q{self.bits}-{'sym' if self.symmetric else 'asym'}-{self.method}-{group}-{self.scale_dtype}"


@dataclass
class Quantized:
    """Codes (the tensor's shape), scales and, asymmetric only, offsets ((rows, groups), scale dtype)."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    spec: QuantSpec

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)


def _grouped(x: torch.Tensor, rows: int, cols: int, size: int, groups: int):
    """x as (rows, groups, size) float32, the short last group padded with the row's last element
    (it leaves min and max unchanged), and a mask of the real (unpadded) entries."""
    flat = x.reshape(rows, cols).to(torch.float32)
    pad = groups * size - cols
    valid = torch.ones(rows, groups * size, dtype=torch.bool, device=x.device)
    if pad:
        flat = torch.cat([flat, flat[:, -1:].expand(rows, pad)], dim=1)
        valid[:, cols:] = False
    return flat.reshape(rows, groups, size), valid.reshape(rows, groups, size)


def _round_to(values: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """The nearest value of `dtype` on one side (up: >=, else <=) of each finite float32 value."""
    rounded = values.to(dtype)
    if torch.isinf(rounded).any():
        raise ValueError(f"a scale or offset of {float(values.abs().max()):.3g} does not fit {dtype}")
    if dtype == torch.float32:
        return rounded
    wrong = rounded.to(torch.float32) < values if up else rounded.to(torch.float32) > values
    step = torch.nextafter(rounded, torch.full_like(rounded, math.inf if up else -math.inf))
    return torch.where(wrong, step, rounded)


def round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of `dtype` >= each finite float32 value (scales: the grid still covers the group)."""
    return _round_to(values, dtype, up=True)


def round_down_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of `dtype` <= each finite float32 value (offsets: still at or below the minimum)."""
    return _round_to(values, dtype, up=False)


def _codes(x: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Nearest codes (ties to even) on the grid of float32 scales (and offsets), saturating at its ends."""
    shifted = x if offsets is None else x - offsets
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    low = -spec.code_max if spec.symmetric else 0
    q = torch.round(shifted / safe).clamp_(low, spec.code_max)
    return torch.where(scales > 0, q, torch.zeros_like(q))


def _dequant_grouped(q, scales, offsets):
    values = q * scales
    return values if offsets is None else values + offsets


def _scales_for(x, valid, spec: QuantSpec, ratio: float):
    """Stored scales (and offsets) for one clip ratio, rounded so that the unclipped grid covers each group."""
    dtype = SCALE_DTYPES[spec.scale_dtype]
    if spec.symmetric:
        amax = torch.where(valid, x.abs(), torch.zeros_like(x)).amax(dim=-1, keepdim=True)
        return round_up_to(amax * ratio / spec.code_max, dtype), None
    lo = torch.where(valid, x, torch.full_like(x, math.inf)).amin(dim=-1, keepdim=True)
    hi = torch.where(valid, x, torch.full_like(x, -math.inf)).amax(dim=-1, keepdim=True)
    if ratio != 1.0:  # clip both ends toward the middle
        middle = (lo + hi) / 2
        lo, hi = middle + (lo - middle) * ratio, middle + (hi - middle) * ratio
    offsets = round_down_to(lo, dtype)
    span = (hi - offsets.to(torch.float32)).clamp_(min=0)
    return round_up_to(span / spec.code_max, dtype), offsets


def quantize(tau: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize a task vector (any float dtype, computed in float32; finite values only)."""
    if tau.is_complex() or not tau.is_floating_point():
        raise ValueError(f"quantize needs a float tensor, got {tau.dtype}")
    rows, cols, size, groups = row_layout(tau.shape, spec.group)
    dtype = SCALE_DTYPES[spec.scale_dtype]
    if rows * cols == 0:
        empty = torch.empty(rows, groups, dtype=dtype, device=tau.device)
        return Quantized(torch.empty(tau.shape, dtype=spec.code_dtype, device=tau.device), empty,
                         None if spec.symmetric else empty.clone(), spec)
    if not bool(torch.isfinite(tau).all()):
        raise ValueError("quantize needs finite values (a task vector with NaN or inf cannot be quantized)")
    x, valid = _grouped(tau, rows, cols, size, groups)
    ratios = CLIP_RATIOS if spec.method == "mse" else (1.0,)
    best = None
    for ratio in ratios:
        scales, offsets = _scales_for(x, valid, spec, ratio)
        s32 = scales.to(torch.float32)
        o32 = None if offsets is None else offsets.to(torch.float32)
        q = _codes(x, s32, o32, spec)
        if len(ratios) == 1:
            best = (q, scales, offsets)
            break
        error = torch.where(valid, (_dequant_grouped(q, s32, o32) - x) ** 2, torch.zeros_like(x)).sum(dim=-1, keepdim=True)
        if best is None:
            best = [q, scales, offsets, error]
            continue
        better = error < best[3]  # strict: on ties the earlier (larger) ratio stays
        best[0] = torch.where(better, q, best[0])
        best[1] = torch.where(better, scales, best[1])
        if offsets is not None:
            best[2] = torch.where(better, offsets, best[2])
        best[3] = torch.where(better, error, best[3])
    q, scales, offsets = best[0], best[1], best[2]
    codes = q.reshape(rows, groups * size)[:, :cols].to(spec.code_dtype).reshape(tau.shape)
    return Quantized(codes, scales.reshape(rows, groups).contiguous(),
                     None if offsets is None else offsets.reshape(rows, groups).contiguous(), spec)


def per_element(values: torch.Tensor, shape, group: int | None) -> torch.Tensor:
    """Per-group values (scales, offsets: rows x groups, in any shape) repeated over each group's elements
    of a tensor or chunk seen with `shape` (quant_layout.quant_rows): (rows, cols) float32. Every decode
    and check of q* values (dequantize, the chunk decode, verify's bound) spreads them with this."""
    rows, cols, size, groups = row_layout(shape, group)
    if not groups:
        return torch.empty(rows, 0, dtype=torch.float32, device=values.device)
    return values.to(torch.float32).reshape(rows, groups).repeat_interleave(size, dim=1)[:, :cols]


def dequantize(quantized: Quantized) -> torch.Tensor:
    """The task vector the codes stand for, float32, the codes' shape: q * scale (+ offset)."""
    spec = quantized.spec
    rows, cols, _, _ = row_layout(quantized.shape, spec.group)
    q = quantized.codes.reshape(rows, cols).to(torch.float32)
    values = q * per_element(quantized.scales, quantized.shape, spec.group)
    if quantized.offsets is not None:
        values = values + per_element(quantized.offsets, quantized.shape, spec.group)
    return values.reshape(quantized.shape)


def rebuild(base: torch.Tensor, quantized: Quantized) -> torch.Tensor:
    """theta_0 + dequant(tau): the sum in float32 (float64 stays float64), cast once to the base's dtype."""
    return (as_compute(base) + dequantize(quantized).to(as_compute(base).dtype)).to(base.dtype)


def guarantee_violations(tau: torch.Tensor, quantized: Quantized) -> torch.Tensor:
    """Bool per weight: where tau breaks what the stored codes promise (all False when they fit).

    The promise, for every method: |tau - value| <= scale/2 (plus float32 rounding of the decode),
    except where the code sits at the grid's end and tau lies beyond it (a clipped weight, "mse" only;
    with "rtn" the grid covers every group, so that case never arises on quantize's own output).
    """
    spec = quantized.spec
    rows, cols, _, _ = row_layout(quantized.shape, spec.group)
    x = tau.reshape(rows, cols).to(torch.float32)
    half = per_element(quantized.scales, quantized.shape, spec.group) / 2
    value = dequantize(quantized).reshape(rows, cols)
    q = quantized.codes.reshape(rows, cols).to(torch.int32)
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + value.abs())  # the decode's own rounding
    within = (x - value).abs() <= half + slack
    low = -spec.code_max if spec.symmetric else 0
    beyond = ((q == spec.code_max) & (x >= value - slack)) | ((q == low) & (x <= value + slack))
    return ~(within | beyond).reshape(quantized.shape)


def storage_bits(quantized: Quantized) -> int:
    """Bits of the codes bit-packed at `bits` each plus the scales (and offsets) at their width."""
    spec = quantized.spec
    side = quantized.scales.numel() * quantized.scales.element_size() * 8
    if quantized.offsets is not None:
        side *= 2
    return quantized.codes.numel() * spec.bits + side
