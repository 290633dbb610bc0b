"""Smoke tests of the benchmark's model family: a tiny configuration that builds in seconds."""

import json
import time
import warnings

import numpy as np
import pytest
import torch

from benchmarks.data import TASKS, build_split, digits_pools, mnist_pools
from benchmarks.family import PRESETS, Family, FinetuneRegressionWarning, build_family
from benchmarks.metrics import normalized_accuracy
from benchmarks.vit import ViTConfig, VisionTransformer
from conftest import import_or_skip

TINY = PRESETS["tiny"]


def quiet_build(*args, **kwargs) -> Family:
    # A few training steps may leave a fine-tuned model below the base: expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FinetuneRegressionWarning)
        return build_family(*args, config=TINY, log=None, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    start = time.perf_counter()
    family = quiet_build(3, root)
    return family, time.perf_counter() - start


def test_family_files_and_metadata(built):
    family, _ = built
    assert family.tasks == [task.name for task in TASKS[:3]]
    assert family.base_path.is_file() and family.heads_path.is_file()
    assert set(family.task_paths) == set(family.tasks)
    assert all(path.is_file() for path in family.task_paths.values())
    info = json.loads((family.root / "family.json").read_text())
    for task in family.tasks:
        splits = info["tasks"][task]["splits"]
        assert splits["train"] <= TINY.train_size and splits["val"] <= TINY.val_size and splits["test"] <= TINY.test_size
        assert min(splits.values()) > 0
    # Encoders only, float32, same names as the base.
    base = family.load()
    assert all(t.dtype == torch.float32 for t in base.values())
    assert not any(name.startswith("head") for name in base)
    assert set(family.load(family.tasks[0])) == set(base)


def test_evaluate_returns_accuracies(built):
    family, _ = built
    base = family.load()
    for task in family.tasks:
        finetuned = family.load(task)
        for split in ("val", "test"):
            for state in (base, finetuned):
                assert 0.0 <= family.evaluate(task, state, split) <= 1.0
            # Evaluation reproduces what was recorded at build time.
            recorded = family.info["tasks"][task]["accuracy"]["finetuned"][split]
            assert family.evaluate(task, finetuned, split) == pytest.approx(recorded, abs=1e-6)
    accs = family.evaluate_tasks(base, "val")
    assert set(accs) == set(family.tasks)
    with pytest.raises(ValueError):
        family.evaluate(family.tasks[0], base, "train")


def test_second_build_uses_the_cache(built):
    family, first_seconds = built
    assert family.trained_now == family.tasks
    start = time.perf_counter()
    again = quiet_build(3, family.root)
    assert again.trained_now == []  # nothing retrained
    assert time.perf_counter() - start < first_seconds
    # A smaller setting reuses the same cache too.
    assert quiet_build(2, family.root).trained_now == []


def test_corrupt_file_is_rebuilt(tmp_path):
    family = quiet_build(2, tmp_path)
    victim = family.task_paths[family.tasks[1]]
    victim.write_bytes(b"not a checkpoint")
    again = quiet_build(2, tmp_path)
    assert again.trained_now == [family.tasks[1]]
    assert again.evaluate(family.tasks[1], again.load(family.tasks[1])) >= 0.0


def test_build_is_deterministic(built, tmp_path):
    family, _ = built
    other = quiet_build(2, tmp_path)
    for name in ("base",) + tuple(other.tasks):
        entry = other.info["base"] if name == "base" else other.info["tasks"][name]
        reference = family.info["base"] if name == "base" else family.info["tasks"][name]
        assert entry["sha256"] == reference["sha256"], name


def test_warns_when_finetuned_is_worse_than_base(built, tmp_path):
    family, _ = built
    quiet_build(2, tmp_path)
    path = tmp_path / "family.json"
    info = json.loads(path.read_text())
    task = family.tasks[0]
    info["tasks"][task]["accuracy"]["base"]["val"] = 1.0
    info["tasks"][task]["accuracy"]["finetuned"]["val"] = 0.5
    path.write_text(json.dumps(info))
    with pytest.warns(FinetuneRegressionWarning, match=task):
        build_family(2, tmp_path, config=TINY, log=None)


def test_splits_never_overlap():
    for pools in (mnist_pools(0), digits_pools(0)):
        train, val, test = (set(pools[s].tolist()) for s in ("train", "val", "test"))
        assert not (train & val) and not (train & test) and not (val & test)
    for task in TASKS[:3]:
        split = build_split(task, "val", 0, 50)
        assert split.images.shape == (len(split.labels), 3, 28, 28)
        assert split.labels.min() >= 0 and split.labels.max() < task.num_classes
        assert np.abs(split.images).max() <= 1.0 + 1e-6


def test_vit_state_dict_matches_open_clip():
    transformer = import_or_skip("open_clip.transformer")
    config = ViTConfig(width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16)
    ours = VisionTransformer(config).eval()
    theirs = transformer.VisionTransformer(
        image_size=config.image_size, patch_size=config.patch_size, width=config.width, layers=config.layers,
        heads=config.heads, mlp_ratio=config.mlp_ratio, output_dim=config.output_dim,
    ).eval()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = torch.randn(4, 3, config.image_size, config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images))


def test_normalized_accuracy_by_hand():
    # (0.45 / 0.90 + 0.80 / 0.80 + 0.30 / 0.60) / 3 = (0.5 + 1.0 + 0.5) / 3
    acc = {"a": 0.45, "b": 0.80, "c": 0.30}
    finetuned = {"a": 0.90, "b": 0.80, "c": 0.60, "unused": 0.1}
    assert normalized_accuracy(acc, finetuned) == pytest.approx(2.0 / 3.0)
    # Above 1 when the model beats the fine-tuned reference: (0.5 / 1.0 + 0.9 / 0.6) / 2 = 1.0
    assert normalized_accuracy({"x": 0.5, "y": 0.9}, {"x": 1.0, "y": 0.6}) == pytest.approx(1.0)
    with pytest.raises(KeyError):
        normalized_accuracy({"missing": 0.5}, finetuned)
