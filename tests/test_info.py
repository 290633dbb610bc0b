"""`tallzip info` and `verify` of an archive given by URL (the reader's size, not the local file system's),
over the loopback HTTP server of test_remote.py."""
from __future__ import annotations

import json

from click.testing import CliRunner

import tallzip
from tallzip.cli.main import cli
from tallzip.formats.container.constants import HEADER_SIZE
from tallzip.formats.container.reader import ArchiveReader

from test_remote import family, http_archive  # noqa: F401 - the HTTP server fixture with its family


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
