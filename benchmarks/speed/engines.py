"""The job engines side by side (issue 14): LocalEngine (threads) and RayEngine (a local Ray cluster) with
1 and 2 workers, on one job list: zstd + blake3 of C chunks of E bfloat16 elements, each job reading its own
byte range of a generated file through tallzip.formats.sources.

Every route must give the same ordered results (checked against a plain loop); the timings are the median of
several runs after one warm-up run (so Ray's worker processes exist and the file is in the page cache: this
measures coding, not the disk). Reported per route: wall time, wall seconds per chunk, input MB/s, and the
wall and CPU seconds one job takes inside its worker (read + zstd + blake3): the CPU figure, times the
number of chunks, over the cores of a cluster, is the coding part of a distributed pack (on a shared
machine the wall figures carry the other tenants' load; the CPU figure much less). Ray's import and cluster
start times are reported apart.

    python -m benchmarks.speed engines                 # 64 chunks of 4 Mi elements (512 MiB), median of 3
    python -m benchmarks.speed engines --quick         # 8 chunks of 256 Ki elements: seconds (plus Ray's start)
    python -m benchmarks.speed engines --routes local1,local2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tallzip.run.engines import Job, LocalEngine, RayEngine
from tallzip.formats.checkpoints.sources import open_source

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "benchmarks" / ".cache"
ROUTES = ("local1", "local2", "ray1", "ray2")
BF16_BYTES = 2


def bf16_chunk(seed: int, k: int, elements: int) -> np.ndarray:
    """Chunk k of a weight-like bfloat16 array (as uint16 bits): N(0, 0.02) float32 cut to its top 16 bits."""
    rng = np.random.default_rng([seed, k])
    values = rng.normal(0.0, 0.02, elements).astype(np.float32)
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def write_bf16_file(path: Path, chunks: int, elements: int, seed: int = 0) -> Path:
    """The generated input, written once and reused while its size matches."""
    size = chunks * elements * BF16_BYTES
    if path.is_file() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "wb") as fh:
        for k in range(chunks):
            fh.write(bf16_chunk(seed, k, elements).tobytes())
    os.replace(partial, path)
    return path


def code_chunk(location: str, offset: int, length: int, level: int = 3):
    """One job: read bytes [offset, offset + length) of `location`, zstd them, blake3 them.
    Returns (blake3 hex of the raw bytes, zstd frame, {"wall": seconds, "cpu": this thread's CPU seconds})."""
    import blake3
    import zstandard

    start, cpu_start = time.perf_counter(), time.thread_time()
    with open_source(location) as source:
        raw = source.pread(offset, length)
    frame = zstandard.ZstdCompressor(level=level).compress(raw)
    digest = blake3.blake3(raw).hexdigest()
    return digest, frame, {"wall": time.perf_counter() - start, "cpu": time.thread_time() - cpu_start}


def chunk_jobs(location: str, chunks: int, chunk_bytes: int, level: int = 3) -> list[Job]:
    return [Job(code_chunk, (location, k * chunk_bytes, chunk_bytes, level), label=f"chunk {k}",
                nbytes=2 * chunk_bytes) for k in range(chunks)]


def fingerprint(digest: str, frame: bytes) -> tuple:
    """What a result is checked by, so that neither side holds all the frames at once."""
    import blake3
    return digest, len(frame), blake3.blake3(frame).hexdigest()


def run_route(engine, jobs, runs: int, expected) -> dict:
    """One warm-up run, then `runs` timed runs; every run's results must equal `expected` in order.
    The results are consumed as they come, as a driver writing an archive would."""
    walls, job_walls, job_cpus = [], [], []
    for attempt in range(runs + 1):
        seconds = []
        start = time.perf_counter()
        for k, (digest, frame, spent) in enumerate(engine.map(jobs)):
            if fingerprint(digest, frame) != expected[k]:
                raise SystemExit(f"{engine.name}: chunk {k} differs from the plain loop")
            seconds.append(spent)
        wall = time.perf_counter() - start
        if len(seconds) != len(expected):
            raise SystemExit(f"{engine.name}: {len(seconds)} results for {len(expected)} jobs")
        if attempt:
            walls.append(wall)
            job_walls.append(statistics.median(t["wall"] for t in seconds))
            job_cpus.append(statistics.median(t["cpu"] for t in seconds))
    return {"wall_s": statistics.median(walls), "walls": walls, "job_s": statistics.median(job_walls),
            "job_cpu_s": statistics.median(job_cpus)}


def time_ray_start(num_cpus: int) -> tuple[RayEngine, float]:
    engine = RayEngine(num_cpus=num_cpus)
    start = time.perf_counter()
    engine._start()  # the cluster comes up on first use; timed here on its own
    return engine, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--elements", type=int, default=4 * 1024 * 1024, help="bf16 elements per chunk")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=3, help="zstd level")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--quick", action="store_true", help="8 chunks of 256 Ki elements")
    parser.add_argument("--keep", action="store_true", help="keep the generated input file")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.elements = 8, 256 * 1024
    routes = [r for r in args.routes.split(",") if r]
    unknown = set(routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes {sorted(unknown)} (choose from {', '.join(ROUTES)})")

    chunk_bytes = args.elements * BF16_BYTES
    path = write_bf16_file(CACHE / f"engines-{args.chunks}x{args.elements}.bf16", args.chunks, args.elements)
    jobs = chunk_jobs(str(path), args.chunks, chunk_bytes, args.level)
    expected = [fingerprint(*code_chunk(*job.args)[:2]) for job in jobs]  # the plain loop every route must match
    frames = sum(n for _, n, _ in expected)
    print(f"# {args.chunks} chunks x {args.elements} bf16 elements ({chunk_bytes / 2**20:g} MiB each, "
          f"{args.chunks * chunk_bytes / 2**20:.0f} MiB), zstd level {args.level} + blake3; "
          f"zstd keeps {frames / (args.chunks * chunk_bytes):.3f} of the bytes")
    print(f"# python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, median of {args.runs} after a warm-up run")

    figures = {"chunks": args.chunks, "elements": args.elements, "level": args.level, "routes": {}}
    if any(r.startswith("ray") for r in routes):
        start = time.perf_counter()
        import ray  # noqa: F401  (timed: the import is part of what --engine ray costs)
        figures["ray_import_s"] = time.perf_counter() - start
        print(f"# ray {ray.__version__}: import {figures['ray_import_s']:.2f} s")

    print(f"{'route':8} {'workers':>7} {'start s':>8} {'wall s':>8} {'s/chunk':>8} {'MB/s':>7} {'job s':>7} "
          f"{'job cpu s':>9}")
    for route in routes:
        workers = int(route[-1])
        started = None
        if route.startswith("local"):
            engine = LocalEngine(workers)
        else:
            engine, started = time_ray_start(workers)
        try:
            row = run_route(engine, jobs, args.runs, expected)
        finally:
            engine.close()
        row.update(workers=workers, start_s=started)
        figures["routes"][route] = row
        mbps = args.chunks * chunk_bytes / row["wall_s"] / 1e6
        print(f"{route:8} {workers:7d} {started if started is not None else 0:8.2f} {row['wall_s']:8.2f} "
              f"{row['wall_s'] / args.chunks:8.3f} {mbps:7.0f} {row['job_s']:7.3f} {row['job_cpu_s']:9.3f}")
    print("# start s: Ray cluster start (ray.init); s/chunk: wall / chunks; job s, job cpu s: median wall and "
          "CPU seconds of one job inside its worker (read + zstd + blake3)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    if not args.keep:
        path.unlink()
    return 0

