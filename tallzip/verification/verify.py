"""`verify`: is the archive intact, and is it the archive of these checkpoints?

Intact: every section's checksum and decoding, each chunk read and decoded once, chunks on a thread
pool within the memory budget (blake3, zstandard, the ANS coder, numpy and torch release the GIL), the
checkpoints read by range: memory is the budget whatever the number of tasks and the size of a tensor
(verify_chunks.py: the units of work; verify_math.py: the rule's rounding margin and comparisons).

Against a folder of original checkpoints, a verdict per task, "matches" or "differs", from checks
that can only fail when the checkpoint is not the one packed:
- what the archive keeps as it was (tensors no task changes, integer buffers, heads, side files, the
  safetensors metadata) must be equal to the bit, and the checkpoint must hold the same tensors;
- a mask must be what the TALL rule gives from the task's checkpoint. The rule used the full-precision
  mtv at pack time and the archive keeps it rounded (bfloat16 by default), so the mask recomputed with
  the stored mtv may disagree with the stored one only where the decision lies within that rounding
  (`mask_check`); a disagreement anywhere else means the checkpoint differs. A float32 mtv leaves no
  margin at all.
When the folder holds every task of the archive, the mtv itself is recomputed from the checkpoints:
the stored one must be that float32 mtv cast to the stored dtype, bit for bit, and each stored mask
what the rule gives with it. Those two are checks of the whole family: a checkpoint that changed
moves the mtv of every task, so they say that the folder differs, and the per-task checks say which
task.
"""
from __future__ import annotations

import torch

from tallzip.ops import quality
from tallzip.ops import taskvec
from tallzip.archive.archive import Archive
from tallzip.run.chunks import ordered_map, workers_within
from tallzip.errors import TallzipError, TaskMismatchError
from tallzip.family import Family
from tallzip.formats.checkpoints.checkpoint import open_checkpoint
from tallzip.formats.checkpoints.folders import discover_tasks, shard_index
from tallzip.formats.container.constants import KIND_PER_TASK, ROLE_MTV, ROLE_OWN
from tallzip.formats.tensors import torch_dtype
from tallzip.ops.ties import MtvMerger
from tallzip.run.threads import single_torch_thread
from tallzip.verification.representations import guarantee_of
from tallzip.verification.chunks import TaskFindings, UnitResult, UnitRunner, stored_bytes, unit_cost, units
from tallzip.verification.compare import MTV_ROUNDING


# --- the checkpoints folder ---------------------------------------------------------------------

class _ArchiveBase:
    """The archive's base seen as a checkpoint, so that a Family (and the TIES statistics) can be built on it."""

    format = "archive"

    def __init__(self, archive: Archive):
        self.archive = archive
        self.names = archive.base_info["names"]
        self.dtypes = {n: archive.tensors[n]["dtype"] for n in self.names}
        self.shapes = {n: tuple(archive.tensors[n]["shape"]) for n in self.names}

    def __contains__(self, name):
        return name in self.dtypes

    def get(self, name, **_):
        return self.archive.base_tensor(name)

    def read_range(self, name, start, count, out=None):
        """Elements start .. start+count of a base tensor, from the archive's chunks that hold them."""
        archive = self.archive
        if archive.base_info.get("by_reference"):
            if archive.base_checkpoint is None:
                archive.base_tensor(name)  # raises: the base must be given (--base)
            piece = archive.base_checkpoint.read_range(name, start, count)
        elif archive.tensors[name]["kind"] == KIND_PER_TASK:  # small integer buffers
            piece = archive.base_tensor(name).reshape(-1)[start:start + count]
        else:
            pieces = [archive.base_chunk(name, i)[max(start - s, 0):min(start + count - s, c)]
                      for i, (s, c) in enumerate(archive.plan(None, name)) if s < start + count and start < s + c]
            piece = torch.cat(pieces) if len(pieces) > 1 else pieces[0] if pieces else \
                torch.empty(0, dtype=torch_dtype(self.dtypes[name]))
        if out is not None:
            return out[:count].copy_(piece)
        return piece


class _Folder:
    """The original checkpoints given to verify: which of the archive's tasks they hold, and, when they
    hold all of them, what recomputes the mtv."""

    def __init__(self, archive: Archive, folder, progress):
        self.path = str(folder)
        paths = discover_tasks(folder)
        self.tasks = [t for t in archive.tasks if t in paths]
        if not self.tasks:
            raise TallzipError(f"{folder}: holds no checkpoint of this archive's tasks "
                               f"({', '.join(archive.tasks)}); found {', '.join(paths) or 'none'}")
        self.missing = [t for t in archive.tasks if t not in paths]
        self.not_in_archive = sorted(set(paths) - set(archive.tasks))
        self.checkpoints = {}
        # the paper's release keeps the base inside a task folder: it is no side file of that task
        base_source = archive.base_info.get("source")
        for i, task in enumerate(self.tasks):
            self.checkpoints[task] = open_checkpoint(paths[task], exclude=[base_source] if base_source else ())
            if progress:
                progress("opening checkpoints", i + 1, len(self.tasks))
        self.complete = not self.missing
        self.merger = None
        self.not_recomputed = None  # why the mtv could not be recomputed from a complete folder
        mtv_tasks = archive.merge_info.get("mtv_tasks")
        if self.complete and mtv_tasks is not None and list(mtv_tasks) != list(archive.tasks):
            self.not_recomputed = (f"tasks were added or removed since the pack: the mtv merges "
                                   f"{', '.join(mtv_tasks)}")
        elif self.complete:
            try:
                family = Family(_ArchiveBase(archive), self.checkpoints)
                self.merger = MtvMerger(family, archive.merge_info["method"],
                                      archive.merge_info.get("density", taskvec.DEFAULT_TIES_DENSITY), "cpu", progress)
            except TaskMismatchError as exc:  # the per-task checks name it too
                self.not_recomputed = str(exc)

    def usable(self, archive: Archive, opening: UnitResult) -> set:
        """The (task, tensor) pairs whose original can be compared element by element with the packed
        tensor; the others are differences already (recorded in `opening`): missing from the
        checkpoint, or of another shape or dtype."""
        shapes = {(e["task"], e["tensor"]): e["shape"] for e in archive.manifest["sections"]
                  if e["role"] == ROLE_OWN and e["tensor"] not in archive.tensors}
        usable = set()
        for task in self.tasks:
            ckpt, packed = self.checkpoints[task], dict(archive.task_entry(task)["tensors"])
            wanted = [(n, info["shape"]) for n, info in archive.tensors.items()]
            wanted += [(n, shape) for (t, n), shape in shapes.items() if t == task]
            for name, shape in wanted:
                findings = opening.task(task)
                if name not in ckpt:
                    findings.differences.append({"tensor": name, "what": "missing from the checkpoint"})
                elif tuple(ckpt.shapes[name]) != tuple(shape):
                    findings.differences.append({"tensor": name, "what": f"shape {list(ckpt.shapes[name])}, "
                                                                         f"packed {list(shape)}"})
                elif ckpt.dtypes[name] != packed.get(name):
                    findings.differences.append({"tensor": name, "what": f"dtype {ckpt.dtypes[name]}, "
                                                                         f"packed {packed.get(name)}"})
                else:
                    usable.add((task, name))
        return usable


def estimates_report(task_entries) -> dict:
    """The data-free estimates pack recorded (None: not recorded, an older archive), and the tasks they call poor:
    reported, not a verdict (a rebuild that matches its archive can still be a poor copy of the model)."""
    return {"estimates": {e["name"]: e.get("estimate") for e in task_entries},
            "estimates_poor": [name for name, _, _ in quality.poor_tasks(task_entries)],
            "estimate_min_cosine": quality.POOR_COSINE,
            "estimate_min_cosine_by_representation": dict(quality.POOR_COSINE_BY_REPRESENTATION)}


# --- the run ------------------------------------------------------------------------------------

def verify(archive: Archive, against=None, progress=None, workers: int | None = None) -> dict:
    """Check every section's checksum and decoding; with `against` (a folder of original task
    checkpoints) also give each task the archive holds a verdict, "matches" or "differs", and the
    whole report a verdict: "differs" when any task, or the mtv recomputed from a complete folder,
    differs by more than the archive's stored precision allows.

    Works chunk by chunk on `workers` threads within the archive's memory budget (Archive(memory=...)),
    reading the checkpoints by range. A damaged section raises CorruptArchiveError naming it (and its
    chunk)."""
    folder = _Folder(archive, against, progress) if against is not None else None
    total = UnitResult()
    runner = UnitRunner(archive, folder, folder.usable(archive, total) if folder else set())
    work = units(archive)
    label = "checking sections" if folder is None else "comparing with the checkpoints"
    entries = archive.manifest["sections"]
    stored = sum(e["length"] for e in entries)  # progress in stored bytes checked
    folder_tasks = len(folder.tasks) if folder else 0
    cost = {id(u): unit_cost(archive, u, folder_tasks) for u in work}
    workers = workers_within(archive.memory, max(cost.values(), default=1), workers)
    done = 0
    with single_torch_thread(torch.device("cpu")):
        results = ordered_map(lambda u: (stored_bytes(archive, u), runner.run(u)), work,
                              cost=lambda u: cost[id(u)], budget=archive.memory, workers=workers)
        for i, (size, result) in enumerate(results, 1):
            total.merge(result)
            done += size
            if progress:
                progress(label, stored if i == len(work) else min(done, stored), stored)
    report = {"archive": str(archive.path), "sections": len(entries), "ok": True,
              "mtv_dtypes": sorted({e["dtype"] for e in entries if e["role"] == ROLE_MTV}),
              **estimates_report(archive.manifest["tasks"])}
    if folder is None:
        return report
    total.differences()
    report.update(_verdicts(archive, folder, total))
    return report


def _verdicts(archive: Archive, folder: _Folder, total: UnitResult) -> dict:
    findings = {t: TaskFindings() for t in folder.tasks}
    for task, part in total.tasks.items():
        findings[task].merge(part)
    mtv_differing = total.mtv_differing
    packed_names = {t: {n for n, _ in archive.task_entry(t)["tensors"]} for t in folder.tasks}
    for task in folder.tasks:
        ckpt, entry = folder.checkpoints[task], archive.task_entry(task)
        for name in ckpt.names:
            if name not in packed_names[task]:
                findings[task].differences.append({"tensor": name, "what": "not in the archive"})
        for fname in ckpt.extra_files:
            if fname == shard_index(entry.get("sharding")) and fname not in entry.get("files", []):
                continue  # archives before the index was kept as bytes rebuild it from their sharding
            if fname not in entry.get("files", []):
                findings[task].differences.append({"file": fname, "what": "side file not in the archive"})
        if (ckpt.metadata or None) != (entry.get("metadata") or None):
            findings[task].differences.append({"file": "metadata", "what": "safetensors metadata differs"})
    tasks = {}
    for task, f in findings.items():
        f.differences.sort(key=lambda d: (d.get("tensor") or d.get("file") or "", d["what"]))
        tasks[task] = {
            "verdict": "differs" if f.differences else "matches",
            "representation": archive.representation(task),
            "guarantee": guarantee_of(archive.representation(task)),
            "mask_bits": f.mask_bits,
            "mask_bits_differing": f.outside,
            "mask_bits_within_mtv_rounding": f.within,
            "rebuilt_vs_original": f.error.result(),
            "tensors_differing": sorted({d["tensor"] for d in f.differences if "tensor" in d}),
            "differences": f.differences,
        }
        if folder.merger is not None:
            tasks[task]["mask_bits_unlike_recomputed_mtv"] = f.recomputed
    family = {"mtv_recomputed": folder.merger is not None}
    if folder.merger is not None:
        family["mtv_tensors_differing"] = dict(sorted(mtv_differing.items()))
        family["masks_unlike_recomputed_mtv"] = {t: f.recomputed for t, f in findings.items() if f.recomputed}
    elif folder.complete:
        family["why_not"] = folder.not_recomputed
    else:
        family["why_not"] = (f"the folder lacks {len(folder.missing)} of the {len(archive.tasks)} tasks, "
                             "and the mtv is the sum over all of them")
    differs = (any(r["verdict"] == "differs" for r in tasks.values())
               or bool(family.get("mtv_tensors_differing")) or bool(family.get("masks_unlike_recomputed_mtv")))
    return {"against": folder.path, "verdict": "differs" if differs else "matches", "tasks": tasks,
            "tasks_missing": folder.missing, "checkpoints_not_in_archive": folder.not_in_archive,
            "family": family, "mtv_rounding": {d: MTV_ROUNDING.get(d) for d in
                                               sorted({e["dtype"] for e in archive.manifest["sections"]
                                                       if e["role"] == ROLE_MTV})}}
