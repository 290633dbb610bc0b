"""`pack`: stream a family of checkpoints into one archive, tensor by tensor.

Peak memory is one tensor per task (plus, for TIES, one whole task vector at a time while the trim
thresholds are found): inputs are memory-mapped and sections are written as soon as they are made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import __version__, taskvec
from .errors import TallzipError
from .family import Family, tensors_digest
from .formats.constants import KIND_MASKED, KIND_SHARED, ROLE_BASE, ROLE_MASK, ROLE_MTV, ROLE_OWN
from .formats.tensors import dtype_name, from_bits, to_bits, torch_dtype
from .formats.writer import ArchiveWriter

KIND_PER_TASK = "per-task"
ROLE_FILE = "file"
MERGE_METHODS = ("sum", "ties")
MTV_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CODECS = {"float": "zstd", "mask": "bits+zstd", "other": "zstd"}
MASK_RULE = "mask = |base - task| > lambda * |(base + mtv) - task|, float32"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TallzipError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


@dataclass
class LambdaSelector:
    """Choose each task's lambda by a score on the user's data (validation accuracy, say).

    `evaluate(task, state_dict) -> float`, higher is better; the first best candidate wins.
    Used as `tallzip.pack(..., lambdas=tallzip.select_lambdas(evaluate))`.
    """
    evaluate: Callable[[str, dict], float]
    candidates: tuple = taskvec.LAMBDA_CANDIDATES
    scores: dict = field(default_factory=dict)  # filled in: task -> {lambda: score}


def select_lambdas(evaluate, candidates=taskvec.LAMBDA_CANDIDATES) -> LambdaSelector:
    return LambdaSelector(evaluate, tuple(candidates))


class _Merger:
    """Computes the mtv of one tensor; TIES needs whole-vector statistics gathered first."""

    def __init__(self, family: Family, method: str, density: float, device, progress):
        if method not in MERGE_METHODS:
            raise TallzipError(f"unknown merge {method!r} (expected one of {', '.join(MERGE_METHODS)})")
        self.family, self.method, self.density, self.device = family, method, density, device
        if method == "ties":
            self.thresholds = ties_thresholds(family, density, device, progress)
            self.majority = ties_majority(family, self.thresholds, device)

    def mtv(self, base, tasks):
        if self.method == "sum":
            return taskvec.sum_task_vectors(base, tasks)
        taus = [taskvec.task_vector(base, t) for t in tasks]
        return taskvec.ties_merge(taus, self.thresholds, self.majority, reduce="sum")


def ties_thresholds(family: Family, density: float, device, progress=None) -> list[float]:
    """Each task's TIES trim threshold, ranked over its whole task vector (one task in memory at a time)."""
    names = [n for n in family.base.names if family.is_mergeable(n)]
    thresholds = []
    for i, ckpt in enumerate(family.tasks.values()):
        magnitudes = torch.cat([
            taskvec.task_vector(family.base.get(n).to(device), ckpt.get(n).to(device)).abs().reshape(-1)
            for n in names])
        thresholds.append(taskvec.ties_threshold(magnitudes, density))
        del magnitudes
        if progress:
            progress("ties thresholds", i + 1, len(family.tasks))
    return thresholds


def ties_majority(family: Family, thresholds, device) -> float:
    """The sign that wins over the whole vector, which entries with no elected sign take."""
    total = 0
    for name in family.base.names:
        if family.is_mergeable(name):
            base, tasks = family.tensors(name)
            base = base.to(device)
            trimmed = [taskvec.ties_trim(taskvec.task_vector(base, t.to(device)), thr)
                       for t, thr in zip(tasks, thresholds)]
            total += int(torch.sign(taskvec.ties_sign_mass(trimmed)).sum())
    return 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)


def _task_lambdas(lambdas, tasks) -> dict[str, float] | None:
    if isinstance(lambdas, LambdaSelector):
        return None
    if isinstance(lambdas, (int, float)):
        out = {t: float(lambdas) for t in tasks}
    else:
        unknown = set(lambdas) - set(tasks) - {"*"}
        if unknown:
            raise TallzipError(f"--lambda names unknown task {sorted(unknown)[0]!r}; tasks: {', '.join(tasks)}")
        default = float(lambdas.get("*", taskvec.DEFAULT_LAMBDA))
        out = {t: float(lambdas.get(t, default)) for t in tasks}
    for task, lam in out.items():
        if not 0.0 <= lam < float("inf"):
            raise TallzipError(f"lambda for task {task!r} must be a non-negative number, got {lam}")
    return out


def _check_finite(name, tensors, labels):
    for tensor, label in zip(tensors, labels):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TallzipError(f"{label}: tensor {name!r} holds NaN or Inf (use --allow-nonfinite to pack anyway)")


def _selected_lambdas(family: Family, merger: _Merger, selector: LambdaSelector, device, progress):
    """Rebuild each task at each candidate lambda in memory and keep the best by the user's score."""
    mtvs = {}
    for name in family.base.names:
        if family.is_mergeable(name):
            base, tasks = family.tensors(name)
            mtvs[name] = merger.mtv(base.to(device), [t.to(device) for t in tasks])
    chosen = {}
    for i, (task, ckpt) in enumerate(family.tasks.items()):
        selector.scores[task] = {}
        for lam in selector.candidates:
            state = {}
            for name in ckpt.names:
                if name in mtvs:
                    base = family.base.get(name).to(device)
                    mask = taskvec.tall_mask(base, ckpt.get(name).to(device), mtvs[name], lam)
                    state[name] = taskvec.rebuild(base, mask, mtvs[name]).to(ckpt.get(name).dtype)
                else:
                    state[name] = ckpt.get(name)
            selector.scores[task][lam] = float(selector.evaluate(task, state))
        scores = selector.scores[task]
        chosen[task] = max(selector.candidates, key=lambda lam: (scores[lam], -selector.candidates.index(lam)))
        if progress:
            progress("choosing lambdas", i + 1, len(family.tasks))
    return chosen


def pack(tasks, base, output, *, lambdas=taskvec.DEFAULT_LAMBDA, merge: str = "sum",
         density: float = taskvec.DEFAULT_TIES_DENSITY, mtv_dtype: str = "float32", base_ref: bool = False,
         device: str = "auto", force: bool = False, level: int = 3, allow_nonfinite: bool = False,
         codecs: dict | None = None, progress=None) -> dict:
    """Pack a family into one archive at `output`; returns its manifest.

    tasks: folder of checkpoints, or {task: path}. lambdas: one number, {task: number} ('*' for the
    rest), or select_lambdas(evaluate). merge: 'sum' or 'ties' (top-`density` trim, disjoint sum).
    mtv_dtype: precision the mtv is stored at (masks always come from the full-precision mtv).
    base_ref: store only the base's identity; extract then needs the base file.
    """
    if mtv_dtype not in MTV_DTYPES:
        raise TallzipError(f"unknown mtv dtype {mtv_dtype!r} (expected one of {', '.join(MTV_DTYPES)})")
    codecs = {**DEFAULT_CODECS, **(codecs or {})}
    family = Family.open(tasks, base)
    device = resolve_device(device)
    task_names = family.names
    lam = _task_lambdas(lambdas, task_names)
    merger = _Merger(family, merge, density, device, progress)
    if lam is None:
        lam = _selected_lambdas(family, merger, lambdas, device, progress)

    tensors_table, task_dtypes = {}, {t: {} for t in task_names}
    with ArchiveWriter(output, force=force, level=level) as writer:
        def put(array_tensor, role, name, task, codec):
            return writer.add(to_bits(array_tensor), role=role, tensor=name, task=task,
                              dtype=dtype_name(array_tensor.dtype), shape=array_tensor.shape, codec=codec)

        for i, name in enumerate(family.base.names):
            base_t, task_ts = family.tensors(name)
            if not allow_nonfinite:
                _check_finite(name, [base_t, *task_ts], ["base", *(f"task {t!r}" for t in task_names)])
            for t, tensor in zip(task_names, task_ts):
                task_dtypes[t][name] = dtype_name(tensor.dtype)
            float_codec = codecs["float"] if base_t.is_floating_point() else codecs["other"]
            if all(torch.equal(base_t, t) for t in task_ts):
                kind = KIND_SHARED
            elif family.is_mergeable(name):
                kind = KIND_MASKED
            else:
                kind = KIND_PER_TASK
            tensors_table[name] = {"kind": kind, "dtype": dtype_name(base_t.dtype), "shape": list(base_t.shape)}
            if not base_ref:
                put(base_t, ROLE_BASE, name, None, float_codec)
            if kind == KIND_MASKED:
                _pack_masked(writer, merger, name, base_t, task_ts, task_names, lam, mtv_dtype, device, codecs)
            elif kind == KIND_PER_TASK:
                for t, tensor in zip(task_names, task_ts):
                    put(tensor, ROLE_OWN, name, t, codecs["other"])
            if progress:
                progress("packing", i + 1, len(family.base.names))

        task_entries = []
        for t in task_names:
            ckpt = family.tasks[t]
            for name in family.own_names(t):
                tensor = ckpt.get(name)
                if not allow_nonfinite:
                    _check_finite(name, [tensor], [f"task {t!r}"])
                task_dtypes[t][name] = dtype_name(tensor.dtype)
                put(tensor, ROLE_OWN, name, t, codecs["float"] if tensor.is_floating_point() else codecs["other"])
            for fname, path in ckpt.extra_files.items():
                data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) if path.stat().st_size else torch.empty(0, dtype=torch.uint8)
                put(data, ROLE_FILE, fname, t, "zstd")
            task_entries.append({
                "name": t, "lambda": lam[t], "format": ckpt.format, "metadata": ckpt.metadata,
                "sharding": ckpt.sharding, "layout": "folder" if (ckpt.sharding or ckpt.extra_files) else "file",
                "file_name": ckpt.path.name if not ckpt.sharding else None,
                "tensors": [[n, task_dtypes[t][n]] for n in ckpt.names],
                "files": list(ckpt.extra_files), "input_bytes": ckpt.nbytes,
            })
        manifest = {
            "format": "tallzip", "version": 1, "created_by": f"tallzip {__version__}",
            "merge": {"method": merge, **({"density": density} if merge == "ties" else {})},
            "mask_rule": MASK_RULE,
            "base": {"format": family.base.format, "metadata": family.base.metadata, "names": family.base.names,
                     "input_bytes": family.base.nbytes, "by_reference": base_ref,
                     "source": str(family.base.path),
                     "sha256": tensors_digest(family.base.names, family.base.get) if base_ref else None},
            "tensors": tensors_table,
            "tasks": task_entries,
        }
        if isinstance(lambdas, LambdaSelector):
            manifest["lambda_scores"] = {t: {str(k): v for k, v in s.items()} for t, s in lambdas.scores.items()}
        return writer.finish(manifest)


def _pack_masked(writer, merger, name, base_t, task_ts, task_names, lam, mtv_dtype, device, codecs):
    base_d = base_t.to(device)
    tasks_d = [t.to(device) for t in task_ts]
    mtv = merger.mtv(base_d, tasks_d)
    stored = mtv if mtv_dtype == "float32" or mtv.dtype == torch.float64 else mtv.to(getattr(torch, mtv_dtype))
    stored_cpu = stored.cpu()
    mtv_entry_dtype = dtype_name(stored_cpu.dtype)
    writer.add(to_bits(stored_cpu), role=ROLE_MTV, tensor=name, task=None, dtype=mtv_entry_dtype,
               shape=stored_cpu.shape, codec=codecs["float"])
    # The decoder sees the stored mtv: it is the mask codecs' side information.
    context = {"mtv": stored_cpu.to(torch.float32).reshape(-1).numpy()}
    for t, task_d in zip(task_names, tasks_d):
        mask = taskvec.tall_mask(base_d, task_d, mtv, lam[t]).cpu()
        writer.add(mask.reshape(-1).numpy(), role=ROLE_MASK, tensor=name, task=t, dtype="BOOL",
                   shape=mask.shape, codec=codecs["mask"], context=context, ones=int(mask.sum()))
