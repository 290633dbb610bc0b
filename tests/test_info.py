"""`tallzip info` of an archive given by URL (the reader's size, not the local file system's), and
`info --agreement` counted chunk by chunk, checked against the TALL masks written again in numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import tallzip
from tallzip.cli.main import cli
from tallzip.formats.constants import HEADER_SIZE
from tallzip.formats.reader import ArchiveReader
from tallzip.inspect import layer_kind

from conftest import np_mask, np_mtv, numpy_family, write_family
from test_remote import family, http_archive  # noqa: F401 - the HTTP server fixture with its family

LAMBDAS = {"task0": 0.3, "task1": 0.4, "task2": 0.5}


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_info_of_a_url_reads_only_the_header_and_manifest(family, http_archive):  # noqa: F811
    _, _, archive = family
    server, url = http_archive
    code, out, err = invoke("info", archive, "--json")
    assert code == 0, err
    local = json.loads(out)
    server.log.clear()
    code, out, err = invoke("info", url, "--json")
    assert code == 0, err
    remote = json.loads(out)
    assert remote["archive_bytes"] == archive.stat().st_size
    assert remote["archive"] == url
    assert {k: v for k, v in remote.items() if k != "archive"} == {k: v for k, v in local.items() if k != "archive"}
    reader = ArchiveReader(archive)
    manifest_bytes = reader.size - reader._data_end
    reader.close()
    assert sum(entry[3] for entry in server.log) <= HEADER_SIZE + manifest_bytes  # no section was fetched
    code, out, err = invoke("info", url, "--agreement", "--json")
    assert code == 0, err
    assert json.loads(out)["agreement"]["n_tasks"] == 3


def test_info_of_a_missing_url_is_one_line(http_archive):  # noqa: F811
    _, url = http_archive
    code, out, err = invoke("info", url.replace("family.tallz", "nothing.tallz"))
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("chunk_elements", [1024, 1 << 22], ids=["many-chunks", "one-chunk"])
def test_agreement_counts_every_chunk(tmp_path, chunk_elements):
    """Masked tensors of several chunks (of 1014 elements in enc.w: not whole bytes of a mask): the per-kind histogram
    of how many tasks use each weight equals the count over the numpy masks."""
    base, tasks = numpy_family(shapes={"enc.w": (150, 13), "enc.b": (2500,), "blk.0.w": (40, 30), "frozen.emb": (5, 4)})
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    archive = tmp_path / "a.tallz"
    tallzip.pack(tasks_dir, base_path, archive, lambdas=LAMBDAS, mtv_dtype="float32", chunk_elements=chunk_elements,
                 device="cpu")
    with tallzip.open(archive) as arc:
        data = tallzip.agreement(arc)
        masked = [n for n, info in arc.tensors.items() if info["kind"] == "masked"]
        assert any(len(arc.plan(None, n)) > 1 for n in masked) == (chunk_elements == 1024)
    want = {}
    for name in masked:
        mtv = np_mtv(base, tasks, name)
        used = sum(np_mask(base[name], sd[name], mtv, LAMBDAS[t]).astype(np.int64) for t, sd in tasks.items())
        want[layer_kind(name)] = want.get(layer_kind(name), 0) + np.bincount(used.ravel(), minlength=len(tasks) + 1)
    assert {k: v["histogram"] for k, v in data["kinds"].items()} == {k: list(v) for k, v in want.items()}
    assert data["total"]["histogram"] == list(sum(want.values()))


def test_verify_of_a_url_checks_every_section(family, http_archive):  # noqa: F811
    _, _, archive = family
    server, url = http_archive
    server.log.clear()
    code, out, err = invoke("verify", url, "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True
    with tallzip.open(archive) as arc:  # every chunk fetched (and so checked)
        stored = sum(s["length"] for s in arc.manifest["sections"])
    assert sum(entry[3] for entry in server.log) >= stored
