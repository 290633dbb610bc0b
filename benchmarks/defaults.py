"""The default codecs and zstandard level, chosen side by side in one run: archive bytes and pack
CPU-seconds for each mask codec at levels 3 and 1, on a generated ViT-B/32-shaped family and on an
LLM-shaped one (benchmarks.llm_family, a reduced preset with the 32000x4096 embedding).

    python -m benchmarks.defaults                 # ViT-B/32 shapes, N = 8; LLM-shaped, N = 4
    python -m benchmarks.defaults --vit-tasks 4 --llm-tasks 2
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

MASK_CODECS = ("bits-ctx", "bits-lvl", "bits+zstd")
LEVELS = (3, 1)
# the "small" preset (32000x4096 embedding, 4096x11008 MLP matrices, bf16) cut to one layer
LLM_LAYERS = 1


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(label: str, tasks, base, work: Path) -> list[dict]:
    import tallzip
    rows = []
    for mask in MASK_CODECS:
        for level in LEVELS:
            out = work / f"{label.replace('/', '').replace(' ', '')}-{mask}-{level}.tallz"
            cpu, wall = cpu_seconds(), time.perf_counter()
            tallzip.pack(tasks, base, out, codecs={"mask": mask}, level=level, force=True)
            rows.append({"family": label, "mask": mask, "level": level, "bytes": out.stat().st_size,
                         "cpu_s": cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall})
            out.unlink()
            print(f"  {label} {mask} level {level}: {rows[-1]['bytes']:,} bytes, {rows[-1]['cpu_s']:.1f} CPU-s", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vit-tasks", type=int, default=8)
    parser.add_argument("--llm-tasks", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    from benchmarks.llm_family import PRESETS, generate
    from tallzip.demo import VIT_B32, make_family
    print("$ python -m benchmarks.defaults " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
    work = Path(tempfile.mkdtemp(prefix="defaults-", dir=args.work))
    rows = []
    try:
        base, tasks = make_family(work / "vit", args.vit_tasks, **VIT_B32)
        rows += measure(f"ViT-B/32 N={args.vit_tasks}", tasks, base, work)
        shutil.rmtree(work / "vit")
        preset = {**PRESETS["small"], "layers": LLM_LAYERS}
        made = generate(work / "llm", preset, args.llm_tasks, "bf16", log=None)
        rows += measure(f"LLM N={args.llm_tasks}", {p.name: p for p in made["tasks"]}, made["base"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n  {'family':<14} {'mask codec':<10} {'level':>5} {'archive bytes':>15} {'vs bits-ctx L3':>15} {'pack CPU-s':>11}")
    for r in rows:
        ref = next(x for x in rows if x["family"] == r["family"] and x["mask"] == "bits-ctx" and x["level"] == 3)
        print(f"  {r['family']:<14} {r['mask']:<10} {r['level']:>5} {r['bytes']:>15,} {r['bytes'] / ref['bytes'] - 1:>+14.2%} "
              f"{r['cpu_s']:>11.1f}")


if __name__ == "__main__":
    main()
