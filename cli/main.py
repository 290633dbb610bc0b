"""The `tallzip` command: parses arguments, shows progress, prints. The work is in the library."""
from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path

import click

import tallzip
from tallzip import packing, taskvec
from tallzip.errors import TallzipError
from tallzip.formats.errors import FormatError
from tallzip.inspect import agreement, summary, verify
from tallzip import merging

from .report import format_agreement, format_info, format_merge, format_verify, human_bytes, plot_agreement


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(func):
    """One line and a non-zero exit for anything the user can fix; a traceback only with TALLZIP_DEBUG=1."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (TallzipError, FormatError) as exc:
            _fail(str(exc))
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except OSError as exc:
            # A full disk (or quota, or file size limit) while writing: the library has already
            # removed its temporary file, and the target was never touched.
            cleaned = " (nothing was written there)" if exc.errno in _WRITE_ERRNOS else ""
            _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}{cleaned}")
        except MemoryError:
            _fail("out of memory")
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a bug: still one line, unless debugging
            if os.environ.get("TALLZIP_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set TALLZIP_DEBUG=1 for a traceback)", 2)
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


def _parse_lambdas(values) -> float | dict:
    """`--lambda 0.3` for all tasks, `--lambda TASK=0.3` for one; later values win."""
    out: dict[str, float] = {}
    for value in values:
        task, _, number = value.rpartition("=")
        try:
            out[task or "*"] = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r} is neither a number nor TASK=NUMBER", param_hint="--lambda")
    if set(out) == {"*"}:
        return out["*"]
    return out or taskvec.DEFAULT_LAMBDA


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, default=str))


class CodecChoice(click.Choice):
    """A codec for one kind of section; a registered codec meant for the other kind says so."""

    def __init__(self, allowed, kind: str, other_option: str):
        super().__init__(allowed)
        self.kind, self.other_option = kind, other_option

    def convert(self, value, param, ctx):
        if value not in self.choices and value in (*packing.FLOAT_CODECS, *packing.MASK_CODECS):
            self.fail(f"{value!r} is not a codec for {self.kind} (it belongs to {self.other_option}); "
                      f"choose from {', '.join(self.choices)}", param, ctx)
        return super().convert(value, param, ctx)


DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
FORCE = click.option("--force", is_flag=True, help="overwrite the target if it exists")
AS_JSON = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tallzip.__version__, prog_name="tallzip")
def cli():
    """One archive for a family of fine-tuned checkpoints: base + multi-task vector + one bit mask per task."""


@cli.command()
@click.argument("checkpoints_dir", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="the pretrained checkpoint (file or folder)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="archive to write")
@click.option("--lambda", "lambdas", multiple=True, metavar="[TASK=]L", help="mask lambda, for all or one task (default 0.4)")
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
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True, help="zstandard level")
@click.option("--allow-nonfinite", is_flag=True, help="pack tensors holding NaN or Inf")
@DEVICE
@FORCE
@AS_JSON
@friendly_errors
def pack(checkpoints_dir, base, output, lambdas, merge, density, mtv_dtype, float_codec, mask_codec, base_ref, level,
         allow_nonfinite, device, force, as_json):
    """Pack the fine-tuned checkpoints in CHECKPOINTS_DIR into one archive."""
    progress = Progress(not as_json)
    try:
        tallzip.pack(checkpoints_dir, base, output, lambdas=_parse_lambdas(lambdas), merge=merge, density=density,
                     mtv_dtype=mtv_dtype, base_ref=base_ref, device=device, force=force, level=level,
                     codecs={"float": float_codec, "mask": mask_codec},
                     allow_nonfinite=allow_nonfinite, progress=progress)
    finally:
        progress.close()
    with tallzip.open(output) as archive:
        info = summary(archive)
    if as_json:
        _echo_json(info)
    else:
        click.echo(f"wrote {output}: {human_bytes(info['archive_bytes'])}, {len(info['tasks'])} tasks, "
                   f"{info['ratio_vs_tasks']:.2f}x smaller than the {len(info['tasks'])} inputs")


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--task", help="the task to rebuild")
@click.option("--all", "all_tasks", is_flag=True, help="rebuild every task into the folder -o")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt"]), help="default: the task's input format")
@click.option("--base", type=click.Path(path_type=Path), help="the base, for archives packed with --base-ref")
@DEVICE
@FORCE
@friendly_errors
def extract(archive, task, all_tasks, output, fmt, base, device, force):
    """Rebuild one task's model (base + mask * mtv) as a checkpoint."""
    if bool(task) == bool(all_tasks):
        raise click.UsageError("give exactly one of --task NAME or --all")
    with tallzip.open(archive, base=base) as arc:
        if task:
            path = arc.extract(task, output, fmt=fmt, force=force, device=device)
            click.echo(f"wrote {path}")
        else:
            paths = arc.extract_all(output, fmt=fmt, force=force, device=device)
            click.echo(f"wrote {len(paths)} tasks into {output}")


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path))
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
@click.option("--base", type=click.Path(path_type=Path),
              help="the pretrained checkpoint (a folder SOURCE needs it; an archive only if packed with --base-ref)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="merged model to write (.safetensors, or .pt/.pth/.bin for a torch state dict)")
@click.option("--method", type=click.Choice(merging.METHODS), required=True)
@click.option("--alpha", type=float, help="scaling of the merged vector, in (0, 2] (default 0.3; 1.0 for ties and average)")
@click.option("--k", type=int, help="consensus: keep the weights at least k tasks use (default 2)")
@click.option("--lambda", "lambdas", multiple=True, metavar="[TASK=]L",
              help="consensus from a folder: the masks' lambda, for all or one task (default 0.4)")
@click.option("--density", type=float, help="ties / consensus-ties: share of each task vector kept (default 0.2)")
@click.option("--allow-nonfinite", is_flag=True,
              help="merge even where an input holds NaN or Inf, or the result overflows its dtype (refused by default)")
@DEVICE
@FORCE
@AS_JSON
@friendly_errors
def merge(source, base, output, method, alpha, k, lambdas, density, allow_nonfinite, device, force, as_json):
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
        report = merging.merge_to_file(source, output, method=method, base=base, alpha=alpha, k=k,
                                       lambdas=_parse_lambdas(lambdas) if lambdas else None, density=density,
                                       device=device, force=force, allow_nonfinite=allow_nonfinite,
                                       progress=progress)
    finally:
        progress.close()
    for message in report.warnings:
        click.echo(f"warning: {message}", err=True)
    _echo_json(report.as_dict()) if as_json else click.echo(format_merge(report.as_dict()))


@cli.command(name="verify")
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--against", type=click.Path(path_type=Path), help="folder of the original task checkpoints")
@click.option("--base", type=click.Path(path_type=Path), help="the base, for archives packed with --base-ref")
@AS_JSON
@friendly_errors
def verify_cmd(archive, against, base, as_json):
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
        with tallzip.open(archive, base=base) as arc:
            report = verify(arc, against, progress=progress)
    finally:
        progress.close()
    _echo_json(report) if as_json else click.echo(format_verify(report))
    if report.get("verdict") == "differs":
        sys.exit(1)


@cli.command()
@click.option("--folder", type=click.Path(path_type=Path), default=Path("demo"), show_default=True)
@click.option("--tasks", "n_tasks", type=click.IntRange(2, 64), default=8, show_default=True)
@friendly_errors
def demo(folder, n_tasks):
    """Generate a small family of checkpoints, pack it, extract one task, verify, print the size table."""
    from tallzip.demo import make_family
    folder.mkdir(parents=True, exist_ok=True)
    base, tasks_dir = make_family(folder, n_tasks, width=128, layers=4, patch=8, image=64, embed=64)
    click.echo(f"generated {n_tasks} fine-tuned checkpoints in {tasks_dir} (base: {base})")
    archive = folder / "family.tallz"
    tallzip.pack(tasks_dir, base, archive, force=True)
    with tallzip.open(archive) as arc:
        first = arc.tasks[0]
        out = arc.extract(first, folder / f"{first}.extracted.safetensors", force=True)
        click.echo(f"extracted task {first!r} to {out}\n")
        click.echo(format_info(summary(arc)))
        click.echo("")
        click.echo(format_verify(verify(arc, tasks_dir)))


def main():
    cli(prog_name="tallzip")


if __name__ == "__main__":
    main()
