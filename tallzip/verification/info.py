"""What an archive holds (sizes, densities, bits per parameter, codecs) and how tasks use its weights.

`verify` (intact, and faithful to the checkpoints) lives in verify.py."""
from __future__ import annotations

import math

import numpy as np
import torch

from tallzip.ops import quality
from tallzip.archive.archive import Archive
from tallzip.run.chunks import ordered_map
from tallzip.formats.container.constants import FLOAT_DTYPES, KIND_MASKED, KIND_SHARED, QUANT_BITS, ROLE_MASK, ROLE_MTV

# Every codec an archive can name codes its bytes exactly; one not listed here is not called lossless.
LOSSLESS_CODECS = frozenset({"raw", "zstd", "bits+zstd", "planes+zstd", "planes+ans", "blosc2+zstd", "bits-ctx",
                             "bits-ctx-prior", "bits-lvl", "delta"})
# Sections that hold one task's representation of the changed tensors (bits/param per task counts them).
REPRESENTATION_SECTION_ROLES = (ROLE_MASK, "qcodes", "qscales", "qoffsets", "delta", "lrcodes", "lrscales")
FULL_PRECISION_MTV = ("F32", "F64")
LOSSLESS_MEANS = ("every task rebuilds exactly as base + mask * mtv with the float32 mtv the masks were made "
                  "from (the TALL rule itself is not the fine-tuned model: see `verify --against`)")
LOSSLESS_MEANS_EXACT = "every task is kept exact and comes back bit for bit (no mtv or mask is stored)"
LOSSLESS_MEANS_MIXED = ("the tall tasks rebuild exactly as base + mask * mtv with the float32 mtv their masks were "
                        "made from (the TALL rule itself is not the fine-tuned model: see `verify --against`); the "
                        "exact tasks come back bit for bit")


def lossless_means(representations) -> str:
    """What "lossless" promises for an archive whose tasks are kept as `representations` (tall, exact)."""
    kinds = set(representations)
    return LOSSLESS_MEANS_EXACT if "tall" not in kinds else LOSSLESS_MEANS if kinds == {"tall"} else LOSSLESS_MEANS_MIXED
NOT_CHECKED = "sections not checked: run `tallzip verify`"


def recorded_level(manifest: dict) -> int | None:
    """The zstandard level the archive was packed at, where its manifest records it ("level"; archives
    written before it was recorded do not say)."""
    level = manifest.get("level")
    return level if type(level) is int else None


def summary(archive: Archive) -> dict:
    """What the manifest says: sizes per task and per section role against the inputs, the mtv's dtype,
    the codecs, whether the archive is lossless. Reads no section: checksums are `verify`'s."""
    m = archive.manifest
    masked_params = sum(math.prod(t["shape"]) for t in archive.tensors.values() if t["kind"] == KIND_MASKED)
    all_params = sum(math.prod(t["shape"]) for t in archive.tensors.values())
    roles: dict[str, dict] = {}
    tasks = {t: {"representation": archive.representation(t), "lambda": archive.lambdas[t], "mask_bytes": 0,
                 "mask_ones": 0, "mask_bits": 0, "own_bytes": 0, "representation_bytes": 0}
             for t in archive.tasks}
    for s in m["sections"]:
        r = roles.setdefault(s["role"], {"sections": 0, "bytes": 0, "elements": 0})
        r["sections"] += 1
        r["bytes"] += s["length"]
        r["elements"] += math.prod(s["shape"])
        if s["task"] is not None:
            row = tasks[s["task"]]
            if s["role"] in REPRESENTATION_SECTION_ROLES:
                row["representation_bytes"] += s["length"]
            if s["role"] == ROLE_MASK:
                row["mask_bytes"] += s["length"]
                row["mask_ones"] += s.get("ones", 0)
                row["mask_bits"] += math.prod(s["shape"])
            elif s["role"] not in REPRESENTATION_SECTION_ROLES:
                row["own_bytes"] += s["length"]
    for entry in m["tasks"]:  # the data-free estimate of the rebuild (ops/quality.py), where pack recorded it
        tasks[entry["name"]]["estimate"] = entry.get("estimate")
        tasks[entry["name"]]["estimate_poor"] = quality.is_poor(entry.get("estimate"))
    for row in tasks.values():
        row["density"] = row["mask_ones"] / row["mask_bits"] if row["mask_bits"] else 0.0
        row["mask_bits_per_param"] = 8 * row["mask_bytes"] / row["mask_bits"] if row["mask_bits"] else 0.0
        # over the changed (masked-kind) parameters; a tall task's share of the mtv is not counted
        row["bits_per_param"] = 8 * row["representation_bytes"] / masked_params if masked_params else 0.0
    for role, r in roles.items():
        r["bits_per_param"] = 8 * r["bytes"] / r["elements"] if r["elements"] else 0.0
    size = archive.reader.size  # a local file's or a URL's (os.path.getsize cannot see a URL)
    inputs = sum(t["input_bytes"] for t in m["tasks"])
    base_bytes = m["base"]["input_bytes"]
    kinds: dict[str, int] = {}
    for t in archive.tensors.values():
        kinds[t["kind"]] = kinds.get(t["kind"], 0) + math.prod(t["shape"])
    mtv_dtypes = sorted({s["dtype"] for s in m["sections"] if s["role"] == ROLE_MTV})
    codecs: dict[str, list] = {}
    for s in m["sections"]:
        if s["codec"] not in codecs.setdefault(s["role"], []):
            codecs[s["role"]].append(s["codec"])
    all_codecs = {c for used in codecs.values() for c in used}
    return {
        "archive": str(archive.path), "archive_bytes": size, "tasks": tasks, "sections": roles,
        "lambdas": archive.lambdas,
        "mtv_dtype": mtv_dtypes,
        "codecs": {role: sorted(used) for role, used in sorted(codecs.items())},
        "zstd_level": recorded_level(m),
        "lossless": (all(d in FULL_PRECISION_MTV for d in mtv_dtypes) and all_codecs <= LOSSLESS_CODECS
                     and not any(r["representation"] in (*QUANT_BITS, "lowrank") for r in tasks.values())),
        "representations": {t: r["representation"] for t, r in tasks.items()},
        "lossless_means": lossless_means(r["representation"] for r in tasks.values()),
        "checked": False, "not_checked": NOT_CHECKED,
        "merge": m["merge"], "base_by_reference": m["base"].get("by_reference", False),
        "parameters": {"base": all_params, "masked": masked_params, "by_kind": kinds},
        "inputs": {"tasks_bytes": inputs, "base_bytes": base_bytes, "n_tasks": len(tasks)},
        "ratio_vs_tasks": inputs / size if size else 0.0,
        "ratio_vs_tasks_and_base": (inputs + base_bytes) / size if size else 0.0,
        "estimate_min_cosine": quality.POOR_COSINE,
    }


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


def _chunk_counts(archive: Archive, name: str, index: int, count: int) -> torch.Tensor:
    """Histogram over 0..N of how many tasks' masks use each weight of one chunk of a masked tensor."""
    _, context = archive.mtv_chunk(name, index)  # the masks' decoding context
    used = np.zeros(count, dtype=np.uint16)
    for task in archive.tasks:
        bits = archive.mask_chunk_bits(task, name, index, context)
        used += np.unpackbits(bits, count=count, bitorder="little")
    return torch.from_numpy(np.bincount(used, minlength=len(archive.tasks) + 1).astype(np.int64))


def agreement(archive: Archive, progress=None) -> dict:
    """How many tasks use each weight, from the archive's TALL masks: a histogram over 0..N per layer kind
    and in total, with the shares of 'catastrophic' weights (used by no task) and 'selfish' ones (by one).

    Counts cover the masked tensors, the ones some task changes; tensors no task changes ('shared') have
    no masks and are reported apart as `unchanged_params`. Chunk by chunk on a thread pool within the
    archive's memory budget (one chunk of the mtv and of every task's mask each), whatever the tensor's size.
    """
    n = len(archive.tasks)
    by_kind = {kind: torch.zeros(n + 1, dtype=torch.int64) for kind in LAYER_KINDS}
    unchanged = 0
    items = []
    for name, info in archive.tensors.items():
        if info["kind"] == KIND_MASKED:
            items += [(name, i, count) for i, (_, count) in enumerate(archive.plan(None, name))]
        elif info["kind"] == KIND_SHARED and info["dtype"] in FLOAT_DTYPES:
            unchanged += math.prod(info["shape"])
    # the mtv chunk stored and in float32, the mask codec's working set, each mask packed and unpacked, the counts
    cost = lambda item: max(item[2], 1) * (2 + 8 + 24 + n + 3) + (1 << 20)  # noqa: E731
    counts = ordered_map(lambda item: (item[0], _chunk_counts(archive, *item)), items, cost=cost,
                         budget=archive.memory)
    for i, (name, histogram) in enumerate(counts):
        by_kind[layer_kind(name)] += histogram
        if progress:
            progress("agreement", i + 1, len(items))
    total = sum(by_kind.values())
    return {
        "archive": str(archive.path), "n_tasks": n, "tasks": archive.tasks, "lambdas": archive.lambdas,
        "merge": archive.merge_info,
        "kinds": {kind: _agreement_row(h) for kind, h in by_kind.items() if int(h.sum())},
        "total": _agreement_row(total),
        "unchanged_params": unchanged,
        "layer_kind_rule": LAYER_KIND_RULE,
    }
