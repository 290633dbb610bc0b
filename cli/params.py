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


def parse_keep(values) -> dict | str | None:
    """`--keep q4` for all tasks, `--keep TASK=exact` for one; later values win; `--keep auto` alone: the
    data-free choice."""
    from tallzip.formats.container.constants import REPRESENTATIONS
    if "auto" in values:
        if len(values) > 1:
            raise click.BadParameter("auto chooses every task's representation: give it alone", param_hint="--keep")
        return "auto"
    out: dict[str, str] = {}
    for value in values:
        task, _, rep = value.rpartition("=")
        if rep not in REPRESENTATIONS:
            raise click.BadParameter(f"{value!r}: {rep!r} is not one of {', '.join(REPRESENTATIONS)}",
                                     param_hint="--keep")
        out[task or "*"] = rep
    return out or None


def parse_lowrank(energy_values, quant_values, codes_codec: str = "planes+ans"):
    """LowRankOptions from `--lowrank-energy [TASK=]E`, `--lowrank-quant PATTERN=CODE` and `--lowrank-codes-codec`
    (defaults where not given)."""
    from tallzip.options import LowRankOptions
    energy, per_task = None, []
    for value in energy_values:
        task, _, number = value.rpartition("=")
        try:
            number = float(number)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected [TASK=]ENERGY, a number in (0, 1]", param_hint="--lowrank-energy") from None
        if task:
            per_task.append((task, number))
        else:
            energy = number
    pairs = []
    for value in quant_values:
        pattern, sep, code = value.rpartition("=")
        if not sep or not pattern or code not in ("2", "3", "4", "8", "q2", "q3", "q4", "q8"):
            raise click.BadParameter(f"{value!r}: expected PATTERN=CODE, CODE one of 2, 3, 4, 8 (symmetric bits) or "
                                     f"q2, q3, q4, q8 (as --keep)", param_hint="--lowrank-quant")
        pairs.append((pattern, code if code.startswith("q") else int(code)))
    return LowRankOptions(**({"energy": energy} if energy is not None else {}), quant_tensors=tuple(pairs),
                          task_energy=tuple(per_task), codes_codec=codes_codec)


def lowrank_options(command):
    """pack's three options for lowrank tasks (parse_lowrank reads them)."""
    for option in reversed([
        click.option("--lowrank-energy", "lowrank_energy", multiple=True, metavar="[TASK=]E",
                     help="lowrank tasks: share of each matrix's ||tau||^2 its rank keeps, for all or one task "
                          "(default 0.95)"),
        click.option("--lowrank-quant", "lowrank_quant", multiple=True, metavar="PATTERN=CODE",
                     help="lowrank tasks: tensors PATTERN matches (fnmatch) kept elementwise: CODE 2, 3, 4 or 8 "
                          "bits on the symmetric grid (2: three levels -1, 0, +1), or q2, q3, q4, q8 as --keep "
                          "codes them (q2: four levels, an offset per group), e.g. conv1.weight=3, "
                          "model.embed_tokens.weight=q2"),
        click.option("--lowrank-codes-codec", "lowrank_codes_codec", type=click.Choice(["planes+ans", "zstd"]),
                     default="planes+ans", show_default=True,
                     help="lowrank tasks: the codec of their codes stream (zstd at --level; at --level 19 it was "
                          "3-12%% smaller)")]):
        command = option(command)
    return command


def load_evaluate(spec: str):
    """`module:function` (a module importable from here, or a path to a .py file) -> the function."""
    import importlib
    import importlib.util
    import sys
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise click.BadParameter(f"{spec!r}: expected MODULE:FUNCTION", param_hint="--keep-by")
    try:
        if module_name.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loader_spec is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the current folder, as `python -m` has it
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any failure importing it is reported in one line
        raise click.BadParameter(f"{spec!r}: cannot import {module_name}: {exc}", param_hint="--keep-by") from None
    evaluate = getattr(module, function, None)
    if not callable(evaluate):
        raise click.BadParameter(f"{spec!r}: {module_name} has no function {function!r}", param_hint="--keep-by")
    return evaluate


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
