"""`pack`: stream a family of checkpoints into one archive, tensor by tensor.

Peak memory is about two tensors per task (the one being packed and the next one, read ahead),
plus, for TIES, one whole task vector at a time while the trim thresholds are found. Three things
overlap: a reader thread reads the next tensor of every checkpoint, the caller's thread computes
the mtv and the masks of the current one (on the GPU when there is one), and the writer's thread
pool compresses and hashes the sections made before.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import __version__, taskvec
from .errors import TallzipError
from .family import Family, base_digest
from .chunks import checked_chunk_elements, chunk_plan, ordered_map, parse_memory
from .formats.constants import (DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES, FLOAT_DTYPES, FORMAT_VERSION, KIND_MASKED, KIND_PER_TASK, KIND_SHARED,
                                ROLE_BASE, ROLE_FILE, ROLE_MASK, ROLE_MTV)
from .formats.reader import is_plain_file_name
from .formats.writer import ArchiveWriter, available_cpus
from .formats.outputs import refuse_inputs_as_output
from .bits import pack_bits
from .pack_jobs import ChunkJob, PackSettings, dtype_of, job_cost, run_job
from .selection import RepresentationSelector, choose as choose_representations
from .representations import REPRESENTATION_ROLES, representation_fields, representation_section, task_representations
from .choices import (DEFAULT_CODECS, DEFAULT_LEVEL, DEFAULT_MTV_DTYPE, FLOAT_CODECS, MASK_CODECS,  # noqa: F401
                      MERGE_METHODS, MTV_DTYPES)
MASK_RULE = "mask = |base - task| > lambda * |(base + mtv) - task|, float32"


def resolve_device(device=None) -> torch.device:
    """'auto' (a CUDA device when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TallzipError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TallzipError("--device cuda asked for, but no CUDA device is available "
                               "(no GPU, or a PyTorch built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TallzipError(f"no CUDA device {device.index}: this machine has {torch.cuda.device_count()}")
    elif device.type != "cpu":
        raise TallzipError(f"device {str(device)!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    return device


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


def _read_range(ckpt, name, start, count):
    reader = getattr(ckpt, "read_range", None)
    return reader(name, start, count) if reader else ckpt.get(name).reshape(-1)[start:start + count]


def _chunks_of(family: Family, names, chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    for name in names:
        for start, count in chunk_plan(family.base.shapes[name], chunk_elements):
            yield name, start, count


def ties_thresholds(family: Family, density: float, device, progress=None) -> list[float]:
    """Each task's TIES trim threshold, ranked over its whole task vector, exactly, reading it chunk
    by chunk twice (taskvec.magnitude_histogram): memory is a chunk, not the model."""
    names = [n for n in family.base.names if family.is_mergeable(n)]
    if any(family.base.dtypes[n] == "F64" or any(c.dtypes[n] == "F64" for c in family.tasks.values()) for n in names):
        return _ties_thresholds_whole(family, names, density, device, progress)
    count = sum(math.prod(family.base.shapes[n]) for n in names)
    kth = taskvec.ties_kth(count, density)
    thresholds = []
    for i, ckpt in enumerate(family.tasks.values()):
        if kth <= 0:
            thresholds.append(0.0)
            continue

        def magnitudes():
            for name, start, n in _chunks_of(family, names):
                base = _read_range(family.base, name, start, n).to(device)
                yield taskvec.task_vector(base, _read_range(ckpt, name, start, n).to(device)).abs()

        coarse = sum(taskvec.magnitude_histogram(m).cpu() for m in magnitudes())
        top, rank = taskvec.kth_bin(coarse, kth)
        fine = sum(taskvec.magnitude_histogram(m, top).cpu() for m in magnitudes())
        low, _ = taskvec.kth_bin(fine, rank)
        thresholds.append(taskvec.magnitude_from_bins(top, low))
        if progress:
            progress("ties thresholds", i + 1, len(family.tasks))
    return thresholds


def _ties_thresholds_whole(family, names, density, device, progress):
    """float64 task vectors: ranked whole, one task in memory at a time."""
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
    """The sign that wins over the whole vector, which entries with no elected sign take (chunk by chunk)."""
    total = 0
    names = [n for n in family.base.names if family.is_mergeable(n)]
    for name, start, n in _chunks_of(family, names):
        base = _read_range(family.base, name, start, n).to(device)
        trimmed = [taskvec.ties_trim(taskvec.task_vector(base, _read_range(c, name, start, n).to(device)), thr)
                   for c, thr in zip(family.tasks.values(), thresholds)]
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
    """Rebuild each task at each candidate lambda and keep the best by the user's score.

    evaluate(task, state_dict) takes a whole model, so this holds exactly one rebuilt task state at a
    time, plus one tensor of every task while that tensor's mtv is recomputed: the mtv is recomputed
    tensor by tensor for each candidate rather than kept for the whole model (N x the model before)."""
    chosen = {}
    for i, (task, ckpt) in enumerate(family.tasks.items()):
        selector.scores[task] = {}
        for lam in selector.candidates:
            state = {}
            for name in ckpt.names:
                if name in family.base and family.is_mergeable(name):
                    base, tasks = family.tensors(name)
                    base = base.to(device)
                    mtv = merger.mtv(base, [t.to(device) for t in tasks])
                    del tasks
                    task_t = ckpt.get(name)
                    mask = taskvec.tall_mask(base, task_t.to(device), mtv, lam)
                    state[name] = taskvec.rebuild(base, mask, mtv).to(task_t.dtype)
                    del base, mtv, mask
                else:
                    state[name] = ckpt.get(name)
            selector.scores[task][lam] = float(selector.evaluate(task, state))
            del state
        scores = selector.scores[task]
        chosen[task] = max(selector.candidates, key=lambda lam: (scores[lam], -selector.candidates.index(lam)))
        if progress:
            progress("choosing lambdas", i + 1, len(family.tasks))
    return chosen


def checked_codecs(codecs: dict | None) -> dict:
    """DEFAULT_CODECS with the caller's choices for 'float', 'mask' and 'other' sections; refuses a
    codec that cannot code that kind of section."""
    chosen = {**DEFAULT_CODECS, **(codecs or {})}
    unknown = sorted(set(chosen) - set(DEFAULT_CODECS))
    if unknown:
        raise TallzipError(f"codecs: unknown section kind {unknown[0]!r} (expected float, mask or other)")
    for kind, allowed in (("float", FLOAT_CODECS), ("other", FLOAT_CODECS), ("mask", MASK_CODECS)):
        if chosen[kind] not in allowed:
            raise TallzipError(f"{kind} codec {chosen[kind]!r} is not one of {', '.join(allowed)}")
    return chosen


def pack(tasks, base, output, *, lambdas=taskvec.DEFAULT_LAMBDA, merge: str = "sum",
         density: float = taskvec.DEFAULT_TIES_DENSITY, mtv_dtype: str = DEFAULT_MTV_DTYPE, base_ref: bool = False,
         device: str = "auto", force: bool = False, level: int = DEFAULT_LEVEL, allow_nonfinite: bool = False,
         codecs: dict | None = None, progress=None, memory=None, chunk_elements: int | None = None,
         workers: int | None = None, engine="local", address: str | None = None, keep=None) -> dict:
    """Pack a family into one archive at `output`; returns its manifest.

    tasks: folder of checkpoints, or {task: path}. lambdas: one number, {task: number} ('*' for the
    rest), or select_lambdas(evaluate). merge: 'sum' or 'ties' (top-`density` trim, disjoint sum).
    mtv_dtype: precision the mtv is stored at (masks always come from the full-precision mtv);
    'float32' makes the archive lossless: every task rebuilt exactly as base + m_t * mtv.
    base_ref: store only the base's identity; extract then needs the base file.
    codecs: {'float': one of FLOAT_CODECS (base, mtv, float tensors of a task's own), 'mask': one of
    MASK_CODECS, 'other': one of FLOAT_CODECS (integer tensors)}; missing keys take DEFAULT_CODECS.
    memory: the budget for chunks in flight (bytes, or '1.5G', '256M'); chunk_elements: the chunk
    size the archive records (default 2^22). keep: how each task is kept (representations.py): one of
    tall (default), q8, q4, q3, q2, exact for all, {task: rep} with '*' for the rest, or
    select_representation(evaluate, tolerance) (recorded in the manifest with the scores). Neither the budget nor `workers` changes the archive's
    bytes: those depend only on the inputs and the options above.
    engine: 'local' (threads here) or 'ray' (chunk jobs as Ray tasks on the cluster at `address`:
    None starts a private local one, 'auto' joins `ray start`'s, 'ray://HOST:PORT' Ray Client), or
    an Engine (tallzip.engines). Each Ray task reads its own byte ranges of the inputs, so every
    worker must see the same paths; the archive is byte-identical to the local one. The TIES
    thresholds (one reduction per task over the whole model) are still computed here, first.
    """
    if mtv_dtype not in MTV_DTYPES:
        raise TallzipError(f"unknown mtv dtype {mtv_dtype!r} (expected one of {', '.join(MTV_DTYPES)})")
    codecs = checked_codecs(codecs)
    budget = parse_memory(memory)
    chunk_elements = checked_chunk_elements(chunk_elements)
    family = Family.open(tasks, base)
    refuse_inputs_as_output([output], family.local_files())  # before any work (the writer checks again)
    if not (isinstance(engine, str) and engine == "local"):  # tallzip's own refusals before Ray is looked for
        device = _engine_device(device)
        _refuse_torch_pickles_elsewhere(engine if isinstance(engine, str) else engine.name, family)
    engine, own_engine = _pack_engine(engine, address, workers)
    device = resolve_device(device)
    task_names = family.names
    for t in task_names:  # extract writes a file or folder per task, named after it
        if not is_plain_file_name(t):
            raise TallzipError(f"task name {t!r} cannot be a file name (no '/', '\\', NUL, '.' or '..')")
    lam = _task_lambdas(lambdas, task_names)
    selector = keep if isinstance(keep, RepresentationSelector) else None
    if selector is None:
        reps = task_representations(keep, task_names)  # refuses a bad --keep before any computing
    merger = _Merger(family, merge, density, device, progress)
    if lam is None:
        lam = _selected_lambdas(family, merger, lambdas, device, progress)
    if selector is not None:  # after the mtv's method and the lambdas: the tall candidate is rebuilt from them
        keep = choose_representations(family, selector, chunk_elements, progress, tall=(merger, lam, mtv_dtype))
        reps = task_representations(keep, task_names)
    settings = PackSettings(tuple(task_names), tuple(lam[t] for t in task_names), merger, mtv_dtype, codecs, level,
                            device, allow_nonfinite, base_ref, tuple(reps[t] for t in task_names))

    kinds = {}
    for name in family.base.names:
        if family.is_mergeable(name):
            kinds[name] = KIND_MASKED  # or shared, once every chunk turns out identical in every task
        else:
            kinds[name] = KIND_SHARED if _identical(family, name, chunk_elements) else KIND_PER_TASK
    jobs = []
    for name in family.base.names:
        shape = tuple(family.base.shapes[name])
        kind = {KIND_MASKED: "masked", KIND_SHARED: "shared", KIND_PER_TASK: "per-task"}[kinds[name]]
        jobs += [ChunkJob(kind, name, i, start, count, shape) for i, (start, count) in
                 enumerate(chunk_plan(shape, chunk_elements))]
    for t in task_names:
        ckpt = family.tasks[t]
        for name in family.own_names(t):
            shape = tuple(ckpt.shapes[name])
            jobs += [ChunkJob("own", name, i, start, count, shape, task=t)
                     for i, (start, count) in enumerate(chunk_plan(shape, chunk_elements))]
        for fname, path in ckpt.extra_files.items():
            shape = (path.stat().st_size,)
            jobs += [ChunkJob("file", fname, i, start, count, shape, task=t)
                     for i, (start, count) in enumerate(chunk_plan(shape, chunk_elements))]
    for job in jobs:
        job.cost = job_cost(job, len(task_names), DTYPE_SIZES[dtype_of(family, job)])
    # Threads: as many as the CPUs, but no more than the budget holds jobs (each thread keeps its scratch).
    biggest = max((job.cost for job in jobs), default=1)
    workers = max(1, min(workers or available_cpus(), budget // max(biggest, 1)))

    tensors_table = {name: {"kind": kinds[name], "dtype": family.base.dtypes[name],
                            "shape": list(family.base.shapes[name])} for name in family.base.names}
    with ArchiveWriter(output, force=force, chunk_elements=chunk_elements, inputs=family.local_files()) as writer, _single_torch_thread(device):
        entries = {}  # (role, name, task) -> section entry, created in the order the archive lists them

        def entry_for(role, job, task, mtv_dtype_name=None):
            key = (role, job.name, task)
            if key not in entries:
                if role == ROLE_MTV:
                    dtype, codec = mtv_dtype_name, codecs["float"]
                elif role == ROLE_MASK:
                    dtype, codec = "BOOL", codecs["mask"]
                elif role == ROLE_FILE:
                    dtype, codec = "U8", "zstd"
                elif role in REPRESENTATION_ROLES:
                    entries[key] = representation_section(writer, role, job.name, task, job.shape,
                                                          family.base.dtypes[job.name], chunk_elements, reps[task])
                    return entries[key]
                else:
                    ckpt = family.base if role == ROLE_BASE else family.tasks[task]
                    dtype = ckpt.dtypes[job.name]
                    codec = codecs["float"] if dtype in FLOAT_DTYPES else codecs["other"]
                entries[key] = writer.section(role=role, tensor=job.name, task=task, dtype=dtype,
                                              shape=job.shape, codec=codec)
            return entries[key]

        def work(job):
            return run_job(job, family, settings, masked_tensor)

        identical: dict[str, bool] = {}
        done = 0
        if engine is None:
            results = ordered_map(work, jobs, cost=lambda job: job.cost, budget=budget, workers=workers)
        else:
            results = _engine_results(engine, own_engine, jobs, family, settings, budget)
        for result in results:
            job = result.job
            for role, task, (data, params, digest), ones in result.pieces:
                writer.write_chunk(entry_for(role, job, task, result.mtv_dtype), data, params, digest, ones)
            if job.kind == "masked":
                identical[job.name] = identical.get(job.name, True) and result.identical
                if job.index == len(chunk_plan(job.shape, chunk_elements)) - 1 and identical[job.name]:
                    # identical everywhere: stored once, as the base; its mtv and masks stay unlisted
                    tensors_table[job.name]["kind"] = KIND_SHARED
                    for key, entry in list(entries.items()):
                        if key[1] == job.name and key[0] != ROLE_BASE:
                            writer.drop(entry)
            done += 1
            if progress:
                progress("packing", done, len(jobs))

        task_entries = []
        for t in task_names:
            ckpt = family.tasks[t]
            task_entries.append({
                "name": t, "representation": reps[t], **representation_fields(reps[t]), "lambda": lam[t],
                "format": ckpt.format,
                "metadata": ckpt.metadata, "sharding": ckpt.sharding,
                "layout": "folder" if (ckpt.sharding or ckpt.extra_files) else "file",
                "file_name": ckpt.path.name if not ckpt.sharding else None,
                "tensors": [[n, ckpt.dtypes[n]] for n in ckpt.names],
                "files": list(ckpt.extra_files), "input_bytes": ckpt.nbytes,
            })
        manifest = {
            "format": "tallzip", "version": FORMAT_VERSION, "created_by": f"tallzip {__version__}",
            "merge": {"method": merge, **({"density": density} if merge == "ties" else {})},
            "mask_rule": MASK_RULE, "level": level,
            "base": {"format": family.base.format, "metadata": family.base.metadata, "names": family.base.names,
                     "input_bytes": family.base.nbytes, "by_reference": base_ref,
                     "source": str(family.base.path),
                     "sha256": base_digest(family.base) if base_ref else None},
            "tensors": tensors_table,
            "tasks": task_entries,
        }
        if merge == "ties":
            manifest["merge"].update(thresholds=merger.thresholds, majority=merger.majority)
        if selector is not None:
            manifest["representation_choice"] = {"tolerance": selector.tolerance, "candidates": list(selector.candidates),
                                                 "scores": selector.scores,
                                                 **({"mtv_weighed": selector.mtv_weighed} if selector.mtv_weighed else {})}
        if isinstance(lambdas, LambdaSelector):
            manifest["lambda_scores"] = {t: {str(k): v for k, v in s.items()} for t, s in lambdas.scores.items()}
        return writer.finish(manifest)


def _pack_engine(engine, address, workers):
    """None for the threads of this process (the default route); else the Engine to run chunk jobs on."""
    from .engines import Engine, make_engine
    if isinstance(engine, Engine):
        if address is not None:
            raise TallzipError("address applies to engine='ray' only (an Engine given is already placed)")
        return engine, False
    if engine == "local":
        if address is not None:
            raise TallzipError("--address applies to --engine ray only")
        return None, False
    return make_engine(engine, address=address, workers=workers if address is None else None), True


def _engine_device(device):
    """Chunk jobs on an engine run on its workers' CPUs: 'auto' means the CPU there."""
    if device is None or (isinstance(device, str) and device in ("auto", "cpu")):
        return "cpu"
    raise TallzipError(f"--device {device}: jobs on an engine run on its workers' CPUs (use --device cpu)")


def _refuse_torch_pickles_elsewhere(engine_name: str, family):
    from .formats.checkpoints import TorchCheckpoint
    if engine_name != "local":
        for label, ckpt in [("base", family.base), *family.tasks.items()]:
            if isinstance(ckpt, TorchCheckpoint):  # its lazy reader holds a lock and an open zip: not sent
                raise TallzipError(f"--engine {engine_name}: {label} {ckpt.path.name} is a torch pickle; chunk jobs "
                                   f"elsewhere read safetensors only (convert it, or use --engine local)")


def _engine_results(engine, own_engine, jobs, family, settings, budget):
    """The chunk jobs' results, in order, from `engine`: (family, settings) are shared once (Ray's object
    store), each job carries only its tensor name and element range. An engine made here closes after."""
    from .engines import Job
    from .pack_jobs import run_shared_job
    with engine if own_engine else contextlib.nullcontext():
        shared = engine.share((family, settings))
        tasks = (Job(run_shared_job, (job, shared), label=f"{job.kind} {job.name} #{job.index}", nbytes=job.cost)
                 for job in jobs)
        # a generator (not a list) so only the jobs in flight exist; progress is reported by pack itself
        yield from engine.map(tasks, label="packing", max_bytes_in_flight=budget)


def _identical(family: Family, name: str, chunk_elements: int) -> bool:
    """Whether a tensor is bit-identical in the base and every task, compared chunk by chunk."""
    if any(ckpt.dtypes[name] != family.base.dtypes[name] for ckpt in family.tasks.values()):
        return False
    for start, count in chunk_plan(family.base.shapes[name], chunk_elements):
        base = family.base.read_range(name, start, count)
        if not all(torch.equal(base, ckpt.read_range(name, start, count)) for ckpt in family.tasks.values()):
            return False
    return True


@contextlib.contextmanager
def _single_torch_thread(device: torch.device):
    """One PyTorch thread per chunk job on a CPU (the jobs themselves fill the cores); beside a GPU
    the CPU only feeds it. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else max(1, available_cpus() - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the masked tensors: mtv, masks and bit-packing, streamed --------------------------------------

CPU_CHUNK = 1 << 15  # elements: the slices of all inputs stay in the CPU's caches between their uses


def masked_tensor(merger, base: torch.Tensor, tasks: list, lambdas: list, device: torch.device, mtv_out=None):
    """The mtv of one tensor (compute dtype, on the CPU) and every task's mask, bit-packed (numpy
    uint8, little bit order), with each mask's count of ones. `mtv_out`: a flat CPU tensor of the
    compute dtype to write the mtv into (it is then returned, shaped as the base).

    Bit for bit what taskvec.sum_task_vectors / ties_merge and taskvec.tall_mask give, computed
    with fewer passes over memory: (base + mtv) once per tensor rather than once per task, and on a
    CPU slice by slice so that every input is read from memory once.
    """
    compute = taskvec.compute_dtype(base.dtype)
    if any(taskvec.compute_dtype(t.dtype) != compute for t in tasks):  # mixed float64: the plain formulas
        base_c = base.to(device)
        tasks_d = [t.to(device) for t in tasks]
        mtv = merger.mtv(base_c, tasks_d)
        masks = [taskvec.tall_mask(base_c, t, mtv, lam) for t, lam in zip(tasks_d, lambdas)]
        return _finish_masks(_into(mtv, mtv_out), masks)
    if device.type == "cpu" and merger.method == "sum":
        return _summed_masks_cpu(base, tasks, lambdas, compute, mtv_out)
    count = base.numel()
    if device.type == "cpu":
        chunk = CPU_CHUNK
        flat_base, flat_tasks = base.reshape(-1), [t.reshape(-1) for t in tasks]
    else:  # one slice: the whole tensor, copied to the GPU asynchronously from pinned memory
        chunk = max(count, 1)
        flat_base = base.reshape(-1).to(device, non_blocking=True)
        flat_tasks = [t.reshape(-1).to(device, non_blocking=True) for t in tasks]
    mtv = torch.empty(count, dtype=compute, device=device)
    masks = [torch.empty(count, dtype=torch.bool, device=device) for _ in tasks]
    size = min(chunk, count)
    own, others, plus = (torch.empty(size, dtype=compute, device=device) for _ in range(3))
    # Summing, keep each task vector: |base - task| is exactly |task - base|, so the masks reuse them.
    taus = [torch.empty(size, dtype=compute, device=device) for _ in tasks] if merger.method == "sum" else None
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        n = stop - start
        base_c = flat_base[start:stop].to(compute)
        tasks_c = [t[start:stop].to(compute) for t in flat_tasks]
        mtv_c = mtv[start:stop]
        if taus is not None:  # mtv = (t0 - base) + (t1 - base) + ..., in task order, as sum_task_vectors
            for task_c, tau in zip(tasks_c, taus):
                torch.sub(task_c, base_c, out=tau[:n])
            mtv_c.copy_(taus[0][:n])
            for tau in taus[1:]:
                mtv_c.add_(tau[:n])
        else:
            mtv_c.copy_(merger.mtv(base_c, tasks_c))
        torch.add(base_c, mtv_c, out=plus[:n])
        for j, (task_c, lam, mask) in enumerate(zip(tasks_c, lambdas, masks)):
            # mask = |base - task| > lambda * |(base + mtv) - task|, as taskvec.tall_mask
            own_j = taus[j][:n].abs_() if taus is not None else torch.sub(base_c, task_c, out=own[:n]).abs_()
            torch.sub(plus[:n], task_c, out=others[:n]).abs_().mul_(lam)
            torch.gt(own_j, others[:n], out=mask[start:stop])
    return _finish_masks(_into(mtv, mtv_out).view(base.shape), [m.view(base.shape) for m in masks])


def _into(mtv: torch.Tensor, out):
    if out is None:
        return mtv
    out.copy_(mtv.reshape(-1))
    return out


def _summed_masks_cpu(base, tasks, lambdas, compute, mtv_out):
    """The sum merge's mtv and masks on a CPU, in numpy (taskvec.sum_and_masks_into): the inputs
    widened slice by slice into reused scratch, exactly (bfloat16 by shifting its bits, float16 by
    numpy's conversion), so the loop holds the GIL only for a few numpy calls per slice."""
    count, n_tasks = base.numel(), len(tasks)
    mtv = torch.empty(count, dtype=compute) if mtv_out is None else mtv_out.reshape(-1)
    dtype = np.float64 if compute == torch.float64 else np.float32
    masks = np.empty((n_tasks, count), dtype=bool)
    size = max(1, min(CPU_CHUNK, count))
    wide = np.empty((n_tasks + 1, size), dtype=dtype)  # base, then each task
    taus, others = np.empty((n_tasks, size), dtype=dtype), np.empty((n_tasks + 1, size), dtype=dtype)
    lams = np.array(lambdas, dtype=dtype).reshape(-1, 1)
    sources = [_widenable(t) for t in (base, *tasks)]
    mtv_np = mtv.numpy()
    with np.errstate(all="ignore"):  # NaN/Inf inputs are refused by the caller (pack_jobs), not warned about
        for start in range(0, count, size):
            stop = min(count, start + size)
            n = stop - start
            for row, (kind, source) in zip(wide, sources):
                _widen(kind, source[start:stop], row[:n])
            taskvec.sum_and_masks_into(wide[0, :n], wide[1:, :n], lams, mtv_np[start:stop], masks[:, start:stop],
                                       taus[:, :n], others[:, :n])
    packed = [np.packbits(m, bitorder="little") for m in masks]
    return mtv.view(base.shape), packed, [int(np.count_nonzero(m)) for m in masks]


def _widenable(tensor: torch.Tensor):
    """(how to widen, flat numpy view): bfloat16 as its uint16 bits, float16/32/64 as themselves."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return "bf16", flat.view(torch.int16).numpy().view(np.uint16)
    return "float", flat.numpy()


def _widen(kind, source, out):
    if kind == "bf16":  # a bfloat16 is the top half of the float32 of the same value
        np.left_shift(source, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = source


def _finish_masks(mtv, masks):
    """Bit-pack the masks where they are, then bring everything to the CPU with one wait."""
    if mtv.device.type == "cpu":
        packed = [pack_bits(m).numpy() for m in masks]
        return mtv, packed, [int(np.count_nonzero(m.numpy())) for m in masks]
    ones = torch.stack([m.sum() for m in masks]).to("cpu", non_blocking=True)
    packed = []
    for mask in masks:
        bits = pack_bits(mask)
        host = torch.empty(bits.shape, dtype=torch.uint8, pin_memory=True)
        packed.append(host.copy_(bits, non_blocking=True))
    mtv_host = torch.empty(mtv.shape, dtype=mtv.dtype, pin_memory=True).copy_(mtv, non_blocking=True)
    torch.cuda.current_stream(mtv.device).synchronize()
    return mtv_host, [p.numpy() for p in packed], ones.tolist()
