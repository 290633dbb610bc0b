"""Speed and scale of tallzip on a generated ViT-B/32-shaped family (issues 2 and 5), as ratios
taken in one run on this machine:

- archive bytes against the N task checkpoints (and against N + base);
- pack time against the time to simply read all N + 1 input files once;
- extract of one task to a file against loading and saving its original checkpoint;
- load of one task into memory against reading its original checkpoint into memory;
- switching a resident family (Archive.resident) from one task to another;
- peak memory (RSS) of pack for several N: it should stay flat;
- with a GPU: the same with --device cuda, and CPU and GPU masks compared bit for bit.

Every timed pack runs in a fresh subprocess (its peak RSS, VmHWM, is its own). Page cache: "cold" runs
first evict the files involved with posix_fadvise(DONTNEED) (fincore shows how much stayed
cached); "warm" runs read them once first. Both sides of every ratio run in the same state.

    python -m benchmarks.speed                    # N = 8 and 20, ViT-B/32 shapes (87.8M params each)
    python -m benchmarks.speed --quick            # small shapes, N = 2 and 4: seconds
    python -m benchmarks.speed --codecs fast      # zstd / bits+zstd instead of the default codecs
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


# --- the pack child: a fresh process, so its peak RSS is its own ------------------------------

def child_pack(spec: dict) -> dict:
    import torch
    import tallzip
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
    tallzip.pack(spec["tasks"], spec["base"], spec["output"], force=True, device=spec["device"],
                 codecs=spec.get("codecs"))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_kib": status_kib("VmHWM"), "rss_before_kib": before}


def run_pack(tasks: dict, base: Path, output: Path, device: str, codecs: dict | None, **extra) -> dict:
    spec = {"tasks": {k: str(v) for k, v in tasks.items()}, "base": str(base), "output": str(output),
            "device": device, "codecs": codecs, **extra}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--child", json.dumps(spec)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- measurements ------------------------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_original(path: Path):
    """Every tensor of a checkpoint read into process memory (pread into fresh tensors)."""
    from tallzip.formats.checkpoints import open_checkpoint
    ckpt = open_checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.names}


def load_and_save_original(path: Path, output: Path):
    """What the extract is compared with: safetensors' own load_file + save_file, then fsync (the
    extract also syncs its output before renaming it into place)."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(path))
    save_file(state, str(output), metadata={"task": path.stem})
    fsync_path(output)


def measure_family(n: int, base: Path, task_paths: list, work: Path, device: str, codecs, states) -> dict:
    import tallzip
    tasks = {p.stem: p for p in task_paths[:n]}
    inputs = [base, *tasks.values()]
    archive = work / f"family-{n}-{device}.tallz"
    result = {"n": n, "device": device, "input_bytes": sum(p.stat().st_size for p in tasks.values()),
              "base_bytes": base.stat().st_size, "states": {}}
    for state in states:
        row = {}
        if state == "cold":
            evict(inputs)
            row["cached_before_read"] = cached_fraction(inputs)
            row["read_s"] = read_all(inputs)
            evict(inputs + [archive])
            row["cached_before_pack"] = cached_fraction(inputs)
        else:
            read_all(inputs)
            row["read_s"] = read_all(inputs)
            row["cached_before_pack"] = cached_fraction(inputs)
        row["loadavg"] = loadavg()
        row["pack"] = run_pack(tasks, base, archive, device, codecs)
        result["states"][state] = row
        print(f"  N={n} {device} {state}: read {row['read_s']:.2f} s, pack "
              f"{row['pack'].get('seconds', float('nan')):.2f} s {row['pack'].get('error', '')}", flush=True)
    if not archive.is_file():
        return result
    result["archive_bytes"] = archive.stat().st_size

    # extract / load one task, against its original checkpoint, in each cache state
    task = next(iter(tasks))
    original = tasks[task]
    out_extract, out_saved = work / "extracted.safetensors", work / "resaved.safetensors"
    with tallzip.open(archive) as arc:
        for state in states:
            row = result["states"][state]
            def prepare():
                if state == "cold":
                    evict([archive, original, out_extract, out_saved])
                else:
                    read_all([archive, original])
            prepare()
            row["extract_s"], _ = timed(lambda: arc.extract(task, out_extract, force=True, device=device))
            prepare()
            row["load_save_original_s"], _ = timed(lambda: load_and_save_original(original, out_saved))
            prepare()
            row["load_s"], state_dict = timed(lambda: arc.load(task, device=device))
            del state_dict
            prepare()
            row["load_original_s"], state_dict = timed(lambda: load_original(original))
            if device != "cpu":
                import torch
                start = time.perf_counter()
                state_dict = {k: v.to(device) for k, v in state_dict.items()}
                torch.cuda.synchronize()
                row["load_original_s"] += time.perf_counter() - start
            del state_dict
    for path in (out_extract, out_saved):
        path.unlink(missing_ok=True)
    return result


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


def masks_agree(cpu_archive: Path, gpu_archive: Path) -> dict:
    """Mask sections of a CPU pack and a GPU pack: same compressed bytes means same bits (the
    codec is deterministic and sees the same mtv); also decodes and compares every mask."""
    import torch
    import tallzip
    with tallzip.open(cpu_archive) as a, tallzip.open(gpu_archive) as b:
        sections = lambda arc: {(s["tensor"], s["task"]): [c.get("blake3") for c in s.get("chunks", [s])] or s.get("sha256")
                                 for s in arc.manifest["sections"] if s["role"] == "mask"}
        same_bytes = sections(a) == sections(b)
        differing = 0
        for name, info in a.tensors.items():
            if info["kind"] == "masked":
                mtv_a, mtv_b = a.mtv(name), b.mtv(name)
                for task in a.tasks:
                    differing += int((a.mask(task, name, mtv_a) != b.mask(task, name, mtv_b)).sum())
        return {"mask_sections_identical": same_bytes, "mask_bits_differing": differing}


def measure_stages(base: Path, task_paths: list, n: int = 8, blocks: int = 2) -> dict:
    """CPU seconds of each stage of pack and extract, on one thread, for the tensors of the first
    `blocks` transformer blocks, scaled to a whole checkpoint: what the ratios above are made of."""
    import hashlib
    import numpy as np
    import torch
    from tallzip import packing
    from tallzip.family import Family
    from tallzip.formats import codecs
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
        merger = packing._Merger(family, "sum", 0.2, torch.device("cpu"), None)
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
    print()
    print("archive size (issue 2)")
    print(f"  {'N':>3} {'device':>6} {'archive':>10} {'N tasks':>10} {'N + base':>10} {'tasks/archive':>14} {'(tasks+base)/archive':>21}")
    for r in results["families"]:
        if "archive_bytes" in r:
            a = r["archive_bytes"]
            print(f"  {r['n']:>3} {r['device']:>6} {a / 1e9:>9.3f}G {r['input_bytes'] / 1e9:>9.2f}G "
                  f"{(r['input_bytes'] + r['base_bytes']) / 1e9:>9.2f}G {r['input_bytes'] / a:>13.2f}x "
                  f"{(r['input_bytes'] + r['base_bytes']) / a:>20.2f}x")
    print()
    print("time ratios (target: pack <= 1.5x read on a CPU, 1.1x on a GPU; extract <= 1x; load < 1x);")
    print("pack CPU = CPU seconds the pack process used (all threads), / CPUs = the least wall time it allows here")
    print(f"  {'N':>3} {'device':>6} {'cache':>5} {'read all':>9} {'pack':>8} {'pack/read':>10} {'pack CPU':>9} "
          f"{'/ CPUs':>7} {'extract':>8} "
          f"{'load+save orig':>15} {'ratio':>7} {'load':>7} {'load orig':>10} {'ratio':>7} {'cached':>7} {'loadavg':>14}")
    for r in results["families"]:
        for state, row in r["states"].items():
            pack = row["pack"].get("seconds")
            cached = row.get("cached_before_pack")
            cpu = row["pack"].get("cpu_s")
            print(f"  {r['n']:>3} {r['device']:>6} {state:>5} {row['read_s']:>8.2f}s "
                  f"{pack if pack else float('nan'):>7.2f}s {fmt_ratio(pack, row['read_s']):>10} "
                  f"{cpu if cpu else float('nan'):>8.1f}s {cpu / results['cpus'] if cpu else float('nan'):>6.1f}s "
                  f"{row.get('extract_s', float('nan')):>7.2f}s {row.get('load_save_original_s', float('nan')):>14.2f}s "
                  f"{fmt_ratio(row.get('extract_s'), row.get('load_save_original_s')):>7} "
                  f"{row.get('load_s', float('nan')):>6.2f}s {row.get('load_original_s', float('nan')):>9.2f}s "
                  f"{fmt_ratio(row.get('load_s'), row.get('load_original_s')):>7} "
                  f"{'?' if cached is None else f'{100 * cached:.0f}%':>7} {row['loadavg']:>14}")
    print()
    print("peak memory of pack (RSS of the pack process; 'before' = after imports, before packing)")
    print(f"  {'N':>3} {'device':>6} {'cache':>5} {'peak RSS':>10} {'before':>10} {'peak - before':>14} {'inputs':>9}")
    for r in results["families"] + results.get("rss_only", []):
        for state, row in r["states"].items():
            p = row["pack"]
            if "peak_rss_kib" in p:
                print(f"  {r['n']:>3} {r['device']:>6} {state:>5} {p['peak_rss_kib'] / 2**20:>9.2f}G "
                      f"{p['rss_before_kib'] / 2**20:>9.2f}G {(p['peak_rss_kib'] - p['rss_before_kib']) / 2**20:>13.2f}G "
                      f"{(r['input_bytes'] + r['base_bytes']) / 2**30:>8.2f}G")
    for row in results.get("address_limited", []):
        print(f"  N={row['n']} under a {row['limit_gib']} GiB address-space limit beyond the interpreter's own "
              f"(inputs {row['inputs_gib']:.2f} GiB): "
              + (f"packed in {row['pack']['seconds']:.1f} s" if "seconds" in row["pack"] else f"FAILED: {row['pack']['error']}"))
    print()
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
    if results.get("agreement"):
        print(f"CPU vs GPU masks: {results['agreement']}")
    if results.get("notes"):
        print()
        for note in results["notes"]:
            print(f"note: {note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, N = 2 and 4")
    parser.add_argument("--tasks", type=int, nargs="+", help="family sizes to time (default 8 20; quick: 2 4)")
    parser.add_argument("--rss", type=int, nargs="+", help="family sizes whose pack RSS is shown (default 2 8 20)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: also the CPU figures)")
    parser.add_argument("--codecs", choices=["default", "fast"], default="default")
    parser.add_argument("--states", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument("--address-limit", type=float, default=3.0, metavar="GIB",
                        help="also pack the largest family under this address-space limit (0: skip)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tallzip-speed")
    parser.add_argument("--keep", action="store_true", help="keep the generated family for the next run")
    parser.add_argument("--stages", action="store_true", help="also time each stage alone (CPU seconds)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_pack(json.loads(args.child))))
        return

    import torch
    import tallzip
    from tallzip.demo import VIT_B32, vit_shapes
    from tallzip.formats.writer import available_cpus
    from tallzip.packing import DEFAULT_CODECS, resolve_device

    print("$ python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv))
    sizes = args.tasks or ([2, 4] if args.quick else [8, 20])
    rss_sizes = args.rss or ([2, 4] if args.quick else [2, 8, 20])
    codecs = FAST_CODECS if args.codecs == "fast" else None
    try:
        gpu = resolve_device(args.device).type == "cuda"
    except tallzip.TallzipError as exc:
        sys.exit(f"error: {exc}")
    devices = ["cpu", "cuda"] if gpu and args.device == "auto" else (["cuda"] if gpu else ["cpu"])
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {platform.machine()}, {available_cpus()} CPUs, {mem / 2**30:.1f} GiB RAM, torch {torch.__version__}, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}; load average {loadavg()}")
    print(f"codecs: {codecs or DEFAULT_CODECS}; tallzip {tallzip.__version__}")

    args.cache.mkdir(parents=True, exist_ok=True)
    base, task_paths, info = ensure_family(args.cache, max(sizes + rss_sizes), args.quick)
    params = sum(math.prod(s) for s in vit_shapes(**(QUICK_SHAPE if args.quick else VIT_B32)).values())
    print(f"family: {len(task_paths)} tasks + base, {params:,} vision parameters per checkpoint, "
          f"{base.stat().st_size / 1e6:.0f} MB per file, in {base.parent}")
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    results = {"families": [], "rss_only": [], "switch": [], "address_limited": [], "notes": [],
               "cpus": available_cpus(), "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv)}
    try:
        for device in devices:
            for n in sizes:
                results["families"].append(measure_family(n, base, task_paths, work, device, codecs, args.states))
            for n in rss_sizes:
                if n not in sizes and device == "cpu":
                    tasks = {p.stem: p for p in task_paths[:n]}
                    read_all([base, *tasks.values()])
                    pack = run_pack(tasks, base, work / f"rss-{n}.tallz", device, codecs)
                    results["rss_only"].append({"n": n, "device": device, "states": {"warm": {"pack": pack}},
                                                "input_bytes": sum(p.stat().st_size for p in tasks.values()),
                                                "base_bytes": base.stat().st_size})
                    (work / f"rss-{n}.tallz").unlink(missing_ok=True)
            largest = max(sizes)
            archive = work / f"family-{largest}-{device}.tallz"
            if archive.is_file():
                results["switch"].append({"n": largest, "device": device, **measure_switch(archive, device)})
                if device == "cpu":
                    results["switch"].append({"n": largest, "device": device, **measure_switch(archive, device, threads=1)})
        if args.address_limit and "cpu" in devices:
            n = max(sizes + rss_sizes)
            tasks = {p.stem: p for p in task_paths[:n]}
            pack = run_pack(tasks, base, work / "limited.tallz", "cpu", codecs, address_limit_gib=args.address_limit)
            results["address_limited"].append({
                "n": n, "limit_gib": args.address_limit, "pack": pack,
                "inputs_gib": sum(p.stat().st_size for p in [base, *tasks.values()]) / 2**30})
            (work / "limited.tallz").unlink(missing_ok=True)
        if "cuda" in devices and "cpu" in devices:
            n = max(sizes)
            a, b = work / f"family-{n}-cpu.tallz", work / f"family-{n}-cuda.tallz"
            if a.is_file() and b.is_file():
                results["agreement"] = masks_agree(a, b)
        if args.stages:
            results["stages"] = measure_stages(base, task_paths, n=min(8, len(task_paths)))
        if not gpu:
            results["notes"].append("no CUDA device here: the GPU figures (pack, extract, load and switch with "
                                    "--device cuda, CPU/GPU mask agreement) were not measured")
        report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
