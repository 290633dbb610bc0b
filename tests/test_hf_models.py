"""Transformers in and out (issue 20): tiny Llama and GPT-2 families saved as transformers ships them
(bf16, sharded safetensors, config and generation config), packed, and read back two ways: an extracted
folder that transformers' own from_pretrained loads, and serve.hf.from_archive, which builds the model
in memory. The reference is always from_pretrained of the original folder. Skips without transformers
(the optional extra tallzip[hf], pinned in the test extra)."""
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

import tallzip
from tallzip.errors import MissingExtraError, TallzipError
from tallzip.serve import hf

from conftest import import_or_skip

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
TOKENS = torch.arange(24).remainder(96).view(2, 12)


def _llama(transformers):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))


def _gpt2(transformers):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2))


def _save(model, folder):
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="30KB")
    model.float()


def _family(transformers, build, root):
    """base + two fine-tunes: a few SGD steps on next-token loss, and a perturbation."""
    torch.manual_seed(0)
    model = build(transformers)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _save(model, root / "base")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    _save(model, root / "tasks" / "trained")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(start[name] + 0.02 * torch.randn_like(param))
    _save(model, root / "tasks" / "perturbed")
    return root


@pytest.fixture(scope="module")
def transformers():
    return import_or_skip("transformers")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, transformers, tmp_path_factory):
    root = _family(transformers, {"llama": _llama, "gpt2": _gpt2}[request.param], tmp_path_factory.mktemp(request.param))
    for keep in ("exact", "tall"):
        tallzip.pack(root / "tasks", root / "base", root / f"{keep}.tallz", keep=keep)
    return request.param, root


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _reference(transformers, folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def _shard_names(folder) -> list[str]:
    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            names += list(f.keys())
    return names


@pytest.mark.parametrize("keep", ["exact", "tall"])
def test_extracted_folder_loads_in_transformers_with_no_missing_keys(transformers, family, keep, tmp_path):
    kind, root = family
    original = root / "tasks" / "trained"
    assert len(list(original.glob("*.safetensors"))) > 1, "the test needs a sharded checkpoint"
    tallzip.extract(root / f"{keep}.tallz", "trained", tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == sorted(p.name for p in original.iterdir())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    reference = _reference(transformers, original)
    if keep == "exact":
        assert torch.equal(_logits(model), _logits(reference))
    else:  # tall rebuilds: same model, other weights, still a usable one
        assert torch.isfinite(_logits(model)).all()
        assert not torch.equal(_logits(model), _logits(reference))
    if kind == "gpt2":  # tied embeddings come back tied, stored once
        assert model.lm_head.weight is model.transformer.wte.weight
        names = _shard_names(tmp_path / "back")
        assert len(names) == len(set(names)) and "lm_head.weight" not in names
        assert sorted(names) == sorted(_shard_names(original))


def test_from_archive_builds_the_model_from_pretrained_gives(transformers, family, tmp_path):
    kind, root = family
    before = sorted(p.name for p in root.iterdir())
    for task in ("trained", "perturbed"):
        model = hf.from_archive(root / "exact.tallz", task)
        reference = _reference(transformers, root / "tasks" / task)
        assert type(model) is type(reference) and not model.training
        assert torch.equal(_logits(model), _logits(reference))
        assert model.generation_config.to_dict() == reference.generation_config.to_dict()
        unnamed = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
        assert unnamed(model.config) == unnamed(reference.config)
        if kind == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written
    model = hf.from_archive(root / "exact.tallz", "trained", dtype=torch.float32)
    assert model.dtype == torch.float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "tasks" / "trained", dtype=torch.float32)
    assert torch.equal(_logits(model), _logits(reference))


def test_a_bound_model_serves_each_task_by_switching(transformers, family):
    kind, root = family
    for keep in ("exact", "tall"):
        archive = tallzip.open(root / f"{keep}.tallz")
        model = hf.from_archive(archive, "trained")
        resident = archive.resident(device="cpu")
        resident.bind(model)  # strict: every parameter and persistent buffer found
        for task in ("perturbed", "trained", "perturbed"):
            resident.switch(task)
            if keep == "exact":  # the reference: transformers' own loading of the task's folder
                expected = _logits(_reference(transformers, root / "tasks" / task))
            else:  # tall: what its extracted folder gives
                expected = _logits(hf.from_archive(archive, task))
            assert torch.equal(_logits(model), expected), (keep, task)
        if kind == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight
        archive.close()


def test_a_task_that_does_not_fit_its_config_is_refused(transformers, tmp_path):
    root = _family(transformers, _gpt2, tmp_path)
    config = root / "tasks" / "perturbed" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "n_layer": 3}))
    tallzip.pack(root / "tasks", root / "base", root / "f.tallz", keep="exact")
    with pytest.raises(TallzipError, match=r"'perturbed' does not fit GPT2LMHeadModel: the archive lacks \d+ .*h\.2\."):
        hf.from_archive(root / "f.tallz", "perturbed")
    config.write_text(json.dumps({"model_type": "no-such-model"}))
    tallzip.pack(root / "tasks", root / "base", root / "g.tallz", keep="exact")
    with pytest.raises(TallzipError, match="model_type 'no-such-model'"):
        hf.from_archive(root / "g.tallz", "perturbed")


def test_a_task_without_a_config_is_refused(transformers, tmp_path):
    root = _family(transformers, _gpt2, tmp_path)
    for task in ("trained", "perturbed"):
        (root / "tasks" / task / "config.json").unlink()
    tallzip.pack(root / "tasks", root / "base", root / "f.tallz", keep="exact")
    with pytest.raises(TallzipError, match="task 'trained' has no config.json"):
        hf.from_archive(root / "f.tallz", "trained")


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(MissingExtraError) as error:
        hf.from_archive("any.tallz", "task")
    assert "tallzip[hf]" in str(error.value) and "\n" not in str(error.value)
