"""The serving suite: resident serving by representation, the device memory each task holds and the median
switch time, for one family whose tasks are kept tall, q8, q4, q2 and exact side by side (one archive).

    python -m benchmarks.serving [--params 16] [--repeats 9] [--device cpu] [--threads N]

The family is synthetic (benchmarks.fixtures, ViT-B/32-wide float32 blocks: --params millions of weights
in the base) with five fine-tunes. Memory is Resident.memory(); a switch is timed from one task to another
(the live weights rewritten), the median of --repeats after one warm-up; each task's live weights are
then checked bit for bit against Archive.load. (Timed as well, at every family size, by benchmarks.speed's
resident switch.)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tallzip
from tallzip.demo import VIT_B32

from benchmarks.fixtures import generate
from benchmarks.fixtures.families import vit_preset
from tallzip.options import StoreOptions

REPRESENTATIONS = ("tall", "q8", "q4", "q2", "exact")
BLOCK_WEIGHTS = 12 * 768 * 768  # about one ViT-B/32 transformer block


def write_family(folder: Path, params_m: int) -> tuple[dict, int]:
    """Base + one task per representation under `folder`; returns ({task: representation}, base weights)."""
    layers = max(1, round(params_m * 1e6 / BLOCK_WEIGHTS))
    made = generate(folder / "family", vit_preset(**{**VIT_B32, "layers": layers}), len(REPRESENTATIONS), log=None)
    keep = {Path(path).name.split(".")[0]: rep for path, rep in zip(made["tasks"], REPRESENTATIONS)}
    return keep, made["parameters"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=16, help="millions of weights in the base")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        keep, n = write_family(folder, args.params)
        out = folder / "family.tallz"
        tallzip.pack(folder / "family" / "tasks", folder / "family" / "base.safetensors", out, store=StoreOptions(keep=keep))
        with tallzip.open(out) as arc:
            t0 = time.perf_counter()
            resident = arc.resident(device=args.device)
            build = time.perf_counter() - t0
            memory = resident.memory()
            print(f"{n / 1e6:.1f}M weights (float32, {4 * n / 2**20:.0f} MiB a copy), device {resident.device} "
                  f"({torch.get_num_threads()} CPU threads), "
                  f"built in {build:.1f} s; shared {memory['shared'] / 2**20:.1f} MiB "
                  f"(base, live weights, base + mtv for the tall task)")
            print(f"{'task':6} {'kept':6} {'held MiB':>9} {'bytes/weight':>13} {'switch ms (median)':>19}")
            tasks = list(keep)
            for task in tasks:
                other = tasks[(tasks.index(task) + 1) % len(tasks)]
                times = []
                for i in range(args.repeats + 1):
                    resident.switch(other)
                    if resident.device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    resident.switch(task)
                    if resident.device.type == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - t0)
                state, loaded = resident.state_dict(), arc.load(task)  # the live weights are load()'s
                differ = [k for k, v in loaded.items() if not torch.equal(state[k].view(torch.uint8), v.view(torch.uint8))]
                assert not differ, (task, differ)
                held = memory["tasks"][task]
                print(f"{task:6} {keep[task]:6} {held / 2**20:9.2f} {held / n:13.3f} {1e3 * statistics.median(times):19.1f}")


if __name__ == "__main__":
    main()
