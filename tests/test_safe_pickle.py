"""Tests for formats/safe_pickle.py: checkpoints load as state dicts, pickles never run code."""
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
import torch

from tallzip.formats.checkpoints import safe_pickle
from tallzip.formats.checkpoints.safe_pickle import CheckpointFormatError, UnsafePickleError, load_state_dict
from conftest import import_or_skip


def assert_same_state_dict(actual, expected):
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def rezip_deflated(src, dst):
    """Copy a torch zip with every record compressed, as a user re-zipping it would."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))


def sample_state_dict():
    return OrderedDict(
        weight=torch.randn(4, 3), bias=torch.randn(4).half(), steps=torch.arange(5),
        bf=torch.randn(2, 2).bfloat16(), u16=torch.tensor([1, 2, 60000], dtype=torch.uint16),
        flag=torch.tensor([True, False]), view=torch.randn(6, 4)[1:, ::2])


# ---- (1) plain state dicts -------------------------------------------------------------------

def test_state_dict_roundtrip(tmp_path):
    expected = sample_state_dict()
    torch.save(expected, tmp_path / "sd.pt")
    state, kind = load_state_dict(tmp_path / "sd.pt")
    assert kind == "state_dict"
    assert_same_state_dict(state, expected)


def test_state_dict_wrapper_legacy_and_recompressed(tmp_path):
    expected = sample_state_dict()
    torch.save({"state_dict": expected, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save(expected, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    rezip_deflated(tmp_path / "wrapped.pt", tmp_path / "deflated.pt")
    for name in ["wrapped.pt", "legacy.pt", "deflated.pt"]:
        state, kind = load_state_dict(tmp_path / name)
        assert kind == "state_dict"
        assert_same_state_dict(state, expected)


@pytest.mark.parametrize("container", ["zip", "legacy", "deflated"])
def test_state_dict_beside_foreign_objects_uses_restricted_reader(tmp_path, container):
    # weights_only refuses the Namespace, so this goes through the restricted reader
    import argparse
    expected = sample_state_dict()
    checkpoint = {"state_dict": expected, "args": argparse.Namespace(lr=0.1, model="ViT-B-32")}
    torch.save(checkpoint, tmp_path / "ckpt.pt", _use_new_zipfile_serialization=container != "legacy")
    if container == "deflated":
        rezip_deflated(tmp_path / "ckpt.pt", tmp_path / "ckpt2.pt")
        os.replace(tmp_path / "ckpt2.pt", tmp_path / "ckpt.pt")
    with pytest.raises(Exception):
        torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state, kind = load_state_dict(tmp_path / "ckpt.pt")
    assert kind == "state_dict"
    assert_same_state_dict(state, expected)


# ---- (2) whole pickled nn.Modules ------------------------------------------------------------

MODELING_SOURCE = '''
import pathlib, torch
from collections import OrderedDict
from torch import nn

IMPORT_LOG = pathlib.Path(__file__).with_name("imported.log")
with IMPORT_LOG.open("a") as log:  # lets the test see any import of this module
    log.write("x")

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(), c_proj=nn.Linear(2 * width, width)))

class ImageEncoder(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 4, stride=4, bias=False)     # a None bias
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.blocks[1].half()
        self.proj = nn.Parameter(torch.randn(width, 4))
        self.register_parameter("extra_bias", None)
        self.register_buffer("position_ids", torch.arange(5))
        self.register_buffer("attn_mask", torch.ones(5, 5), persistent=False)
        self.register_buffer("unused", None)
        self.head = nn.Linear(4, 3)
        self.tied_head = self.head                                     # shared module: listed twice
        self.dropped = None
        self.cache_dir = "/tmp/cache"
        self.settings = {"mode": b"fast", "sizes": (1, 2)}
'''


@pytest.fixture
def throwaway_modeling(tmp_path):
    """A `src.modeling` package on sys.path, removed again afterwards."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "__init__.py").write_text("")
    (tmp_path / "src" / "modeling.py").write_text(textwrap.dedent(MODELING_SOURCE))
    sys.path.insert(0, str(tmp_path))
    try:
        import src.modeling
        yield src.modeling, tmp_path / "src" / "imported.log"
    finally:
        sys.path.remove(str(tmp_path))
        for name in ["src", "src.modeling"]:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickled_module_reads_without_import(tmp_path, throwaway_modeling, legacy):
    modeling, import_log = throwaway_modeling
    model = modeling.ImageEncoder()
    expected = model.state_dict()
    assert "attn_mask" not in expected and "conv1.bias" not in expected
    path = tmp_path / "finetuned.pt"
    torch.save(model, path, _use_new_zipfile_serialization=not legacy)

    del model, modeling
    for name in ["src", "src.modeling"]:
        sys.modules.pop(name)
    sys.path.remove(str(tmp_path))  # the fixture puts it back so that its cleanup stays simple
    try:
        state, kind = load_state_dict(path)
    finally:
        sys.path.insert(0, str(tmp_path))
    assert kind == "module"
    assert_same_state_dict(state, expected)
    assert "src.modeling" not in sys.modules and "src" not in sys.modules
    assert import_log.read_text() == "x"  # imported once, by the test itself


def test_pickled_open_clip_model_with_transforms(tmp_path):
    open_clip = import_or_skip("open_clip")
    model = open_clip.model.CLIP(
        embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1))
    # like the task-vector ImageEncoder: torchvision transforms (with an InterpolationMode enum) ride along
    model.train_preprocess = open_clip.image_transform(32, is_train=True)
    model.val_preprocess = open_clip.image_transform(32, is_train=False)
    del model.transformer
    expected = model.state_dict()
    torch.save(model, tmp_path / "zeroshot.pt")
    state, kind = load_state_dict(tmp_path / "zeroshot.pt")
    assert kind == "module"
    assert_same_state_dict(state, expected)


def test_big_endian_records_are_swapped(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))  # all float32
    expected = model.state_dict()
    torch.save(model, tmp_path / "little.pt")
    # rewrite as a big-endian machine would have saved it
    with zipfile.ZipFile(tmp_path / "little.pt") as old, zipfile.ZipFile(tmp_path / "big.pt", "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
            new.writestr(info.filename, data)
    state, kind = load_state_dict(tmp_path / "big.pt")
    assert kind == "module"
    assert_same_state_dict(state, expected)


# ---- (3) and (4) malicious pickles -----------------------------------------------------------

class RunsShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalsCode:
    def __reduce__(self):
        return eval, ("open('pwned', 'w')",)


class StartsProcess:
    def __reduce__(self):
        return subprocess.Popen, (["touch", "pwned"],)


def torch_zip_with_pickle(path, payload):
    """A genuine torch zip container whose data.pkl is replaced by `payload`."""
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as old:
        records = {info.filename: old.read(info.filename) for info in old.infolist()}
    with zipfile.ZipFile(path, "w") as new:
        for name, data in records.items():
            new.writestr(name, payload if name.endswith("/data.pkl") else data)


def assert_refused(path, global_name):
    with pytest.raises(UnsafePickleError) as caught:
        load_state_dict(path)
    message = str(caught.value)
    assert global_name in message and "\n" not in message


def test_os_system_refused_raw_and_in_zip(tmp_path):
    marker = tmp_path / "marker"
    command = f"touch {marker}"
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(RunsShellCommand(command), protocol=2))
    (tmp_path / "opcodes.pkl").write_bytes(f"cos\nsystem\n(V{command}\ntR.".encode())
    torch_zip_with_pickle(tmp_path / "spliced.pt", pickle.dumps({"w": RunsShellCommand(command)}))
    torch.save({"w": torch.ones(2), "x": RunsShellCommand(command)}, tmp_path / "saved.pt")
    os_module = os.system.__module__  # "posix" on Linux
    assert_refused(tmp_path / "raw.pkl", f"{os_module}.system")
    assert_refused(tmp_path / "opcodes.pkl", "os.system")
    assert_refused(tmp_path / "spliced.pt", f"{os_module}.system")
    assert_refused(tmp_path / "saved.pt", f"{os_module}.system")
    assert not marker.exists()


@pytest.mark.parametrize("payload, global_name", [
    (pickle.dumps(EvalsCode(), protocol=2), "builtins.eval"),
    (pickle.dumps(StartsProcess(), protocol=4), "subprocess.Popen"),
    # getattr(__import__('os'), 'system')('touch pwned')
    (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch pwned\ntR.", "builtins.getattr"),
    (b"c__builtin__\ngetattr\n(c__builtin__\nobject\nVmro\ntR.", "builtins.getattr"),
    (b"ctorch\nload\n(Vx.pt\ntR.", "torch.load"),
    (b"ctorch.storage\n_load_from_bytes\n(C\x00\ntR.", "torch.storage._load_from_bytes"),
    (b"cnumpy\nload\n(Vx.npy\ntR.", "numpy.load"),
    # unknown package: stubbed, so the lookup passes, but calling the stub is refused
    (b"csrc.modeling\nrun_anything\n(Vtouch pwned\ntR.", "src.modeling.run_anything"),
    # _reconstructor may only build stubs
    (b"ccopy_reg\n_reconstructor\n(ccollections\nOrderedDict\nc__builtin__\nobject\nNtR.",
     "copyreg._reconstructor"),
    (b"ctorch._utils\n_rebuild_tensor_v2\n(Vnot a storage\nK\x00)))NtR.", "tensor rebuild"),
], ids=["eval", "popen", "getattr-import", "getattr-chain", "torch.load", "load_from_bytes", "numpy",
        "call-stub", "reconstructor", "fake-storage"])
def test_dangerous_globals_refused(tmp_path, monkeypatch, payload, global_name):
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)  # payloads that would write files would write here
    (tmp_path / "raw.pkl").write_bytes(payload)
    torch_zip_with_pickle(tmp_path / "zip.pt", payload)
    assert_refused(tmp_path / "raw.pkl", global_name)
    assert_refused(tmp_path / "zip.pt", global_name)
    assert list(scratch.iterdir()) == []


def test_inert_value_types_only_take_literals(tmp_path):
    payload = b"ctorchvision.transforms.functional\nInterpolationMode\n(cposix\nsystem\ntR."
    (tmp_path / "p.pkl").write_bytes(payload)
    assert_refused(tmp_path / "p.pkl", "posix.system")
    payload = b"ctorchvision.transforms.functional\nInterpolationMode\n(]tR."
    (tmp_path / "p.pkl").write_bytes(payload)
    assert_refused(tmp_path / "p.pkl", "InterpolationMode")


def test_build_cannot_tamper_with_allowed_functions(tmp_path):
    # BUILD with slot state does setattr(obj, name, value): on a plain function that would
    # change its __defaults__ for every later load in the process.
    payload = b"ctorch._utils\n_rebuild_tensor_v2\n(N}(V__defaults__\n(I7\ntutb."
    (tmp_path / "tamper.pkl").write_bytes(payload)
    with pytest.raises(CheckpointFormatError):
        load_state_dict(tmp_path / "tamper.pkl")
    assert safe_pickle._rebuild_tensor_v2.function.__defaults__ == (None,)
    test_state_dict_roundtrip(tmp_path)


# ---- (5) damaged and foreign files -----------------------------------------------------------

def test_garbage_and_truncated_files(tmp_path):
    torch.save(sample_state_dict(), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    files = {
        "truncated.pt": good[: len(good) // 2],
        "garbage.pt": os.urandom(4096),
        "empty.pt": b"",
        "text.pt": b"hello world\n",
        "plain-pickle.pkl": pickle.dumps([1, 2, 3]),
        "not-torch.zip": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "not-torch.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    for name in [*files, "missing.pt"]:
        with pytest.raises(CheckpointFormatError) as caught:
            load_state_dict(tmp_path / name)
        assert not isinstance(caught.value, UnsafePickleError)
        assert "\n" not in str(caught.value), name
