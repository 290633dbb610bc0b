"""The data-free estimate on a sample of pieces (issue 21) against the full sums, on real families: for each
sampling step k, the largest |difference| of cosine and rel_error over the tall tasks, and the warnings that flip.

One pass computes every SAMPLE_PIECE-element piece's sums (as the sampled loop sums them: np.sum of the piece) and
every slice's full sums (as pack sums them), with pack's defaults (sum merge, lambda 0.4, bfloat16 mtv); every k is
then a selection of pieces, weighted as pack weighs them (tensors of at most quality.SAMPLE_FLOOR elements whole).

    python -m benchmarks.estimate_sample --family-dir /work/cache/vision-family \\
        --tasks-in finetuned --base base.safetensors --every 2 4 8 16 32
    python -m benchmarks.estimate_sample --family-dir /work/cache/language/cpu-05773139c9 [--floor 0]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from tallzip.family import Family
from tallzip.ops import quality
from tallzip.ops.tall import EstimateRequest, masked_tensor_and_sums
from tallzip.ops.ties import MtvMerger
from tallzip.options import DEFAULT_LAMBDA, DEFAULT_MTV_DTYPE, DEFAULT_TIES_DENSITY
from tallzip.packing.jobs import SLICE
from tallzip.run.chunks import checked_chunk_elements, chunk_plan


def tensor_sums(family, merger, name: str, lambdas, mtv_dtype: str, chunk_elements: int):
    """(full (N, 3) float64 as pack adds it, [(piece index, (N, 3) float64)]) of one mergeable tensor."""
    tasks = [family.tasks[t] for t in family.names]
    full, pieces = np.zeros((len(tasks), quality.SUMS)), {}
    cpu = torch.device("cpu")
    for start, count in chunk_plan(tuple(family.base.shapes[name]), chunk_elements):
        base = family.base.read_range(name, start, count).reshape(-1)
        task_c = [t.read_range(name, start, count).reshape(-1) for t in tasks]
        for s in range(0, count, SLICE):
            m = min(SLICE, count - s)
            args = (merger, base[s:s + m], [t[s:s + m] for t in task_c], lambdas, cpu)
            full += masked_tensor_and_sums(*args, EstimateRequest(mtv_dtype, 1, start + s))[3].astype(np.float64)
            for lo, hi, _ in quality.sample_pieces(start + s, m, 1):
                sub = (merger, base[s + lo:s + hi], [t[s + lo:s + hi] for t in task_c], lambdas, cpu)
                index = (start + s + lo) // quality.SAMPLE_PIECE
                got = masked_tensor_and_sums(*sub, EstimateRequest(mtv_dtype, 1, start + s + lo))[3]
                pieces[index] = pieces.get(index, 0) + got.astype(np.float64)
    return full, pieces


def compare(family_dir: Path, tasks_in: str, base_name: str, steps, floor: int | None = None,
            chunk_elements=None) -> dict:
    family = Family.open(family_dir / tasks_in, family_dir / base_name)
    names = family.names
    lambdas = [DEFAULT_LAMBDA] * len(names)
    merger = MtvMerger(family, "sum", DEFAULT_TIES_DENSITY, torch.device("cpu"), None)
    chunk_elements = checked_chunk_elements(chunk_elements)
    mergeable = [n for n in family.base.names if family.is_mergeable(n)]
    full = np.zeros((len(names), quality.SUMS))
    sampled = {k: np.zeros((len(names), quality.SUMS)) for k in steps}
    elements = []
    for name in mergeable:
        count = math.prod(family.base.shapes[name])
        elements.append(count)
        tensor_full, pieces = tensor_sums(family, merger, name, lambdas, DEFAULT_MTV_DTYPE, chunk_elements)
        full += tensor_full
        for k in steps:
            every = quality.tensor_sample_every(count, k, floor)
            sampled[k] += tensor_full if every == 1 else (sum(v for i, v in pieces.items() if i % every == 0)
                                                          * quality.sample_weight(count, every))
    reference = {t: quality.estimate(full[j]) for j, t in enumerate(names)}
    rows = []
    for k in steps:
        got = {t: quality.estimate(sampled[k][j]) for j, t in enumerate(names)}
        rows.append({
            "every": k, "sampled": quality.sample_record(k, elements, floor),
            "max_cosine_diff": max(abs(got[t]["cosine"] - reference[t]["cosine"]) for t in names),
            "max_rel_error_diff": max(abs(got[t]["rel_error"] - reference[t]["rel_error"]) for t in names),
            "max_rel_error_rel_diff": max(abs(got[t]["rel_error"] / reference[t]["rel_error"] - 1)
                                          for t in names if reference[t]["rel_error"] > 0),
            "flips": [t for t in names if quality.is_poor(got[t], representation="tall")
                      != quality.is_poor(reference[t], representation="tall")],
            "estimates": got})
    return {"family": str(family_dir), "tasks": len(names), "elements": sum(elements),
            "floor": quality.SAMPLE_FLOOR if floor is None else floor,
            "full": reference, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family-dir", type=Path, required=True)
    parser.add_argument("--tasks-in", default="tasks", help="the tasks' folder inside it")
    parser.add_argument("--base", default="base", help="the base inside it")
    parser.add_argument("--every", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--floor", type=int, default=quality.SAMPLE_FLOOR,
                        help="tensors of at most this many elements summed whole (default: pack's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = compare(args.family_dir, args.tasks_in, args.base, args.every, args.floor)
    cosines = [e["cosine"] for e in result["full"].values()]
    print(f"{result['family']}: {result['tasks']} tasks, {result['elements']:,} masked elements (floor "
          f"{result['floor']:,}); full cosines "
          f"{min(cosines):.4f}-{max(cosines):.4f}, poor (tall, < {quality.poor_cosine('tall')}): "
          f"{sum(quality.is_poor(e, representation='tall') for e in result['full'].values())}")
    print("every  fraction  max|d cosine|  max|d rel_error|  max rel d(rel_error)  flips")
    for row in result["rows"]:
        fraction = row["sampled"]["fraction"] if row["sampled"] else 1.0
        print(f"{row['every']:5d}  {fraction:8.4f}  {row['max_cosine_diff']:13.2e}  {row['max_rel_error_diff']:16.2e}  "
              f"{row['max_rel_error_rel_diff']:20.2e}  {row['flips'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
