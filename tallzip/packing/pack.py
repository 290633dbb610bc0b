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

import torch

from tallzip.version import __version__
from tallzip.ops import quality
from tallzip.errors import TallzipError
from tallzip.family import Family, base_digest
from tallzip.run.chunks import checked_chunk_elements, chunk_plan, ordered_map, parse_memory
from tallzip.run.threads import available_cpus, resolve_device, single_torch_thread
from tallzip.formats.container.constants import (DTYPE_SIZES, FLOAT_DTYPES, FORMAT_VERSION, KIND_MASKED, KIND_PER_TASK,
                                                 KIND_SHARED, REPRESENTATION_LOWRANK, REPRESENTATION_TALL, ROLE_BASE, ROLE_FILE, ROLE_MASK, ROLE_MTV)
from tallzip.formats.container.reader import is_plain_file_name
from tallzip.formats.container.writer import ArchiveWriter
from tallzip.formats.checkpoints.outputs import refuse_inputs_as_output
from tallzip.ops.representations import (REPRESENTATION_ROLES, representation_section,
                                         task_representations)
from tallzip.ops.ties import MtvMerger
from tallzip.options import RunOptions, StoreOptions
from tallzip.packing.jobs import ChunkJob, PackSettings, dtype_of, job_cost, run_job
from tallzip.packing.manifest import task_entry
from tallzip.packing.lowrank_pack import write_lowrank_tasks
from tallzip.packing.lambdas import LambdaSelector, selected_lambdas, task_lambdas
from tallzip.packing.auto import AUTO, AUTO_CANDIDATES, auto_choice, candidate_estimates
from tallzip.packing.selection import RepresentationSelector, choose as choose_representations

MASK_RULE = "mask = |base - task| > lambda * |(base + mtv) - task|, float32"


def pack(tasks, base, output, store: StoreOptions | None = None, run: RunOptions | None = None, *,
         force: bool = False) -> dict:
    """Pack a family into one archive at `output`; returns its manifest.

    tasks: folder of checkpoints, or {task: path}. store: what the archive stores (StoreOptions: lambdas,
    keep (tall, q8..q2, lowrank, exact, {task: rep}, 'auto': each task's smallest representation whose data-free
    estimate is good, or select_representation(evaluate, tolerance)), merge, density, mtv_dtype, codecs, level, base_ref, allow_nonfinite, chunk_elements); masks
    always come from the full-precision mtv. run: how (RunOptions: memory, workers, engine, address,
    device, progress); neither the budget nor the workers change the archive's bytes. force: replace an
    archive at `output`.
    engine 'ray' runs the chunk jobs as Ray tasks: each reads its own byte ranges of the inputs, so every
    worker must see the same paths; the archive is byte-identical to the local one. The TIES
    thresholds (one reduction per task over the whole model) are still computed here, first.
    """
    store = StoreOptions() if store is None else store
    run = RunOptions() if run is None else run
    lambdas, keep, merge, density = store.lambdas, store.keep, store.merge, store.density
    mtv_dtype, codecs, level, base_ref = store.mtv_dtype, store.codecs, store.level, store.base_ref
    allow_nonfinite = store.allow_nonfinite
    device, progress, workers, engine, address = run.device, run.progress, run.workers, run.engine, run.address
    budget = parse_memory(run.memory)
    chunk_elements = checked_chunk_elements(store.chunk_elements)
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
    lam = task_lambdas(lambdas, task_names)
    unknown = sorted(set(dict(store.lowrank.task_energy)) - set(task_names))
    if unknown:
        raise TallzipError(f"lowrank task_energy names unknown task {unknown[0]!r}; tasks: {', '.join(task_names)}")
    selector = keep if isinstance(keep, RepresentationSelector) else None
    auto = isinstance(keep, str) and keep == AUTO
    if selector is None and not auto:
        reps = task_representations(keep, task_names)  # refuses a bad --keep before any computing
    merger = MtvMerger(family, merge, density, device, progress)
    if lam is None:
        lam = selected_lambdas(family, merger, lambdas, device, progress)
    if selector is not None:  # after the mtv's method and the lambdas: the tall candidate is rebuilt from them
        selector.lowrank = store.lowrank  # a lowrank candidate is scored as it will be stored
        keep = choose_representations(family, selector, chunk_elements, progress, tall=(merger, lam, mtv_dtype))
        reps = task_representations(keep, task_names)
    if auto:  # from the weights alone: one extra pass estimating every candidate
        estimates = candidate_estimates(family, merger, lam, mtv_dtype, chunk_elements, device, progress=progress)
        reps = auto_choice(estimates)
    settings = PackSettings(tuple(task_names), tuple(lam[t] for t in task_names), merger, mtv_dtype, codecs, level,
                            device, allow_nonfinite, base_ref, tuple(reps[t] for t in task_names), store.estimate_every)

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
    with ArchiveWriter(output, force=force, chunk_elements=chunk_elements, inputs=family.local_files()) as writer, single_torch_thread(device):
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
            return run_job(job, family, settings)

        identical: dict[str, bool] = {}
        sums = {t: quality.zero_sums() for t in task_names}  # the rebuild's estimate, summed chunk by chunk
        done = 0
        if engine is None:
            results = ordered_map(work, jobs, cost=lambda job: job.cost, budget=budget, workers=workers)
        else:
            results = _engine_results(engine, own_engine, jobs, family, settings, budget)
        for result in results:
            job = result.job
            for role, task, (data, params, digest), ones in result.pieces:
                writer.write_chunk(entry_for(role, job, task, result.mtv_dtype), data, params, digest, ones)
            for task, task_sums in result.quality.items():
                sums[task] += task_sums
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

        rebuilt = [n for n in family.base.names if tensors_table[n]["kind"] == KIND_MASKED]
        coded = write_lowrank_tasks(writer, {t: rebuilt for t in task_names if reps[t] == REPRESENTATION_LOWRANK},
                                    lambda t, n: (family.base.get(n), family.tasks[t].get(n)), store.lowrank, level,
                                    chunk_elements, budget=budget, workers=workers, progress=progress,
                                    sizes={n: math.prod(family.base.shapes[n]) for n in rebuilt})
        for t, (_, task_sums) in coded.items():  # lowrank tasks: coded whole, after the chunks (lowrank_pack.py)
            sums[t] += task_sums
        # tall tasks' sums are sampled (jobs.py): the estimate records what it was computed on
        sample = quality.sample_record(store.estimate_every, [math.prod(family.base.shapes[n]) for n in family.base.names
                                                              if kinds[n] == KIND_MASKED])
        task_entries = [task_entry(t, family.tasks[t], reps[t], lam[t],
                                   quality.estimate(sums[t], sample if reps[t] == REPRESENTATION_TALL else None),
                                   coded[t][0] if t in coded else None) for t in task_names]
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
        if auto:
            manifest["representation_choice"] = {"method": AUTO, "min_cosine": quality.POOR_COSINE,
                                                 "candidates": list(AUTO_CANDIDATES), "estimates": estimates}
        if isinstance(lambdas, LambdaSelector):
            manifest["lambda_scores"] = {t: {str(k): v for k, v in s.items()} for t, s in lambdas.scores.items()}
        return writer.finish(manifest)


def _pack_engine(engine, address, workers):
    """None for the threads of this process (the default route); else the Engine to run chunk jobs on."""
    from tallzip.run.engines import Engine, make_engine
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
    from tallzip.formats.checkpoints.checkpoint import TorchCheckpoint
    if engine_name != "local":
        for label, ckpt in [("base", family.base), *family.tasks.items()]:
            if isinstance(ckpt, TorchCheckpoint):  # its lazy reader holds a lock and an open zip: not sent
                raise TallzipError(f"--engine {engine_name}: {label} {ckpt.path.name} is a torch pickle; chunk jobs "
                                   f"elsewhere read safetensors only (convert it, or use --engine local)")


def _engine_results(engine, own_engine, jobs, family, settings, budget):
    """The chunk jobs' results, in order, from `engine`: (family, settings) are shared once (Ray's object
    store), each job carries only its tensor name and element range. An engine made here closes after."""
    from tallzip.run.engines import Job
    from tallzip.packing.jobs import run_shared_job
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


# --- the masked tensors: mtv, masks and bit-packing, streamed --------------------------------------

