"""The fast paths (issue 5) against independent computations: the TALL formula in numpy, numpy's
packbits, and safetensors' own reader. GPU tests skip where there is no CUDA device."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file

import tallzip
from tallzip.ops import bits
from tallzip.ops import tall
from tallzip.ops.ties import MtvMerger
from tallzip.run.threads import resolve_device
from tallzip.errors import TallzipError
from tallzip.family import Family
from tallzip.formats.codecs import registry as codecs
from tallzip.formats.checkpoints.checkpoint import open_checkpoint
from tallzip.formats.checkpoints.outputs import SafetensorsStream
from tallzip.formats.errors import FormatError
from tallzip.formats.container.reader import ArchiveReader
from tallzip.formats.container.writer import ArchiveWriter, encode_chunk, encode_packed_mask_chunk

from conftest import np_mask, np_mtv, np_rebuilt, numpy_family, write_family
from tallzip.options import RunOptions, StoreOptions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MASKED = ("enc.w", "enc.b", "blk.0.w")


def expected_task(base, tasks, task, lam):
    """Every masked tensor of a task rebuilt by the formula in numpy."""
    out = {}
    for name in MASKED:
        out[name] = np_rebuilt(base, tasks, task, name, lam)
    return out


@pytest.fixture
def packed(tmp_path):
    base, tasks = numpy_family(n_tasks=3, seed=3)
    base_path, tasks_dir = write_family(tmp_path / "fam", base, tasks)
    out = tmp_path / "f.tallz"
    return base, tasks, base_path, tasks_dir, out


# --- bit-packing -------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
def test_pack_bits_is_numpy_packbits_little(count):
    mask = np.random.default_rng(count).random(count) < 0.3
    expected = np.packbits(mask, bitorder="little")
    for pack in (bits.pack_bits, bits.pack_bits_tensor):  # the numpy path and the tensor ops a GPU runs
        got = pack(torch.from_numpy(mask))
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), expected)
    for unpack in (bits.unpack_bits, bits.unpack_bits_tensor):
        assert np.array_equal(unpack(torch.from_numpy(expected), count).numpy(), mask)


def test_unpack_refuses_too_few_bytes():
    with pytest.raises(ValueError):
        bits.unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


# --- the chunked mask computation -----------------------------------------------------------

@pytest.mark.parametrize("chunk", [5, 64, 1 << 16])
def test_masked_tensor_is_the_formula_in_numpy(packed, monkeypatch, chunk):
    base, tasks, base_path, tasks_dir, _ = packed
    monkeypatch.setattr(tall, "CPU_CHUNK", chunk)  # slices that do not divide the tensors
    family = Family.open(tasks_dir, base_path)
    merger = MtvMerger(family, "sum", 0.2, torch.device("cpu"), None)
    lambdas = [0.2, 0.4, 0.6]
    for name in MASKED:
        b, ts = family.tensors(name)
        mtv, packed_masks, ones = tall.masked_tensor(merger, b, ts, lambdas, torch.device("cpu"))
        expected_mtv = np_mtv(base, tasks, name)
        assert np.array_equal(mtv.numpy(), expected_mtv)
        for task, lam, got, n_ones in zip(tasks, lambdas, packed_masks, ones):
            expected = np_mask(base[name], tasks[task][name], expected_mtv, lam).reshape(-1)
            assert np.array_equal(got, np.packbits(expected, bitorder="little")), (name, task)
            assert n_ones == int(expected.sum())


def test_masked_tensor_ties_agrees_with_the_whole_tensor_formula(packed, monkeypatch):
    from tallzip.ops import taskvec
    base, tasks, base_path, tasks_dir, _ = packed
    monkeypatch.setattr(tall, "CPU_CHUNK", 7)
    family = Family.open(tasks_dir, base_path)
    merger = MtvMerger(family, "ties", 0.3, torch.device("cpu"), None)
    for name in MASKED:
        b, ts = family.tensors(name)
        mtv, packed_masks, _ = tall.masked_tensor(merger, b, ts, [0.4] * 3, torch.device("cpu"))
        whole = merger.mtv(b, ts)  # elementwise given the thresholds: slicing must not change it
        assert torch.equal(mtv, whole)
        for t, got in zip(ts, packed_masks):
            expected = np_mask(b.numpy(), t.numpy(), whole.numpy(), 0.4).reshape(-1)
            assert np.array_equal(got, np.packbits(expected, bitorder="little"))


def test_masked_tensor_bfloat16_inputs(monkeypatch):
    monkeypatch.setattr(tall, "CPU_CHUNK", 6)
    gen = torch.Generator().manual_seed(0)
    base = (0.05 * torch.randn(5, 7, generator=gen)).to(torch.bfloat16)
    tasks = [(base.float() + 0.01 * torch.randn(5, 7, generator=gen)).to(torch.bfloat16) for _ in range(3)]

    class SumMerger:
        method = "sum"
    mtv, packed_masks, _ = tall.masked_tensor(SumMerger(), base, tasks, [0.5] * 3, torch.device("cpu"))
    b32 = base.float().numpy()
    t32 = [t.float().numpy() for t in tasks]
    expected_mtv = ((t32[0] - b32) + (t32[1] - b32)).astype(np.float32) + (t32[2] - b32)
    assert mtv.dtype == torch.float32 and np.array_equal(mtv.numpy(), expected_mtv)
    for t, got in zip(t32, packed_masks):
        assert np.array_equal(got, np.packbits(np_mask(b32, t, expected_mtv, 0.5).reshape(-1), bitorder="little"))


# --- pack end to end, and the finite checks the pipeline reorders --------------------------

@pytest.mark.parametrize("codec", ["bits+zstd", "bits-ctx"])
def test_pack_then_load_extract_and_iter_are_the_formula(packed, monkeypatch, codec):
    base, tasks, base_path, tasks_dir, out = packed
    monkeypatch.setattr(tall, "CPU_CHUNK", 11)
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=0.3, codecs={"mask": codec}), run=RunOptions(device="cpu"))
    with tallzip.open(out) as archive:
        for task in tasks:
            expected = expected_task(base, tasks, task, 0.3)
            state = archive.load(task)
            for name in MASKED:
                assert np.array_equal(state[name].numpy(), expected[name]), (task, name)
            target = out.parent / f"{task}.safetensors"
            archive.extract(task, target)
            got = load_file(str(target))
            assert set(got) == set(state)
            for name, tensor in state.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
            with safe_open(str(target), "np") as fh:
                assert fh.metadata() == {"task": task}
            # one tensor at a time gives the same as the streamed whole
            assert torch.equal(archive.task_tensor(task, "enc.w"), state["enc.w"])


@pytest.mark.parametrize("fmt", [None, "pt"])
def test_extract_all_writes_every_task_as_the_formula(packed, fmt):
    base, tasks, base_path, tasks_dir, out = packed
    lambdas = {"task0": 0.2, "task1": 0.4, "task2": 0.6}
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=lambdas))
    folder = out.parent / "all"
    with tallzip.open(out) as archive:
        paths = archive.extract(None, folder, fmt=fmt).paths
    assert sorted(p.name for p in paths) == sorted(f"{t}.{fmt or 'safetensors'}" for t in tasks)
    for path in paths:
        task = path.name.split(".")[0]
        got = load_file(str(path)) if fmt is None else torch.load(path)
        assert set(got) == set(tasks[task])
        for name, expected in expected_task(base, tasks, task, lambdas[task]).items():
            assert np.array_equal(got[name].numpy(), expected), (task, name)
        for name in ("frozen.emb", "head.weight", "steps"):
            assert np.array_equal(got[name].numpy(), tasks[task][name])


def test_nonfinite_inputs_are_named(packed, tmp_path):
    base, tasks, _, _, out = packed
    bad = {t: dict(sd) for t, sd in tasks.items()}
    bad["task1"]["enc.w"] = bad["task1"]["enc.w"].copy()
    bad["task1"]["enc.w"][2, 3] = np.nan
    base_path, tasks_dir = write_family(tmp_path / "bad", base, bad)
    with pytest.raises(TallzipError, match=r"task 'task1': tensor 'enc.w' holds NaN"):
        tallzip.pack(tasks_dir, base_path, out)
    assert not out.exists()
    bad_base = dict(base)
    bad_base["blk.0.w"] = bad_base["blk.0.w"].copy()
    bad_base["blk.0.w"][0, 0] = np.inf
    base_path, tasks_dir = write_family(tmp_path / "badbase", bad_base, tasks)
    with pytest.raises(TallzipError, match=r"base: tensor 'blk.0.w' holds NaN or Inf"):
        tallzip.pack(tasks_dir, base_path, out)
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(allow_nonfinite=True))
    assert out.exists()


def test_device_errors_are_one_line():
    with pytest.raises(TallzipError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(TallzipError, match="not supported"):
        resolve_device("meta")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TallzipError, match="no CUDA device is available"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_cli_device_cuda_without_gpu_is_a_clear_error(packed):
    from click.testing import CliRunner
    from tallzip.cli.main import cli
    _, _, base_path, tasks_dir, out = packed
    result = CliRunner().invoke(cli, ["pack", str(tasks_dir), "--base", str(base_path), "-o", str(out), "--device", "cuda"])
    assert result.exit_code != 0
    assert "no CUDA device is available" in result.output and "Traceback" not in result.output


# --- the writer's packed masks --------------------------------------------------------------

def manifest_for(tensors=None, task="t"):
    """The smallest manifest the reader accepts: a tensor table, an empty base and one task."""
    return {"merge": {"method": "sum"}, "base": {"names": [], "metadata": None},
            "tensors": {name: {"kind": "masked", "dtype": dtype, "shape": list(shape)}
                        for name, (dtype, shape) in (tensors or {}).items()},
            "tasks": [{"name": task, "lambda": 0.4, "tensors": [], "layout": "file", "format": "safetensors",
                       "metadata": None, "files": []}]}


@pytest.mark.parametrize("codec", ["bits+zstd", "bits-ctx"])
def test_writer_packed_mask_is_the_same_chunk_as_the_bool_mask(tmp_path, codec):
    rng = np.random.default_rng(1)
    mtv = rng.normal(size=(40, 30)).astype(np.float32)
    mask = rng.random((40, 30)) < np.clip(np.abs(mtv) / 3, 0, 1)
    context = {"mtv": mtv.reshape(-1), "shape": (40, 30)}
    coded = [encode_chunk(codec, mask.reshape(-1), 3, context),
             encode_packed_mask_chunk(codec, np.packbits(mask.reshape(-1), bitorder="little"), mask.size, 3, context)]
    assert coded[0] == coded[1]
    with ArchiveWriter(tmp_path / "x.tallz") as writer:
        entry = writer.section(role="mask", tensor="w", task="t", dtype="BOOL", shape=mask.shape, codec=codec)
        writer.write_chunk(entry, *coded[1], ones=int(mask.sum()))
        entry = writer.finish(manifest_for({"w": ("F32", mask.shape)}))["sections"][0]
    reader = ArchiveReader(tmp_path / "x.tallz")
    assert np.array_equal(reader.read(entry, context).reshape(mask.shape), mask)
    assert np.array_equal(reader.read_mask_bits(entry, context), np.packbits(mask.reshape(-1), bitorder="little"))


def test_writer_refuses_wrong_packed_size():
    with pytest.raises(ValueError):
        encode_packed_mask_chunk("bits+zstd", np.zeros(2, dtype=np.uint8), 17)


# --- checkpoints read with pread, written as a stream ----------------------------------------

def mixed_tensors():
    rng = np.random.default_rng(2)
    return OrderedDict([
        ("b.f16", rng.normal(size=(3, 5)).astype(np.float16)),
        ("a.f32", rng.normal(size=(4, 6)).astype(np.float32)),
        ("scalar", np.array(3.5, dtype=np.float64)),
        ("empty", np.zeros((0, 4), dtype=np.float32)),
        ("flags", rng.random(9) < 0.5),
        ("steps", np.array([7, 8], dtype=np.int64)),
    ])


def test_pread_reader_matches_safetensors(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "m.safetensors"
    np_save_file(dict(tensors), str(path), metadata={"k": "v"})
    ckpt = open_checkpoint(path)
    reference = load_file(str(path))
    assert set(ckpt.names) == set(reference) and ckpt.metadata == {"k": "v"}
    for name in ckpt.names:
        got = ckpt.get(name)
        assert got.dtype == reference[name].dtype and torch.equal(got, reference[name]), name
        ckpt.will_need(name)  # a hint only


def test_pread_reader_refuses_bad_offsets(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(FormatError, match="bad entry for tensor 'w'"):
        open_checkpoint(path)


def test_safetensors_stream_round_trips_in_any_write_order(tmp_path):
    tensors = OrderedDict((k, torch.from_numpy(v)) for k, v in mixed_tensors().items())
    specs = [(name, {torch.float16: "F16", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL",
                     torch.int64: "I64"}[t.dtype], list(t.shape)) for name, t in tensors.items()]
    path = tmp_path / "s.safetensors"
    with SafetensorsStream(path, specs, {"task": "x"}) as stream:
        for name in reversed(list(tensors)):
            stream.write(name, tensors[name])
    got = load_file(str(path))
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"task": "x"}
    assert open_checkpoint(path).names == list(tensors)  # the header keeps the given order


def test_safetensors_stream_refuses_wrong_or_missing_tensors(tmp_path):
    specs = [("a", "F32", [2]), ("b", "F32", [3])]
    with pytest.raises(FormatError, match="expected F32"):
        with SafetensorsStream(tmp_path / "x.safetensors", specs) as stream:
            stream.write("a", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(FormatError, match="'b' was never written"):
        with SafetensorsStream(tmp_path / "y.safetensors", specs) as stream:
            stream.write("a", torch.zeros(2))


# --- resident serving ---------------------------------------------------------------------------

def test_resident_switch_is_the_formula_and_equals_load(packed):
    base, tasks, base_path, tasks_dir, out = packed
    lambdas = {"task0": 0.2, "task1": 0.4, "task2": 0.6}
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=lambdas))
    with tallzip.open(out) as archive:
        resident = archive.resident(device="cpu")
        for task in ["task1", "task0", "task2", "task1"]:  # back and forth
            state = resident.switch(task).state_dict()
            expected = expected_task(base, tasks, task, lambdas[task])
            for name in MASKED:
                assert np.array_equal(state[name].numpy(), expected[name]), (task, name)
            loaded = archive.load(task)
            assert list(state) == list(loaded)
            for name, tensor in loaded.items():
                assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), (task, name)
        with pytest.raises(TallzipError, match="not resident"):
            resident.switch("nope")


def test_resident_bind_updates_a_module_in_place(packed):
    base, tasks, base_path, tasks_dir, out = packed
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=0.4))

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(16, 12))
            self.b = torch.nn.Parameter(torch.zeros(16))

        def forward(self, x):
            return x @ self.w.T + self.b

    with tallzip.open(out) as archive:
        resident = archive.resident(device="cpu", tasks=["task0", "task2"])
        model = Encoder()
        assert resident.bind(model, prefix="enc.") == ["enc.w", "enc.b"]
        x = torch.randn(2, 12)
        for task in ("task2", "task0"):
            resident.switch(task)
            expected = expected_task(base, tasks, task, 0.4)
            assert np.array_equal(model.w.detach().numpy(), expected["enc.w"])
            got = model(x)
            assert torch.allclose(got, x @ torch.from_numpy(expected["enc.w"]).T + torch.from_numpy(expected["enc.b"]))
        with pytest.raises(TallzipError, match="has no tensor 'w'"):
            resident.bind(Encoder())  # no prefix: names do not match
        with pytest.raises(TallzipError, match="not resident"):
            resident.switch("task1")


# --- GPU: run on a machine with CUDA ------------------------------------------------------------

@cuda
def test_gpu_pack_masks_agree_with_cpu_bit_for_bit(packed, tmp_path):
    base, tasks, base_path, tasks_dir, out = packed
    on_gpu = tmp_path / "gpu.tallz"
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=0.3), run=RunOptions(device="cpu"))
    tallzip.pack(tasks_dir, base_path, on_gpu, store=StoreOptions(lambdas=0.3), run=RunOptions(device="cuda"))
    with tallzip.open(out) as a, tallzip.open(on_gpu) as b:
        sections = lambda arc: {(s["role"], s["tensor"], s["task"]): s["sha256"] for s in arc.manifest["sections"]}
        assert sections(a) == sections(b)
        for task in tasks:
            expected = expected_task(base, tasks, task, 0.3)
            state = b.load(task, device="cuda")
            for name in MASKED:
                assert state[name].is_cuda and np.array_equal(state[name].cpu().numpy(), expected[name])


@cuda
def test_gpu_bit_packing_matches_numpy():
    mask = torch.rand(100_003, device="cuda") < 0.3
    got = bits.pack_bits(mask)
    assert got.is_cuda and np.array_equal(got.cpu().numpy(), np.packbits(mask.cpu().numpy(), bitorder="little"))
    assert torch.equal(bits.unpack_bits(got, mask.numel()), mask)


@cuda
def test_gpu_resident_switch_equals_load(packed):
    base, tasks, base_path, tasks_dir, out = packed
    tallzip.pack(tasks_dir, base_path, out, store=StoreOptions(lambdas=0.5))
    with tallzip.open(out) as archive:
        resident = archive.resident(device="cuda")
        for task in tasks:
            state = resident.switch(task).state_dict()
            expected = expected_task(base, tasks, task, 0.5)
            for name in MASKED:
                assert state[name].is_cuda and np.array_equal(state[name].cpu().numpy(), expected[name])
