"""Archive size per representation on the demo family (`tallzip demo`'s generator): real packs, one per
`--keep`, with each task's rebuild error against its input. Sizes only; accuracy is benchmarks/accuracy.py's.

    python -m benchmarks.representation_sizes [--tasks 8] [--folder /tmp/reps_bench]

One run on the shared 2-core machine (2026-12-01; sizes are deterministic, the seconds are noise):

    8 tasks, 25.67 MiB of task files
    keep      archive   ratio  bits/param/task  rel L2 (mean) identical  pack s
    tall        4.79M   5.37x            0.840       2.05e-03     0/8     1.1
    q8          8.12M   3.16x            6.300       2.90e-05     0/8     1.1
    q4          4.86M   5.28x            2.223       4.38e-04     0/8     1.4
    q3          4.09M   6.28x            1.247       8.06e-04     0/8     1.4
    q2          4.56M   5.62x            1.668       1.85e-03     0/8     1.4
    exact      21.54M   1.19x           23.316       0.00e+00     8/8     1.3

bits/param/task: the task's own sections over the changed parameters (tall: masks only, the mtv not
counted; the archive column counts everything, base included). The demo family's task vectors are
synthetic (sparse, heavy-tailed), which is why q2 (asymmetric: no exact zero, so its codes spread)
is larger than q3 here; on the real-data family q2-asym was the better of the two
(benchmarks/REPRESENTATIONS.md). Accuracy is not measured here.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import tallzip
from tallzip.demo import make_family
from tallzip.verification.info import summary

KEEPS = ("tall", "q8", "q4", "q3", "q2", "exact")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/reps_bench"))
    args = parser.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    base, tasks_dir = make_family(args.folder, args.tasks, width=128, layers=4, patch=8, image=64, embed=64)
    inputs = sum(p.stat().st_size for p in tasks_dir.iterdir())
    originals = {p.stem: load_file(str(p)) for p in sorted(tasks_dir.iterdir())}
    print(f"{args.tasks} tasks, {inputs / 2**20:.2f} MiB of task files")
    print(f"{'keep':6} {'archive':>10} {'ratio':>7} {'bits/param/task':>16} {'rel L2 (mean)':>14} {'identical':>9} {'pack s':>7}")
    for keep in KEEPS:
        out = args.folder / f"{keep}.tallz"
        begin = time.perf_counter()
        tallzip.pack(tasks_dir, base, out, keep=keep, force=True)
        seconds = time.perf_counter() - begin
        with tallzip.open(out) as arc:
            info = summary(arc)
            rels, identical = [], 0
            for task, original in originals.items():
                got = {n: v.numpy() for n, v in arc.load(task).items()}
                num = sum(float(np.sum((got[n].astype(np.float64) - v.astype(np.float64)) ** 2)) for n, v in original.items())
                den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in original.values())
                rels.append((num / den) ** 0.5)
                identical += all(got[n].tobytes() == v.tobytes() for n, v in original.items())
        bits = np.mean([r["bits_per_param"] for r in info["tasks"].values()])
        print(f"{keep:6} {info['archive_bytes'] / 2**20:9.2f}M {info['ratio_vs_tasks']:6.2f}x {bits:16.3f} "
              f"{np.mean(rels):14.2e} {identical:>5}/{len(originals)} {seconds:7.1f}")
    shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
