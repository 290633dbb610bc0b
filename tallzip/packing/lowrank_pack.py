"""A `lowrank` task's two sections and its manifest fields (SPEC.md "lowrank"), for pack and add.

A task vector's singular vectors need the whole matrix, so a lowrank task is not coded chunk by chunk with
the others: after the chunk jobs, each of its tensors that the base rebuilds (kind masked) is read whole, one at
a time, coded (ops/lowrank_store.py: its SVD within the options' memory_bytes, randomized with a fixed seed
above it), and its codes and scales appended to the task's `lrcodes` and `lrscales` streams, which are then
written in chunks of the archive's plan. The streams stay in memory until written: r(m + n) codes per factored
matrix, one per weight of a tensor kept as q* (1-d tensors).
"""
from __future__ import annotations

import math

import torch

from tallzip.formats.container.chunking import chunk_plan
from tallzip.formats.container.constants import ROLE_LRCODES, ROLE_LRSCALES
from tallzip.formats.container.writer import encode_chunk
from tallzip.formats.tensors import to_bits
from tallzip.ops import quality
from tallzip.ops.lowrank_store import encode_tensor, decode_range
from tallzip.ops.taskvec import as_compute
from tallzip.errors import TallzipError

SCALE_DTYPE = "BF16"
# planes+ans on one-byte codes is an order-0 ANS coder over their histogram (as q* codes); scales zstd.
CODES_CODEC, SCALES_CODEC = "planes+ans", "zstd"


def _recorded(rel_error: float) -> float:
    """The relative error as the manifest records it: 4 significant digits, rounded up (verify's bound)."""
    if rel_error <= 0:
        return 0.0
    digits = 3 - math.floor(math.log10(rel_error))
    return math.ceil(rel_error * 10 ** digits) / 10 ** digits


def lowrank_params(options, records) -> dict:
    """The task entry's "lowrank" field."""
    return {"energy": options.energy, "factor_bits": options.factor_bits, "group": options.group,
            "scale_dtype": SCALE_DTYPE, "tensors": records}


def write_lowrank_task(writer, task: str, names, read_pair, options, level: int, chunk_elements: int, progress=None):
    """Code every tensor of `names` for `task` and write its two sections. read_pair(name) -> (base, task
    tensor), whole. Returns (the "lowrank" field, the rebuild's sums of ops/quality.py)."""
    options = options.for_task(task)
    records, codes, scales, sums = [], [], [], quality.zero_sums()
    for i, name in enumerate(names):
        base, tensor = read_pair(name)
        tau = as_compute(tensor) - as_compute(base)
        try:
            code = encode_tensor(tau, options, options.tensor_bits(name), SCALE_DTYPE)
        except ValueError as exc:
            raise TallzipError(f"task {task!r} tensor {name!r}: {exc}; keep such a task as exact or tall") from None
        value = decode_range(code.codes, code.scales, code.shape, code.rank, options.group, 0, tau.numel())
        rebuilt = (as_compute(base).reshape(-1) + value.to(as_compute(base).dtype)).to(tensor.dtype)
        sums += quality.rebuild_sums(base.reshape(-1), tensor.reshape(-1), rebuilt)
        records.append([name, code.rank, code.bits, _recorded(code.rel_error)])
        codes.append(code.codes)
        scales.append(code.scales)
        if progress:
            progress(f"low rank {task}", i + 1, len(names))
    for role, parts, dtype, codec in ((ROLE_LRCODES, codes, "I8", CODES_CODEC),
                                      (ROLE_LRSCALES, scales, SCALE_DTYPE, SCALES_CODEC)):
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int8 if dtype == "I8" else torch.bfloat16)
        entry = writer.section(role=role, tensor="", task=task, dtype=dtype, shape=[flat.numel()], codec=codec)
        bits = to_bits(flat.contiguous())
        for start, count in chunk_plan([flat.numel()], chunk_elements):
            writer.write_chunk(entry, *encode_chunk(codec, bits[start:start + count], level))
    return lowrank_params(options, records), sums


__all__ = ["write_lowrank_task", "lowrank_params", "SCALE_DTYPE"]
