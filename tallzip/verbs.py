"""The top-level verbs, `tallzip.pack, open, extract, verify, info, merge, add, remove`: each a short
function over the package that does the work, documented here in one place (Args / Returns / Example).
`tallzip/__init__` imports this module on first use, so `import tallzip` itself loads no torch."""
from __future__ import annotations

from tallzip.archive.archive import Archive
from tallzip.archive.archive import open as _open_archive
from tallzip.edit import editing
from tallzip.merging import merge as merging
from tallzip.options import RunOptions, StoreOptions, from_keywords
from tallzip.packing import pack as packing
from tallzip.verification import info as info_module
from tallzip.verification import verify as verification


def pack(tasks, base, output, store: StoreOptions | None = None, run: RunOptions | None = None, *,
         force: bool = False, **deprecated) -> dict:
    """Pack a family of fine-tuned checkpoints into one archive.

    Args:
        tasks: a folder of task checkpoints (files, or folders of shards), or {task: path}.
        base: the pretrained checkpoint (file or folder).
        output: the archive to write (refused if it exists, unless force=True).
        store: what the archive stores, a StoreOptions (lambdas, keep, merge, density, mtv_dtype, codecs,
            level, base_ref, allow_nonfinite, chunk_elements); default StoreOptions().
        run: how it runs, a RunOptions (memory, workers, engine, address, device, progress); it never
            changes the archive's bytes.
        force: replace an archive at `output`.
        **deprecated: the same options as keyword arguments (lambdas=0.3, memory="4G"): still taken, with
            a DeprecationWarning, until the next release.
    Returns:
        The archive's manifest (a dict).
    Example:
        from tallzip.options import RunOptions, StoreOptions
        tallzip.pack("finetuned/", "base.safetensors", "family.tallz",
                     StoreOptions(keep={"*": "tall", "cars": "q8"}), RunOptions(memory="4G"))
    """
    store, run = from_keywords("pack", store, run, deprecated)
    return packing.pack(tasks, base, output, store, run, force=force)


def open(path, *, base=None, memory=None) -> Archive:  # noqa: A001 - mirrors the builtin on purpose
    """Open an archive for reading.

    Args:
        path: the archive (a path or a URL).
        base: the base checkpoint, for archives packed with base_ref=True.
        memory: the budget for chunks in flight (bytes, or '1.5G', '256M').
    Returns:
        An Archive: `.tasks`, `.load(task)`, `.extract(task, output)`, `.resident()`, the chunk API.
    Example:
        with tallzip.open("family.tallz") as archive:
            state = archive.load("cars", device="cpu")
    """
    return _open_archive(path, base=base, memory=memory)


def extract(archive, task, output, *, base=None, fmt=None, force: bool = False, run: RunOptions | None = None,
            **deprecated):
    """Rebuild one task (or every task, with task None) as checkpoint files.

    Args:
        archive: a path or an open Archive.
        task: the task's name; None writes every task into the folder `output`.
        output: a `.safetensors` / `.pt` file, or a folder (the task as it came: shards, side files).
        base: as for `open` (when `archive` is a path).
        fmt: the model files' format in a folder output ('safetensors' or 'pt'; default the input's).
        force: replace files of the same names as those written.
        run: a RunOptions: its memory (when `archive` is a path), device and progress apply; without it
            the rebuild runs on the CPU. **deprecated: memory, device, progress as keyword arguments.
    Returns:
        The ExtractReport: `.output`, `.paths`, `.files`, `.bytes`, `.seconds`, `.as_dict()`.
    Example:
        tallzip.extract("family.tallz", "cars", "cars.safetensors")
    """
    given = run is not None or "device" in deprecated
    _, run = from_keywords("extract", None, run, deprecated, store_fields=(), run_fields=("memory", "device", "progress"))
    device = {"device": run.device} if given else {}  # else Archive.extract's default, the CPU
    with _opened(archive, base, run.memory) as arc:
        return arc.extract(task, output, fmt=fmt, force=force, progress=run.progress, **device)


def verify(archive, against=None, *, base=None, run: RunOptions | None = None, **deprecated) -> dict:
    """Check every section's checksum and decoding; with `against`, whether the archive is that of
    these checkpoints (a verdict per task, "matches" or "differs").

    Args:
        archive: a path or an open Archive.
        against: a folder of the original task checkpoints, or None.
        base: as for `open`.
        run: a RunOptions: its memory (when `archive` is a path), workers and progress apply.
            **deprecated: memory, progress, workers as keyword arguments.
    Returns:
        The report (a dict): "verdict", "ok" and, with `against`, "tasks" with each task's verdict.
    Example:
        assert tallzip.verify("family.tallz", against="finetuned/")["verdict"] == "matches"
    """
    _, run = from_keywords("verify", None, run, deprecated, store_fields=(), run_fields=("memory", "progress", "workers"))
    with _opened(archive, base, run.memory) as arc:
        return verification.verify(arc, against, progress=run.progress, workers=run.workers)


def info(archive, *, base=None) -> dict:
    """What an archive holds, from its manifest alone (reads no section).

    Args:
        archive: a path or an open Archive.
        base: as for `open`.
    Returns:
        A dict: tasks (representation, lambda, bytes), sizes per section role, the mtv's dtype, codecs,
        whether it is lossless.
    Example:
        print(tallzip.info("family.tallz")["tasks"])
    """
    with _opened(archive, base, None) as arc:
        return info_module.summary(arc)


def merge(source, *, method: str, base=None, alpha=None, k=None, lambdas=None, density=None,
          allow_nonfinite: bool = False, run: RunOptions | None = None, **deprecated):
    """Merge a family into one model (task-arithmetic, ties, consensus-ta, consensus-ties, average).

    Args:
        source: a folder of task checkpoints (give base=) or an archive.
        method: the merge method (tallzip.merging.methods.METHODS).
        base: the base checkpoint (a folder source, or an archive packed with base_ref).
        alpha, k, lambdas, density, allow_nonfinite: as tallzip.merging.merge.merge documents them.
        run: a RunOptions: its device, progress and memory apply. **deprecated: them as keyword arguments.
    Returns:
        The merged state dict, {name: tensor} in the base's dtypes.
    Example:
        state = tallzip.merge("family.tallz", method="consensus-ta", k=2)
    """
    _, run = from_keywords("merge", None, run, deprecated, store_fields=(), run_fields=merging.MERGE_RUN_FIELDS)
    return merging.merge(source, method=method, base=base, alpha=alpha, k=k, lambdas=lambdas, density=density,
                         allow_nonfinite=allow_nonfinite, run=run)


def add(archive, checkpoint, task: str, **options) -> dict:
    """Add a checkpoint to an archive as a new task; the other tasks' sections are copied byte for byte.

    Args:
        archive: the archive's path (rewritten beside itself, renamed over the old one when complete).
        checkpoint: the task's checkpoint (file or folder).
        task: its name in the archive.
        **options: keep (q8, q4, q3, q2, q1, lowrank, exact; default q2), base, progress, lowrank (LowRankOptions:
            how a lowrank task is kept).
    Returns:
        The new manifest (a dict).
    Example:
        tallzip.add("family.tallz", "new_task.safetensors", "dogs", keep="q4")
    """
    return editing.add(archive, checkpoint, task, **options)


def remove(archive, task: str, *, base=None) -> dict:
    """Remove a task from an archive; the others' sections are copied byte for byte.

    Args:
        archive: the archive's path.
        task: the task to remove (not the only one).
        base: as for `open`.
    Returns:
        The new manifest (a dict).
    Example:
        tallzip.remove("family.tallz", "dogs")
    """
    return editing.remove(archive, task, base=base)


class _Borrowed:
    """An Archive the caller opened: used as a context manager without closing it."""

    def __init__(self, archive):
        self.archive = archive

    def __enter__(self):
        return self.archive

    def __exit__(self, *exc):
        return False


def _opened(archive, base, memory):
    return _Borrowed(archive) if isinstance(archive, Archive) else _open_archive(archive, base=base, memory=memory)
