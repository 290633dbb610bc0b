"""pack, extract and load of one family by two checkouts of tallzip, side by side in one run.

    python -m benchmarks.ab_speed --other /path/to/main/checkout --tasks DIR --base PATH --work DIR

Each command runs in a fresh process (benchmarks.speed's child, so the interpreter's imports are
not counted) on a cold page cache, the two checkouts alternately, `--repeat` times; the median
wall seconds and CPU seconds of each are printed with the ratios benchmarks.speed reports (pack /
reading the inputs, extract / safetensors load+save of the original, load / reading the original).
The two archives are compared byte for byte. The other checkout needs the layout the editable
install maps (tallzip/formats and tallzip/cli resolving to formats/ and cli/): this script links
them when they are missing.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.speed import all_files, evict, loadavg, read_all

REPO = Path(__file__).resolve().parent.parent


def _importable(checkout: Path) -> Path:
    """The checkout, with tallzip.formats / tallzip.cli importable from it as a plain path."""
    for sub in ("formats", "cli"):
        link = checkout / "tallzip" / sub
        if not link.exists():
            link.symlink_to(Path("..") / sub)
    return checkout


def child(checkout: Path, op: str, **spec) -> dict:
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--child", json.dumps({"op": op, **spec})],
                          cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout} {op}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="the checkout to compare with (e.g. main)")
    parser.add_argument("--tasks", type=Path, required=True, help="folder of task checkpoints")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for archives and outputs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ops", nargs="+", default=["pack", "extract", "load"])
    args = parser.parse_args(argv)
    checkouts = {"other": _importable(args.other.resolve()), "this": REPO}
    tasks = {p.name.split(".")[0]: p for p in sorted(args.tasks.iterdir()) if not p.name.startswith(".")}
    task, original = next(iter(tasks.items()))
    inputs = all_files([args.base, *tasks.values()])
    args.work.mkdir(parents=True, exist_ok=True)
    archives = {k: args.work / f"{k}.tallz" for k in checkouts}
    out = args.work / (f"{task}.out" if original.is_dir() else f"{task}.safetensors")
    print(f"{len(tasks)} tasks from {args.tasks}; other = {args.other}, this = {REPO}; load average {loadavg()}")

    def clear():
        for leftover in (out, args.work / "resaved"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        evict(inputs + list(archives.values()))

    runs = {}  # (op, who) -> [result]
    reads = []
    for _ in range(args.repeat):
        evict(inputs)
        reads.append(read_all(inputs))
    specs = {
        "pack": lambda who: dict(tasks={k: str(v) for k, v in tasks.items()}, base=args.base,
                                 output=archives[who], device="cpu"),
        "extract": lambda who: dict(archive=archives[who], task=task, output=out, device="cpu"),
        "load": lambda who: dict(archive=archives[who], task=task, device="cpu"),
    }
    for op in args.ops:
        for _ in range(args.repeat):
            for who, checkout in checkouts.items():  # alternately, so load from others hits both alike
                clear()
                runs.setdefault((op, who), []).append(child(checkout, op, **specs[op](who)))
    baselines = {}
    for op, base_op in (("extract", "load_save_original"), ("load", "load_original")):
        if op in args.ops:
            results = []
            for _ in range(args.repeat):
                clear()
                evict(all_files([original]))
                results.append(child(REPO, base_op, original=original, output=args.work / "resaved"))
            baselines[op] = statistics.median(r["seconds"] for r in results)
    clear()
    read_s = statistics.median(reads)
    print(f"read all inputs once, cold: {read_s:.2f} s (median of {args.repeat})")
    for op in args.ops:
        reference = read_s if op == "pack" else baselines[op]
        what = {"pack": "read", "extract": "load+save", "load": "load orig"}[op]
        for who in checkouts:
            rs = runs[(op, who)]
            wall, cpu = statistics.median(r["seconds"] for r in rs), statistics.median(r["cpu_s"] for r in rs)
            rss = max(r["peak_rss_kib"] - r["rss_before_kib"] for r in rs) / (1 << 20)
            print(f"  {op:8s} {who:5s}: wall {wall:6.2f} s ({', '.join(format(r['seconds'], '.2f') for r in rs)}), "
                  f"CPU {cpu:6.2f} s, CPUs used {cpu / wall:.2f}, peak RSS +{rss:.2f} GiB; "
                  f"/ {what} ({reference:.2f} s) = {wall / reference:.2f}x")
    if "pack" in args.ops:
        same = filecmp.cmp(archives["other"], archives["this"], shallow=False)
        print(f"archives byte-identical: {same}")
    print(f"load average at the end {loadavg()}")


if __name__ == "__main__":
    main()
