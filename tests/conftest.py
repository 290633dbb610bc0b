"""Shared fixtures: small families of checkpoints written to disk, and the TALL formula in plain numpy."""
from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.numpy import save_file as np_save_file


def pytest_collection_modifyitems(config, items):
    """Mark the tests that need open_clip, so that CI's second step (.ci/run) can run just those
    with `-m open_clip`: a test module that imports it at the top
    (`open_clip = import_or_skip("open_clip")`), or a test with open_clip in its name."""
    for item in items:
        module_global = getattr(getattr(item, "module", None), "open_clip", None)
        if "open_clip" in item.name or getattr(module_global, "__name__", None) == "open_clip":
            item.add_marker(pytest.mark.open_clip)


def import_or_skip(name: str):
    """The module `name`, or skip the test when it does not import. Unlike pytest.importorskip this
    skips on any import failure, not only ImportError: open_clip left installed beside the 2.13.0 CPU
    torch (step 2 of .ci/run installs it) fails inside torchvision with a RuntimeError."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - a broken optional install is a skip, not a failure
        pytest.skip(f"{name} does not import here: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                    allow_module_level=True)


# The archive's header and manifest as formats/SPEC.md lays them out, read here with struct, hashlib
# and zstandard only (not through tallzip's reader); written by tests/fuzz.py's hostile writer.
HEADER = "<8sIIQQ32s8s"
FLAG_MANIFEST_ZSTD = 1  # SPEC 'Flags', bit 0: the stored manifest is one zstd frame of the JSON


def read_manifest(path) -> tuple[dict, int]:
    """(manifest, header flags) of the archive at `path`; checks the magic, the layout and the sha256."""
    data = Path(path).read_bytes()
    magic, _, flags, offset, length, digest, _ = struct.unpack_from(HEADER, data)
    assert magic == b"TALLZIP\0" and offset + length == len(data) and flags & ~FLAG_MANIFEST_ZSTD == 0
    stored = data[offset:offset + length]
    assert hashlib.sha256(stored).digest() == digest
    if flags & FLAG_MANIFEST_ZSTD:
        stored = zstandard.ZstdDecompressor().decompress(stored, max_output_size=256 << 20)
    return json.loads(stored), flags


def write_manifest(path, manifest: dict | None, *, compress: bool = True, blob: bytes | None = None,
                   flags: int | None = None, extra: bytes = b""):
    """Replace the manifest of the archive at `path` in place (its chunks kept, `extra` bytes placed
    after them, 64-aligned), header fixed up so the checksum matches (tests/fuzz.py's hostile
    writer). The JSON of `manifest` is stored zstd-compressed when `compress`, a raw `blob` as it is;
    `flags` overrides the header's flags (default: bit 0 when `compress`). Returns the offset where
    `extra` starts."""
    from fuzz import write_with_manifest
    if blob is not None and flags is None:
        flags = FLAG_MANIFEST_ZSTD if compress else 0
    path = Path(path)
    return write_with_manifest(path.read_bytes(), manifest, path, blob=blob, extra=extra,
                               compress=compress and blob is None, flags=flags)


def numpy_family(n_tasks=3, seed=0, shapes=None):
    """base and task state dicts as numpy float32 arrays (plus heads and an int buffer per task)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"enc.w": (16, 12), "enc.b": (16,), "blk.0.w": (7, 9), "frozen.emb": (5, 4)}
    base = OrderedDict((n, rng.normal(0, 0.05, s).astype(np.float32)) for n, s in shapes.items())
    tasks = OrderedDict()
    for t in range(n_tasks):
        sd = OrderedDict()
        for n, x in base.items():
            if n.startswith("frozen"):
                sd[n] = x.copy()
            else:
                sd[n] = (x + rng.laplace(0, 0.01, x.shape) * rng.random(x.shape)).astype(np.float32)
        sd["head.weight"] = rng.normal(0, 1, (3 + t, 12)).astype(np.float32)
        sd["steps"] = np.array([100 + t], dtype=np.int64)
        tasks[f"task{t}"] = sd
    return base, tasks


def write_family(folder: Path, base, tasks, fmt="safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    tasks_dir = folder / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    if fmt == "safetensors":
        base_path = folder / "base.safetensors"
        np_save_file(dict(base), str(base_path), metadata={"who": "base"})
        for name, sd in tasks.items():
            np_save_file(dict(sd), str(tasks_dir / f"{name}.safetensors"), metadata={"task": name})
    else:
        base_path = folder / "base.pt"
        torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in base.items()), base_path)
        for name, sd in tasks.items():
            torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), tasks_dir / f"{name}.pt")
    return base_path, tasks_dir


def write_big_family(fam: Path, n_tasks: int = 3) -> int:
    """A base and n_tasks fine-tunes with one 8192x4096 float32 tensor (128 MiB) each, written one
    tensor at a time under fam/ (fam/base.safetensors, fam/tasks/tN.safetensors), for the memory-budget
    tests; returns the big tensor's bytes."""
    from safetensors.torch import save_file
    (fam / "tasks").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn((8192, 4096), generator=g) * 0.02
    save_file({"w": base, "b": base[0].clone()}, str(fam / "base.safetensors"))
    for t in range(n_tasks):
        task = base + torch.randn(base.shape, generator=g) * 0.002
        save_file({"w": task, "b": task[0].clone()}, str(fam / "tasks" / f"t{t}.safetensors"))
        del task
    return base.numel() * 4


def np_mtv(base, tasks, name):
    """Sum of task vectors in task order, float32, as the authors' code adds them."""
    total = None
    for sd in tasks.values():
        tau = sd[name].astype(np.float32) - base[name].astype(np.float32)
        total = tau if total is None else (total + tau).astype(np.float32)
    return total


def np_mask(base, task, mtv, lam):
    own = np.abs(base - task)
    others = np.abs((base + mtv).astype(np.float32) - task)
    return own > (others * np.float32(lam)).astype(np.float32)


def np_rebuild(base, mask, mtv):
    return np.where(mask, (base + mtv).astype(np.float32), base)


# What `pack` stores the mtv as unless told otherwise (the README's documented default).
DEFAULT_MTV_DTYPE = "bfloat16"


def np_round_mtv(mtv, dtype=DEFAULT_MTV_DTYPE):
    """The float32 mtv as the archive holds it: rounded to `dtype` (nearest, ties to even), widened back."""
    if dtype == "float32":
        return mtv
    if dtype == "float16":
        return mtv.astype(np.float16).astype(np.float32)
    bits = mtv.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def np_rebuilt(base, tasks, task, name, lam, mtv_dtype=DEFAULT_MTV_DTYPE):
    """One masked tensor of `task` as the archive must rebuild it: the mask from the float32 mtv,
    the stored (rounded) mtv added."""
    mtv = np_mtv(base, tasks, name)
    return np_rebuild(base[name], np_mask(base[name], tasks[task][name], mtv, lam), np_round_mtv(mtv, mtv_dtype))



@pytest.fixture
def family(tmp_path):
    base, tasks = numpy_family()
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    return base, tasks, base_path, tasks_dir
