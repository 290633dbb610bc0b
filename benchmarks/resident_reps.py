"""Resident serving by representation: device memory each task holds and the median switch time,
for one family whose tasks are kept tall, q8, q4, q2 and exact side by side (one archive).

    python -m benchmarks.resident_reps [--params 16] [--repeats 9] [--device cpu] [--threads N]

The family is synthetic (benchmarks.family's real one is small): a base of ViT-like float32
matrices (--params millions of weights) and five fine-tunes, each the base plus a sparse-ish
Laplace task vector. Memory is Resident.memory(); a switch is timed from one task to another
(the live weights rewritten), the median of --repeats after one warm-up; each task's live weights
are then checked bit for bit against Archive.load.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import tallzip

KEEP = {"tall": "tall", "q8": "q8", "q4": "q4", "q2": "q2", "exact": "exact"}


def _laplace(shape, scale: float, g: torch.Generator) -> torch.Tensor:
    """Laplace(0, scale) samples from the seeded generator (inverse CDF)."""
    u = torch.rand(shape, generator=g) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.4999))


def write_family(folder: Path, params_m: int) -> int:
    g = torch.Generator().manual_seed(0)
    width = 768
    layers = max(1, round(params_m * 1e6 / (4 * width * width)))
    base = {}
    for i in range(layers):
        base[f"blocks.{i}.attn.in_proj_weight"] = torch.randn(3 * width, width, generator=g) * 0.02
        base[f"blocks.{i}.mlp.c_fc.weight"] = torch.randn(width // 4, width, generator=g) * 0.02  # keeps ~4 w^2
        base[f"blocks.{i}.ln.weight"] = torch.ones(width)
    (folder / "tasks").mkdir(parents=True)
    save_file(base, str(folder / "base.safetensors"))
    for task in KEEP:
        sd = {n: v + _laplace(v.shape, 1e-3, g) * (torch.rand(v.shape, generator=g) < 0.5) for n, v in base.items()}
        save_file(sd, str(folder / "tasks" / f"{task}.safetensors"))
    return sum(v.numel() for v in base.values())


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
        n = write_family(folder, args.params)
        out = folder / "family.tallz"
        tallzip.pack(folder / "tasks", folder / "base.safetensors", out, keep=KEEP)
        with tallzip.open(out) as arc:
            t0 = time.perf_counter()
            resident = arc.resident(device=args.device)
            build = time.perf_counter() - t0
            memory = resident.memory()
            print(f"{n / 1e6:.1f}M weights (float32, {4 * n / 2**20:.0f} MiB a copy), device {resident.device} "
                  f"({torch.get_num_threads()} CPU threads), "
                  f"built in {build:.1f} s; shared {memory['shared'] / 2**20:.1f} MiB "
                  f"(base, live weights, base + mtv for the tall task)")
            print(f"{'task':6} {'held MiB':>9} {'bytes/weight':>13} {'switch ms (median)':>19}")
            tasks = list(KEEP)
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
                print(f"{task:6} {held / 2**20:9.2f} {held / n:13.3f} {1e3 * statistics.median(times):19.1f}")


if __name__ == "__main__":
    main()
