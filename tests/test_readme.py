"""The README against the `tallzip` command: every option it shows exists, every choice value it
lists is accepted and every default it states is the one `--help` shows; every command line it
shows parses; its extras and torch pins agree with setup.cfg and .ci/run; its demo command and the
"Use" commands run on a folder of their own.

The README is parsed here, not restated: a README edit that names an option, value or default the
command does not have fails one of these tests.
"""
from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from packaging.specifiers import SpecifierSet

from tallzip.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Which command each option table of the README describes (by the heading above it).
TABLE_COMMANDS = {"Storage options": "pack"}


# --- reading the README -----------------------------------------------------------------------

def code_blocks(lang="bash") -> list[str]:
    return [body for kind, body in FENCE.findall(README) if kind == lang]


def shell_lines(blocks=None) -> list[str]:
    """Every line of the bash blocks, continuation lines joined and `# comments` dropped."""
    lines: list[str] = []
    for block in code_blocks() if blocks is None else blocks:
        for raw in block.splitlines():
            line = re.sub(r"\s+#.*$", "", raw).rstrip()
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if raw[:1].isspace() and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.strip())
    return lines


def prose() -> str:
    """The README without its fenced blocks."""
    return FENCE.sub("", README)


def inline_spans() -> list[str]:
    """`code` spans of the prose and tables (a table's `\\|` is a plain `|` inside a span)."""
    return [span.replace("\\|", "|") for span in re.findall(r"`([^`\n]+)`", prose())]


def tallzip_commands() -> list[str]:
    """Every `tallzip CMD ...` the README shows: in its shell blocks (also after `&&`) and inline."""
    found = []
    for line in shell_lines():
        found += [part.strip() for part in line.split("&&") if part.strip().startswith("tallzip ")]
    found += [span.strip() for span in inline_spans() if span.startswith("tallzip ")]
    return found


def option_tables() -> list[tuple[str, list[list[str]]]]:
    """(heading above, rows as cells) for every markdown table in the README."""
    tables, heading, rows = [], None, None
    for line in prose().splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if rows is None:
                rows = []
            elif not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows is not None:
            tables.append((heading, rows))
            rows = None
    return tables


def split_synopsis(command_line: str) -> tuple[str, list[str], list[list[str]]]:
    """`tallzip pack DIR --base B -o F [--merge sum|ties] [--json]` -> ('pack', [DIR, --base, B, -o, F],
    [['--merge', 'sum|ties'], ['--json']])."""
    tokens = command_line.split()
    assert tokens[0] == "tallzip", command_line
    plain, optional, group = [], [], None
    for token in tokens[2:]:
        if token.startswith("[") and group is None:
            group, token = [], token[1:]
        if group is None:
            plain.append(token)
            continue
        closes = token.endswith("]")
        token = token.rstrip("]")
        if token:
            group.append(token)
        if closes:
            optional.append(group)
            group = None
    assert group is None, f"unclosed [ in {command_line!r}"
    return tokens[1], plain, optional


def values_of(token: str) -> list[str]:
    """`a|b|c` -> its alternatives; `...` (unspecified) -> none."""
    return [] if token == "..." else token.split("|")


# --- the command's side ------------------------------------------------------------------------

def command(name: str) -> click.Command:
    assert name in cli.commands, f"the README shows `tallzip {name}`, which is no tallzip command"
    return cli.commands[name]


def all_options(cmd: click.Command) -> list[click.Option]:
    """The command's options, --help included."""
    return [p for p in cmd.get_params(click.Context(cmd)) if isinstance(p, click.Option)]


def option(cmd_name: str, opt: str) -> click.Option:
    for param in all_options(command(cmd_name)):
        if isinstance(param, click.Option) and opt in (*param.opts, *param.secondary_opts):
            return param
    raise AssertionError(f"the README shows `tallzip {cmd_name} {opt}`, which `tallzip {cmd_name} --help` lacks")


def parses(cmd_name: str, args: list[str]):
    """What click makes of the arguments: their conversion and validation, nothing run."""
    cmd = command(cmd_name)
    try:
        with cmd.make_context(f"tallzip {cmd_name}", list(args)) as ctx:
            return ctx.params
    except click.ClickException as exc:
        raise AssertionError(f"the README's `tallzip {cmd_name} {shlex.join(args)}` is refused: "
                             f"{exc.format_message()}") from None


def accepts(param: click.Option, value: str) -> bool:
    try:
        param.type.convert(value, param, None)
    except click.BadParameter:
        return False
    if isinstance(param.type, click.Choice):
        return True
    # a free-form option (--device): the value it lists must be one its help names
    return value in (param.help or "")


# --- the tests ----------------------------------------------------------------------------------

def test_the_readme_shows_commands_and_options():
    """The parsers below find what they check (a README reshaped past them would pass silently)."""
    assert {c.split()[1] for c in tallzip_commands()} >= {"pack", "extract", "info", "verify", "merge", "demo"}
    assert any(heading == "Storage options" and len(rows) >= 4 for heading, rows in option_tables())


@pytest.mark.parametrize("line", tallzip_commands())
def test_every_command_line_parses(line, tmp_path, monkeypatch):
    """Each shown command, with one optional part at a time, is accepted by click as written."""
    monkeypatch.chdir(tmp_path)  # paths in the README (finetuned/, ...) must not resolve to real folders
    name, plain, optional = split_synopsis(line)
    if name.startswith("-"):  # an option of tallzip itself (`tallzip --help`)
        assert any(name in p.opts for p in all_options(cli)), f"`tallzip {name}`: tallzip has no {name}"
        return
    if not plain and not optional:
        command(name)  # a command named in passing (`tallzip info` prints ...)
        return
    parses(name, plain)
    for group in optional:
        param = option(name, group[0])
        if param.is_flag:
            parses(name, plain + [group[0]])
            continue
        assert len(group) > 1, f"{line!r}: [{group[0]}] needs a value"
        for value in values_of(group[1]):
            parses(name, plain + [group[0], value])


def test_every_inline_option_and_value_is_accepted():
    """`--option value` in the prose and tables: some tallzip command has the option and accepts the value."""
    checked = 0
    for span in inline_spans():
        tokens = span.split()
        if not tokens[0].startswith("--"):
            continue  # `tallzip ...` lines have their own test; `python -m benchmarks...` is not tallzip
        for i, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            owners = [param for cmd in [cli, *cli.commands.values()] for param in all_options(cmd)
                      if token in (*param.opts, *param.secondary_opts)]
            assert owners, f"the README shows `{token}` (in `{span}`), which no tallzip command has"
            value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith(("-", "[")) else None
            if value is None or all(param.is_flag for param in owners):
                continue
            for alternative in values_of(value):
                if re.fullmatch(r"\d+\.\.\d+", alternative):
                    continue  # a range, checked with its table
                assert any(accepts(param, alternative) for param in owners), \
                    f"the README shows `{token} {alternative}` (in `{span}`), which tallzip refuses"
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize("heading,rows", option_tables(), ids=lambda x: x if isinstance(x, str) else "")
def test_option_tables_match_help(heading, rows):
    """Each row: the option exists, it lists exactly the choices (or the range) the command takes,
    and the default column is the command's default."""
    assert heading in TABLE_COMMANDS, f"a README table under {heading!r}: say which command it describes"
    cmd_name = TABLE_COMMANDS[heading]
    # the options' values when the README's plain `tallzip CMD ...` line leaves them out
    plain = next(split_synopsis(line)[1] for line in tallzip_commands() if line.split()[1] == cmd_name)
    defaults = parses(cmd_name, plain)
    for cells in rows:
        spans = [s.replace("\\|", "|") for s in re.findall(r"`([^`]+)`", cells[0])]
        assert spans, f"table row without an option: {cells}"
        opt, *rest = spans[0].split()
        param = option(cmd_name, opt)
        if rest and isinstance(param.type, click.Choice):
            assert sorted(values_of(rest[0])) == sorted(param.type.choices), \
                f"README lists {opt} {rest[0]}; tallzip {cmd_name} takes {'|'.join(param.type.choices)}"
        elif rest and isinstance(param.type, click.IntRange):
            low, high = map(int, rest[0].split(".."))
            assert (low, high) == (param.type.min, param.type.max), f"{opt} {rest[0]}"
        else:
            assert not rest or param.is_flag is False, f"{opt}: the README lists values for a flag"
        default, actual = cells[1].strip("`"), defaults[param.name]
        if param.is_flag:
            assert default == "off" and actual is False, f"{opt}: README default {cells[1]}, tallzip {actual}"
        else:
            assert default == str(actual), f"{opt}: README says default {default}, tallzip {cmd_name} {actual}"
            assert f"default: {default}" in param.get_help_record(click.Context(command(cmd_name)))[1]


def test_install_commands_match_setup_cfg_and_ci():
    """The README's extras exist, its torch pin lies inside install_requires' range, and CI runs the
    README's test command exactly."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = set(config["options.extras_require"])
    requires = [r.strip() for r in config["options"]["install_requires"].splitlines() if r.strip()]
    torch_range = SpecifierSet(next(r for r in requires if r.startswith("torch")).removeprefix("torch"))
    lines = shell_lines()
    pip_lines = [line for line in lines if line.startswith("pip install")]
    assert len(pip_lines) >= 2 and lines[:2] == pip_lines[:2], "the README opens with its two commands"
    for text in pip_lines + [s for s in inline_spans() if s.startswith("pip install")]:
        for group in re.findall(r"\[([\w,-]+)\]", text):
            assert set(group.split(",")) <= extras, f"{text!r}: setup.cfg has extras {sorted(extras)}"
        for pin in re.findall(r"\btorch==([\w.+]+)", text):
            assert pin in torch_range, f"{text!r} installs torch {pin}, outside install_requires' {torch_range}"
    install, test_command = pip_lines[:2]
    assert "torch==2.13.0" in install and "torch==2.13.0" in test_command, "the test command keeps the CPU torch"
    assert "torchvision" not in test_command and "clip" not in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert f"{test_command} || exit $?" in ci_lines, ".ci/run must run the README's test command as written"


def test_ci_installs_each_step_into_a_new_virtualenv():
    """Each `pip install` of .ci/run goes into a virtualenv that step made and activated itself, so that
    nothing installed by hand on the CI machine can stand in for a missing install step."""
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    installs = [i for i, line in enumerate(ci_lines) if line.startswith("pip install")]
    assert len(installs) == 2, "two steps, two installs"
    made = set()
    for previous, install in zip([-1] + installs, installs):
        step = ci_lines[previous + 1:install]
        venvs = [re.fullmatch(r'python3 -m venv "(\$\w+/\w+)"', line) for line in step]
        venvs = [m.group(1) for m in venvs if m]
        assert len(venvs) == 1, f"{ci_lines[install]!r}: no new virtualenv made for it"
        assert f'. "{venvs[0]}/bin/activate"' in step, f"{ci_lines[install]!r}: its new virtualenv is not activated"
        assert venvs[0] not in made, "each step gets a virtualenv of its own"
        made.add(venvs[0])
    assert any(re.fullmatch(r'\w+=\$\(mktemp -d\)', line) for line in ci_lines), "the virtualenvs live in a temporary folder"


def tallzip_run(args, cwd, monkeypatch):
    """One `tallzip` command in `cwd`, in this process (the installed entry point has its own test)."""
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(cli, args)


@pytest.mark.slow  # ~7 s of CPU: the demo family, then pack, extract twice, info, verify
def test_readme_demo_and_use_commands_run(tmp_path, monkeypatch):
    """The README's first command's `tallzip demo` (at its smallest: 2 tasks), then its "Use" block's
    commands on the folder and archive the demo made, placeholders filled in."""
    demo = next(part.strip() for part in shell_lines()[0].split("&&") if part.strip().startswith("tallzip "))
    assert demo == "tallzip demo"
    result = tallzip_run([*shlex.split(demo)[1:], "--tasks", "2"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "demo"
    assert (folder / "family.tallz").is_file() and "extracted task" in result.output
    tasks_dir = next(p for p in folder.iterdir() if p.is_dir())
    base = next(p for p in folder.iterdir() if p.name.startswith("base"))
    task = sorted(p.stem for p in tasks_dir.iterdir())[0]
    use_lines = shell_lines([next(block for block in code_blocks() if "tallzip pack CHECKPOINTS_DIR" in block)])
    fill = {"CHECKPOINTS_DIR": str(tasks_dir), "PRETRAINED": str(base), "family.tallz": str(tmp_path / "f.tallz"),
            "TASK.safetensors": str(tmp_path / f"{task}.safetensors"), "TASK": task, "OUT_DIR": str(tmp_path / "all")}
    ran = 0
    for line in use_lines:
        _, plain, _ = split_synopsis(line)
        # a placeholder with alternatives (TASK.safetensors|TASK.pt|FOLDER) runs with its first
        args = [line.split()[1]] + [fill.get(token.split("|")[0], token.split("|")[0]) for token in plain]
        result = tallzip_run(args, tmp_path, monkeypatch)
        assert result.exit_code == 0, f"{shlex.join(args)}: {result.output}"
        ran += 1
    assert ran == 7  # pack, extract, extract --all, info, verify, add, remove
    assert (tmp_path / f"{task}.safetensors").is_file() and len(list((tmp_path / "all").iterdir())) == 2
