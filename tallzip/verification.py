"""`verify`: is the archive intact, and is it the archive of these checkpoints?

Intact: every section's checksum and decoding, each section read and decoded once, the sections of
different tensors on a thread pool (sha256, zstandard, the ANS coder, numpy and torch release the GIL).

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

import math
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np
import torch

from . import taskvec
from .archive import Archive
from .errors import TallzipError, TaskMismatchError
from .family import Family
from .formats.checkpoints import discover_tasks, open_checkpoint
from .rep_verify import check_task_tensor, guarantee_of
from .representations import REPRESENTATION_ROLES
from .formats.constants import KIND_MASKED, KIND_SHARED, ROLE_BASE, ROLE_MASK, ROLE_MTV, ROLE_OWN
from .formats.tensors import torch_bits_dtype, torch_dtype
from .formats.writer import available_cpus
from .packing import KIND_PER_TASK, ROLE_FILE, _Merger

# Unit roundoff of the dtype the mtv is stored at (round to nearest): |mtv - stored| <= u * |mtv|.
MTV_ROUNDING = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": 0.0, "F64": 0.0}
# Below the smallest normal number the rounding error is absolute: half the spacing of subnormals.
_SUBNORMAL_HALF_SPACING = {"BF16": 2.0 ** -134, "F16": 2.0 ** -25}
# The mask rule rounds three times in float32 (base + mtv, minus the task, times lambda): a change of
# the mtv by d moves the right-hand side by lambda * d plus at most a few float32 ulps of the operands.
_FLOAT32_SLACK = 2.0 ** -21
# Elements per slice when comparing a masked tensor: every operand of all tasks stays in the caches.
_CHUNK = 1 << 18
# Tensors decoded and compared at once hold about this many bytes (one tensor of every task each).
_IN_FLIGHT_BYTES = 1 << 30


# --- the math of the verdicts: plain functions over tensors ----------------------------------------

def mtv_rounding_bound(stored_mtv: torch.Tensor, stored_dtype: str) -> torch.Tensor | None:
    """Per weight, the most the full-precision mtv can differ from the stored one; None where the
    stored dtype is the full precision (float32, float64): no difference at all."""
    u = MTV_ROUNDING.get(stored_dtype)
    if u is None:
        raise TallzipError(f"mtv stored as {stored_dtype}: no rounding bound known for it")
    if u == 0.0:
        return None
    # u * |exact| <= u / (1 - u) * |stored|: the bound in terms of what the archive holds
    return torch.clamp(stored_mtv.abs() * (u / (1.0 - u)), min=_SUBNORMAL_HALF_SPACING[stored_dtype])


def within_rounding(own, rhs, base_c, task_c, stored_mtv, lam: float, stored_dtype: str) -> torch.Tensor:
    """Per weight: whether the TALL decision `own > rhs`, computed with the stored mtv, lies so close to
    its edge that the stored mtv's rounding could have moved it (all False for a float32 mtv)."""
    bound = mtv_rounding_bound(stored_mtv, stored_dtype)
    if bound is None:
        return torch.zeros(own.shape, dtype=torch.bool)
    slack = _FLOAT32_SLACK * lam * (base_c.abs() + stored_mtv.abs() + task_c.abs() + bound)
    return (own - rhs).abs() <= bound * lam + slack


def split_disagreement(disagree, own, rhs, base_c, task_c, stored_mtv, lam: float, stored_dtype: str):
    """(outside, within): the flat indices where the stored mask disagrees with `own > rhs` (the TALL
    rule computed with the stored mtv), beyond what the stored mtv's rounding can move the decision, or
    within it. Only the disagreeing weights are looked at (a few in a thousand where nothing changed)."""
    # numpy's flatnonzero: several times faster than torch's nonzero on a CPU
    where = torch.from_numpy(np.flatnonzero(disagree.reshape(-1).cpu().numpy()))
    if not where.numel():
        return where, where
    pick = (lambda t: t.reshape(-1)[where])
    near = within_rounding(pick(own), pick(rhs), pick(base_c), pick(task_c), pick(stored_mtv), lam, stored_dtype)
    return where[~near], where[near]


def mask_check(base, task, stored_mask, stored_mtv, lam: float, stored_dtype: str):
    """(outside, within): the weights where the TALL rule with the stored mtv disagrees with the stored
    mask, split by whether the decision lies beyond what the stored mtv's rounding can move (a real
    difference of the task's checkpoint) or within it. Both bool tensors of the tensor's shape.

    The rule is taskvec.tall_mask's: |base - task| > lambda * |(base + mtv) - task|, in float32."""
    base_c, task_c = taskvec.as_compute(base), taskvec.as_compute(task)
    own = (base_c - task_c).abs()
    rhs = ((base_c + stored_mtv) - task_c).abs() * lam
    outside, within = split_disagreement((own > rhs) != stored_mask, own, rhs, base_c, task_c, stored_mtv, lam,
                                         stored_dtype)
    return _flags(outside, own.shape), _flags(within, own.shape)


def _flags(indices: torch.Tensor, shape) -> torch.Tensor:
    flags = torch.zeros(math.prod(shape), dtype=torch.bool)
    flags[indices] = True
    return flags.reshape(shape)


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where(mask, a, b) for float tensors of one dtype, done on the bits: b ^ (mask * (a ^ b)),
    which vectorizes on a CPU (torch.where branches per element there and runs several times slower)."""
    view = torch_bits_dtype(a.element_size())
    a_bits, b_bits = a.view(view), b.view(view)
    return (a_bits ^ b_bits).mul_(mask).bitwise_xor_(b_bits).view(a.dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().reshape(-1)
    return flat if not flat.is_floating_point() else flat.view(torch_bits_dtype(flat.element_size()))


def count_unequal(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (NaN equals the same NaN); tensors of one dtype and shape."""
    return int((_bits(a) != _bits(b)).sum())


class _Error:
    """Sums for the relative L2 distance of rebuilt tensors to the originals."""

    def __init__(self):
        self.diff_sq, self.ref_sq, self.max_abs = 0.0, 0.0, 0.0

    def add(self, rebuilt: torch.Tensor, original: torch.Tensor):
        if original.is_floating_point() and original.numel():
            ref = taskvec.as_compute(original).reshape(-1)
            self.add_difference(taskvec.as_compute(rebuilt).reshape(-1) - ref, ref)

    def add_difference(self, diff: torch.Tensor, ref: torch.Tensor):
        """Flat tensors: sums of squares by dot products (each slice's in its dtype, the total in Python's)."""
        if diff.numel():
            self.diff_sq += float(torch.dot(diff, diff))
            self.ref_sq += float(torch.dot(ref, ref))
            low, high = torch.aminmax(diff)
            self.max_abs = max(self.max_abs, -float(low), float(high))

    def merge(self, other: "_Error"):
        self.diff_sq += other.diff_sq
        self.ref_sq += other.ref_sq
        self.max_abs = max(self.max_abs, other.max_abs)

    def result(self) -> dict:
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq else 0.0
        return {"rel_l2": rel, "max_abs": self.max_abs}


class _TaskFindings:
    def __init__(self):
        self.mask_bits = 0                 # mask bits checked
        self.outside = 0                   # mask bits that disagree beyond the mtv's rounding
        self.within = 0                    # ... and within it (not a difference)
        self.recomputed = 0                # mask bits unlike the rule with the recomputed mtv (whole folder only)
        self.error = _Error()
        self.differences: list[dict] = []  # {"tensor" or "file", "what"}

    def merge(self, other: "_TaskFindings"):
        self.mask_bits += other.mask_bits
        self.outside += other.outside
        self.within += other.within
        self.recomputed += other.recomputed
        self.error.merge(other.error)
        self.differences.extend(other.differences)


class _GroupResult:
    def __init__(self):
        self.tasks: dict[str, _TaskFindings] = {}
        self.mtv_differing: dict[str, int] = {}  # tensor -> weights whose stored mtv is not the recomputed one

    def task(self, name) -> _TaskFindings:
        return self.tasks.setdefault(name, _TaskFindings())


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
        for i, task in enumerate(self.tasks):
            self.checkpoints[task] = open_checkpoint(paths[task])
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
                self.merger = _Merger(family, archive.merge_info["method"],
                                      archive.merge_info.get("density", taskvec.DEFAULT_TIES_DENSITY), "cpu", progress)
            except TaskMismatchError as exc:  # the per-task checks name it too
                self.not_recomputed = str(exc)


# --- the run ------------------------------------------------------------------------------------

def _groups(archive: Archive) -> list[tuple[str, tuple, list]]:
    """Every section once, grouped into units of work: one base tensor (its base, mtv, masks and the
    tasks' own copies), one task-only tensor of one task, or one side file."""
    by_tensor: dict[str, list] = {}
    alone = []
    for entry in archive.manifest["sections"]:
        if entry["role"] in (ROLE_BASE, ROLE_MTV, ROLE_MASK, *REPRESENTATION_ROLES) or (
                entry["role"] == ROLE_OWN and entry["tensor"] in archive.tensors):
            by_tensor.setdefault(entry["tensor"], []).append(entry)
        elif entry["role"] == ROLE_OWN:
            alone.append(("own", (entry["task"], entry["tensor"]), [entry]))
        else:
            alone.append(("file", (entry["task"], entry["tensor"]), [entry]))
    groups = [("tensor", (name,), by_tensor.get(name, [])) for name in archive.tensors]
    return groups + alone


class _Run:
    def __init__(self, archive: Archive, folder: _Folder | None):
        self.archive, self.folder = archive, folder
        self._local = threading.local()
        self._opened: list[Archive] = []
        self._lock = threading.Lock()
        self.packed_dtypes = {t: dict(archive.task_entry(t)["tensors"]) for t in archive.tasks}

    def local_archive(self) -> Archive:
        """One Archive per worker thread: each keeps its own decoded mask context, so threads working
        on different tensors do not evict each other's (bits-ctx derives much from it)."""
        arc = getattr(self._local, "archive", None)
        if arc is None:
            arc = Archive(self.archive.path)
            self._local.archive = arc
            with self._lock:
                self._opened.append(arc)
        return arc

    def close(self):
        for arc in self._opened:
            arc.close()

    # --- one unit of work each --------------------------------------------------------------
    def run(self, kind, key, entries) -> _GroupResult:
        if kind == "tensor":
            return self._tensor(key[0], entries)
        if kind == "own":
            return self._task_only(*key)
        return self._side_file(*key)

    def _original(self, task, name, shape, findings: _TaskFindings):
        """The folder's tensor `name` of `task`, or None (and a difference) where it cannot be the packed one."""
        ckpt = self.folder.checkpoints[task]
        if name not in ckpt:
            findings.differences.append({"tensor": name, "what": "missing from the checkpoint"})
            return None
        if tuple(ckpt.shapes[name]) != tuple(shape):
            findings.differences.append({"tensor": name, "what": f"shape {list(ckpt.shapes[name])}, "
                                                                 f"packed {list(shape)}"})
            return None
        packed = self.packed_dtypes[task].get(name)
        if ckpt.dtypes[name] != packed:
            findings.differences.append({"tensor": name, "what": f"dtype {ckpt.dtypes[name]}, packed {packed}"})
            return None
        return ckpt.get(name)

    def _tensor(self, name, entries) -> _GroupResult:
        arc, archive, result = self.local_archive(), self.archive, _GroupResult()
        info = archive.tensors[name]
        kind = info["kind"]
        base = arc.base_tensor(name) if any(e["role"] == ROLE_BASE for e in entries) else None
        mtv = masks = owns = None
        # q*/exact tasks with sections of their own for this tensor (rep_verify.py checks them)
        represented = [t for t in archive.tasks if archive.representation(t) != "tall"
                       and (kind == KIND_MASKED or arc._has_own_rebuild(t, name))]
        if kind == KIND_MASKED and archive.reader.section(ROLE_MTV, name) is not None:
            mtv = arc.mtv(name)
            mtv_dtype = archive.reader.section(ROLE_MTV, name)["dtype"]
            masks = {t: arc.mask(t, name, mtv) for t in archive.tasks if archive.representation(t) == "tall"}
        elif kind == KIND_PER_TASK:
            owns = {t: arc.task_tensor(t, name) for t in archive.tasks}
        used = {ROLE_BASE} | ({ROLE_MTV, ROLE_MASK} if kind == KIND_MASKED else {ROLE_OWN} if kind == KIND_PER_TASK
                              else set())
        for task in represented:  # decoded (and so checked) here, once
            for index in range(len(arc.plan(task, name))):
                arc._chunk_parts(task, name, index)
        used |= set(REPRESENTATION_ROLES) | ({ROLE_OWN} if represented else set())
        for entry in entries:  # a section the rebuild never reads is checked all the same
            if entry["role"] not in used or (entry["task"] is not None and entry["task"] not in self.packed_dtypes):
                arc.reader.read(entry)
        if self.folder is None:
            return result
        if base is None:
            base = archive.base_tensor(name)  # packed with --base-ref: the base given with --base
        if kind == KIND_MASKED:  # the mtv is recomputed from all tasks at once
            originals = {}
            for task in self.folder.tasks:
                original = self._original(task, name, info["shape"], result.task(task))
                if original is not None:
                    originals[task] = original
                    if task in represented:
                        check_task_tensor(arc, task, name, base, original, result.task(task))
            if mtv is not None:
                self._compare_masked(name, base, mtv, mtv_dtype, masks, originals, result)
            return result
        for task in self.folder.tasks:  # one task's tensor in memory at a time
            findings = result.task(task)
            original = self._original(task, name, info["shape"], findings)
            if original is None:
                continue
            if task in represented:
                check_task_tensor(arc, task, name, base, original, findings)
                continue
            if kind == KIND_SHARED and archive.reader.section(ROLE_OWN, name, task) is not None:
                rebuilt = arc.task_tensor(task, name)  # a task added later with a copy of its own
            else:
                rebuilt = base if kind == KIND_SHARED else owns[task]
            differing = count_unequal(rebuilt, original)
            if differing:
                findings.differences.append({"tensor": name, "what": f"values: {differing:,} of "
                                             f"{original.numel():,} differ"})
            findings.error.add(rebuilt, original)
            del original
        return result

    def _compare_masked(self, name, base, mtv, mtv_dtype, masks, originals, result: _GroupResult):
        """The mask checks, the mtv recomputed (a complete folder) and the rebuild error of one masked
        tensor, slice by slice so that every operand stays in the CPU's caches across the tasks (as
        pack computes them)."""
        archive = self.archive
        merger = self.folder.merger if all(t in originals for t in archive.tasks) else None
        everyone = list(archive.tasks)
        tasks = [t for t in archive.tasks if t in originals and t in masks]  # the tall ones
        stored_torch = torch_dtype(mtv_dtype)
        # with a float32 mtv the rule with the recomputed mtv, where it equals the stored one, is the rule
        # with the stored mtv: checked already
        rounded = mtv_dtype not in ("F32", "F64")
        same_dtype = {t: base.dtype == taskvec.compute_dtype(base.dtype) == originals[t].dtype for t in tasks}
        flat_base, flat_mtv = base.reshape(-1), mtv.reshape(-1)
        flat = {t: originals[t].reshape(-1) for t in tasks}
        flat_masks = {t: masks[t].reshape(-1) for t in tasks}
        counts = {t: [0, 0, 0] for t in tasks}  # outside, within, unlike the recomputed mtv
        errors = {t: result.task(t).error for t in tasks}
        mtv_differing = 0
        count = base.numel()
        for start in range(0, count, _CHUNK):
            stop = min(count, start + _CHUNK)
            base_c, mtv_c = taskvec.as_compute(flat_base[start:stop]), flat_mtv[start:stop]
            tasks_c = {t: taskvec.as_compute(flat[t][start:stop]) for t in tasks}
            plus = base_c + mtv_c
            plus_exact = agree = None
            if merger is not None:
                exact = merger.mtv(base_c, [taskvec.as_compute(originals[t].reshape(-1)[start:stop]) for t in everyone])
                # what pack would have stored: the recomputed mtv cast to the stored dtype (and widened back)
                agree = _bits(taskvec.as_compute(exact.to(stored_torch))) == _bits(mtv_c)
                differing_here = int(agree.numel() - torch.count_nonzero(agree))
                all_agree = differing_here == 0
                mtv_differing += differing_here
                plus_exact = base_c + exact if rounded else None
            for t in tasks:
                task_c, stored, lam = tasks_c[t], flat_masks[t][start:stop], archive.lambdas[t]
                d_own, d_plus = base_c - task_c, plus - task_c
                own, rhs = d_own.abs(), d_plus.abs().mul_(lam)
                disagree = (own > rhs) != stored
                outside, within = split_disagreement(disagree, own, rhs, base_c, task_c, mtv_c, lam, mtv_dtype)
                counts[t][0] += outside.numel()
                counts[t][1] += within.numel()
                if agree is not None:
                    unlike = (own > (plus_exact - task_c).abs_().mul_(lam)) != stored if rounded else disagree
                    counts[t][2] += int(torch.count_nonzero(unlike if all_agree else unlike & agree))
                if same_dtype[t]:  # rebuilt - original: (base + mtv) - task where masked, base - task elsewhere
                    errors[t].add_difference(select(stored, d_plus, d_own), task_c)
                else:
                    rebuilt = select(stored, plus, base_c).to(base.dtype).to(originals[t].dtype)
                    errors[t].add(rebuilt, flat[t][start:stop])
        if mtv_differing:
            result.mtv_differing[name] = mtv_differing
        for t, (n_out, n_in, n_unlike) in counts.items():
            findings = result.task(t)
            findings.mask_bits += count
            findings.outside += n_out
            findings.within += n_in
            findings.recomputed += n_unlike
            if n_out:
                findings.differences.append({"tensor": name, "what": f"mask: {n_out:,} of {count:,} "
                                             "bits differ beyond the stored mtv's rounding"})

    def _task_only(self, task, name) -> _GroupResult:
        result = _GroupResult()
        arc = self.local_archive()
        stored = arc.task_tensor(task, name)
        if self.folder is None or task not in self.folder.checkpoints:
            return result
        findings = result.task(task)
        original = self._original(task, name, stored.shape, findings)
        if original is not None:
            differing = count_unequal(stored, original)
            if differing:
                findings.differences.append({"tensor": name, "what": f"values: {differing:,} of "
                                             f"{original.numel():,} differ"})
            findings.error.add(stored, original)
        return result

    def _side_file(self, task, fname) -> _GroupResult:
        result = _GroupResult()
        entry = self.archive.reader.section(ROLE_FILE, fname, task)
        data = self.local_archive().reader.read(entry).tobytes()
        if self.folder is None or task not in self.folder.checkpoints:
            return result
        path = self.folder.checkpoints[task].extra_files.get(fname)
        if path is None:
            result.task(task).differences.append({"file": fname, "what": "side file missing from the folder"})
        elif path.read_bytes() != data:
            result.task(task).differences.append({"file": fname, "what": "side file bytes differ"})
        return result


def _job_bytes(archive: Archive, kind, key, folder) -> int:
    """Roughly what one unit of work holds in memory while it runs."""
    if kind != "tensor":
        return 0
    info = archive.tensors[key[0]]
    tasks = len(folder.tasks) if folder else 0
    return math.prod(info["shape"]) * (4 * (tasks + 4) + len(archive.tasks))


@contextmanager
def _single_torch_thread():
    """Parallel over tensors, so each torch op runs on one thread (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def verify(archive: Archive, against=None, progress=None, workers: int | None = None) -> dict:
    """Check every section's checksum and decoding; with `against` (a folder of original task
    checkpoints) also give each task the archive holds a verdict, "matches" or "differs", and the
    whole report a verdict: "differs" when any task, or the mtv recomputed from a complete folder,
    differs by more than the archive's stored precision allows.

    A damaged section raises CorruptArchiveError naming it."""
    folder = _Folder(archive, against, progress) if against is not None else None
    groups = _groups(archive)
    sizes = [sum(e["length"] for e in entries) for _, _, entries in groups]
    total, done = sum(sizes), 0
    label = "checking sections" if folder is None else "comparing with the checkpoints"
    run = _Run(archive, folder)
    results = [None] * len(groups)
    workers = workers or available_cpus()
    try:
        with _single_torch_thread(), ThreadPoolExecutor(max_workers=workers,
                                                        thread_name_prefix="tallzip-verify") as pool:
            pending, held, index = {}, 0, 0
            while index < len(groups) or pending:
                while index < len(groups) and len(pending) < 2 * workers:
                    cost = _job_bytes(archive, *groups[index][:2], folder)
                    if pending and held + cost > _IN_FLIGHT_BYTES:
                        break
                    future = pool.submit(run.run, *groups[index])
                    pending[future] = (index, cost)
                    held += cost
                    index += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i, cost = pending.pop(future)
                    held -= cost
                    results[i] = future.result()  # a damaged section raises here
                    done += sizes[i]
                    if progress:
                        progress(label, done, total)
    finally:
        run.close()
    entries = archive.manifest["sections"]
    report = {"archive": str(archive.path), "sections": len(entries), "ok": True,
              "mtv_dtypes": sorted({e["dtype"] for e in entries if e["role"] == ROLE_MTV})}
    if folder is None:
        return report
    report.update(_verdicts(archive, folder, results))
    return report


def _verdicts(archive: Archive, folder: _Folder, results) -> dict:
    findings = {t: _TaskFindings() for t in folder.tasks}
    mtv_differing: dict[str, int] = {}
    for result in results:
        for task, part in result.tasks.items():
            findings[task].merge(part)
        mtv_differing.update(result.mtv_differing)
    packed_names = {t: {n for n, _ in archive.task_entry(t)["tensors"]} for t in folder.tasks}
    for task in folder.tasks:
        ckpt, entry = folder.checkpoints[task], archive.task_entry(task)
        for name in ckpt.names:
            if name not in packed_names[task]:
                findings[task].differences.append({"tensor": name, "what": "not in the archive"})
        for fname in ckpt.extra_files:
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
