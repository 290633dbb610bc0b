"""Real `lowrank` archives of the language family (issue 22, session 3): bytes on disk and quality, beside the
simulated rows of benchmarks/language/lowbit.py.

Each setting is packed with the `tallzip` command as a user would (self-contained and with --base-ref), checked
with `tallzip verify ARCHIVE --against TASKS`, extracted with `tallzip extract --all`, and every extracted folder is
loaded with transformers' own from_pretrained (no missing or unexpected keys: family.load_model) and scored on the
test split with the benchmark's own Family.score / Family.quality (100% = the fine-tune). Ratios are against the 8
task folders (weights and side files). Beside each task: the simulated quality of the same point from lowbit.py's
store (where it measured one) and the data-free estimate the manifest records (cosine, rel. error).

Usage: python -m benchmarks.language.lowrank_archive [--family DIR] [--work DIR] [--only TEXT ...]
Writes benchmarks/results/lowrank_archive_language.json; per setting results are kept in --work/results.json so an
interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import tallzip

from . import report
from .family import load_model
from .lowbit import FAMILY, STORE
from .scoring import Family, folder_state

OUT = report.RESULTS / "lowrank_archive_language.json"
WORK = Path("/work/cache/i22g/lowrank-language")
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def lowrank_args(energy: float, **quant) -> list[str]:
    """The pack options of a lowrank setting: energy, and {tensor name: code} kept as q* instead of factors (code:
    bits on the symmetric grid, 2 = ternary; or "q2", the asymmetric four-level code of --keep q2)."""
    out = ["--keep", "lowrank", "--lowrank-energy", f"{energy:g}"]
    for name, bits in quant.items():
        out += ["--lowrank-quant", f"{name}={bits}"]
    return out


# (label, short name, pack options, the label of the same point in lowbit.py's store or None)
SETTINGS = [
    ("lowrank e0.98, 4-bit factors", "lr98", lowrank_args(0.98), "low-rank energy 0.98, 4-bit factors"),
    ("lowrank e0.98, 4-bit; embedding q2 (sym: ternary); head q3", "lr98-e2-h3",
     lowrank_args(0.98, **{EMBEDDING: 2, HEAD: 3}), "low-rank energy 0.98, 4-bit; embedding q2; head q3"),
    ("lowrank e0.97, 4-bit; embedding q2 (sym: ternary); head q3", "lr97-e2-h3",
     lowrank_args(0.97, **{EMBEDDING: 2, HEAD: 3}), "low-rank energy 0.97, 4-bit; embedding q2; head q3"),
    ("lowrank e0.98, 4-bit; embedding + head q3", "lr98-e3-h3",
     lowrank_args(0.98, **{EMBEDDING: 3, HEAD: 3}), "low-rank energy 0.98, 4-bit; embedding + head q3"),
    ("lowrank e0.97, 4-bit; embedding + head q3", "lr97-e3-h3", lowrank_args(0.97, **{EMBEDDING: 3, HEAD: 3}), None),
    ("lowrank e0.98, 4-bit; embedding q4; head q3", "lr98-e4-h3", lowrank_args(0.98, **{EMBEDDING: 4, HEAD: 3}), None),
    ("lowrank e0.98, 4-bit; embedding + head q4", "lr98-e4-h4",
     lowrank_args(0.98, **{EMBEDDING: 4, HEAD: 4}), "low-rank energy 0.98, 4-bit; embedding + head q4"),
    ("lowrank e0.98, 4-bit; emb q2 (ternary); head q3; --float-codec planes+ans", "lr98-e2-h3-pa",
     [*lowrank_args(0.98, **{EMBEDDING: 2, HEAD: 3}), "--float-codec", "planes+ans"], None),
    ("lowrank e0.98, 4-bit; emb q2 (ternary); head q3; planes+ans; codes zstd -19", "lr98-e2-h3-pa-z19",
     [*lowrank_args(0.98, **{EMBEDDING: 2, HEAD: 3}), "--float-codec", "planes+ans", "--level", "19",
      "--lowrank-codes-codec", "zstd"], None),
    ("every task q2", "q2", ["--keep", "q2"], "q2 (asym g128, probe count)"),
    # the simulated best point: the embedding as --keep q2 codes it (asymmetric, four levels, an offset per group)
    ("lowrank e0.98, 4-bit; embedding q2 (asym, as --keep q2); head q3", "lr98-eq2-h3",
     lowrank_args(0.98, **{EMBEDDING: "q2", HEAD: 3}), "low-rank energy 0.98, 4-bit; embedding q2; head q3"),
    ("lowrank e0.97, 4-bit; embedding q2 (asym, as --keep q2); head q3", "lr97-eq2-h3",
     lowrank_args(0.97, **{EMBEDDING: "q2", HEAD: 3}), "low-rank energy 0.97, 4-bit; embedding q2; head q3"),
    ("lowrank e0.98, 4-bit; emb q2 (asym); head q3; planes+ans; codes zstd -19", "lr98-eq2-h3-pa-z19",
     [*lowrank_args(0.98, **{EMBEDDING: "q2", HEAD: 3}), "--float-codec", "planes+ans", "--level", "19",
      "--lowrank-codes-codec", "zstd"], None),
    ("lowrank e0.98, 4-bit; emb q2 (asym); head q3; --level 19; codes zstd -19", "lr98-eq2-h3-z19",
     [*lowrank_args(0.98, **{EMBEDDING: "q2", HEAD: 3}), "--level", "19", "--lowrank-codes-codec", "zstd"], None),
]


def tallzip_cli(*args) -> tuple[str, str]:
    """Run the `tallzip` command as a user would: (stdout, stderr), or a one-line failure."""
    done = subprocess.run([sys.executable, "-m", "tallzip.cli.main", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tallzip {' '.join(map(str, args))}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout, done.stderr


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(fam: Family, folder: Path, work: Path, name: str, options: list[str], log) -> dict:
    """Pack (self-contained and --base-ref), verify --against, extract --all, load and score every task."""
    tasks_dir, base_dir = folder / "tasks", folder / "base"
    path, ref = work / f"{name}.tallz", work / f"{name}-ref.tallz"
    start = time.perf_counter()
    _, warnings = tallzip_cli("pack", tasks_dir, "--base", base_dir, "-o", path, "--force", *options)
    pack_s = time.perf_counter() - start
    tallzip_cli("pack", tasks_dir, "--base", base_dir, "-o", ref, "--force", "--base-ref", *options)
    verified, _ = tallzip_cli("verify", path, "--against", tasks_dir, "--json")
    out = work / f"{name}.extract"
    shutil.rmtree(out, ignore_errors=True)
    tallzip_cli("extract", path, "--all", "-o", out)
    with tallzip.open(str(path)) as archive:
        manifest = archive.manifest
    sections = {}
    for sec in manifest["sections"]:
        sections[sec["role"]] = sections.get(sec["role"], 0) + sec["length"]
    entries = {t["name"]: t for t in manifest["tasks"]}
    per_task = {}
    for task in fam.tasks:
        score = fam.score(task, load_model(out / task), "test")  # from_pretrained of the extracted folder
        entry = entries[task]
        per_task[task] = {"quality": fam.quality(task, score, "test"), "score": score,
                          "representation": entry.get("representation"), "estimate": entry.get("estimate"),
                          "ranks": {r[0]: r[1] for r in (entry.get("lowrank") or {}).get("tensors", [])}}
    shutil.rmtree(out, ignore_errors=True)
    log(f"  {name}: {path.stat().st_size:,} B, --base-ref {ref.stat().st_size:,} B, pack {pack_s:.0f} s")
    return {"bytes": path.stat().st_size, "ref_bytes": ref.stat().st_size, "sections": sections,
            "section_count": len(manifest["sections"]), "pack_seconds": round(pack_s, 1),
            "pack_stderr": [line for line in warnings.splitlines() if line.startswith(("warning", "note"))],
            "verify": json.loads(verified), "per_task": per_task}


def examples_lost(fam: Family, task: str, quality: float) -> int:
    """Test examples a classification task gets wrong beyond the fine-tune's (lowbit.py's Probe.examples_lost)."""
    finetuned = fam.meta["scores"]["finetuned"][task]["test"]["accuracy"]
    return round((1 - quality) * finetuned * fam.data(task)["test"]["input_ids"].shape[0])


def row(fam: Family, label: str, sim_label: str | None, result: dict, folders: int, params: int,
        simulated: dict) -> dict:
    tasks = list(result["per_task"])
    quality = {t: result["per_task"][t]["quality"] for t in tasks}
    sections = result["sections"]
    payload = sum(sections.values()) - sections.get("base", 0) - sections.get("file", 0)
    generative = [quality[t] for t in tasks if fam.kind(t) == "generative"]
    lost = {t: examples_lost(fam, t, quality[t]) for t in tasks if fam.kind(t) == "classification"}
    sim = simulated.get(sim_label or "", {})
    sim_quality = {t: sim[t]["quality"] for t in tasks if t in sim}
    return {"label": label, "bytes": result["bytes"], "ref_bytes": result["ref_bytes"],
            "ratio": folders / result["bytes"], "ratio_base_ref": folders / result["ref_bytes"],
            "bits_per_weight": 8 * payload / len(tasks) / params, "payload_bytes": payload,
            "manifest_bytes": result["bytes"] - sum(sections.values()),
            "worst_generative": min(generative), "classification_examples_lost": lost,
            "most_examples_lost": max(lost.values()),
            "normalized": statistics.mean(quality.values()), "min_task": min(quality.values()),
            "worst_task": min(quality, key=quality.get), "per_task": quality,
            "simulated_label": sim_label if sim_quality else None,
            "simulated_per_task": sim_quality,
            "simulated_normalized": statistics.mean(sim_quality.values()) if len(sim_quality) == len(tasks) else None,
            "simulated_min_task": min(sim_quality.values()) if len(sim_quality) == len(tasks) else None,
            "largest_difference": max((abs(quality[t] - sim_quality[t]) for t in sim_quality), default=None),
            "verify": {"ok": result["verify"]["ok"], "verdict": result["verify"].get("verdict"),
                       "tasks": {t: v.get("verdict") for t, v in result["verify"].get("tasks", {}).items()}},
            "pack_seconds": result["pack_seconds"],
            "estimates": {t: result["per_task"][t]["estimate"] for t in tasks},
            "ranks": {t: result["per_task"][t]["ranks"] for t in tasks}}


def table(rows: list[dict]) -> str:
    head = (f"{'archive (real, tallzip pack)':58s} {'bytes':>10s} {'b/w/task':>8s} {'self-cont.':>10s} "
            f"{'base-ref':>8s} {'mean':>7s} {'worst task':>21s} {'gen worst':>9s} {'lost':>4s} {'sim. mean':>9s} {'sim. worst':>10s} {'max |d|':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sim = (f"{r['simulated_normalized']:9.1%} {r['simulated_min_task']:10.1%} {r['largest_difference']:7.2%}"
               if r["simulated_normalized"] is not None else f"{'-':>9s} {'-':>10s} {'-':>7s}")
        lines.append(f"{r['label'][:58]:58s} {r['bytes']:10,d} {r['bits_per_weight']:8.3f} {r['ratio']:9.2f}x "
                     f"{r['ratio_base_ref']:7.2f}x {r['normalized']:7.1%} {r['min_task']:7.1%} "
                     f"({r['worst_task'][:11]:>11s}) {r['worst_generative']:9.1%} {r['most_examples_lost']:4d} {sim}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.language.lowrank_archive",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, default=FAMILY, help="the language family's cache folder")
    parser.add_argument("--store", type=Path, default=STORE, help="lowbit.py's simulated results (read only)")
    parser.add_argument("--work", type=Path, default=WORK, help="archives and per-setting results (kept)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="settings whose name contains one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.language.lowrank_archive " + " ".join(sys.argv[1:] if argv is None else argv)
    if not (args.family / "family.json").is_file():
        print(f"error: {args.family} is not a built language family (python -m benchmarks.language)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    log = lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)  # noqa: E731
    fam = Family(args.family)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    simulated = json.loads(args.store.read_text()) if args.store.exists() else {}
    folders = sum(folder_bytes(args.family / "tasks" / t) for t in fam.tasks)
    params = sum(v.numel() for v in folder_state(args.family / "base").values() if v.is_floating_point())
    for label, name, options, _ in SETTINGS:
        if name in results or (args.only and not any(text in name for text in args.only)):
            continue
        log(f"{label}: tallzip pack {' '.join(options)}")
        results[name] = measure(fam, args.family, args.work, name, options, log)
        results_path.write_text(json.dumps(results))
    rows = [row(fam, label, sim, results[name], folders, params, simulated)
            for label, name, _, sim in SETTINGS if name in results]
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "family": str(args.family), "folders_bytes": folders,
                                    "params": params, "options": {n: o for _, n, o, _ in SETTINGS},
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
