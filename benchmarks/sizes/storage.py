"""Storage of a TALL-mask family under each of issue 7's options, against the paper's layout.

    python -m benchmarks.sizes storage                          # ViT-B/32-shaped family, N = 8, 14, 20
    python -m benchmarks.sizes storage --layers 1 --tasks 8     # a quick look (one transformer block)
    python -m benchmarks.sizes storage --write-results          # also write the tables into benchmarks/RESULTS.md

The family: the visual tower of an open_clip ViT-B/32 (tallzip.demo.vit_shapes(**VIT_B32),
87,849,216 parameters) plus the frozen text-side tensors that the paper's released image-encoder
checkpoints carry (token embedding 49408 x 512, text positional embedding, final LayerNorm, text
projection, logit scale: 25,599,489 parameters, 22.6% of 113,448,705), each task with its own small
head (benchmarks.fixtures, preset vit-b32-clip). Task vectors are GENERATED (the fixtures' fine-tune
model: a share of 25-40% of each tensor's weights moved per task, plus a low-rank part), not trained, so mask densities and how well |mtv| predicts them are modelled:
the real family (below) is the check on them. 20 task files are generated once (9.1 GB) into
--work-dir and reused; N = 8 and 14 are the first 8 and 14 of them. The measured sizes are kept
there too and reused while the inputs, the settings and the codecs' output on a fixed sample stay
the same (--fresh measures again). A full run takes ~10 minutes on 2 CPU cores.

How the table is made. An archive is its sections plus a header, a manifest and alignment padding,
and each section is coded on its own, so for every tensor the benchmark computes the mtv and the
masks (lambda --lam for every task) and codes each section with every codec a row needs, exactly as
tallzip.pack would (same codec calls, level 3). A row's size is the sum of the sections it stores,
plus the header, manifest and padding of a real archive of the same N. The last row, all options
together, is also packed for real with tallzip.pack for every N, and its sections must add up to
the computed figure to the byte (the run stops otherwise).

Rows. "paper layout": how the authors store a family (fp32 base, fp32 mtv and numpy-packbits
masks of one bit per parameter, over the whole flattened state dict, unchanged tensors included):
computed, not packed, since tallzip always stores unchanged tensors once. Each option row changes
one thing of the paper layout; a tensor that no task changes then still has a zero mtv and N zero
masks (coded by that row's codecs), except in the "shared tensors once" row (tallzip's kind
`shared`: base only). Bits per parameter are per parameter of the whole model (113.4M), so
base + mtv + N x mask (+ heads and overhead) = the total. The ratio is against the N fp32 task files.

Normalized accuracy is the real-data accuracy benchmark's, for TALL masks at the same N with the mtv
in float32 or bfloat16 (every other option is lossless and cannot change it); the generated family
has no accuracy of its own. It is read from benchmarks/results/accuracy.json: any JSON object there
holding "n_tasks" (int), "mtv_dtype" ("float32" or "bfloat16") and "normalized_accuracy" (a
fraction), with "tall" in its "method" or in the keys leading to it.

The same table is printed for the real small family (a ViT trained on real images, see
benchmarks/family.py) when benchmarks/.cache holds one (or --real-dir names one); it is read,
never trained here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tallzip
from tallzip.demo import VIT_B32

from benchmarks.fixtures import generate
from benchmarks.fixtures.families import vit_preset
from benchmarks.sizes.library import (DEFAULT_CODECS, DEFAULT_MTV_DTYPE, Family, available_cpus, codecs, tall_mask,
                                      taskvec, to_bits)
from tallzip.options import RunOptions, StoreOptions

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
CACHE_ROOT = HERE / ".cache"
RESULTS_MD = HERE / "RESULTS.md"
ACCURACY_JSON = HERE / "results" / "accuracy.json"
RESULTS_HEADING = "## Storage (issue 7)"
LEVEL = 3  # tallzip pack's default zstandard level
FLOAT_CODECS = ("raw", "planes+zstd", "planes+ans")
PACKBITS = "packbits"  # one bit per parameter, no entropy coding: how the authors save masks
MASK_CODECS = (PACKBITS, "bits+zstd", "bits-ctx")
MTV_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Layout:
    label: str
    float_codec: str = "raw"
    mask_codec: str = PACKBITS
    mtv_dtype: str = "float32"
    base_ref: bool = False
    shared_once: bool = False  # unchanged tensors: base only, rather than base + zero mtv + zero masks


PAPER = Layout("paper layout (computed)")
LAYOUTS = (
    PAPER,
    Layout("floats planes+zstd", float_codec="planes+zstd"),
    Layout("floats planes+ans", float_codec="planes+ans"),
    Layout("masks bits+zstd", mask_codec="bits+zstd"),
    Layout("masks bits-ctx", mask_codec="bits-ctx"),
    Layout("mtv bfloat16", mtv_dtype="bfloat16"),
    Layout("base by reference", base_ref=True),
    Layout("shared tensors once", shared_once=True),
    Layout("defaults, mtv float32 (lossless)", float_codec=DEFAULT_CODECS["float"], mask_codec=DEFAULT_CODECS["mask"],
           shared_once=True),
    Layout("tallzip defaults", float_codec=DEFAULT_CODECS["float"], mask_codec=DEFAULT_CODECS["mask"],
           mtv_dtype=DEFAULT_MTV_DTYPE, shared_once=True),  # what `tallzip pack` does unless told otherwise
    Layout("all lossless", float_codec="planes+ans", mask_codec="bits-ctx", shared_once=True),
    Layout("all but base by reference", float_codec="planes+ans", mask_codec="bits-ctx", mtv_dtype="bfloat16",
           shared_once=True),
    Layout("all together", float_codec="planes+ans", mask_codec="bits-ctx", mtv_dtype="bfloat16", base_ref=True,
           shared_once=True),
)
PACKED = LAYOUTS[-1]  # packed for real and checked byte for byte


# --- the generated family ----------------------------------------------------------------------

def synthetic_family(work_dir: Path, n_tasks: int, layers: int, log) -> tuple[Path, dict[str, Path]]:
    """Generate (once, then reuse) the base and n_tasks task files (benchmarks.fixtures, preset vit-b32-clip
    cut to `layers` blocks); returns (base path, {task: path})."""
    preset = vit_preset(clip=True, **{**VIT_B32, "layers": layers})
    folder = work_dir / f"vitb32-{layers}layers"
    stamp = folder.with_name(folder.name + ".json")
    settings = {"version": 2, "preset": repr(preset), "tasks": n_tasks, "seed": 0}
    if not stamp.exists() or json.loads(stamp.read_text()) != settings:
        shutil.rmtree(folder, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        start = time.perf_counter()
        generate(folder, preset, n_tasks, log=None)
        stamp.write_text(json.dumps(settings))
        log(f"generated the family in {folder} ({time.perf_counter() - start:.0f} s)")
    paths = {p.name.split(".")[0]: p for p in sorted((folder / "tasks").glob("task*.safetensors"))}
    return folder / "base.safetensors", paths


def real_family(real_dir: Path | None) -> tuple[Path, Path, dict[str, Path], str] | None:
    """(root, base path, {task: path} in the family's task order, description) of a built real family."""
    candidates = [real_dir] if real_dir else sorted(CACHE_ROOT.glob("*/family.json"), key=lambda p: p.stat().st_mtime)
    for candidate in reversed(candidates):
        root = candidate.parent if candidate.name == "family.json" else candidate
        try:
            info = json.loads((root / "family.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        order = [t for t in info.get("task_order", info["tasks"]) if t in info["tasks"]]
        paths = {t: root / info["tasks"][t]["file"] for t in order}
        if all(p.is_file() for p in paths.values()):
            return root, root / info["base"]["file"], paths, (
                f"{len(paths)} tasks, {info.get('parameters')} parameters, benchmarks.family config "
                f"{info.get('config_hash')}")
    return None


# --- measuring every section under every codec -------------------------------------------------

class Sizes:
    """Bytes of each kind of section, summed over tensors (and tasks)."""

    def __init__(self, task_counts):
        self.base = dict.fromkeys(FLOAT_CODECS, 0)
        self.mtv = {n: {(d, c): 0 for d in MTV_DTYPES for c in FLOAT_CODECS} for n in task_counts}
        # masks[n][(codec, dtype of the mtv the context codec sees)], all n tasks together
        self.masks = {n: {(c, d): 0 for c in MASK_CODECS for d in MTV_DTYPES} for n in task_counts}
        self.own = {n: dict.fromkeys(FLOAT_CODECS, 0) for n in task_counts}
        # a tensor that no task changes, stored the paper's way: zero mtv, one zero mask per task
        self.zero_mtv = {(d, c): 0 for d in MTV_DTYPES for c in FLOAT_CODECS}
        self.zero_mask = dict.fromkeys(MASK_CODECS, 0)  # one task's
        self.params = {"all": 0, "masked": 0, "shared": 0}
        self.seconds = 0.0  # measuring took


def _encode_keys(value):
    if isinstance(value, dict):
        return {"|".join(map(str, k)) if isinstance(k, tuple) else str(k): _encode_keys(v) for k, v in value.items()}
    return value


def _decode_keys(value):
    if isinstance(value, dict):
        return {(tuple(k.split("|")) if "|" in k else int(k) if k.isdigit() else k): _decode_keys(v)
                for k, v in value.items()}
    return value


def cached(path: Path, key: dict, compute):
    """compute() -> (Sizes, checks), or what an earlier run with the same key stored at path."""
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            sizes = Sizes([])
            sizes.__dict__.update(_decode_keys(stored["sizes"]))
            return sizes, _decode_keys(stored["checks"])
    except (OSError, ValueError, KeyError):
        pass
    sizes, checks = compute()
    path.write_text(json.dumps({"key": key, "sizes": _encode_keys(sizes.__dict__), "checks": _encode_keys(checks)}))
    return sizes, checks


def _coded_size(codec, array, context=None) -> int:
    data, _ = codecs.encode(codec, array, level=LEVEL, context=context)
    return len(data)


def _mask_sizes(mask: torch.Tensor, contexts: dict) -> dict:
    """{(codec, mtv dtype): bytes} of one mask, coded as the archive writer codes it."""
    flat = mask.reshape(-1).numpy()
    packed = np.packbits(flat, bitorder="little")
    out = {}
    for dtype, context in contexts.items():
        out[(PACKBITS, dtype)] = packed.size
        out[("bits+zstd", dtype)] = _coded_size("zstd", packed)  # the writer zstd's the packed bytes
        out[("bits-ctx", dtype)] = _coded_size("bits-ctx", flat, context)
    return out


def _float_sizes(tensor: torch.Tensor) -> dict:
    """{float codec: bytes}; a tensor that is not float is coded 'zstd' whatever the float codec, as pack does."""
    bits = to_bits(tensor)
    if not tensor.is_floating_point():
        return dict.fromkeys(FLOAT_CODECS, _coded_size("zstd", bits))
    return {c: (bits.nbytes if c == "raw" else _coded_size(c, bits)) for c in FLOAT_CODECS}


def measure(base_path: Path, task_paths: dict, task_counts, lam: float, log) -> Sizes:
    """Code every section that any layout stores, for each N in task_counts (the first N tasks)."""
    task_counts = sorted(task_counts)
    names_all = list(task_paths)[:max(task_counts)]
    family = Family.open({t: task_paths[t] for t in names_all}, base_path)
    sizes = Sizes(task_counts)
    pool = ThreadPoolExecutor(max_workers=available_cpus())
    start = time.perf_counter()
    names = family.base.names
    for i, name in enumerate(names):
        base, tasks = family.tensors(name)
        count = base.numel()
        sizes.params["all"] += count
        shared = all(torch.equal(base, t) for t in tasks)
        floats = pool.submit(_float_sizes, base)
        for codec, size in floats.result().items():
            sizes.base[codec] += size
        if shared:
            sizes.params["shared"] += count
            if base.is_floating_point():
                zero = torch.zeros_like(base, dtype=torch.float32)
                for dtype in MTV_DTYPES:
                    for codec, size in _float_sizes(zero.to(getattr(torch, dtype))).items():
                        sizes.zero_mtv[(dtype, codec)] += size
                context = {"mtv": zero.reshape(-1).numpy(), "shape": tuple(base.shape)}
                for (codec, dtype), size in _mask_sizes(torch.zeros_like(base, dtype=torch.bool), {"float32": context}).items():
                    sizes.zero_mask[codec] += size
            continue
        if not family.is_mergeable(name):
            raise SystemExit(f"{name}: a per-task (non-float) tensor; this benchmark expects none")
        sizes.params["masked"] += count
        for n in task_counts:
            mtv = taskvec.sum_task_vectors(base, tasks[:n])
            stored = {d: mtv.to(getattr(torch, d)) for d in MTV_DTYPES}
            mtv_jobs = {d: pool.submit(_float_sizes, stored[d]) for d in MTV_DTYPES}
            # one context dict per stored mtv, shared by all tasks of the tensor (the codec caches its grouping)
            contexts = {d: {"mtv": stored[d].to(torch.float32).reshape(-1).numpy(), "shape": tuple(base.shape)}
                        for d in MTV_DTYPES}
            masks = [tall_mask(base, t, mtv, lam) for t in tasks[:n]]
            # the first task here: it builds the contexts' groupings, which the other tasks' jobs then share
            first = _mask_sizes(masks[0], contexts)
            mask_jobs = [pool.submit(_mask_sizes, m, contexts) for m in masks[1:]]
            for key, size in first.items():
                sizes.masks[n][key] += size
            for d, job in mtv_jobs.items():
                for codec, size in job.result().items():
                    sizes.mtv[n][(d, codec)] += size
            for job in mask_jobs:
                for key, size in job.result().items():
                    sizes.masks[n][key] += size
        log(f"  measured {i + 1}/{len(names)} tensors ({time.perf_counter() - start:.0f} s)", end="\r")
    log("")
    for n in task_counts:
        for t in names_all[:n]:
            for name in family.own_names(t):
                tensor = family.tasks[t].get(name)
                for codec, size in _float_sizes(tensor).items():
                    sizes.own[n][codec] += size
    pool.shutdown()
    sizes.seconds = time.perf_counter() - start
    return sizes


# --- composing the rows ------------------------------------------------------------------------

def section_bytes(sizes: Sizes, layout: Layout, n: int) -> dict:
    """Bytes of each kind of section that an archive in this layout holds."""
    unchanged = not layout.shared_once
    mtv = sizes.mtv[n][(layout.mtv_dtype, layout.float_codec)]
    masks = sizes.masks[n][(layout.mask_codec, layout.mtv_dtype)]
    if unchanged:
        mtv += sizes.zero_mtv[(layout.mtv_dtype, layout.float_codec)]
        masks += n * sizes.zero_mask[layout.mask_codec]
    return {"base": 0 if layout.base_ref else sizes.base[layout.float_codec], "mtv": mtv, "mask": masks,
            "own": sizes.own[n][layout.float_codec]}


def pack_checked(base_path, task_paths, n, sizes: Sizes, lam, out_dir: Path, log) -> dict:
    """Pack the PACKED layout for real; its sections must be what the measurement says, to the byte."""
    layout = PACKED
    out = out_dir / f"packed-{n}.tallz"
    start = time.perf_counter()
    manifest = tallzip.pack({t: task_paths[t] for t in list(task_paths)[:n]}, base_path, out, store=StoreOptions(lambdas=lam, mtv_dtype=layout.mtv_dtype, base_ref=layout.base_ref, codecs={"float": layout.float_codec, "mask": layout.mask_codec}), run=RunOptions(device="cpu"), force=True)
    seconds = time.perf_counter() - start
    real = {"base": 0, "mtv": 0, "mask": 0, "own": 0}
    for s in manifest["sections"]:
        real[s["role"]] = real.get(s["role"], 0) + s["length"]
    computed = section_bytes(sizes, layout, n)
    if real != computed:
        raise SystemExit(f"N={n}: the packed archive's sections {real} differ from the computed {computed}")
    archive_bytes = out.stat().st_size
    overhead = archive_bytes - sum(real.values())
    with tallzip.open(out, base=base_path) as archive:  # it opens, and rebuilds a task exactly
        task = archive.tasks[-1]
        name = next(k for k, v in archive.tensors.items() if v["kind"] == "masked")
        family = Family.open({t: task_paths[t] for t in list(task_paths)[:n]}, base_path)
        base, tasks = family.tensors(name)
        mtv = taskvec.sum_task_vectors(base, tasks)
        mask = tall_mask(base, tasks[-1], mtv, lam)
        expected = taskvec.rebuild(base, mask, mtv.to(torch.bfloat16).to(torch.float32))
        if not torch.equal(archive.task_tensor(task, name), expected):
            raise SystemExit(f"N={n}: task {task!r} tensor {name!r} does not rebuild as base + mask * bf16(mtv)")
    out.unlink()
    log(f"  packed N={n} for real in {seconds:.0f} s: {archive_bytes:,} bytes, sections as computed, "
        f"header + manifest + padding {overhead:,} bytes")
    return {"archive_bytes": archive_bytes, "overhead": overhead, "pack_seconds": seconds}


def accuracy_lookup():
    """(n_tasks, mtv dtype) -> normalized accuracy of TALL masks, from the accuracy benchmark's results."""
    try:
        results = json.loads(ACCURACY_JSON.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            n = node.get("n_tasks")
            dtype = node.get("mtv_dtype")
            value = node.get("normalized_accuracy")
            method = str(node.get("method", "")) + " ".join(path)
            if isinstance(n, int) and dtype in MTV_DTYPES and isinstance(value, (int, float)) and "tall" in method.lower():
                found[(n, dtype)] = float(value)
            for key, child in node.items():
                walk(child, path + [str(key)])
        elif isinstance(node, list):
            for child in node:
                walk(child, path)

    walk(results, [])
    return found


def table_rows(sizes: Sizes, n: int, input_bytes: int, overhead: int, accuracy: dict):
    params = sizes.params["all"]
    rows = []
    for layout in LAYOUTS:
        parts = section_bytes(sizes, layout, n)
        total = sum(parts.values()) + (0 if layout is PAPER else overhead)  # the paper's: payload only
        covered = sizes.params["masked"] + (0 if layout.shared_once else sizes.params["shared"])  # by mtv and masks
        acc = accuracy.get((n, layout.mtv_dtype))
        rows.append([
            layout.label, f"{8 * total / 1e9:.3f}", f"{input_bytes / total:.2f}x",
            "-" if layout.base_ref else f"{8 * parts['base'] / params:.2f}", f"{8 * parts['mtv'] / covered:.2f}",
            f"{8 * parts['mask'] / covered / n:.3f}", f"{8 * total / params:.2f}",
            f"{acc:.2%}" if acc is not None else "n/a (see accuracy benchmark)",
        ])
    return rows


HEADERS = ["configuration", "Gbit", "ratio", "base b/p", "mtv b/p", "mask b/p per task", "total b/p",
           "normalized accuracy"]


def format_table(headers, rows) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def report(title, sizes: Sizes, task_counts, input_bytes: dict, overheads: dict, accuracy, out):
    p = sizes.params
    out(f"{title}: {p['all']:,} parameters per checkpoint, {p['masked']:,} changed by the tasks "
        f"(masked), {p['shared']:,} unchanged ({p['shared'] / p['all']:.1%})")
    for n in task_counts:
        out("")
        out(f"N = {n} tasks: inputs {n} fp32 files, {8 * input_bytes[n] / 1e9:.2f} Gbit; "
            f"header + manifest + padding {overheads[n]:,} bytes")
        out(format_table(HEADERS, table_rows(sizes, n, input_bytes[n], overheads[n], accuracy)))


def packed_line(checks) -> str:
    return "Real packs of 'all together', sections as computed to the byte: " + "; ".join(
        f"N={n} {c['archive_bytes']:,} bytes in {c['pack_seconds']:.0f} s" for n, c in checks.items()) + \
        f" ({available_cpus()} CPUs)"


def layouts_legend() -> str:
    return "\n".join([
        "Rows: paper layout = fp32 base + fp32 mtv + 1 bit/param masks (numpy packbits) over the whole",
        "  state dict, unchanged tensors included, as the authors' code stores them (computed, not packed;",
        "  payload only, no container). The other rows include tallzip's header, manifest and padding.",
        "  Each following row changes one thing of it: floats (base, mtv, heads) coded planes+zstd or",
        "  planes+ans; masks bits+zstd (generic) or bits-ctx (|mtv| context); mtv stored as bfloat16 (masks",
        "  from the fp32 mtv); base by reference (not stored); shared tensors once (unchanged tensors: base",
        "  only). Then combinations; 'all together' is packed for real at every N and matches to the byte.",
        "  Section b/p as `tallzip info` counts them: bits per element of those sections (the mtv and the",
        "  masks cover the changed tensors, or all with the paper's layout; masks per task). total b/p =",
        "  archive bits per parameter of one checkpoint. Ratio = N fp32 task files / archive. (Where the",
        "  masks also cover unchanged tensors, their all-zero masks cost ~0 under bits+zstd and bits-ctx",
        "  and pull those rows' mask b/p down: compare totals.)",
    ])


MEASURE_VERSION = 1  # bump when measure() or pack_checked() change what they count


def codecs_fingerprint() -> str:
    """sha256 of a fixed sample coded with every codec the rows use: changes when an encoder's output does."""
    rng = np.random.default_rng(1234)
    weights = torch.from_numpy((0.02 * rng.standard_normal(1 << 16)).astype(np.float32))
    mask = torch.from_numpy(rng.random(1 << 16) < 0.3 * weights.abs().numpy() / 0.02)
    digest = hashlib.sha256()
    for tensor in (weights, weights.to(torch.bfloat16)):
        for codec in FLOAT_CODECS:
            digest.update(codecs.encode(codec, to_bits(tensor), level=LEVEL)[0])
    context = {"mtv": weights.numpy(), "shape": (256, 256)}
    for codec in MASK_CODECS[1:]:
        digest.update(codecs.encode(codec, mask.numpy(), level=LEVEL, context=context)[0])
    return digest.hexdigest()


def measured(base_path, task_paths, task_counts, args, folder: Path, log):
    """measure() and pack_checked() for every N, reusing an earlier run's results for the same
    inputs, settings and codec outputs (--fresh: never)."""
    key = {"inputs": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in [base_path, *task_paths.values()]],
           "tasks": task_counts, "lam": args.lam, "level": LEVEL, "measure": MEASURE_VERSION,
           "codecs": codecs_fingerprint()}

    def compute():
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            sizes = measure(base_path, task_paths, task_counts, args.lam, log)
            return sizes, {n: pack_checked(base_path, task_paths, n, sizes, args.lam, Path(tmp), log) for n in task_counts}

    path = args.work_dir / f"sizes-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]}.json"
    if args.fresh:
        path.unlink(missing_ok=True)
    return cached(path, key, compute)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 14, 20])
    parser.add_argument("--layers", type=int, default=VIT_B32["layers"], help="transformer blocks (12: ViT-B/32)")
    parser.add_argument("--lam", type=float, default=taskvec.DEFAULT_LAMBDA, help="mask lambda of every task")
    parser.add_argument("--work-dir", type=Path, default=CACHE_ROOT / "storage", help="where the generated family is kept")
    parser.add_argument("--clean", action="store_true", help="delete the generated family afterwards")
    parser.add_argument("--real-dir", type=Path, help="a real family built by benchmarks.family (default: benchmarks/.cache)")
    parser.add_argument("--no-real", action="store_true", help="skip the real family")
    parser.add_argument("--fresh", action="store_true", help="measure again even if an earlier run's results fit")
    parser.add_argument("--write-results", action="store_true", help=f"put the output under '{RESULTS_HEADING}' in {RESULTS_MD}")
    args = parser.parse_args(argv)
    task_counts = sorted(set(args.tasks))
    if task_counts[0] < 2:
        parser.error("--tasks: at least 2")

    lines = []

    def out(text=""):
        print(text, flush=True)
        lines.append(text)

    def log(text, end="\n"):
        print(text, end=end, file=sys.stderr, flush=True)

    command = "python -m benchmarks.sizes storage" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    out(f"$ {command}")
    started = time.perf_counter()
    accuracy = accuracy_lookup()
    out(f"lambda {args.lam:g} for every task; zstandard level {LEVEL}; "
        + (f"normalized accuracy from {ACCURACY_JSON.relative_to(HERE.parent)}: the accuracy benchmark's real "
           "family at the same N, TALL masks with the sum mtv (float32 or bfloat16 as the row stores it), "
           "lambda chosen per task on validation; the codecs are lossless, so every row with the same mtv "
           "precision rebuilds the same models" if accuracy else
           "no accuracy results found (benchmarks/results/accuracy.json)"))
    out(layouts_legend())

    base_path, task_paths = synthetic_family(args.work_dir, max(task_counts), args.layers, log)
    sizes, checks = measured(base_path, task_paths, task_counts, args, base_path.parent, log)
    inputs = {n: sum(p.stat().st_size for p in list(task_paths.values())[:n]) for n in task_counts}
    out("")
    shape = "ViT-B/32" if args.layers == VIT_B32["layers"] else f"ViT-B/32 width, {args.layers} of 12 blocks"
    report(f"GENERATED family ({shape} visual tower + frozen CLIP text-side tensors; task vectors modelled, "
           "not trained)", sizes, task_counts, inputs, {n: c["overhead"] for n, c in checks.items()}, accuracy, out)
    out("")
    out(packed_line(checks))

    real = None if args.no_real else real_family(args.real_dir)
    out("")
    if real is None:
        out("REAL family: none built (python -m benchmarks.accuracy --only family --tasks 20 builds one into benchmarks/.cache)")
    else:
        root, real_base, real_tasks, description = real
        counts = [n for n in task_counts if n <= len(real_tasks)]
        real_sizes, real_checks = measured(real_base, real_tasks, counts, args, root, log)
        real_inputs = {n: sum(p.stat().st_size for p in list(real_tasks.values())[:n]) for n in counts}
        report(f"REAL family ({root}: {description}; trained on real images)", real_sizes, counts, real_inputs,
               {n: c["overhead"] for n, c in real_checks.items()}, accuracy, out)
        out("")
        out(packed_line(real_checks))
    out("")
    out(f"({time.perf_counter() - started:.0f} s in all; measuring the generated family took {sizes.seconds:.0f} s "
        "on its first run, when its sizes were stored for reuse)")

    if args.clean:
        shutil.rmtree(args.work_dir / f"vitb32-{args.layers}layers", ignore_errors=True)
        (args.work_dir / f"vitb32-{args.layers}layers.json").unlink(missing_ok=True)
    if args.write_results:
        write_results(lines)
    return 0


def write_results(lines):
    """Replace (or add) this benchmark's section of RESULTS.md, leaving the others alone."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    section = f"{RESULTS_HEADING}\n\n```\n" + "\n".join(lines) + "\n```\n"
    start = text.find(RESULTS_HEADING + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(RESULTS_HEADING))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    RESULTS_MD.write_text(text)

