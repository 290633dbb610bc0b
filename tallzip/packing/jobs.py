"""The chunk jobs of `pack`: read one chunk of the base and of every task by byte range, compute
that chunk's mtv and masks, code and hash every section's piece of it. Each job needs only the
inputs and what the manifest records (lambdas, TIES thresholds and majority sign), so jobs run in
any order, on any thread (or, later, machine), and give the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tallzip.run.chunks import BufferPool
from tallzip.formats.container.chunking import chunk_shape
from tallzip.formats.container.chunking import mask_context as chunk_mask_context
from tallzip.formats.tensors import dtype_name, to_bits, torch_dtype
from tallzip.formats.container.writer import encode_chunk, encode_packed_mask_chunk
from tallzip.ops.representations import quantize_chunk
from tallzip.formats import codecs as codec_registry
from tallzip.ops import quality, taskvec
from tallzip.ops.bits import unpack_bits
from tallzip.ops.representations import dequantize_chunk, rebuild_quantized, QUANT_GROUP
from tallzip.ops.tall import EstimateRequest, masked_tensor_and_sums
from tallzip.ops.taskvec import stored_mtv

# Elements of every input read and combined at once inside a chunk: a few MB of scratch per task,
# reused from job to job (a multiple of 8, so each slice's mask bits start on a byte).
SLICE = 1 << 18
_BUFFERS = BufferPool()


@dataclass(frozen=True)
class PackSettings:
    """What every chunk job of one pack shares (the manifest records all of it)."""
    task_names: tuple
    lambdas: tuple            # per task, in task order
    merger: object            # ops.ties.MtvMerger: sum, or TIES with its thresholds and majority
    mtv_dtype: str
    codecs: dict
    level: int
    device: torch.device
    allow_nonfinite: bool
    base_ref: bool
    representations: tuple = ()  # per task, in task order (representations.py); empty: all tall
    estimate_every: int = quality.SAMPLE_EVERY  # tall tasks' estimate on every k-th piece (quality.sample_pieces)


@dataclass
class ChunkJob:
    kind: str                 # "masked", "per-task", "shared", "own", "file"
    name: str                 # tensor (or side file) name
    index: int                # chunk index in the tensor's plan
    start: int
    count: int
    shape: tuple              # the whole tensor's shape
    task: str | None = None   # own tensors and files
    cost: int = 0


@dataclass
class ChunkResult:
    job: ChunkJob
    pieces: list = field(default_factory=list)  # (role, task, (data, params, digest), ones | None)
    identical: bool = False   # masked chunks: every task equals the base here
    mtv_dtype: str | None = None  # masked chunks: the dtype the mtv is stored at
    quality: dict = field(default_factory=dict)  # masked chunks: task -> the rebuild's sums (ops/quality.py)


def _buffer(key, count, dtype):
    itemsize = dtype.itemsize
    buf = _BUFFERS.get((key, dtype), max(count, 1) * itemsize,
                       lambda n: torch.empty(n // itemsize, dtype=dtype))
    return buf[:count]


def mask_context(stored_mtv: torch.Tensor, shape) -> dict:
    """The mask codecs' side information for one chunk, built from its stored mtv exactly as the
    reader builds it from the bits it reads (formats.chunking.mask_context)."""
    return chunk_mask_context(to_bits(stored_mtv), dtype_name(stored_mtv.dtype), shape)


def run_job(job: ChunkJob, family, settings: PackSettings) -> ChunkResult:
    if job.kind == "masked":
        return _masked_chunk(job, family, settings)
    result = ChunkResult(job)
    codecs = settings.codecs
    if job.kind == "file":
        data = np.frombuffer(family.tasks[job.task].extra_files[job.name].read_bytes(), dtype=np.uint8)
        piece = data[job.start:job.start + job.count]
        result.pieces.append(("file", job.task, encode_chunk("zstd", piece, settings.level), None))
        return result
    if job.kind == "own":
        tensor = family.tasks[job.task].read_range(job.name, job.start, job.count)
        if not settings.allow_nonfinite:
            taskvec.refuse_nonfinite(job.name, [tensor], [f"task {job.task!r}"])
        codec = codecs["float"] if tensor.is_floating_point() else codecs["other"]
        result.pieces.append(("own", job.task, encode_chunk(codec, to_bits(tensor), settings.level), None))
        return result
    base = family.base.read_range(job.name, job.start, job.count)
    codec = codecs["float"] if base.is_floating_point() else codecs["other"]
    if not settings.allow_nonfinite:
        taskvec.refuse_nonfinite(job.name, [base], ["base"])
    if not settings.base_ref:
        result.pieces.append(("base", None, encode_chunk(codec, to_bits(base), settings.level), None))
    if job.kind == "per-task":
        for task in settings.task_names:
            tensor = family.tasks[task].read_range(job.name, job.start, job.count)
            if not settings.allow_nonfinite:
                taskvec.refuse_nonfinite(job.name, [tensor], [f"task {task!r}"])
            result.pieces.append(("own", task, encode_chunk(settings.codecs["other"], to_bits(tensor),
                                                            settings.level), None))
    return result


def run_shared_job(job: ChunkJob, shared) -> ChunkResult:
    """A chunk job on an engine's worker: `shared` is (family, settings), sent once per pack. One
    PyTorch thread per job on a CPU, as the local route (the engine runs one job per CPU)."""
    family, settings = shared
    if settings.device.type == "cpu" and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return run_job(job, family, settings)


def _masked_chunk(job: ChunkJob, family, settings: PackSettings) -> ChunkResult:
    name, start, count = job.name, job.start, job.count
    tasks = [family.tasks[t] for t in settings.task_names]
    n = len(tasks)
    base_dtype = torch_dtype(family.base.dtypes[name])
    base = family.base.read_range(name, start, count, out=_buffer("base", count, base_dtype))
    wide = any(ckpt.dtypes[name] == "F64" for ckpt in (family.base, *tasks))
    mtv = _buffer("mtv", count, torch.float64 if wide else torch.float32)
    packed = [_buffer(("mask", j), (count + 7) // 8, torch.uint8).numpy() for j in range(n)]
    ones = [0] * n
    reps = settings.representations or ("tall",) * n
    sums = {t: quality.zero_sums() for t, rep in zip(settings.task_names, reps) if rep == "tall"}
    every = quality.tensor_sample_every(int(np.prod(job.shape)), settings.estimate_every) if sums else 1
    identical = True
    step = SLICE if settings.device.type == "cpu" else max(count, 1)
    labels = [f"task {t!r}" for t in settings.task_names]
    for s in range(0, count, step):
        m = min(step, count - s)
        base_s = base[s:s + m]
        task_s = [ckpt.read_range(name, start + s, m, out=_buffer(("task", j), step, torch_dtype(ckpt.dtypes[name])))
                  for j, ckpt in enumerate(tasks)]
        if identical:
            identical = all(torch.equal(base_s, t) for t in task_s)
        # The estimate's sums come from the TALL rule's own slice loop where it can (one pass over the inputs)
        mtv_s, packed_s, ones_s, sums_s = masked_tensor_and_sums(
            settings.merger, base_s, task_s, settings.lambdas, settings.device,
            EstimateRequest(settings.mtv_dtype, every, start + s) if sums else None,
            mtv_out=mtv[s:s + m] if settings.device.type == "cpu" else None)
        if not settings.allow_nonfinite and not (settings.merger.method == "sum" and taskvec.all_finite(mtv_s)):
            # A sum of task vectors is finite only if the base and every task are (one check instead
            # of N + 1); TIES trims NaNs away, so there each input is checked.
            taskvec.refuse_nonfinite(name, [base_s, *task_s], ["base", *labels])
        if mtv_s.data_ptr() != mtv[s:s + m].data_ptr():
            mtv[s:s + m].copy_(mtv_s.reshape(-1))
        for j in range(n):
            packed[j][s // 8:s // 8 + packed_s[j].size] = packed_s[j]
            ones[j] += int(ones_s[j])
        if sums and sums_s is not None:
            for j, task in enumerate(settings.task_names):
                if task in sums:
                    sums[task] += sums_s[j].astype(np.float64)
        elif sums:
            stored_s = taskvec.as_compute(stored_mtv(mtv[s:s + m], settings.mtv_dtype))
            for j, task in enumerate(settings.task_names):
                if task in sums:
                    sums[task] += sampled_tall_sums(base_s, task_s[j], stored_s, packed_s[j], m, every, start + s)
    if every > 1:  # a sample of the tensor stands for all of it (quality.sample_weight)
        weight = quality.sample_weight(int(np.prod(job.shape)), every)
        for task in sums:
            sums[task] *= weight
    stored = stored_mtv(mtv, settings.mtv_dtype)
    result = ChunkResult(job, identical=identical, mtv_dtype=dtype_name(stored.dtype), quality=sums)
    float_codec = settings.codecs["float"]
    if not settings.base_ref:
        result.pieces.append(("base", None, encode_chunk(float_codec, to_bits(base), settings.level), None))
    if "tall" in reps:  # the mtv and masks only when some task is rebuilt from them
        result.pieces.append(("mtv", None, encode_chunk(float_codec, to_bits(stored), settings.level), None))
        # The decoder sees the stored mtv: it is the mask codecs' side information.
        # (a codec without context, bits+zstd, codes the packed bits alone: none to build)
        context = None if not codec_registry.uses_context(settings.codecs["mask"]) else mask_context(stored, chunk_shape(job.shape, start, count))
        for task, rep, bits, n_ones in zip(settings.task_names, reps, packed, ones):
            if rep == "tall":
                coded = encode_packed_mask_chunk(settings.codecs["mask"], bits, count, settings.level, context)
                result.pieces.append(("mask", task, coded, n_ones))
    for task, rep in zip(settings.task_names, reps):
        if rep not in ("tall", "lowrank"):  # lowrank tasks are coded whole, after the chunks (lowrank_pack.py)
            tensor = family.tasks[task].read_range(name, start, count)
            pieces, result.quality[task] = representation_chunk(rep, base, tensor, job.shape, start, count,
                                                                settings.level, float_codec)
            result.pieces += [(role, task, coded, ones) for role, _, coded, ones in pieces]
    return result


def sampled_tall_sums(base, task, stored_mtv_c, packed_bits, count: int, every: int, offset: int):
    """tall_sums of a slice starting at element `offset` of its tensor, over its sampled pieces alone
    (quality.sample_pieces; every 1: the whole slice)."""
    if every <= 1:
        return tall_sums(base, task, stored_mtv_c, packed_bits, count)
    mask = unpack_bits(torch.from_numpy(np.ascontiguousarray(packed_bits)), count).numpy()
    sums = quality.zero_sums()
    for lo, hi, sampled in quality.sample_pieces(offset, count, every):
        if sampled:
            sums += tall_sums(base[lo:hi], task[lo:hi], stored_mtv_c[lo:hi], np.packbits(mask[lo:hi], bitorder="little"),
                              hi - lo)
    return sums


def tall_sums(base: torch.Tensor, task: torch.Tensor, stored_mtv_c: torch.Tensor, packed_bits, count: int):
    """The rebuild's sums (ops/quality.py) of one slice of a tall task: base + mask * stored mtv, as extract
    rebuilds it."""
    mask = unpack_bits(torch.from_numpy(np.ascontiguousarray(packed_bits)), count).numpy()
    if base.dtype in (torch.float32, torch.bfloat16) and stored_mtv_c.dtype == torch.float32:
        # as taskvec.rebuild, in numpy (torch's where is ~50x slower on a CPU): base + mtv in float32, cast to
        # the base's dtype where the mask is set, the base's own value elsewhere
        b = quality.as_float_array(base)
        added = b + stored_mtv_c.reshape(-1).numpy()
        if base.dtype == torch.bfloat16:
            added = quality.round_to_bfloat16(added)
        rebuilt = np.where(mask, added, b)
        return quality.rebuild_sums(b, task, rebuilt)
    rebuilt = taskvec.rebuild(base.reshape(-1), torch.from_numpy(mask), stored_mtv_c.reshape(-1))
    return quality.rebuild_sums(base, task, rebuilt)


def representation_pieces(rep: str, base: torch.Tensor, tensor: torch.Tensor, shape, start: int, count: int,
                          level: int, own_codec: str = "planes+zstd") -> list:
    """The coded pieces of one chunk of a q* or exact task: (role, None, coded, None) each (the caller
    fills in the task). The base is the chunk as the archive stores it."""
    return representation_chunk(rep, base, tensor, shape, start, count, level, own_codec)[0]


def representation_chunk(rep: str, base: torch.Tensor, tensor: torch.Tensor, shape, start: int, count: int,
                         level: int, own_codec: str = "planes+zstd"):
    """(the coded pieces, as representation_pieces; the rebuild's sums of ops/quality.py) of one chunk."""
    if rep == "exact":
        sums = quality.exact_sums(base, tensor)
        if tensor.dtype != base.dtype:
            return [("own", None, encode_chunk(own_codec, to_bits(tensor), level), None)], sums
        return [("delta", None, encode_chunk("delta", to_bits(tensor), level, {"base": to_bits(base)}), None)], sums
    layout = chunk_shape(shape, start, count)
    codes, scales, offsets = quantize_chunk(base, tensor, layout, rep)
    pieces = [("qcodes", None, encode_chunk("planes+ans", to_bits(codes), level), None),
              ("qscales", None, encode_chunk("zstd", to_bits(scales), level), None)]
    if offsets is not None:
        pieces.append(("qoffsets", None, encode_chunk("zstd", to_bits(offsets), level), None))
    rebuilt = rebuild_quantized(base, dequantize_chunk(codes, scales, layout, QUANT_GROUP, offsets)).to(tensor.dtype)
    return pieces, quality.rebuild_sums(base, tensor, rebuilt)


def job_cost(job: ChunkJob, n_tasks: int, itemsize: int) -> int:
    """Bytes a job holds at its peak: its inputs and scratch, the codecs' working sets, and its coded
    output until it is written. Masked chunks: base, mtv (compute, stored, float32 context), coded
    base and mtv, and the mask codec's working set (bits-ctx: ~50 bytes per element, its argsorted
    groupings); measured ~80 bytes per element in all for float32 inputs."""
    count = max(job.count, 1)
    if job.kind == "masked":
        return count * (2 * itemsize + 64) + n_tasks * (count // 4 + SLICE * itemsize) + (1 << 20)
    if job.kind == "per-task":
        return count * itemsize * (n_tasks + 2) * 2 + (1 << 20)
    return count * itemsize * 3 + (1 << 20)


def dtype_of(family, job: ChunkJob) -> str:
    if job.kind in ("own",):
        return family.tasks[job.task].dtypes[job.name]
    if job.kind == "file":
        return "U8"
    return family.base.dtypes[job.name]


__all__ = ["ChunkJob", "ChunkResult", "PackSettings", "run_job", "run_shared_job", "job_cost", "mask_context", "dtype_of", "dtype_name"]
