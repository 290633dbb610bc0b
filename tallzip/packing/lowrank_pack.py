"""A `lowrank` task's two sections and its manifest fields (SPEC.md "lowrank"), for pack and add.

A task vector's singular vectors need the whole matrix, so a lowrank task is not coded chunk by chunk with
the others: after the chunk jobs, each of its tensors that the base rebuilds (kind masked) is read whole and coded
(ops/lowrank_store.py: its SVD within the options' memory_bytes, randomized with a fixed seed above it), tensors on
a thread pool within the memory budget, and its codes and scales appended, in order, to the task's `lrcodes` and
`lrscales` streams, which are written in chunks of the archive's plan once the task's last tensor is coded. A
task's streams stay in memory until written: r(m + n) codes per factored matrix, one per weight of a tensor kept
as q* (1-d tensors; an asymmetric q* code's offsets follow its scales in `lrscales`).
"""
from __future__ import annotations

import math

import torch

from tallzip.formats.container.chunking import chunk_plan
from tallzip.formats.container.constants import ROLE_LRCODES, ROLE_LRSCALES
from tallzip.formats.container.lowrank_layout import SYMMETRIC
from tallzip.formats.container.writer import encode_chunk
from tallzip.formats.tensors import to_bits
from tallzip.ops import quality
from tallzip.ops.lowrank_store import encode_tensor, decode_range
from tallzip.ops.taskvec import as_compute
from tallzip.errors import TallzipError
from tallzip.run.chunks import ordered_map
from tallzip.run.threads import single_torch_thread

SCALE_DTYPE = "BF16"
# codes: the options' codes_codec (planes+ans by default: an order-0 ANS coder over their histogram, as q*
# codes); scales zstd.
SCALES_CODEC = "zstd"


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


def _encoded(task: str, name: str, read_pair, options):
    """(record, codes, scales, the rebuild's sums) of one tensor of one task."""
    base, tensor = read_pair(task, name)
    tau = as_compute(tensor) - as_compute(base)
    try:
        code = encode_tensor(tau, options, options.tensor_code(name), SCALE_DTYPE)
    except ValueError as exc:
        raise TallzipError(f"task {task!r} tensor {name!r}: {exc}; keep such a task as exact or tall") from None
    value = decode_range(code.codes, code.scales, code.shape, code.rank, options.group, 0, tau.numel(), code.grid)
    rebuilt = (as_compute(base).reshape(-1) + value.to(as_compute(base).dtype)).to(tensor.dtype)
    sums = quality.rebuild_sums(base.reshape(-1), tensor.reshape(-1), rebuilt)
    record = [name, code.rank, code.bits, _recorded(code.rel_error)]
    if code.grid != SYMMETRIC:  # a record without a grid is symmetric: archives before the field read the same
        record.append(code.grid)
    return record, code.codes, code.scales, sums


def _write_streams(writer, task: str, codes: list, scales: list, level: int, chunk_elements: int, codes_codec: str):
    for role, parts, dtype, codec in ((ROLE_LRCODES, codes, "I8", codes_codec),
                                      (ROLE_LRSCALES, scales, SCALE_DTYPE, SCALES_CODEC)):
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int8 if dtype == "I8" else torch.bfloat16)
        entry = writer.section(role=role, tensor="", task=task, dtype=dtype, shape=[flat.numel()], codec=codec)
        bits = to_bits(flat.contiguous())
        for start, count in chunk_plan([flat.numel()], chunk_elements):
            writer.write_chunk(entry, *encode_chunk(codec, bits[start:start + count], level))


def write_lowrank_tasks(writer, names: dict, read_pair, options, level: int, chunk_elements: int, *,
                        budget: int = 1 << 30, workers: int | None = None, sizes: dict | None = None,
                        progress=None) -> dict:
    """Code every tensor of `names` ({task: [tensor names]}) and write each task's two sections, task after task.
    Tensors are coded on a thread pool (one PyTorch thread each, so the bytes do not depend on the workers),
    as many at once as `budget` holds (sizes: {name: elements}, for the cost). read_pair(task, name) -> (base,
    task tensor), whole. Returns {task: (the "lowrank" field, the rebuild's sums of ops/quality.py)}."""
    items = [(task, name) for task, tensor_names in names.items() for name in tensor_names]
    # float32 base, task and tau, the float64 matrix and the SVD's working set (at most memory_bytes)
    cost = lambda item: 48 * (sizes or {}).get(item[1], 0) + options.memory_bytes // 4 + (1 << 20)  # noqa: E731
    out, done = {}, 0
    parts = {task: ([], [], [], quality.zero_sums()) for task in names}
    with single_torch_thread(torch.device("cpu")):
        job = lambda item: _encoded(item[0], item[1], read_pair, options.for_task(item[0]))  # noqa: E731
        for (task, _), (record, codes, scales, sums) in zip(items, ordered_map(job, items, cost=cost, budget=budget,
                                                                                workers=workers)):
            records, all_codes, all_scales, task_sums = parts[task]
            records.append(record)
            all_codes.append(codes)
            all_scales.append(scales)
            task_sums += sums
            if len(records) == len(names[task]):  # the task's last tensor: its sections, then its memory goes
                _write_streams(writer, task, all_codes, all_scales, level, chunk_elements, options.codes_codec)
                out[task] = (lowrank_params(options.for_task(task), records), task_sums)
                parts[task] = None
            done += 1
            if progress:
                progress("low rank", done, len(items))
    for task in names:  # a task with no tensor to rebuild: empty sections
        if task not in out:
            _write_streams(writer, task, [], [], level, chunk_elements, options.codes_codec)
            out[task] = (lowrank_params(options.for_task(task), []), quality.zero_sums())
    return out


__all__ = ["write_lowrank_tasks", "lowrank_params", "SCALE_DTYPE"]
