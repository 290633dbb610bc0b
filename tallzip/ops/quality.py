"""A data-free estimate of how well a task is rebuilt (issue 20): computed from the weights alone, chunk by chunk.

For a task t with task vector tau_t = theta_t - theta_0 and rebuilt weights theta^_t (as the archive gives them
back: tall's base + m_t * stored mtv, a q* task's dequantized vector, exact's own bits), over the masked
(mergeable) tensors:

- rel_error = ||theta^_t - theta_t||^2 / ||tau_t||^2: the share of the task vector's energy the rebuild gets
  wrong (0 for exact; 1 for the base itself; above 1 when the rebuild moves away from the task);
- cosine = <theta^_t - theta_0, tau_t> / (||theta^_t - theta_0|| ||tau_t||): whether it points the same way.

Each chunk gives three sums (pairwise, in the weights' compute precision; float64 across chunks) (||tau||^2, ||error||^2, <rebuilt tau, tau>) that add up over chunks in any
order of reading, kept in the chunk order for byte-identical manifests.

Sampled (pack's default, issue 21): each tensor's sums over every SAMPLE_EVERY-th piece of SAMPLE_PIECE elements
(pieces counted from the tensor's first element, the first one taken), each sampled piece summed as np.sum in
float32 (cut where a chunk of the plan ends), the pieces added up in float64, then multiplied by the tensor's
sample_weight (its elements over those sampled) so that every tensor weighs what it does in the full sums; tensors
of at most SAMPLE_FLOOR elements summed whole. Both ratios are ratios of sums, so a sample of the elements
estimates them; benchmarks/estimate_sample.py measures the difference to the full sums on the benchmark families.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tallzip.ops.bits import bit_select
from tallzip.options import DEFAULT_ESTIMATE_EVERY

SUMS = 3  # tau_sq, err_sq, dot
# The sample (benchmarks/RESULTS.md, issue 21 "Session 2: the estimate on a sample"): pieces of the TALL loop's slice
# size, every SAMPLE_EVERY-th of them; a tensor of at most SAMPLE_FLOOR elements (32 pieces) is summed whole.
SAMPLE_PIECE = 1 << 15
SAMPLE_EVERY = DEFAULT_ESTIMATE_EVERY
SAMPLE_FLOOR = 1 << 20
# Calibrated on the vision family (8/14/20 tasks) and two language families (benchmarks/RESULTS.md, "A data-free
# estimate of rebuild quality"): every (task, representation) measured with a cosine above 0.9839 kept >= 95% of
# its gain or accuracy; at 0.9838 one did not (q3 on a language classification task, 93.5%), and tall (cosines
# 0.17-0.75) kept 11-104%. rel_error does not separate them as well (tall's error is the other tasks' vectors,
# ~1.1-2.4 on both benchmarks, harmless on vision 8). 0.99 leaves a margin: pack warns below it; --keep auto picks
# the smallest representation at or above it (q4 on every benchmark family, q3 on some language tasks).
POOR_COSINE = 0.99
# A lowrank task's cosine is set by its energy, not by how well it keeps quality (issue 22, session 3;
# benchmarks/RESULTS.md "The data-free warning on lowrank tasks", benchmarks/lowrank_estimate.py): on the 20-task
# vision family every lowrank task under 95% had a cosine <= 0.9132 and energy >= 0.92 (4-bit) keeps >= 98.3% at
# 0.947-0.963, which 0.99 flagged on every task; on the language family lowrank tasks under 95% reach 0.9856, above
# good ones, so no threshold sorts them there (LOWRANK_NOTE says so once per archive instead).
POOR_COSINE_BY_REPRESENTATION = {"lowrank": 0.92}
LOWRANK_NOTE = ("the rebuild estimate does not vouch for lowrank tasks beyond its threshold (measured: on a language "
                "model, lowrank at energy 0.98 kept 84-107% per task at cosines 0.978-0.984); evaluate them with your "
                "data, or keep the embedding and LM head elementwise (measured there: --lowrank-quant "
                "model.embed_tokens.weight=q2 --lowrank-quant lm_head.weight=3 kept every task >= 99.5%)")


def zero_sums() -> np.ndarray:
    return np.zeros(SUMS, dtype=np.float64)


def as_float_array(tensor) -> np.ndarray:
    """Flat numpy float32 (float64 stays float64) of a torch tensor or array; bfloat16 widened by its bits (torch's
    own conversion stalls on a loaded CPU)."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().reshape(-1).cpu()
        if tensor.dtype == torch.bfloat16:
            bits = tensor.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32)
        if tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        tensor = tensor.numpy()
    array = np.asarray(tensor).reshape(-1)
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even, as torch casts finite values), widened back."""
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def _sum_of_products(a: np.ndarray, b: np.ndarray) -> float:
    """np.sum's pairwise summation (no threads, a fixed order: the same bytes on every machine), in the arrays'
    own precision (float32 pairwise: ~1e-7 relative over a chunk), added up in float64 by the caller."""
    return float(np.sum(a * b))


def rebuild_sums(base, task, rebuilt) -> np.ndarray:
    """[||tau||^2, ||rebuilt - task||^2, <rebuilt - base, tau>] of one chunk (torch tensors or numpy arrays)."""
    b, t, r = as_float_array(base), as_float_array(task), as_float_array(rebuilt)
    tau = t - b
    err = r - t
    return np.array([_sum_of_products(tau, tau), _sum_of_products(err, err), _sum_of_products(r - b, tau)],
                    dtype=np.float64)


# np.sum's pairwise summation (numpy/_core/src/umath/loops_utils.h): a range of more than PAIRWISE_BLOCK elements is
# the sum of its two halves, the first half rounded down to a multiple of 8; below it, a fixed 8-way loop.
PAIRWISE_BLOCK = 128


def pairwise_total(count: int, leaf: int, piece_sums, start: int = 0):
    """piece_sums(lo, hi) over pieces of at most `leaf` elements (>= PAIRWISE_BLOCK), added up as np.sum adds a
    float32 array of `count` elements: each sum bit for bit np.sum of the whole range of products (tested), so a
    loop over cache-sized pieces gives the same sums as one pass over the whole slice. None from every piece: None."""
    if count <= leaf:
        return piece_sums(start, start + count)
    half = count // 2
    half -= half % 8
    left = pairwise_total(half, leaf, piece_sums, start)
    right = pairwise_total(count - half, leaf, piece_sums, start + half)
    return None if left is None else left + right


def tall_piece_sums(base: np.ndarray, tasks: np.ndarray, abs_taus: np.ndarray, masks: np.ndarray, added: np.ndarray,
                    work: np.ndarray) -> np.ndarray:
    """(N, 3) float32: rebuild_sums' three float32 sums, per task, of one piece of tall rebuilds
    r_t = where(m_t, added, base) (added: base + the stored mtv, in the base's precision), from what the TALL rule
    has at hand: base (n,), tasks (N, n) and abs_taus = |tasks - base| (N, n, overwritten) in float32, masks (N, n);
    work (N, n): scratch. The same products as rebuild_sums: |tau|^2 is tau^2; unmasked, r - t = base - task = -tau
    exactly and r - base = 0. The choices are bit-selects (a masked numpy copy is ~20x slower)."""
    sums = np.empty((len(tasks), SUMS), dtype=np.float32)
    np.multiply(abs_taus, abs_taus, out=abs_taus)
    np.sum(abs_taus, axis=1, out=sums[:, 0])
    np.subtract(added, tasks, out=work)
    np.multiply(work, work, out=work)
    mask = torch.from_numpy(masks)
    bit_select(mask, torch.from_numpy(work), torch.from_numpy(abs_taus), in_place=True)
    np.sum(work, axis=1, out=sums[:, 1])
    np.subtract(tasks, base, out=work)
    np.multiply(work, added - base, out=work)
    torch.from_numpy(work.view(np.int32)).mul_(mask)  # unmasked: 0 (its bits cleared: no 0 * inf)
    np.sum(work, axis=1, out=sums[:, 2])
    return sums


def tensor_sample_every(elements: int, every: int = SAMPLE_EVERY, floor: int | None = None) -> int:
    """The sampling step for a tensor of `elements`: 1 (summed whole) up to `floor` (SAMPLE_FLOOR) elements."""
    return every if elements > (SAMPLE_FLOOR if floor is None else floor) else 1


def sample_pieces(offset: int, count: int, every: int):
    """(lo, hi, sampled) over [0, count) of a range starting at element `offset` of its tensor, cut where a
    SAMPLE_PIECE-element piece of the tensor starts; sampled: the piece is every `every`-th (the first included)."""
    lo = 0
    while lo < count:
        piece = (offset + lo) // SAMPLE_PIECE
        hi = min(count, (piece + 1) * SAMPLE_PIECE - offset)
        yield lo, hi, piece % every == 0
        lo = hi


def sampled_elements(elements: int, every: int) -> int:
    """How many of a tensor's `elements` the sample sums (every: its tensor_sample_every)."""
    pieces = -(-elements // SAMPLE_PIECE)
    taken = -(-pieces // every)  # pieces 0, every, 2 every, ...
    last = (taken - 1) * every
    return (taken - 1) * SAMPLE_PIECE + min(SAMPLE_PIECE, elements - last * SAMPLE_PIECE) if elements else 0


def sample_weight(elements: int, every: int) -> float:
    """What a tensor's sampled sums are multiplied by to stand for the whole tensor's (elements / sampled
    elements): without it a sampled tensor would weigh 1/k of one summed whole in the ratios."""
    return 1.0 if every <= 1 or not elements else elements / sampled_elements(elements, every)


def sample_record(every: int, elements, floor: int | None = None) -> dict | None:
    """The manifest's record of a sampled estimate, {"every": k, "fraction": f} (the share of the masked
    tensors' elements summed, 6 significant digits), over tensors of `elements`; None when every element is."""
    total = sum(elements)
    taken = sum(sampled_elements(n, tensor_sample_every(n, every, floor)) for n in elements)
    if every <= 1 or taken >= total:
        return None
    return {"every": every, "fraction": _rounded(taken / total)}


def exact_sums(base, task) -> np.ndarray:
    """The sums of a task kept bit for bit: no error, the rebuilt vector is tau itself."""
    tau = as_float_array(task) - as_float_array(base)
    energy = _sum_of_products(tau, tau)
    return np.array([energy, 0.0, energy], dtype=np.float64)


def estimate(sums, sample: dict | None = None) -> dict | None:
    """{"rel_error", "cosine"} from a task's summed [tau_sq, err_sq, dot] (a task equal to its base: 0 and 1),
    with "sampled": `sample` (sample_record) when the sums are a sample's; None when a sum is not finite
    (weights packed with allow_nonfinite): not recorded."""
    tau_sq, err_sq, dot = (float(x) for x in sums)
    if not all(math.isfinite(x) for x in (tau_sq, err_sq, dot)):
        return None
    made = _estimate(tau_sq, err_sq, dot)
    return made if sample is None else {**made, "sampled": dict(sample)}


def _estimate(tau_sq: float, err_sq: float, dot: float) -> dict:
    if tau_sq <= 0.0:
        return {"rel_error": 0.0, "cosine": 1.0}
    rebuilt_sq = max(err_sq + 2.0 * dot - tau_sq, 0.0)  # ||r||^2 = ||r - tau||^2 + 2<r, tau> - ||tau||^2
    cosine = dot / math.sqrt(rebuilt_sq * tau_sq) if rebuilt_sq > 0.0 else 0.0
    return {"rel_error": _rounded(err_sq / tau_sq), "cosine": _rounded(max(-1.0, min(1.0, cosine)))}


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


def poor_cosine(representation: str | None = None) -> float:
    """The cosine under which a task kept as `representation` is called poor."""
    return POOR_COSINE_BY_REPRESENTATION.get(representation, POOR_COSINE)


def is_poor(task_estimate: dict | None, threshold: float | None = None, representation: str | None = None) -> bool:
    """Whether an estimate says the task may lose more than 5% of its gain (None: not recorded); the threshold is
    the representation's (poor_cosine) unless given."""
    threshold = poor_cosine(representation) if threshold is None else threshold
    return task_estimate is not None and task_estimate["cosine"] < threshold


def poor_tasks(task_entries) -> list[tuple[str, str, dict]]:
    """(name, representation, estimate) of each manifest task entry whose recorded estimate is poor."""
    return [(e["name"], e.get("representation", "tall"), e["estimate"]) for e in task_entries
            if is_poor(e.get("estimate"), representation=e.get("representation", "tall"))]


def warning_line(name: str, representation: str, task_estimate: dict) -> str:
    """The one line pack prints (and --json lists) for a task whose estimate is poor."""
    return (f"task {name}: {representation} rebuild estimate is poor (cosine {task_estimate['cosine']:.3f} < "
            f"{poor_cosine(representation)}, rel_error {task_estimate['rel_error']:.3f}); it may keep under 95% of its "
            f"fine-tuning gain (check it with your data, or use --keep auto / --keep {name}=q4)")


def notes(task_entries) -> list[str]:
    """Lines pack prints once per archive (not per task): LOWRANK_NOTE where some task is kept lowrank and its
    estimate is not already called poor."""
    poor = {name for name, _, _ in poor_tasks(task_entries)}
    lowrank = [e["name"] for e in task_entries if e.get("representation") == "lowrank" and e["name"] not in poor]
    return [f"{len(lowrank)} lowrank task{'s' if len(lowrank) != 1 else ''}: {LOWRANK_NOTE}"] if lowrank else []


def auto_representation(estimates: dict, candidates, threshold: float = POOR_COSINE) -> str:
    """The first of `candidates` (smallest first) whose estimate is not poor, else "exact"."""
    for rep in candidates:
        if estimates.get(rep) is not None and not is_poor(estimates[rep], threshold):
            return rep
    return "exact"


__all__ = ["POOR_COSINE", "POOR_COSINE_BY_REPRESENTATION", "LOWRANK_NOTE", "poor_cosine", "notes", "SUMS", "SAMPLE_PIECE", "SAMPLE_EVERY", "SAMPLE_FLOOR",
           "tensor_sample_every", "sample_pieces", "sampled_elements", "sample_weight", "sample_record", "PAIRWISE_BLOCK", "pairwise_total", "tall_piece_sums", "zero_sums", "as_float_array", "round_to_bfloat16", "rebuild_sums", "exact_sums", "estimate", "is_poor", "poor_tasks", "warning_line",
           "auto_representation"]
