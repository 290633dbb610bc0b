"""Checkpoints as they come: the authors' two CLIP releases, open_clip models and Hugging Face folders.

Every rebuilt tensor is checked against the TALL formula computed here in numpy (conftest), and
open_clip itself loads what extract writes, strictly, with no pretrained weights downloaded.
"""
from __future__ import annotations

import json
import sys
import textwrap
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import save_file

import tallzip
from tallzip.cli.main import cli
from tallzip.formats.checkpoints.folders import SHARD_INDEX, discover_tasks

from conftest import import_or_skip, np_rebuilt

open_clip = import_or_skip("open_clip")

# A CLIP small enough to build in milliseconds, with open_clip's real module tree and names.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
LAMBDA = 0.4


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**TINY_CLIP)


def fine_tuned(state: dict, index: int, only=("visual.", "model.visual.")) -> "OrderedDict[str, torch.Tensor]":
    """A task: the vision tower moved (as fine-tuning does), the text side untouched."""
    gen = torch.Generator().manual_seed(100 + index)
    return OrderedDict((n, t + 1e-3 * torch.randn(t.shape, generator=gen) if n.startswith(only) else t.clone())
                       for n, t in state.items())


def as_numpy(state: dict) -> dict:
    return {n: t.detach().numpy() for n, t in state.items()}


def expected_task(base: dict, tasks: dict, task: str, lam=LAMBDA) -> dict:
    """The TALL rebuild of one task, per tensor, in numpy (unchanged tensors come out as the base)."""
    out = {}
    for name in base:
        out[name] = np_rebuilt(base, tasks, task, name, lam)
    return out


def assert_state_equal(got: dict, expected: dict, ordered=True):
    """Same names (in the same order, unless read back from safetensors, whose readers sort them),
    dtypes, shapes and values."""
    assert list(got) == list(expected) if ordered else sorted(got) == sorted(expected)
    for name, value in expected.items():
        actual = got[name].numpy() if isinstance(got[name], torch.Tensor) else got[name]
        assert actual.dtype == value.dtype and actual.shape == value.shape, name
        assert np.array_equal(actual, value), name


# --- the authors' releases ---------------------------------------------------------------------------

MODELING = '''
import pathlib, torch

with pathlib.Path(__file__).with_name("imported.log").open("a") as log:  # records every import
    log.write("x")


class ImageEncoder(torch.nn.Module):
    """As in the task-vector code: an open_clip CLIP without its text transformer, plus transforms."""

    def __init__(self, model, train_preprocess, val_preprocess):
        super().__init__()
        self.model = model
        self.train_preprocess = train_preprocess
        self.val_preprocess = val_preprocess
        self.cache_dir = None
        if hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(torch.zeros_like(self.bias))
'''


@pytest.fixture
def modeling(tmp_path):
    """A throwaway `src.modeling` (the authors' module path); unimportable again once the test pickles."""
    root = tmp_path / "code"
    (root / "src").mkdir(parents=True)
    (root / "src" / "__init__.py").write_text("")
    (root / "src" / "modeling.py").write_text(textwrap.dedent(MODELING))
    sys.path.insert(0, str(root))

    def forget():
        """Make the pickles' classes unimportable, as on a machine without the authors' code."""
        if str(root) in sys.path:
            sys.path.remove(str(root))
        for name in ["src", "src.modeling"]:
            sys.modules.pop(name, None)

    import src.modeling
    yield SimpleNamespace(module=src.modeling, import_log=root / "src" / "imported.log", forget=forget)
    forget()


def image_encoder(modeling, seed=0):
    clip = tiny_clip(seed)
    return modeling.ImageEncoder(clip, open_clip.image_transform(32, is_train=True),
                                 open_clip.image_transform(32, is_train=False))


def test_tall_mask_release_packs_as_it_comes(tmp_path, modeling):
    """{Dataset}Val/nonlinear_finetuned.pt state dicts, the base at MNISTVal/nonlinear_zeroshot.pt, and
    pickled classification heads head_{Dataset}Val.pt beside the folders."""
    module = modeling.module
    encoder = image_encoder(module)
    base = encoder.state_dict()
    assert "model.visual.conv1.weight" in base and not any(".transformer.resblocks" in n and "visual" not in n for n in base)
    release = tmp_path / "checkpoints" / "ViT-B-32"
    tasks = {}
    for i, dataset in enumerate(["Cars", "DTD", "MNIST"]):
        folder = release / f"{dataset}Val"
        folder.mkdir(parents=True)
        tasks[f"{dataset}Val"] = fine_tuned(base, i)
        torch.save(tasks[f"{dataset}Val"], folder / "nonlinear_finetuned.pt")
        torch.save(module.ClassificationHead(True, torch.randn(3 + i, 16)), release / f"head_{dataset}Val.pt")
    torch.save(base, release / "MNISTVal" / "nonlinear_zeroshot.pt")
    zeroshot = release / "MNISTVal" / "nonlinear_zeroshot.pt"

    assert discover_tasks(release, exclude=[zeroshot]) == {t: release / t for t in tasks}
    out = tmp_path / "release.tallz"
    run("pack", release, "--base", zeroshot, "-o", out)

    base_np, tasks_np = as_numpy(base), {t: as_numpy(s) for t, s in tasks.items()}
    run("extract", out, "--all", "-o", tmp_path / "all")
    for task in tasks:
        folder = tmp_path / "all" / task
        assert sorted(p.name for p in folder.iterdir()) == sorted(["nonlinear_finetuned.pt", f"head_{task}.pt"])
        got = torch.load(folder / "nonlinear_finetuned.pt", weights_only=True)
        assert_state_equal(got, expected_task(base_np, tasks_np, task))
        # the head travels as the very bytes of the release, never unpickled
        assert (folder / f"head_{task}.pt").read_bytes() == (release / f"head_{task}.pt").read_bytes()
        # and the rebuilt weights load into the encoder they came from, strictly
        image_encoder(module).load_state_dict(got, strict=True)


def test_task_vector_release_of_pickled_modules(tmp_path, modeling):
    """The older release: zeroshot.pt and {dataset}/finetuned.pt pickle whole ImageEncoder modules
    (open_clip model and torchvision transforms inside), read without importing their code."""
    module, import_log = modeling.module, modeling.import_log
    release = tmp_path / "task_vectors" / "ViT-B-32"
    release.mkdir(parents=True)
    zeroshot = image_encoder(module)
    base = zeroshot.state_dict()
    torch.save(zeroshot, release / "zeroshot.pt")
    tasks = {}
    for i, dataset in enumerate(["Cars", "DTD", "MNIST"]):
        encoder = image_encoder(module)
        encoder.load_state_dict(fine_tuned(base, i))
        tasks[dataset] = encoder.state_dict()
        (release / dataset).mkdir()
        torch.save(encoder, release / dataset / "finetuned.pt")
        torch.save(module.ClassificationHead(True, torch.randn(4, 16)), release / f"head_{dataset}.pt")
    modeling.forget()
    assert import_log.read_text() == "x"

    out = tmp_path / "tv.tallz"
    run("pack", release, "--base", release / "zeroshot.pt", "-o", out)
    assert import_log.read_text() == "x" and "src.modeling" not in sys.modules  # nothing was imported
    with tallzip.open(out) as archive:
        assert archive.tasks == ["Cars", "DTD", "MNIST"]
    base_np, tasks_np = as_numpy(base), {t: as_numpy(s) for t, s in tasks.items()}
    run("extract", out, "--task", "DTD", "-o", tmp_path / "DTD")
    got = torch.load(tmp_path / "DTD" / "finetuned.pt", weights_only=True)  # now a plain state dict
    assert_state_equal(got, expected_task(base_np, tasks_np, "DTD"))
    assert (tmp_path / "DTD" / "head_DTD.pt").read_bytes() == (release / "head_DTD.pt").read_bytes()


def test_a_lone_head_file_is_still_a_task(tmp_path):
    """Only a head_{X}.pt beside a folder {X}/ is taken for a head."""
    for name in ["head_a.pt", "b.pt"]:
        torch.save({"w": torch.ones(2)}, tmp_path / name)
    assert sorted(discover_tasks(tmp_path)) == ["b", "head_a"]


# --- open_clip: what extract writes, open_clip loads strictly -------------------------------------------

def test_open_clip_round_trip(tmp_path):
    base = tiny_clip().state_dict()
    config = json.dumps({"model_cfg": TINY_CLIP})
    base_dir, tasks_dir = tmp_path / "base", tmp_path / "tasks"
    base_dir.mkdir()
    (base_dir / "open_clip_config.json").write_text(config)
    save_file(dict(base), str(base_dir / "open_clip_model.safetensors"))
    tasks = {}
    for i, name in enumerate(["cars", "dtd", "eurosat"]):
        tasks[name] = fine_tuned(base, i)
        folder = tasks_dir / name
        folder.mkdir(parents=True)
        (folder / "open_clip_config.json").write_text(config)  # open_clip's own folder layout
        save_file(dict(tasks[name]), str(folder / "open_clip_model.safetensors"))
    out = tmp_path / "clip.tallz"
    run("pack", tasks_dir, "--base", base_dir / "open_clip_model.safetensors", "-o", out)
    base_np, tasks_np = as_numpy(base), {t: as_numpy(s) for t, s in tasks.items()}

    # a folder open_clip opens by itself: config + weights, loaded with strict=True inside
    run("extract", out, "--task", "dtd", "-o", tmp_path / "dtd")
    model = open_clip.create_model(f"local-dir:{tmp_path / 'dtd'}")
    assert_state_equal(model.state_dict(), expected_task(base_np, tasks_np, "dtd"), ordered=False)

    # a torch state dict for load_state_dict
    run("extract", out, "--task", "cars", "--format", "pt", "-o", tmp_path / "cars")
    state = torch.load(tmp_path / "cars" / "open_clip_model.pt", weights_only=True)
    model = open_clip.model.CLIP(**TINY_CLIP)
    model.load_state_dict(state, strict=True)
    assert_state_equal(model.state_dict(), expected_task(base_np, tasks_np, "cars"), ordered=False)
    image = torch.randn(1, 3, 32, 32)
    reference = open_clip.model.CLIP(**TINY_CLIP)
    reference.load_state_dict({n: torch.from_numpy(v) for n, v in expected_task(base_np, tasks_np, "cars").items()})
    assert torch.equal(model.encode_image(image), reference.encode_image(image))


# --- Hugging Face folders -------------------------------------------------------------------------------

def hf_state(seed):
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (10, 6), "layers.0.q.weight": (6, 6), "layers.0.q.bias": (6,),
              "layers.1.q.weight": (6, 6), "norm.weight": (6,)}
    return OrderedDict((n, rng.normal(0, 0.1, s).astype(np.float32)) for n, s in shapes.items())


SIDE_FILES = {"config.json": '{"model_type": "tiny", "hidden_size": 6}',
              "generation_config.json": '{"max_length": 20}',
              "tokenizer.json": '{"version": "1.0", "model": {"vocab": {"a": 0}}}',
              "README.md": "# a fine-tuned tiny model\n"}


def write_hf_folder(folder, state, shards=None, side=SIDE_FILES):
    folder.mkdir(parents=True)
    for name, text in side.items():
        (folder / name).write_text(text)
    if shards is None:
        from safetensors.numpy import save_file as np_save
        np_save(dict(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    from safetensors.numpy import save_file as np_save
    for file, names in shards.items():
        np_save({n: state[n] for n in names}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
             "weight_map": {n: f for f, names in shards.items() for n in names}}
    (folder / SHARD_INDEX).write_text(json.dumps(index))


def test_hf_folders_sharded_and_single_come_back_whole(tmp_path):
    base = hf_state(0)
    tasks = {}
    for i in range(3):
        rng = np.random.default_rng(10 + i)
        tasks[f"task{i}"] = OrderedDict((n, (v + rng.laplace(0, 0.01, v.shape)).astype(np.float32)) for n, v in base.items())
    names = list(base)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    write_hf_folder(tmp_path / "base", base, shards)
    write_hf_folder(tmp_path / "tasks" / "task0", tasks["task0"], shards)
    write_hf_folder(tmp_path / "tasks" / "task1", tasks["task1"], shards,
                    side={**SIDE_FILES, "config.json": '{"model_type": "tiny", "task": 1}'})
    write_hf_folder(tmp_path / "tasks" / "task2", tasks["task2"])  # single file, side files still
    out = tmp_path / "hf.tallz"
    run("pack", tmp_path / "tasks", "--base", tmp_path / "base", "-o", out)
    run("extract", out, "--all", "-o", tmp_path / "all")

    for task in ["task0", "task1"]:
        src, dst = tmp_path / "tasks" / task, tmp_path / "all" / task
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
        for name in SIDE_FILES:
            assert (dst / name).read_bytes() == (src / name).read_bytes(), name
        index = json.loads((dst / SHARD_INDEX).read_text())
        assert index == json.loads((src / SHARD_INDEX).read_text())
        got = {}
        for file in shards:
            part = np_load_file(str(dst / file))
            assert list(part) == shards[file]
            got.update(part)
        assert_state_equal(got, expected_task(base, tasks, task), ordered=False)
    dst = tmp_path / "all" / "task2"
    assert sorted(p.name for p in dst.iterdir()) == sorted(["model.safetensors", *SIDE_FILES])
    assert_state_equal(np_load_file(str(dst / "model.safetensors")), expected_task(base, tasks, "task2"), ordered=False)
