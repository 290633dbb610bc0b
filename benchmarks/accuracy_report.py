"""The accuracy benchmark's outputs (issue 4): the table, the verdicts on the paper's claims, the plots,
the JSON and its RESULTS.md section. The rows themselves are measured in benchmarks/accuracy.py."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from benchmarks.accuracy import CONSENSUS_KS, DEFAULT_TASKS, PAPER_TALL_CLAIM, SECTION_TITLE, Bench, Row
from benchmarks.accuracy_library import DEFAULT_LAMBDA, plot_agreement
from benchmarks.metrics import mean_accuracy

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



def plot_names(n_tasks: int) -> tuple[str, str]:
    """The default setting's plots are accuracy.png and agreement.png; other settings' carry their N."""
    suffix = "" if n_tasks == DEFAULT_TASKS else f"-{n_tasks}tasks"
    return f"accuracy{suffix}.png", f"agreement{suffix}.png"


def write_outputs(bench: Bench, timings: dict, command: str, results_dir: Path, results_md: Path | None) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(bench)
    write_json(results_json(bench, command, timings), results_dir / "accuracy.json")
    accuracy_png, agreement_png = plot_names(len(bench.tasks))
    plot_storage_accuracy(bench, results_dir / accuracy_png)
    plot_agreement(bench.extra["agreement"], results_dir / agreement_png)
    if results_md is not None:
        update_results_md(results_md, len(bench.tasks), markdown_block(bench, command, timings, table))
    return table
