"""Manifest bytes of a small archive, plain JSON vs the stored zstd frame, and zstd levels' time/size.

    python -m benchmarks.manifest_size [--tasks 8] [--levels 3 9 15 19 22] [--repeats 3]

The family is ViT-shaped (benchmarks/vit.py's cpu preset, ~0.57M weights: its state dict as the base,
each task the base plus small noise); one archive per representation (tall, q2). Prints per archive
the plain JSON size, the stored size and their ratio, then for the largest manifest each level's
median compression time and size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import torch
import zstandard
from safetensors.torch import save_file

import tallzip
from tallzip.formats.container.constants import FLAG_MANIFEST_ZSTD, HEADER_SIZE, HEADER_STRUCT

from .vit import ViTConfig, VisionTransformer


def vit_family(folder: Path, n_tasks: int, seed: int = 0, config: ViTConfig | None = None) -> tuple[Path, Path, int]:
    """base.safetensors (a fresh ViT's state dict) and tasks/ (base + 1% noise each) under `folder`;
    returns (tasks folder, base path, weights)."""
    torch.manual_seed(seed)
    model = VisionTransformer(config or ViTConfig())
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (folder / "tasks").mkdir(parents=True)
    save_file(base, str(folder / "base.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(n_tasks):
        task = {k: v + 0.01 * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in base.items()}
        save_file(task, str(folder / "tasks" / f"task{t:02d}.safetensors"))
    return folder / "tasks", folder / "base.safetensors", sum(v.numel() for v in base.values())


def stored_manifest(archive: Path) -> tuple[bytes, bytes, int]:
    """(stored bytes, plain JSON bytes, flags), read here from the header independently of the reader."""
    data = archive.read_bytes()
    _, _, flags, offset, length, _, _ = struct.unpack(HEADER_STRUCT, data[:HEADER_SIZE])
    stored = data[offset:offset + length]
    plain = zstandard.ZstdDecompressor().decompress(stored) if flags & FLAG_MANIFEST_ZSTD else stored
    return stored, plain, flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--levels", type=int, nargs="+", default=[3, 9, 15, 19, 22])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tasks, base, weights = vit_family(Path(tmp) / "fam", args.tasks)
        print(f"ViT-shaped family: {weights:,} weights, {args.tasks} tasks")
        plains = {}
        for keep in ("tall", "q2"):
            archive = Path(tmp) / f"{keep}.tallz"
            tallzip.pack(tasks, base, archive, device="cpu", keep=keep)
            stored, plain, flags = stored_manifest(archive)
            plains[keep] = plain
            json.loads(plain)
            bits = 8 / (weights * args.tasks)
            print(f"{keep:>4}: archive {archive.stat().st_size:,} B; manifest plain {len(plain):,} B "
                  f"({len(plain) * bits:.3f} bits/weight/task), stored {len(stored):,} B "
                  f"({len(stored) * bits:.3f}), ratio {len(plain) / len(stored):.1f}x, flags {flags}")
        sample = max(plains.values(), key=len)
        print(f"levels on the {len(sample):,}-byte manifest (median of {args.repeats}):")
        for level in args.levels:
            times, size = [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                size = len(zstandard.ZstdCompressor(level=level, write_content_size=True).compress(sample))
                times.append(time.perf_counter() - start)
            print(f"  level {level:>2}: {statistics.median(times) * 1000:7.1f} ms, {size:,} B, "
                  f"{len(sample) / size:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
