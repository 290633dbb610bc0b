"""The language benchmark's machinery on a tiny family (benchmarks/language, config `tiny`): it builds and ships
as transformers saves LLMs, its archives extract to folders from_pretrained loads, exact is bit-identical, and
the rivals and data-free statistics match their formulas computed here in numpy. Skips without the lang extra."""
import importlib.util
import io
import json
import pickle

import numpy as np
import pytest
import torch

# A mark, not a module-level skip: CI's second step (`pytest -m open_clip`, .ci/run) deselects these tests, and
# a module skipped while collecting would still count there as a skipped test.
MISSING = [m for m in ("transformers", "tokenizers", "gensim", "django", "faker") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs the lang extra (missing {', '.join(MISSING)})")

if not MISSING:
    from benchmarks.language import corpora, family, rivals, rows, tallness
    from benchmarks.language.scoring import Family, folder_state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return family.build(family.CONFIGS["tiny"], root=tmp_path_factory.mktemp("lang"), log=lambda m: None, threads=1)


def test_family_is_saved_as_llms_ship(tiny):
    meta = json.loads((tiny / "family.json").read_text())
    assert list(meta["tasks"]) == ["news", "langid"]
    for folder in [tiny / "base"] + [tiny / "tasks" / t for t in meta["tasks"]]:
        shards = sorted(folder.glob("model-*.safetensors"))
        assert len(shards) >= 2
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            assert (folder / name).is_file()
        assert all(v.dtype == torch.bfloat16 for v in folder_state(folder).values())
        family.load_model(folder)  # from_pretrained; raises on missing or unexpected keys
    assert meta["packages"]["transformers"] != "missing"


def test_scores_match_a_plain_forward_pass(tiny):
    fam = Family(tiny)
    model = family.load_model(tiny / "tasks" / "news")
    blocks = fam.data("news")["test"].long()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert fam.score("news", tiny / "tasks" / "news", "test")["loss"] == pytest.approx(float(expected), rel=1e-5)
    data = fam.data("langid")["test"]
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"].long(), attention_mask=(data["input_ids"] != model.config.pad_token_id).long()).logits
    label_ids = fam.data("langid")["label_ids"]
    picked = label_ids[logits[torch.arange(len(data["position"])), data["position"]][:, label_ids].argmax(-1)]
    accuracy = float((picked == data["label"]).float().mean())
    assert fam.score("langid", model, "test")["accuracy"] == pytest.approx(accuracy)
    # quality: the fine-tune keeps all of its own gain, the base none
    for task in fam.tasks:
        ft = fam.meta["scores"]["finetuned"][task]["test"]
        if "loss" in ft:
            assert fam.quality(task, ft) == pytest.approx(1.0)
            assert fam.quality(task, fam.meta["scores"]["base"][task]["test"]) == pytest.approx(0.0)
    with pytest.raises(KeyError):
        fam.score("news", {"model.embed_tokens.weight": torch.zeros(3, 3)}, "test")


def test_exact_archive_extracts_bit_identical_and_loads(tiny, tmp_path):
    bench = rows.Bench(tiny, tmp_path, log=lambda m: None)
    row = bench.pack_row("every task exact", "exact", exact=True, keep="exact")
    assert all(e["quality"] == pytest.approx(1.0) or np.isnan(e["quality"]) for e in row["tasks"].values())
    assert all(e["rel_l2"] == 0.0 for e in row["tasks"].values())
    q2 = bench.pack_row("every task q2", "q2", keep="q2")
    assert q2["bytes"] < row["bytes"] and all(e["rel_l2"] > 0 for e in q2["tasks"].values())


def test_rivals_follow_their_formulas(tiny):
    base, task = folder_state(tiny / "base"), folder_state(tiny / "tasks" / "news")
    rebuilt, nbytes = rivals.bitdelta_rebuild(base, task)
    for name, value in task.items():
        b, t = base[name].float().numpy(), value.float().numpy()
        if rivals.is_block_linear(name, value):
            d = t - b
            want = torch.from_numpy(b + np.abs(d).mean() * np.where(d >= 0, 1.0, -1.0)).to(torch.bfloat16)
            assert torch.equal(rebuilt[name].view(torch.int16), want.view(torch.int16))
        else:
            assert torch.equal(rebuilt[name], value)
    assert nbytes < sum(v.numel() * 2 for v in task.values())
    assert all(rivals.bitx_roundtrip(base[n], task[n]) for n in task)
    import zstandard
    name = "model.layers.0.mlp.up_proj.weight"
    x = (task[name].float().numpy().view(np.uint32) >> 16) ^ (base[name].float().numpy().view(np.uint32) >> 16)
    exponent = ((x >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((x >> 8) & 0x80) | (x & 0x7F)).astype(np.uint8)
    want = sum(len(zstandard.ZstdCompressor(level=3).compress(s.tobytes())) for s in (exponent, sign_mantissa))
    assert rivals.bitx_tensor_bytes(base[name], task[name]) == want
    assert rivals.bitx_bytes(base, base) < rivals.bitx_bytes(base, task)


def test_tall_diagnosis_matches_the_rebuild():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, generator=g)
    tasks = {f"t{i}": base + 0.01 * torch.randn(4000, generator=g) for i in range(3)}
    lam = {t: 0.4 for t in tasks}
    diag = tallness.tall_diagnosis(base, tasks, lam)
    b = base.numpy().astype(np.float64)
    mtv = sum(t.numpy().astype(np.float64) - b for t in tasks.values())
    for name, theta in tasks.items():
        th = theta.numpy().astype(np.float64)
        mask = np.abs(th - b) > 0.4 * np.abs(b + mtv - th)
        rebuilt = b + mask * mtv
        rel = np.linalg.norm(rebuilt - th) / np.linalg.norm(th - b)
        assert diag["tasks"][name]["rel_l2"] == pytest.approx(rel, rel=1e-4)
        assert diag["tasks"][name]["mask_density"] == pytest.approx(mask.mean())
        fid = tallness.fidelity(base, theta, torch.from_numpy(rebuilt).float())
        assert fid["rel_l2"] == pytest.approx(rel, rel=1e-4)
        assert fid["energy_kept"] == pytest.approx(1 - rel * rel, rel=1e-3)
    assert tallness.fidelity(base, tasks["t0"], base)["energy_kept"] == pytest.approx(0.0)


def test_newsgroup_unpickler_refuses_other_globals():
    hostile = pickle.dumps(print)  # any callable the allow-list does not name
    with pytest.raises(pickle.UnpicklingError):
        corpora._NewsgroupUnpickler(io.BytesIO(hostile)).load()


def test_missing_corpus_is_one_line(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(corpora.MissingCorpus) as info:
        corpora.gensim_file("lee_background.cor")
    assert "\n" not in str(info.value) and "pip install" in str(info.value)
