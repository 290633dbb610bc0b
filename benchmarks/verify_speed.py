"""verify against pack, timed back to back on one generated ViT-B/32-shaped family (issue 11, item 7).

Each round runs, one after the other and each in a fresh process: `tallzip pack`, `tallzip verify`,
`tallzip verify --against` (the same family), for this checkout and, with --before SRC, for another
source tree laid out as an installed package (SRC/tallzip with cli/ and formats/ inside, as
`git archive` + three copies make it). Rounds alternate the trees, so both see the same machine
load; the table gives the median of the rounds and verify's time over pack's of the same tree.
The page cache is warm (the inputs were just written or read, the archive just packed).

Then one verify --against in this process with a progress callback: the longest stretch without a
progress update, and the time from the last update to the end, show whether the progress bar
follows the whole run.

    python -m benchmarks.verify_speed --tasks 8 --rounds 3 [--before /tmp/before]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_run(args: list, pythonpath: str | None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit code) of `python -m tallzip.cli.main ARGS`."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tallzip.cli.main", *map(str, args)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wall, cpu, proc.returncode


def progress_gaps(archive: Path, against: Path) -> dict:
    import tallzip
    from tallzip.verification.verify import verify
    stamps = []
    start = time.perf_counter()
    with tallzip.open(archive) as arc:
        verify(arc, against, progress=lambda label, done, total: stamps.append((time.perf_counter(), label)))
    end = time.perf_counter()
    times = [start] + [t for t, _ in stamps]
    return {"seconds": end - start, "updates": len(stamps), "labels": sorted({lab for _, lab in stamps}),
            "longest_silence_s": max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else end - start,
            "after_last_update_s": end - times[-1]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another source tree to time the same way (e.g. the last release)")
    parser.add_argument("--before-steps", nargs="+", default=["pack", "verify", "verify --against"],
                        help="steps to time for --before (pack: skip when its pack code is the same; then its "
                             "verify reads this checkout's archive)")
    parser.add_argument("--after", type=Path, help="a snapshot of this checkout to time instead of the live tree")
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds), to try the script")
    parser.add_argument("--work", type=Path, help="where to generate the family (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    from tallzip.demo import VIT_B32, make_family
    from benchmarks.speed import QUICK_SHAPE

    work = args.work or Path(tempfile.mkdtemp(prefix="tallzip-verify-speed-"))
    trees = {"this checkout": str(args.after.resolve()) if args.after else None}
    if args.before:
        trees["before"] = str(args.before.resolve())
    try:
        t0 = time.perf_counter()
        tasks_dir, base = work / "family" / "finetuned", work / "family" / "base.safetensors"
        if not (base.exists() and len(list(tasks_dir.glob("*.safetensors"))) == args.tasks):  # --work keeps it
            base, tasks_dir = make_family(work / "family", args.tasks, **(QUICK_SHAPE if args.quick else VIT_B32))
        print(f"generated {args.tasks} {'small' if args.quick else 'ViT-B/32-shaped'} checkpoints in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        all_steps = ["pack", "verify", "verify --against"]
        chosen = {"this checkout": all_steps, "before": args.before_steps}
        times = {tree: {step: [] for step in chosen[tree]} for tree in trees}
        cpu = {tree: {step: [] for step in chosen[tree]} for tree in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for tree in order:
                own = "pack" in chosen[tree]
                archive = work / f"family-{list(trees).index(tree) if own else 0}.tallz"
                steps = {"pack": ["pack", tasks_dir, "--base", base, "-o", archive, "--force"],
                         "verify": ["verify", archive],
                         "verify --against": ["verify", archive, "--against", tasks_dir]}
                for step, cmd in steps.items():
                    if step not in chosen[tree]:
                        continue
                    wall, cpu_s, code = timed_run(cmd, trees[tree])
                    times[tree][step].append(wall)
                    cpu[tree][step].append(cpu_s)
                    print(f"round {r + 1} {tree:>13} {step:<17} {wall:6.1f} s wall {cpu_s:6.1f} s CPU "
                          f"exit {code} (load {os.getloadavg()[0]:.1f})", flush=True)
        print()
        print(f"median of {args.rounds} rounds, N = {args.tasks}, warm page cache:")
        print(f"{'tree':<14} {'pack s':>8} {'verify s':>9} {'verify/pack':>12} {'--against s':>12} "
              f"{'against/pack':>13} {'CPU s pack/verify/against':>27}")
        pack_of = {tree: ("pack" if "pack" in chosen[tree] else None) for tree in trees}
        for tree in trees:
            med = {step: statistics.median(v) for step, v in times[tree].items()}
            med_cpu = {step: statistics.median(v) for step, v in cpu[tree].items()}
            own_pack = times[tree] if pack_of[tree] else times["this checkout"]
            pack_s = statistics.median(own_pack["pack"])
            pack_cpu = statistics.median((cpu[tree] if pack_of[tree] else cpu["this checkout"])["pack"])
            cell = (lambda step, f: f(med[step]) if step in med else "-")
            print(f"{tree:<14} {pack_s:8.1f} {cell('verify', lambda v: f'{v:9.1f}'):>9} "
                  f"{cell('verify', lambda v: f'{v / pack_s:12.2f}'):>12} "
                  f"{cell('verify --against', lambda v: f'{v:12.1f}'):>12} "
                  f"{cell('verify --against', lambda v: f'{v / pack_s:13.2f}'):>13} "
                  f"{pack_cpu:9.1f}/{med_cpu.get('verify', float('nan')):.1f}/"
                  f"{med_cpu.get('verify --against', float('nan')):.1f}")
        archive = work / "family-0.tallz"
        gaps = progress_gaps(archive, tasks_dir)
        print(f"\nprogress of one verify --against ({gaps['seconds']:.1f} s, this checkout): {gaps['updates']} updates "
              f"({', '.join(gaps['labels'])}), longest stretch without one {gaps['longest_silence_s']:.1f} s, "
              f"{gaps['after_last_update_s']:.2f} s from the last one to the end")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
