"""`keep="auto"` (`pack --keep auto`): each task's representation chosen from the data-free estimate alone.

One pass over the mergeable tensors, chunk by chunk (as pack reads them): for every task the estimate
(ops/quality.py) of tall (base + mask * the stored mtv, with the mtv and lambdas pack will use) and of each
quantized candidate; then per task the smallest candidate whose estimate is not poor (quality.POOR_COSINE),
else exact. No evaluation and no data: benchmarks/RESULTS.md ("A data-free estimate of rebuild quality")
measures what it keeps.
"""
from __future__ import annotations

from tallzip.formats.container.chunking import chunk_plan, chunk_shape
from tallzip.ops import quality
from tallzip.ops.representations import quantized_rebuild
from tallzip.ops.taskvec import as_compute, stored_mtv
from tallzip.ops.tall import masked_tensor
from tallzip.packing.jobs import tall_sums

AUTO = "auto"
AUTO_CANDIDATES = ("tall", "q2", "q3", "q4", "q8")  # smallest first; exact when none is good enough


def candidate_estimates(family, merger, lambdas: dict, mtv_dtype: str, chunk_elements: int, device,
                        candidates=AUTO_CANDIDATES, progress=None) -> dict:
    """{task: {rep: estimate}} for every candidate, from one chunked pass over the inputs."""
    names = family.names
    sums = {t: {rep: quality.zero_sums() for rep in candidates} for t in names}
    mergeable = [n for n in family.base.names if family.is_mergeable(n)]
    for i, name in enumerate(mergeable):
        shape = tuple(family.base.shapes[name])
        for start, count in chunk_plan(shape, chunk_elements):
            base = family.base.read_range(name, start, count)
            tasks = [family.tasks[t].read_range(name, start, count) for t in names]
            if "tall" in candidates:
                mtv, packed, _ = masked_tensor(merger, base, tasks, [lambdas[t] for t in names], device)
                stored = as_compute(stored_mtv(mtv.reshape(-1), mtv_dtype))
                for t, task, bits in zip(names, tasks, packed):
                    sums[t]["tall"] += tall_sums(base, task, stored, bits, count)
            layout = chunk_shape(shape, start, count)
            for rep in candidates:
                if rep != "tall":
                    for t, task in zip(names, tasks):
                        sums[t][rep] += quality.rebuild_sums(base, task, quantized_rebuild(base, task, layout, rep))
        if progress:
            progress("estimating representations", i + 1, len(mergeable))
    return {t: {rep: quality.estimate(s) for rep, s in reps.items()} for t, reps in sums.items()}


def auto_choice(estimates: dict, candidates=AUTO_CANDIDATES) -> dict:
    """{task: representation}: the first candidate whose estimate is not poor, else exact."""
    return {t: quality.auto_representation(reps, candidates) for t, reps in estimates.items()}


__all__ = ["AUTO", "AUTO_CANDIDATES", "candidate_estimates", "auto_choice"]
