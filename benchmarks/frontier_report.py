"""The frontier's outputs: the table, the plot (one PNG per number of tasks), the JSON and the RESULTS.md section."""
from __future__ import annotations

from pathlib import Path

from benchmarks.accuracy_report import update_results_md, write_json
from benchmarks.frontier import BASES, Frontier, pareto_front, targets_met

SECTION_TITLE = "## Storage-accuracy frontier (issue 13)"
INTRO = ("Command: `python -m benchmarks.accuracy --only frontier [--tasks 8|14|20]` (benchmarks/frontier.py; "
         "`python -m benchmarks.accuracy` runs the accuracy rows above and the frontier). Plots: "
         "benchmarks/results/frontier-<N>tasks.png; all numbers: benchmarks/results/frontier.json. Every tallzip "
         "row is a real `tallzip.pack` (bytes = the archive on disk), each task rebuilt from it and evaluated on "
         "the test split; normalized = mean over tasks of test accuracy / the fine-tuned model's (the paper's "
         "metric), min task = the worst task's; ratio = the N fp32 fine-tuned files / the row's bytes, "
         "'no base' = the same with the base not counted (`pack --base-ref`: the pretrained model is public); "
         "'sections' = the coded sections alone, without the base and the archive's JSON manifest (~330 bytes a "
         "section, so a share of the bytes that shrinks as tensors grow: on this 0.57M-weight ViT it is 6-15% of "
         "an archive, on a ViT-B/32 it would be well under 0.1%). "
         "Rows marked * are on the Pareto front (self-contained bytes).\n")


def short_representations(point) -> str:
    if not point.representations:
        return ""
    counts: dict[str, int] = {}
    for rep in point.representations.values():
        counts[rep] = counts.get(rep, 0) + 1
    return " ".join(f"{n}x{rep}" for rep, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_table(fr: Frontier) -> str:
    ft_bytes = fr.bench.finetuned_bytes
    front = {id(p) for p in pareto_front(fr.points)}
    headers = ["", "row", "bytes", "ratio", "no base", "sections", "normalized", "min task", "tasks kept as"]
    lines = []
    for p in sorted(fr.points, key=lambda p: p.bytes):
        lines.append(["*" if id(p) in front else "", p.label, f"{p.bytes:,}", f"{ft_bytes / p.bytes:.2f}x",
                      f"{ft_bytes / (p.bytes - p.base_bytes):.2f}x", f"{ft_bytes / p.payload_bytes:.2f}x",
                      f"{p.normalized:.2%}", f"{p.min_task:.2%}", short_representations(p)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in (0, 1, 8) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(line) for line in lines)])


COLOURS = {"tall": "tab:blue", "quantized": "tab:green", "exact": "tab:purple", "auto": "tab:red",
           "lossless file coder": "0.5", "reference": "tab:brown", "merge": "tab:orange"}


def plot_frontier(points, n_tasks: int, finetuned_bytes: int, path: Path) -> None:
    """Two columns: the self-contained bytes, and the base not counted; ratio on a log x axis, normalized
    test accuracy on y, the Pareto front as a step line, every point numbered (the key on the right names
    them). The lower row zooms on the top of the accuracy axis, where the compressed points crowd."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 11), layout="constrained")
    plots, key = fig.subfigures(1, 2, width_ratios=(3.2, 1))
    axes = plots.subplots(2, 2, height_ratios=(1, 1.6))
    order = sorted(points, key=lambda p: p.bytes)
    number = {id(p): i for i, p in enumerate(order, 1)}
    top = max(100 * p.normalized for p in points)
    for column, (title, size) in enumerate(BASES[:2]):
        front = pareto_front(points, size=size)
        for row, ax in enumerate(axes[:, column]):
            shown = points if row == 0 else [p for p in points if 100 * p.normalized >= top - 4.0]
            for kind, colour in COLOURS.items():
                chosen = [p for p in shown if p.kind == kind]
                if chosen:
                    ax.scatter([finetuned_bytes / size(p) for p in chosen], [100 * p.normalized for p in chosen],
                               color=colour, label=kind, zorder=3, s=24)
            # the front in ratio terms: the best accuracy reachable at a ratio or less; a step at each point
            ax.step([finetuned_bytes / size(p) for p in front], [100 * p.normalized for p in front], where="post",
                    color="k", linewidth=0.8, alpha=0.6, label="Pareto front", zorder=2)
            for i, p in enumerate(sorted(shown, key=lambda p: (size(p), p.normalized))):
                ax.annotate(str(number[id(p)]), (finetuned_bytes / size(p), 100 * p.normalized),
                            xytext=(4, 4 if i % 2 else -10), textcoords="offset points", fontsize=7,
                            color=COLOURS[p.kind])
            if row == 1:
                low = min(100 * p.normalized for p in shown)
                ax.set_ylim(low - 0.1 * (top - low + 0.1), top + 0.1 * (top - low + 0.1))
            ax.set_xscale("log")
            ax.set_xlabel(f"ratio: the {n_tasks} fp32 fine-tuned files' bytes / the row's bytes (log scale)")
            ax.set_ylabel("normalized test accuracy (% of fine-tuned)")
            ax.grid(True, which="both", linewidth=0.3)
            if row == 0:
                ax.set_title(f"{n_tasks} tasks, {title}", fontsize=10)
                ax.legend(loc="lower left", fontsize=7)
            else:
                ax.set_title(f"zoom: the rows within 4 points of the best, {title}", fontsize=9)
                ax.axhline(99.5, color="tab:red", linestyle=":", linewidth=0.8)
    lines = [f"{number[id(p)]:2d} {p.label}\n   {100 * p.normalized:.2f}% (min {100 * p.min_task:.2f}%), "
             f"{finetuned_bytes / p.bytes:.2f}x / {finetuned_bytes / (p.bytes - p.base_bytes):.2f}x no base"
             for p in order]
    key.text(0.0, 0.99, "\n".join(lines), va="top", ha="left", fontsize=7, family="monospace")
    fig.savefig(path, dpi=110)


def points_from_json(run: dict) -> list:
    """The Points of one run of frontier.json (to plot again without measuring again)."""
    from benchmarks.frontier import Point
    names = set(Point.__dataclass_fields__)
    return [Point(**{"overhead_bytes": 0, **{k: v for k, v in point.items() if k in names}}) for point in run["points"]]


def results_json(fr: Frontier, command: str, timings: dict) -> dict:
    ft_bytes = fr.bench.finetuned_bytes
    return {"command": command, "n_tasks": len(fr.tasks), "tasks": fr.tasks, "finetuned_bytes": ft_bytes,
            "finetuned_test": fr.bench.finetuned["test"],
            "family": {"config_hash": fr.bench.family.info["config_hash"],
                       "parameters": fr.bench.family.info["parameters"]},
            "points": [p.as_dict(ft_bytes) for p in fr.points],
            "pareto_front": [p.label for p in pareto_front(fr.points)],
            "pareto_fronts": {basis: [p.label for p in pareto_front(fr.points, size=size)] for basis, size in BASES},
            "targets": targets_met(fr), "timings_seconds": timings, **fr.extra}


def markdown_block(fr: Frontier, command: str, timings: dict, table: str) -> str:
    n = len(fr.tasks)
    total = sum(v for k, v in timings.items() if k.startswith("frontier"))
    zipnn = [p for p in fr.points if p.label.startswith("zipnn")]
    lines = [f"### {n} tasks", "", "```", f"$ {command}", table, "```", "",
             f"Family: {fr.bench.family.info['parameters']:,}-parameter ViT, config "
             f"{fr.bench.family.info['config_hash']}, {n} tasks; the frontier's points took {total:.0f} s here.",
             "", *(f"- {line}" for line in targets_met(fr))]
    if "frontier: merges" not in timings:
        done = [k.split(": ", 1)[1] for k in timings if k.startswith("frontier")]
        lines.insert(2, f"(PARTIAL: this run was stopped after: {', '.join(done)}.)\n")
    if zipnn and not zipnn[0].settings.get("roundtrip", True):
        lines.append("- zipnn's decode did not give the files back here, so its size is no lossless reference.")
    if "zipnn" in fr.extra:
        lines.append(f"- zipnn: {fr.extra['zipnn']}.")
    return "\n".join(lines) + "\n"


def write_frontier_outputs(fr: Frontier, command: str, timings: dict, results_dir: Path,
                           results_md: Path | None) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(fr)
    write_json(results_json(fr, command, timings), results_dir / "frontier.json")
    plot_frontier(fr.points, len(fr.tasks), fr.bench.finetuned_bytes, results_dir / f"frontier-{len(fr.tasks)}tasks.png")
    if results_md is not None:
        update_results_md(results_md, len(fr.tasks), markdown_block(fr, command, timings, table),
                          title=SECTION_TITLE, intro=INTRO)
    return table


def replot(results_dir: Path) -> int:
    """Plot every run in results_dir/frontier.json again, without measuring again
    (`python -m benchmarks.accuracy --replot`)."""
    import json
    for n, run in json.loads((results_dir / "frontier.json").read_text())["runs"].items():
        plot_frontier(points_from_json(run), int(n), run["finetuned_bytes"], results_dir / f"frontier-{n}tasks.png")
        print(f"wrote {results_dir}/frontier-{n}tasks.png")
    return 0
