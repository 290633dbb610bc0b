"""Task folders as transformers and diffusers write them (issue 18): the model file(s) found by their
Hugging Face names, every other file kept as bytes whatever its extension and returned byte for byte
(a size limit is an error naming the file, never a skip), adapters refused; and no command writes over
one of its own input files, not even with --force."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import save_file

from tallzip.cli.main import cli
from tallzip.formats.checkpoints import checkpoint as checkpoints
from tallzip.formats.checkpoints import folders

N_TASKS = 3


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


class Boom:
    """A pickle that, if ever loaded, leaves a file behind (tallzip must keep it as bytes only)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled!"))


def tensors(seed: int, base=None) -> dict:
    gen = np.random.default_rng(seed)
    if base is None:
        return {"embed.weight": gen.standard_normal((16, 8)).astype(np.float32),
                "layers.0.weight": gen.standard_normal((8, 8)).astype(np.float32),
                "layers.1.weight": gen.standard_normal((8, 8)).astype(np.float32)}
    return {n: (t + 0.01 * gen.standard_normal(t.shape)).astype(np.float32) for n, t in base.items()}


def save_hf_folder(folder: Path, state: dict, *, sharded: bool, side: dict[str, bytes]):
    """A folder as save_pretrained writes it: model.safetensors, or two shards with an index (written
    with json.dumps(indent=2) + a trailing newline, as transformers does), and side files."""
    folder.mkdir(parents=True)
    torch_state = {n: torch.from_numpy(t) for n, t in state.items()}
    if sharded:
        names = list(torch_state)
        shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
        for file, part in shards.items():
            save_file({n: torch_state[n] for n in part}, str(folder / file), {"format": "pt"})
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {n: f for f, part in shards.items() for n in part}}
        (folder / folders.SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        save_file(torch_state, str(folder / "model.safetensors"), {"format": "pt"})
    for name, data in side.items():
        (folder / name).write_bytes(data)


def side_files(tmp_path, task: int) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}\n',
            "training_args.bin": pickle.dumps(Boom(tmp_path / "UNPICKLED")),
            "optimizer.pt": os.urandom(300) + bytes([task]),
            "notes.safetensors": b"not a checkpoint at all " + bytes([task]),
            "rng_state.pth": bytes(range(256))}


@pytest.fixture(params=[True, False], ids=["sharded", "single"])
def hf_family(request, tmp_path):
    sharded = request.param
    base = tensors(0)
    save_hf_folder(tmp_path / "base", base, sharded=sharded, side={"config.json": b"{}\n"})
    for i in range(N_TASKS):
        save_hf_folder(tmp_path / "tasks" / f"t{i}", tensors(10 + i, base), sharded=sharded,
                       side=side_files(tmp_path, i))
    return tmp_path / "base", tmp_path / "tasks", sharded


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- item 2 and 3: every file of a task folder is kept, the model found by its Hugging Face name ----

def test_every_side_file_comes_back_byte_for_byte_with_keep_exact(hf_family, tmp_path):
    base, tasks, sharded = hf_family
    out = tmp_path / "f.tallz"
    run("pack", tasks, "--base", base, "-o", out, "--keep", "exact")
    run("extract", out, "--all", "-o", tmp_path / "back")
    for i in range(N_TASKS):
        original, back = folder_bytes(tasks / f"t{i}"), folder_bytes(tmp_path / "back" / f"t{i}")
        assert sorted(back) == sorted(original)  # training_args.bin, optimizer.pt, the index: all there
        assert back == original  # byte for byte: shards (exact), side files and the index's own bytes
    assert not (tmp_path / "UNPICKLED").exists()  # training_args.bin was never unpickled
    assert json.loads(run("verify", out, "--against", tasks, "--json").output)["verdict"] == "matches"


def test_tall_tasks_keep_their_side_files_and_the_index_bytes(hf_family, tmp_path):
    base, tasks, sharded = hf_family
    out = tmp_path / "f.tallz"
    run("pack", tasks, "--base", base, "-o", out)
    run("extract", out, "--task", "t1", "-o", tmp_path / "t1")
    original, back = folder_bytes(tasks / "t1"), folder_bytes(tmp_path / "t1")
    models = {n for n in original if n.startswith("model")} - {folders.SHARD_INDEX}
    assert sorted(back) == sorted(original)
    assert {n: b for n, b in back.items() if n not in models} == {n: b for n, b in original.items() if n not in models}
    rebuilt = {}
    for name in models:
        rebuilt.update(np_load_file(str(tmp_path / "t1" / name)))
    assert sorted(rebuilt) == sorted(tensors(0))


@pytest.mark.parametrize("change", ["edit", "delete"])
def test_verify_differs_when_a_side_file_differs_or_is_missing(hf_family, tmp_path, change):
    base, tasks, _ = hf_family
    out = tmp_path / "f.tallz"
    run("pack", tasks, "--base", base, "-o", out, "--keep", "exact")
    victim = tasks / "t2" / "training_args.bin"
    if change == "edit":
        victim.write_bytes(victim.read_bytes()[:-1] + b"X")
    else:
        victim.unlink()
    report = json.loads(run("verify", out, "--against", tasks, "--json", code=1).output)
    assert report["verdict"] == "differs"
    assert report["tasks"]["t2"]["verdict"] == "differs" and report["tasks"]["t0"]["verdict"] == "matches"


def test_a_side_file_over_the_limit_is_an_error_naming_it(hf_family, tmp_path, monkeypatch):
    base, tasks, _ = hf_family
    monkeypatch.setattr(folders, "MAX_EXTRA_FILE_BYTES", 1024)
    (tasks / "t1" / "big.bin").write_bytes(b"\0" * 1025)
    out = tmp_path / "f.tallz"
    result = run("pack", tasks, "--base", base, "-o", out, code=1)
    assert "big.bin" in result.output and "side file" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == []


def test_readme_states_the_side_file_limit_of_the_code():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{folders.MAX_EXTRA_FILE_BYTES >> 20} MiB" in readme
    assert "16 MiB" not in readme


def test_trainer_output_packs(tmp_path):
    """model.safetensors beside training_args.bin (what Trainer.save_model writes) is one task."""
    base = tensors(0)
    save_hf_folder(tmp_path / "base", base, sharded=False, side={})
    for i in range(2):
        save_hf_folder(tmp_path / "tasks" / f"t{i}", tensors(1 + i, base), sharded=False,
                       side={"training_args.bin": pickle.dumps(Boom(tmp_path / "UNPICKLED"))})
    ckpt = checkpoints.open_checkpoint(tmp_path / "tasks" / "t0")
    assert ckpt.path.name == "model.safetensors" and set(ckpt.extra_files) == {"training_args.bin"}
    run("pack", tmp_path / "tasks", "--base", tmp_path / "base", "-o", tmp_path / "f.tallz")
    run("extract", tmp_path / "f.tallz", "--task", "t0", "-o", tmp_path / "back")
    assert (tmp_path / "back" / "training_args.bin").read_bytes() == \
        (tmp_path / "tasks" / "t0" / "training_args.bin").read_bytes()
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "pytorch_model.bin"])
def test_other_hugging_face_model_names_are_the_model(tmp_path, name):
    folder = tmp_path / "unet"
    folder.mkdir()
    state = {"w": torch.randn(4, 4)}
    if name.endswith(".bin"):
        torch.save(state, folder / name)
    else:
        save_file(state, str(folder / name))
    save_file({"x": torch.zeros(2)}, str(folder / "ema.safetensors"))  # a side file, not a second model
    ckpt = checkpoints.open_checkpoint(folder)
    assert ckpt.path.name == name and ckpt.names == ["w"] and set(ckpt.extra_files) == {"ema.safetensors"}


@pytest.mark.parametrize("adapter", ["adapter_model.safetensors", "adapter_model.bin"])
def test_an_adapter_folder_is_refused_in_one_line(tmp_path, adapter):
    base = tensors(0)
    save_hf_folder(tmp_path / "base", base, sharded=False, side={})
    for i in range(2):
        save_hf_folder(tmp_path / "tasks" / f"t{i}", tensors(1 + i, base), sharded=False, side={})
    (tmp_path / "tasks" / "t1" / "model.safetensors").rename(tmp_path / "tasks" / "t1" / adapter)
    (tmp_path / "tasks" / "t1" / "adapter_config.json").write_text("{}")
    result = run("pack", tmp_path / "tasks", "--base", tmp_path / "base", "-o", tmp_path / "f.tallz", code=1)
    assert "adapter" in result.output and "not a full checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "f.tallz").exists()


def test_hidden_files_are_side_files_and_come_back(hf_family, tmp_path):
    base, tasks, sharded = hf_family
    (tasks / "t1" / ".gitattributes").write_bytes(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    out = tmp_path / "f.tallz"
    run("pack", tasks, "--base", base, "-o", out)
    run("extract", out, "--task", "t1", "-o", tmp_path / "back")
    assert (tmp_path / "back" / ".gitattributes").read_bytes() == (tasks / "t1" / ".gitattributes").read_bytes()
    (tasks / "t1" / ".gitattributes").write_bytes(b"changed\n")
    assert json.loads(run("verify", out, "--against", tasks, "--json", code=1).output)["verdict"] == "differs"


@pytest.mark.parametrize("sub_folder", ["checkpoint-500", ".git"])
def test_a_sub_folder_of_a_task_is_refused_naming_it(hf_family, tmp_path, sub_folder):
    base, tasks, sharded = hf_family
    (tasks / "t2" / sub_folder).mkdir()
    (tasks / "t2" / sub_folder / "optimizer.pt").write_bytes(b"state")
    out = tmp_path / "f.tallz"
    result = run("pack", tasks, "--base", base, "-o", out, code=1)
    assert f"{sub_folder}/" in result.output and "t2" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


# ---- item 4: no command writes over one of its inputs -------------------------------------------------

def _refused(result, path: Path, before: bytes):
    assert "input" in result.output and len(result.output.strip().splitlines()) == 1
    assert path.read_bytes() == before
    assert [p for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture
def sharded_family(tmp_path):
    base = tensors(0)
    save_hf_folder(tmp_path / "base", base, sharded=True, side={"config.json": b"{}"})
    for i in range(N_TASKS):
        save_hf_folder(tmp_path / "tasks" / f"t{i}", tensors(10 + i, base), sharded=True,
                       side={"config.json": b"{}", "training_args.bin": b"\x80\x04N."})
    return tmp_path / "base", tmp_path / "tasks"


@pytest.mark.parametrize("target", ["base/model-00001-of-00002.safetensors", "tasks/t1/model-00002-of-00002.safetensors",
                                    "tasks/t0/training_args.bin", "link-to-shard"])
def test_pack_force_never_overwrites_an_input(sharded_family, tmp_path, target):
    base, tasks = sharded_family
    (tmp_path / "link-to-shard").symlink_to(base / "model-00002-of-00002.safetensors")
    victim = (tmp_path / target).resolve()
    before = victim.read_bytes()
    _refused(run("pack", tasks, "--base", base, "-o", tmp_path / target, "--force", code=1), victim, before)


def test_extract_and_merge_never_overwrite_an_input(sharded_family, tmp_path):
    base, tasks = sharded_family
    # an archive that happens to be named like a checkpoint, where extract --all would write task files
    arc = tmp_path / "out" / "t0.safetensors"
    arc.parent.mkdir()
    run("pack", tasks, "--base", base, "-o", arc)
    before = arc.read_bytes()
    _refused(run("extract", arc, "--task", "t1", "-o", arc, "--force", code=1), arc, before)
    hard = tmp_path / "out" / "hard.safetensors"
    os.link(arc, hard)  # the same file under another name
    _refused(run("extract", arc, "--task", "t1", "-o", hard, "--force", code=1), arc, before)
    # merge: over the archive it reads (a link named as a model), and over the base of a folder merge
    tallz = tmp_path / "out" / "f.tallz"
    os.link(arc, tallz)
    _refused(run("merge", tallz, "--method", "task-arithmetic", "-o", hard, "--force", code=1), arc, before)
    shard = base / "model-00001-of-00002.safetensors"
    shard_bytes = shard.read_bytes()
    _refused(run("merge", tasks, "--base", base, "--method", "ties", "-o", shard, "--force", code=1), shard, shard_bytes)


def test_the_base_inside_a_task_folder_is_no_side_file(tmp_path):
    """The paper's release keeps the base (nonlinear_zeroshot.pt) inside one task folder: with --base
    pointing at it, it is the family's base, not a side file of that task."""
    base = {n: torch.from_numpy(t) for n, t in tensors(0).items()}
    for i in range(2):
        folder = tmp_path / "release" / f"T{i}Val"
        folder.mkdir(parents=True)
        torch.save({n: torch.from_numpy(t) for n, t in tensors(1 + i, tensors(0)).items()},
                   folder / "nonlinear_finetuned.pt")
    zeroshot = tmp_path / "release" / "T0Val" / "nonlinear_zeroshot.pt"
    torch.save(base, zeroshot)
    out = tmp_path / "f.tallz"
    run("pack", tmp_path / "release", "--base", zeroshot, "-o", out)
    run("extract", out, "--task", "T0Val", "-o", tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["nonlinear_finetuned.pt"]
    report = json.loads(run("verify", out, "--against", tmp_path / "release", "--json").output)
    assert report["verdict"] == "matches"


# ---- item 6: merge -o DIR writes a folder in the base's layout --------------------------------------

def _hf_merge_family(tmp_path, sharded: bool):
    base = tensors(0)
    base_side = {"config.json": b'{"model_type": "llama"}\n', "tokenizer.json": b'{"v": 1}'}
    save_hf_folder(tmp_path / "base", base, sharded=sharded, side=base_side)
    tasks = {f"t{i}": tensors(10 + i, base) for i in range(N_TASKS)}
    for name, state in tasks.items():
        save_hf_folder(tmp_path / "tasks" / name, state, sharded=sharded, side={"training_args.bin": b"x"})
    return base, tasks


def _folder_state(folder: Path) -> dict:
    state = {}
    for p in folder.glob("*.safetensors"):
        state.update(np_load_file(str(p)))
    return state


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_merge_into_a_folder_takes_the_base_layout(tmp_path, sharded):
    base, tasks = _hf_merge_family(tmp_path, sharded)
    out = tmp_path / "merged"
    run("merge", tmp_path / "tasks", "--base", tmp_path / "base", "--method", "task-arithmetic", "--alpha", "0.5",
        "-o", out)
    original = folder_bytes(tmp_path / "base")
    written = folder_bytes(out)
    assert sorted(written) == sorted(original)  # the same shard names and index, or model.safetensors
    for name in ("config.json", "tokenizer.json") + ((folders.SHARD_INDEX,) if sharded else ()):
        assert written[name] == original[name]  # the base's side files, their very bytes
    if sharded:  # each shard holds the tensors the base's shard of that name holds
        for shard in (n for n in original if n.endswith(".safetensors")):
            assert sorted(np_load_file(str(out / shard))) == sorted(np_load_file(str(tmp_path / "base" / shard)))
    merged = _folder_state(out)
    for name, b in base.items():  # task arithmetic, in numpy: base + alpha * sum of task vectors
        expected = b + np.float32(0.5) * sum(t[name] - b for t in tasks.values())
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_merge_folder_from_an_archive_holds_the_model(tmp_path):
    base, tasks = _hf_merge_family(tmp_path, sharded=True)
    run("pack", tmp_path / "tasks", "--base", tmp_path / "base", "-o", tmp_path / "f.tallz", "--mtv-dtype", "float32")
    run("merge", tmp_path / "f.tallz", "--method", "task-arithmetic", "-o", tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["model.safetensors"]
    assert sorted(_folder_state(tmp_path / "merged")) == sorted(base)


def test_merge_folder_never_replaces_a_file_without_force(tmp_path):
    _hf_merge_family(tmp_path, sharded=False)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("mine")
    result = run("merge", tmp_path / "tasks", "--base", tmp_path / "base", "--method", "average", "-o", out, code=1)
    assert "config.json" in result.output and "already exists" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "mine"


def test_merged_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional: tallzip[hf])")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=64,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "base" / folders.SHARD_INDEX).exists()
    base_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(base_state_param(base_state, model, p) + 1e-2 * torch.randn_like(p))
        model.save_pretrained(tmp_path / "tasks" / f"t{i}", max_shard_size="20KB")
    run("merge", tmp_path / "tasks", "--base", tmp_path / "base", "--method", "average", "-o", tmp_path / "merged")
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    tasks = [transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "tasks" / f"t{i}").state_dict() for i in range(2)]
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (tasks[0][name] + tasks[1][name]) / 2, rtol=1e-5, atol=1e-6)


def base_state_param(base_state: dict, model, param):
    name = next(n for n, p in model.named_parameters() if p is param)
    return base_state[name]


def test_diffusers_sharded_folder_comes_back_with_its_own_index_name(tmp_path):
    base = tensors(0)
    for name, state in [("base", base)] + [(f"tasks/t{i}", tensors(1 + i, base)) for i in range(2)]:
        save_hf_folder(tmp_path / name, state, sharded=True, side={"config.json": b"{}"})
        folder = tmp_path / name
        (folder / folders.SHARD_INDEX).rename(folder / "diffusion_pytorch_model.safetensors.index.json")
    ckpt = checkpoints.open_checkpoint(tmp_path / "tasks" / "t0")
    assert ckpt.sharding["index"] == "diffusion_pytorch_model.safetensors.index.json"
    run("pack", tmp_path / "tasks", "--base", tmp_path / "base", "-o", tmp_path / "f.tallz", "--keep", "exact")
    run("extract", tmp_path / "f.tallz", "--task", "t1", "-o", tmp_path / "back")
    assert folder_bytes(tmp_path / "back") == folder_bytes(tmp_path / "tasks" / "t1")


def test_a_hostile_index_name_is_refused(tmp_path):
    from conftest import read_manifest, write_manifest
    base = tensors(0)
    save_hf_folder(tmp_path / "base", base, sharded=True, side={})
    for i in range(2):
        save_hf_folder(tmp_path / "tasks" / f"t{i}", tensors(1 + i, base), sharded=True, side={})
    out = tmp_path / "f.tallz"
    run("pack", tmp_path / "tasks", "--base", tmp_path / "base", "-o", out)
    manifest, _ = read_manifest(out)
    manifest["tasks"][0]["sharding"]["index"] = "../escape.json"
    write_manifest(out, manifest)
    result = run("info", out, code=1)
    assert not (tmp_path / "escape.json").exists() and "error:" in result.output
