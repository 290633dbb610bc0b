"""`merge`: one merged model from a family — task arithmetic, TIES, Consensus Merging, or the plain average
(each method's math and the registry: methods.py; here the reading, chunking and writing).

    tallzip.merge("finetuned/", base="base.safetensors", method="consensus-ta", k=2)  # -> state dict
    tallzip.merge("family.tallz", method="consensus-ta")                               # no checkpoint needed

From a folder of checkpoints every method is exact. From an archive only the methods built on the
archive's own mtv are possible: the archive holds the base, the pack-time mtv and every task's TALL mask,
which is all that task arithmetic and Consensus Merging need, but not the individual task vectors that
TIES and the average need.

The merge works chunk by chunk (one chunk of every task at a time, chunk jobs on a thread pool within
the memory budget, chunks.ordered_map), so its memory is the budget whatever the number of tasks and
the size of a tensor; a safetensors output is written as the chunks come. TIES first finds each task's
trim threshold over its WHOLE task vector, exactly, by histograms read chunk by chunk (ops/ties.MtvMerger).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tallzip.ops import taskvec
from tallzip.archive.archive import Archive
from tallzip.run.chunks import chunk_plan, ordered_map, parse_memory, workers_within
from tallzip.errors import TallzipError
from tallzip.family import Family
from tallzip.formats.checkpoints.folders import CHECKPOINT_EXTS, HF_MODEL_FILES, SAFETENSORS_EXT, TORCH_EXTS, shard_index
from tallzip.formats.container.constants import (DEFAULT_CHUNK_ELEMENTS, DTYPE_SIZES, FLOAT_DTYPES, KIND_MASKED, KIND_PER_TASK, KIND_SHARED, ROLE_MTV)
from tallzip.formats.checkpoints.outputs import SafetensorsStream, atomic_output, save_tensors, write_shard_index
from tallzip.formats.tensors import torch_dtype
from tallzip.ops.ties import MtvMerger
from tallzip.packing.lambdas import LambdaSelector, task_lambdas
from tallzip.merging.methods import METHODS, archive_methods
from tallzip.options import RunOptions, from_keywords
from tallzip.run.threads import resolve_device

CONSENSUS_METHODS = tuple(name for name, m in METHODS.items() if m.consensus)
TIES_METHODS = tuple(name for name, m in METHODS.items() if m.trims)
# Without a validation set to pick alpha on: 0.3 for the methods that add up whole task vectors (task
# arithmetic's usual range for about 8 tasks, and consensus-ties adds by disjoint SUM); 1.0 for TIES,
# whose disjoint mean is already on the scale of one task vector (the TIES paper's no-validation
# setting), and for the average, where alpha 1 gives exactly the mean of the fine-tuned weights.
DEFAULT_ALPHA = {name: m.default_alpha for name, m in METHODS.items()}
DEFAULT_K = 2
MAX_ALPHA = 2.0
# The mtv an archive was packed with (its manifest's `merge`) decides which methods it can serve.
ARCHIVE_METHODS = {packed: archive_methods(packed) for packed in ("sum", "ties")}


@dataclass
class MergeReport:
    """What a merge did: its settings, which tensors it merged, kept from the base, or left out."""
    method: str
    alpha: float
    source: str
    source_kind: str                     # "folder" or "archive"
    tasks: list
    k: int | None = None
    density: float | None = None
    lambdas: dict | None = None
    merged: list = field(default_factory=list)      # base tensors merged
    kept_base: list = field(default_factory=list)   # base tensors not mergeable (integer buffers...): the base's
    task_only: list = field(default_factory=list)   # tensors only tasks have (heads): not in the output
    consensus_kept: int = 0              # consensus: weights with count >= k ...
    consensus_total: int = 0             # ... out of all merged weights
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # settings that made the merge (nearly) a no-op
    changed_weights: int = 0             # weights of the output that are not the base's
    output: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Options:
    method: str
    alpha: float
    k: int | None
    density: float | None
    lambdas: object
    allow_nonfinite: bool = False


def _options(method, alpha, k, density, lambdas, allow_nonfinite=False) -> _Options:
    if method not in METHODS:
        raise TallzipError(f"unknown merge method {method!r} (expected one of {', '.join(METHODS)})")
    alpha = DEFAULT_ALPHA[method] if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= MAX_ALPHA:
        raise TallzipError(f"alpha must be a number in (0, {MAX_ALPHA:g}], got {alpha!r}")
    if method in CONSENSUS_METHODS:
        k = DEFAULT_K if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise TallzipError(f"k must be a whole number >= 0 (tasks that must use a weight), got {k!r}")
    else:
        if k is not None:
            raise TallzipError(f"k applies only to {' and '.join(CONSENSUS_METHODS)}, not {method}")
        if lambdas is not None:
            raise TallzipError(f"lambda (of the TALL masks) applies only to {' and '.join(CONSENSUS_METHODS)}, "
                               f"not {method}")
    if method in TIES_METHODS:
        if density is not None and not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise TallzipError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise TallzipError(f"density applies only to {' and '.join(TIES_METHODS)}, not {method}")
    if isinstance(lambdas, LambdaSelector):
        raise TallzipError("merge takes fixed lambdas (one number or {task: number}), not a lambda selector")
    return _Options(method, float(alpha), k, density, lambdas, bool(allow_nonfinite))


MERGE_RUN_FIELDS = ("device", "progress", "memory")  # of RunOptions, the ones a merge uses


def merge(source, *, method: str, base=None, alpha: float | None = None, k: int | None = None,
          lambdas=None, density: float | None = None, allow_nonfinite: bool = False, run: RunOptions | None = None,
          **deprecated) -> "OrderedDict[str, torch.Tensor]":
    """The merged model's state dict (CPU tensors, the base's names, order and dtypes).

    source: a folder of fine-tuned checkpoints (or {task: path}) with `base`, or an archive path / Archive.
    method: one of METHODS (the registry, merging/methods.py): task-arithmetic (base + alpha * sum tau),
    ties (top-`density` trim over each whole task vector, elected sign, disjoint mean), consensus-ta /
    consensus-ties (base + alpha * [count >= k] * mtv, count = how many tasks' TALL masks use a weight;
    mtv = sum, or TIES with disjoint sum), or average (base + alpha * mean tau; alpha 1 is the mean of the
    fine-tuned weights).
    alpha: in (0, 2]; default DEFAULT_ALPHA[method]. k: consensus only, default 2. lambdas: the TALL
    masks' lambda when merging from a folder (one number or {task: number}, '*' for the rest; default
    0.4); an archive uses the lambdas it was packed with. density: TIES share kept, default 0.2.
    k above the number of tasks is an error; settings that leave the base unchanged give a warning.
    Inputs holding NaN or Inf (and outputs that overflow their dtype) are refused, naming the task and
    tensor, unless allow_nonfinite. run: a RunOptions; its device, progress and memory apply (memory: the
    budget for chunks worked on at once; the state dict returned holds the model's size on top of it).
    **deprecated: device, progress, memory as keyword arguments (go in the next release).
    """
    _, run = from_keywords("merge", None, run, deprecated, store_fields=(), run_fields=MERGE_RUN_FIELDS)
    state, report = merge_with_report(source, method=method, base=base, alpha=alpha, k=k, lambdas=lambdas,
                                      density=density, allow_nonfinite=allow_nonfinite, run=run)
    for message in report.warnings:
        warnings.warn(message, stacklevel=2)
    return state


def merge_with_report(source, *, method: str, base=None, alpha=None, k=None, lambdas=None, density=None,
                      allow_nonfinite=False, run: RunOptions | None = None,
                      **deprecated) -> tuple["OrderedDict[str, torch.Tensor]", MergeReport]:
    """`merge`, also returning the MergeReport: settings, which tensors were merged, kept or left out,
    and warnings (not issued: the caller shows them)."""
    _, run = from_keywords("merge_with_report", None, run, deprecated, store_fields=(), run_fields=MERGE_RUN_FIELDS)
    options = _options(method, alpha, k, density, lambdas, allow_nonfinite)
    with _merge_run(source, options, base, run) as merge_run:
        state = _assembled(merge_run)
    return state, merge_run.report


def merge_to_file(source, output, *, method: str, base=None, alpha=None, k=None, lambdas=None, density=None,
                  force: bool = False, allow_nonfinite: bool = False, run: RunOptions | None = None,
                  **deprecated) -> MergeReport:
    """Merge and write the model to `output`: safetensors, a torch state dict for .pt/.pth/.bin, or for any
    other name a folder in the base's layout (_write_folder). No input file is ever the output.

    The output keeps the base's tensor names, order, dtypes and (safetensors) metadata. A safetensors
    output is written chunk by chunk as the merge goes (memory: the budget); a torch output is one
    pickle that torch.save writes from a whole state dict, so it needs the model's size in memory too.
    run: as for `merge` (device, progress, memory; **deprecated: them as keyword arguments).
    """
    _, run = from_keywords("merge_to_file", None, run, deprecated, store_fields=(), run_fields=MERGE_RUN_FIELDS)
    output = Path(output)
    fmt = _output_format(output)
    if fmt != "folder" and output.exists() and not force:  # fail before the work, not after it
        raise TallzipError(f"{output}: already exists (use --force to overwrite)")
    options = _options(method, alpha, k, density, lambdas, allow_nonfinite)
    with _merge_run(source, options, base, run) as merge_run:
        if fmt == "folder":
            _write_folder(merge_run, output, force)
            merge_run.report.output = str(output)
            return merge_run.report
        with atomic_output(output, force=force, inputs=merge_run.inputs) as tmp:
            if fmt == "safetensors":
                with SafetensorsStream(tmp, merge_run.specs, merge_run.metadata) as stream:
                    for name, start, flat in merge_run.chunks:
                        stream.write_part(name, start, flat)
            else:
                save_tensors(_assembled(merge_run), tmp, fmt)
    merge_run.report.output = str(output)
    return merge_run.report


def _output_format(output: Path) -> str:
    """safetensors or pt by the extension; any other name is a folder in the base's layout."""
    if output.suffix == ".safetensors":
        return "safetensors"
    if output.suffix in TORCH_EXTS:
        return "pt"
    return "folder"


def _write_folder(run: "_MergeRun", output: Path, force: bool):
    """The merged model as a Hugging Face-style folder in the base's layout: its shards (and their index)
    or its one safetensors file, and a copy of the base's side files (config.json, tokenizer, ...), so
    that from_pretrained(output) loads it. An existing folder takes the files written, as for extract."""
    base = run.base
    names = [name for name, _, _ in run.specs]
    if base is not None and base.sharding:
        shards = {f: [n for n in shard if n in set(names)] for f, shard in base.sharding["files"].items()}
    else:
        own = base is not None and base.path.name in HF_MODEL_FILES and base.path.suffix == SAFETENSORS_EXT
        shards = {base.path.name if own else "model" + SAFETENSORS_EXT: names}
    side = dict(base.extra_files) if base is not None else {}
    index = shard_index(base.sharding) if base is not None else None
    files = [*shards, *(f for f in side if f not in shards), *([index] if index and index not in side else [])]
    specs = {name: (name, dtype, shape) for name, dtype, shape in run.specs}
    with atomic_output(output, force=force, folder=True, files=files, inputs=run.inputs) as tmp:
        with contextlib.ExitStack() as streams:  # each shard complete, or every one aborted
            owner = {}
            for f, part in shards.items():
                stream = streams.enter_context(SafetensorsStream(tmp / f, [specs[n] for n in part], run.metadata))
                owner.update((n, stream) for n in part)
            for name, start, flat in run.chunks:
                owner[name].write_part(name, start, flat)
        for fname, path in side.items():  # the base's index among them: its very bytes
            (tmp / fname).write_bytes(path.read_bytes())
        if index and index not in side:
            write_shard_index(tmp, base.sharding)


@dataclass
class _MergeRun:
    """A merge laid out: the output's (name, dtype, shape) specs and metadata, the report (filled as
    `chunks` is consumed), and `chunks`: (name, start, flat merged chunk) in the output's order."""
    specs: list
    metadata: dict | None
    report: MergeReport
    chunks: object
    inputs: list = field(default_factory=list)  # the files read: never an output
    base: object = None  # the base Checkpoint, when at hand: its layout and side files for a folder output


def _assembled(run: _MergeRun) -> "OrderedDict[str, torch.Tensor]":
    """The merged state dict, each tensor filled in place from its chunks."""
    state = OrderedDict((name, torch.empty(shape, dtype=torch_dtype(dtype))) for name, dtype, shape in run.specs)
    for name, start, flat in run.chunks:
        state[name].reshape(-1)[start:start + flat.numel()] = flat
    return state


@contextmanager
def _merge_run(source, options: _Options, base, run: RunOptions):
    device, progress, memory = resolve_device(run.device), run.progress, run.memory
    if isinstance(source, Archive):
        yield _from_archive(source, options, device, progress, memory)
        return
    if isinstance(source, dict) or Path(source).is_dir():
        family = Family.open(source, base)
        yield _from_family(family, str(source), options, device, progress, parse_memory(memory))
        return
    if not Path(source).exists():
        raise TallzipError(f"{source}: no such folder or archive")
    if Path(source).suffix in CHECKPOINT_EXTS:
        raise TallzipError(f"{source}: is one checkpoint; merge takes a folder of fine-tuned checkpoints "
                           f"(with --base) or a tallzip archive")
    with Archive(source, base=base, memory=memory) as archive:
        yield _from_archive(archive, options, device, progress, None)


def _streamed(items, job, cost, budget, report: MergeReport, sizes: dict, progress):
    """Run the chunk jobs within the budget; each yields (name, start, flat, (kept, total, changed)),
    whose counts go into the report in order. Yields (name, start, flat)."""
    done = 0
    workers = workers_within(budget, max(map(cost, items), default=1))
    for name, start, flat, (kept, total, changed) in ordered_map(job, items, cost=cost, budget=budget,
                                                                   workers=workers):
        report.consensus_kept += kept
        report.consensus_total += total
        report.changed_weights += changed
        yield name, start, flat
        if progress and start + flat.numel() == sizes[name]:
            done += 1
            progress("merging", done, len(sizes))
    _warn_if_no_op(report)


# --- from the checkpoints ------------------------------------------------------------------------

def _from_family(family: Family, source: str, opt: _Options, device, progress, budget: int) -> _MergeRun:
    method = opt.method
    report = MergeReport(method, opt.alpha, source, "folder", family.names, k=opt.k)
    merger = None
    rule = METHODS[method]
    if rule.trims:
        density = taskvec.DEFAULT_TIES_DENSITY if opt.density is None else opt.density
        report.density = density
        merger = MtvMerger(family, "ties", density, device, progress)  # whole-vector thresholds, chunk by chunk
    elif rule.mtv is not None:
        merger = MtvMerger(family, rule.mtv, taskvec.DEFAULT_TIES_DENSITY, device, progress)
    lambdas = None
    if rule.consensus:
        report.lambdas = task_lambdas(taskvec.DEFAULT_LAMBDA if opt.lambdas is None else opt.lambdas, family.names)
        lambdas = [report.lambdas[task] for task in family.names]
    report.task_only = sorted({n for t in family.names for n in family.own_names(t)})
    _check_k(opt, len(family.names))

    names = family.base.names
    mergeable = {n: family.is_mergeable(n) for n in names}
    for name in names:
        (report.merged if mergeable[name] else report.kept_base).append(name)
    labels = ["the base"] + [f"task {t!r}" for t in family.names]
    tasks = list(family.tasks.values())
    items = [(name, start, count) for name in names
             for start, count in chunk_plan(family.base.shapes[name], DEFAULT_CHUNK_ELEMENTS)]

    def job(item):
        name, start, count = item
        base_t = family.base.read_range(name, start, count)
        if not mergeable[name]:
            return name, start, base_t, (0, 0, 0)
        task_ts = [ckpt.read_range(name, start, count) for ckpt in tasks]
        if not opt.allow_nonfinite:
            taskvec.refuse_nonfinite(name, [base_t, *task_ts], labels, "merge")
        base_d, tasks_d = base_t.to(device), [t.to(device) for t in task_ts]
        del task_ts
        vector, kept, total = rule.from_tasks(base_d, tasks_d, merger, lambdas, opt.k)
        merged, changed = _merged(base_d, vector, name, opt)
        return name, start, merged, (kept, total, changed)

    def cost(item):  # the base and every task's chunk as read, in float32, and the masks
        itemsize = DTYPE_SIZES.get(family.base.dtypes[item[0]], 4)
        return max(item[2], 1) * ((len(tasks) + 2) * (itemsize + 4) + len(tasks) + 16) + (1 << 20)

    sizes = {n: math.prod(family.base.shapes[n]) for n in names}
    specs = [(n, family.base.dtypes[n], tuple(family.base.shapes[n])) for n in names]
    chunks = _streamed(items, job, cost, budget, report, sizes, progress)
    return _MergeRun(specs, family.base.metadata, report, chunks, family.local_files(), family.base)


# --- from an archive -----------------------------------------------------------------------------

def _from_archive(archive: Archive, opt: _Options, device, progress, memory) -> _MergeRun:
    method = opt.method
    packed = archive.merge_info.get("method")
    supported = ARCHIVE_METHODS.get(packed, ())
    if method not in supported:
        if METHODS[method].archive_mtv is None:  # works on the task vectors themselves
            why = (f"{method} needs each task's own task vector, which an archive does not keep "
                   f"(merge from the checkpoints folder with --base)")
        else:
            other = "--merge ties" if METHODS[method].archive_mtv == "ties" else "--merge sum (the default)"
            why = f"{method} needs an archive packed with {other}, or the checkpoints folder with --base"
        can = ", ".join(supported) or "none of the merge methods"
        raise TallzipError(f"{archive.path.name}: its mtv was merged by {packed!r}, so it supports {can}; {why}")
    if opt.lambdas is not None:
        raise TallzipError(f"{archive.path.name}: its masks were made with the lambdas it was packed with "
                           f"({_lambda_text(archive.lambdas)}); lambda applies only when merging from a folder")
    if method in TIES_METHODS:
        packed_density = archive.merge_info.get("density", taskvec.DEFAULT_TIES_DENSITY)
        if opt.density is not None and opt.density != packed_density:
            raise TallzipError(f"{archive.path.name}: its TIES mtv was trimmed at density {packed_density:g}, "
                               f"not {opt.density:g}; merge from the checkpoints folder for another density")
        density = packed_density
    else:
        density = None
    budget = archive.memory if memory is None else parse_memory(memory)

    tasks = archive.tasks
    others = [t for t in tasks if archive.representation(t) != "tall"]
    mtv_tasks = archive.merge_info.get("mtv_tasks")
    if others or (mtv_tasks is not None and list(mtv_tasks) != list(tasks)):
        raise TallzipError(f"{archive.path.name}: merging from an archive needs every task kept tall, packed together "
                           f"(its mtv and masks); {', '.join(others) or 'tasks were added or removed'}: merge from the "
                           "checkpoints folder with --base")
    report = MergeReport(method, opt.alpha, str(archive.path), "archive", tasks, k=opt.k, density=density,
                         lambdas=archive.lambdas if method in CONSENSUS_METHODS else None)
    names = archive.base_info["names"]
    report.task_only = sorted({n for t in tasks for n, _ in archive.task_entry(t)["tensors"]} - set(names))
    _check_k(opt, len(tasks))
    low_precision = set()
    items = []
    for name in names:
        info = archive.tensors[name]
        if info["kind"] == KIND_MASKED:
            report.merged.append(name)
            stored_dtype = archive.reader.section(ROLE_MTV, name)["dtype"]
            if stored_dtype not in ("F32", "F64"):
                low_precision.add(stored_dtype)
        elif info["kind"] == KIND_SHARED and info["dtype"] in FLOAT_DTYPES:
            report.merged.append(name)
        else:
            report.kept_base.append(name)
        if info["kind"] == KIND_PER_TASK:
            # not mergeable (not float in every checkpoint: integer buffers, small): the base's, whole
            items.append((name, None, 0, math.prod(info["shape"])))
        else:
            items += [(name, i, start, count) for i, (start, count) in enumerate(archive.plan(None, name))]
    if low_precision:
        report.notes.append(f"the archive stores the mtv as {'/'.join(sorted(low_precision))}: the merge adds that "
                            f"rounded mtv (merging from the checkpoints folder uses the exact one)")
    labels = [f"{archive.path.name}: the base", f"{archive.path.name} (packed with --allow-nonfinite): the mtv"]
    rule = METHODS[method]
    consensus = rule.consensus

    def job(item):
        name, index, start, count = item
        info = archive.tensors[name]
        if index is None:
            return name, start, archive.base_tensor(name).reshape(-1).clone(), (0, 0, 0)
        base_t = archive.base_chunk(name, index)
        if info["kind"] != KIND_MASKED:
            # 'shared' tensors are unchanged by every task, so every method gives back the base
            counted = consensus and info["dtype"] in FLOAT_DTYPES  # no task uses them: count 0, as from a folder
            kept = count if counted and opt.k == 0 else 0
            return name, start, base_t, (kept, count if counted else 0, 0)
        mtv, context = archive.mtv_chunk(name, index)
        if not opt.allow_nonfinite:
            taskvec.refuse_nonfinite(name, [base_t, mtv], labels, "merge")
        masks = [torch.from_numpy(np.unpackbits(archive.mask_chunk_bits(t, name, index, context), count=count,
                                                bitorder="little").view(bool)).to(device)
                 for t in tasks] if consensus else None
        vector, kept, total = rule.from_mtv(mtv.to(device), masks, opt.k)
        merged, changed = _merged(base_t.to(device), vector, name, opt)
        return name, start, merged, (kept, total, changed)

    def cost(item):  # base, mtv (stored and float32), the masks bit-packed and as bool, the merge's temporaries
        itemsize = DTYPE_SIZES.get(archive.tensors[item[0]]["dtype"], 4)
        return max(item[3], 1) * (2 * itemsize + 24 + len(tasks) * 2) + (1 << 20)

    sizes = {n: math.prod(archive.tensors[n]["shape"]) for n in names}
    specs = [(n, archive.tensors[n]["dtype"], tuple(archive.tensors[n]["shape"])) for n in names]
    chunks = _streamed(items, job, cost, budget, report, sizes, progress)
    return _MergeRun(specs, archive.base_info.get("metadata"), report, chunks, archive.local_files(),
                     archive.base_checkpoint)


# --- shared pieces -------------------------------------------------------------------------------

def _check_k(opt: _Options, n_tasks: int):
    """k above the number of tasks keeps no weight: the 'merge' would be the plain base."""
    if opt.k is not None and opt.k > n_tasks:
        raise TallzipError(f"k = {opt.k} is more than the {n_tasks} tasks: no weight can be used by {opt.k} "
                           f"tasks' masks, so the merge would give back the plain base (choose k from 0 to {n_tasks})")


def _merged(base: torch.Tensor, vector: torch.Tensor, name: str, opt: _Options) -> tuple[torch.Tensor, int]:
    """(base + alpha * vector in the base's dtype, the weights it changes), refused where it overflows
    that dtype (unless allowed)."""
    merged = taskvec.apply_vector(base, vector, opt.alpha)
    if not opt.allow_nonfinite and not taskvec.all_finite(merged):
        raise TallzipError(f"merged tensor {name!r}: base + {opt.alpha:g} x the merged vector overflows "
                           f"{str(base.dtype).replace('torch.', '')} (use --allow-nonfinite to write it anyway)")
    return merged.cpu(), int((merged != base).sum())


def _warn_if_no_op(report: MergeReport):
    if report.consensus_total and report.consensus_kept == 0:
        report.warnings.append(
            f"the consensus kept 0 of {report.consensus_total:,} weights (0.0%): no weight is used by the masks of "
            f"{report.k} of the {len(report.tasks)} tasks, so the merged model IS THE PLAIN BASE (lower --k)")
    elif report.merged and report.changed_weights == 0:
        kept = (f" (the consensus kept {report.consensus_kept:,} of {report.consensus_total:,} weights, "
                f"{report.consensus_kept / report.consensus_total:.1%})" if report.consensus_total else "")
        report.warnings.append(f"the merge changed no weight{kept}: the merged model IS THE PLAIN BASE")


def _lambda_text(lambdas: dict) -> str:
    values = sorted(set(lambdas.values()))
    return f"{values[0]:g}" if len(values) == 1 else ", ".join(f"{t}={v:g}" for t, v in lambdas.items())
