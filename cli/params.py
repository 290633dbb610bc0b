"""The command line's parameter types and parsers: --lambda, --keep, codec choices, paths or URLs, --base
for merge. Nothing here imports torch."""
from __future__ import annotations

from pathlib import Path

import click

from tallzip import options as packing
from tallzip.formats.checkpoints.sources import is_url


def parse_lambdas(values) -> float | dict:
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
    return out or packing.DEFAULT_LAMBDA


def parse_keep(values) -> dict | None:
    """`--keep q4` for all tasks, `--keep TASK=exact` for one; later values win."""
    from tallzip.formats.container.constants import REPRESENTATIONS
    out: dict[str, str] = {}
    for value in values:
        task, _, rep = value.rpartition("=")
        if rep not in REPRESENTATIONS:
            raise click.BadParameter(f"{value!r}: {rep!r} is not one of {', '.join(REPRESENTATIONS)}",
                                     param_hint="--keep")
        out[task or "*"] = rep
    return out or None


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


def base_for_folder_source(ctx, param, base):
    """merge: a folder of checkpoints has no base of its own, so --base is required with one (a usage
    error, exit 2, as for pack); an archive holds its base."""
    source = ctx.params.get("source")
    if base is None and source is not None and Path(source).is_dir():
        raise click.UsageError(f"Missing option '--base': {source} is a folder of checkpoints, and merging "
                               f"them needs the pretrained checkpoint they were fine-tuned from.", ctx)
    return base


class PathOrUrl(click.ParamType):
    """A local path (a Path) or a URL (s3://, https://, memory://..., kept as text: a Path would fold its '//')."""

    name = "path"

    def convert(self, value, param, ctx):
        if isinstance(value, (Path, str)) and is_url(value):
            return str(value)
        return Path(value)


PATH_OR_URL = PathOrUrl()
