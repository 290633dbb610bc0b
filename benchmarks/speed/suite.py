"""Speed and memory of tallzip's commands (issues 2, 5, 11, 12), as ratios taken in one run on this machine,
on generated families (benchmarks.fixtures): ViT-B/32-shaped (fp32 safetensors files) and LLM-shaped (Hugging
Face sharded bf16 folders with a 32000-row embedding).

For every family size, every command runs on a cold page cache (files evicted with
posix_fadvise(DONTNEED) first) in a fresh process (benchmarks/speed/child.py), `--repeat` times, median shown:
- pack against simply reading all N + 1 inputs once;
- extract of one task against safetensors' own load_file + save_file (+ fsync) of its original;
- load of one task into memory against safetensors' load_file of its original;
- verify (every checksum and decode), verify --against the inputs, and merge (consensus-ta from the archive);
- the peak RSS (VmHWM) of each command above the interpreter, and its mean CPUs used (CPU s / wall s).
Then the resident switch time and a pack under an address-space limit (ViT family).

--compare OTHER_CHECKOUT times every command of both trees (this checkout and OTHER, e.g. a `git worktree`
of main or a `git archive` of a commit) alternately on the same inputs, and checks that their archives are
byte-identical: the A/B run of a change.

    python -m benchmarks.speed                          # ViT N = 2 8 20, LLM (small) N = 2 8
    python -m benchmarks.speed --quick                  # small ViT shapes, N = 2 and 4: seconds
    python -m benchmarks.speed --quick --compare /work/main --repeat 3
    python -m benchmarks.speed --family llm --llm-preset 1b --llm-tasks 8 --repeat 1
    python -m benchmarks.speed --family-dir /work/cache/language/cpu-05773139c9 --ops pack --compare /work/main
    python -m benchmarks.speed --codecs fast            # zstd / bits+zstd instead of the default codecs
    python -m benchmarks.speed engines [--quick]        # the job engines side by side (engines.py)
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.fixtures import ensure, timed

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("child.py")
FAST_CODECS = {"float": "zstd", "mask": "bits+zstd", "other": "zstd"}
OPS = ("pack", "extract", "load", "verify", "verify_against", "merge")
BASELINES = {"pack": "read", "extract": "load_save_original", "load": "load_original"}


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


def all_files(paths) -> list[Path]:
    """Every file of these checkpoints (a sharded folder counts all its files)."""
    out = []
    for path in map(Path, paths):
        out.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return out


# --- the trees compared: each command runs with one tree's tallzip first on the path ------------

def importable_tree(checkout: Path, work: Path, name: str) -> Path:
    """A folder whose `tallzip` package is `checkout`'s, for PYTHONPATH: the repository keeps formats/ and
    cli/ beside tallzip/ (setup.cfg maps them into the package), so they are linked in here, in `work`,
    never in the checkout."""
    checkout = checkout.resolve()
    if not (checkout / "tallzip" / "__init__.py").is_file():
        sys.exit(f"error: {checkout}: no tallzip/ package there (give the root of a tallzip checkout)")
    package = work / "trees" / name / "tallzip"
    shutil.rmtree(package.parent, ignore_errors=True)
    package.mkdir(parents=True)
    for entry in (checkout / "tallzip").iterdir():
        (package / entry.name).symlink_to(entry)
    for sub in ("formats", "cli"):
        if not (package / sub).exists() and (checkout / sub).is_dir():
            (package / sub).symlink_to(checkout / sub)
    return package.parent


def run_child(tree: Path, cwd: Path, op: str, **spec) -> dict:
    """One command in a fresh interpreter with `tree`'s tallzip (python -P: no script folder on the path)."""
    spec = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}
    if "tasks" in spec and isinstance(spec["tasks"], dict):
        spec["tasks"] = {k: str(v) for k, v in spec["tasks"].items()}
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-P", str(CHILD), json.dumps({"op": op, **spec})],
                          cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_run(runs: list) -> dict:
    """The median seconds' run, with the largest peak RSS of the runs (or the first error)."""
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    chosen = dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2])
    chosen["peak_rss_kib"] = max(r["peak_rss_kib"] for r in runs)
    chosen["all_seconds"] = [r["seconds"] for r in runs]
    chosen["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    return chosen


def subset_folder(work: Path, tasks: dict) -> Path:
    """A folder of links to these task checkpoints (verify --against takes a folder)."""
    folder = work / f"against-{len(tasks)}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for path in tasks.values():
        (folder / Path(path).name).symlink_to(Path(path).resolve())
    return folder


# --- measurements ------------------------------------------------------------------------------

def measure_commands(family: str, n: int, base: Path, task_paths: list, work: Path, trees: dict, device: str,
                     codecs, repeat: int, memory: str | None, ops=OPS, pack_repeat: int | None = None) -> dict:
    """Every command on a cold cache, each in its own process, median of `repeat`, for each tree (the trees
    alternate run by run, so both see the same machine); the references (reading the inputs, safetensors'
    load+save and load of the original) once per run, as they do not depend on the tree."""
    tasks = {Path(p).name.split(".")[0]: p for p in task_paths[:n]}
    inputs = all_files([base, *tasks.values()])
    archives = {who: work / f"{family}-{n}-{who}.tallz" for who in trees}
    task, original = next(iter(tasks.items()))
    out_extract = work / (f"{task}.out" if Path(original).is_dir() else f"{task}.safetensors")
    out_saved, out_merged = work / "resaved", work / "merged.safetensors"
    against = subset_folder(work, tasks)
    orig_files = all_files([original])
    row = {"family": family, "n": n, "device": device, "trees": list(trees),
           "input_bytes": sum(p.stat().st_size for p in all_files(tasks.values())),
           "base_bytes": sum(p.stat().st_size for p in all_files([base])), "loadavg": loadavg()}

    def cold(*extra):
        for leftover in (out_extract, out_saved, out_merged):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        evict(inputs + list(archives.values()) + list(extra))

    reads = []
    for _ in range(repeat):
        cold()
        reads.append(read_all(inputs))
    row["read_s"] = statistics.median(reads)
    row["cached_before_pack"] = (cold(), cached_fraction(inputs))[1]
    common = dict(device=device, memory=memory)
    specs = {
        "pack": lambda who: dict(tasks=tasks, base=base, output=archives[who], codecs=codecs, **common),
        "extract": lambda who: dict(archive=archives[who], task=task, output=out_extract, **common),
        "load": lambda who: dict(archive=archives[who], task=task, **common),
        "verify": lambda who: dict(archive=archives[who], **common),
        "verify_against": lambda who: dict(archive=archives[who], against=against, **common),
        "merge": lambda who: dict(archive=archives[who], output=out_merged, **common),
    }
    references = {"extract": ("load_save_original", dict(original=original, output=out_saved)),
                  "load": ("load_original", dict(original=original))}
    runs = {}
    for op in ["pack", *[o for o in ops if o != "pack"]]:
        if op != "pack" and not all(a.is_file() for a in archives.values()):
            break
        for r in range((pack_repeat or repeat) if op == "pack" else repeat):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for who in order:
                cold(*orig_files)
                runs.setdefault(op, {}).setdefault(who, []).append(
                    run_child(trees[who], work, "verify" if op == "verify_against" else op, **specs[op](who)))
            if op in references:
                name, spec = references[op]
                cold(*orig_files)
                runs.setdefault(name, {}).setdefault("reference", []).append(run_child(trees["this"], work, name, **spec))
        if op == "pack":
            row["pack"] = {who: _median_run(rs) for who, rs in runs["pack"].items()}
            print(f"  {family} N={n}: read {row['read_s']:.2f} s, pack "
                  + ", ".join(f"{who} {r.get('seconds', float('nan')):.2f} s {r.get('error', '')}"
                              for who, r in row["pack"].items()), flush=True)
    for op, by_tree in runs.items():
        row[op] = {who: _median_run(rs) for who, rs in by_tree.items()}
    if all(a.is_file() for a in archives.values()):
        row["archive_bytes"] = {who: a.stat().st_size for who, a in archives.items()}
        if len(archives) > 1:
            first, *others = archives.values()
            row["archives_identical"] = all(filecmp.cmp(first, other, shallow=False) for other in others)
    cold()
    for archive in archives.values():
        archive.unlink(missing_ok=True)
    return row


def _seconds(row, op, who) -> float:
    return (row.get(op) or {}).get(who, {}).get("seconds", float("nan"))


def fmt_s(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.2f}s"


def fmt_ratio(num, den):
    return f"{num / den:.2f}x" if num and den and not (math.isnan(num) or math.isnan(den)) else "-"


def report_commands(rows: list, cpus: int):
    if not rows:
        return
    print()
    print("every command on a cold cache, each in a fresh process (median of the runs; peak RSS above the interpreter,")
    print(f"the largest of the runs; CPUs = CPU seconds / wall seconds, {cpus} here)")
    print(f"  {'family':>9} {'N':>3} {'tree':>6} {'inputs':>8} {'archive':>8} {'ratio':>6} | {'read':>6} {'pack':>7} "
          f"{'/read':>6} | {'extract':>7} {'ld+sv':>6} {'ratio':>6} | {'load':>6} {'ld orig':>7} {'ratio':>6} | "
          f"{'verify':>6} {'against':>7} {'merge':>6}")
    for r in rows:
        if "archive_bytes" not in r:
            print(f"  {r['family']:>9} {r['n']:>3} pack failed: "
                  + "; ".join(f"{w}: {v.get('error')}" for w, v in r["pack"].items() if "error" in v))
            continue
        ld_sv, ld_orig = _seconds(r, "load_save_original", "reference"), _seconds(r, "load_original", "reference")
        for who in r["trees"]:
            g = lambda op: _seconds(r, op, who)  # noqa: E731
            size = r["archive_bytes"][who]
            print(f"  {r['family']:>9} {r['n']:>3} {who:>6} {r['input_bytes'] / 1e9:>7.2f}G {size / 1e9:>7.3f}G "
                  f"{r['input_bytes'] / size:>5.2f}x | {r['read_s']:>5.2f}s {fmt_s(g('pack')):>7} "
                  f"{fmt_ratio(g('pack'), r['read_s']):>6} | {fmt_s(g('extract')):>7} {fmt_s(ld_sv):>6} "
                  f"{fmt_ratio(g('extract'), ld_sv):>6} | {fmt_s(g('load')):>6} {fmt_s(ld_orig):>7} "
                  f"{fmt_ratio(g('load'), ld_orig):>6} | {fmt_s(g('verify')):>6} {fmt_s(g('verify_against')):>7} "
                  f"{fmt_s(g('merge')):>6}")
        if "archives_identical" in r:
            print(f"  {'':>9} {'':>3} archives of the trees byte-identical: {r['archives_identical']}")
    print()
    print("  peak RSS above the interpreter (GiB) / mean CPUs used / CPU seconds")
    print(f"  {'family':>9} {'N':>3} {'tree':>6} " + " ".join(f"{op[:14]:>20}" for op in OPS))
    for r in rows:
        for who in r["trees"]:
            cells = []
            for op in OPS:
                c = (r.get(op) or {}).get(who) or {}
                cells.append(f"{(c['peak_rss_kib'] - c['rss_before_kib']) / 2**20:.2f} / {c['cpus_used']:.1f} / "
                             f"{c['cpu_s']:.1f}" if "peak_rss_kib" in c else "-")
            print(f"  {r['family']:>9} {r['n']:>3} {who:>6} " + " ".join(f"{cell:>20}" for cell in cells))
    if any(len(r["trees"]) > 1 for r in rows):
        print()
        print("  this / other (wall seconds, CPU seconds): below 1 is faster here")
        for r in rows:
            if len(r["trees"]) < 2 or "archive_bytes" not in r:
                continue
            cells = []
            for op in OPS:
                this, other = (r.get(op) or {}).get("this", {}), (r.get(op) or {}).get("other", {})
                if "seconds" in this and "seconds" in other:
                    cells.append(f"{op} {this['seconds'] / other['seconds']:.2f} / "
                                 f"{this['cpu_s'] / max(other['cpu_s'], 1e-9):.2f}")
            print(f"  {r['family']:>9} {r['n']:>3}  " + ", ".join(cells))


def measure_switch(archive_path: Path, device: str, threads: int | None = None) -> dict:
    import torch
    import tallzip
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tallzip.open(archive_path) as arc:
            resident, build_s = timed(arc.resident, device)
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


def progress_gaps(archive: Path, against: Path) -> dict:
    """One verify --against in this process with a progress callback: does the progress bar follow the run?"""
    import tallzip
    from benchmarks.speed.child import verify_function
    verify = verify_function()
    stamps = []
    start = time.perf_counter()
    with tallzip.open(archive) as arc:
        verify(arc, against, progress=lambda label, done, total: stamps.append((time.perf_counter(), label)))
    end = time.perf_counter()
    times = [start] + [t for t, _ in stamps]
    return {"seconds": end - start, "updates": len(stamps), "labels": sorted({lab for _, lab in stamps}),
            "longest_silence_s": max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else end - start,
            "after_last_update_s": end - times[-1]}


def report(results: dict):
    for row in results.get("address_limited", []):
        print(f"\nN={row['n']} ViT pack under a {row['limit_gib']} GiB address-space limit beyond the interpreter's own "
              f"(inputs {row['inputs_gib']:.2f} GiB): "
              + (f"packed in {row['pack']['seconds']:.1f} s" if "seconds" in row["pack"] else f"FAILED: {row['pack']['error']}"))
    for s in results.get("switch", []):
        print(f"resident switch ({s['device']}, N={s['n']}, {s['threads']} CPU threads): median {s['switch_ms_median']:.2f} ms, "
              f"min {s['switch_ms_min']:.2f} ms; build {s['build_s']:.1f} s; holds {s['resident_bytes'] / 1e9:.2f} GB; "
              f"state_dict equals load(): {s['equals_load']}")
    if results.get("progress"):
        g = results["progress"]
        print(f"progress of one verify --against ({g['seconds']:.1f} s, this checkout): {g['updates']} updates "
              f"({', '.join(g['labels'])}), longest stretch without one {g['longest_silence_s']:.1f} s, "
              f"{g['after_last_update_s']:.2f} s from the last one to the end")
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, N = 2 and 4, ViT family only")
    parser.add_argument("--family", nargs="+", choices=["vit", "llm"], default=None,
                        help="generated families to time (default: vit llm; none with --family-dir)")
    parser.add_argument("--family-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="also time a family on disk: DIR/base and DIR/tasks/* (e.g. benchmarks.language's)")
    parser.add_argument("--tasks", type=int, nargs="+", help="ViT family sizes (default 2 8 20; quick: 2 4)")
    parser.add_argument("--llm-tasks", type=int, nargs="+", default=[2, 8], help="LLM family sizes")
    parser.add_argument("--llm-preset", default="small", choices=["small", "1b", "gpt2xl"],
                        help="benchmarks.fixtures preset llm-* (small: 0.8 GB, 1b: 2.2 GB, gpt2xl: 0.99 GB)")
    parser.add_argument("--llm-dtype", default="bf16")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the commands to time (pack always)")
    parser.add_argument("--compare", type=Path, metavar="OTHER_CHECKOUT",
                        help="also time every command with this checkout's tallzip, alternately (A/B)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (the median is shown)")
    parser.add_argument("--pack-repeat", type=int, help="runs of pack (default: --repeat), when only the archives "
                        "are needed for the other commands")
    parser.add_argument("--memory", help="memory budget passed to every command (e.g. 1G), where supported")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--codecs", choices=["default", "fast"], default="default")
    parser.add_argument("--address-limit", type=float, default=3.0, metavar="GIB",
                        help="also pack the largest ViT family under this address-space limit (0: skip)")
    parser.add_argument("--no-switch", action="store_true", help="skip the resident switch timing")
    parser.add_argument("--progress", action="store_true", help="also follow one verify --against's progress updates")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tallzip-speed")
    parser.add_argument("--keep", action="store_true", help="keep the generated families for the next run")
    parser.add_argument("--stages", action="store_true", help="also time each stage alone (CPU seconds)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)

    import torch
    import tallzip

    command = "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv)
    print("$ " + command)
    sizes = args.tasks or ([2, 4] if args.quick else [2, 8, 20])
    families = ["vit"] if args.quick else args.family or ([] if args.family_dir else ["vit", "llm"])
    codecs = FAST_CODECS if args.codecs == "fast" else None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {platform.machine()}, {cpus} CPUs, {mem / 2**30:.1f} GiB RAM, torch {torch.__version__}, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}; load average {loadavg()}")
    print(f"codecs: {codecs or 'the default'}; tallzip {tallzip.__version__}; memory budget {args.memory or 'default'}")
    args.cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    trees = {"this": importable_tree(REPO, work, "this")}
    if args.compare:
        trees["other"] = importable_tree(args.compare, work, "other")
        print(f"trees: this = {REPO}, other = {args.compare.resolve()} (alternately, same inputs)")
    results = {"rows": [], "switch": [], "address_limited": [], "notes": [], "cpus": cpus, "command": command}
    generated = []
    try:
        if "vit" in families:
            preset = "vit-quick" if args.quick else "vit-b32"
            base, task_paths = ensure(args.cache, preset, max(sizes))
            generated.append(base.parent)
            print(f"ViT family ({preset}): {len(task_paths)} tasks + base, {base.stat().st_size / 1e6:.0f} MB per file, "
                  f"in {base.parent}")
            for n in sizes:
                results["rows"].append(measure_commands("vit", n, base, task_paths, work, trees, device, codecs,
                                                        args.repeat, args.memory, args.ops, args.pack_repeat))
            n = max(sizes)
            tasks = {p.stem: p for p in task_paths[:n]}
            if not args.no_switch or args.progress:
                archive = work / f"switch-{n}.tallz"
                run_child(trees["this"], work, "pack", tasks=tasks, base=base, output=archive, device=device, codecs=codecs)
                if archive.is_file() and not args.no_switch:
                    results["switch"].append({"n": n, "device": device, **measure_switch(archive, device)})
                if archive.is_file() and args.progress:
                    results["progress"] = progress_gaps(archive, subset_folder(work, tasks))
                archive.unlink(missing_ok=True)
            if args.address_limit:
                pack = run_child(trees["this"], work, "pack", tasks=tasks, base=base, output=work / "limited.tallz",
                                 device="cpu", codecs=codecs, address_limit_gib=args.address_limit)
                results["address_limited"].append({
                    "n": n, "limit_gib": args.address_limit, "pack": pack,
                    "inputs_gib": sum(p.stat().st_size for p in [base, *task_paths[:n]]) / 2**30})
                (work / "limited.tallz").unlink(missing_ok=True)
            if args.stages:
                from benchmarks.speed.stages import measure_stages
                results["stages"] = measure_stages(base, task_paths, n=min(8, len(task_paths)))
        if "llm" in families:
            preset = f"llm-{args.llm_preset}"
            base, task_paths = ensure(args.cache, preset, max(args.llm_tasks), args.llm_dtype)
            generated.append(base.parent)
            print(f"LLM family ({preset}, {args.llm_dtype}): {len(task_paths)} tasks + base, "
                  f"{sum(p.stat().st_size for p in all_files([base])) / 1e9:.2f} GB per checkpoint, in {base.parent}")
            for n in args.llm_tasks:
                results["rows"].append(measure_commands(preset, n, base, task_paths, work, trees, device,
                                                        codecs, args.repeat, args.memory, args.ops, args.pack_repeat))
        for folder in args.family_dir:
            base = folder / "base"
            task_paths = sorted(p for p in (folder / "tasks").iterdir() if not p.name.startswith("."))
            print(f"family on disk: {folder}: {len(task_paths)} tasks + base")
            results["rows"].append(measure_commands(folder.name, len(task_paths), base, task_paths, work, trees,
                                                    device, codecs, args.repeat, args.memory, args.ops,
                                                    args.pack_repeat))
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
