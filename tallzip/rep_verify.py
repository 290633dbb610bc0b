"""`verify --against` for tasks kept as q* or exact: each representation's own guarantee, checked
against the original checkpoint (tall tasks keep the TALL mask checks of verification.py).

* exact: every weight rebuilt bit-identical to the original;
* q* (symmetric round-to-nearest, scale rounded up so the grid covers the group: no clipping):
  tau = f32(original) - f32(base) lies within half a stored scale of f32(code) * f32(scale), plus the
  decode's own float32 rounding (a few ulps).
Math over tensors; the archive gives the chunks.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats.constants import QUANT_BITS, REPRESENTATION_EXACT
from .formats.tensors import to_bits
from .representations import dequantize_chunk
from .taskvec import as_compute

GUARANTEES = {
    "tall": "the TALL mask is what the rule gives from the checkpoint, within the stored mtv's rounding",
    "exact": "every weight bit-identical",
    **{q: "every weight of the task vector within half a stored scale (round to nearest, no clipping)"
       for q in QUANT_BITS},
}


def guarantee_of(representation: str) -> str:
    return GUARANTEES.get(representation, "unknown")


def quant_outside(tau: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, shape, group, offsets=None) -> int:
    """How many weights of one chunk break |tau - f32(code) * f32(scale)| <= scale / 2 (+ rounding)."""
    from .formats.quant_layout import quant_rows
    rows, cols, size, groups = quant_rows(shape, group)
    value = dequantize_chunk(codes, scales, shape, group, offsets)
    half = scales.to(torch.float32).reshape(rows, groups).repeat_interleave(size, dim=1)[:, :cols].reshape(-1) / 2
    x = tau.reshape(-1).to(torch.float32)
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + value.abs())
    return int(torch.count_nonzero((x - value).abs() > half + slack))


def check_task_tensor(arc, task: str, name: str, base: torch.Tensor, original: torch.Tensor, findings):
    """Compare one tensor of a q*/exact task with its original, chunk by chunk; record in `findings`
    (verification._TaskFindings: differences and the rebuild error)."""
    rep = arc.representation(task)
    flat_base, flat_orig = base.reshape(-1), original.reshape(-1)
    outside = total = 0
    for index, (start, count) in enumerate(arc.plan(task, name)):
        base_c, orig_c = flat_base[start:start + count], flat_orig[start:start + count]
        rebuilt = arc._assemble(arc._chunk_parts(task, name, index, (base_c,)), torch.device("cpu")).reshape(-1)
        findings.error.add(rebuilt, orig_c)
        total += count
        if rep == REPRESENTATION_EXACT or arc.reader.section("own", name, task) is not None:
            outside += int(np.count_nonzero(to_bits(rebuilt) != to_bits(orig_c.to(rebuilt.dtype))))
            continue
        codes, scales, offsets, shape = arc.quant_chunk(task, name, index)
        tau = as_compute(orig_c) - as_compute(base_c)
        outside += quant_outside(tau, codes, scales, shape, arc.task_entry(task)["quant"]["group"], offsets)
    if outside:
        what = "values differ (exact: must be bit-identical)" if rep == REPRESENTATION_EXACT else \
            f"weights lie beyond half a stored scale of their {rep} code"
        findings.differences.append({"tensor": name, "what": f"{rep}: {outside:,} of {total:,} {what}"})
