"""Probe of the storage-accuracy frontier per task: TALL masks, quantized task vectors, exact deltas.

On the accuracy benchmark's real family (benchmarks/family.py), every task is rebuilt from each
representation and evaluated with the benchmark's own functions (benchmarks.accuracy.Bench); the
storage is real coded bytes (formats.codecs / formats.delta_codec), not estimates:

* tall: `tallzip.pack` at lambda 0.4 with pack's defaults (benchmarks.accuracy.pack_and_rebuild);
  a task's bits are its masks' bytes, plus its 1/N share of the stored mtv in the "+mtv/N" column;
* q*: tau = theta_t - theta_0 of every float tensor quantized (tallzip.quantize), rebuilt as
  theta_0 + dequant; bytes = the codes (int8/uint8 view, the smaller of zstd and planes+ans per
  tensor) + scales (+ offsets) in their dtype, zstd'd;
* exact: theta_t's bits coded given theta_0's (formats.delta_codec), checked bit-identical, against
  theta_t alone with planes+zstd and zstd of each task's whole file; in float32 (the family as
  trained) and bfloat16 (the family rounded to bfloat16: what a model trained with float32 master
  weights and saved in bfloat16 holds).

Bits per parameter = 8 * bytes / the encoder's parameter count; the base is common to every row and
not counted. Normalized accuracy = test accuracy / the fine-tuned model's test accuracy (paper, app. A).

Usage:  python -m benchmarks.frontier_probe                  (8 tasks, the small grid)
        python -m benchmarks.frontier_probe --grid full      (every group size for every grid and method)
        python -m benchmarks.frontier_probe --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import zstandard

import tallzip
from tallzip.formats.codecs import registry as codecs, delta as delta_codec
from tallzip.formats.tensors import to_bits
from tallzip.ops import quantize as qz
from tallzip.verification.info import summary
from tallzip.ops.taskvec import DEFAULT_LAMBDA, task_vector

from benchmarks.accuracy import Bench, pack_and_rebuild
from benchmarks.family import PRESETS, build_family
from benchmarks.vit import ViTConfig

# A smaller family on the same real data and training recipe (a 4x narrower, half as deep ViT, a third
# of the pretraining): for a machine too busy to train the cpu preset in time. Labelled as such.
SMALL_FAMILY = replace(PRESETS["cpu"], vit=ViTConfig(width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=64),
                       pretrain_steps=400, finetune_steps=90)

CODE_CODECS = ("zstd", "planes+ans")


# --------------------------------------------------------------------------- rows


class Probe:
    def __init__(self, bench: Bench):
        self.bench = bench
        self.tasks = bench.tasks
        self.base = bench.base_state
        self.finetuned = {t: bench.family.load(t) for t in self.tasks}
        self.params = sum(v.numel() for v in self.base.values())
        self.rows: list[dict] = []

    def evaluate(self, task, state) -> float:
        return self.bench.family.evaluate(task, state, "test")

    def add(self, label, group, acc: dict, bits: dict, **extra) -> dict:
        ref = self.bench.finetuned["test"]
        norm = {t: acc[t] / ref[t] for t in self.tasks}
        row = {"label": label, "group": group, "norm": norm, "bits": bits,
               "mean_norm": statistics.mean(norm.values()), "min_norm": min(norm.values()),
               "mean_bits": statistics.mean(bits.values()), **extra}
        self.rows.append(row)
        print(f"  {label:40s} norm {row['mean_norm']:.4f} (min {row['min_norm']:.4f})  "
              f"{row['mean_bits']:.3f} bits/param", flush=True)
        return row


def tall_row(probe: Probe, work_dir: Path) -> None:
    bench = probe.bench
    archive = work_dir / "tall.tallz"
    row = pack_and_rebuild(bench, f"tall lambda {DEFAULT_LAMBDA:g}", archive, merge_method="sum",
                           lambdas=DEFAULT_LAMBDA)
    with tallzip.open(archive) as opened:
        sizes = summary(opened)
    mtv_bytes = sizes["sections"].get("mtv", {}).get("bytes", 0)
    n = len(probe.tasks)
    masks = {t: 8 * sizes["tasks"][t]["mask_bytes"] / probe.params for t in probe.tasks}
    share = {t: masks[t] + 8 * mtv_bytes / n / probe.params for t in probe.tasks}
    probe.add(f"tall lambda {DEFAULT_LAMBDA:g} (masks only)", "tall", row.test, masks)
    probe.add(f"tall lambda {DEFAULT_LAMBDA:g} (+ mtv/N)", "tall", row.test, share,
              mtv_bytes=mtv_bytes, archive_bytes=sizes["archive_bytes"])


def coded_bytes(quantized: qz.Quantized) -> dict:
    """Real coded sizes: the codes under each codec, the side information zstd'd, the bit-packed size."""
    code_bits = to_bits(quantized.codes)
    sizes = {c: len(codecs.encode(c, code_bits)[0]) for c in CODE_CODECS}
    side = len(codecs.encode("zstd", to_bits(quantized.scales))[0])
    if quantized.offsets is not None:
        side += len(codecs.encode("zstd", to_bits(quantized.offsets))[0])
    return {**sizes, "side": side, "packed": qz.storage_bits(quantized) / 8}


def quant_row(probe: Probe, spec: qz.QuantSpec) -> dict:
    acc, bits, packed, zstd_only, rel = {}, {}, {}, {}, {}
    for task in probe.tasks:
        state, total, packed_bytes, zstd_bytes, err2, norm2 = {}, 0, 0.0, 0, 0.0, 0.0
        for name, base in probe.base.items():
            tuned = probe.finetuned[task][name]
            if not base.is_floating_point():
                state[name] = tuned
                continue
            tau = task_vector(base, tuned)
            quantized = qz.quantize(tau, spec)
            state[name] = qz.rebuild(base, quantized)
            sizes = coded_bytes(quantized)
            total += min(sizes[c] for c in CODE_CODECS) + sizes["side"]
            zstd_bytes += sizes["zstd"] + sizes["side"]
            packed_bytes += sizes["packed"]
            err2 += float(((qz.dequantize(quantized) - tau) ** 2).sum())
            norm2 += float((tau ** 2).sum())
        acc[task] = probe.evaluate(task, state)
        bits[task] = 8 * total / probe.params
        packed[task] = 8 * packed_bytes / probe.params
        zstd_only[task] = 8 * zstd_bytes / probe.params
        rel[task] = (err2 / norm2) ** 0.5 if norm2 else 0.0
    return probe.add(spec.label(), "quant", acc, bits, spec=spec.__dict__,
                     packed_bits=statistics.mean(packed.values()), zstd_bits=statistics.mean(zstd_only.values()),
                     rel_l2=statistics.mean(rel.values()))


def cast_state(state: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def exact_rows(probe: Probe, dtype: torch.dtype, dtype_label: str) -> dict:
    """Delta-coded sizes in bits/param for each mode x codec, and the references; every decode checked."""
    base = cast_state(probe.base, dtype)
    sizes: dict[str, dict[str, float]] = {}
    zstd = zstandard.ZstdCompressor(level=3)
    acc = {}
    for task in probe.tasks:
        tuned = cast_state(probe.finetuned[task], dtype)
        counts: dict[str, int] = {}
        rebuilt = {}
        for name, b in base.items():
            t_bits, b_bits = to_bits(tuned[name]), to_bits(b)
            for mode in delta_codec.MODES:
                for codec in ("planes+zstd", "planes+ans"):
                    payload, params = delta_codec.encode(t_bits, b_bits, mode=mode, codec=codec)
                    decoded = delta_codec.decode(payload, b_bits, params=params)
                    if not np.array_equal(decoded, t_bits):
                        raise AssertionError(f"exact {mode}/{codec} not bit-identical on {task} {name}")
                    key = f"exact {mode}+{codec}"
                    counts[key] = counts.get(key, 0) + len(payload)
                    if (mode, codec) == (delta_codec.DEFAULT_MODE, delta_codec.DEFAULT_CODEC):
                        rebuilt[name] = torch.from_numpy(decoded.copy()).view(tuned[name].dtype).reshape(tuned[name].shape)
            for codec in ("planes+zstd", "planes+ans"):
                key = f"alone {codec}"
                counts[key] = counts.get(key, 0) + len(codecs.encode(codec, t_bits)[0])
        # The whole file, as a user would zstd it (float32: the family's own file; bfloat16: re-saved).
        if dtype == torch.float32:
            data = Path(probe.bench.task_paths[task]).read_bytes()
        else:
            from safetensors.torch import save as st_save
            data = st_save({k: v.contiguous() for k, v in tuned.items()})
        counts["file"] = len(data)
        counts["file zstd-3"] = len(zstd.compress(data))
        counts["file zstd-19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
        for key, value in counts.items():
            sizes.setdefault(key, {})[task] = 8 * value / probe.params
        if dtype == torch.float32:
            acc[task] = probe.evaluate(task, rebuilt)
    if dtype == torch.float32:
        key = f"exact {delta_codec.DEFAULT_MODE}+{delta_codec.DEFAULT_CODEC}"
        probe.add(f"exact ({key[6:]}, float32)", "exact", acc, sizes[key])
    return {key: statistics.mean(v.values()) for key, v in sizes.items()}


# --------------------------------------------------------------------------- grids


def grid_specs(grid: str) -> list[qz.QuantSpec]:
    """core: 7 settings; small: every grid and method at group 128, then the group size (q3, q2) and the scale precision
    (q3) of symmetric mse; full: every grid x method x group size x bits, and the scale precisions."""
    if grid == "core":  # the candidates REPRESENTATIONS.md recommends, and their closest rivals
        return [qz.QuantSpec(8, 128), qz.QuantSpec(4, 128), qz.QuantSpec(3, 128), qz.QuantSpec(2, 128),
                qz.QuantSpec(2, 128, symmetric=False), qz.QuantSpec(3, 128, method="mse"), qz.QuantSpec(3, 32)]
    specs = []

    def add(*args):
        spec = qz.QuantSpec(*args)
        if spec not in specs:
            specs.append(spec)

    groups = (None, 32, 64, 128, 256) if grid == "full" else (128,)
    for bits in (8, 4, 3, 2):
        for symmetric in (True, False):
            for method in qz.METHODS:
                for group in groups:
                    add(bits, group, symmetric, method, "bfloat16")
    for bits in (3, 2) if grid == "small" else ():
        for group in (None, 32, 64, 256):
            add(bits, group, True, "mse", "bfloat16")
    for bits in (3,) if grid == "small" else (4, 3, 2):
        for scale_dtype in ("float32", "float16"):
            add(bits, 128, True, "mse", scale_dtype)
    return specs


# --------------------------------------------------------------------------- output


def format_summary(probe: Probe) -> str:
    lines = [f"{'representation':40s} {'norm.acc':>8s} {'min task':>8s} {'bits/param':>10s} "
             f"{'packed':>7s} {'zstd':>7s} {'rel-L2':>7s}"]
    for r in probe.rows:
        packed = f"{r['packed_bits']:7.3f}" if "packed_bits" in r else f"{'':7s}"
        zstd_bits = f"{r['zstd_bits']:7.3f}" if "zstd_bits" in r else f"{'':7s}"
        rel = f"{r['rel_l2']:7.4f}" if "rel_l2" in r else f"{'':7s}"
        lines.append(f"{r['label']:40s} {r['mean_norm']:8.4f} {r['min_norm']:8.4f} {r['mean_bits']:10.3f} "
                     f"{packed} {zstd_bits} {rel}")
    return "\n".join(lines)


def format_per_task(probe: Probe, labels: list[str]) -> str:
    short = [t[:14] for t in probe.tasks]
    lines = [f"{'representation':40s} " + " ".join(f"{s:>14s}" for s in short)]
    for r in probe.rows:
        if r["label"] in labels:
            lines.append(f"{r['label']:40s} " + " ".join(
                f"{100 * r['norm'][t]:6.2f}%/{r['bits'][t]:5.3f}" for t in probe.tasks))
    return "\n".join(lines)


def pareto(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both bits (fewer) and normalized accuracy (higher)."""
    front = []
    for r in sorted(rows, key=lambda r: (r["mean_bits"], -r["mean_norm"])):
        if not front or r["mean_norm"] > front[-1]["mean_norm"]:
            front.append(r)
    return front


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="the first N tasks of the family's order (default 8)")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS) + ["small"],
                        help="family: the benchmark's presets, or 'small' (SMALL_FAMILY, a reduced cpu preset)")
    parser.add_argument("--grid", default="small", choices=("full", "small", "core"),
                        help="small (default): 26 settings; core: the 7 recommended ones; full: 86")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.frontier_probe " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"$ {command}", flush=True)
    start = time.perf_counter()
    config = SMALL_FAMILY if args.preset == "small" else PRESETS[args.preset]
    family = build_family(args.tasks, config=config, num_threads=args.threads)
    # One thread by default: on a shared machine, two threads per small op cost far more than they give.
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tallzip-frontier-") as work_dir:
        bench = Bench(family, Path(work_dir))
        probe = Probe(bench)
        print(f"{len(probe.tasks)} tasks, {probe.params:,} parameters per checkpoint", flush=True)
        tall_row(probe, Path(work_dir))
        exact = {"float32": exact_rows(probe, torch.float32, "float32"),
                 "bfloat16": exact_rows(probe, torch.bfloat16, "bfloat16")}
        for spec in grid_specs(args.grid):
            quant_row(probe, spec)
    print()
    print(format_summary(probe))
    print()
    front = pareto(probe.rows)
    print("Pareto front (mean bits/param vs mean normalized accuracy): " +
          ", ".join(f"{r['label']} {r['mean_bits']:.3f}b {100 * r['mean_norm']:.2f}%" for r in front))
    print()
    print("Per task (normalized test accuracy / bits per parameter), the front and the tall rows:")
    print(format_per_task(probe, [r["label"] for r in probe.rows if r in front or r["group"] in ("tall", "exact")]))
    print()
    print("Exact coding, mean bits per parameter over tasks (every decode checked bit-identical):")
    keys = list(exact["float32"])
    print(f"{'':28s} {'float32':>8s} {'bfloat16':>8s}")
    for key in keys:
        print(f"{key:28s} {exact['float32'][key]:8.3f} {exact['bfloat16'][key]:8.3f}")
    print(f"elapsed {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "rows": probe.rows, "exact": exact}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
