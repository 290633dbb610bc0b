"""Plain-text tables for `tallzip info` and `tallzip verify`."""
from __future__ import annotations


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


def format_info(info: dict) -> str:
    merge = info["merge"]["method"] + (f" (density {info['merge']['density']})" if "density" in info["merge"] else "")
    out = [f"archive {info['archive']}: {human_bytes(info['archive_bytes'])}, {len(info['tasks'])} tasks, "
           f"mtv by {merge}" + (", base by reference" if info["base_by_reference"] else "")]
    out.append("")
    out.append(table(
        ["task", "lambda", "mask density", "mask bytes", "mask bits/param", "own bytes"],
        [[t, f"{r['lambda']:g}", f"{r['density']:.3f}", human_bytes(r["mask_bytes"]),
          f"{r['mask_bits_per_param']:.3f}", human_bytes(r["own_bytes"])] for t, r in info["tasks"].items()]))
    out.append("")
    out.append(table(
        ["section", "count", "bytes", "bits/param"],
        [[role, r["sections"], human_bytes(r["bytes"]), f"{r['bits_per_param']:.3f}"]
         for role, r in sorted(info["sections"].items())]))
    inputs = info["inputs"]
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(info["parameters"]["by_kind"].items()))
    out.append("")
    out.append(f"parameters of the base: {info['parameters']['base']:,} ({kinds})")
    out.append(f"inputs: {inputs['n_tasks']} fine-tuned checkpoints {human_bytes(inputs['tasks_bytes'])}, "
               f"base {human_bytes(inputs['base_bytes'])}")
    out.append(f"ratio: {info['ratio_vs_tasks']:.2f}x against the {inputs['n_tasks']} fine-tuned files, "
               f"{info['ratio_vs_tasks_and_base']:.2f}x against those and the base ({inputs['n_tasks'] + 1} files)")
    return "\n".join(out)


def format_verify(report: dict) -> str:
    out = [f"{report['archive']}: {report['sections']} sections, every checksum and decoding OK"]
    if "tasks" in report:
        out.append("")
        out.append(table(
            ["task", "max |err| vs original", "rel L2 vs original", "max |err| vs formula", "rel L2 vs formula",
             "mask bits differing"],
            [[t, f"{r['vs_original']['max_abs']:.3g}", f"{r['vs_original']['rel_l2']:.3g}",
              f"{r['vs_formula']['max_abs']:.3g}", f"{r['vs_formula']['rel_l2']:.3g}", r["mask_bits_differing"]]
             for t, r in report["tasks"].items()]))
    return "\n".join(out)
