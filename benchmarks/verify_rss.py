"""Peak RSS and CPU time of `tallzip verify` and `verify --against` on a generated bf16 family with one
32000x4096 tensor (benchmarks/chunked_rss.py's family), each in a subprocess under /usr/bin/time -v.

    python -m benchmarks.verify_rss --tasks 8 --work /tmp/vrss [--memory 1.5G] [--pythonpath OLD] [--keep]

`--pythonpath` puts another copy of the `tallzip` package first on the path of the subprocesses (the
code before a change: `git archive REV tallzip | tar -x -C OLD`), so before and after run side by side
on the same archive. Also reports the interpreter's own peak (`python -c "import tallzip.cli.main"`),
so the figures above it can be read. One run each: a check of the memory bound, not a speed benchmark.
The archive and the family are deleted at the end unless --keep.

Measured 2026-12-01 on the shared 2-CPU machine (other sessions running: wall times say little, peak RSS
and CPU seconds are the comparable figures), N = 8 (a 32000x4096 bf16 embedding, 0.45 GiB archive),
peak RSS above the interpreter with tallzip and torch imported (0.62 GiB), one run each:

| code | budget | verify | verify --against (all 8) | --against (4 of 8) | CPU s (verify / all / 4) |
|---|---|---|---|---|---|
| before (whole tensors, 3ed64a3) | 1.5G | +1.60 GiB | +3.60 GiB | +2.60 GiB | 10.2 / 38.4 / 20.0 |
| after (chunks) | 1.5G | +0.20 GiB | +0.36 GiB | +0.28 GiB | 7.5 / 36.2 / 17.7 |
| after (chunks) | 256M | +0.06 GiB | +0.18 GiB | +0.15 GiB | 7.1 / 31.2 / 15.7 |

    git archive 3ed64a3 tallzip | tar -x -C /tmp/v2before
    python -m benchmarks.verify_rss --tasks 8 --work /tmp/vrss --pythonpath /tmp/v2before --keep
    python -m benchmarks.verify_rss --tasks 8 --work /tmp/vrss --memory 256M
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks.chunked_rss import timed, write_family


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tallzip-verify-rss"))
    parser.add_argument("--memory", default=None, help="verify's --memory budget (default: tallzip's)")
    parser.add_argument("--pythonpath", action="append", default=[],
                        help="a folder holding another tallzip package to measure as well (repeatable)")
    parser.add_argument("--no-checkout", action="store_true", help="measure only the --pythonpath copies")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.work = args.work.resolve()
    fam = args.work / f"fam{args.tasks}"
    if not (fam / "base.safetensors").exists():
        write_family(fam, args.tasks)
    archive = args.work / f"fam{args.tasks}.tallz"
    # run from a neutral folder: `python -m` puts the working folder first on the path, which would
    # shadow --pythonpath with the checkout's own tallzip
    os.chdir(args.work)
    tallzip = [sys.executable, "-m", "tallzip.cli.main"]
    memory = ["--memory", args.memory] if args.memory else []
    half = args.work / f"fam{args.tasks}-half"  # the first half of the tasks: the mtv cannot be recomputed
    if not half.exists():
        half.mkdir()
        for path in sorted((fam / "tasks").iterdir())[:max(1, args.tasks // 2)]:
            (half / path.name).symlink_to(path)
    try:
        if not archive.exists():
            timed([*tallzip, "pack", str(fam / "tasks"), "--base", str(fam / "base.safetensors"), "-o", str(archive)])
        print(f"N={args.tasks}, archive {archive.stat().st_size / 2**30:.3f} GiB, budget {args.memory or 'default'}")
        for code in [*([] if args.no_checkout else ["(this checkout)"]), *args.pythonpath]:
            if code != "(this checkout)":
                os.environ["PYTHONPATH"] = code
            _, idle, _ = timed([sys.executable, "-c", "import tallzip.cli.main, torch"])
            print(f"  {code}: interpreter with tallzip imported {idle / 2**30:.2f} GiB")
            for label, extra in (("verify", []), ("verify --against (all)", ["--against", str(fam / "tasks")]),
                                 ("verify --against (half)", ["--against", str(half)])):
                wall, rss, cpu = timed([*tallzip, "verify", str(archive), *extra, *memory])
                print(f"    {label:24s} peak RSS {rss / 2**30:5.2f} GiB (+{(rss - idle) / 2**30:.2f})  "
                      f"wall {wall:6.1f} s  CPU {cpu:6.1f} s")
            os.environ.pop("PYTHONPATH", None)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
