"""Per-task representations (issue 13, benchmarks/REPRESENTATIONS.md): how each task is kept and rebuilt.

* `tall`: base + mask_t * mtv (the default of format v1);
* `q8`, `q4`, `q3`, `q2`: base + the task's own vector quantized (symmetric round-to-nearest, bfloat16
  scales rounded up, groups of QUANT_GROUP elements of a row: the measured default); `q1`: its signs, and per
  group the mean |tau| (issue 22);
* `lowrank`: quantized top singular triplets per matrix (ops/lowrank_store.py, coded whole by packing/lowrank_pack.py);
* `exact`: the task's bits coded given the base's, lossless.

Math only: choosing a representation per task, and the chunk-level quantize / dequantize / rebuild.
"""
from __future__ import annotations

import torch

from tallzip.errors import TallzipError
from tallzip.formats.container.constants import QUANT_BITS, REPRESENTATION_EXACT, REPRESENTATION_TALL, REPRESENTATIONS
from tallzip.ops.quantize import QuantSpec, per_element, quantize
from tallzip.ops.signcode import SignSpec, sign_codes, sign_quantize
from tallzip.ops.taskvec import as_compute

DEFAULT_REPRESENTATION = REPRESENTATION_TALL  # pack without --keep: today's archive
# REPRESENTATIONS.md section 5: q2 asymmetric kept >= 99.5% on every task of the benchmark's 8-task family
# at 1.8 bits/param, the recommended fixed choice when no evaluate is given
ADD_DEFAULT = "q2"
ASYMMETRIC = ("q2",)  # REPRESENTATIONS.md: asymmetric for q2 (99.90% vs ternary 99.04%), symmetric above
QUANT_GROUP = 128
SCALE_DTYPE = "BF16"
_TORCH_SCALE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# q1 (issue 22, BitDelta-style): codes -1/+1, the least-squares scale mean |tau| per group (ops/signcode.py); the
# decode is q*'s symmetric one, value = f32(code) * f32(scale)
SIGN_CODE = "q1"


def quant_spec(representation: str) -> QuantSpec:
    return QuantSpec(bits=QUANT_BITS[representation], group=QUANT_GROUP,
                     symmetric=representation not in ASYMMETRIC, method="rtn",
                     scale_dtype=_TORCH_SCALE[SCALE_DTYPE])


def quant_params(representation: str) -> dict:
    """The task entry's "quant": what its codes and scales mean (SPEC.md)."""
    if representation == SIGN_CODE:
        return {"bits": 1, "group": QUANT_GROUP, "grid": "sign", "method": "mean", "scale_dtype": SCALE_DTYPE}
    return {"bits": QUANT_BITS[representation], "group": QUANT_GROUP,
            "grid": "asymmetric" if representation in ASYMMETRIC else "symmetric", "method": "rtn",
            "scale_dtype": SCALE_DTYPE}


def task_representations(keep, tasks) -> dict[str, str]:
    """keep: None, one representation for all, or {task: rep} with '*' for the rest."""
    if keep is None:
        keep = DEFAULT_REPRESENTATION
    if isinstance(keep, str):
        keep = {"*": keep}
    unknown = set(keep) - set(tasks) - {"*"}
    if unknown:
        raise TallzipError(f"--keep names unknown task {sorted(unknown)[0]!r}; tasks: {', '.join(tasks)}")
    default = keep.get("*", DEFAULT_REPRESENTATION)
    out = {t: keep.get(t, default) for t in tasks}
    for task, rep in out.items():
        if rep not in REPRESENTATIONS:
            raise TallzipError(f"--keep for task {task!r}: unknown representation {rep!r} "
                               f"(expected one of {', '.join(REPRESENTATIONS)})")
    return out


def quantize_chunk(base: torch.Tensor, task: torch.Tensor, chunk_shape, representation: str):
    """(codes flat: int8, or uint8 on an asymmetric grid; scales flat in the scale dtype; offsets flat or
    None) of one chunk: tau = f32(task) - f32(base)."""
    tau = (as_compute(task) - as_compute(base)).reshape(chunk_shape)
    try:
        if representation == SIGN_CODE:  # q1: a sign per weight, the mean |tau| of its group as the scale
            code = sign_quantize(tau, SignSpec(QUANT_GROUP, 1.0, _TORCH_SCALE[SCALE_DTYPE]))
            return sign_codes(code).reshape(-1), code.scales.reshape(-1), None
        q = quantize(tau, quant_spec(representation))
    except ValueError as exc:
        raise TallzipError(f"{exc}; keep such a task as exact or tall") from None
    return q.codes.reshape(-1), q.scales.reshape(-1), None if q.offsets is None else q.offsets.reshape(-1)


def dequantize_chunk(codes: torch.Tensor, scales: torch.Tensor, chunk_shape, group: int | None,
                     offsets: torch.Tensor | None = None) -> torch.Tensor:
    """f32(code) * f32(scale of its group) [+ f32(offset of its group)], flat float32 (SPEC.md: the q* decode)."""
    scale = per_element(scales, chunk_shape, group)  # (rows, cols)
    value = codes.reshape(scale.shape).to(torch.float32) * scale
    if offsets is not None:
        value = value + per_element(offsets, chunk_shape, group)
    return value.reshape(-1)


def rebuild_quantized(base: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """f32(base) + value (float64 bases in float64), in the compute dtype; the caller casts."""
    base_c = as_compute(base)
    return base_c + value.to(base_c.dtype)


def quantized_rebuild(base: torch.Tensor, task: torch.Tensor, chunk_shape, representation: str) -> torch.Tensor:
    """One chunk of a q* task as the archive rebuilds it (flat, in the task's dtype)."""
    codes, scales, offsets = quantize_chunk(base, task, chunk_shape, representation)
    value = dequantize_chunk(codes, scales, chunk_shape, QUANT_GROUP, offsets)
    return rebuild_quantized(base.reshape(-1), value).to(task.dtype)


REPRESENTATION_ROLES = ("qcodes", "qscales", "qoffsets", "delta")


def representation_fields(rep: str) -> dict:
    """Extra fields of a task entry for its representation."""
    if rep in QUANT_BITS:
        return {"quant": quant_params(rep)}
    if rep == REPRESENTATION_EXACT:
        from tallzip.formats.codecs.delta import DEFAULT_CODEC, DEFAULT_MODE
        return {"exact": {"mode": DEFAULT_MODE, "codec": DEFAULT_CODEC}}
    return {}


def representation_section(writer, role: str, name: str, task: str, shape, dtype: str, chunk_elements: int,
                           rep: str = "q4") -> dict:
    """A new qcodes / qscales / delta section entry for one tensor of one task."""
    from tallzip.formats.container.quant_layout import scales_count
    if role == "qcodes":
        return writer.section(role=role, tensor=name, task=task, dtype="U8" if rep in ASYMMETRIC else "I8",
                              shape=shape, codec="planes+ans")
    if role in ("qscales", "qoffsets"):
        return writer.section(role=role, tensor=name, task=task, dtype=SCALE_DTYPE,
                              shape=[scales_count(shape, chunk_elements, QUANT_GROUP)], codec="zstd",
                              of_shape=list(shape), group=QUANT_GROUP)
    return writer.section(role=role, tensor=name, task=task, dtype=dtype, shape=shape, codec="delta")


def is_quantized(representation: str) -> bool:
    return representation in QUANT_BITS


def stores_mtv(representations) -> bool:
    return REPRESENTATION_TALL in set(representations)


__all__ = ["DEFAULT_REPRESENTATION", "ADD_DEFAULT", "REPRESENTATION_EXACT", "quant_spec", "quant_params",
           "task_representations", "quantize_chunk", "dequantize_chunk", "rebuild_quantized", "quantized_rebuild", "is_quantized",
           "stores_mtv"]
