"""A task's entry in the manifest, built in one place: pack writes one per task, add one for the new task."""
from __future__ import annotations

from tallzip.ops.representations import representation_fields


def task_entry(name: str, ckpt, representation: str, lam: float, estimate: dict | None = None,
               lowrank: dict | None = None) -> dict:
    """The manifest entry of task `name` read from checkpoint `ckpt`, kept as `representation`: what extract
    needs to give the task back as it came (format, metadata, sharding, layout, file name, tensor dtypes,
    side files). The key order is part of the archive's bytes: keep it. estimate: the data-free estimate of
    the rebuild's quality (ops/quality.py), recorded when known. lowrank: a lowrank task's "lowrank" field
    (packing/lowrank_pack.py)."""
    entry = {
        "name": name, "representation": representation, **representation_fields(representation),
        **({"lowrank": lowrank} if lowrank is not None else {}), "lambda": lam,
        "format": ckpt.format, "metadata": ckpt.metadata, "sharding": ckpt.sharding,
        "layout": "folder" if (ckpt.sharding or ckpt.extra_files) else "file",
        "file_name": ckpt.path.name if not ckpt.sharding else None,
        "tensors": [[n, ckpt.dtypes[n]] for n in ckpt.names],
        "files": list(ckpt.extra_files), "input_bytes": ckpt.nbytes,
    }
    if estimate is not None:
        entry["estimate"] = estimate
    return entry
