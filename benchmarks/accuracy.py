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

Writes benchmarks/results/accuracy.json (one entry per number of tasks), accuracy.png (storage vs
normalized accuracy) and agreement.png (how many tasks' masks use each weight) -- for a setting other
than the default, accuracy-<N>tasks.png and agreement-<N>tasks.png -- and the table into
benchmarks/RESULTS.md (its own subsection per number of tasks).
"""
from __future__ import annotations

import argparse
import json
import math
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
from tallzip.formats.constants import ROLE_BASE
from tallzip.inspect import summary
from tallzip.merging import merge
from tallzip.packing import LambdaSelector
from tallzip.taskvec import DEFAULT_LAMBDA

from benchmarks.family import PRESETS, TASK_SETTINGS, Family, FinetuneRegressionWarning, build_family
from benchmarks.metrics import mean_accuracy, normalized_accuracy

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
    tallzip.pack(bench.task_paths, bench.base_path, archive, lambdas=lambdas, merge=merge_method,
                 mtv_dtype=mtv_dtype, device=bench.device, force=True)
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
        merged = merge(bench.task_paths, base=bench.base_path, method=method, alpha=1.0, device=bench.device, **options)
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
                        lambdas=selected.get("sum"), device=bench.device)
    from_archive = merge(archives["sum"], method="consensus-ta", k=2, alpha=1.0, device=bench.device)
    bench.extra["consensus_archive_vs_folder_max_abs_diff"] = max(
        float((from_folder[n] - from_archive[n]).abs().max()) for n in from_folder)


# --------------------------------------------------------------------------- output


def format_table(bench: Bench) -> str:
    headers = ["row", "stored as", "bytes", "ratio", "test acc", "norm. test", "norm. val", "lambda / alpha"]
    lines = []
    for row in bench.rows:
        if row.group == "compression":
            values = sorted(set(row.settings["lambdas"].values()))
            setting = f"lambda {values[0]:g}" if len(values) == 1 else "lambda " + "/".join(f"{v:g}" for v in values)
        elif "alpha" in row.settings:
            setting = f"alpha {row.settings['alpha']:g}"
        else:
            setting = ""
        lines.append([row.label, row.stored_as, f"{row.storage_bytes:,}", f"{bench.finetuned_bytes / row.storage_bytes:.2f}x",
                      f"{mean_accuracy(row.test):.4f}", f"{row.normalized_test:.2%}", f"{row.normalized_val:.2%}", setting])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(line) for line in lines)])


def paired_difference(bench: Bench, a: Row, b: Row) -> tuple[float, float]:
    """a's normalized test accuracy minus b's, and the standard error of that mean over the tasks."""
    ft = bench.finetuned["test"]
    diffs = [(a.test[t] - b.test[t]) / ft[t] for t in bench.tasks]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def verdicts(bench: Bench) -> list[str]:
    """Plain statements of whether the paper's two claims held in this run (test split)."""
    rows = {r.label: r for r in bench.rows}
    finetuned = rows["fine-tuned (one model per task)"]
    tall = {mtv: rows[f"TALL masks, {mtv} mtv, lambda on val"] for mtv in ("sum", "TIES")}
    default = {mtv: rows[f"TALL masks, {mtv} mtv, lambda {DEFAULT_LAMBDA:g}"] for mtv in ("sum", "TIES")}
    bf16 = rows["TALL masks, sum mtv as bfloat16, lambda on val"]
    held = {mtv: row.normalized_test >= PAPER_TALL_CLAIM for mtv, row in tall.items()}
    verdict = "HELD" if all(held.values()) else "DID NOT HOLD" if not any(held.values()) else \
        "HELD with the " + " and ".join(m for m, h in held.items() if h) + " mtv only"

    def loss(row):
        mean, se = paired_difference(bench, row, finetuned)
        return f"{row.normalized_test:.2%} (s.e. {100 * se:.2f} points over tasks)"

    lines = [
        f"Claim 1 (TALL masks keep >= 99% of the fine-tuned accuracy): {verdict} -- lambda chosen on val: "
        f"sum mtv {loss(tall['sum'])} at {bench.finetuned_bytes / tall['sum'].storage_bytes:.2f}x smaller than the "
        f"{len(bench.tasks)} fine-tuned files, TIES mtv {loss(tall['TIES'])} at "
        f"{bench.finetuned_bytes / tall['TIES'].storage_bytes:.2f}x; data-free lambda {DEFAULT_LAMBDA:g}: sum "
        f"{default['sum'].normalized_test:.2%}, TIES {default['TIES'].normalized_test:.2%}; sum mtv stored as "
        f"bfloat16: {bf16.normalized_test:.2%} ({100 * (bf16.normalized_test - tall['sum'].normalized_test):+.2f} "
        f"points against fp32) at {bench.finetuned_bytes / bf16.storage_bytes:.2f}x."
    ]

    def versus(a, b):
        mean, se = paired_difference(bench, rows[a], rows[b])
        return (f"{a} {rows[a].normalized_test:.2%} vs {b} {rows[b].normalized_test:.2%} "
                f"({100 * mean:+.2f} ± {100 * se:.2f} points, mean ± s.e. of the per-task differences)")

    ta, ties = "task arithmetic", "TIES (top 20%, disjoint mean)"
    pairs = {"Consensus TA, k=2": ta, "Consensus TIES, k=2": ties}
    margins = {a: paired_difference(bench, rows[a], rows[b]) for a, b in pairs.items()}
    both = all(mean > 0 for mean, _ in margins.values())
    unclear = [a for a, (mean, se) in margins.items() if abs(mean) < 2 * se]
    note = f" (within 2 s.e. of no difference, so not distinguishable from noise here: {', '.join(unclear)})" if unclear else ""
    best = {kind: max((rows[f"Consensus {kind}, k={k}"] for k in CONSENSUS_KS if f"Consensus {kind}, k={k}" in rows),
                      key=lambda r: r.normalized_test)
            for kind in ("TA", "TIES")}
    lines.append(
        f"Claim 2 (Consensus merging beats task arithmetic and TIES), at the paper's k=2: "
        f"{'HELD' if both else 'DID NOT HOLD'}{note} -- {versus('Consensus TA, k=2', ta)}; "
        f"{versus('Consensus TIES, k=2', ties)}. Best k: "
        + ", ".join(f"{r.label} {r.normalized_test:.2%}" for r in best.values()) + "."
    )
    return lines


def spread(values: list[float], min_gap: float) -> list[float]:
    """Heights for labels of points at (about) the same x: in the points' order, at least min_gap apart,
    the block centred on the points."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = list(values)
    for previous, i in zip(order, order[1:]):
        placed[i] = max(values[i], placed[previous] + min_gap)
    shift = (sum(placed) - sum(values)) / len(values) if values else 0.0
    return [y - shift for y in placed]


def accuracy_bands(rows: list[Row]) -> list[list[Row]]:
    """The rows in one band, or in two (top first) when a wide empty stretch of accuracy separates them
    (compressed models near 100%, merges far below): each band gets its own panel."""
    ys = sorted(r.normalized_test for r in rows)
    gaps = [(b - a, a) for a, b in zip(ys, ys[1:])]
    if not gaps or max(gaps)[0] < 0.4 * (ys[-1] - ys[0]):
        return [rows]
    cut = max(gaps)[1]
    return [[r for r in rows if r.normalized_test > cut], [r for r in rows if r.normalized_test <= cut]]


def plot_storage_accuracy(bench: Bench, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    left, key = fig.subfigures(1, 2, width_ratios=(3, 2))
    bands = accuracy_bands(bench.rows)
    axes = left.subplots(len(bands), 1, sharex=True, squeeze=False)[:, 0]
    colours = {"reference": "0.3", "compression": "tab:blue", "merging": "tab:orange"}
    numbers = {id(r): n for n, r in enumerate(bench.rows, 1)}
    for ax, band in zip(axes, bands):
        ys = [100 * r.normalized_test for r in band]
        span = max(max(ys) - min(ys), 1.0)
        ax.set_ylim(min(ys) - 0.15 * span, max(ys) + 0.15 * span)
        for group, colour in colours.items():
            rows = [r for r in band if r.group == group]
            if rows:
                ax.scatter([r.storage_bytes for r in rows], [100 * r.normalized_test for r in rows], color=colour,
                           label=group, zorder=3)
        # Points of about the same size (every merged model is one checkpoint file) get their numbers
        # stacked in a column beside them, joined by thin lines; the key beside the plot names them.
        clusters: list[list[Row]] = []
        for r in sorted(band, key=lambda r: r.storage_bytes):
            if clusters and r.storage_bytes <= 1.08 * clusters[-1][0].storage_bytes:
                clusters[-1].append(r)
            else:
                clusters.append([r])
        for cluster in clusters:
            column = max(r.storage_bytes for r in cluster) * 1.06
            for r, height in zip(cluster, spread([100 * r.normalized_test for r in cluster], 0.07 * span)):
                ax.annotate(str(numbers[id(r)]), (r.storage_bytes, 100 * r.normalized_test), xytext=(column, height),
                            textcoords="data", fontsize=8, va="center",
                            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
        low, high = ax.get_ylim()
        if low <= 100 * PAPER_TALL_CLAIM <= high:
            ax.axhline(100 * PAPER_TALL_CLAIM, color="tab:blue", linestyle=":", linewidth=1, label="99% (paper's claim)")
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(loc="best", fontsize=7)
    axes[-1].set_xscale("log")
    sizes = [r.storage_bytes for r in bench.rows]
    axes[-1].set_xlim(min(sizes) / 1.25, max(sizes) * 1.4)
    axes[-1].set_xlabel("storage (bytes, log scale)")
    left.supylabel("normalized accuracy, test (% of fine-tuned)")
    axes[0].set_title(f"Storage against accuracy, {len(bench.tasks)} tasks (real images, small ViT)"
                      + ("; two panels, the y axis is broken" if len(bands) > 1 else ""), fontsize=10)
    lines = [f"{n:2d}  {r.label}\n    {100 * r.normalized_test:.2f}%, {bench.finetuned_bytes / r.storage_bytes:.2f}x smaller"
             for n, r in enumerate(bench.rows, 1)]
    key.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", fontsize=7.5, family="monospace")
    fig.savefig(path, dpi=120)


def results_json(bench: Bench, command: str, timings: dict) -> dict:
    """This run's results; the storage benchmark picks up the objects under "tall_for_storage"."""
    n = len(bench.tasks)
    storage_rows = [
        {"method": f"tall masks, {r.settings['merge']} mtv, lambda on val", "n_tasks": n,
         "mtv_dtype": r.settings["mtv_dtype"], "normalized_accuracy": r.normalized_test}
        for r in bench.rows
        if r.group == "compression" and r.settings["merge"] == "sum" and r.settings["lambda_rule"].startswith("selected")
    ]
    return {
        "command": command,
        "n_tasks": n,
        "tasks": bench.tasks,
        "family": {"root": str(bench.family.root), "config_hash": bench.family.info["config_hash"],
                   "parameters": bench.family.info["parameters"], "regressions": bench.family.regressions()},
        "finetuned_bytes": bench.finetuned_bytes,
        "finetuned_accuracy": bench.finetuned,
        # Rows carry no "n_tasks" key: only the objects below are what storage.accuracy_lookup reads.
        "rows": [row.as_dict(bench.finetuned_bytes) for row in bench.rows],
        "tall_for_storage": storage_rows,
        "verdicts": verdicts(bench),
        "timings_seconds": timings,
        **bench.extra,
    }


def write_json(results: dict, path: Path) -> None:
    """Keep the other settings' runs: the file holds one entry per number of tasks."""
    try:
        existing = json.loads(path.read_text())
        runs = existing.get("runs", {}) if isinstance(existing, dict) else {}
    except (OSError, json.JSONDecodeError):
        runs = {}
    runs[str(results["n_tasks"])] = results
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"runs": dict(sorted(runs.items(), key=lambda kv: int(kv[0])))}, indent=1) + "\n")
    os.replace(tmp, path)


def clean_cache_note(bench: Bench, timings: dict) -> str:
    trained = bench.extra.get("family_trained_now", [])
    recorded = bench.extra.get("family_train_seconds_recorded", 0.0)
    if len(trained) == len(bench.tasks):
        return "the family was trained by this run (a clean cache)"
    total = timings.get("total", sum(timings.values()))
    return (f"the family came from the cache ({len(trained)} of its tasks trained now); from a clean cache add its "
            f"training, {recorded:.0f} s as family.json recorded it when built: about {(total + recorded) / 60:.1f} min "
            f"in all")


def markdown_block(bench: Bench, command: str, timings: dict, table: str) -> str:
    n = len(bench.tasks)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    timing += "; " + clean_cache_note(bench, timings)
    regress = bench.family.regressions()
    lines = [
        f"### {n} tasks",
        "",
        "```",
        f"$ {command}",
        table,
        "```",
        "",
        f"Family: {bench.family.info['parameters']:,}-parameter ViT (open_clip vision-tower names), {n} tasks on real "
        f"images, config {bench.family.info['config_hash']}. Normalized accuracy = mean over tasks of test accuracy / "
        f"fine-tuned test accuracy (the paper's appendix A); ratio = the {n} fine-tuned files' bytes / the row's bytes. "
        f"Lambda (TALL) and alpha (merges) chosen on the validation split; alpha 0 is the base.",
        f"Run time on this machine: {timing}.",
        "",
        *(f"- {line}" for line in verdicts(bench)),
        f"- Fine-tuned worse than the base on: {', '.join(regress) if regress else 'no task'}.",
        f"- Consensus TA (k=2) merged from the archive vs from the checkpoint folder: max abs difference "
        f"{bench.extra.get('consensus_archive_vs_folder_max_abs_diff', float('nan')):.3g}.",
        "",
    ]
    return "\n".join(lines)


ACCURACY_INTRO = ("Command: `python -m benchmarks.accuracy [--tasks 8|14|20]` (see benchmarks/accuracy.py). "
                  "Plots: benchmarks/results/accuracy.png and agreement.png (default, 8 tasks), "
                  "accuracy-<N>tasks.png and agreement-<N>tasks.png (--tasks N); "
                  "all numbers: benchmarks/results/accuracy.json.\n")


def update_results_md(path: Path, n_tasks: int, block: str, title: str = SECTION_TITLE,
                      intro: str = ACCURACY_INTRO) -> None:
    """Replace (or add) this setting's subsection of section `title` (default "Accuracy (issue 4)"); leave the
    rest as is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{intro}\n"
        start = text.find(title)
    end = text.find("\n## ", start + len(title))
    end = len(text) if end < 0 else end + 1
    section = text[start:end]
    subsections = {}
    for part in section.split("\n### ")[1:]:
        subsections[int(part.split()[0])] = "### " + part.rstrip("\n") + "\n"
    subsections[n_tasks] = block.rstrip("\n") + "\n"
    head = section.split("\n### ")[0].rstrip("\n") + "\n\n"
    new_section = head + "\n".join(subsections[k] for k in sorted(subsections)) + ("\n" if end < len(text) else "")
    text = text[:start] + new_section + text[end:]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def plot_names(n_tasks: int) -> tuple[str, str]:
    """The default setting's plots are accuracy.png and agreement.png; other settings' carry their N."""
    suffix = "" if n_tasks == DEFAULT_TASKS else f"-{n_tasks}tasks"
    return f"accuracy{suffix}.png", f"agreement{suffix}.png"


def write_outputs(bench: Bench, timings: dict, command: str, results_dir: Path, results_md: Path | None) -> str:
    from tallzip.cli.report import plot_agreement

    results_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(bench)
    write_json(results_json(bench, command, timings), results_dir / "accuracy.json")
    accuracy_png, agreement_png = plot_names(len(bench.tasks))
    plot_storage_accuracy(bench, results_dir / accuracy_png)
    plot_agreement(bench.extra["agreement"], results_dir / agreement_png)
    if results_md is not None:
        update_results_md(results_md, len(bench.tasks), markdown_block(bench, command, timings, table))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS, choices=TASK_SETTINGS,
                        help=f"number of tasks (default {DEFAULT_TASKS}; 30 is the larger setting, for a GPU)")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="family size: cpu, or gpu (larger)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for training, packing and merging")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-results-md", action="store_true", help="do not write the table into benchmarks/RESULTS.md")
    parser.add_argument("--only", choices=("all", "accuracy", "frontier"), default="all",
                        help="the accuracy rows (issue 4), the storage-accuracy frontier (issue 13), or both (default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)

    command = "python -m benchmarks.accuracy" + ("" if argv is None and len(sys.argv) == 1 else
                                                  " " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"$ {command}", flush=True)
    start = time.perf_counter()
    results_md = None if args.no_results_md else RESULTS_MD
    with tempfile.TemporaryDirectory(prefix="tallzip-accuracy-") as work_dir:
        bench, timings = run(args.tasks, preset=args.preset, device=args.device, work_dir=Path(work_dir),
                             log=lambda *a: print(*a, flush=True), rows=args.only != "frontier", threads=args.threads)
        if args.only != "accuracy":
            from benchmarks.frontier import run_frontier, targets_met
            from benchmarks.frontier_report import write_frontier_outputs
            frontier = run_frontier(bench, timings=timings)
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
