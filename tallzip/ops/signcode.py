"""Sign codes ("q1", BitDelta-style) of a task vector (issue 22). Math only, no I/O.

A tensor is cut into groups as the q* quantizers cut it (rows along the last dimension, `group` consecutive
elements of a row; None: the whole row) or, with group "tensor", one group for the whole tensor (BitDelta's one
scale per matrix). Each group keeps the `density` fraction of its weights with the largest |tau| (1.0: every
weight, a pure sign code) and stores, per kept weight, its sign, and per group one scale a. The rebuilt value is
+a or -a on a kept weight and 0 elsewhere. For fixed signs and support S the squared error
sum_S (|tau| - a)^2 + sum_not_S tau^2 is smallest at a = mean_S |tau| (the least-squares optimum of a sign code),
which is what is stored, rounded to nearest in the scale's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tallzip.ops.quantize import SCALE_DTYPES, row_layout
from tallzip.ops.taskvec import all_finite

TENSOR = "tensor"  # SignSpec.group: one scale for the whole tensor
SCALE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}

@dataclass(frozen=True)
class SignSpec:
    """A sign code: group (elements along a row, None: a row, "tensor": the tensor), the fraction of each
    group's weights kept (largest |tau| first; 1.0 keeps every weight) and the scales' dtype."""

    group: int | None | str = 128
    density: float = 1.0
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        if not (self.group is None or self.group == TENSOR or (type(self.group) is int and self.group >= 1)):
            raise ValueError(f"group must be a positive integer, None (per row) or {TENSOR!r}, got {self.group!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    def label(self) -> str:
        group = "row" if self.group is None else TENSOR if self.group == TENSOR else f"g{self.group}"
        kind = "q1" if self.density == 1.0 else f"sign{self.density:g}"
        return f"{kind}-{group}-{self.scale_dtype}"


@dataclass
class SignCode:
    """negative: bool per weight (the tensor's shape); kept: bool per weight, None when every weight is kept;
    scales: (rows, groups) in the scale dtype ((1, 1) for group "tensor")."""

    negative: torch.Tensor
    kept: torch.Tensor | None
    scales: torch.Tensor
    spec: SignSpec

    @property
    def shape(self) -> tuple:
        return tuple(self.negative.shape)


def sign_layout(shape, group) -> tuple[int, int, int, int]:
    """(rows, cols, group size, groups per row) of a sign code: the q* layout, or one group for "tensor"."""
    if group == TENSOR:
        count = math.prod(tuple(shape))
        return 1, count, max(count, 1), 1 if count else 0
    return row_layout(shape, group)


def _grouped(x: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (rows, groups, size) float32, the short last group padded with zeros, and a mask of real entries."""
    rows, cols, size, groups = layout
    flat = x.reshape(rows, cols).to(torch.float32)
    valid = torch.ones(rows, cols, dtype=torch.bool, device=x.device)
    pad = groups * size - cols
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(rows, pad)], dim=1)
    return flat.reshape(rows, groups, size), valid.reshape(rows, groups, size)


def _ungrouped(x: torch.Tensor, layout, shape) -> torch.Tensor:
    rows, cols, size, groups = layout
    return x.reshape(rows, groups * size)[:, :cols].reshape(shape)

def _nearest(values: torch.Tensor, dtype_name: str) -> torch.Tensor:
    rounded = values.to(SCALE_DTYPES[dtype_name])
    if torch.isinf(rounded).any():
        raise ValueError(f"a scale of {float(values.abs().max()):.3g} does not fit {dtype_name}")
    return rounded


def sign_quantize(tau: torch.Tensor, spec: SignSpec) -> SignCode:
    """The sign code of a task vector: per group, the kept weights' signs and the least-squares scale."""
    check_finite_float(tau, "sign_quantize")
    layout = sign_layout(tau.shape, spec.group)
    rows, cols, size, groups = layout
    x, valid = _grouped(tau, layout)
    magnitude = x.abs()
    if spec.density < 1.0:
        # The ceil(density * n) largest |tau| of each group (ties: the earlier index), n its real entries.
        counts = valid.sum(dim=-1, keepdim=True)
        wanted = torch.ceil(counts.to(torch.float64) * spec.density).to(torch.int64)
        order = torch.sort(torch.where(valid, magnitude, torch.full_like(magnitude, -1.0)), dim=-1,
                           descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(size, device=x.device).expand_as(order).contiguous())
        kept = (rank < wanted) & valid
    else:
        kept = valid
    count = kept.sum(dim=-1, keepdim=True)
    total = torch.where(kept, magnitude, torch.zeros_like(magnitude)).sum(dim=-1, keepdim=True)
    mean = torch.where(count > 0, total / count.clamp(min=1).to(torch.float32), torch.zeros_like(total))
    scales = _nearest(mean, spec.scale_dtype).reshape(rows, groups).contiguous()
    negative = _ungrouped(x < 0, layout, tau.shape).contiguous()
    kept_out = None if spec.density == 1.0 else _ungrouped(kept, layout, tau.shape).contiguous()
    return SignCode(negative, kept_out, scales, spec)


def sign_dequantize(code: SignCode) -> torch.Tensor:
    """+scale / -scale on the kept weights, 0 elsewhere; float32, the code's shape."""
    layout = sign_layout(code.shape, code.spec.group)
    rows, cols, size, groups = layout
    scale = code.scales.to(torch.float32).reshape(rows, groups, 1).expand(rows, groups, size)
    scale = _ungrouped(scale, layout, code.shape)
    value = torch.where(code.negative, -scale, scale)
    if code.kept is not None:
        value = torch.where(code.kept, value, torch.zeros_like(value))
    return value


def sign_codes(code: SignCode) -> torch.Tensor:
    """The code as int8 per weight: -1, +1, or 0 where not kept (what an entropy coder sees)."""
    out = torch.where(code.negative, torch.tensor(-1, dtype=torch.int8), torch.tensor(1, dtype=torch.int8))
    return out if code.kept is None else torch.where(code.kept, out, torch.zeros_like(out))


def sign_storage_bits(code: SignCode) -> int:
    """Bits of the code packed without entropy coding: 1 bit per weight (a pure sign code) or 2 (a ternary
    code: 0, +1, -1), plus the scales at their width."""
    per_weight = 1 if code.kept is None else 2
    return code.negative.numel() * per_weight + code.scales.numel() * SCALE_BITS[code.spec.scale_dtype]


def check_finite_float(tau: torch.Tensor, what: str) -> None:
    """ValueError unless tau is a float tensor of finite values (a coded task vector must be)."""
    if tau.is_complex() or not tau.is_floating_point():
        raise ValueError(f"{what} needs a float tensor, got {tau.dtype}")
    if not all_finite(tau):
        raise ValueError(f"{what} needs finite values (a task vector with NaN or inf cannot be coded)")
