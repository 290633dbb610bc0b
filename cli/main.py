"""The `tallzip` command: parses arguments, shows progress, prints. The work is in the library."""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal
import sys
from pathlib import Path

import click

# Light imports only: torch and the library's working modules (~1.4 s) are imported inside the commands
# that use them, so `tallzip --help` and usage errors are quick, and a Ctrl-C during that import is the
# one-line "interrupted" of friendly_errors.
import tallzip
from tallzip import options as packing
from tallzip.options import RunOptions, StoreOptions
from tallzip.errors import TallzipError
from tallzip.formats.errors import FormatError

from tallzip.cli.params import (PATH_OR_URL, CodecChoice, base_for_folder_source, load_evaluate, parse_keep, parse_lowrank,
                                parse_lambdas)
from tallzip.cli.report import format_agreement, format_info, format_merge, format_verify, human_bytes, plot_agreement


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# The exit codes, one scheme for every command (shown in `tallzip --help` and the README).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_HELP = f"""Exit codes: {EXIT_OK} done (verify: every check passed); {EXIT_FAILED} refused or failed (bad or
damaged input, a target that exists, a verify verdict "differs"); {EXIT_USAGE} usage (unknown command or option,
missing or invalid argument); {EXIT_INTERRUPTED} interrupted. Errors are one line on stderr, starting with
"error: "."""


def _fail(message: str, code: int = EXIT_FAILED, as_json: bool = False):
    """One `error: ...` line on stderr and the exit code; with --json, also {"error", "exit_code"} on stdout."""
    message = re.sub(r"\s*\n\s*", " ", str(message).strip())  # one line, whatever the message held
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": code}))
    sys.exit(code)


def _asked_for_json(args) -> bool:
    """--json among the command line's options (before a `--`), for errors click raises before the command runs."""
    args = sys.argv[1:] if args is None else list(args)
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def _usage_error_line(exc: click.ClickException) -> str:
    """Click's usage errors on one line, in tallzip's style: the message, then where help is."""
    message = exc.format_message().strip()
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += ("" if message.endswith((".", "?", "!")) else ".") + f" Try '{ctx.command_path} --help'."
    return message


# click >= 8.2 raises this for a group called without a command; older clicks print the help themselves
_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


class TallzipGroup(click.Group):
    """The click group whose errors, click's own included, all come out as one `error: ...` line with
    the documented exit code (click alone prints a `Usage:` block and `Error: ...`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        as_json = _asked_for_json(args)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:  # bare `tallzip`: the help itself, as click shows it (exit 2)
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            _fail(_usage_error_line(exc), EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code, as_json)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", EXIT_INTERRUPTED, as_json)
        # `--help` and `--version` come back as their exit code; a command's return value is no code.
        sys.exit(result if isinstance(result, int) else EXIT_OK)


def friendly_errors(func):
    """One line and a non-zero exit for anything the user can fix; a traceback only with TALLZIP_DEBUG=1."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        fail = functools.partial(_fail, as_json=bool(kwargs.get("as_json")))
        try:
            return func(*args, **kwargs)
        except (TallzipError, FormatError) as exc:
            fail(str(exc))
        except click.ClickException:
            raise  # a usage error from a command's body: TallzipGroup prints it like click's own
        except OSError as exc:
            # A full disk (or quota, or file size limit) while writing: the library has already
            # removed its temporary file, and the target was never touched.
            cleaned = " (nothing was written there)" if exc.errno in _WRITE_ERRNOS else ""
            fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}{cleaned}")
        except MemoryError:
            fail("out of memory")
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: still one line, unless debugging
            if os.environ.get("TALLZIP_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (set TALLZIP_DEBUG=1 for a traceback)")
    return wrapper


class Progress:
    """Progress bars on a terminal; silent when stderr is not a TTY or output is JSON."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._bar, self._label, self._done = None, None, 0

    def __call__(self, label: str, done: int, total: int):
        if not self.enabled:
            return
        if label != self._label:
            self.close()
            self._bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self._bar.__enter__()
            self._label, self._done = label, 0
        self._bar.update(done - self._done)
        self._done = done
        if done >= total:
            self.close()

    def close(self):
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar, self._label = None, None


# The model code loads torch: imported when a command runs, not for `tallzip --help` or a usage error.
def summary(archive):
    from tallzip.verification.info import summary as archive_summary
    return archive_summary(archive)


def agreement(archive, progress=None):
    from tallzip.verification.info import agreement as task_agreement
    return task_agreement(archive, progress=progress)


def verify(archive, against=None, progress=None):
    from tallzip.verification.verify import verify as verify_archive
    return verify_archive(archive, against, progress=progress)


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, default=str))


DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
FORCE = click.option("--force", is_flag=True, help="overwrite the target if it exists")
AS_JSON = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
MEMORY = click.option("--memory", default="1.5G", show_default=True,
                      help="budget for the chunks worked on at once (e.g. 256M, 4G)")


@click.group("tallzip", cls=TallzipGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(tallzip.__version__, prog_name="tallzip")
def cli():
    """One archive for a family of fine-tuned checkpoints: base + multi-task vector + one bit mask per task."""


@cli.command()
@click.argument("checkpoints_dir", type=PATH_OR_URL)
@click.option("--base", type=PATH_OR_URL, required=True, help="the pretrained checkpoint (file or folder)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="archive to write")
@click.option("--lambda", "lambdas", multiple=True, metavar="[TASK=]L", help="mask lambda, for all or one task (default 0.4)")
@click.option("--keep", "keep", multiple=True, metavar="[TASK=]REP",
              help="how tasks are kept: REP for all, TASK=REP for one (TASK=exact, say); REP is tall (default; "
                   "base + mask * mtv), q8, q4, q3, q2, q1 (the task's own vector quantized; q1: signs), lowrank (its matrices' quantized "
                   "top singular triplets, ~1-1.5 bits/weight) or exact (lossless); "
                   "auto: per task the smallest whose data-free estimate is good (no data needed)")
@click.option("--keep-by", "keep_by", metavar="MODULE:FUNCTION",
              help="MODULE:FUNCTION (or path/file.py:FUNCTION): choose each task's representation by evaluation, "
                   "FUNCTION(task_name, state_dict) -> score "
                   "(higher is better), the smallest within --keep-tolerance of the fine-tuned model's")
@click.option("--keep-tolerance", type=click.FloatRange(0, 1, max_open=True), default=0.005, show_default=True,
              help="--keep-by: how far below the fine-tuned score (a share of it) a representation may be")
@click.option("--merge", type=click.Choice(packing.MERGE_METHODS), default="sum", show_default=True)
@click.option("--density", type=float, default=0.2, show_default=True, help="TIES: share of each task vector kept")
@click.option("--mtv-dtype", type=click.Choice(packing.MTV_DTYPES), default=packing.DEFAULT_MTV_DTYPE, show_default=True,
              help="precision of the stored mtv; float32 is lossless (bfloat16 cost no accuracy in benchmarks/)")
@click.option("--float-codec", type=CodecChoice(packing.FLOAT_CODECS, "floats", "--mask-codec"),
              default=packing.DEFAULT_CODECS["float"], show_default=True,
              help="codec of the base, the mtv and a task's own float tensors (planes+ans: smallest, slower)")
@click.option("--mask-codec", type=CodecChoice(packing.MASK_CODECS, "masks", "--float-codec"),
              default=packing.DEFAULT_CODECS["mask"], show_default=True,
              help="codec of the masks (bits-ctx: entropy-coded with the mtv as context)")
@click.option("--base-ref", is_flag=True, help="store only the base's hash; extract then needs --base")
@click.option("--level", type=click.IntRange(1, 22), default=packing.DEFAULT_LEVEL, show_default=True, help="zstandard level")
@click.option("--allow-nonfinite", is_flag=True, help="pack tensors holding NaN or Inf")
@click.option("--chunk-elements", type=int, default=None,
              help="elements per chunk the archive is cut into (default 4194304 = 2^22)")
@click.option("--lowrank-energy", "lowrank_energy", multiple=True, metavar="[TASK=]E",
              help="lowrank tasks: share of each matrix's ||tau||^2 its rank keeps, for all or one task (default 0.95)")
@click.option("--lowrank-quant", "lowrank_quant", multiple=True, metavar="PATTERN=BITS",
              help="lowrank tasks: tensors PATTERN matches (fnmatch) kept q{BITS} (2, 3, 4, 8), e.g. conv1.weight=3")
@MEMORY
@DEVICE
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="where the chunk jobs run: threads here, or Ray tasks (pip install 'tallzip[ray]')")
@click.option("--address", default=None,
              help="--engine ray: auto (the cluster of `ray start`) or ray://HOST:PORT; default a local cluster")
@FORCE
@AS_JSON
@friendly_errors
def pack(checkpoints_dir, base, output, lambdas, keep, keep_by, keep_tolerance, merge, density, mtv_dtype, float_codec, mask_codec, base_ref, level,
         allow_nonfinite, chunk_elements, lowrank_energy, lowrank_quant, memory, device, engine, address, force, as_json):
    """Pack the fine-tuned checkpoints in CHECKPOINTS_DIR into one archive."""
    from tallzip.ops import quality
    if keep and keep_by:
        raise click.UsageError("give --keep or --keep-by, not both")
    chosen = parse_keep(keep)
    if keep_by:
        chosen = tallzip.select_representation(load_evaluate(keep_by), tolerance=keep_tolerance)
    progress = Progress(not as_json)
    try:
        store = StoreOptions(lambdas=parse_lambdas(lambdas), keep=chosen, merge=merge, density=density,
                             mtv_dtype=mtv_dtype, codecs={"float": float_codec, "mask": mask_codec}, level=level,
                             base_ref=base_ref, allow_nonfinite=allow_nonfinite, chunk_elements=chunk_elements,
                             lowrank=parse_lowrank(lowrank_energy, lowrank_quant))
        run = RunOptions(memory=memory, engine=engine, address=address, device=device, progress=progress)
        manifest = tallzip.pack(checkpoints_dir, base, output, store, run, force=force)
    finally:
        progress.close()
    warnings = [quality.warning_line(*poor) for poor in quality.poor_tasks(manifest["tasks"])]
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    with tallzip.open(output) as archive:
        info = summary(archive)
    if as_json:
        _echo_json({**info, "warnings": warnings})
    else:
        click.echo(f"wrote {output}: {human_bytes(info['archive_bytes'])}, {len(info['tasks'])} tasks, "
                   f"{info['ratio_vs_tasks']:.2f}x smaller than the {len(info['tasks'])} inputs")


@cli.command()
@click.argument("archive", type=PATH_OR_URL)
@click.option("--task", help="the task to rebuild")
@click.option("--all", "all_tasks", is_flag=True, help="rebuild every task into the folder -o")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="file (.safetensors, .pt, .pth, .bin) or folder (any other name) to write")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]),
              help="format of the model file(s) in a folder (default: the task's input format); "
                   "for a file -o the extension decides, and --format must agree")
@click.option("--base", type=PATH_OR_URL, help="the base, for archives packed with --base-ref")
@MEMORY
@DEVICE
@click.option("--force", is_flag=True,
              help="replace files of the same names as those written; nothing else in a folder is touched")
@click.option("--json", "as_json", is_flag=True, help="print what was written (paths, bytes, seconds) as JSON")
@friendly_errors
def extract(archive, task, all_tasks, output, fmt, base, memory, device, force, as_json):
    """Rebuild one task's model (base + mask * mtv) as a checkpoint, or every task into a folder.

    \b
    -o NAME.safetensors    one safetensors file of all the task's tensors
    -o NAME.pt|.pth|.bin   one torch state dict (torch.load(..., weights_only=True) reads it)
    -o FOLDER              any other name: the task as it came, its shards and
                           model.safetensors.index.json, its side files (config.json, a
                           release's head_X.pt) or its one checkpoint file under its input's name
    --all -o FOLDER        each task as it came: TASK.safetensors / TASK.pt, or a sub-folder TASK/

    Side files and sharding come back only in a folder; a file target gets every tensor in one
    unsharded file. An existing folder is a fine target: only the files written go into it, and
    one already there of the same name is an error unless --force, which replaces just those
    files. Nothing is in place until everything is written: a failure leaves the target as it was.
    """
    if bool(task) == bool(all_tasks):
        raise click.UsageError("give exactly one of --task NAME or --all")
    progress = Progress(not as_json)
    try:
        with tallzip.open(archive, base=base, memory=memory) as arc:
            if task:
                report = arc.extract(task, output, fmt=fmt, force=force, device=device, progress=progress)
            else:
                report = arc.extract(None, output, fmt=fmt, force=force, device=device, progress=progress)
    finally:
        progress.close()
    if as_json:
        _echo_json(report.as_dict())
    elif task:
        click.echo(f"wrote {report.output} ({human_bytes(report.bytes)}, {report.seconds:.1f} s)")
    else:
        click.echo(f"wrote {len(report.tasks)} tasks into {report.output} ({human_bytes(report.bytes)}, "
                   f"{report.seconds:.1f} s)")


@cli.command()
@click.argument("archive", type=PATH_OR_URL)
@click.option("--agreement", "show_agreement", is_flag=True,
              help="how many tasks use each weight (0..N), per layer kind and in total")
@click.option("--plot", type=click.Path(path_type=Path),
              help="draw the agreement histogram into this image (.png, .pdf, .svg; needs tallzip[plot])")
@AS_JSON
@friendly_errors
def info(archive, show_agreement, plot, as_json):
    """Tasks, lambdas, mask densities and the size of every section."""
    progress = Progress(not as_json)
    try:
        with tallzip.open(archive) as arc:
            data = summary(arc)
            if show_agreement or plot:
                data["agreement"] = agreement(arc, progress=progress)
    finally:
        progress.close()
    if plot:
        plot_agreement(data["agreement"], plot)
    if as_json:
        _echo_json(data)
        return
    click.echo(format_info(data))
    if "agreement" in data:
        click.echo("")
        click.echo(format_agreement(data["agreement"]))
    if plot:
        click.echo(f"\nwrote {plot}")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), callback=base_for_folder_source,
              help="the pretrained checkpoint  [required when SOURCE is a folder; for an archive only if "
                   "packed with --base-ref]")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="merged model to write: .safetensors, .pt/.pth/.bin (a torch state dict), or any other name for "
                   "a folder in the base's layout (its shards and index, its config.json and other side files)")
@click.option("--method", type=click.Choice(packing.MERGE_VERB_METHODS), required=True)
@click.option("--alpha", type=float, help="scaling of the merged vector, in (0, 2] (default 0.3; 1.0 for ties and average)")
@click.option("--k", type=int, help="consensus: keep the weights at least k tasks use (default 2)")
@click.option("--lambda", "lambdas", multiple=True, metavar="[TASK=]L",
              help="consensus from a folder: the masks' lambda, for all or one task (default 0.4)")
@click.option("--density", type=float, help="ties / consensus-ties: share of each task vector kept (default 0.2)")
@click.option("--allow-nonfinite", is_flag=True,
              help="merge even where an input holds NaN or Inf, or the result overflows its dtype (refused by default)")
@MEMORY
@DEVICE
@FORCE
@AS_JSON
@friendly_errors
def merge(source, base, output, method, alpha, k, lambdas, density, allow_nonfinite, memory, device, force, as_json):
    """Merge a family into one model: from a folder of checkpoints (with --base) or from an archive.

    \b
    task-arithmetic  base + alpha * sum of task vectors
    ties             TIES-merging: trim to top density, elect sign, disjoint mean
    consensus-ta     base + alpha * [tasks using a weight >= k] * sum of task vectors
    consensus-ties   the same over the TIES merge with a disjoint sum
    average          the mean of the fine-tuned weights (alpha 1)
    An archive holds no task vectors: it serves task-arithmetic and consensus-ta (packed with
    --merge sum) or consensus-ties (packed with --merge ties).
    k above the number of tasks is an error; settings that leave the base unchanged warn on stderr.
    """
    progress = Progress(not as_json)
    try:
        from tallzip.merging import merge as merging  # torch: loaded when the command runs
        report = merging.merge_to_file(source, output, method=method, base=base, alpha=alpha, k=k,
                                       lambdas=parse_lambdas(lambdas) if lambdas else None, density=density,
                                       force=force, allow_nonfinite=allow_nonfinite,
                                       run=RunOptions(memory=memory, device=device, progress=progress))
    finally:
        progress.close()
    for message in report.warnings:
        click.echo(f"warning: {message}", err=True)
    _echo_json(report.as_dict()) if as_json else click.echo(format_merge(report.as_dict()))


@cli.command(name="verify")
@click.argument("archive", type=PATH_OR_URL)
@click.option("--against", type=click.Path(path_type=Path), help="folder of the original task checkpoints")
@click.option("--base", type=click.Path(path_type=Path), help="the base, for archives packed with --base-ref")
@MEMORY
@AS_JSON
@friendly_errors
def verify_cmd(archive, against, base, memory, as_json):
    """Check every section's checksum and decoding; with --against, a verdict per task.

    \b
    A task "matches" when its checkpoint in the folder is the one packed: tensors kept as they were
    equal to the bit, and its masks what the TALL rule gives from it, within the stored mtv's rounding
    (none for a float32 mtv). When the folder holds every task, the mtv is recomputed from it and the
    stored one must be that mtv cast to the stored dtype, bit for bit.
    Exit 0: intact (and every task matches); 1: damaged, or some task differs.
    """
    progress = Progress(not as_json)
    try:
        with tallzip.open(archive, base=base, memory=memory) as arc:
            report = verify(arc, against, progress=progress)
    finally:
        progress.close()
    _echo_json(report) if as_json else click.echo(format_verify(report))
    if report.get("verdict") == "differs":
        sys.exit(1)


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--task", required=True, help="name of the new task")
@click.option("--keep", type=click.Choice(["q1", "q2", "q3", "q4", "q8", "lowrank", "exact", "tall"]), default="q2", show_default=True,
              help="how the new task is kept (tall is refused: the task is not in the stored mtv)")
@click.option("--base", type=click.Path(path_type=Path), help="the base, for archives packed with --base-ref")
@AS_JSON
@friendly_errors
def add(archive, checkpoint, task, keep, base, as_json):
    """Add CHECKPOINT to ARCHIVE as a new task; the other tasks' sections are copied byte for byte.

    The archive is rewritten beside itself and renamed over the old one when complete: an
    interruption leaves the old archive as it was.
    """
    from tallzip.edit.editing import add as add_task
    add_task(archive, checkpoint, task, keep=keep, base=base)
    with tallzip.open(archive) as arc:
        data = summary(arc)
    if as_json:
        _echo_json(data)
    else:
        row = data["tasks"][task]
        click.echo(f"added {task!r} to {archive} as {keep} ({row['bits_per_param']:.3f} bits/param); "
                   f"{len(data['tasks'])} tasks, {human_bytes(data['archive_bytes'])}")


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--task", required=True, help="the task to remove")
@AS_JSON
@friendly_errors
def remove(archive, task, as_json):
    """Remove a task from ARCHIVE; the other tasks' sections are copied byte for byte.

    The mtv stays as it is (the remaining tall tasks' masks were made against it) unless no tall
    task is left, when it goes. The archive is rewritten and renamed over the old one: the removed
    task's bytes are gone, nothing needs compacting.
    """
    from tallzip.edit.editing import remove as remove_task
    remove_task(archive, task)
    with tallzip.open(archive) as arc:
        data = summary(arc)
    if as_json:
        _echo_json(data)
    else:
        click.echo(f"removed {task!r} from {archive}: {len(data['tasks'])} tasks left, "
                   f"{human_bytes(data['archive_bytes'])}")


@cli.command()
@click.option("--folder", type=click.Path(path_type=Path), default=Path("demo"), show_default=True)
@click.option("--tasks", "n_tasks", type=click.IntRange(2, 64), default=8, show_default=True)
@click.option("--force", is_flag=True,
              help="write into a non-empty folder, replacing only the demo's own files there")
@friendly_errors
def demo(folder, n_tasks, force):
    """Generate a small family of checkpoints, pack it, extract one task, verify, print the size table.

    It writes FOLDER/base.safetensors, FOLDER/finetuned/taskNN.safetensors, FOLDER/family.tallz and
    FOLDER/task00.extracted.safetensors; a non-empty FOLDER needs --force.
    """
    from tallzip.demo import check_demo_folder, demo_files, make_family
    archive, extracted = folder / "family.tallz", folder / "task00.extracted.safetensors"
    check_demo_folder(folder, [*demo_files(n_tasks), archive.name, extracted.name], force=force)
    folder.mkdir(parents=True, exist_ok=True)
    base, tasks_dir = make_family(folder, n_tasks, width=128, layers=4, patch=8, image=64, embed=64)
    click.echo(f"generated {n_tasks} fine-tuned checkpoints in {tasks_dir} (base: {base})")
    tallzip.pack(tasks_dir, base, archive, force=True)
    with tallzip.open(archive) as arc:
        first = arc.tasks[0]
        out = arc.extract(first, extracted, force=True).output
        click.echo(f"extracted task {first!r} to {out}\n")
        click.echo(format_info(summary(arc)))
        click.echo("")
        click.echo(format_verify(verify(arc, tasks_dir)))


def main():
    # First of all: a Ctrl-C is a KeyboardInterrupt, which the group and every command turn into one line
    # and exit 130, whatever handler came in (but an ignored SIGINT, a background job's, stays ignored)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli(prog_name="tallzip")
    except KeyboardInterrupt:  # between click's own handlers
        _fail("interrupted", EXIT_INTERRUPTED, _asked_for_json(None))


if __name__ == "__main__":
    main()
