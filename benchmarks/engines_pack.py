"""`tallzip pack --engine local` against `--engine ray` (issue 14), 1 and 2 workers, on a ViT-shaped family
(tallzip/demo.py): wall time per route (median of several runs after a warm-up run, so Ray's workers exist and
the inputs are in the page cache), seconds per chunk, and the CPU seconds one chunk costs (this process's CPU
over the chunks, local route with 1 worker: the figure a cluster estimate multiplies). Every route's archive
must be byte-identical to the first one's (checked here).

    python -m benchmarks.engines_pack                        # N=4, width 384, 4 blocks, chunks of 2^18
    python -m benchmarks.engines_pack --quick                # width 128, 2 blocks: seconds (plus Ray's start)

The Ray routes keep one cluster per worker count, started apart (its start time is reported on its own).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tallzip
from tallzip.demo import make_family
from tallzip.run.engines import RayEngine

ROUTES = ("local1", "local2", "ray1", "ray2")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk-elements", type=int, default=1 << 18)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.runs = 128, 2, 1
    routes = [r for r in args.routes.split(",") if r]
    work = Path(tempfile.mkdtemp(prefix="tallzip-engines-pack-"))
    try:
        base, tasks = make_family(work / "family", n_tasks=args.tasks, width=args.width, layers=args.layers,
                                  frozen_width=32)
        options = dict(chunk_elements=args.chunk_elements, device="cpu", force=True)
        figures = {"tasks": args.tasks, "width": args.width, "layers": args.layers,
                   "chunk_elements": args.chunk_elements, "routes": {}}
        print(f"# ViT-shaped family: N={args.tasks}, width {args.width}, {args.layers} blocks, "
              f"{sum(p.stat().st_size for p in tasks.iterdir()) / 2**20:.1f} MiB of tasks; chunks of "
              f"{args.chunk_elements} elements; {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; median of {args.runs} after a warm-up run")
        input_bytes = base.stat().st_size + sum(p.stat().st_size for p in tasks.iterdir())
        figures["input_bytes"] = input_bytes
        print(f"{'route':8} {'start s':>8} {'wall s':>8} {'chunks':>7} {'s/chunk':>8} {'cpu s/chunk':>11} "
              f"{'in MB/s':>8} {'cpu s/GB':>9}")
        reference = None
        for route in routes:
            workers = int(route[-1])
            engine, started = None, None
            if route.startswith("ray"):
                t0 = time.perf_counter()
                engine = RayEngine(num_cpus=workers)
                engine._start()
                started = time.perf_counter() - t0
            walls, cpus, chunks = [], [], 0
            try:
                for attempt in range(args.runs + 1):
                    seen = []
                    out = work / f"{route}.tallz"
                    t0, c0 = time.perf_counter(), time.process_time()
                    tallzip.pack(tasks, base, out, workers=workers if engine is None else None,
                                 engine=engine or "local", progress=lambda label, d, t: seen.append(t)
                                 if label == "packing" else None, **options)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    chunks = seen[-1]
                    got = digest(out)
                    reference = reference or got
                    if got != reference:
                        raise SystemExit(f"{route}: the archive differs from the first route's")
                    if attempt:
                        walls.append(wall)
                        cpus.append(cpu)
            finally:
                if engine is not None:
                    engine._ray.shutdown()
            row = {"workers": workers, "start_s": started, "wall_s": statistics.median(walls), "walls": walls,
                   "chunks": chunks, "driver_cpu_s": statistics.median(cpus)}
            figures["routes"][route] = row
            # local: this process did all the work, so its CPU per chunk is the chunk's cost; ray: the driver's share
            print(f"{route:8} {started or 0:8.2f} {row['wall_s']:8.2f} {chunks:7d} {row['wall_s'] / chunks:8.3f} "
                  f"{row['driver_cpu_s'] / chunks:11.3f} {input_bytes / row['wall_s'] / 1e6:8.1f} "
                  f"{row['driver_cpu_s'] / (input_bytes / 1e9):9.1f}")
        print("# cpu s/chunk, cpu s/GB: this process's CPU over the chunks and over the input bytes (base + tasks) "
              "(local routes: all the work; ray routes: the driver's part only: planning, receiving, writing); "
              "in MB/s: input bytes over wall time; every archive byte-identical")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
