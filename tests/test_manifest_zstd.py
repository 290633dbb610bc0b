"""The manifest stored as one zstd frame (header flag bit 0, SPEC 'Flags'): written so, read back,
damage and bombs refused in one line before any large allocation, other flag bits refused, and the
plain (flags 0) archives of earlier writers still read."""
from __future__ import annotations

import io
import re
import json
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner

import tallzip
from tallzip.cli.main import cli
from tallzip.formats.errors import CorruptArchiveError

from conftest import numpy_family, read_manifest, write_family, write_manifest
from tallzip.options import RunOptions, StoreOptions

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LIMIT = 256 << 20  # SPEC: a manifest of at most 256 MiB, stored or decompressed


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mz")
    base, tasks = numpy_family()
    base_path, tasks_dir = write_family(folder, base, tasks)
    out = folder / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, run=RunOptions(device="cpu"))
    return out


def copy_of(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    shutil.copyfile(path, target)
    return target


def loaded(path: Path) -> dict:
    with tallzip.open(path) as arc:
        return {t: {n: v.numpy().tobytes() for n, v in arc.load(t).items()} for t in arc.tasks}


def refused_in_one_line(path: Path, match: str, budget: int = 8 << 20):
    """Opening fails with `match`, Python allocating at most the file plus `budget`, and the CLI says
    so in one line with a non-zero exit."""
    tracemalloc.start()
    try:
        with pytest.raises(CorruptArchiveError, match=match):
            tallzip.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size + budget, f"peak {peak:,} bytes"
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and re.search(match, result.output), result.output


def test_written_compressed_and_read_back(archive, tmp_path):
    data = archive.read_bytes()
    flags, offset = struct.unpack_from("<I", data, 12)[0], struct.unpack_from("<Q", data, 16)[0]
    assert flags == 1 and data[offset:offset + 4] == b"\x28\xb5\x2f\xfd"  # a zstd frame's magic
    manifest, _ = read_manifest(archive)  # decompressed here with zstandard, not tallzip's reader
    with tallzip.open(archive) as arc:
        assert arc.manifest == manifest
    # the same JSON stored plain (flags 0) reads to the same manifest and the same tensors, bit for bit
    plain = copy_of(archive, tmp_path)
    write_manifest(plain, manifest, compress=False)
    assert read_manifest(plain)[1] == 0 and plain.stat().st_size > archive.stat().st_size
    with tallzip.open(plain) as arc:
        assert arc.manifest == manifest
    assert loaded(plain) == loaded(archive)


@pytest.mark.parametrize("fixture", ["v1-family.tallz", "v2-family.tallz", "reps-family.tallz"])
def test_plain_fixtures_still_read_and_match_their_compressed_copy(fixture, tmp_path):
    path = FIXTURES / fixture
    manifest, flags = read_manifest(path)
    assert flags == 0
    with tallzip.open(path) as arc:
        assert arc.manifest == manifest
    squeezed = copy_of(path, tmp_path)
    write_manifest(squeezed, manifest, compress=True)
    assert read_manifest(squeezed)[1] == 1
    assert loaded(squeezed) == loaded(path)


def test_damaged_frame_refused_by_the_checksum(archive, tmp_path):
    bad = copy_of(archive, tmp_path)
    data = bytearray(bad.read_bytes())
    offset = struct.unpack_from("<Q", data, 16)[0]
    data[offset + (len(data) - offset) // 2] ^= 0x10
    bad.write_bytes(bytes(data))
    refused_in_one_line(bad, "manifest checksum mismatch")


def zeros_frame(size: int, declare: int | None) -> bytes:
    """A zstd frame of `size` zero bytes, streamed (never held whole), declaring `declare` as its
    content size (None: no size), the declaration patched into the frame header by hand."""
    sink = io.BytesIO()
    with zstandard.ZstdCompressor(write_content_size=False).stream_writer(sink, closefd=False) as writer:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            writer.write(block)
    frame = sink.getvalue()
    assert frame[4] == 0  # frame header descriptor: no content size, not single-segment
    if declare is None:
        return frame
    # descriptor 0x80: a 4-byte content size after the window descriptor (byte 5)
    patched = frame[:4] + b"\x80" + frame[5:6] + struct.pack("<I", declare) + frame[6:]
    assert zstandard.frame_content_size(patched) == declare
    return patched


def big_claim_frame() -> bytes:
    """A frame whose header claims LIMIT + 1 bytes (a real one: LIMIT + 1 MiB of zeros, ~10 KB)."""
    sink = io.BytesIO()
    cctx = zstandard.ZstdCompressor(write_content_size=True)
    size = LIMIT + (1 << 20)
    with cctx.stream_writer(sink, size=size, closefd=False) as writer:
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            writer.write(block)
    frame = sink.getvalue()
    assert zstandard.frame_content_size(frame) == size and len(frame) < 64 << 10
    return frame


@pytest.mark.parametrize("make, match", [
    (big_claim_frame, "declares 269484032 bytes, more than 268435456"),
    (lambda: zeros_frame(LIMIT + (1 << 20), declare=None), "declares no content size"),
    (lambda: zeros_frame(LIMIT + (1 << 20), declare=4096), "does not decode|inflates past"),
    (lambda: zeros_frame(64 << 20, declare=4096), "does not decode|inflates past"),
], ids=["claims past the limit", "claims nothing, inflates past the limit", "claims 4 KB, inflates past the limit",
        "claims 4 KB, inflates to 64 MB"])
def test_bomb_frames_refused_in_one_line_without_inflating(archive, tmp_path, make, match):
    """Frames with a valid sha256 (a hostile writer's): refused before their content is allocated."""
    bomb = copy_of(archive, tmp_path)
    write_manifest(bomb, None, blob=make(), flags=1)
    refused_in_one_line(bomb, match)


def test_frames_not_exactly_one_whole_frame_refused(archive, tmp_path):
    manifest, _ = read_manifest(archive)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(json.dumps(manifest).encode())
    for name, blob, match in [("trailing", frame + b"\0", "not exactly one whole zstd frame"),
                              ("two frames", frame + frame, "not exactly one whole zstd frame"),
                              ("truncated", frame[:-7], "does not decode|not exactly one whole"),
                              ("not zstd", b"{}", "not a zstd frame")]:
        bad = copy_of(archive, tmp_path)
        write_manifest(bad, None, blob=blob, flags=1)
        refused_in_one_line(bad, match)


@pytest.mark.parametrize("flags", [2, 3, 1 << 31, 0xFFFFFFFF])
def test_unknown_flag_bits_refused(archive, tmp_path, flags):
    manifest, _ = read_manifest(archive)
    bad = copy_of(archive, tmp_path)
    write_manifest(bad, manifest, compress=True, flags=flags)
    refused_in_one_line(bad, f"unknown flags {flags:#x}")


def test_plain_json_under_flag_1_and_frame_under_flag_0_refused(archive, tmp_path):
    manifest, _ = read_manifest(archive)
    bad = copy_of(archive, tmp_path)
    write_manifest(bad, manifest, compress=False, flags=1)
    refused_in_one_line(bad, "not a zstd frame")
    write_manifest(bad, manifest, compress=True, flags=0)
    refused_in_one_line(bad, "not valid JSON")


# --- the size it saves, on a ViT-shaped family ------------------------------------------------------

@pytest.fixture(scope="module")
def vit_family(tmp_path_factory):
    """8 tasks with the tensor names of a CLIP ViT (benchmarks.fixtures' vit presets, 4 blocks), narrower: the
    manifest depends on the sections and chunks (one per tensor here, as at full width), not on the width."""
    from benchmarks.fixtures import generate
    from benchmarks.fixtures.families import vit_preset
    folder = tmp_path_factory.mktemp("vit")
    made = generate(folder / "fam", vit_preset(width=32, layers=4, patch=4, image=28, embed=32), 8, threads=1, log=None)
    tasks, base = folder / "fam" / "tasks", made["base"]
    return tasks, base, folder


@pytest.mark.parametrize("keep", ["q2", "tall"])
def test_small_archive_manifest_at_least_3x_smaller(vit_family, keep):
    tasks, base, folder = vit_family
    out = folder / f"{keep}.tallz"
    tallzip.pack(tasks, base, out, store=StoreOptions(keep=keep), run=RunOptions(device="cpu"))
    data = out.read_bytes()
    offset, length = struct.unpack_from("<QQ", data, 16)
    manifest, flags = read_manifest(out)
    plain = len(json.dumps(manifest, separators=(",", ":")).encode())
    assert flags == 1 and length == len(data) - offset
    print(f"{keep}: manifest JSON {plain:,} B, stored {length:,} B, {plain / length:.1f}x")
    assert plain >= 3 * length
    assert len(manifest["tasks"]) == 8 and np.isfinite(plain / length)
