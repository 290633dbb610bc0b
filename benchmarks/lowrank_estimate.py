"""Does pack's data-free estimate (tallzip/ops/quality.py: cosine, rel_error) say how well a `lowrank` task keeps
its quality? (issue 22, session 3). Joins, per (point, task), the estimate and the measured test quality:

- vision (benchmarks.lowbit's low-rank and q* points on the 20-task family): the test accuracies are the ones in
  benchmarks.lowbit's store (--vision-store); the estimate is computed here from the same deterministic encoding
  (quality.rebuild_sums over every float tensor, as pack sums the tensors it rebuilds), normalized by the
  fine-tuned model's test accuracy, evaluated here;
- language (benchmarks.language.lowbit's points on the 8-task family): cosine, rel L2 and quality as that store
  (--language-store) holds them (its cosine is the same formula; rel_error = rel L2 squared).

Then, per representation kind, how a cosine threshold sorts the tasks: "poor" = quality under 95% (the warning's
claim: "it may keep under 95% of its fine-tuning gain"); for each threshold the poor tasks it misses and the good
ones it flags.

Usage: python -m benchmarks.lowrank_estimate --cache-dir /work/cache/vision-family
Writes benchmarks/results/lowrank_estimate.json; the vision estimates are kept in --work (resumable).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tallzip.ops import quality

from benchmarks import lowbit as vision
from benchmarks.data import TASKS
from benchmarks.family import Family

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "lowrank_estimate.json"
VISION_STORE = Path("/work/cache/i22-lowbit/store.json")
LANGUAGE_STORE = Path("/work/cache/i22l/lowbit-language/store.json")
WORK = Path("/work/cache/i22g/estimate")
POOR = 0.95
THRESHOLDS = (0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99)


def kind_of(label: str) -> str | None:
    """The representation a point's label names: lowrank (factors, maybe some tensors q*), q (q2..q8), q1, or None."""
    if label.startswith("low-rank") and "residual" not in label:
        return "lowrank"
    if label.startswith(("q2 ", "q3 ", "q4 ", "q8 ")) and "ternary" not in label:
        return "q"
    if label.startswith("q1 ") and "residual" not in label:
        return "q1"
    return None


def vision_points(cache_dir: Path, store: dict, work: Path, log) -> list[dict]:
    """(label, kind, task, cosine, rel_error, quality) of every vision point of a known kind in the store."""
    cached_path = work / "vision.json"
    cached = json.loads(cached_path.read_text()) if cached_path.exists() else {}
    grid = {label: encode for label, _, encode in
            vision.lowrank_grid() + vision.q1_grid() + vision.reference_grid()}
    tasks = [task.name for task in TASKS[:20]]  # the 20-task family (benchmarks.lowbit's)
    labels = [label for label in store if kind_of(label) and label in grid and all(t in store[label] for t in tasks)]
    family = Family(cache_dir, tasks)
    base = family.load()
    names = [n for n, v in base.items() if v.is_floating_point()]
    if "_finetuned" not in cached:
        cached["_finetuned"] = {t: family.evaluate(t, family.load(t), "test") for t in family.tasks}
    out = []
    for label in labels:
        if label not in cached:
            start, estimates = time.perf_counter(), {}
            for task in family.tasks:
                tuned = family.load(task)
                values, _ = grid[label]({n: tuned[n].to(torch.float32) - base[n].to(torch.float32) for n in names})
                sums = quality.zero_sums()
                for n in names:
                    rebuilt = (base[n].to(torch.float32) + values[n]).to(base[n].dtype)
                    sums += quality.rebuild_sums(base[n], tuned[n], rebuilt)
                estimates[task] = quality.estimate(sums)
            cached[label] = estimates
            work.mkdir(parents=True, exist_ok=True)
            cached_path.write_text(json.dumps(cached))
            log(f"  vision {label}: [{time.perf_counter() - start:.0f} s]")
        for task, est in cached[label].items():
            out.append({"family": "vision", "label": label, "kind": kind_of(label), "task": task,
                        "cosine": est["cosine"], "rel_error": est["rel_error"],
                        "quality": store[label][task]["test"] / cached["_finetuned"][task]})
    return out


def language_points(store: dict) -> list[dict]:
    out = []
    for label, tasks in store.items():
        if label.startswith("_") or kind_of(label) is None:
            continue
        for task, entry in tasks.items():
            out.append({"family": "language", "label": label, "kind": kind_of(label), "task": task,
                        "cosine": entry["cosine"], "rel_error": entry["rel_l2"] ** 2, "quality": entry["quality"]})
    return out


def sweep(points: list[dict], key: str = "cosine", thresholds=THRESHOLDS) -> list[dict]:
    """Per threshold: poor tasks (quality < POOR) with key >= threshold (missed), good ones under it (flagged)."""
    poor = [p for p in points if p["quality"] < POOR]
    good = [p for p in points if p["quality"] >= POOR]
    return [{"threshold": t, "poor": len(poor), "good": len(good),
             "missed": sum(p[key] >= t for p in poor), "flagged": sum(p[key] < t for p in good)} for t in thresholds]


def summary(points: list[dict]) -> dict:
    poor = [p for p in points if p["quality"] < POOR]
    good = [p for p in points if p["quality"] >= POOR]
    return {"points": len(points), "poor": len(poor),
            "highest_poor_cosine": max((p["cosine"] for p in poor), default=None),
            "lowest_good_cosine": min((p["cosine"] for p in good), default=None),
            "cosine_range": [min(p["cosine"] for p in points), max(p["cosine"] for p in points)],
            "worst_quality": min(p["quality"] for p in points)}


def per_point(points: list[dict]) -> list[dict]:
    """One line per (family, label): cosine range over its tasks, mean and worst quality."""
    groups = {}
    for p in points:
        groups.setdefault((p["family"], p["label"]), []).append(p)
    return [{"family": f, "label": l, "kind": ps[0]["kind"], "cos_min": min(p["cosine"] for p in ps),
             "cos_max": max(p["cosine"] for p in ps), "rel_error_max": max(p["rel_error"] for p in ps),
             "mean": sum(p["quality"] for p in ps) / len(ps), "worst": min(p["quality"] for p in ps),
             "poor_tasks": sum(p["quality"] < POOR for p in ps)} for (f, l), ps in sorted(groups.items())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lowrank_estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, required=True, help="the vision family's cache")
    parser.add_argument("--vision-store", type=Path, default=VISION_STORE)
    parser.add_argument("--language-store", type=Path, default=LANGUAGE_STORE)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.lowrank_estimate " + " ".join(sys.argv[1:] if argv is None else argv)
    for path in (args.vision_store, args.language_store):
        if not path.is_file():
            print(f"error: {path}: no such store (run benchmarks.lowbit / benchmarks.language.lowbit first)",
                  file=sys.stderr)
            return 1
    torch.set_num_threads(args.threads)
    log = lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)  # noqa: E731
    points = language_points(json.loads(args.language_store.read_text()))
    points += vision_points(args.cache_dir, json.loads(args.vision_store.read_text()), args.work, log)
    result = {"command": command, "poor_below": POOR, "by": {}, "points": per_point(points)}
    for family in ("vision", "language", "both"):
        for kind in ("lowrank", "q", "q1"):
            chosen = [p for p in points if p["kind"] == kind and family in ("both", p["family"])]
            if chosen:
                result["by"][f"{family} {kind}"] = {"summary": summary(chosen), "sweep": sweep(chosen)}
    for line in result["points"]:
        print(f"{line['family']:8s} {line['label'][:58]:58s} cos {line['cos_min']:.4f}-{line['cos_max']:.4f} "
              f"rel_err<={line['rel_error_max']:.3f} mean {line['mean']:.1%} worst {line['worst']:.1%} "
              f"poor {line['poor_tasks']}")
    for key, value in result["by"].items():
        s = value["summary"]
        print(f"{key:18s} {s['points']:4d} tasks, {s['poor']:3d} poor; highest poor cosine {s['highest_poor_cosine']}, "
              f"lowest good {s['lowest_good_cosine']}; " + " ".join(
                  f"{w['threshold']:g}: miss {w['missed']} flag {w['flagged']}" for w in value["sweep"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
