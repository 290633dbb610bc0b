"""Speed and scale of tallzip (issues 2, 5 and 12), as ratios taken in one run on this machine, on two
generated families: ViT-B/32-shaped (tallzip.demo, fp32 safetensors files) and LLM-shaped
(benchmarks.llm_family: Hugging Face sharded bf16 folders with a 32000-row embedding).

For every family size, every command runs on a cold page cache (files evicted with
posix_fadvise(DONTNEED) first) in a fresh process, `--repeat` times, median shown:
- pack against simply reading all N + 1 inputs once;
- extract of one task against safetensors' own load_file + save_file (+ fsync) of its original;
- load of one task into memory against reading every tensor of its original into memory;
- verify (every checksum and decode) and merge (consensus-ta from the archive);
- the peak RSS (VmHWM) of each command above the interpreter, and its mean CPUs used (CPU s / wall s).
Then the resident switch time and a pack under an address-space limit (ViT family).

    python -m benchmarks.speed                          # ViT N = 2 8 20, LLM (small) N = 2 8
    python -m benchmarks.speed --quick                  # small ViT shapes, N = 2 and 4: seconds
    python -m benchmarks.speed --family llm --llm-preset 1b --llm-tasks 8 --repeat 1
    python -m benchmarks.speed --codecs fast            # zstd / bits+zstd instead of the default codecs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAST_CODECS = {"float": "zstd", "mask": "bits+zstd", "other": "zstd"}
QUICK_SHAPE = dict(width=256, layers=4, patch=16, image=128, embed=128)


# --- machine state ---------------------------------------------------------------------------

def loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def evict(paths):
    """Ask the kernel to drop these files from the page cache (written files are synced first)."""
    for path in paths:
        if not Path(path).is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(paths) -> float | None:
    """Share of the files' bytes in the page cache, from util-linux fincore (None without it)."""
    paths = [str(p) for p in paths if Path(p).is_file()]
    if not paths or not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    cached = total = 0
    for line in out.split("\n"):
        if line.strip():
            res, size = line.split()[:2]
            cached, total = cached + int(res), total + int(size)
    return cached / total if total else None


def read_all(paths) -> float:
    """Seconds to read every file once, start to end, with plain reads into one reused buffer."""
    buffer = memoryview(bytearray(16 << 20))
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass
    return time.perf_counter() - start


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def status_kib(field: str) -> int:
    """A field of /proc/self/status, in KiB: VmRSS (now), VmHWM (peak of this process image).

    VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child
    started from a big parent would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# --- the family --------------------------------------------------------------------------------

def ensure_family(cache: Path, n_tasks: int, quick: bool) -> tuple[Path, list[Path], dict]:
    """Generate (once) a family of n_tasks under cache/; the first k tasks of it serve any k <= n."""
    from tallzip.demo import VIT_B32, make_family, vit_shapes
    shape = QUICK_SHAPE if quick else VIT_B32
    folder = cache / ("quick" if quick else "vitb32")
    marker = folder / "complete.json"
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if info.get("tasks", 0) < n_tasks or info.get("shape") != shape:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        bytes_per_file = 4 * sum(math.prod(s) for s in vit_shapes(**shape).values())
        need = (n_tasks + 1) * bytes_per_file * 1.25 + 3 * bytes_per_file
        free = shutil.disk_usage(folder).free
        if free < need:
            sys.exit(f"error: {folder}: {free / 1e9:.1f} GB free, the benchmark needs about {need / 1e9:.1f} GB")
        print(f"generating {n_tasks} fine-tuned checkpoints ({'quick' if quick else 'ViT-B/32'} shapes) in {folder} ...", flush=True)
        start = time.perf_counter()
        make_family(folder, n_tasks, **shape)
        info = {"tasks": n_tasks, "shape": shape, "seconds": time.perf_counter() - start}
        marker.write_text(json.dumps(info))
    base = folder / "base.safetensors"
    tasks = sorted((folder / "finetuned").glob("task*.safetensors"))[:n_tasks]
    return base, tasks, info


# --- children: each command in a fresh process, so its peak RSS and CPU time are its own -------

def _supports(fn, name: str) -> bool:
    import inspect
    return name in inspect.signature(fn).parameters


def _op_pack(spec):
    import tallzip
    extra = {"memory": spec["memory"]} if spec.get("memory") and _supports(tallzip.pack, "memory") else {}
    tallzip.pack(spec["tasks"], spec["base"], spec["output"], force=True, device=spec["device"],
                 codecs=spec.get("codecs"), **extra)


def _op_extract(spec):
    import tallzip
    with tallzip.open(spec["archive"]) as arc:
        arc.extract(spec["task"], spec["output"], force=True, device=spec["device"])


def _op_load(spec):
    import tallzip
    with tallzip.open(spec["archive"]) as arc:
        state = arc.load(spec["task"], device=spec["device"])
        spec["loaded_bytes"] = sum(t.numel() * t.element_size() for t in state.values())


def _op_verify(spec):
    import tallzip
    from tallzip.verification.verify import verify
    with tallzip.open(spec["archive"]) as arc:
        verify(arc)


def _op_merge(spec):
    from tallzip.merging import merge as merging
    merging.merge_to_file(spec["archive"], spec["output"], method="consensus-ta", force=True, device=spec["device"])


def _original_files(path: Path) -> list[Path]:
    """The tensor files of one checkpoint: the file itself, or a sharded folder's shards."""
    path = Path(path)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def _op_load_original(spec):
    from tallzip.formats.checkpoints.checkpoint import open_checkpoint
    ckpt = open_checkpoint(spec["original"])
    state = {name: ckpt.get(name) for name in ckpt.names}
    spec["loaded_bytes"] = sum(t.numel() * t.element_size() for t in state.values())


def _op_load_save_original(spec):
    """What extract is compared with: safetensors' own load_file + save_file of every file of the
    original, then fsync (the extract also syncs its output before renaming it into place)."""
    from safetensors.torch import load_file, save_file
    out = Path(spec["output"])
    out.mkdir(parents=True, exist_ok=True)
    for path in _original_files(spec["original"]):
        state = load_file(str(path))
        save_file(state, str(out / path.name), metadata={"format": "pt"})
        fsync_path(out / path.name)
        del state


CHILD_OPS = {"pack": _op_pack, "extract": _op_extract, "load": _op_load, "verify": _op_verify, "merge": _op_merge,
             "load_original": _op_load_original, "load_save_original": _op_load_save_original}


def child_run(spec: dict) -> dict:
    import importlib
    import torch
    importlib.import_module("tallzip")  # its imports count in 'before', not in the command
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    before = status_kib("VmRSS")
    if spec.get("address_limit_gib"):
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
        limit = vm * 1024 + int(spec["address_limit_gib"] * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    CHILD_OPS[spec.get("op", "pack")](spec)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {"seconds": seconds, "cpu_s": cpu, "cpus_used": cpu / seconds if seconds else 0.0,
            "peak_rss_kib": status_kib("VmHWM"), "rss_before_kib": before}


def run_child(op: str, **spec) -> dict:
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}
    if "tasks" in spec:
        spec["tasks"] = {k: str(v) for k, v in spec["tasks"].items()}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--child", json.dumps({"op": op, **spec})],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_pack(tasks: dict, base: Path, output: Path, device: str, codecs: dict | None, **extra) -> dict:
    return run_child("pack", tasks=tasks, base=base, output=output, device=device, codecs=codecs, **extra)


# --- measurements ------------------------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def all_files(paths) -> list[Path]:
    """Every file of these checkpoints (a sharded folder counts all its files)."""
    out = []
    for path in map(Path, paths):
        out.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return out


def _median_run(repeat: int, prepare, run) -> dict:
    """Run `repeat` times (prepare first each time); the median seconds' run, with the largest peak RSS."""
    runs = []
    for _ in range(repeat):
        prepare()
        runs.append(run())
    good = [r for r in runs if "error" in r] or sorted(runs, key=lambda r: r["seconds"])
    if "error" in good[0]:
        return good[0]
    chosen = dict(good[len(good) // 2])
    chosen["peak_rss_kib"] = max(r["peak_rss_kib"] for r in runs)
    chosen["all_seconds"] = [r["seconds"] for r in runs]
    return chosen


def measure_commands(family: str, n: int, base: Path, task_paths: list, work: Path, device: str, codecs,
                     repeat: int, memory: str | None) -> dict:
    """Every command on a cold cache, each in its own process, median of `repeat`: pack against
    reading the inputs, extract against load+save of the original, load against reading the original,
    verify and merge; peak RSS and mean CPUs used of each."""
    tasks = {Path(p).name.split(".")[0]: p for p in task_paths[:n]}
    inputs = all_files([base, *tasks.values()])
    archive = work / f"{family}-{n}.tallz"
    task, original = next(iter(tasks.items()))
    out_extract = work / (f"{task}.out" if Path(original).is_dir() else f"{task}.safetensors")
    out_saved, out_merged = work / "resaved", work / "merged.safetensors"
    row = {"family": family, "n": n, "device": device, "input_bytes": sum(p.stat().st_size for p in all_files(tasks.values())),
           "base_bytes": sum(p.stat().st_size for p in all_files([base])), "loadavg": loadavg()}

    def cold(*extra):
        def prepare():
            for leftover in (out_extract, out_saved, out_merged):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
            evict(inputs + [archive] + list(extra))
        return prepare

    reads = []
    for _ in range(repeat):
        evict(inputs)
        reads.append(read_all(inputs))
    row["read_s"] = statistics.median(reads)
    row["cached_before_pack"] = (evict(inputs), cached_fraction(inputs))[1]
    common = dict(device=device, memory=memory)
    row["pack"] = _median_run(repeat, cold(), lambda: run_child("pack", tasks=tasks, base=base, output=archive,
                                                                 codecs=codecs, **common))
    print(f"  {family} N={n}: read {row['read_s']:.2f} s, pack {row['pack'].get('seconds', float('nan')):.2f} s "
          f"{row['pack'].get('error', '')}", flush=True)
    if not archive.is_file():
        return row
    row["archive_bytes"] = archive.stat().st_size
    orig_files = all_files([original])
    jobs = {
        "extract": lambda: run_child("extract", archive=archive, task=task, output=out_extract, **common),
        "load_save_original": lambda: run_child("load_save_original", original=original, output=out_saved),
        "load": lambda: run_child("load", archive=archive, task=task, **common),
        "load_original": lambda: run_child("load_original", original=original),
        "verify": lambda: run_child("verify", archive=archive, **common),
        "merge": lambda: run_child("merge", archive=archive, output=out_merged, **common),
    }
    for name, job in jobs.items():
        row[name] = _median_run(repeat, cold(*orig_files), job)
    cold()()
    return row


def report_commands(rows: list, cpus: int):
    if not rows:
        return
    print()
    print("every command on a cold cache, each in a fresh process (median of the runs; peak RSS above the interpreter,")
    print(f"the largest of the runs; CPUs = CPU seconds / wall seconds, {cpus} here)")
    head = (f"  {'family':>6} {'N':>3} {'inputs':>8} {'archive':>8} {'ratio':>6} | {'read':>6} {'pack':>7} {'/read':>6} | "
            f"{'extract':>7} {'ld+sv':>6} {'ratio':>6} | {'load':>6} {'ld orig':>7} {'ratio':>6} | {'verify':>6} {'merge':>6}")
    print(head)
    for r in rows:
        if "archive_bytes" not in r:
            print(f"  {r['family']:>6} {r['n']:>3} pack failed: {r['pack'].get('error')}")
            continue
        g = lambda k: r[k].get("seconds", float("nan"))
        print(f"  {r['family']:>6} {r['n']:>3} {r['input_bytes'] / 1e9:>7.2f}G {r['archive_bytes'] / 1e9:>7.3f}G "
              f"{r['input_bytes'] / r['archive_bytes']:>5.2f}x | {r['read_s']:>5.2f}s {g('pack'):>6.2f}s "
              f"{fmt_ratio(g('pack'), r['read_s']):>6} | {g('extract'):>6.2f}s {g('load_save_original'):>5.2f}s "
              f"{fmt_ratio(g('extract'), g('load_save_original')):>6} | {g('load'):>5.2f}s {g('load_original'):>6.2f}s "
              f"{fmt_ratio(g('load'), g('load_original')):>6} | {g('verify'):>5.2f}s {g('merge'):>5.2f}s")
    print()
    ops = ("pack", "extract", "load", "verify", "merge", "load_save_original", "load_original")
    print("  peak RSS above the interpreter (GiB) / mean CPUs used")
    print(f"  {'family':>6} {'N':>3} " + " ".join(f"{op[:13]:>13}" for op in ops))
    for r in rows:
        cells = []
        for op in ops:
            c = r.get(op) or {}
            cells.append(f"{(c['peak_rss_kib'] - c['rss_before_kib']) / 2**20:>6.2f} / {c['cpus_used']:.1f}"
                         if "peak_rss_kib" in c else f"{'-':>13}")
        print(f"  {r['family']:>6} {r['n']:>3} " + " ".join(f"{cell:>13}" for cell in cells))


def measure_switch(archive_path: Path, device: str, threads: int | None = None) -> dict:
    import torch
    import tallzip
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tallzip.open(archive_path) as arc:
            build_s, resident = timed(lambda: arc.resident(device))
            tasks = arc.tasks
            check = arc.load(tasks[-1], device=device)
            resident.switch(tasks[-1])
            live = resident.state_dict()
            exact = all(torch.equal(live[k], check[k]) for k in check)
            del check, live
            times = []
            for i in range(max(12, 2 * len(tasks))):
                resident.switch(tasks[i % len(tasks)])  # warm-up included in the loop; median below
                if device != "cpu":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                resident.switch(tasks[(i + 1) % len(tasks)])
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return {"build_s": build_s, "switch_ms_median": 1e3 * statistics.median(times),
                    "switch_ms_min": 1e3 * min(times), "resident_bytes": resident.nbytes,
                    "equals_load": exact, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(before)


def measure_stages(base: Path, task_paths: list, n: int = 8, blocks: int = 2) -> dict:
    """CPU seconds of each stage of pack and extract, on one thread, for the tensors of the first
    `blocks` transformer blocks, scaled to a whole checkpoint: what the ratios above are made of."""
    import hashlib
    import numpy as np
    import torch
    from tallzip.ops import tall as packing
    from tallzip.ops.ties import MtvMerger
    from tallzip.family import Family
    from tallzip.formats.codecs import registry as codecs
    from tallzip.formats.tensors import to_bits
    family = Family.open({p.stem: p for p in task_paths[:n]}, base)
    names = [name for name in family.base.names
             if any(f"resblocks.{i}." in name for i in range(blocks)) and family.is_mergeable(name)]
    data = [family.tensors(name) for name in names]
    params = sum(b.numel() for b, _ in data)
    whole = sum(math.prod(family.base.shapes[name]) for name in family.base.names)
    scale = whole / params
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    stages = {"tasks": n, "scaled_from_params": params, "params": whole}
    try:
        merger = MtvMerger(family, "sum", 0.2, torch.device("cpu"), None)
        start = time.thread_time()
        made = [packing.masked_tensor(merger, b, ts, [0.4] * n, torch.device("cpu")) for b, ts in data]
        stages[f"mtv + {n} masks + bit-packing (s)"] = (time.thread_time() - start) * scale
        raw = [to_bits(b) for b, _ in data]
        nbytes = sum(a.nbytes for a in raw)
        for codec in ("zstd", "planes+zstd", "planes+ans"):
            if codec not in codecs.names():
                continue
            start = time.thread_time()
            encoded = [codecs.encode(codec, a, level=3) for a in raw]
            mid = time.thread_time()
            for (data_, params_), a in zip(encoded, raw):
                codecs.decode(codec, data_, dtype=a.dtype, count=a.size, params=params_)
            end = time.thread_time()
            stages[f"{codec} float (MB/s encode, decode, ratio)"] = (
                nbytes / (mid - start) / 1e6, nbytes / (end - mid) / 1e6, sum(len(d) for d, _ in encoded) / nbytes)
        for codec in ("bits+zstd", "bits-ctx"):
            if codec not in codecs.names():
                continue
            enc = dec = 0.0
            size = 0
            for (mtv, packed, _), (b, _) in zip(made, data):
                context = {"mtv": mtv.reshape(-1).numpy(), "shape": tuple(mtv.shape)}
                mask = np.unpackbits(packed[0], count=b.numel(), bitorder="little").view(bool)
                start = time.thread_time()
                payload, params_ = codecs.encode(codec, mask, level=3, context=context)
                mid = time.thread_time()
                codecs.decode(codec, payload, dtype=bool, count=mask.size, params=params_,
                              context={"mtv": mtv.reshape(-1).numpy(), "shape": tuple(mtv.shape)})
                enc, dec, size = enc + mid - start, dec + time.thread_time() - mid, size + len(payload)
            stages[f"{codec} one mask (s encode, s decode, bits/param)"] = (enc * scale, dec * scale, 8 * size / params)
        blob = b"".join(a.tobytes() for a in raw)
        start = time.thread_time()
        hashlib.sha256(blob).hexdigest()
        stages["sha256 (MB/s)"] = len(blob) / (time.thread_time() - start) / 1e6
    finally:
        torch.set_num_threads(before)
    return stages


# --- report ------------------------------------------------------------------------------------

def fmt_ratio(num, den):
    return f"{num / den:.2f}x" if num and den else "-"


def report(results: dict):
    for row in results.get("address_limited", []):
        print(f"\nN={row['n']} ViT pack under a {row['limit_gib']} GiB address-space limit beyond the interpreter's own "
              f"(inputs {row['inputs_gib']:.2f} GiB): "
              + (f"packed in {row['pack']['seconds']:.1f} s" if "seconds" in row["pack"] else f"FAILED: {row['pack']['error']}"))
    for s in results.get("switch", []):
        print(f"resident switch ({s['device']}, N={s['n']}, {s['threads']} CPU threads): median {s['switch_ms_median']:.2f} ms, "
              f"min {s['switch_ms_min']:.2f} ms; build {s['build_s']:.1f} s; holds {s['resident_bytes'] / 1e9:.2f} GB; "
              f"state_dict equals load(): {s['equals_load']}")
    if results.get("stages"):
        st = results["stages"]
        print(f"\nCPU cost of each stage, one thread, for {st['params']:,} parameters "
              f"(measured on {st['scaled_from_params']:,} and scaled):")
        for key, value in st.items():
            if key not in ("tasks", "scaled_from_params", "params"):
                shown = ", ".join(f"{v:.3g}" for v in value) if isinstance(value, tuple) else f"{value:.3g}"
                print(f"  {key}: {shown}")
    for note in results.get("notes", []):
        print(f"note: {note}")


def ensure_llm_family(cache: Path, n_tasks: int, preset: str, dtype: str) -> tuple[Path, list[Path]]:
    """Generate (once) an LLM-shaped family of Hugging Face sharded folders (benchmarks.llm_family)."""
    from benchmarks.llm_family import generate
    folder = cache / f"llm-{preset}-{dtype}"
    marker = cache / f"llm-{preset}-{dtype}.json"
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if info.get("tasks", 0) < n_tasks:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {n_tasks} LLM-shaped ({preset}, {dtype}) checkpoints in {folder} ...", flush=True)
        made = generate(folder, preset, n_tasks, dtype, log=None)
        marker.write_text(json.dumps({"tasks": n_tasks, "seconds": made["seconds"]}))
    tasks = sorted(p for p in (folder / "tasks").iterdir() if p.is_dir())
    return folder / "base", tasks[:n_tasks]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, N = 2 and 4, ViT family only")
    parser.add_argument("--family", nargs="+", choices=["vit", "llm"], default=["vit", "llm"])
    parser.add_argument("--tasks", type=int, nargs="+", help="ViT family sizes (default 2 8 20; quick: 2 4)")
    parser.add_argument("--llm-tasks", type=int, nargs="+", default=[2, 8], help="LLM family sizes")
    parser.add_argument("--llm-preset", default="small", help="benchmarks.llm_family preset (small: 0.8 GB, 1b: 2.2 GB)")
    parser.add_argument("--llm-dtype", default="bf16")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (the median is shown)")
    parser.add_argument("--memory", help="memory budget passed to every command (e.g. 1G), where supported")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--codecs", choices=["default", "fast"], default="default")
    parser.add_argument("--address-limit", type=float, default=3.0, metavar="GIB",
                        help="also pack the largest ViT family under this address-space limit (0: skip)")
    parser.add_argument("--no-switch", action="store_true", help="skip the resident switch timing")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tallzip-speed")
    parser.add_argument("--keep", action="store_true", help="keep the generated families for the next run")
    parser.add_argument("--stages", action="store_true", help="also time each stage alone (CPU seconds)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_run(json.loads(args.child))))
        return

    import torch
    import tallzip
    from tallzip.demo import VIT_B32, vit_shapes
    from tallzip.run.threads import available_cpus
    from tallzip.options import DEFAULT_CODECS
    from tallzip.run.threads import resolve_device

    command = "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv)
    print("$ " + command)
    sizes = args.tasks or ([2, 4] if args.quick else [2, 8, 20])
    families = ["vit"] if args.quick else args.family
    codecs = FAST_CODECS if args.codecs == "fast" else None
    try:
        device = resolve_device(args.device).type
    except tallzip.TallzipError as exc:
        sys.exit(f"error: {exc}")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {platform.machine()}, {available_cpus()} CPUs, {mem / 2**30:.1f} GiB RAM, torch {torch.__version__}, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}; load average {loadavg()}")
    print(f"codecs: {codecs or DEFAULT_CODECS}; tallzip {tallzip.__version__}; memory budget {args.memory or 'default'}")
    args.cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    results = {"rows": [], "switch": [], "address_limited": [], "notes": [], "cpus": available_cpus(), "command": command}
    generated = []
    try:
        if "vit" in families:
            base, task_paths, _ = ensure_family(args.cache, max(sizes), args.quick)
            generated.append(base.parent)
            params = sum(math.prod(s) for s in vit_shapes(**(QUICK_SHAPE if args.quick else VIT_B32)).values())
            print(f"ViT family: {len(task_paths)} tasks + base, {params:,} vision parameters per checkpoint, "
                  f"{base.stat().st_size / 1e6:.0f} MB per file, in {base.parent}")
            for n in sizes:
                results["rows"].append(measure_commands("vit", n, base, task_paths, work, device, codecs,
                                                        args.repeat, args.memory))
            if not args.no_switch:
                archive = work / f"switch-{max(sizes)}.tallz"
                run_pack({p.stem: p for p in task_paths[:max(sizes)]}, base, archive, device, codecs)
                if archive.is_file():
                    results["switch"].append({"n": max(sizes), "device": device, **measure_switch(archive, device)})
                    archive.unlink()
            if args.address_limit:
                n = max(sizes)
                pack = run_pack({p.stem: p for p in task_paths[:n]}, base, work / "limited.tallz", "cpu", codecs,
                                address_limit_gib=args.address_limit)
                results["address_limited"].append({
                    "n": n, "limit_gib": args.address_limit, "pack": pack,
                    "inputs_gib": sum(p.stat().st_size for p in [base, *task_paths[:n]]) / 2**30})
                (work / "limited.tallz").unlink(missing_ok=True)
            if args.stages:
                results["stages"] = measure_stages(base, task_paths, n=min(8, len(task_paths)))
        if "llm" in families:
            base, task_paths = ensure_llm_family(args.cache, max(args.llm_tasks), args.llm_preset, args.llm_dtype)
            generated.append(base.parent)
            print(f"LLM family ({args.llm_preset}, {args.llm_dtype}): {len(task_paths)} tasks + base, "
                  f"{sum(p.stat().st_size for p in all_files([base])) / 1e9:.2f} GB per checkpoint, in {base.parent}")
            for n in args.llm_tasks:
                results["rows"].append(measure_commands(f"llm-{args.llm_preset}", n, base, task_paths, work, device,
                                                        codecs, args.repeat, args.memory))
        if device != "cuda":
            results["notes"].append("no CUDA device here: the GPU figures were not measured")
        report_commands(results["rows"], results["cpus"])
        report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            for folder in generated:
                shutil.rmtree(folder, ignore_errors=True)
                Path(f"{folder}.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
