"""The language family: a BPE tokenizer and a Llama decoder trained here, then one full fine-tune per task.

Layout under the cache folder (`/work/cache/language/<config>-<hash>/`, README.md there):
    base/                 the pretrained model as LLMs ship: bf16 safetensors shards + index, config.json,
                          generation_config.json, tokenizer files
    tasks/<task>/         each full fine-tune, saved the same way
    data/<task>.pt        the token tensors of its train/val/test splits (torch.save of tensors only)
    family.json           config, tasks (kind, source, labels, split sizes), base and fine-tuned scores, times
    finetuned/<task>.json each fine-tune's seconds and steps (its "done" marker); pretrain.json the base's
Everything is seeded; a folder with a family.json is reused as is. A build works in
`<config>-base-<hash of the non-fine-tuning settings>.partial/` and renames it when every score is in, so an
interrupted build resumes after pretraining and after each finished fine-tune, and the fine-tunes of one family
may run in several processes at once (`python -m benchmarks.language.family --config cpu --task NAME`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from . import corpora  # noqa: E402

CACHE_ROOT = Path(os.environ.get("TALLZIP_LANGUAGE_CACHE", "/work/cache/language"))
BOS, PAD, ANSWER = "<|endoftext|>", "<|pad|>", "<|answer|>"


@dataclass(frozen=True)
class Config:
    name: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    seq: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    cls_finetune_steps: int  # classification tasks: steps are shorter (one label token of loss), so more of them
    cls_finetune_batch: int
    cls_finetune_lr: float   # a new label token from a small base needs a larger step than text does
    val_blocks: int          # generative tasks: held-out blocks of `seq` tokens
    test_blocks: int
    cls_val: int             # classification tasks: held-out examples
    cls_test: int
    cls_max_tokens: int      # an example's input is cut to this many tokens
    corpus_chars: int        # text the tokenizer and pretraining read at most
    max_shard_size: str
    tasks: tuple = tuple(corpora.TASKS)
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def base_digest(self) -> str:
        """What the tokenizer, the splits and the base depend on (not the fine-tuning settings)."""
        keep = {k: v for k, v in asdict(self).items() if "finetune" not in k}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


CONFIGS = {
    # the benchmark's family: 5.3M parameters. Sized for two CPU cores shared with other jobs: with one torch thread a
    # step of 16x128 tokens takes about 0.8 s here when the machine is quiet (two threads ran 4-10x slower than one
    # under load). Every task is fine-tuned with the same AdamW learning rate, so task vectors have comparable sizes.
    "cpu": Config("cpu", vocab=4096, hidden=256, layers=4, intermediate=688, heads=4, seq=128,
                  pretrain_steps=500, pretrain_batch=16, pretrain_lr=2e-3, finetune_steps=100, finetune_batch=8,
                  finetune_lr=1e-3, cls_finetune_steps=120, cls_finetune_batch=16, cls_finetune_lr=1e-3,
                  val_blocks=12, test_blocks=24, cls_val=100, cls_test=200, cls_max_tokens=24,
                  corpus_chars=4_000_000, max_shard_size="4MB"),
    # the first family measured (RESULTS.md says what changed): 1.1M parameters, a weaker base, classification
    # fine-tunes with 4x the learning rate of the generative ones
    "cpu-1m": Config("cpu", vocab=2048, hidden=128, layers=3, intermediate=344, heads=4, seq=64,
                     pretrain_steps=200, pretrain_batch=8, pretrain_lr=2e-3, finetune_steps=30, finetune_batch=8,
                     finetune_lr=5e-4, cls_finetune_steps=150, cls_finetune_batch=16, cls_finetune_lr=2e-3,
                     val_blocks=12, test_blocks=24, cls_val=100, cls_test=200, cls_max_tokens=24,
                     corpus_chars=4_000_000, max_shard_size="1MB"),
    # the first end-to-end run's family
    "small": Config("small", vocab=1024, hidden=96, layers=2, intermediate=256, heads=4, seq=64,
                    pretrain_steps=120, pretrain_batch=16, pretrain_lr=3e-3, finetune_steps=30, finetune_batch=8,
                    finetune_lr=5e-4, cls_finetune_steps=30, cls_finetune_batch=8, cls_finetune_lr=2e-3, val_blocks=8, test_blocks=16, cls_val=60, cls_test=120, cls_max_tokens=20,
                    corpus_chars=1_000_000, max_shard_size="200KB"),
    # the smoke test's family (seconds)
    "tiny": Config("tiny", vocab=320, hidden=32, layers=1, intermediate=64, heads=2, seq=32,
                   pretrain_steps=3, pretrain_batch=4, pretrain_lr=3e-3, finetune_steps=2, finetune_batch=4,
                   finetune_lr=1e-3, cls_finetune_steps=2, cls_finetune_batch=4, cls_finetune_lr=1e-3, val_blocks=2, test_blocks=2, cls_val=8, cls_test=8, cls_max_tokens=12,
                   corpus_chars=60_000, max_shard_size="20KB", tasks=("news", "langid")),
}


def label_token(task: str, label: str) -> str:
    return f"<|{task}:{label}|>"


# --------------------------------------------------------------------------- text -> tokens


def _split(items: list, n_val: int, n_test: int, seed: int):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[n_val + n_test:], items[:n_val], items[n_val:n_val + n_test]


def raw_tasks(config: Config) -> dict:
    """Per task: its documents (generative) or (text, label) examples (classification), split by a seeded shuffle.
    Generative tasks hold out 10% + 10% of their documents; classification tasks cls_val and cls_test examples."""
    out = {}
    for name in config.tasks:
        task = corpora.TASKS[name]
        if task.kind == "generative":
            docs = corpora.generative_documents(name)
            n = max(1, len(docs) // 10)
            out[name] = dict(zip(("train", "val", "test"), _split(docs, n, n, config.seed)))
        else:
            examples = corpora.classification_examples(name)
            n_val = min(config.cls_val, len(examples) // 5)
            n_test = min(config.cls_test, len(examples) // 4)
            out[name] = dict(zip(("train", "val", "test"), _split(examples, n_val, n_test, config.seed)))
    return out


def train_tokenizer(config: Config, texts: list[str], labels: dict):
    """Byte-level BPE trained here on the pretraining text; specials: BOS/EOS, pad, the answer marker, labels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, PAD, ANSWER] + [label_token(t, l) for t, ls in labels.items() for l in ls]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   additional_special_tokens=specials[2:])


def _blocks(tokenizer, docs: list[str], seq: int, limit: int | None = None) -> torch.Tensor:
    ids = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        if limit and len(ids) >= limit * seq:
            break
    n = len(ids) // seq
    if limit:
        n = min(n, limit)
    return torch.tensor(ids[:n * seq], dtype=torch.int32).view(n, seq)


def _examples(tokenizer, task: str, examples, max_tokens: int) -> dict:
    """input_ids (right-padded), the answer position (where the label token is predicted) and the label ids."""
    answer = tokenizer.convert_tokens_to_ids(ANSWER)
    rows, positions, labels = [], [], []
    for text, label in examples:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] + [answer]
        positions.append(len(ids) - 1)
        labels.append(tokenizer.convert_tokens_to_ids(label_token(task, label)))
        rows.append(ids + [labels[-1]])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return {"input_ids": ids, "position": torch.tensor(positions), "label": torch.tensor(labels)}


def task_data(config: Config, tokenizer, raw: dict, labels: dict) -> dict:
    out = {}
    for name, splits in raw.items():
        if corpora.TASKS[name].kind == "generative":
            out[name] = {"train": _blocks(tokenizer, splits["train"], config.seq),
                         "val": _blocks(tokenizer, splits["val"], config.seq, config.val_blocks),
                         "test": _blocks(tokenizer, splits["test"], config.seq, config.test_blocks)}
        else:
            out[name] = {split: _examples(tokenizer, name, ex, config.cls_max_tokens) for split, ex in splits.items()}
            out[name]["label_ids"] = torch.tensor([tokenizer.convert_tokens_to_ids(label_token(name, l))
                                                   for l in labels[name]])
    return out


# --------------------------------------------------------------------------- model and training


def model_config(config: Config, tokenizer):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=config.intermediate,
                       num_hidden_layers=config.layers, num_attention_heads=config.heads,
                       num_key_value_heads=config.heads, max_position_embeddings=max(256, config.seq * 2),
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _lm_batch(blocks: torch.Tensor, rng: torch.Generator, batch: int):
    idx = torch.randint(0, blocks.shape[0], (batch,), generator=rng)
    ids = blocks[idx].long()
    return {"input_ids": ids, "labels": ids}


def _cls_batch(data: dict, rng: torch.Generator, batch: int, pad: int):
    idx = torch.randint(0, data["input_ids"].shape[0], (batch,), generator=rng)
    ids = data["input_ids"][idx].long()
    labels = torch.full_like(ids, -100)
    rows = torch.arange(batch)
    labels[rows, data["position"][idx] + 1] = ids[rows, data["position"][idx] + 1]  # loss on the label token only
    return {"input_ids": ids, "labels": labels, "attention_mask": (ids != pad).long()}


def train(model, next_batch, steps: int, lr: float, weight_decay: float, warmup: int, log=None) -> float:
    """AdamW on every parameter, linear warmup then cosine decay; returns the seconds taken."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    model.train()
    start = time.time()
    for step in range(steps):
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 25 == 0 or step == steps - 1):
            log(f"  step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.eval()
    return time.time() - start


def save(model, tokenizer, folder: Path, config: Config) -> None:
    """As LLMs ship: bf16 safetensors in several shards with their index, config, generation config, tokenizer."""
    from transformers import GenerationConfig
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    model.save_pretrained(folder, max_shard_size=config.max_shard_size)
    tokenizer.save_pretrained(folder)
    model.to(torch.float32)


def load_model(folder: Path):
    """The saved model in float32 for CPU compute (weights are bf16 values), checked: no missing or unexpected keys."""
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"{folder}: {bad}")
    return model.eval()


def finetune(config: Config, name: str, work: Path, tokenizer, data: dict, log=print) -> float:
    """Fine-tune one task from the saved base into work/tasks/<name> (skipped when its marker says it is done);
    returns the seconds it took. Tasks are independent, so several processes may fine-tune different tasks of
    one family at once (`python -m benchmarks.language.family --config cpu --task NAME`)."""
    done = work / "finetuned" / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    model = load_model(work / "base")  # each fine-tune starts from the shipped (bf16) base
    rng = torch.Generator().manual_seed(config.seed + 100 + list(config.tasks).index(name))
    if corpora.TASKS[name].kind == "generative":
        steps, lr = config.finetune_steps, config.finetune_lr
        batch = lambda: _lm_batch(data[name]["train"], rng, config.finetune_batch)  # noqa: E731
    else:
        steps, lr = config.cls_finetune_steps, config.cls_finetune_lr
        batch = lambda: _cls_batch(data[name]["train"], rng, config.cls_finetune_batch, tokenizer.pad_token_id)  # noqa: E731
    log(f"fine-tuning {name} ({corpora.TASKS[name].kind})")
    seconds = train(model, batch, steps, lr, 0.0, max(1, steps // 10), log)
    save(model, tokenizer, work / "tasks" / name, config)
    done.parent.mkdir(exist_ok=True)
    done.write_text(json.dumps({"seconds": seconds, "steps": steps}))
    return seconds


def finetune_alone(config: Config, name: str, root: Path = CACHE_ROOT, log=print, threads: int = 1) -> float:
    """One task's fine-tune in a family whose base is already pretrained (its .partial folder)."""
    from transformers import PreTrainedTokenizerFast
    torch.set_num_threads(threads)
    work = root / f"{config.name}-base-{config.base_digest()}.partial"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "base")
    data = {name: torch.load(work / "data" / f"{name}.pt", weights_only=True)}
    return finetune(config, name, work, tokenizer, data, log)


def family_dir(config: Config, root: Path = CACHE_ROOT) -> Path:
    return root / f"{config.name}-{config.digest()}"


def build(config: Config, root: Path = CACHE_ROOT, log=print, threads: int = 1) -> Path:
    """The family's folder, built if missing (tokenizer, base, every task's fine-tune, splits, scores)."""
    from . import scoring
    folder = family_dir(config, root)
    if (folder / "family.json").is_file():
        return folder
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    work = root / f"{config.name}-base-{config.base_digest()}.partial"  # shared by configs that differ in fine-tuning only
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    raw = raw_tasks(config)
    labels = {n: sorted({l for split in s.values() for _, l in split}) for n, s in raw.items()
              if corpora.TASKS[n].kind == "classification"}
    pre_docs = corpora.pretraining_documents()
    random.Random(config.seed).shuffle(pre_docs)
    for name, splits in raw.items():  # the generative tasks' training documents join the mixture
        if corpora.TASKS[name].kind == "generative":
            pre_docs += splits["train"][: max(1, len(splits["train"]) // 4)]
    random.Random(config.seed + 1).shuffle(pre_docs)
    text, total = [], 0
    for d in pre_docs:
        text.append(d[:200_000])
        total += len(text[-1])
        if total >= config.corpus_chars:
            break
    base_done = work / "pretrain.json"  # beside the folders: not a side file that packs would carry
    if base_done.is_file() and json.loads(base_done.read_text())["base_digest"] == config.base_digest():
        # an interrupted build resumes after pretraining: same tokenizer, splits and base
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "base")
        data = {n: torch.load(work / "data" / f"{n}.pt", weights_only=True) for n in config.tasks}
        pre = json.loads(base_done.read_text())
        prep_s, pre_s, params = pre["prepare_s"], pre["pretrain_s"], pre["parameters"]
        mcfg = model_config(config, tokenizer)
        log(f"resuming after pretraining ({params:,} parameters, {pre_s:.0f} s)")
    else:
        tokenizer = train_tokenizer(config, text + [t for n in labels for t, _ in raw[n]["train"]], labels)
        data = task_data(config, tokenizer, raw, labels)
        pre_blocks = _blocks(tokenizer, text, config.seq)
        prep_s = time.time() - t0
        log(f"data: {len(text)} pretraining documents, {pre_blocks.numel():,} tokens; prepared in {prep_s:.0f} s")

        from transformers import LlamaForCausalLM
        mcfg = model_config(config, tokenizer)
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(mcfg)
        params = sum(p.numel() for p in model.parameters())
        log(f"pretraining {params:,} parameters, {config.pretrain_steps} steps of {config.pretrain_batch}x{config.seq}")
        rng = torch.Generator().manual_seed(config.seed)
        pre_s = train(model, lambda: _lm_batch(pre_blocks, rng, config.pretrain_batch), config.pretrain_steps,
                      config.pretrain_lr, 0.1, max(1, config.pretrain_steps // 20), log)
        save(model, tokenizer, work / "base", config)
        (work / "data").mkdir(exist_ok=True)
        for name, d in data.items():
            torch.save(d, work / "data" / f"{name}.pt")
        base_done.write_text(json.dumps({"base_digest": config.base_digest(), "prepare_s": prep_s,
                                         "pretrain_s": pre_s, "parameters": params}))
    times = {"prepare_s": prep_s, "pretrain_s": pre_s, "finetune_s": {}}
    for name in config.tasks:
        times["finetune_s"][name] = finetune(config, name, work, tokenizer, data, log)
    meta = {
        "config": asdict(config), "parameters": params, "model": mcfg.to_dict(), "times": times,
        "tasks": {n: {"kind": corpora.TASKS[n].kind, "source": corpora.TASKS[n].source, "labels": labels.get(n),
                      "split_sizes": {s: (len(v) if isinstance(v, list) else None) for s, v in raw[n].items()},
                      "eval_sizes": {s: int((data[n][s]["input_ids"] if isinstance(data[n][s], dict) else data[n][s]).shape[0])
                                     for s in ("train", "val", "test")}}
                  for n in config.tasks},
        "packages": {p: _version(p) for p in ("gensim", "django", "faker", "transformers", "tokenizers", "torch")},
    }
    (work / "family.json").write_text(json.dumps(meta, indent=1))
    # scores of the base and of each fine-tune on val and test (the denominators of gain kept)
    fam = scoring.Family(work)
    base_state = scoring.folder_state(work / "base")
    meta["scores"] = {"base": {}, "finetuned": {}}
    for name in config.tasks:
        task_state = scoring.folder_state(work / "tasks" / name)
        meta["scores"]["base"][name] = {s: fam.score(name, base_state, s) for s in ("val", "test")}
        meta["scores"]["finetuned"][name] = {s: fam.score(name, task_state, s) for s in ("val", "test")}
    meta["times"]["total_s"] = time.time() - t0
    (work / "family.json").write_text(json.dumps(meta, indent=1))
    (work / "README.md").write_text(README.format(name=folder.name, params=params))
    work.rename(folder)
    return folder


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m benchmarks.language.family")
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--task", help="fine-tune only this task (the base must be pretrained)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    log = lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)  # noqa: E731
    if args.task:
        finetune_alone(CONFIGS[args.config], args.task, log=log, threads=args.threads)
    else:
        print(build(CONFIGS[args.config], log=log, threads=args.threads))


README = """# {name}: the language benchmark's family (benchmarks/language, `python -m benchmarks.language`)

A Llama decoder ({params:,} parameters) and BPE tokenizer trained on this machine on real text from wheels
(benchmarks/language/corpora.py names every source), then fully fine-tuned (AdamW, all parameters) per task.

- base/            the pretrained model: bf16 safetensors shards + model.safetensors.index.json, config.json,
                   generation_config.json, tokenizer.json / tokenizer_config.json / special_tokens_map.json
- tasks/<task>/    one full fine-tune per task, saved the same way (`tallzip pack tasks --base base`)
- data/<task>.pt   token tensors of the train / val / test splits (torch.load(..., weights_only=True))
- family.json      the config, each task's kind, source, labels and split sizes, the base's and fine-tunes'
                   scores on val and test (loss for generative tasks, accuracy for classification), times

Score any state dict or model folder on a task: `benchmarks.language.scoring:evaluate` (validation,
higher is better) or `benchmarks.language.scoring.Family(folder).score(task, state, split)`.
"""


if __name__ == "__main__":
    main()
