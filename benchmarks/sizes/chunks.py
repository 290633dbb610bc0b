"""Mask and float codecs coded the way format v2 codes them: by chunk (2^22 elements, whole rows).

    python -m benchmarks.sizes chunks                  # both families, 8 tasks, median of 3 (~3 min)
    python -m benchmarks.sizes chunks --tasks 8 --repeats 3 --family llm

Families (masks from the real TALL formula on synthetic task vectors from benchmarks.fixtures):
- VIT: one full-size ViT-B/32 transformer block (tallzip.demo.vit_shapes), fp32 checkpoints, the mtv
  stored as bfloat16 (tallzip's default): every tensor is one chunk. Per-model figures are the
  block's scaled by parameters to the 87.8M-parameter vision tower.
- LLM: a 32000x4096 embedding and a 4096x11008 MLP matrix in bfloat16, the mtv bfloat16. Their
  chunks are 1024 x 4096 and 381 x 11008 (whole rows up to 2^22 elements); every chunk has the same
  statistics, so --llm-chunks chunks of each are generated and measured and the per-tensor figures
  are scaled by elements.

Masks: bits per weight and CPU-seconds of this process (one thread) for the context (built once per
chunk and shared by all tasks), the encoding of one task and its decoding, for bits+zstd, bits-ctx
(format v1, here per chunk) and bits-lvl. Floats: size and decode speed of one chunk of the base and
of the mtv under planes+zstd, the same planes with incompressible planes stored raw (a planes+ans
payload without "ans" planes) and planes+ans. Every coded chunk is decoded and compared.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
import torch

from benchmarks.fixtures import Preset, arrays
from benchmarks.sizes.codecs import SYNTHETIC_BLOCK, bf16_rounded, cpu_timed as timed, masks_of, synthetic_family, uint_view
from benchmarks.sizes.library import codecs, float_codecs, mask_codecs, mask_levels

CHUNK = 1 << 22
VIT_B32_PARAMS = 87_849_216
MASK_CODECS = ("bits+zstd", "bits-ctx", "bits-lvl")
LLM_TENSORS = {"embedding 32000x4096": (32000, 4096), "mlp 4096x11008": (4096, 11008)}


def chunk_rows(shape):
    """Rows per chunk: whole rows up to CHUNK elements (at least one row)."""
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, CHUNK // row) if len(shape) > 1 else CHUNK


def llm_chunk(shape, n_tasks, seed, lam=0.4):
    """(mtv as the reader holds it: bfloat16 widened to float32, [masks], base bf16 bits) of one chunk of a
    bfloat16 family (benchmarks.fixtures; the task vectors are the bf16 checkpoints' differences)."""
    base, tuned = arrays(Preset((("chunk", tuple(shape)),), dtype="bf16"), n_tasks, seed, dtype="bf16")
    base_f = torch.from_numpy(base["chunk"])
    taus = [torch.from_numpy(t["chunk"]) - base_f for t in tuned]
    mtv = taus[0].clone()
    for tau in taus[1:]:
        mtv += tau
    masks = [(tau.abs() > lam * (mtv - tau).abs()).numpy().reshape(-1) for tau in taus]
    stored = mtv.to(torch.bfloat16)
    bits = base_f.to(torch.bfloat16)
    return stored.to(torch.float32).numpy(), masks, {"base bf16": bits.view(torch.int16).numpy().view(np.uint16).reshape(-1),
                                                     "mtv bf16": stored.view(torch.int16).numpy().view(np.uint16).reshape(-1)}


def vit_chunks(n_tasks, seed):
    """[(shape, mtv bf16 widened, [masks])] of one ViT-B/32 block, and its float chunks (the largest tensor)."""
    base, tuned = synthetic_family(n_tasks, 1.0, seed)
    chunks, floats = [], {}
    for name, shape in SYNTHETIC_BLOCK.items():
        taus = [t[name] - base[name] for t in tuned]
        mtv = np.zeros_like(base[name])
        for tau in taus:
            mtv += tau
        stored_f32, stored_bits = bf16_rounded(mtv)
        chunks.append((shape, stored_f32, [m.reshape(-1) for m in masks_of(taus, mtv, 0.4)]))
        if name == "mlp.c_fc.weight":
            floats = {"base fp32": uint_view(base[name]), "mtv fp32": uint_view(mtv), "mtv bf16": stored_bits.reshape(-1)}
    return chunks, floats


# --- masks ------------------------------------------------------------------------------------

def build_context(codec, context, count, shape):
    if codec == "bits-lvl":
        mask_levels.chunk_grouping(context, count, "bench")
    elif codec == "bits-ctx":  # the encoder builds both features' groupings
        for feature in mask_codecs.features_for(shape):
            mask_codecs.mtv_grouping(context, count, feature, "bench")


def measure_chunk(shape, mtv, masks, repeats):
    """{codec: [coded bytes, context s, encode s per task, decode s per task]} of one chunk (medians)."""
    count = mtv.size
    out = {}
    for codec in MASK_CODECS:
        builds, encodes, decodes, size = [], [], [], 0
        for r in range(repeats):
            context = {"mtv": mtv.reshape(-1), "shape": shape}
            builds.append(timed(build_context, codec, context, count, shape)[1])
            enc_s = dec_s = 0.0
            for mask in masks:
                (data, params), seconds = timed(codecs.encode, codec, mask, level=3, context=context)
                enc_s += seconds
                decoded, seconds = timed(codecs.decode, codec, data, dtype=np.bool_, count=count, params=params, context=context)
                dec_s += seconds
                assert np.array_equal(decoded, mask), codec
                if r == 0:
                    size += len(data)
            encodes.append(enc_s / len(masks))
            decodes.append(dec_s / len(masks))
        out[codec] = [size / len(masks), float(np.median(builds)), float(np.median(encodes)), float(np.median(decodes))]
    return out


def add(total, part, weight=1.0):
    for codec, values in part.items():
        row = total.setdefault(codec, [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate(values):
            row[i] += weight * v


def print_mask_rows(title, total, elements, scale, scale_label, n_tasks):
    print(f"\n  {title}: {elements:,} mask bits measured per task, CPU-s scaled to {scale_label}")
    print(f"    {'codec':10s} {'bits/w':>7s} {'context s':>10s} {'enc s/task':>11s} {'dec s/task':>11s}"
          f" {'pack N=' + str(n_tasks) + ' s':>11s} {'extract 1 s':>12s}")
    for codec, (size, build, enc, dec) in total.items():
        print(f"    {codec:10s} {8 * size / elements:7.4f} {build * scale:10.2f} {enc * scale:11.3f} {dec * scale:11.3f}"
              f" {(build + n_tasks * enc) * scale:11.2f} {(build + dec) * scale:12.2f}")


# --- floats -----------------------------------------------------------------------------------

def planes_raw_encode(values, level):
    """planes+ans's payload with each plane zstd'd (level `level`) or, when zstd saves under 3%, stored."""
    segments = []
    for plane in float_codecs.split_planes(values):
        raw = plane.tobytes()
        frame = codecs.zstd_compress(raw, level)
        segments.append(("zstd", frame) if len(frame) < 0.97 * len(raw) else ("raw", raw))
    crc = np.array([codecs.crc32(values.astype("<u%d" % values.dtype.itemsize).tobytes())], dtype="<u4").tobytes()
    return crc + b"".join(s for _, s in segments), {"planes": [[c, len(s)] for c, s in segments]}


def measure_floats(label, values, repeats):
    runs = [("planes+zstd L3", lambda: codecs.encode("planes+zstd", values, level=3), "planes+zstd"),
            ("planes+zstd L1", lambda: codecs.encode("planes+zstd", values, level=1), "planes+zstd"),
            ("planes, raw if <3% (L3)", lambda: planes_raw_encode(values, 3), "planes+ans"),
            ("planes+ans", lambda: codecs.encode("planes+ans", values), "planes+ans"),
            ("zstd L3", lambda: codecs.encode("zstd", values, level=3), "zstd")]
    print(f"\n  {label}: one chunk of {values.size:,} values ({values.nbytes / 1e6:.1f} MB)")
    print(f"    {'coding':26s} {'of raw':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s}  planes")
    for name, encode, codec in runs:
        encodes, decodes = [], []
        for _ in range(repeats):
            (data, params), seconds = timed(encode)
            encodes.append(seconds)
            decoded, seconds = timed(codecs.decode, codec, data, dtype=values.dtype, count=values.size, params=params)
            decodes.append(seconds)
            assert np.array_equal(decoded, values), name
        planes = params.get("planes") or [["zstd", s] for s in params.get("sizes", [])]
        layout = " ".join(f"{c}:{s / values.size:.2f}" for c, s in planes)
        print(f"    {name:26s} {len(data) / values.nbytes:7.3f} {values.nbytes / np.median(encodes) / 1e6:9.0f}"
              f" {values.nbytes / np.median(decodes) / 1e6:9.0f}  {layout}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many codings (default 3)")
    parser.add_argument("--llm-chunks", type=int, default=1, help="chunks generated per LLM tensor (default 1)")
    parser.add_argument("--family", choices=("both", "vit", "llm"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("$ python -m benchmarks.sizes chunks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.family in ("both", "vit"):
        chunks, floats = vit_chunks(args.tasks, args.seed)
        total, elements = {}, 0
        for shape, mtv, masks in chunks:
            add(total, measure_chunk(shape, mtv, masks, args.repeats))
            elements += mtv.size
        print(f"\n=== VIT: one ViT-B/32 block ({len(chunks)} masked tensors, one chunk each), {args.tasks} tasks, bf16 mtv")
        print_mask_rows("masks", total, elements, VIT_B32_PARAMS / elements, "the 87.8M-param vision tower", args.tasks)
        for label, values in floats.items():
            measure_floats(f"{label} (mlp.c_fc 3072x768)", values, args.repeats)
    if args.family in ("both", "llm"):
        print(f"\n=== LLM: bfloat16 tensors, {args.tasks} tasks, bf16 mtv, chunks of whole rows up to 2^22 elements")
        for t, (label, shape) in enumerate(LLM_TENSORS.items()):
            rows = chunk_rows(shape)
            total, elements = {}, 0
            for c in range(args.llm_chunks):
                mtv, masks, floats = llm_chunk((rows, shape[1]), args.tasks, args.seed + 100 * t + c)
                add(total, measure_chunk((rows, shape[1]), mtv, masks, args.repeats))
                elements += mtv.size
            full = int(np.prod(shape))
            print_mask_rows(f"{label} ({rows} rows per chunk, {-(-shape[0] // rows)} chunks)", total, elements,
                            full / elements, f"the whole {label}", args.tasks)
            if t == 0:
                for name, values in floats.items():
                    measure_floats(f"{name} ({rows}x{shape[1]} chunk)", values, args.repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall")

