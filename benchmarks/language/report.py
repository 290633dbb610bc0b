"""Tables, plots and the JSON of the language benchmark (benchmarks/results/language.json, language-*.png)."""
from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
JSON_PATH = RESULTS / "language.json"
STATS = ("rel_l2", "energy_kept", "cosine")


def _rank(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def pearson(x, y) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx and sy else float("nan")


def calibration(result: dict) -> dict:
    """How well each data-free statistic of a rebuild tracks its measured quality, over every lossy archive and
    BitDelta row x task (Pearson and Spearman), overall and per task kind."""
    points = [(t, row["label"], entry) for row in result["rows"] if row["kind"] in ("archive", "rival")
              and "exact" not in row["label"] for t, entry in row["tasks"].items() if "energy_kept" in entry]
    kinds = result["family_meta"]["tasks"]
    out = {"points": len(points)}
    for scope in ("all", "generative", "classification"):
        sel = [p for p in points if scope == "all" or kinds[p[0]]["kind"] == scope]
        q = [p[2]["quality"] for p in sel]
        out[scope] = {s: {"pearson": pearson([p[2][s] for p in sel], q),
                          "spearman": pearson(_rank([p[2][s] for p in sel]), _rank(q))} for s in STATS}
        out[scope]["n"] = len(sel)
    # the simplest rule: a rebuild keeping >= E of tau's energy keeps >= 95% quality?
    rules = {}
    for threshold in (0.9, 0.95, 0.98, 0.99):
        passed = [p for p in points if p[2]["energy_kept"] >= threshold]
        rules[str(threshold)] = {"passed": len(passed),
                                 "worst_quality_of_passed": min((p[2]["quality"] for p in passed), default=None),
                                 "poor_missed": sum(1 for p in passed if p[2]["quality"] < 0.95)}
    out["energy_threshold_rules"] = rules
    return out


def fmt_bytes(n):
    return f"{n:,}" if n else ""


def table(result: dict) -> str:
    lines = ["| row | bytes | ratio vs task folders | no base | mean quality | worst task | generative (gain kept) | classification (norm. acc) | tasks kept as |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["kind"] != "reference", -(r["ratio"] or 0))):
        lines.append(f"| {r['label']} | {fmt_bytes(r['bytes'])} | {r['ratio']:.2f}x | " if r["bytes"] else f"| {r['label']} | | | ")
        lines[-1] += (f"{r['ratio_no_base']:.2f}x | " if r.get("ratio_no_base") else "| ")
        lines[-1] += (f"{100 * r['mean_quality']:.1f}% | {100 * r['worst_quality']:.1f}% ({r['worst_task']}) | "
                      f"{100 * r['mean_generative']:.1f}% | {100 * r['mean_classification']:.1f}% | {r.get('kept', '')} |")
    return "\n".join(lines)


def task_table(result: dict, stat: str = "quality") -> str:
    rows = [r for r in result["rows"] if r["kind"] in ("archive", "rival", "merge")]
    tasks = list(result["family_meta"]["tasks"])
    short = {r["label"]: r["label"].split(" (")[0].replace("every task ", "") for r in rows}
    lines = ["| task | " + " | ".join(short[r["label"]] for r in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for t in tasks:
        cells = []
        for r in rows:
            v = r["tasks"][t].get(stat)
            cells.append("" if v is None else (f"{100 * v:.1f}" if stat == "quality" else f"{v:.3f}"))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_table(result: dict) -> str:
    meta = result["family_meta"]
    lines = ["| task | kind | source | base (test) | fine-tuned (test) | fine-tune s |", "|---|---|---|---|---|---|"]
    for t, info in meta["tasks"].items():
        b, f = meta["scores"]["base"][t]["test"], meta["scores"]["finetuned"][t]["test"]
        key = "loss" if "loss" in b else "accuracy"
        unit = "loss " if key == "loss" else "acc "
        lines.append(f"| {t} | {info['kind']} | {info['source']} | {unit}{b[key]:.3f} | {unit}{f[key]:.3f} | "
                     f"{meta['times']['finetune_s'][t]:.0f} |")
    return "\n".join(lines)


def diagnosis_table(result: dict) -> str:
    diag = result["extra"]["tall_diagnosis"]
    lines = ["| task | lambda | mask density | weights changed | energy in top 20% | median abs(o_t)/abs(tau_t) | interference | dropped | rel L2 | gain kept / norm. acc (tall, sum) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t, d in diag["tasks"].items():
        lines.append(f"| {t} | {d['lambda']} | {d['mask_density']:.3f} | {d['changed_share']:.3f} | {d['top20_energy_share']:.3f} | "
                     f"{d['others_over_own_median']:.2f} | {d['interference_energy']:.3f} | {d['dropped_energy']:.3f} | "
                     f"{d['rel_l2']:.3f} | {100 * d['quality_tall_sum']:.1f}% |")
    lines.append(f"\nMean pairwise cosine of task vectors {diag['mean_pair_cosine']:.3f}; mean Jaccard of the top-20% "
                 f"supports {diag['mean_pair_top20_jaccard']:.3f} (two random 20% supports: {diag['random_top20_jaccard']:.3f}).")
    return "\n".join(lines)


def lossless_table(result: dict) -> str:
    """exact against BitX and zipnn, by part: the base, the 8 tasks' tensors, the side files, the rest."""
    exact = next(r for r in result["rows"] if r["label"] == "every task exact")
    bitx, zipnn = result["extra"]["bitx"], result["extra"]["zipnn"]
    sec = exact["sections"]
    own = sum(v for k, v in sec.items() if k not in ("base", "file"))
    rest = exact["bytes"] - sum(sec.values())
    lines = ["| coder | base | 8 tasks' tensors | side files | manifest, header | total | ratio | no base |",
             "|---|---|---|---|---|---|---|---|",
             f"| tallzip exact | {sec.get('base', 0):,} | {own:,} | {sec.get('file', 0):,} | {rest:,} | {exact['bytes']:,} | "
             f"{exact['ratio']:.2f}x | {exact['ratio_no_base']:.2f}x |"]
    if isinstance(zipnn, dict):
        for label, tensors in (("BitX-style (base: zipnn)", bitx["tensor_bytes"]), (f"zipnn {zipnn['version']}", zipnn["task_weight_bytes"])):
            total = zipnn["base_bytes"] + tensors + bitx["side_files_zstd3"]
            lines.append(f"| {label} | {zipnn['base_bytes']:,} | {tensors:,} | {bitx['side_files_zstd3']:,} (zstd-3) | | {total:,} | "
                         f"{result['folders_bytes'] / total:.2f}x | {result['folders_bytes'] / (total - zipnn['base_bytes']):.2f}x |")
    return "\n".join(lines)


def text(result: dict) -> str:
    parts = ["Family:", scores_table(result), "", "Rows (quality = gain kept for generative tasks, accuracy / the "
             "fine-tune's for classification; mean and worst over the 8 tasks, test split):", table(result), "",
             "Per task, quality in %:", task_table(result), "", "Per task, energy of tau_t kept (data-free):",
             task_table(result, "energy_kept"), "", "Why tall does poorly (sum mtv, lambda on val):",
             diagnosis_table(result), "", "Lossless coders:", lossless_table(result), "", "Calibration of the data-free statistics:",
             json.dumps(result["calibration"], indent=1)]
    return "\n".join(parts)


def plots(result: dict, prefix: str = "language") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    rows = [r for r in result["rows"] if r["bytes"] and r["kind"] != "reference"]
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = {"archive": "tab:blue", "rival": "tab:red", "rival lossless": "tab:orange"}
    for r in rows:
        c = colors.get(r["kind"], "gray")
        ax.scatter(r["ratio"], 100 * r["mean_quality"], color=c)
        ax.scatter(r["ratio"], 100 * r["worst_quality"], color=c, marker="v", alpha=0.5)
        ax.plot([r["ratio"]] * 2, [100 * r["worst_quality"], 100 * r["mean_quality"]], color=c, alpha=0.3)
        ax.annotate(r["label"].split(" (")[0].replace("every task ", "").replace(", lambda on val", " val")[:28],
                    (r["ratio"], 100 * r["mean_quality"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(95, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("size ratio against the 8 task folders (bf16, sharded)")
    ax.set_ylabel("quality, % (mean o, worst task v): gain kept / normalized accuracy")
    n = result["family_meta"]["parameters"]
    ax.set_title(f"Language family: Llama {n / 1e6:.1f}M trained here, 8 full fine-tunes")
    fig.tight_layout()
    path = RESULTS / f"{prefix}-frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in result["rows"]:
        if r["kind"] not in ("archive", "rival") or "exact" in r["label"]:
            continue
        xs = [e["energy_kept"] for e in r["tasks"].values()]
        ys = [100 * e["quality"] for e in r["tasks"].values()]
        axes[0].scatter(xs, ys, s=14, label=r["label"].split(" (")[0].replace("every task ", "")[:24])
        axes[1].scatter([e["cosine"] for e in r["tasks"].values()], ys, s=14)
    axes[0].set_xlabel("energy of tau_t kept by the rebuild (1 - rel L2^2; axis clipped at -1)")
    axes[1].set_xlabel("cosine(rebuilt task vector, tau_t)")
    for ax in axes:
        ax.set_ylabel("quality, %")
        ax.axhline(95, color="gray", ls=":", lw=1)
    axes[0].set_xlim(left=max(-1.0, axes[0].get_xlim()[0]))
    axes[0].legend(fontsize=6)
    fig.suptitle("Data-free statistics against measured quality (task x representation)")
    fig.tight_layout()
    path = RESULTS / f"{prefix}-calibration.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def write(result: dict, path: Path = JSON_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
