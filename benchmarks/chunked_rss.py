"""Peak RSS and wall time of pack / extract / verify --against / merge on a generated bf16 family with
one 32000x4096 tensor, for several N read from one family (the first N of its tasks).

    python -m benchmarks.chunked_rss --tasks 2 8 20 --work /tmp/rss [--python OTHER-VENV/bin/python] [--keep]

Writes base + N task checkpoints (a 32000x4096 bf16 embedding, a 4096x4096 bf16 matrix and a small
LayerNorm vector each), then runs `tallzip pack` and `tallzip extract` of one task as subprocesses
(and verify --against the inputs, and a consensus merge from the archive)
under /usr/bin/time -v and prints their peak RSS and wall time. One run each: a quick check of the
memory bound, not a speed benchmark. Files are deleted at the end unless --keep.

Measured 2026-12-01 on the shared 2-CPU machine (load average 8-15 from other sessions, so wall
times and "mean CPUs used" say more about the neighbours than about tallzip; CPU seconds and peak
RSS are the comparable figures), default options, one run each:

| N | code | pack peak RSS | pack CPU s | extract peak RSS | extract CPU s | archive |
|---|---|---|---|---|---|---|
| 2 | before (format v1, main b84d9a5) | 6.30 GiB | 47.5 | 4.34 GiB | 24.7 | 0.338 GiB |
| 2 | after (format v2, chunks of 2^22) | 0.76 GiB | 39.8 | 0.90 GiB | 17.0 | 0.338 GiB |
| 4 | before | 6.83 GiB | 59.4 | 4.33 GiB | 22.6 | 0.394 GiB |
| 4 | after | 0.75 GiB | 46.4 | 0.85 GiB | 16.3 | 0.394 GiB |

    python -m benchmarks.chunked_rss --tasks 2 --python /work/main/.venv/bin/python   # before
    python -m benchmarks.chunked_rss --tasks 2                                       # after
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"embed.weight": (32000, 4096), "layer.0.w": (4096, 4096), "layer.0.norm": (4096,)}


def write_family(folder: Path, n_tasks: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in SHAPES.items()}
    save_file(base, str(folder / "base.safetensors"))
    for t in range(n_tasks):
        task = {}
        for n, x in base.items():
            delta = torch.randn(x.shape, generator=g) * 0.002
            delta *= torch.rand(x.shape, generator=g) < 0.3
            task[n] = (x.float() + delta).to(torch.bfloat16)
            del delta
        save_file(task, str(folder / "tasks" / f"task{t}.safetensors"))
        del task


def timed(cmd):
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    return wall, rss, cpu


def commands(tallzip, fam: Path, tasks: Path, archive: Path, out: Path, merged: Path, pack_args: str):
    """The bounded commands, in order: pack, extract of one task, verify against the inputs, merge."""
    return {
        "pack": [*tallzip, "pack", str(tasks), "--base", str(fam / "base.safetensors"), "-o", str(archive),
                 "--force", *pack_args.split()],
        "extract": [*tallzip, "extract", str(archive), "--task", "task0", "-o", str(out), "--force"],
        "verify": [*tallzip, "verify", str(archive), "--against", str(tasks)],
        "merge": [*tallzip, "merge", str(archive), "--method", "consensus-ta", "-o", str(merged), "--force"],
    }


def subset(fam: Path, n: int) -> Path:
    """A folder of the first n task checkpoints (symbolic links), so every N reads the same files."""
    folder = fam / f"first{n}"
    folder.mkdir(exist_ok=True)
    for t in range(n):
        link = folder / f"task{t}.safetensors"
        if not link.exists():
            link.symlink_to(fam / "tasks" / f"task{t}.safetensors")
    return folder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, nargs="+", default=[2], help="family sizes (one family of the largest)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tallzip-rss"))
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose tallzip runs (another venv: before/after)")
    parser.add_argument("--pack-args", default="", help="extra pack arguments, e.g. '--memory 256M'")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    largest = max(args.tasks)
    fam = args.work / f"fam{largest}"
    if not (fam / "tasks" / f"task{largest - 1}.safetensors").exists():
        write_family(fam, largest)
    tallzip = [args.python, "-m", "tallzip.cli.main"]
    try:
        for n in sorted(args.tasks):
            tasks = subset(fam, n)
            archive = args.work / f"fam{n}.tallz"
            runs = {label: timed(cmd) for label, cmd in commands(
                tallzip, fam, tasks, archive, args.work / "task0.safetensors", args.work / "merged.safetensors",
                args.pack_args).items()}
            inputs = sum(p.stat().st_size for p in tasks.iterdir())
            print(f"N={n} inputs {inputs / 2**30:.2f} GiB, archive {archive.stat().st_size / 2**30:.3f} GiB", flush=True)
            for label, (wall, rss, cpu) in runs.items():
                print(f"  {label:8s} wall {wall:7.1f} s  peak RSS {rss / 2**30:5.2f} GiB  CPU {cpu:7.1f} s "
                      f"(mean CPUs used {cpu / wall:.2f})", flush=True)
            archive.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
