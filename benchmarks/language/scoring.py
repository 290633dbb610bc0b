"""Score a model on a task of the language family: held-out loss (generative) or label accuracy (classification).

    from benchmarks.language.scoring import Family
    fam = Family("/work/cache/language/cpu-...")       # a folder benchmarks.language.family.build wrote
    fam.score("news", state_dict_or_model_folder, "test")   # {"loss": ...} or {"accuracy": ...}
    fam.quality("news", score)                               # gain kept / normalized accuracy, from the test scores

`evaluate(task, state)` is the validation quality as `module:function`: gain kept (generative) or normalized
accuracy (classification) on the validation split, 1.0 = the fine-tune, higher is better; so a tolerance of 0.005
in tallzip.select_representation means half a percent of the fine-tuning gain. Its family is
$TALLZIP_LANGUAGE_FAMILY, or the newest `cpu-*` family under /work/cache/language.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def folder_state(folder) -> dict:
    """A model folder's tensors as saved (sharded or not), by name."""
    from safetensors.torch import load_file
    folder = Path(folder)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


class Family:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "family.json").read_text())
        self.tasks = list(self.meta["tasks"])
        self._data = {}
        self._model = None

    def kind(self, task: str) -> str:
        return self.meta["tasks"][task]["kind"]

    def data(self, task: str) -> dict:
        if task not in self._data:
            self._data[task] = torch.load(self.folder / "data" / f"{task}.pt", weights_only=True)
        return self._data[task]

    def model(self):
        """One float32 model of the family's architecture, reused: each score loads its weights into it."""
        if self._model is None:
            from transformers import AutoConfig, AutoModelForCausalLM
            cfg = AutoConfig.from_pretrained(self.folder / "base")
            self._model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        return self._model

    def _with_weights(self, weights):
        if isinstance(weights, torch.nn.Module):
            return weights.float().eval()
        state = folder_state(weights) if isinstance(weights, (str, Path)) else weights
        model = self.model()
        expected = set(model.state_dict())
        if set(state) != expected:
            raise KeyError(f"state dict does not fit the family's model: missing {sorted(expected - set(state))[:3]}, "
                           f"unexpected {sorted(set(state) - expected)[:3]}")
        model.load_state_dict(state, strict=True)
        return model

    @torch.no_grad()
    def score(self, task: str, weights, split: str = "test", batch: int = 16) -> dict:
        model = self._with_weights(weights)
        data = self.data(task)[split]
        if self.kind(task) == "generative":
            total, count = 0.0, 0
            for i in range(0, data.shape[0], batch):
                ids = data[i:i + batch].long()
                logits = model(input_ids=ids).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="sum")
                total += loss.item()
                count += ids[:, 1:].numel()
            return {"loss": total / count}
        label_ids = self.data(task)["label_ids"]
        correct, pad = 0, model.config.pad_token_id
        for i in range(0, data["input_ids"].shape[0], batch):
            ids = data["input_ids"][i:i + batch].long()
            pos, gold = data["position"][i:i + batch], data["label"][i:i + batch]
            logits = model(input_ids=ids, attention_mask=(ids != pad).long()).logits
            picked = logits[torch.arange(ids.shape[0]), pos][:, label_ids].argmax(-1)
            correct += int((label_ids[picked] == gold).sum())
        return {"accuracy": correct / data["input_ids"].shape[0]}

    def value(self, task: str, score: dict) -> float:
        """Higher is better: minus the loss, or the accuracy."""
        return -score["loss"] if "loss" in score else score["accuracy"]

    def quality(self, task: str, score: dict, split: str = "test") -> float:
        """Generative: gain kept = (base loss - loss) / (base loss - fine-tuned loss). Classification: accuracy
        / the fine-tuned model's accuracy (normalized accuracy). 1.0 = as good as the fine-tune."""
        scores = self.meta["scores"]
        ft = scores["finetuned"][task][split]
        if "loss" in score:
            base = scores["base"][task][split]["loss"]
            return (base - score["loss"]) / (base - ft["loss"])
        return score["accuracy"] / ft["accuracy"] if ft["accuracy"] else float("nan")


_DEFAULT = {}


def default_family() -> Family:
    if "family" not in _DEFAULT:
        folder = os.environ.get("TALLZIP_LANGUAGE_FAMILY")
        if not folder:
            from .family import CACHE_ROOT
            found = sorted((p for p in CACHE_ROOT.glob("cpu-*") if (p / "family.json").is_file()),
                           key=lambda p: p.stat().st_mtime)
            if not found:
                raise FileNotFoundError("no language family: run `python -m benchmarks.language` or set TALLZIP_LANGUAGE_FAMILY")
            folder = found[-1]
        _DEFAULT["family"] = Family(folder)
    return _DEFAULT["family"]


def evaluate(task: str, state) -> float:
    """The validation quality of `state` (a state dict or model folder) on `task`: 1.0 = the fine-tune."""
    fam = default_family()
    return fam.quality(task, fam.score(task, state, "val"), "val")
