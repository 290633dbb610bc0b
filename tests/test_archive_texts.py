"""What `info` and `verify` say is true of the archive at hand (issue 18, item 7): an archive with no
task kept tall stores no mtv, no mask and no lambda, and its texts say none of them; a mixed one speaks
of the tall tasks' masks only. The all-tall archive keeps its own wording (the case where it is true)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from tallzip.cli.main import cli
from tallzip.demo import make_family


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fam")
    base, tasks = make_family(folder, n_tasks=3, width=16, layers=1, frozen_width=8)
    archives = {}
    for name, keep in {"exact": ["exact"], "q2": ["q2"], "mixed": ["q2", "task00=tall"], "tall": ["tall"]}.items():
        archives[name] = folder / f"{name}.tallz"
        run("pack", tasks, "--base", base, "-o", archives[name], "--mtv-dtype", "float32",
            *[a for k in keep for a in ("--keep", k)])
    return tasks, archives


def test_all_exact_archive_info_speaks_of_no_mtv_mask_or_lambda(family):
    tasks, archives = family
    text = run("info", archives["exact"])
    assert "lambdas 0.4" not in text and "mask * mtv" not in text
    assert "no lambdas" in text and "bit for bit" in text


def test_verify_of_an_archive_without_mtv_recomputes_none(family):
    tasks, archives = family
    for name in ("exact", "q2"):
        text = run("verify", archives[name], "--against", tasks)
        assert "mtv and every mask recomputed" not in text and "TALL rebuild" not in text
        assert "no mtv or mask is stored" in text


def test_mixed_archive_names_only_the_tall_tasks(family):
    tasks, archives = family
    info = run("info", archives["mixed"])
    assert "lambdas 0.4: task00\n" in info and "all 3 tasks" not in info
    text = run("verify", archives["mixed"], "--against", tasks)
    assert "the mtv and the masks of the tall tasks (task00) recomputed" in text


def test_all_tall_archive_keeps_its_words(family):
    tasks, archives = family
    info = run("info", archives["tall"])
    assert "lambdas 0.4 (all 3 tasks)" in info and "every task rebuilds exactly as base + mask * mtv" in info
    assert "the mtv and every mask recomputed" in run("verify", archives["tall"], "--against", tasks)
