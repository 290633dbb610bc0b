"""Plain-text tables for `tallzip info` and `tallzip verify`."""
from __future__ import annotations

import math


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def table(headers, rows) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


DTYPE_WORDS = {"F32": "float32", "F64": "float64", "BF16": "bfloat16", "F16": "float16"}


def lambdas_text(lambdas: dict, n_tasks: int | None = None) -> str:
    """'0.4 (all 8 tasks)' or '0.3: cars, dtd; 0.5: mnist' — the per-task lambdas at a glance (`lambdas`
    of n_tasks' tall tasks only: the others have no mask, hence no lambda)."""
    by_value: dict[float, list] = {}
    for task, lam in lambdas.items():
        by_value.setdefault(lam, []).append(task)
    if len(by_value) == 1 and len(lambdas) == (n_tasks or len(lambdas)):
        return f"{next(iter(by_value)):g} (all {len(lambdas)} tasks)"
    return "; ".join(f"{lam:g}: {_names(tasks)}" for lam, tasks in sorted(by_value.items()))


def format_info(info: dict) -> str:
    merge = info["merge"]["method"] + (f" (density {info['merge']['density']})" if "density" in info["merge"] else "")
    out = [f"archive {info['archive']}: {human_bytes(info['archive_bytes'])}, {len(info['tasks'])} tasks, "
           + (f"mtv by {merge}" if info["mtv_dtype"] else "no mtv (no task kept tall)")
           + (", base by reference" if info["base_by_reference"] else "")]
    mtv = "/".join(DTYPE_WORDS.get(d, d) for d in info["mtv_dtype"]) or "none"
    tall = {t: lam for t, lam in info["lambdas"].items() if info["tasks"][t].get("representation", "tall") == "tall"}
    out.append(f"mtv stored as {mtv}; " + (f"lambdas {lambdas_text(tall, len(info['lambdas']))}" if tall else
                                          "no lambdas (no task kept tall: no mask stored)"))
    level = info["zstd_level"]
    out.append("codecs: " + ", ".join(f"{role} {'/'.join(used)}" for role, used in info["codecs"].items())
               + f"; zstd level {level if level is not None else 'not recorded in the archive'}")
    quantized = [t for t, r in info["tasks"].items() if r.get("representation", "tall")[:1] == "q"
                 or r.get("representation") == "lowrank"]
    out.append("lossless: " + ("yes: " + info["lossless_means"] if info["lossless"] else
                               f"no: task{'s' if len(quantized) > 1 else ''} {', '.join(quantized)} kept quantized"
                               if quantized else
                               f"no: the mtv is rounded to {mtv} (pack with --mtv-dtype float32 for a lossless "
                               "archive)"))
    out.append("")
    out.append(table(
        ["task", "kept as", "lambda", "mask density", "mask bytes", "own bytes", "bits/param", "rebuild estimate"],
        [[t, r.get("representation", "tall"), f"{r['lambda']:g}" if r.get("representation", "tall") == "tall" else "-",
          f"{r['density']:.3f}" if r["mask_bits"] else "-", human_bytes(r["mask_bytes"]),
          human_bytes(r["own_bytes"]), f"{r.get('bits_per_param', r['mask_bits_per_param']):.3f}",
          estimate_text(r.get("estimate")) + (" (poor)" if r.get("estimate_poor") else "")]
         for t, r in info["tasks"].items()]))
    thresholds = thresholds_text(info["estimate_min_cosine"], info.get("estimate_min_cosine_by_representation"))
    out.append("rebuild estimate: data-free, from the weights at pack time (cosine of the rebuilt task vector with "
               f"the original; poor below {thresholds}: the task may keep under 95% of its fine-tuning gain)")
    out.append("bits/param: the task's own sections (mask, or codes and scales, or delta) over the changed "
               "parameters; the mtv, shared by the tall tasks, is not counted")
    out.append("")
    out.append(table(
        ["section", "count", "codec", "bytes", "bits/param"],
        [[role, r["sections"], "/".join(info["codecs"][role]), human_bytes(r["bytes"]), f"{r['bits_per_param']:.3f}"]
         for role, r in sorted(info["sections"].items())]))
    inputs = info["inputs"]
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(info["parameters"]["by_kind"].items()))
    out.append("")
    out.append(f"parameters of the base: {info['parameters']['base']:,} ({kinds})")
    out.append(f"inputs: {inputs['n_tasks']} fine-tuned checkpoints {human_bytes(inputs['tasks_bytes'])}, "
               f"base {human_bytes(inputs['base_bytes'])}")
    out.append(f"ratio: {info['ratio_vs_tasks']:.2f}x against the {inputs['n_tasks']} fine-tuned files, "
               f"{info['ratio_vs_tasks_and_base']:.2f}x against those and the base ({inputs['n_tasks'] + 1} files)")
    out.append("")
    out.append(f"{info['not_checked']} (info reads only the manifest)")
    return "\n".join(out)


def estimate_text(estimate) -> str:
    """A task's data-free rebuild estimate as info and verify print it."""
    if estimate is None:
        return "not recorded"
    sampled = estimate.get("sampled")  # pack sums tall tasks on a sample of pieces (ops/quality.py)
    return (f"cosine {estimate['cosine']:.3f}, rel error {estimate['rel_error']:.3g}"
            + (f", sampled 1/{sampled['every']}" if sampled else ""))


def thresholds_text(min_cosine: float, by_representation: dict | None) -> str:
    """'0.99' or '0.99; lowrank: 0.92': the cosine under which an estimate is called poor, per representation."""
    return "; ".join([f"{min_cosine}"] + [f"{rep}: {v}" for rep, v in (by_representation or {}).items()])


def estimate_lines(estimates: dict, poor: list, min_cosine: float, by_representation: dict | None = None) -> list:
    thresholds = thresholds_text(min_cosine, by_representation)
    out = ["data-free rebuild estimate (recorded by pack; cosine of the rebuilt task vector with the original, "
           f"poor below {thresholds}): " + "; ".join(f"{t} {estimate_text(e)}" for t, e in estimates.items())]
    out += [f"warning: task {t}: its estimate is poor; the rebuilt model may keep under 95% of its fine-tuning gain"
            for t in poor]
    return out


def format_verify(report: dict) -> str:
    out = [f"{report['archive']}: {report['sections']} sections, every checksum and decoding OK"]
    if "estimates" in report:
        out += estimate_lines(report["estimates"], report["estimates_poor"], report["estimate_min_cosine"],
                              report.get("estimate_min_cosine_by_representation"))
    if "tasks" not in report:
        return "\n".join(out)
    family = report["family"]
    n_tasks = len(report["tasks"]) + len(report["tasks_missing"])
    out.append("")
    tall = [t for t, r in report["tasks"].items() if r.get("representation", "tall") == "tall"]
    if not report["mtv_dtypes"]:  # no task kept tall: nothing of the TALL rule is stored, or recomputed
        out.append(f"against {report['against']}: {len(report['tasks'])} of the {n_tasks} tasks"
                   + (f" (missing: {_names(report['tasks_missing'])})" if report["tasks_missing"] else "")
                   + "; each rebuilt task compared with its checkpoint (no mtv or mask is stored)")
    elif family["mtv_recomputed"]:
        masks = "every mask" if len(tall) == len(report["tasks"]) else f"the masks of the tall tasks ({_names(tall)})"
        out.append(f"against {report['against']}: all {n_tasks} tasks; the mtv and {masks} recomputed "
                   "from the checkpoints")
    else:
        out.append(f"against {report['against']}: {len(report['tasks'])} of the {n_tasks} tasks "
                   f"(missing: {_names(report['tasks_missing']) or 'none'}); the mtv is not recomputed "
                   f"({family['why_not']}): masks are checked with the stored mtv, within its rounding")
    if report["checkpoints_not_in_archive"]:
        out.append(f"not in the archive, not checked: {_names(report['checkpoints_not_in_archive'])}")
    out.append("")
    out.append(table(
        ["task", "kept as", "verdict", "mask bits differing", "within mtv rounding", "rel L2 rebuilt vs original",
         "tensors differing"],
        [[t, r.get("representation", "tall"), r["verdict"],
          f"{r['mask_bits_differing']:,} of {r['mask_bits']:,}" if r.get("representation", "tall") == "tall" else "-",
          f"{r['mask_bits_within_mtv_rounding']:,}" if r.get("representation", "tall") == "tall" else "-",
          f"{r['rebuilt_vs_original']['rel_l2']:.3g}",
          _names(r["tensors_differing"] + [d["file"] for d in r["differences"] if "file" in d], 4) or "-"]
         for t, r in report["tasks"].items()]))
    for task, r in report["tasks"].items():
        for d in r["differences"][:20]:
            out.append(f"  {task}: {d.get('tensor') or d.get('file')}: {d['what']}")
        if len(r["differences"]) > 20:
            out.append(f"  {task}: and {len(r['differences']) - 20} more differences")
    out.append("")
    for rep, guarantee in sorted({(r["representation"], r["guarantee"]) for r in report["tasks"].values()
                                  if "guarantee" in r}):
        out.append(f"{rep}: checked that {guarantee}")
    if not report["mtv_dtypes"]:
        out.append("no mtv stored (no task is kept tall)")
    elif family["mtv_recomputed"]:
        differing = family["mtv_tensors_differing"]
        dtypes = "/".join(DTYPE_WORDS.get(d, d) for d in report["mtv_dtypes"])
        if differing:
            out.append(f"stored mtv: NOT the mtv of these checkpoints cast to {dtypes} in {len(differing)} tensors "
                       f"({_names([f'{n} ({k:,} weights)' for n, k in differing.items()], 4)})")
        else:
            out.append(f"stored mtv: the mtv of these checkpoints cast to {dtypes}, bit for bit")
        unlike = family["masks_unlike_recomputed_mtv"]
        if unlike:
            out.append("stored masks unlike the TALL rule with the recomputed mtv: "
                       + ", ".join(f"{t} {k:,} bits" for t, k in unlike.items()))
        elif not differing:
            out.append("stored masks: the TALL rule with the recomputed mtv, bit for bit")
    kept = {r.get("representation", "tall") for r in report["tasks"].values()}
    how = [what for rep, what in (("tall", "tall: base + mask * mtv"), ("q", "qN: the quantized task vector"),
                                  ("lowrank", "lowrank: its quantized top singular triplets"),
                                  ("exact", "exact: bit for bit, 0")) if any(k.startswith(rep) for k in kept)]
    out.append(f"rel L2 is how far each rebuilt task ({'; '.join(how)}) is from its original: the "
               "compression's approximation, reported, not judged")
    if report["verdict"] == "differs":
        bad = [t for t, r in report["tasks"].items() if r["verdict"] == "differs"]
        if bad:
            out.append(f"verdict: DIFFERS: {_names(bad)} in {report['against']} {'are' if len(bad) > 1 else 'is'} "
                       "not what was packed")
        else:
            out.append(f"verdict: DIFFERS: the checkpoints in {report['against']} are not the family packed "
                       "(the mtv or masks recomputed from them, above)")
    else:
        margins = ", ".join(f"{DTYPE_WORDS.get(d, d)}: " + (f"lambda x |mtv| x 2^{math.log2(u):.0f}" if u else "none")
                            for d, u in report["mtv_rounding"].items() if u is not None)
        out.append("verdict: matches: every checked task is the one packed, within what the archive declares"
                   + (f" (mask margin {margins})" if margins else ""))
    return "\n".join(out)


def _names(names: list, limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def format_merge(report: dict) -> str:
    settings = [f"alpha {report['alpha']:g}"]
    if report["k"] is not None:
        settings.append(f"k {report['k']}")
    if report["density"] is not None:
        settings.append(f"density {report['density']:g}")
    if report["lambdas"]:
        values = sorted(set(report["lambdas"].values()))
        settings.append(f"lambda {values[0]:g}" if len(values) == 1 else
                        "lambdas " + ", ".join(f"{t}={v:g}" for t, v in report["lambdas"].items()))
    out = [f"wrote {report['output']}: {report['method']} of {len(report['tasks'])} tasks from the "
           f"{report['source_kind']} {report['source']} ({', '.join(settings)})"]
    if report["consensus_total"]:
        share = report["consensus_kept"] / report["consensus_total"]
        out.append(f"consensus kept {report['consensus_kept']:,} of {report['consensus_total']:,} weights "
                   f"({share:.1%}): those that the masks of at least {report['k']} of the "
                   f"{len(report['tasks'])} tasks use")
    out.append(f"merged {len(report['merged'])} tensors")
    if report["kept_base"]:
        out.append(f"not mergeable, kept as in the base: {_names(report['kept_base'])}")
    if report["task_only"]:
        out.append(f"left out (only in the task checkpoints, not in the base): {_names(report['task_only'])}")
    out.extend(f"note: {note}" for note in report["notes"])
    return "\n".join(out)


def format_agreement(data: dict) -> str:
    n = data["n_tasks"]
    kinds = list(data["kinds"])
    total = data["total"]
    out = [f"mask agreement: how many of the {n} tasks use each weight ({total['params']:,} masked weights; "
           f"{data['unchanged_params']:,} that no task changes are not counted)"]
    out.append("")
    rows = []
    for count in range(n + 1):
        rows.append([count] + [f"{100 * data['kinds'][k]['histogram'][count] / data['kinds'][k]['params']:.2f}%"
                               for k in kinds]
                    + [f"{100 * total['histogram'][count] / total['params']:.2f}%" if total["params"] else "-"])
    out.append(table(["tasks using it"] + kinds + ["total"], rows))
    out.append("")
    summary_rows = [[k, f"{r['params']:,}", f"{r['catastrophic']:.2%}", f"{r['selfish']:.2%}",
                     f"{1 - r['catastrophic'] - r['selfish']:.2%}"]
                    for k, r in [*data["kinds"].items(), ("total", total)] if r["params"]]
    out.append(table(["layer kind", "weights", "catastrophic (0)", "selfish (1)", "shared by >= 2"], summary_rows))
    out.append("")
    out.append(f"layer kinds by name: {data['layer_kind_rule']}")
    return "\n".join(out)


def plot_agreement(data: dict, path) -> None:
    """The histogram of mask agreement as an image: total share as bars, each layer kind as a line."""
    from tallzip.errors import TallzipError
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state
    except ImportError:
        raise TallzipError("--plot needs matplotlib: pip install 'tallzip[plot]'") from None
    n = data["n_tasks"]
    counts = list(range(n + 1))
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    total = data["total"]
    if total["params"]:
        ax.bar(counts, [100 * v / total["params"] for v in total["histogram"]], color="0.8", label="total")
    for kind, row in data["kinds"].items():
        ax.plot(counts, [100 * v / row["params"] for v in row["histogram"]], marker="o", markersize=3, label=kind)
    ax.set_xticks(counts)
    ax.set_xlabel("number of tasks whose TALL mask uses the weight")
    ax.set_ylabel("share of weights (%)")
    ax.set_title(f"Mask agreement over {n} tasks (0: catastrophic, 1: selfish)")
    ax.legend()
    try:
        fig.savefig(path)
    except ValueError as exc:  # an unknown image format
        raise TallzipError(f"{path}: cannot draw the plot ({exc})") from None
