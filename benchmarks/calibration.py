"""Calibration of the data-free rebuild estimate (issue 20): does `rel_error` predict what a task keeps?

For each setting (vision: 8, 14 and 20 tasks of the trained family) every candidate representation is packed with
tallzip's public API (`tallzip.pack(..., keep=rep)`), the estimate pack records per task is read from the manifest,
and each rebuilt task (`tallzip.open(path).load(task)`) is evaluated on its test split: the normalized accuracy
(rebuilt / fine-tuned). The language half reads the gain kept that benchmarks/language measured (branch i20b,
benchmarks/results/language.json) and packs its family here for the estimates.

Reported: Spearman and Pearson correlations of rel_error and cosine with the quality measured; the largest cosine
of a (task, representation) that kept under 95% (the threshold of pack's warning and --keep auto,
tallzip/ops/quality.py POOR_COSINE, must be above it); per setting, whether the default's tasks under 95% are
warned, and what --keep auto picks, keeps and costs.

Usage: python -m benchmarks.accuracy --only calibration [--cache-dir /work/cache/vision-family] [--calibration-tasks 8,14,20]
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

import tallzip

VISION_CONFIGS = (("tall", "sum"), ("tall", "ties"), ("q2", "sum"), ("q3", "sum"), ("q4", "sum"))
KEPT_FLOOR = 0.95


def measure_vision(family, n_tasks: int, work_dir: Path, log=print, configs=VISION_CONFIGS) -> list[dict]:
    """One record per (task, representation, mtv): the estimate pack recorded, the test accuracy kept."""
    tasks = family.tasks[:n_tasks]
    finetuned = family.reference_accuracy("finetuned", "test")
    records = []
    for rep, merge in configs:
        path = work_dir / f"{n_tasks}-{rep}-{merge}.tallzip"
        start = time.perf_counter()
        manifest = tallzip.pack({t: family.task_paths[t] for t in tasks}, family.base_path, path, keep=rep,
                                merge=merge, force=True)
        archive = tallzip.open(path)
        size = path.stat().st_size
        for entry in manifest["tasks"]:
            task = entry["name"]
            acc = family.evaluate(task, archive.load(task), "test")
            records.append({"benchmark": "vision", "tasks": n_tasks, "task": task, "representation": rep,
                            "mtv": merge if rep == "tall" else None, **entry["estimate"],
                            "kept": acc / finetuned[task], "archive_bytes": size})
        archive.close()
        log(f"vision {n_tasks} tasks, {rep} ({merge}): {time.perf_counter() - start:.1f} s, min kept "
            f"{min(r['kept'] for r in records if r['representation'] == rep and r['tasks'] == n_tasks and r['mtv'] in (merge, None)):.3f}")
    return records


LANGUAGE_ROWS = {"tall, sum mtv, default lambda 0.4 (tallzip's default)": ("tall", "sum"),
                 "every task q2": ("q2", "sum"), "every task q3": ("q3", "sum"), "every task q4": ("q4", "sum")}


def language_records(language_json: Path, family_dir: Path | None, work_dir: Path, log=print) -> list[dict]:
    """The language benchmark's quality kept per task and representation (gain kept for the generative tasks,
    normalized accuracy for the classification ones: benchmarks/language on branch i20b), with the estimates
    of archives packed here from its family (its folder recorded in the JSON unless given)."""
    data = json.loads(Path(language_json).read_text())
    family_dir = Path(family_dir or data["family"])
    records = []
    for row in data["rows"]:
        if row["label"] not in LANGUAGE_ROWS:
            continue
        rep, merge = LANGUAGE_ROWS[row["label"]]
        path = work_dir / f"language-{rep}.tallzip"
        manifest = tallzip.pack(family_dir / "tasks", family_dir / "base", path, keep=rep, merge=merge, force=True)
        for entry in manifest["tasks"]:
            records.append({"benchmark": "language", "tasks": len(manifest["tasks"]), "task": entry["name"],
                            "representation": rep, "mtv": merge if rep == "tall" else None, **entry["estimate"],
                            "kept": row["tasks"][entry["name"]]["quality"], "archive_bytes": path.stat().st_size})
        log(f"language {rep}: packed, estimates read")
    return records


def _ranks(values) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    values = np.asarray(values)
    for v in np.unique(values):  # ties share their mean rank
        ranks[values == v] = ranks[values == v].mean()
    return ranks


def correlations(records: list[dict]) -> dict:
    """Pearson and Spearman of rel_error and cosine against the quality kept."""
    kept = np.array([r["kept"] for r in records])
    out = {"n": len(records)}
    for key in ("rel_error", "cosine"):
        x = np.array([r[key] for r in records])
        if len(records) < 3 or x.std() == 0 or kept.std() == 0:
            out[key] = {"pearson": None, "spearman": None}
            continue
        out[key] = {"pearson": round(float(np.corrcoef(x, kept)[0, 1]), 3),
                    "spearman": round(float(np.corrcoef(_ranks(x), _ranks(kept))[0, 1]), 3)}
    return out


def safe_threshold(records: list[dict], floor: float = KEPT_FLOOR) -> dict:
    """The smallest cosine above which every record kept >= floor: just above the largest cosine of a record
    that kept less (the threshold pack's warning and --keep auto use must be at least this)."""
    failing = [r["cosine"] for r in records if r["kept"] < floor]
    return {"largest_failing_cosine": max(failing) if failing else None, "failing": len(failing),
            "smallest_passing_cosine": min((r["cosine"] for r in records if r["kept"] >= floor), default=None)}


def default_check(records: list[dict], min_cosine: float) -> list[str]:
    """Per setting: the default (tall, sum mtv) -- its tasks under 95% and whether each is warned (cosine below
    min_cosine) -- and --keep auto: what it picks, its worst task, its archive bytes against the default's."""
    lines = []
    settings = sorted({(r["benchmark"], r["tasks"]) for r in records})
    for bench, n in settings:
        rs = [r for r in records if (r["benchmark"], r["tasks"]) == (bench, n)]
        tall = [r for r in rs if r["representation"] == "tall" and r["mtv"] == "sum"]
        under = [r for r in tall if r["kept"] < KEPT_FLOOR]
        unwarned = [r["task"] for r in under if r["cosine"] >= min_cosine]
        warned = [r for r in tall if r["cosine"] < min_cosine]
        by_task = {}
        for r in rs:
            if r["mtv"] in (None, "sum"):
                by_task.setdefault(r["task"], {})[r["representation"]] = r
        picks = {t: next((p for p in ("tall", "q2", "q3", "q4") if p in reps and reps[p]["cosine"] >= min_cosine),
                         "exact") for t, reps in by_task.items()}
        kept = [by_task[t][p]["kept"] if p in by_task[t] else 1.0 for t, p in picks.items()]
        reps = sorted(set(picks.values()))
        size = (by_task[next(iter(by_task))][reps[0]]["archive_bytes"] if len(reps) == 1 and reps[0] != "exact"
                else None)
        tall_bytes = tall[0]["archive_bytes"] if tall else None
        lines.append(f"{bench} {n} tasks: default tall: {len(under)} of {len(tall)} tasks under 95% (worst "
                     f"{min(r['kept'] for r in tall):.3f}), {len(warned)} warned, unwarned under 95%: "
                     f"{unwarned or 'none'}; auto: {', '.join(f'{p} x{list(picks.values()).count(p)}' for p in reps)}, "
                     f"worst {min(kept):.3f}"
                     + (f", {size:,} bytes vs tall {tall_bytes:,} ({size / tall_bytes:.2f}x)" if size and tall_bytes
                        else ""))
    return lines


def table(records: list[dict]) -> str:
    lines = ["| benchmark | tasks | representation | mtv | n | rel_error median (max) | kept mean | kept min | "
             "tasks < 95% | rel_error of those (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in records:
        groups.setdefault((r["benchmark"], r["tasks"], r["representation"], r["mtv"] or "-"), []).append(r)
    for (bench, n, rep, mtv), rs in groups.items():
        errs = [r["rel_error"] for r in rs]
        kept = [r["kept"] for r in rs]
        bad = [r["rel_error"] for r in rs if r["kept"] < KEPT_FLOOR]
        lines.append(f"| {bench} | {n} | {rep} | {mtv} | {len(rs)} | {np.median(errs):.3f} ({max(errs):.3f}) | "
                     f"{np.mean(kept):.3f} | {min(kept):.3f} | {len(bad)} | {min(bad) if bad else '-'} |")
    return "\n".join(lines)


def run(cache_dir: Path, task_counts, results_dir: Path, language_json: Path | None = None,
        language_family: Path | None = None, log=print, configs=VISION_CONFIGS, merge_with: Path | None = None) -> dict:
    from benchmarks.family import build_family
    records = []
    with tempfile.TemporaryDirectory(prefix="tallzip-calibration-") as work:
        if task_counts:
            family = build_family(max(task_counts), cache_dir, log=log)
            for n in task_counts:
                records += measure_vision(family, n, Path(work), log, configs)
        if language_json is not None:
            records += language_records(language_json, language_family, Path(work), log)
    if merge_with is not None:  # records of an earlier run (other settings), kept
        records = json.loads(Path(merge_with).read_text())["records"] + records
    report = {"records": records, "correlations": {}, "threshold": {}}
    for bench in sorted({r["benchmark"] for r in records}):
        subset = [r for r in records if r["benchmark"] == bench]
        report["correlations"][bench] = correlations(subset)
        report["threshold"][bench] = safe_threshold(subset)
    report["correlations"]["all"] = correlations(records)
    report["threshold"]["all"] = safe_threshold(records)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "calibration.json").write_text(json.dumps(report, indent=1))
    return report


def estimate_overhead(family_dir: Path, repeats: int = 3) -> dict:
    """Seconds of tallzip.pack (tall, default options) on a family folder (tasks/ and base/) with the estimate and
    without it (the TALL loop asked for no sums, the per-slice function replaced by zeros), interleaved in one
    process; medians."""
    from tallzip.ops import quality
    from tallzip.packing import jobs
    real, real_loop, times = jobs.tall_sums, jobs.masked_tensor_and_sums, {"with": [], "without": []}

    def loop_without(merger, base, tasks, lambdas, device, request, mtv_out=None):  # the TALL loop, no sums
        return real_loop(merger, base, tasks, lambdas, device, None, mtv_out=mtv_out)
    without = (lambda *a, **k: quality.zero_sums(), loop_without)
    with tempfile.TemporaryDirectory(prefix="tallzip-overhead-") as work:
        try:
            for _ in range(repeats):
                for label, (sums, loop) in (("with", (real, real_loop)), ("without", without)):
                    jobs.tall_sums, jobs.masked_tensor_and_sums = sums, loop
                    start = time.perf_counter()
                    tallzip.pack(Path(family_dir) / "tasks", Path(family_dir) / "base", Path(work) / "a.tallz",
                                 force=True)
                    times[label].append(time.perf_counter() - start)
        finally:
            jobs.tall_sums, jobs.masked_tensor_and_sums = real, real_loop
    return {label: {"seconds": [round(t, 2) for t in ts], "median": round(float(np.median(ts)), 2)}
            for label, ts in times.items()}


def main(args) -> int:
    if args.estimate_overhead is not None:
        print(json.dumps(estimate_overhead(args.estimate_overhead)))
        return 0
    counts = [int(n) for n in args.calibration_tasks.split(",") if n]
    configs = tuple(tuple(c.split(":")) if ":" in c else (c, "sum") for c in args.calibration_reps.split(","))
    report = run(args.cache_dir, counts, args.results_dir, args.language_json, args.language_family,
                 log=lambda *a: print(*a, flush=True), configs=configs, merge_with=args.calibration_merge)
    print(table(report["records"]))
    print(json.dumps({"correlations": report["correlations"], "threshold": report["threshold"]}, indent=1))
    from tallzip.ops.quality import POOR_COSINE
    print("\n".join(default_check(report["records"], POOR_COSINE)))
    print(f"wrote {args.results_dir / 'calibration.json'}")
    return 0

