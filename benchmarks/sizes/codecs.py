"""Measure tallzip's codecs on a checkpoint family: floats (base, mtv) and TALL masks.

    python -m benchmarks.sizes codecs                 # synthetic family + the real one if cached (~30 s)
    python -m benchmarks.sizes codecs --tasks 8 --levels 3 --no-throughput
    python -m benchmarks.sizes codecs --family real --real-dir PATH   # a family folder built elsewhere

Two families:
- SYNTHETIC (always): one ViT-B-sized transformer block (fused qkv 2304x768, out-proj 768x768,
  MLP 3072x768 and 768x3072, their biases, two LayerNorms), its sides times --scale, float32, from
  benchmarks.fixtures (the one family generator: base ~ N(0, 0.02), each task moving a share of 25-40%
  of each tensor's weights by ~1e-3 and the rest 100x less, plus a low-rank part). This is a model of
  real fine-tuning, not real fine-tuning: use it to compare codecs, not to predict absolute sizes.
- REAL (when benchmarks/.cache/*/family.json exists, built by `python -m benchmarks.accuracy --only family`, or
  --real-dir): a small ViT pretrained on real images and fully fine-tuned on real-data tasks. Read,
  never built here. Its tensors are small (128 wide), so per-section overheads weigh more than in
  a ViT-B/32.

Speeds are CPU seconds of this process on one core (every codec here runs single-threaded).
For each family it prints bits per parameter and ratio (raw / coded) of the base, the mtv (fp32) and
the mtv rounded to bfloat16 under zstd, planes+zstd (one frame per byte plane, and one frame of all
planes), planes+ans and zipnn (when installed); for the masks (lambda = --lam): the binary entropy of
each task's density, conditional entropies given mtv contexts, bits+zstd, |mtv|-sorted bits + zstd,
bits-ctx (format v1's context codec), bits-ctx with the bf16 mtv as context, bits-lvl (format v2's,
here each tensor one chunk; benchmarks/sizes/chunks.py measures it by chunk) and bits-ctx-prior
(also conditions on earlier tasks' masks: breaks random access, measured only); a storage total; and
speeds on one full-size ViT-B/32 tensor. Every coded section is decoded and compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import zstandard

from tallzip.demo import VIT_B32, vit_shapes

from benchmarks.fixtures import Preset, arrays, timed
from benchmarks.sizes.library import codecs, float_codecs, mask_codecs

CACHE_ROOT = Path(__file__).resolve().parents[1] / ".cache"


# --- families ---------------------------------------------------------------------------------

_BLOCK_0 = "visual.transformer.resblocks.0."
SYNTHETIC_BLOCK = {  # name -> shape, one ViT-B/32 transformer block (width 768), as tallzip.demo shapes it
    name.removeprefix(_BLOCK_0): shape for name, shape in vit_shapes(**VIT_B32).items() if name.startswith(_BLOCK_0)
}


def _scaled_shape(shape, scale):
    return tuple(max(1, int(round(d * scale))) for d in shape)


def synthetic_family(n_tasks, scale, seed, names=None):
    """(base, [fine-tuned]) dicts of float32 arrays: one ViT-B/32 block, sides x scale (benchmarks.fixtures)."""
    shapes = tuple((name, _scaled_shape(shape, scale)) for name, shape in SYNTHETIC_BLOCK.items())
    return arrays(Preset(shapes), n_tasks, seed, names=names)


def cached_real_family(max_tasks, folder=None):
    """(label, base, [fine-tuned]) of `folder`, or of the most complete family under benchmarks/.cache; or None."""
    from safetensors.numpy import load_file

    best = None
    for info_path in ([Path(folder) / "family.json"] if folder else sorted(CACHE_ROOT.glob("*/family.json"))):
        try:
            info = json.loads(info_path.read_text())
            root = info_path.parent
            tasks = [t for t in info.get("task_order", []) if t in info.get("tasks", {}) and (root / info["tasks"][t]["file"]).is_file()]
            if (root / info["base"]["file"]).is_file() and len(tasks) >= 2 and (best is None or len(tasks) > len(best[2])):
                best = (root, info, tasks)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if best is None:
        return None
    root, info, tasks = best
    tasks = tasks[:max_tasks]
    base = load_file(str(root / info["base"]["file"]))
    tuned = [load_file(str(root / info["tasks"][t]["file"])) for t in tasks]
    return f"REAL family {root.name}: {len(tasks)} tasks", base, tuned


def masked_tensors(base, tuned):
    """Names of float tensors present with the same shape in the base and every task."""
    names = []
    for name, value in base.items():
        if value.dtype.kind == "f" and value.size and all(name in t and t[name].shape == value.shape for t in tuned):
            names.append(name)
    return names


# --- small measures ---------------------------------------------------------------------------

def binary_entropy(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    q = np.clip(1.0 - p, 1e-300, 1.0)
    return -(p * np.log2(p) + q * np.log2(q))


def conditional_entropy_bits(mask, context_ids):
    """count x H(mask | context) in bits, from the empirical frequencies: what coding each context
    with its exact frequency would cost if the frequency table were free."""
    if mask.size == 0:
        return 0.0
    sizes = np.bincount(context_ids)
    ones = np.bincount(context_ids[mask], minlength=sizes.size)
    used = sizes > 0
    return float((sizes[used] * binary_entropy(ones[used] / sizes[used])).sum())


def quantile_buckets(values, n_buckets):
    """Bucket 0..n-1 of |values| at its quantiles (plain numpy, as the reference measurement did)."""
    magnitude = np.abs(values.reshape(-1).astype(np.float64))
    edges = np.quantile(magnitude, np.linspace(0, 1, n_buckets + 1)[1:-1]) if magnitude.size else []
    return np.searchsorted(edges, magnitude, side="right")


def bf16_rounded(values_f32):
    """float32 -> bfloat16 (round to nearest even) -> float32; also the uint16 bits."""
    import torch

    rounded = torch.from_numpy(np.ascontiguousarray(values_f32)).to(torch.bfloat16)
    return rounded.to(torch.float32).numpy(), rounded.view(torch.int16).numpy().view(np.uint16)


def uint_view(array):
    return np.ascontiguousarray(array).reshape(-1).view(f"<u{array.dtype.itemsize}")


class Tally:
    """Sums of coded bytes, element counts and seconds per row label."""

    def __init__(self):
        self.rows = {}

    def add(self, label, coded_bytes, elements, enc_s=0.0, dec_s=0.0, raw_bytes=0):
        row = self.rows.setdefault(label, [0, 0, 0.0, 0.0, 0])
        row[0] += coded_bytes
        row[1] += elements
        row[2] += enc_s
        row[3] += dec_s
        row[4] += raw_bytes

    def bits_per_element(self, label):
        coded, elements = self.rows[label][:2]
        return 8.0 * coded / max(elements, 1)


def cpu_timed(function, *args, **kwargs):
    """(result, CPU seconds of this process): the codecs run on one thread."""
    return timed(function, *args, clock=time.process_time, **kwargs)


# --- float sections ---------------------------------------------------------------------------

def zipnn_codec():
    """(encode, decode) on raw bytes with zipnn, or None when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import zipnn
    except ImportError:
        return None

    def make(dtype_name):
        return zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype_name, threads=1)

    def encode(raw, dtype_name):
        return bytes(make(dtype_name).compress(bytearray(raw)))  # zipnn reorders its input buffer in place

    def decode(data, dtype_name):
        return bytes(make(dtype_name).decompress(data))

    return encode, decode


def one_frame_planes(values, level):
    """Size of the alternative layout: all byte planes in ONE zstd frame (for comparison only)."""
    planes = float_codecs.split_planes(values)
    return len(zstandard.ZstdCompressor(level=level).compress(planes.tobytes()))


def plane_entropy_bytes(values):
    """Order-0 entropy of each byte plane (sign rotated), summed: the bound for planes+ans."""
    total = 0.0
    for plane in float_codecs.split_planes(values):
        counts = np.bincount(plane, minlength=256)
        p = counts[counts > 0] / plane.size
        total += -(p * np.log2(p)).sum() * plane.size / 8
    return total


def measure_float_section(tally, values, levels, zipnn, dtype_name):
    """Code one tensor's uint view with every float option; check round trips; add to the tally."""
    raw = values.nbytes
    runs = [(f"{codec} L{level}", codec, level) for codec in ("zstd", "planes+zstd") for level in levels]
    runs.append(("planes+ans", "planes+ans", 0))
    for label, codec, level in runs:
        (data, params), enc_s = cpu_timed(codecs.encode, codec, values, level=level)
        decoded, dec_s = cpu_timed(codecs.decode, codec, data, dtype=values.dtype, count=values.size, params=params)
        assert np.array_equal(decoded, values), codec
        tally.add(label, len(data), values.size, enc_s, dec_s, raw)
    tally.add(f"planes, one zstd frame L{levels[-1]}", one_frame_planes(values, levels[-1]), values.size, raw_bytes=raw)
    tally.add("order-0 entropy of planes", plane_entropy_bytes(values), values.size, raw_bytes=raw)
    if zipnn is not None and values.size >= 256:
        encode, decode = zipnn
        data, enc_s = cpu_timed(encode, values.tobytes(), dtype_name)
        decoded, dec_s = cpu_timed(decode, data, dtype_name)
        assert decoded == values.tobytes(), "zipnn round trip"
        tally.add("zipnn 0.5.4", len(data), values.size, enc_s, dec_s, raw)


def print_float_table(title, tally, itemsize):
    print(f"\n  {title}")
    print(f"    {'codec':28s} {'bits/param':>10s} {'of raw':>7s} {'ratio':>6s} {'enc MB/s':>9s} {'dec MB/s':>9s}")
    for label, (coded, elements, enc_s, dec_s, raw) in tally.rows.items():
        enc = f"{raw / enc_s / 1e6:9.0f}" if enc_s else f"{'':9s}"
        dec = f"{raw / dec_s / 1e6:9.0f}" if dec_s else f"{'':9s}"
        bits = 8.0 * coded / elements
        print(f"    {label:28s} {bits:10.3f} {bits / (8 * itemsize):7.3f} {8 * itemsize / bits:6.2f} {enc} {dec}")


# --- masks ------------------------------------------------------------------------------------

MASK_ROWS = (
    "H(density)",
    "H(m | |mtv| 16 quantiles)",
    "H(m | bits-ctx groups)",
    "H(m | |mtv| 16q, earlier masks)",
    "bits+zstd",
    "|mtv|-sorted bits + zstd",
    "bits-ctx",
    "bits-ctx, bf16 mtv context",
    "bits-lvl (format v2)",
    "bits-ctx-prior (no random access)",
)


def masks_of(taus, mtv, lam):
    return [np.abs(tau) > lam * np.abs(mtv - tau) for tau in taus]


def mask_context_groups(mask, context, params):
    """The group id of every element as bits-ctx grouped it (for the conditional-entropy row)."""
    if params.get("mode") != "ctx":
        return np.zeros(mask.size, dtype=np.int64)
    grouping = mask_codecs.mtv_grouping(context, mask.size, params["feature"], "bench")
    return grouping.groups.astype(np.int64) // (mask_codecs.FINE_GROUPS // params["groups"])


def code_mask(tally, per_task, t, label, codec, mask, level, context=None):
    (data, params), enc_s = cpu_timed(codecs.encode, codec, mask, level=level, context=context)
    decoded, dec_s = cpu_timed(codecs.decode, codec, data, dtype=np.bool_, count=mask.size, params=params, context=context)
    assert np.array_equal(decoded, mask), label
    tally.add(label, len(data), mask.size, enc_s, dec_s)
    per_task[t].add(label, len(data), mask.size)
    return params


def measure_masks(tensor_masks, mtv, mtv_bf16_f32, tally, per_task, level, choices, timings):
    """All mask rows for one tensor's masks (tasks in order); contexts built once per tensor."""
    flat_masks = [m.reshape(-1) for m in tensor_masks]
    count = mtv.size
    context = {"mtv": mtv}
    _, build_s = cpu_timed(lambda: [mask_codecs.mtv_grouping(context, count, f, "bench") for f in mask_codecs.features_for(mtv.shape)])
    timings["context build"] += build_s
    context_bf16 = {"mtv": mtv_bf16_f32}
    context_lvl = {"mtv": mtv, "shape": mtv.shape}  # the whole tensor as one chunk
    buckets16 = quantile_buckets(mtv, 16)
    order = np.argsort(np.abs(mtv.reshape(-1)), kind="stable")
    prior_count = np.zeros(count, dtype=np.int64)
    for t, mask in enumerate(flat_masks):
        for table in (tally, per_task[t]):
            table.add("H(density)", binary_entropy(mask.mean()) * count / 8, count)
            table.add("H(m | |mtv| 16 quantiles)", conditional_entropy_bits(mask, buckets16) / 8, count)
            table.add("H(m | |mtv| 16q, earlier masks)", conditional_entropy_bits(mask, buckets16 * len(flat_masks) + prior_count) / 8, count)
        code_mask(tally, per_task, t, "bits+zstd", "bits+zstd", mask, level)
        sorted_bits = np.packbits(mask[order], bitorder="little").tobytes()
        for table in (tally, per_task[t]):
            table.add("|mtv|-sorted bits + zstd", len(codecs.zstd_compress(sorted_bits, level)), count)
        params = code_mask(tally, per_task, t, "bits-ctx", "bits-ctx", mask, level, context)
        choice = json.dumps(params, sort_keys=True)
        choices[choice] = choices.get(choice, 0) + count
        groups = mask_context_groups(mask, context, params)
        for table in (tally, per_task[t]):
            table.add("H(m | bits-ctx groups)", conditional_entropy_bits(mask, groups) / 8, count)
        code_mask(tally, per_task, t, "bits-ctx, bf16 mtv context", "bits-ctx", mask, level, context_bf16)
        code_mask(tally, per_task, t, "bits-lvl (format v2)", "bits-lvl", mask, level, context_lvl)
        prior_context = {"mtv": mtv, "prior_masks": flat_masks[:t], "_bits_ctx_cache": context["_bits_ctx_cache"]}
        code_mask(tally, per_task, t, "bits-ctx-prior (no random access)", "bits-ctx-prior", mask, level, prior_context)
        prior_count += mask


def print_mask_tables(tally, per_task, densities, choices, show_tasks):
    print("\n  masks, bits per parameter per task (all masked tensors together)")
    header = f"    {'task':>4s} {'density':>7s} " + " ".join(f"{c:>8s}" for c in ("H(p)", "H|mtv16", "H|groups", "bits+zstd", "sorted+z", "bits-ctx", "ctx bf16", "bits-lvl", "prior"))
    if show_tasks:
        print(header)
        for t, table in enumerate(per_task):
            print(f"    {t:4d} {densities[t]:7.3f} " + " ".join(f"{table.bits_per_element(r):8.3f}" for r in MASK_ROWS if r != "H(m | |mtv| 16q, earlier masks)"))
    print(f"\n    {'mean over tasks':36s} {'bits/param':>10s} {'vs H(p)':>8s} {'enc Mbit/s':>11s} {'dec Mbit/s':>11s}")
    reference = tally.bits_per_element("H(density)")
    for label in MASK_ROWS:
        coded, elements, enc_s, dec_s, _ = tally.rows[label]
        bits = tally.bits_per_element(label)
        enc = f"{elements / enc_s / 1e6:11.0f}" if enc_s else f"{'':11s}"
        dec = f"{elements / dec_s / 1e6:11.0f}" if dec_s else f"{'':11s}"
        print(f"    {label:36s} {bits:10.4f} {bits / reference - 1:+8.1%} {enc} {dec}")
    total = sum(choices.values())
    print("    bits-ctx choices (share of mask bits): " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(choices.items(), key=lambda kv: -kv[1])))


# --- one family -------------------------------------------------------------------------------

def analyse_family(label, base, tuned, args, zipnn):
    names = masked_tensors(base, tuned)
    params = sum(base[n].size for n in names)
    print(f"\n=== {label}: {len(names)} masked tensors, {params:,} parameters per model, {len(tuned)} tasks, lambda {args.lam}")
    float_tallies = {"base fp32": Tally(), "mtv fp32": Tally(), "mtv bf16": Tally()}
    mask_tally, per_task = Tally(), [Tally() for _ in tuned]
    densities = np.zeros(len(tuned))
    choices, timings = {}, {"context build": 0.0, "float": 0.0, "masks": 0.0}
    for name in names:
        theta_0 = base[name].astype(np.float32)
        taus = [t[name].astype(np.float32) - theta_0 for t in tuned]
        mtv = np.zeros_like(theta_0)
        for tau in taus:
            mtv += tau
        mtv_bf16_f32, mtv_bf16_bits = bf16_rounded(mtv)
        start = time.perf_counter()
        measure_float_section(float_tallies["base fp32"], uint_view(theta_0), args.levels, zipnn, "float32")
        measure_float_section(float_tallies["mtv fp32"], uint_view(mtv), args.levels, zipnn, "float32")
        measure_float_section(float_tallies["mtv bf16"], mtv_bf16_bits.reshape(-1), args.levels, zipnn, "bfloat16")
        timings["float"] += time.perf_counter() - start
        masks = masks_of(taus, mtv, args.lam)
        densities += np.array([m.sum() for m in masks]) / params
        start = time.perf_counter()
        measure_masks(masks, mtv, mtv_bf16_f32, mask_tally, per_task, args.levels[-1], choices, timings)
        timings["masks"] += time.perf_counter() - start
    print(f"\n  floats (zstd levels {args.levels}; zipnn at its defaults; planes+ans ignores the level)")
    for title, tally in float_tallies.items():
        print_float_table(f"{title} ({params:,} values)", tally, 2 if "bf16" in title else 4)
    print_mask_tables(mask_tally, per_task, densities, choices, show_tasks=True)
    print(f"\n  context build (once per tensor, shared by all tasks): {timings['context build']:.2f} s for {params:,} params"
          f" = {params / max(timings['context build'], 1e-9) / 1e6:.0f} M params/s")
    print_storage(float_tallies, mask_tally, len(tuned))
    return timings


def print_storage(float_tallies, mask_tally, n_tasks):
    """Totals with the codecs tallzip would ship (planes+ans for floats) and both mask codecs."""
    base_bits = float_tallies["base fp32"].bits_per_element("planes+ans")
    print(f"\n  storage for {n_tasks} tasks with planes+ans floats, bits per parameter "
          f"(vs {32 * n_tasks} for {n_tasks} fp32 files; paper 6.95x, naive TALL {32 * n_tasks / (64 + n_tasks):.2f}x)")
    for mask_label in ("bits+zstd", "bits-ctx"):
        mask_bits = mask_tally.bits_per_element(mask_label)
        for mtv_name in ("mtv fp32", "mtv bf16"):
            mtv_bits = float_tallies[mtv_name].bits_per_element("planes+ans")
            total = base_bits + mtv_bits + n_tasks * mask_bits
            print(f"    base {base_bits:.2f} + {mtv_name} {mtv_bits:.2f} + {n_tasks} x {mask_label} {mask_bits:.3f}"
                  f" = {total:.1f} bits/param: {32 * n_tasks / total:.2f}x (without base {32 * n_tasks / (total - base_bits):.2f}x)")


VIT_B32_PARAMS = 87_849_216


def full_size_throughput(args, zipnn):
    """Speeds on one full-size ViT-B/32 tensor (mlp.c_fc 3072x768), extrapolated to 87.8M parameters."""
    name = "mlp.c_fc.weight"
    base, tuned = synthetic_family(args.tasks, 1.0, args.seed + 1, names={name})
    theta_0 = base[name]
    taus = [t[name] - theta_0 for t in tuned]
    mtv = np.zeros_like(theta_0)
    for tau in taus:
        mtv += tau
    masks = [m.reshape(-1) for m in masks_of(taus, mtv, args.lam)]
    count = mtv.size
    print(f"\n=== THROUGHPUT on one full-size tensor ({name} {theta_0.shape}, {args.tasks} tasks), one core;"
          f" seconds scaled to a ViT-B/32 vision tower ({VIT_B32_PARAMS:,} params)")
    context = {"mtv": mtv}
    _, build_s = cpu_timed(lambda: [mask_codecs.mtv_grouping(context, count, f, "bench") for f in mask_codecs.features_for(mtv.shape)])
    print(f"  bits-ctx context build (once per tensor, all tasks share it): {count / build_s / 1e6:6.0f} M params/s"
          f" -> {VIT_B32_PARAMS / count * build_s:5.2f} s per model")
    print(f"  {'mask codec':22s} {'bits/param':>10s} {'enc Mbit/s':>10s} {'dec Mbit/s':>10s} {'enc s/task':>10s} {'dec s/task':>10s}")
    for label, codec, level, ctx in (("bits+zstd L1", "bits+zstd", 1, None), (f"bits+zstd L{args.levels[-1]}", "bits+zstd", args.levels[-1], None),
                                     ("bits-ctx", "bits-ctx", args.levels[-1], context),
                                     ("bits-lvl", "bits-lvl", args.levels[-1], {"mtv": mtv})):
        coded, enc_s, dec_s = 0, 0.0, 0.0
        for mask in masks:
            (data, params), seconds = cpu_timed(codecs.encode, codec, mask, level=level, context=ctx)
            enc_s += seconds
            decoded, seconds = cpu_timed(codecs.decode, codec, data, dtype=np.bool_, count=count, params=params, context=ctx)
            dec_s += seconds
            assert np.array_equal(decoded, mask)
            coded += len(data)
        bits = count * len(masks)
        print(f"  {label:22s} {8 * coded / bits:10.4f} {bits / enc_s / 1e6:10.0f} {bits / dec_s / 1e6:10.0f}"
              f" {VIT_B32_PARAMS * enc_s / bits:10.2f} {VIT_B32_PARAMS * dec_s / bits:10.2f}")
    print(f"  {'float codec (base fp32)':26s} {'of raw':>6s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'enc s':>7s} {'dec s':>7s}  (per {VIT_B32_PARAMS * 4 / 1e6:.0f} MB section)")
    values = uint_view(theta_0)
    runs = [(f"planes+zstd L{level}", "planes+zstd", level) for level in args.levels] + [("planes+ans", "planes+ans", 0)]
    rows = []
    for label, codec, level in runs:  # best of two runs: the first pays for page faults
        enc_s, dec_s = np.inf, np.inf
        for _ in range(2):
            (data, params), seconds = cpu_timed(codecs.encode, codec, values, level=level)
            enc_s = min(enc_s, seconds)
            decoded, seconds = cpu_timed(codecs.decode, codec, data, dtype=values.dtype, count=values.size, params=params)
            dec_s = min(dec_s, seconds)
            assert np.array_equal(decoded, values)
        rows.append((label, len(data), enc_s, dec_s))
    if zipnn is not None:
        enc_s, dec_s = np.inf, np.inf
        for _ in range(2):
            data, seconds = cpu_timed(zipnn[0], values.tobytes(), "float32")
            enc_s = min(enc_s, seconds)
            decoded, seconds = cpu_timed(zipnn[1], data, "float32")
            dec_s = min(dec_s, seconds)
            assert decoded == values.tobytes()
        rows.append(("zipnn 0.5.4", len(data), enc_s, dec_s))
    for label, size, enc_s, dec_s in rows:
        scale = VIT_B32_PARAMS / count
        print(f"  {label:26s} {size / values.nbytes:6.3f} {values.nbytes / enc_s / 1e6:9.0f} {values.nbytes / dec_s / 1e6:9.0f}"
              f" {enc_s * scale:7.1f} {dec_s * scale:7.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20, help="tasks in the family (default 20)")
    parser.add_argument("--scale", type=float, default=0.5, help="synthetic tensor sides x scale (default 0.5: 1.8M params)")
    parser.add_argument("--levels", type=lambda text: [int(x) for x in text.split(",")], default=[1, 19],
                        help="zstandard levels for the float rows, comma-separated; masks use the last (default 1,19)")
    parser.add_argument("--lam", type=float, default=0.4, help="TALL lambda (default 0.4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dir", type=Path, default=None, help="a family folder (with family.json) instead of benchmarks/.cache")
    parser.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip the full-size speed section")
    parser.add_argument("--family", choices=("auto", "synthetic", "real"), default="auto", help="auto: synthetic, plus the real one if cached")
    args = parser.parse_args(argv)
    print("$ python -m benchmarks.sizes codecs " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    zipnn = zipnn_codec()
    print(f"zipnn: {'0.5.4 installed' if zipnn else 'not installed (pip install zipnn==0.5.4 to compare)'}")
    start = time.perf_counter()
    if args.family in ("auto", "synthetic"):
        (base, tuned), seconds = cpu_timed(synthetic_family, args.tasks, args.scale, args.seed)
        analyse_family(f"SYNTHETIC family (scale {args.scale}, seed {args.seed}; generated in {seconds:.1f} s)", base, tuned, args, zipnn)
    if args.throughput:
        full_size_throughput(args, zipnn)
    if args.family in ("auto", "real"):
        real = cached_real_family(args.tasks, args.real_dir)
        if real is None:
            print("\n=== REAL family: none cached under benchmarks/.cache (python -m benchmarks.accuracy --only family --tasks 20 builds it)")
        else:
            analyse_family(*real, args, zipnn)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")

