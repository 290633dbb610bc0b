"""THE TALL rule, m_t = |base - task| > lambda * |(base + mtv) - task| (strict, float32 or float64), in its
three forms side by side, bit for bit the same result:

- `tall_mask`: the formula on torch tensors (the reference every other form is tested against);
- `sum_and_masks_into`: the sum merge's mtv and every task's mask of one slice, in numpy, into given outputs;
- `masked_tensor`: one whole tensor's mtv and bit-packed masks, streamed slice by slice on a CPU (cache-sized
  slices) or in one pass on a GPU; `masked_tensor_and_sums` the same, adding up the data-free estimate of every
  task's rebuild (ops/quality.py) in the same slices while they are in the caches; what pack's chunk jobs call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tallzip.ops import quality, taskvec
from tallzip.ops.bits import pack_bits
from tallzip.ops.taskvec import as_compute


def tall_mask(base: torch.Tensor, finetuned: torch.Tensor, mtv: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |theta_0 - theta_t| > lambda * |(theta_0 + mtv) - theta_t| (strict, as the authors' code)."""
    base_c, task_c = as_compute(base), as_compute(finetuned)
    own = (base_c - task_c).abs()
    others = ((base_c + mtv) - task_c).abs()
    return own > others * lam


def sum_and_masks_into(base, tasks, lambdas, mtv, masks, taus, others):
    """sum_task_vectors and tall_mask of one slice, on numpy float arrays, into the given outputs.

    base: (n,) in the compute dtype; tasks: (N, n); lambdas: (N, 1) in the compute dtype; mtv (out):
    (n,), the sum in task order; masks (out): (N, n) bool; taus (N, n), others (N + 1, n): work. The
    same operations in the same order as the torch formulas (taskvec.sum_task_vectors, tall_mask), so bit for bit their result,
    in a few numpy calls for all tasks at once (numpy's comparison loop alone is ~5x faster than
    torch's on one CPU thread). NaN/Inf give numpy warnings: call under np.errstate(all="ignore").
    """
    np.subtract(tasks, base, out=taus)
    if len(taus) == 1:
        mtv[...] = taus[0]
    else:  # (t0 - base) + (t1 - base) + ..., left to right
        np.add(taus[0], taus[1], out=mtv)
        for tau in taus[2:]:
            np.add(mtv, tau, out=mtv)
    # mask = |base - task| > lambda * |(base + mtv) - task|; |base - task| is exactly |task - base|
    plus = np.add(base, mtv, out=others[-1])
    others = others[:-1]
    np.subtract(plus, tasks, out=others)
    np.abs(others, out=others)
    np.multiply(others, lambdas, out=others)
    np.abs(taus, out=taus)
    np.greater(taus, others, out=masks)

# --- one tensor, streamed: mtv, masks and bit-packing ----------------------------------------------

CPU_CHUNK = 1 << 15  # elements: the slices of all inputs stay in the CPU's caches between their uses


@dataclass(frozen=True)
class EstimateRequest:
    """Ask masked_tensor_and_sums for the rebuild's sums (ops/quality.py) of every task, as an archive storing the
    mtv at `mtv_dtype` rebuilds it (base + mask * stored mtv, in the base's dtype). every > 1: only every
    `every`-th piece of the tensor (quality.sample_pieces; the slice starts at element `offset` of its tensor)."""
    mtv_dtype: str
    every: int = 1
    offset: int = 0


def masked_tensor_and_sums(merger, base: torch.Tensor, tasks: list, lambdas: list, device: torch.device,
                           estimate: EstimateRequest | None, mtv_out=None):
    """masked_tensor's (mtv, packed masks, ones), and an (N, 3) float32 array of every task's tall rebuild sums,
    each bit for bit quality.rebuild_sums of the whole tensor (np.sum's pairwise order, kept piece by piece);
    sampled (estimate.every > 1), float64 sums of np.sum's of the sampled pieces (quality.sample_pieces).
    The sums are None where this loop does not compute them (a GPU, TIES, float64 or float16 weights, a float16
    mtv) and without `estimate`: the caller sums the rebuild itself."""
    fused = (estimate is not None and device.type == "cpu" and merger.method == "sum" and estimate.mtv_dtype in ("bfloat16", "float32")
             and base.dtype in (torch.float32, torch.bfloat16)
             and all(taskvec.compute_dtype(t.dtype) == torch.float32 for t in tasks))
    if not fused:
        return (*masked_tensor(merger, base, tasks, lambdas, device, mtv_out), None)
    return _summed_masks_cpu(base, tasks, lambdas, torch.float32, mtv_out, estimate)


def masked_tensor(merger, base: torch.Tensor, tasks: list, lambdas: list, device: torch.device, mtv_out=None):
    """The mtv of one tensor (compute dtype, on the CPU) and every task's mask, bit-packed (numpy
    uint8, little bit order), with each mask's count of ones. `mtv_out`: a flat CPU tensor of the
    compute dtype to write the mtv into (it is then returned, shaped as the base).

    Bit for bit what taskvec.sum_task_vectors / ties_merge and tall_mask give, computed
    with fewer passes over memory: (base + mtv) once per tensor rather than once per task, and on a
    CPU slice by slice so that every input is read from memory once.
    """
    compute = taskvec.compute_dtype(base.dtype)
    if any(taskvec.compute_dtype(t.dtype) != compute for t in tasks):  # mixed float64: the plain formulas
        base_c = base.to(device)
        tasks_d = [t.to(device) for t in tasks]
        mtv = merger.mtv(base_c, tasks_d)
        masks = [tall_mask(base_c, t, mtv, lam) for t, lam in zip(tasks_d, lambdas)]
        return _finish_masks(_into(mtv, mtv_out), masks)
    if device.type == "cpu" and merger.method == "sum":
        return _summed_masks_cpu(base, tasks, lambdas, compute, mtv_out)
    count = base.numel()
    if device.type == "cpu":
        chunk = CPU_CHUNK
        flat_base, flat_tasks = base.reshape(-1), [t.reshape(-1) for t in tasks]
    else:  # one slice: the whole tensor, copied to the GPU asynchronously from pinned memory
        chunk = max(count, 1)
        flat_base = base.reshape(-1).to(device, non_blocking=True)
        flat_tasks = [t.reshape(-1).to(device, non_blocking=True) for t in tasks]
    mtv = torch.empty(count, dtype=compute, device=device)
    masks = [torch.empty(count, dtype=torch.bool, device=device) for _ in tasks]
    size = min(chunk, count)
    own, others, plus = (torch.empty(size, dtype=compute, device=device) for _ in range(3))
    # Summing, keep each task vector: |base - task| is exactly |task - base|, so the masks reuse them.
    taus = [torch.empty(size, dtype=compute, device=device) for _ in tasks] if merger.method == "sum" else None
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        n = stop - start
        base_c = flat_base[start:stop].to(compute)
        tasks_c = [t[start:stop].to(compute) for t in flat_tasks]
        mtv_c = mtv[start:stop]
        if taus is not None:  # mtv = (t0 - base) + (t1 - base) + ..., in task order, as sum_task_vectors
            for task_c, tau in zip(tasks_c, taus):
                torch.sub(task_c, base_c, out=tau[:n])
            mtv_c.copy_(taus[0][:n])
            for tau in taus[1:]:
                mtv_c.add_(tau[:n])
        else:
            mtv_c.copy_(merger.mtv(base_c, tasks_c))
        torch.add(base_c, mtv_c, out=plus[:n])
        for j, (task_c, lam, mask) in enumerate(zip(tasks_c, lambdas, masks)):
            # mask = |base - task| > lambda * |(base + mtv) - task|, as tall_mask
            own_j = taus[j][:n].abs_() if taus is not None else torch.sub(base_c, task_c, out=own[:n]).abs_()
            torch.sub(plus[:n], task_c, out=others[:n]).abs_().mul_(lam)
            torch.gt(own_j, others[:n], out=mask[start:stop])
    return _finish_masks(_into(mtv, mtv_out).view(base.shape), [m.view(base.shape) for m in masks])


def _into(mtv: torch.Tensor, out):
    if out is None:
        return mtv
    out.copy_(mtv.reshape(-1))
    return out


def _summed_masks_cpu(base, tasks, lambdas, compute, mtv_out, estimate: EstimateRequest | None = None):
    """The sum merge's mtv and masks on a CPU, in numpy (sum_and_masks_into): the inputs
    widened slice by slice into reused scratch, exactly (bfloat16 by shifting its bits, float16 by
    numpy's conversion), so the loop holds the GIL only for a few numpy calls per slice. With `estimate`
    (float32 compute), also every task's rebuild sums from the same slices, which then follow np.sum's
    pairwise split (quality.pairwise_total) so the sums are np.sum's of the whole tensor, or, sampled, are
    summed on the sampled pieces alone (the others only masked)."""
    count, n_tasks = base.numel(), len(tasks)
    mtv = torch.empty(count, dtype=compute) if mtv_out is None else mtv_out.reshape(-1)
    dtype = np.float64 if compute == torch.float64 else np.float32
    masks = np.empty((n_tasks, count), dtype=bool)
    leaf = CPU_CHUNK if estimate is None else max(CPU_CHUNK, quality.PAIRWISE_BLOCK, quality.SAMPLE_PIECE)
    size = max(1, min(leaf, count))
    wide = np.empty((n_tasks + 1, size), dtype=dtype)  # base, then each task
    taus, others = np.empty((n_tasks, size), dtype=dtype), np.empty((n_tasks + 1, size), dtype=dtype)
    lams = np.array(lambdas, dtype=dtype).reshape(-1, 1)
    sources = [_widenable(t) for t in (base, *tasks)]
    mtv_np = mtv.numpy()
    rebuilt_bf16 = base.dtype == torch.bfloat16

    def piece(start, stop, summed=True):
        n = stop - start
        for row, (kind, source) in zip(wide, sources):
            _widen(kind, source[start:stop], row[:n])
        sum_and_masks_into(wide[0, :n], wide[1:, :n], lams, mtv_np[start:stop], masks[:, start:stop],
                           taus[:, :n], others[:, :n])
        if estimate is None or not summed:
            return None
        stored = mtv_np[start:stop]
        if estimate.mtv_dtype == "bfloat16":
            stored = quality.round_to_bfloat16(stored)
        added = np.add(wide[0, :n], stored, out=others[-1, :n])  # as taskvec.rebuild: in float32, cast to the base
        if rebuilt_bf16:
            added = quality.round_to_bfloat16(added)
        return quality.tall_piece_sums(wide[0, :n], wide[1:, :n], taus[:, :n], masks[:, start:stop], added,
                                       others[:-1, :n])

    with np.errstate(all="ignore"):  # NaN/Inf inputs are refused by the caller (pack_jobs), not warned about
        if estimate is not None and estimate.every > 1:
            sums = np.zeros((n_tasks, quality.SUMS), dtype=np.float64)
            for lo, hi, sampled in quality.sample_pieces(estimate.offset, count, estimate.every):
                if sampled:
                    sums += piece(lo, hi)
                else:
                    piece(lo, hi, summed=False)
        elif estimate is not None:
            sums = quality.pairwise_total(count, leaf, piece)
        else:
            sums = None
            for start in range(0, count, size):
                piece(start, min(count, start + size))
    packed = [np.packbits(m, bitorder="little") for m in masks]
    made = mtv.view(base.shape), packed, [int(np.count_nonzero(m)) for m in masks]
    return made if estimate is None else (*made, sums)


def _widenable(tensor: torch.Tensor):
    """(how to widen, flat numpy view): bfloat16 as its uint16 bits, float16/32/64 as themselves."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return "bf16", flat.view(torch.int16).numpy().view(np.uint16)
    return "float", flat.numpy()


def _widen(kind, source, out):
    if kind == "bf16":  # a bfloat16 is the top half of the float32 of the same value
        np.left_shift(source, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = source


def _finish_masks(mtv, masks):
    """Bit-pack the masks where they are, then bring everything to the CPU with one wait."""
    if mtv.device.type == "cpu":
        packed = [pack_bits(m).numpy() for m in masks]
        return mtv, packed, [int(np.count_nonzero(m.numpy())) for m in masks]
    ones = torch.stack([m.sum() for m in masks]).to("cpu", non_blocking=True)
    packed = []
    for mask in masks:
        bits = pack_bits(mask)
        host = torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True)
        packed.append(host.copy_(bits, non_blocking=True))
    mtv_host = torch.empty(mtv.shape, dtype=mtv.dtype, pin_memory=True).copy_(mtv, non_blocking=True)
    torch.cuda.current_stream(mtv.device).synchronize()
    return mtv_host, [p.numpy() for p in packed], ones.tolist()
