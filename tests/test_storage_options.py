"""Issue 7's storage options: each round-trips through pack and extract (the lossless ones bit for bit),
the --float-codec / --mask-codec options work and refuse the wrong kind of codec, and `tallzip info`
reports bits per parameter and the ratio as the manifest's own numbers give them."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file

import tallzip
from tallzip.cli.main import cli
from tallzip.errors import TallzipError
from tallzip.options import FLOAT_CODECS, MASK_CODECS

from conftest import DEFAULT_MTV_DTYPE, np_mask, np_mtv, np_rebuilt, np_round_mtv, numpy_family, write_family
from conftest import read_manifest as conftest_read_manifest
from tallzip.options import StoreOptions

# enc.w is big enough for the context and ANS codecs to code rather than fall back to plain bits
SHAPES = {"enc.w": (128, 96), "enc.b": (128,), "blk.0.w": (37, 29), "frozen.emb": (40, 16)}
MASKED = ("enc.w", "enc.b", "blk.0.w")
LAM = 0.4
# bit patterns a lossless float codec must keep: -0.0, a subnormal, the largest float32
SPECIAL = np.array([-0.0, 1e-42, np.finfo(np.float32).max, -1.5], dtype=np.float32)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    base, tasks = numpy_family(n_tasks=4, seed=7, shapes=SHAPES)
    base["frozen.emb"].reshape(-1)[:SPECIAL.size] = SPECIAL  # unchanged by every task: a `shared` tensor
    for sd in tasks.values():
        sd["frozen.emb"] = base["frozen.emb"].copy()
    base_path, tasks_dir = write_family(tmp_path_factory.mktemp("fam"), base, tasks)
    return base, tasks, base_path, tasks_dir


def bits(array):
    array = np.ascontiguousarray(array)
    return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "f" else array


def assert_same_bits(got, expected, what=""):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    assert np.array_equal(bits(got), bits(expected)), what


def expected_task(base, tasks, task, mtv_dtype=DEFAULT_MTV_DTYPE):
    """The task as the archive must rebuild it: masks from the fp32 mtv, the stored (rounded) mtv added."""
    out = {}
    for name, value in tasks[task].items():
        if name in MASKED:
            out[name] = np_rebuilt(base, tasks, task, name, LAM, mtv_dtype)
        else:  # the shared tensor is the base's; the head and the int buffer are the task's own
            out[name] = value
    return out


def extract_all(archive_path, folder, base=None):
    with tallzip.open(archive_path, base=base) as archive:
        archive.extract(None, folder)
    return {p.stem: np_load_file(str(p)) for p in folder.iterdir()}


def check_extracted(extracted, base, tasks, mtv_dtype=DEFAULT_MTV_DTYPE):
    assert set(extracted) == set(tasks)
    for task, got in extracted.items():
        expected = expected_task(base, tasks, task, mtv_dtype)
        assert set(got) == set(expected)
        for name in expected:
            assert_same_bits(got[name], expected[name], (task, name))


def section_codecs(archive_path):
    with tallzip.open(archive_path) as archive:
        return {(s["role"], s["tensor"], s["task"]): (s["codec"], s["chunks"][0]["params"])
                for s in archive.manifest["sections"]}  # these tensors are one chunk each


# --- every option round-trips ---------------------------------------------------------------------

@pytest.mark.parametrize("float_codec", FLOAT_CODECS)
def test_float_codecs_are_lossless(fam, tmp_path, float_codec):
    base, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=LAM, mtv_dtype="float32", codecs={"float": float_codec}))
    coded = section_codecs(out)
    assert {c for (role, _, _), (c, _) in coded.items() if role in ("base", "mtv")} == {float_codec}
    with tallzip.open(out) as archive:
        for name in base:
            assert_same_bits(archive.base_tensor(name).numpy(), base[name], name)
        for name in MASKED:
            assert_same_bits(archive.mtv(name).numpy(), np_mtv(base, tasks, name), name)
    check_extracted(extract_all(out, tmp_path / "x"), base, tasks, "float32")


def test_planes_ans_codes_the_exponent_plane_with_ans(fam, tmp_path):
    """Guards the test above: with these tensors planes+ans really takes its ANS path."""
    _, _, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(codecs={"float": "planes+ans"}))
    codings = [coding for coding, _ in section_codecs(out)[("base", "enc.w", None)][1]["planes"]]
    assert codings[3] == "ans"  # the top byte: the exponent after the sign is rotated down


@pytest.mark.parametrize("mask_codec", MASK_CODECS)
def test_mask_codecs_are_lossless(fam, tmp_path, mask_codec):
    base, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=LAM, codecs={"mask": mask_codec}))
    coded = section_codecs(out)
    assert {c for (role, _, _), (c, _) in coded.items() if role == "mask"} == {mask_codec}
    if mask_codec == "bits-ctx":  # the context model, not a fallback, coded the big tensor
        assert all(coded[("mask", "enc.w", t)][1]["mode"] == "ctx" for t in tasks)
    with tallzip.open(out) as archive:
        for name in MASKED:
            mtv = np_mtv(base, tasks, name)
            for task in tasks:
                expected = np_mask(base[name], tasks[task][name], mtv, LAM)
                assert np.array_equal(archive.mask(task, name).numpy(), expected), (task, name)
    check_extracted(extract_all(out, tmp_path / "x"), base, tasks)


@pytest.mark.parametrize("mtv_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mask_codec", MASK_CODECS)
def test_reduced_precision_mtv(fam, tmp_path, mtv_dtype, mask_codec):
    """The stored mtv is the fp32 mtv rounded; masks still come from the fp32 mtv; the rebuild adds the
    rounded one (and the context mask codec decodes against the rounded mtv the reader holds)."""
    base, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=LAM, mtv_dtype=mtv_dtype, codecs={"mask": mask_codec}))
    with tallzip.open(out) as archive:
        for name in MASKED:
            assert archive.tensors[name]["kind"] == "masked"
            assert_same_bits(archive.mtv(name).numpy(), np_round_mtv(np_mtv(base, tasks, name), mtv_dtype), name)
    check_extracted(extract_all(out, tmp_path / "x"), base, tasks, mtv_dtype)


def test_base_by_reference_with_every_option(fam, tmp_path):
    base, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=LAM, mtv_dtype="bfloat16", base_ref=True, codecs={"float": "planes+ans", "mask": "bits-ctx"}))
    assert not [key for key in section_codecs(out) if key[0] == "base"]
    with pytest.raises(TallzipError, match="--base"):
        extract_all(out, tmp_path / "nobase")
    check_extracted(extract_all(out, tmp_path / "x", base=base_path), base, tasks, "bfloat16")


def test_unchanged_tensor_is_stored_once(fam, tmp_path):
    base, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    tallzip.pack(tasks_dir, base_path, out)
    with tallzip.open(out) as archive:
        assert archive.tensors["frozen.emb"]["kind"] == "shared"
        assert [key for key in section_codecs(out) if key[1] == "frozen.emb"] == [("base", "frozen.emb", None)]
    for task, got in extract_all(out, tmp_path / "x").items():
        assert_same_bits(got["frozen.emb"], base["frozen.emb"], task)  # -0.0, the subnormal, the largest kept


# --- the command line -----------------------------------------------------------------------------

def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_codec_options(fam, tmp_path):
    base, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    code, output = run("pack", tasks_dir, "--base", base_path, "-o", out, "--lambda", LAM,
                       "--float-codec", "planes+ans", "--mask-codec", "bits+zstd")
    assert code == 0, output
    roles = {}
    for (role, _, _), (codec, _) in section_codecs(out).items():
        roles.setdefault(role, set()).add(codec)
    assert roles["base"] == roles["mtv"] == {"planes+ans"} and roles["mask"] == {"bits+zstd"}
    # the heads are float tensors of the tasks' own: the float codec; the int buffers: zstd
    assert roles["own"] == {"planes+ans", "zstd"}
    code, output = run("extract", out, "--task", "task3", "-o", tmp_path / "t3.safetensors")
    assert code == 0, output
    got, expected = np_load_file(str(tmp_path / "t3.safetensors")), expected_task(base, tasks, "task3")
    for name in expected:
        assert_same_bits(got[name], expected[name], name)


@pytest.mark.parametrize("option, codec, hint", [
    ("--float-codec", "bits-ctx", "--mask-codec"),       # a mask codec for floats
    ("--mask-codec", "planes+zstd", "--float-codec"),    # a float codec for masks
    ("--mask-codec", "bits-ctx-prior", "bits+zstd"),     # needs earlier masks: measurement only
    ("--float-codec", "lz4", "planes+zstd"),             # no such codec
])
def test_cli_refuses_a_codec_of_the_wrong_kind(fam, tmp_path, option, codec, hint):
    _, _, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    code, output = run("pack", tasks_dir, "--base", base_path, "-o", out, option, codec)
    assert code == 2 and "Traceback" not in output
    assert f"Invalid value for '{option}'" in output and hint in output, output
    assert not out.exists()


@pytest.mark.parametrize("choice, message", [
    ({"mask": "planes+zstd"}, "mask codec 'planes+zstd' is not one of bits+zstd, bits-ctx"),
    ({"float": "bits+zstd"}, "float codec 'bits+zstd' is not one of"),
    ({"other": "bits-ctx"}, "other codec"),
    ({"weights": "raw"}, "unknown section kind 'weights'"),
])
def test_pack_refuses_bad_codecs(fam, tmp_path, choice, message):
    _, _, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    with pytest.raises(TallzipError, match=re.escape(message)):
        tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(codecs=choice))
    assert not out.exists()


# --- what `tallzip info` reports ------------------------------------------------------------------

def read_manifest(path):
    """The manifest, read as formats/SPEC.md lays the file out (not through tallzip's reader)."""
    manifest, flags = conftest_read_manifest(path)
    assert flags == 1  # written zstd-compressed
    return manifest


@pytest.mark.parametrize("options", [[], ["--float-codec", "planes+ans", "--mtv-dtype", "bfloat16", "--base-ref"]])
def test_info_bits_per_param_and_ratio(fam, tmp_path, options):
    _, tasks, base_path, tasks_dir = fam
    out = tmp_path / "f.tallz"
    assert run("pack", tasks_dir, "--base", base_path, "-o", out, *options)[0] == 0
    manifest = read_manifest(out)
    stored, elements = {}, {}
    for s in manifest["sections"]:
        stored[s["role"]] = stored.get(s["role"], 0) + s["length"]
        elements[s["role"]] = elements.get(s["role"], 0) + math.prod(s["shape"])
    expected = {role: 8 * stored[role] / elements[role] for role in stored}
    assert ("base" in expected) == (not options)
    code, output = run("info", out, "--json")
    info = json.loads(output)
    assert {role: r["bits_per_param"] for role, r in info["sections"].items()} == pytest.approx(expected, rel=1e-12)
    inputs = sum((tasks_dir / f"{t}.safetensors").stat().st_size for t in tasks)
    assert info["ratio_vs_tasks"] == pytest.approx(inputs / out.stat().st_size, rel=1e-12)
    code, text = run("info", out)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    for role, value in expected.items():
        assert rows[role][-1] == f"{value:.3f}", rows[role]
    assert f"{inputs / out.stat().st_size:.2f}x against the {len(tasks)} fine-tuned files" in text


# --- the storage benchmark's arithmetic -----------------------------------------------------------

def test_storage_benchmark_rows_add_up(fam, tmp_path):
    """benchmarks/sizes/storage.py composes rows from sections coded one by one: its 'all together' row must
    be a real archive's sections to the byte (pack_checked stops otherwise), and its paper layout the
    (64 + N) bits per parameter of the authors' flattened state dict."""
    from benchmarks.sizes import storage

    base, tasks, base_path, tasks_dir = fam
    paths = {t: tasks_dir / f"{t}.safetensors" for t in tasks}
    sizes = storage.measure(base_path, paths, [2, 4], LAM, log=lambda *a, **k: None)
    for n in (2, 4):
        storage.pack_checked(base_path, paths, n, sizes, LAM, tmp_path, log=lambda *a, **k: None)
        paper = storage.section_bytes(sizes, storage.PAPER, n)
        params = sum(x.size for x in base.values())
        assert paper["base"] == paper["mtv"] == 4 * params
        assert paper["mask"] == n * sum((x.size + 7) // 8 for x in base.values())
        own = [x for t in list(tasks)[:n] for name, x in tasks[t].items() if name not in base]
        zstd = zstandard.ZstdCompressor(level=3)
        assert paper["own"] == sum(x.nbytes if x.dtype.kind == "f" else len(zstd.compress(x.tobytes())) for x in own)
