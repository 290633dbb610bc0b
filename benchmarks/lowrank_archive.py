"""Real `lowrank` archives of the vision benchmark's family (issue 22, session 2): bytes on disk and accuracy.

For each low-rank setting (LowRankOptions) and N in --tasks, packs the first N tasks of the cached family with
`keep="lowrank"`, self-contained and with `--base-ref`, and records the bytes on disk; the tasks of the largest
archive are loaded back (Archive.load) and evaluated on the test split with the accuracy benchmark's `evaluate`
(normalized = test accuracy / the fine-tuned model's). A lowrank task is coded on its own, so its sections are the
same bytes in every N (checked: the same chunk digests), and its accuracy is measured once. Also: every task q2
packed the same way (the reference), and the codes streams re-coded with the other codecs (their bytes).

Usage: python -m benchmarks.lowrank_archive --cache-dir /work/cache/vision-family [--tasks 8 14 20]
Writes benchmarks/results/lowrank_archive.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import tallzip
from tallzip.formats import codecs
from tallzip.options import LowRankOptions, StoreOptions

from benchmarks.accuracy import Bench
from benchmarks.data import TASKS
from benchmarks.family import Family

HERE = Path(__file__).resolve().parent
VAL_FLOOR = 0.995  # of the fine-tuned val accuracy (250 images: 0.4% an image)
GOAL = {"ratio": 12.0, "normalized": 0.995, "min_task": 0.99}
CONV = (("conv1.weight", 3),)
SETTINGS = [
    ("lowrank e0.95, 4-bit factors", LowRankOptions()),
    ("lowrank e0.95, 4-bit; conv1 q3", LowRankOptions(quant_tensors=CONV)),
    ("lowrank e0.92, 4-bit factors", LowRankOptions(energy=0.92)),
    ("lowrank e0.92, 4-bit; conv1 q3", LowRankOptions(energy=0.92, quant_tensors=CONV)),
    ("lowrank e0.95, 4-bit; conv1 q3; --float-codec planes+ans", LowRankOptions(quant_tensors=CONV),
     {"codecs": {"float": "planes+ans"}}),
    ("lowrank e0.94, 4-bit; conv1 q3", LowRankOptions(energy=0.94, quant_tensors=CONV)),
    ("lowrank e0.93, 4-bit; conv1 q3", LowRankOptions(energy=0.93, quant_tensors=CONV)),
    ("lowrank e0.93, 4-bit; conv1 q3; --float-codec planes+ans", LowRankOptions(energy=0.93, quant_tensors=CONV),
     {"codecs": {"float": "planes+ans"}}),
    ("every task q1 (sign + bf16 mean |tau| per 128)", LowRankOptions(), {"keep": "q1"}),
]


def _packed(bench: Bench, work: Path, options) -> Path:
    path = work / "val-choice.tallz"
    tallzip.pack(bench.task_paths, bench.base_path, path, StoreOptions(keep="lowrank", lowrank=options), force=True)
    return path


def pack(bench: Bench, tasks, path: Path, **store) -> dict:
    tallzip.pack({t: bench.task_paths[t] for t in tasks}, bench.base_path, path, StoreOptions(**store), force=True)
    with tallzip.open(path) as arc:
        manifest = arc.manifest
    sections = manifest["sections"]
    return {"bytes": os.path.getsize(path), "sections": len(sections),
            "section_bytes": sum(s["length"] for s in sections),
            "base_bytes": sum(s["length"] for s in sections if s["role"] == "base"),
            "roles": {r: sum(s["length"] for s in sections if s["role"] == r) for r in {s["role"] for s in sections}},
            "digests": {s["task"]: [c["blake3"] for c in s["chunks"]] for s in sections if s["role"] == "lrcodes"},
            "records": {t["name"]: t.get("lowrank", {}).get("tensors") or [] for t in manifest["tasks"]},
            "estimates": {t["name"]: t.get("estimate") for t in manifest["tasks"]}}


def other_codecs(path: Path) -> dict:
    """Bytes of every task's lrcodes stream coded by each codec that can carry I8 codes (level 1 and 19)."""
    out = {}
    with tallzip.open(path) as arc:
        for entry in [s for s in arc.manifest["sections"] if s["role"] == "lrcodes"]:
            raw = arc.reader.read(entry)
            for codec, level in (("planes+ans", 1), ("zstd", 1), ("zstd", 19), ("planes+zstd", 19), ("raw", 1)):
                key = f"{codec} L{level}"
                out[key] = out.get(key, 0) + len(codecs.encode(codec, raw, level=level)[0])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 14, 20])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", type=int, nargs="+", default=list(range(len(SETTINGS))))
    parser.add_argument("--val-choice", action="store_true",
                        help="also: e0.92 + conv1 q3, each task raised to e0.95 where its val accuracy falls under VAL_FLOOR")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lowrank_archive.json")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.lowrank_archive " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"$ {command}", flush=True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    n_max = max(args.tasks)
    family = Family(args.cache_dir, [task.name for task in TASKS[:n_max]])
    results = {"command": command, "goal": GOAL, "rows": [], "codecs": {}}
    with tempfile.TemporaryDirectory(prefix="tallzip-lowrank-") as work:
        work = Path(work)
        bench = Bench(family, work, log=lambda *a: None)
        ft = bench.finetuned["test"]
        files = {t: os.path.getsize(bench.task_paths[t]) for t in bench.tasks}
        print(f"{len(bench.tasks)} tasks, fine-tuned test accuracy measured", flush=True)
        for n in args.tasks:
            q2 = pack(bench, bench.tasks[:n], work / f"q2-{n}.tallz", keep="q2")
            q2_ref = pack(bench, bench.tasks[:n], work / f"q2-{n}-ref.tallz", keep="q2", base_ref=True)
            inputs = sum(files[t] for t in bench.tasks[:n])
            results["rows"].append({"label": "every task q2 (real archive)", "tasks": n, "bytes": q2["bytes"],
                                    "ref_bytes": q2_ref["bytes"], "self_contained": inputs / q2["bytes"],
                                    "base_ref": inputs / q2_ref["bytes"], "sections": q2["sections"]})
            print(f"N={n} q2: {q2['bytes']:,} B {inputs / q2['bytes']:.2f}x, --base-ref {inputs / q2_ref['bytes']:.2f}x",
                  flush=True)
        def measure(index, label, options, extra, energies=()):
            """Pack, evaluate and record one setting; energies: (task, energy) pairs (those among the N packed)."""
            packs = {}
            for n in args.tasks:
                path = work / f"lr{index}-{n}.tallz"
                extra = {"keep": "lowrank", **extra}
                mine = replace(options, task_energy=tuple(p for p in energies if p[0] in bench.tasks[:n]))
                packs[n] = pack(bench, bench.tasks[:n], path, lowrank=mine, **extra)
                packs[n]["ref"] = pack(bench, bench.tasks[:n], work / f"lr{index}-{n}-ref.tallz", lowrank=mine,
                                       base_ref=True, **extra)
                if n == n_max and index == 0:
                    results["codecs"] = other_codecs(path)
            for n in args.tasks:  # a task's sections do not depend on the others
                assert all(packs[n]["digests"].get(t) == packs[n_max]["digests"].get(t) for t in bench.tasks[:n])
            test, seconds = {}, time.perf_counter()
            with tallzip.open(work / f"lr{index}-{n_max}.tallz") as arc:
                for task in bench.tasks:
                    test[task] = family.evaluate(task, arc.load(task), "test")
            seconds = time.perf_counter() - seconds
            for n in args.tasks:
                tasks = bench.tasks[:n]
                inputs = sum(files[t] for t in tasks)
                norm = {t: test[t] / ft[t] for t in tasks}
                p = packs[n]
                params = sum(v.numel() for v in bench.base_state.values())
                payload = sum(p["roles"].get(r, 0) for r in ("lrcodes", "lrscales", "qcodes", "qscales"))
                ranks = [r[1] for t in tasks for r in p["records"][t] if r[1]]
                row = {"label": label, "tasks": n, "bytes": p["bytes"], "ref_bytes": p["ref"]["bytes"],
                       "self_contained": inputs / p["bytes"], "base_ref": inputs / p["ref"]["bytes"],
                       "base_bytes": p["base_bytes"], "payload_bytes": payload,
                       "manifest_bytes": p["bytes"] - p["section_bytes"] - 72, "sections": p["sections"],
                       "payload_bits_per_weight_per_task": 8 * payload / n / params,
                       "archive_bits_per_weight_per_task": 8 * (p["bytes"] - p["base_bytes"]) / n / params,
                       "normalized": statistics.mean(norm.values()), "min_task": min(norm.values()),
                       "worst": min(norm, key=norm.get), "tasks_under_99": sorted(t for t in tasks if norm[t] < 0.99),
                       "per_task": norm, "median_rank": statistics.median(ranks) if ranks else 0,
                       "estimate_cosine": {t: (p["estimates"][t] or {}).get("cosine") for t in tasks},
                       "eval_seconds": round(seconds, 1)}
                row["meets_goal"] = (row["self_contained"] >= GOAL["ratio"] and row["normalized"] >= GOAL["normalized"]
                                     and row["min_task"] >= GOAL["min_task"])
                results["rows"].append(row)
                print(f"N={n} {label}: {p['bytes']:,} B {row['self_contained']:.2f}x, --base-ref {row['base_ref']:.2f}x, "
                      f"{row['archive_bits_per_weight_per_task']:.3f} b/w/task (payload {row['payload_bits_per_weight_per_task']:.3f}), "
                      f"manifest {row['manifest_bytes']:,} B, {row['normalized']:.2%} (min {row['min_task']:.2%} "
                      f"{row['worst']}), goal {'MET' if row['meets_goal'] else 'not met'}", flush=True)

        for index in args.settings:
            label, options, *extra = SETTINGS[index]
            measure(index, label, options, extra[0] if extra else {})
        if args.val_choice:
            # per task on val: e0.92 + conv1 q3 where it keeps >= VAL_FLOOR of the fine-tuned val accuracy, else e0.95
            options = SETTINGS[3][1]
            with tallzip.open(_packed(bench, work, options)) as arc:
                val = {t: family.evaluate(t, arc.load(t), "val") / bench.finetuned["val"][t] for t in bench.tasks}
            raised = tuple((t, 0.95) for t in bench.tasks if val[t] < VAL_FLOOR)
            results["val_choice"] = {"val_normalized": val, "raised_to_0.95": [t for t, _ in raised], "floor": VAL_FLOOR}
            print(f"on val, under {VAL_FLOOR:.1%} at e0.92: {[t for t, _ in raised]}", flush=True)
            measure(len(SETTINGS), f"lowrank e0.92 (e0.95 where val < {VAL_FLOOR:.1%}: {len(raised)} tasks), 4-bit; "
                                   f"conv1 q3", options, {}, raised)
    results["elapsed_seconds"] = round(time.perf_counter() - start)
    print(f"codes streams of the {n_max}-task e0.95 archive by codec: {results['codecs']}")
    print(f"elapsed {results['elapsed_seconds']} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
