"""What an archive holds (sizes, densities, bits per parameter) and whether it is intact and faithful."""
from __future__ import annotations

import math
import os

import torch

from . import taskvec
from .archive import Archive
from .errors import TallzipError
from .family import Family
from .formats.checkpoints import discover_tasks, open_checkpoint
from .formats.constants import FLOAT_DTYPES, KIND_MASKED, KIND_SHARED, ROLE_MASK, ROLE_MTV
from .packing import _Merger


def summary(archive: Archive) -> dict:
    """Sizes of everything in the archive, per task and per section role, against the inputs."""
    m = archive.manifest
    masked_params = sum(math.prod(t["shape"]) for t in archive.tensors.values() if t["kind"] == KIND_MASKED)
    all_params = sum(math.prod(t["shape"]) for t in archive.tensors.values())
    roles: dict[str, dict] = {}
    tasks = {t: {"lambda": archive.lambdas[t], "mask_bytes": 0, "mask_ones": 0, "mask_bits": 0, "own_bytes": 0}
             for t in archive.tasks}
    for s in m["sections"]:
        r = roles.setdefault(s["role"], {"sections": 0, "bytes": 0, "elements": 0})
        r["sections"] += 1
        r["bytes"] += s["length"]
        r["elements"] += math.prod(s["shape"])
        if s["task"] is not None:
            row = tasks[s["task"]]
            if s["role"] == ROLE_MASK:
                row["mask_bytes"] += s["length"]
                row["mask_ones"] += s.get("ones", 0)
                row["mask_bits"] += math.prod(s["shape"])
            else:
                row["own_bytes"] += s["length"]
    for row in tasks.values():
        row["density"] = row["mask_ones"] / row["mask_bits"] if row["mask_bits"] else 0.0
        row["mask_bits_per_param"] = 8 * row["mask_bytes"] / row["mask_bits"] if row["mask_bits"] else 0.0
    for role, r in roles.items():
        r["bits_per_param"] = 8 * r["bytes"] / r["elements"] if r["elements"] else 0.0
    size = os.path.getsize(archive.path)
    inputs = sum(t["input_bytes"] for t in m["tasks"])
    base_bytes = m["base"]["input_bytes"]
    kinds: dict[str, int] = {}
    for t in archive.tensors.values():
        kinds[t["kind"]] = kinds.get(t["kind"], 0) + math.prod(t["shape"])
    return {
        "archive": str(archive.path), "archive_bytes": size, "tasks": tasks, "sections": roles,
        "merge": m["merge"], "base_by_reference": m["base"].get("by_reference", False),
        "parameters": {"base": all_params, "masked": masked_params, "by_kind": kinds},
        "inputs": {"tasks_bytes": inputs, "base_bytes": base_bytes, "n_tasks": len(tasks)},
        "ratio_vs_tasks": inputs / size if size else 0.0,
        "ratio_vs_tasks_and_base": (inputs + base_bytes) / size if size else 0.0,
    }


class _ArchiveBase:
    """The archive's base seen as a checkpoint, so a Family can be built around it for verification."""

    format = "archive"

    def __init__(self, archive: Archive):
        self.archive = archive
        self.names = archive.base_info["names"]
        self.dtypes = {n: archive.tensors[n]["dtype"] for n in self.names}
        self.shapes = {n: tuple(archive.tensors[n]["shape"]) for n in self.names}

    def __contains__(self, name):
        return name in self.dtypes

    def get(self, name):
        return self.archive.base_tensor(name)


class _ErrorStats:
    def __init__(self):
        self.max_abs, self.diff_sq, self.ref_sq = 0.0, 0.0, 0.0

    def add(self, got: torch.Tensor, ref: torch.Tensor):
        diff = got.double() - ref.double()
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.diff_sq += float((diff * diff).sum())
        self.ref_sq += float((ref.double() ** 2).sum())

    def result(self):
        return {"max_abs": self.max_abs, "rel_l2": math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq else 0.0}


def verify(archive: Archive, against=None, progress=None) -> dict:
    """Check every section's checksum and decoding; with `against` (the folder of original task
    checkpoints) also rebuild every task and measure its error against the original and against the
    exact formula base + m_t * mtv recomputed from the originals, and count mask bits that differ."""
    entries = archive.manifest["sections"]
    for i, entry in enumerate(entries):
        archive.reader.read_bytes(entry)  # checksum: raises naming the section
        if progress:
            progress("checksums", i + 1, len(entries))
    for i, (name, info) in enumerate(archive.tensors.items()):  # decode everything once
        if info["kind"] == KIND_MASKED:
            mtv = archive.mtv(name)
            for task in archive.tasks:
                archive.mask(task, name, mtv)
    for task in archive.tasks:
        for _ in archive.iter_task(task):
            pass
    report = {"archive": str(archive.path), "sections": len(entries), "ok": True,
              "mtv_dtypes": sorted({e["dtype"] for e in entries if e["role"] == ROLE_MTV})}
    if against is None:
        return report

    paths = discover_tasks(against)
    missing = [t for t in archive.tasks if t not in paths]
    if missing:
        raise TallzipError(f"{against}: has no checkpoint for task {missing[0]!r}")
    family = Family(_ArchiveBase(archive), {t: open_checkpoint(paths[t]) for t in archive.tasks})
    merger = _Merger(family, archive.merge_info["method"], archive.merge_info.get("density", 0.2), "cpu", None)
    lambdas = archive.lambdas
    stats = {t: {"original": _ErrorStats(), "formula": _ErrorStats(), "mask_bits_differing": 0} for t in archive.tasks}
    names = family.base.names
    for i, name in enumerate(names):
        base, originals = family.tensors(name)
        if archive.tensors[name]["kind"] == KIND_MASKED:
            exact_mtv = merger.mtv(base, originals)
            stored_mtv = archive.mtv(name)
        for task, original in zip(archive.tasks, originals):
            if archive.tensors[name]["kind"] == KIND_MASKED:
                mask = archive.mask(task, name, stored_mtv)
                exact_mask = taskvec.tall_mask(base, original, exact_mtv, lambdas[task])
                stats[task]["mask_bits_differing"] += int((mask != exact_mask).sum())
                got = taskvec.rebuild(base, mask, stored_mtv).to(original.dtype)
                formula = taskvec.rebuild(base, exact_mask, exact_mtv).to(original.dtype)
            else:
                got = archive.task_tensor(task, name)
                formula = original
            stats[task]["original"].add(got, original)
            stats[task]["formula"].add(got, formula)
        if progress:
            progress("verifying", i + 1, len(names))
    report["tasks"] = {t: {"vs_original": s["original"].result(), "vs_formula": s["formula"].result(),
                           "mask_bits_differing": s["mask_bits_differing"]} for t, s in stats.items()}
    return report



# --- mask agreement: how many tasks use each weight ----------------------------------------------

LAYER_KINDS = ("attn", "mlp", "ln", "embedding", "other")
LAYER_KIND_RULE = ("ln: the tensor's module name starts with 'ln' or contains 'norm'; attn: a part of the name "
                   "contains 'attn' or 'attention'; mlp: a part contains 'mlp', 'ffn' or 'feed_forward', or is "
                   "fc1, fc2, c_fc; embedding: a part contains 'embed', or is conv1 (a ViT's patch embedding), "
                   "wte, wpe; other: the rest. The first rule that matches wins.")


def layer_kind(name: str) -> str:
    """The layer kind of a tensor by its name (LAYER_KIND_RULE): attn, mlp, ln, embedding or other."""
    parts = name.lower().split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]  # 'ln_1' in 'resblocks.0.ln_1.weight'
    if module.startswith("ln") or "norm" in module:
        return "ln"
    if any("attn" in p or "attention" in p for p in parts):
        return "attn"
    if any("mlp" in p or "ffn" in p or "feed_forward" in p or p in ("fc1", "fc2", "c_fc") for p in parts):
        return "mlp"
    if any("embed" in p or p in ("conv1", "wte", "wpe") for p in parts):
        return "embedding"
    return "other"


def _agreement_row(histogram: torch.Tensor) -> dict:
    params = int(histogram.sum())
    share = (lambda c: float(histogram[c]) / params if params and c < len(histogram) else 0.0)
    return {"params": params, "histogram": [int(v) for v in histogram],
            "catastrophic": share(0), "selfish": share(1)}


def agreement(archive: Archive, progress=None) -> dict:
    """How many tasks use each weight, from the archive's TALL masks: a histogram over 0..N per layer kind
    and in total, with the shares of 'catastrophic' weights (used by no task) and 'selfish' ones (by one).

    Counts cover the masked tensors, the ones some task changes; tensors no task changes ('shared') have
    no masks and are reported apart as `unchanged_params`.
    """
    n = len(archive.tasks)
    by_kind = {kind: torch.zeros(n + 1, dtype=torch.int64) for kind in LAYER_KINDS}
    unchanged = 0
    names = list(archive.tensors)
    for i, name in enumerate(names):
        info = archive.tensors[name]
        if info["kind"] == KIND_MASKED:
            mtv = archive.mtv(name)
            count = taskvec.mask_count([archive.mask(t, name, mtv) for t in archive.tasks])
            by_kind[layer_kind(name)] += torch.bincount(count.reshape(-1).to(torch.int64), minlength=n + 1)
        elif info["kind"] == KIND_SHARED and info["dtype"] in FLOAT_DTYPES:
            unchanged += math.prod(info["shape"])
        if progress:
            progress("agreement", i + 1, len(names))
    total = sum(by_kind.values())
    return {
        "archive": str(archive.path), "n_tasks": n, "tasks": archive.tasks, "lambdas": archive.lambdas,
        "merge": archive.merge_info,
        "kinds": {kind: _agreement_row(h) for kind, h in by_kind.items() if int(h.sum())},
        "total": _agreement_row(total),
        "unchanged_params": unchanged,
        "layer_kind_rule": LAYER_KIND_RULE,
    }
