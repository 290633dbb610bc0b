"""One tallzip command in a fresh process, so that its peak RSS and CPU time are its own: run as a script,

    python benchmarks/speed/child.py '{"op": "pack", ...}'     (PYTHONPATH: the tree whose tallzip to time)

by benchmarks.speed, for this checkout and for the one given to --compare. It imports nothing from
benchmarks/ (the other tree may have other benchmarks) and only tallzip's public verbs, except where
marked: the few names every checkout since format v2 has. Prints one JSON line: seconds, CPU seconds,
peak RSS (VmHWM) and the RSS before the command (the interpreter with tallzip and torch imported).
"""
from __future__ import annotations

import inspect
import json
import os
import resource
import sys
import time
from pathlib import Path


def status_kib(field: str) -> int:
    """A field of /proc/self/status, in KiB: VmRSS (now), VmHWM (peak of this process image).

    VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child
    started from a big parent would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _options(fn, spec: dict, names=("device", "memory")) -> dict:
    """The run options of `spec` that this tree's `fn` takes (older trees lack `memory`)."""
    accepted = inspect.signature(fn).parameters
    return {k: spec[k] for k in names if spec.get(k) and k in accepted}


def op_pack(spec):
    import tallzip
    tallzip.pack(spec["tasks"], spec["base"], spec["output"], force=True, codecs=spec.get("codecs"),
                 **_options(tallzip.pack, spec))


def _open(spec):
    import tallzip
    return tallzip.open(spec["archive"], **_options(tallzip.open, spec, ("memory",)))


def op_extract(spec):
    with _open(spec) as arc:
        arc.extract(spec["task"], spec["output"], force=True, **_options(arc.extract, spec, ("device",)))


def op_load(spec):
    with _open(spec) as arc:
        state = arc.load(spec["task"], device=spec["device"])
        spec["loaded_bytes"] = sum(t.numel() * t.element_size() for t in state.values())


def verify_function():
    """This tree's verify(archive, against=None, progress=None)."""
    import tallzip
    if hasattr(tallzip, "verify"):
        return tallzip.verify
    from tallzip.inspect import verify  # internal: trees before verify was a top-level verb
    return verify


def op_verify(spec):
    with _open(spec) as arc:
        verify_function()(arc, spec.get("against"))


def op_merge(spec):
    try:  # internal: merge_to_file (writing the merged checkpoint) is no top-level verb
        from tallzip.merging.merge import merge_to_file
    except ImportError:  # trees before the layout of issue 19
        from tallzip.merging import merge_to_file
    merge_to_file(spec["archive"], spec["output"], method="consensus-ta", force=True,
                          **_options(merge_to_file, spec))


def _original_files(path) -> list[Path]:
    """The tensor files of one checkpoint: the file itself, or a sharded folder's shards."""
    path = Path(path)
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def op_load_original(spec):
    """What load is compared with: every tensor of the original read into memory with safetensors, materialized
    (load_file maps the file: its tensors are read only when touched; clone() reads them, as issue 21 measured)."""
    from safetensors.torch import load_file
    total = 0
    for path in _original_files(spec["original"]):
        state = {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
        total += sum(t.numel() * t.element_size() for t in state.values())
        del state
    spec["loaded_bytes"] = total


def op_load_save_original(spec):
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


OPS = {"pack": op_pack, "extract": op_extract, "load": op_load, "verify": op_verify, "merge": op_merge,
       "load_original": op_load_original, "load_save_original": op_load_save_original}


def run(spec: dict) -> dict:
    import torch
    import tallzip  # noqa: F401  (its imports count in 'before', not in the command)
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
    OPS[spec["op"]](spec)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {"seconds": seconds, "cpu_s": cpu, "cpus_used": cpu / seconds if seconds else 0.0,
            "peak_rss_kib": status_kib("VmHWM"), "rss_before_kib": before}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
