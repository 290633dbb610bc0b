"""`verify --against` for tasks kept as q*, lowrank or exact: each representation's own guarantee, checked
against the original checkpoint (tall tasks keep the TALL mask checks of verification.py).

* exact: every weight rebuilt bit-identical to the original;
* q* (symmetric round-to-nearest, scale rounded up so the grid covers the group: no clipping):
  tau = f32(original) - f32(base) lies within half a stored scale of f32(code) * f32(scale), plus the
  decode's own float32 rounding (a few ulps).
* q1: every stored code is tau's sign (-1 where tau < 0, else +1) and every scale mean |tau| of its group,
  to the bfloat16 rounding (2^-8 relative) and the summation order;
* lowrank: per tensor, ||tau - value|| / ||tau|| recomputed over its chunks is no larger than the relative error
  the manifest recorded (rounded up) plus LOWRANK_SLACK of it; codes and scales range-checked as they are read.
Math over chunks of tensors; the archive gives the chunks (verification.py walks them).
"""
from __future__ import annotations

import numpy as np
import torch

from tallzip.formats.container.constants import QUANT_BITS, REPRESENTATION_EXACT
from tallzip.formats.tensors import to_bits, torch_dtype
from tallzip.ops.quantize import per_element
from tallzip.ops.signcode import SignSpec, sign_quantize
from tallzip.ops.representations import dequantize_chunk, rebuild_quantized
from tallzip.ops.taskvec import as_compute

# lowrank (SPEC.md): a tensor's relative error recomputed from the original may exceed the one recorded at pack (4
# significant digits, rounded up) by this share at most: what the float32 decode and summation order can move.
LOWRANK_SLACK = 1e-3

GUARANTEES = {
    "lowrank": "each tensor's relative error ||tau - value|| / ||tau|| no larger than the one recorded at pack "
               f"(+{LOWRANK_SLACK:g} of it), codes within the grid",
    "tall": "the TALL mask is what the rule gives from the checkpoint, within the stored mtv's rounding",
    "exact": "every weight bit-identical",
    **{q: "every weight of the task vector within half a stored scale (round to nearest, no clipping)"
       for q in QUANT_BITS if q != "q1"},
    "q1": "every stored sign that of the task vector's weight, every scale the mean |tau| of its group "
          "(to the scale dtype's rounding)",
}


def guarantee_of(representation: str) -> str:
    return GUARANTEES.get(representation, "unknown")


def quant_outside(tau: torch.Tensor, value: torch.Tensor, scales: torch.Tensor, shape, group) -> int:
    """How many weights of one chunk break |tau - value| <= scale / 2 (+ rounding), value being the
    decode f32(code) * f32(scale) [+ offset] (representations.dequantize_chunk)."""
    half = per_element(scales, shape, group).reshape(-1) / 2
    x = tau.reshape(-1).to(torch.float32)
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + value.abs())
    return int(torch.count_nonzero((x - value).abs() > half + slack))


def check_task_chunk(arc, task: str, name: str, index: int, base_c: torch.Tensor, orig_c: torch.Tensor,
                     error) -> int:
    """Chunk `index` of one tensor of a q*/exact task against the original's same elements (flat): adds
    the rebuild error into `error` (verify_math.ErrorSums) and returns how many weights break the
    representation's guarantee."""
    if arc.representation(task) == REPRESENTATION_EXACT or arc.reader.section("own", name, task) is not None:
        rebuilt = arc.assemble(arc.chunk_parts(task, name, index, (base_c,)), torch.device("cpu")).reshape(-1)
        error.add(rebuilt, orig_c)
        return int(np.count_nonzero(to_bits(rebuilt) != to_bits(orig_c.to(rebuilt.dtype))))
    # the archive's q* rebuild (Archive._represented_chunk), the codes decoded once for it and the check
    codes, scales, offsets, shape = arc.quant_chunk(task, name, index)
    quant = arc.task_entry(task)["quant"]
    group = quant["group"]
    value = dequantize_chunk(codes, scales, shape, group, offsets)
    error.add(rebuild_quantized(base_c, value).to(torch_dtype(arc.task_dtypes(task)[name])), orig_c)
    tau = as_compute(orig_c) - as_compute(base_c)
    if quant["grid"] == "sign":
        return sign_outside(tau, codes, scales, shape, group)
    return quant_outside(tau, value, scales, shape, group)


def sign_outside(tau: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, shape, group) -> int:
    """How many weights of one q1 chunk break its guarantee: a stored sign that is not tau's (-1 where tau < 0,
    else +1), or a weight of a group whose stored scale is not mean |tau| of the group (2^-7 of it plus a float32
    ulp: a bfloat16 rounding to nearest and the summation order)."""
    x = tau.reshape(-1).to(torch.float32)
    wrong_sign = codes.reshape(-1) != torch.where(x < 0, -1, 1).to(codes.dtype)
    mean = sign_quantize(x.reshape(shape), SignSpec(group, 1.0, "float32")).scales.reshape(-1)
    off = (scales.reshape(-1).to(torch.float32) - mean).abs() > 2.0 ** -7 * mean + torch.finfo(torch.float32).tiny
    wrong_scale = per_element(off.to(torch.float32), shape, group).reshape(-1) > 0
    return int(torch.count_nonzero(wrong_sign | wrong_scale))


def lowrank_chunk_sums(arc, task: str, name: str, index: int, base_c: torch.Tensor, orig_c: torch.Tensor,
                       error) -> tuple[float, float]:
    """Chunk `index` of one tensor of a lowrank task against the original: adds the rebuild error into `error`
    and returns (||tau - value||^2, ||tau||^2) over the chunk (float64), for the tensor's relative error."""
    start, count = arc.plan(task, name)[index]
    value = arc.lowrank(task).value(name, start, count)
    error.add(rebuild_quantized(base_c, value).to(torch_dtype(arc.task_dtypes(task)[name])), orig_c)
    tau = (as_compute(orig_c) - as_compute(base_c)).reshape(-1).to(torch.float64)
    diff = tau - value.to(torch.float64)
    return float(torch.dot(diff, diff)), float(torch.dot(tau, tau))


def lowrank_exceeds(diff_sq: float, tau_sq: float, recorded: float) -> float | None:
    """The recomputed relative error when it breaks the lowrank guarantee, else None."""
    rel = (diff_sq / tau_sq) ** 0.5 if tau_sq > 0 else (0.0 if diff_sq == 0 else float("inf"))
    return rel if rel > recorded * (1 + LOWRANK_SLACK) + 1e-7 else None


def difference_text(representation: str, outside: int, total: int) -> str:
    """The difference a q*/exact task's tensor is reported with, `outside` of its `total` weights off."""
    what = "values differ (exact: must be bit-identical)" if representation == REPRESENTATION_EXACT else \
        "weights have another sign or a group's mean |tau| another scale" if representation == "q1" else \
        f"weights lie beyond half a stored scale of their {representation} code"
    return f"{representation}: {outside:,} of {total:,} {what}"
