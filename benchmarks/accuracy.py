"""Storage against accuracy on a real family: do the TALL-masks paper's claims hold here?

One command builds (or loads from benchmarks/.cache) a family of small ViTs fine-tuned on real
images (benchmarks/family.py), then measures every row through tallzip's public API:

* reference rows -- the N fine-tuned models (N files) and the base (1 file);
* compression rows -- `tallzip.pack` into an archive, each task rebuilt with
  `tallzip.open(path).load(task)`: mtv by sum and by TIES; lambda 0.4 for every task (the
  data-free default) or chosen per task on the validation split from {0.2, ..., 0.6} with
  `tallzip.pack(..., lambdas=tallzip.select_lambdas(evaluate))`; and the mtv stored as bfloat16;
* merging rows -- `tallzip.merge`: task arithmetic, TIES, Consensus TA and Consensus TIES
  (k = 1, 2, 3) with alpha chosen on validation over {0.0, 0.1, ..., 1.0}, and weight averaging.

The metric is the paper's (appendix A): normalized accuracy = mean over tasks of the row's test
accuracy divided by the fine-tuned model's test accuracy.  Storage is bytes on disk; the ratio is
the N fine-tuned files against the row's bytes.

With --only frontier (or by default, after these rows) it also measures the storage-accuracy frontier of
issue 13 (benchmarks/frontier.py: tall, q8..q2, exact, the automatic choice, the paper's layout, EMR-style,
merges; written by benchmarks/frontier_report.py).

Usage:  python -m benchmarks.accuracy                  (default: 8 tasks, ~15 min on 2 CPU cores from a clean cache)
        python -m benchmarks.accuracy --only frontier [--tasks 20]
        python -m benchmarks.accuracy --tasks 20
        python -m benchmarks.accuracy --tasks 30 --preset gpu --device cuda   (the larger setting)
        python -m benchmarks.accuracy --only family --tasks 20 [--task-arithmetic 0.3]   (build or load the family, its table)
        python -m benchmarks.accuracy --only calibration --cache-dir DIR   (the data-free estimate against accuracy)
        python -m benchmarks.accuracy --replot           (draw the frontier plots again from results/frontier.json)

Writes benchmarks/results/accuracy.json (one entry per number of tasks), accuracy.png (storage vs
normalized accuracy) and agreement.png (how many tasks' masks use each weight) -- for a setting other
than the default, accuracy-<N>tasks.png and agreement-<N>tasks.png -- and the table into
benchmarks/RESULTS.md (its own subsection per number of tasks), all by benchmarks/accuracy_report.py.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import tallzip
from tallzip import merge

from benchmarks.accuracy_library import DEFAULT_LAMBDA, ROLE_BASE, LambdaSelector, summary
from benchmarks.family import PRESETS, TASK_SETTINGS, Family, FinetuneRegressionWarning, build_family
from benchmarks.metrics import mean_accuracy, normalized_accuracy
from tallzip.options import RunOptions, StoreOptions

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
SECTION_TITLE = "## Accuracy (issue 4)"
DEFAULT_TASKS = 8
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0 is the base itself
CONSENSUS_KS = (1, 2, 3)
PAPER_TALL_CLAIM = 0.99  # TALL masks keep >= 99% of the fine-tuned accuracy


@dataclass
class Row:
    """One line of the table: a model (or a set of models) with its storage and accuracies."""

    label: str
    group: str  # "reference", "compression" or "merging"
    storage_bytes: int
    stored_as: str
    val: dict[str, float]
    test: dict[str, float]
    settings: dict = field(default_factory=dict)
    normalized_val: float = 0.0
    normalized_test: float = 0.0

    def as_dict(self, finetuned_bytes: int) -> dict:
        out = asdict(self)
        out["ratio"] = finetuned_bytes / self.storage_bytes
        out["mean_test"] = mean_accuracy(self.test)
        out["mean_val"] = mean_accuracy(self.val)
        return out


class Bench:
    """The family plus what every row is measured against: the fine-tuned accuracies and file sizes."""

    def __init__(self, family: Family, work_dir: Path, device: str = "cpu", log=print):
        self.family, self.work_dir, self.device, self.log = family, Path(work_dir), device, log
        self.tasks = list(family.tasks)
        self.task_paths = {task: str(family.task_paths[task]) for task in self.tasks}
        self.base_path = str(family.base_path)
        self.base_state = family.load()
        self.finetuned_bytes = sum(os.path.getsize(p) for p in self.task_paths.values())
        # The denominators, evaluated now (not read from family.json), so the fine-tuned row is exactly 1.
        self.finetuned = {
            split: {task: family.evaluate(task, family.load(task), split) for task in self.tasks}
            for split in ("val", "test")
        }
        self.rows: list[Row] = []
        self.extra: dict = {}

    def evaluate_all(self, state: dict, split: str) -> dict[str, float]:
        return {task: self.family.evaluate(task, state, split) for task in self.tasks}

    def add(self, label, group, storage_bytes, stored_as, val, test, **settings) -> Row:
        row = Row(label, group, int(storage_bytes), stored_as, val, test, settings,
                  normalized_accuracy(val, self.finetuned["val"]), normalized_accuracy(test, self.finetuned["test"]))
        self.rows.append(row)
        return row


# --------------------------------------------------------------------------- rows


def reference_rows(bench: Bench) -> None:
    base_val, base_test = bench.evaluate_all(bench.base_state, "val"), bench.evaluate_all(bench.base_state, "test")
    bench.add("fine-tuned (one model per task)", "reference", bench.finetuned_bytes, f"{len(bench.tasks)} files",
              bench.finetuned["val"], bench.finetuned["test"])
    bench.add("base (pretrained)", "reference", os.path.getsize(bench.base_path), "1 file", base_val, base_test)


def pack_and_rebuild(bench: Bench, label: str, archive: Path, *, merge_method: str, lambdas,
                     mtv_dtype: str = "float32", lambda_rule: str | None = None) -> Row:
    """Pack the family with tallzip, rebuild every task from the archive, evaluate it."""
    start = time.perf_counter()
    tallzip.pack(bench.task_paths, bench.base_path, archive, store=StoreOptions(lambdas=lambdas, merge=merge_method, mtv_dtype=mtv_dtype), run=RunOptions(device=bench.device), force=True)
    packed_seconds = time.perf_counter() - start
    val, test = {}, {}
    with tallzip.open(archive) as opened:
        chosen = opened.lambdas
        for task in bench.tasks:
            state = opened.load(task)
            val[task] = bench.family.evaluate(task, state, "val")
            test[task] = bench.family.evaluate(task, state, "test")
        sizes = summary(opened)
    base_bytes = sizes["sections"].get(ROLE_BASE, {}).get("bytes", 0)
    settings = {"merge": merge_method, "mtv_dtype": mtv_dtype, "lambdas": chosen,
                "lambda_rule": lambda_rule or ("selected on val" if isinstance(lambdas, LambdaSelector) else "fixed"),
                "archive_bytes_without_base": sizes["archive_bytes"] - base_bytes,
                "pack_seconds": round(packed_seconds, 2)}
    if isinstance(lambdas, LambdaSelector):
        settings["lambda_scores"] = {t: {str(k): v for k, v in s.items()} for t, s in lambdas.scores.items()}
    return bench.add(label, "compression", sizes["archive_bytes"], "1 archive", val, test, **settings)


def compression_rows(bench: Bench) -> dict[str, Path]:
    """TALL rows; returns the archives the merging rows and the agreement histogram reuse."""
    def on_val(task, state):  # the lambda-selection hook: validation accuracy of the rebuilt task
        return bench.family.evaluate(task, state, "val")

    archives = {}
    for merge_method in ("sum", "ties"):
        name = "sum" if merge_method == "sum" else "TIES"
        path = bench.work_dir / f"tall-{merge_method}-default.tallz"
        pack_and_rebuild(bench, f"TALL masks, {name} mtv, lambda {DEFAULT_LAMBDA:g}", path,
                         merge_method=merge_method, lambdas=DEFAULT_LAMBDA)
        path = archives[merge_method] = bench.work_dir / f"tall-{merge_method}-selected.tallz"
        row = pack_and_rebuild(bench, f"TALL masks, {name} mtv, lambda on val", path,
                               merge_method=merge_method, lambdas=tallzip.select_lambdas(on_val))
        if merge_method == "sum":
            # Same masks (pack computes them from the full-precision mtv), the mtv stored rounded to bfloat16.
            # The lambdas chosen above are reused: selecting again would rebuild from the same fp32 mtv.
            pack_and_rebuild(bench, "TALL masks, sum mtv as bfloat16, lambda on val",
                             bench.work_dir / "tall-sum-selected-bf16.tallz",
                             merge_method="sum", lambdas=row.settings["lambdas"], mtv_dtype="bfloat16",
                             lambda_rule="selected on val (the fp32 row's choice)")
    return archives


def scaled(base: dict, vector: dict, alpha: float) -> dict:
    """base + alpha * vector, tensor by tensor (the merges below are all of this form)."""
    return {name: base[name] + alpha * vector[name] for name in base}


def merge_vector(base: dict, merged_at_one: dict) -> dict:
    """V with merge(alpha) = base + alpha * V: the merge at alpha 1 minus the base."""
    return {name: merged_at_one[name].to(torch.float32) - base[name].to(torch.float32) for name in base}


def select_alpha(evaluate_mean_val, base: dict, vector: dict, alphas=ALPHAS) -> tuple[float, dict]:
    """The alpha with the best mean validation accuracy (the first, on ties); {alpha: score} too.

    Every merge here is linear in alpha (base + alpha * V), so V is computed once and each alpha is
    evaluated in memory rather than merging again.
    """
    scores = {alpha: evaluate_mean_val(scaled(base, vector, alpha)) for alpha in alphas}
    best = max(alphas, key=lambda alpha: (scores[alpha], -alphas.index(alpha)))
    return best, scores


def merged_row(bench: Bench, label: str, vector: dict, alphas=ALPHAS, **settings) -> Row:
    def mean_val(state):
        return mean_accuracy(bench.evaluate_all(state, "val"))

    alpha, scores = select_alpha(mean_val, bench.base_state, vector, alphas)
    state = scaled(bench.base_state, vector, alpha)
    path = bench.work_dir / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))  # one checkpoint file: its storage
    return bench.add(label, "merging", os.path.getsize(path), "1 file", bench.evaluate_all(state, "val"),
                     bench.evaluate_all(state, "test"), alpha=alpha,
                     val_by_alpha={f"{a:g}": s for a, s in scores.items()}, **settings)


def merging_rows(bench: Bench, archives: dict[str, Path], alphas=ALPHAS) -> None:
    rows = bench.rows
    selected = {r.settings["merge"]: r.settings["lambdas"] for r in rows
                if r.group == "compression" and r.settings.get("lambda_rule") == "selected on val"
                and r.settings.get("mtv_dtype") == "float32"}

    def vector_of(method, **options):
        merged = merge(bench.task_paths, base=bench.base_path, method=method, alpha=1.0, run=RunOptions(device=bench.device),
                       **options)
        return merge_vector(bench.base_state, merged)

    merged_row(bench, "task arithmetic", vector_of("task-arithmetic"), alphas, method="task-arithmetic")
    merged_row(bench, "TIES (top 20%, disjoint mean)", vector_of("ties"), alphas, method="ties")
    for k in (k for k in CONSENSUS_KS if k <= len(bench.tasks)):  # k above N is refused: it keeps no weight
        # The consensus masks are the TALL masks with each task's lambda as chosen on val when packing.
        merged_row(bench, f"Consensus TA, k={k}", vector_of("consensus-ta", k=k, lambdas=selected.get("sum")),
                   alphas, method="consensus-ta", k=k, lambdas=selected.get("sum"))
        merged_row(bench, f"Consensus TIES, k={k}", vector_of("consensus-ties", k=k, lambdas=selected.get("ties")),
                   alphas, method="consensus-ties", k=k, lambdas=selected.get("ties"))
    # Weight averaging has no alpha to choose: alpha 1 is the mean of the fine-tuned weights.
    merged_row(bench, "weight averaging", vector_of("average"), alphas=(1.0,), method="average")

    # Consensus needs only what an archive keeps: the archive route gives the folder route's model.
    from_folder = merge(bench.task_paths, base=bench.base_path, method="consensus-ta", k=2, alpha=1.0,
                        lambdas=selected.get("sum"), run=RunOptions(device=bench.device))
    from_archive = merge(archives["sum"], method="consensus-ta", k=2, alpha=1.0, run=RunOptions(device=bench.device))
    bench.extra["consensus_archive_vs_folder_max_abs_diff"] = max(
        float((from_folder[n] - from_archive[n]).abs().max()) for n in from_folder)


# --------------------------------------------------------------------------- the run


def run(n_tasks: int, *, preset: str = "cpu", device: str = "cpu", work_dir: Path, config=None, cache_dir=None,
        alphas=ALPHAS, log=print, rows: bool = True, threads: int = 2) -> tuple[Bench, dict]:
    """Every row on a family of n_tasks (rows=False: the family and the bench only, for the frontier);
    returns the bench (rows) and the elapsed seconds per phase."""
    timings: dict[str, float] = OrderedDict()
    clock = time.perf_counter()

    def phase(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        log(f"[{name}: {now - clock:.1f} s]")
        clock = now

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FinetuneRegressionWarning)  # printed below, one line per task
        family = build_family(n_tasks, cache_dir, config=config or PRESETS[preset], device=device, log=log,
                              num_threads=threads)
    phase("family (build or load)")
    for task in family.regressions():
        acc = family.info["tasks"][task]["accuracy"]
        log(f"WARNING: fine-tuned {task} is worse than the base on its own task "
            f"(val {acc['finetuned']['val']:.3f} vs {acc['base']['val']:.3f}, "
            f"test {acc['finetuned']['test']:.3f} vs {acc['base']['test']:.3f})")
    bench = Bench(family, work_dir, "cuda" if device.startswith("cuda") else "cpu", log)
    bench.extra["family_trained_now"] = list(family.trained_now)
    bench.extra["family_train_seconds_recorded"] = round(
        family.info["base"]["train_seconds"] + sum(family.info["tasks"][t]["train_seconds"] for t in family.tasks), 1)
    if not rows:
        phase("fine-tuned accuracies")
        return bench, timings
    reference_rows(bench)
    phase("reference rows")
    archives = compression_rows(bench)
    phase("compression rows (pack, rebuild, evaluate)")
    merging_rows(bench, archives, alphas)
    phase("merging rows (merge, alpha on val, evaluate)")
    bench.extra["agreement"] = tallzip.agreement(tallzip.open(archives["sum"]))
    phase("mask agreement")
    return bench, timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS, choices=TASK_SETTINGS,
                        help=f"number of tasks (default {DEFAULT_TASKS}; 30 is the larger setting, for a GPU)")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="family size: cpu, or gpu (larger)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for training, packing and merging")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-results-md", action="store_true", help="do not write the table into benchmarks/RESULTS.md")
    parser.add_argument("--only", choices=("all", "accuracy", "frontier", "family", "calibration"), default="all",
                        help="the accuracy rows (issue 4), the storage-accuracy frontier (issue 13), or both (default); "
                             "family: only build or load the family and print its per-task table")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    family_options = parser.add_argument_group("--only family")
    family_options.add_argument("--rebuild", action="store_true", help="retrain even if the cache is complete")
    family_options.add_argument("--reevaluate", action="store_true", help="evaluate again instead of printing recorded accuracies")
    family_options.add_argument("--task-arithmetic", type=float, default=None, metavar="ALPHA",
                                help="also report base + ALPHA * sum of task vectors")
    calibration = parser.add_argument_group("--only calibration (the data-free estimate against accuracy, issue 20)")
    calibration.add_argument("--cache-dir", type=Path, default=None, help="the trained family's folder")
    calibration.add_argument("--calibration-tasks", default="8,14,20", help="vision settings (default 8,14,20; '' none)")
    calibration.add_argument("--language-json", type=Path, default=None,
                             help="benchmarks/language's results (gain kept per task and representation)")
    calibration.add_argument("--calibration-reps", default="tall:sum,tall:ties,q2,q3,q4",
                             help="representations measured (REP or tall:MERGE), default tall:sum,tall:ties,q2,q3,q4")
    calibration.add_argument("--calibration-merge", type=Path, default=None,
                             help="a calibration.json of an earlier run whose records are kept beside these")
    calibration.add_argument("--estimate-overhead", type=Path, default=None, metavar="FAMILY",
                             help="only time pack with and without the estimate on FAMILY (tasks/ and base/)")
    calibration.add_argument("--language-family", type=Path, default=None, help="the language family's folder")
    parser.add_argument("--replot", action="store_true", help="draw the frontier plots again from frontier.json, measure nothing")
    args = parser.parse_args(argv)
    if args.replot:
        from benchmarks.frontier_report import replot
        return replot(args.results_dir)
    if args.only == "calibration":
        from benchmarks.calibration import main as calibrate
        return calibrate(args)
    if args.only == "family":
        from benchmarks.family import show_family
        return show_family(args.tasks, args.preset, args.device, rebuild=args.rebuild, reevaluate=args.reevaluate,
                           alpha=args.task_arithmetic)

    command = "python -m benchmarks.accuracy" + ("" if argv is None and len(sys.argv) == 1 else
                                                  " " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"$ {command}", flush=True)
    start = time.perf_counter()
    from benchmarks.accuracy_report import clean_cache_note, plot_names, verdicts, write_outputs
    results_md = None if args.no_results_md else RESULTS_MD
    with tempfile.TemporaryDirectory(prefix="tallzip-accuracy-") as work_dir:
        bench, timings = run(args.tasks, preset=args.preset, device=args.device, work_dir=Path(work_dir),
                             log=lambda *a: print(*a, flush=True), rows=args.only != "frontier", threads=args.threads)
        if args.only != "accuracy":
            from benchmarks.frontier import run_frontier, targets_met
            from benchmarks.frontier_report import write_frontier_outputs
            def save(partial):  # after every phase: a run stopped early keeps what it measured
                write_frontier_outputs(partial, command, timings, args.results_dir, results_md)

            frontier = run_frontier(bench, timings=timings, after_phase=save)
            timings["total"] = round(time.perf_counter() - start, 1)
            print("\n" + write_frontier_outputs(frontier, command, timings, args.results_dir, results_md))
            print("\n".join(targets_met(frontier)))
            print(f"wrote {args.results_dir}/frontier.json, frontier-{args.tasks}tasks.png"
                  + ("" if results_md is None else f" and the frontier's {args.tasks}-task table into {RESULTS_MD}"))
            if args.only == "frontier":
                return 0
        timings["total"] = round(time.perf_counter() - start, 1)
        table = write_outputs(bench, timings, command, args.results_dir, results_md)
    print()
    print(table)
    print()
    for line in verdicts(bench):
        print(line)
    print(f"consensus TA k=2, archive vs folder: max abs difference "
          f"{bench.extra['consensus_archive_vs_folder_max_abs_diff']:.3g}")
    print("elapsed: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + "; " + clean_cache_note(bench, timings))
    print(f"wrote {args.results_dir}/accuracy.json, " + ", ".join(plot_names(args.tasks))
          + ("" if args.no_results_md else f" and the {args.tasks}-task table into {RESULTS_MD}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
