"""A generated family shaped like a small LLM, kept as Hugging Face keeps it (issue 12).

    python -m benchmarks.llm_family OUT --preset 1b --tasks 8 --dtype bf16
    python -m benchmarks.llm_family OUT --preset small --tasks 2            # 0.80 GB per checkpoint

writes OUT/base/ and OUT/tasks/task00/ ... (pack with `tallzip pack OUT/tasks --base OUT/base`),
each a sharded safetensors folder: `model-0000k-of-0000n.safetensors`, `model.safetensors.index.json`,
`config.json` and a small `tokenizer.json`.

Presets (Llama names; bf16 sizes):
- `1b`: TinyLlama-1.1B's shapes: vocabulary 32000, hidden 2048, 22 layers, MLP 5632, grouped-query
  attention with 4 key/value heads of 64, an untied lm_head: 1.10 B parameters, 2.2 GB.
- `small`: a 32000x4096 embedding and two layers of 4096x11008 MLP matrices, embedding tied
  (no lm_head in the files, `tie_word_embeddings` in config.json): 0.40 B parameters, 0.80 GB.

Weights are modelled, not trained. The base is N(0, 0.02) (norms near 1). A task is the base plus
a delta that looks like a fine-tune's: each task moves a share of 25-40% of each tensor's weights
(those of its largest Gaussian draws) by ~1e-3 and the rest 100x less, with a per-task,
per-tensor scale drawn log-normally, plus a small rank-4 component; then rounded to the
checkpoint's dtype, so in bf16 about half the weights stay bit-identical, as small updates do in
real bf16 fine-tunes. TALL masks at lambda 0.4 then keep 22-36% of a matrix's weights per task at
N = 8 (36-51% at N = 2, 13-36% at N = 20: fewer as more tasks share the mtv), measured with the
numpy formula of tests/conftest.py.

Everything is streamed tensor by tensor (and huge tensors block by block), never a whole model in
memory; values come from torch's vectorised RNG seeded per (seed, tensor, task, block), so the
output is the same whatever the thread count; tasks of a tensor are made on parallel threads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist

import torch

from tallzip.formats.checkpoints.folders import SHARD_INDEX
from tallzip.formats.checkpoints.outputs import SafetensorsStream
from tallzip.formats.tensors import dtype_name

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
BLOCK_ELEMENTS = 8 << 20        # generation block: bounds float32 temporaries to ~100 MB per thread
DEFAULT_SHARD_BYTES = 500 << 20
RANK = 4                        # of each task delta's low-rank component

PRESETS = {
    "1b": dict(vocab=32000, hidden=2048, layers=22, mlp=5632, heads=32, kv_heads=4, attention=True, tie=False),
    "small": dict(vocab=32000, hidden=4096, layers=2, mlp=11008, heads=32, kv_heads=32, attention=False, tie=True),
}


def model_shapes(preset: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order Hugging Face's Llama lists its state dict."""
    h, m = preset["hidden"], preset["mlp"]
    kv = h // preset["heads"] * preset["kv_heads"]
    shapes = [("model.embed_tokens.weight", (preset["vocab"], h))]
    for i in range(preset["layers"]):
        p = f"model.layers.{i}."
        if preset["attention"]:
            shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                       (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h))]
        shapes += [(p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                   (p + "mlp.down_proj.weight", (h, m)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    shapes.append(("model.norm.weight", (h,)))
    if not preset["tie"]:
        shapes.append(("lm_head.weight", (preset["vocab"], h)))
    return shapes


def plan_shards(shapes, itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Names per shard, in order, each shard up to shard_bytes (one bigger tensor gets its own)."""
    shards, size = [[]], 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _row_blocks(shape):
    """Row ranges of a tensor, each about BLOCK_ELEMENTS elements."""
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, BLOCK_ELEMENTS // max(per_row, 1)) if len(shape) > 1 else rows
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


_scratch = threading.local()


def _work_buffers(shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 buffers of this thread, shaped `shape` and reused block after block (fresh
    ones would cost a page fault per 4 KiB each time)."""
    numel = math.prod(shape)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None or buffers[0].numel() < numel:
        buffers = _scratch.buffers = tuple(torch.empty(max(numel, BLOCK_ELEMENTS)) for _ in range(2))
    return tuple(b[:numel].view(shape) for b in buffers)


def fill_base_block(out: torch.Tensor, name: str, block: int, seed: int):
    """Rows _row_blocks(out.shape)[block] of the base tensor `name`, written into `out`."""
    r0, r1 = _row_blocks(tuple(out.shape))[block]
    values, _ = _work_buffers((r1 - r0, *out.shape[1:]))
    torch.randn(values.shape, generator=_generator(seed, "base", name, block), out=values).mul_(0.02)
    out[r0:r1].copy_(values.add_(1.0) if name.endswith("norm.weight") else values)


def make_task(base: torch.Tensor, name: str, task: int, seed: int) -> torch.Tensor:
    """base + a fine-tune-like delta (see the module's docstring), rounded to base's dtype."""
    shape, out = tuple(base.shape), torch.empty_like(base)
    g = _generator(seed, "task", task)
    density = 0.25 + 0.15 * float(torch.rand((), generator=g))           # this task's share of moved weights
    threshold = NormalDist().inv_cdf(1 - density / 2)                    # P(|N(0, 1)| > threshold) = density
    g = _generator(seed, "task", task, name)
    scale = 1e-3 * math.exp(0.25 * float(torch.randn((), generator=g)))  # this tensor's, for this task
    if name.endswith("norm.weight"):
        scale *= 10  # norms sit near 1, where a bf16 step is 0.008: they move more, as trained ones do
    low_rank = None
    if len(shape) == 2:
        left = torch.randn(shape[0], RANK, generator=g)
        right = torch.randn(RANK, shape[1], generator=g) * (0.03 * scale / math.sqrt(RANK))
        low_rank = (left, right)
    for block, (r0, r1) in enumerate(_row_blocks(shape)):
        g = _generator(seed, "task", task, name, block)
        delta, factor = _work_buffers((r1 - r0, *shape[1:]))
        torch.randn(delta.shape, generator=g, out=delta)
        # The moved weights are those of the largest |draw| (a share `density` of them): they keep
        # `scale`, the rest get scale / 100. One draw per weight (the RNG is most of the cost).
        torch.abs(delta, out=factor).gt_(threshold).mul_(0.99 * scale).add_(0.01 * scale)
        delta.mul_(factor)
        if low_rank is not None:
            delta.addmm_(low_rank[0][r0:r1], low_rank[1])
        out[r0:r1].copy_(delta.add_(base[r0:r1]))  # rounded to base's dtype by the copy
    return out


def _config(preset: dict, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": preset["vocab"],
        "hidden_size": preset["hidden"], "intermediate_size": preset["mlp"],
        "num_hidden_layers": preset["layers"], "num_attention_heads": preset["heads"],
        "num_key_value_heads": preset["kv_heads"], "tie_word_embeddings": preset["tie"],
        "torch_dtype": str(dtype).removeprefix("torch."), "rms_norm_eps": 1e-5,
        "note": "generated by benchmarks/llm_family.py: shapes of a real model, weights modelled",
    }


def _tokenizer(vocab_size: int) -> dict:
    """A small, well-formed tokenizer.json (a byte-level BPE with a few hundred entries)."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"<unk>": 256, "<s>": 257, "</s>": 258})
    return {"version": "1.0", "added_tokens": [{"id": 257, "content": "<s>", "special": True}],
            "model": {"type": "BPE", "vocab": vocab, "merges": [], "unk_token": "<unk>"},
            "note": f"stand-in for a {vocab_size}-entry tokenizer"}


class _FolderWriter:
    """One checkpoint folder being written: its shard streams, side files and index."""

    def __init__(self, folder: Path, shapes, shards, dtype, side_files: dict):
        self.folder = folder
        folder.mkdir(parents=True)
        shape_of, n = dict(shapes), len(shards)
        self.files = {f"model-{k + 1:05d}-of-{n:05d}.safetensors": names for k, names in enumerate(shards)}
        self.streams, self.where = {}, {}
        for file, names in self.files.items():
            specs = [(name, dtype_name(dtype), shape_of[name]) for name in names]
            self.streams[file] = SafetensorsStream(folder / file, specs, metadata={"format": "pt"})
            self.where.update({name: file for name in names})
        self.total = sum(math.prod(shape_of[name]) for name in self.where) * dtype.itemsize
        for file_name, content in side_files.items():
            (folder / file_name).write_text(content)

    def write(self, name, tensor):
        self.streams[self.where[name]].write(name, tensor)

    def close(self):
        for stream in self.streams.values():
            stream.close()
        index = {"metadata": {"total_size": self.total}, "weight_map": self.where}
        (self.folder / SHARD_INDEX).write_text(json.dumps(index, indent=2))


def generate(out, preset_name="1b", n_tasks=8, dtype="bf16", seed=0, threads=None,
             shard_bytes=DEFAULT_SHARD_BYTES, tie=None, log=print) -> dict:
    """Write the family; returns {"base": path, "tasks": [paths], "bytes": ..., "seconds": ...}."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out}: exists and is not empty (this never overwrites files)")
    preset = dict(PRESETS[preset_name] if isinstance(preset_name, str) else preset_name)
    if tie is not None:
        preset["tie"] = tie
    torch_dtype = DTYPES[dtype]
    shapes = model_shapes(preset)
    shards = plan_shards(shapes, torch_dtype.itemsize, shard_bytes)
    side = {"config.json": json.dumps(_config(preset, torch_dtype), indent=2),
            "tokenizer.json": json.dumps(_tokenizer(preset["vocab"]))}
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(1)  # parallel over tasks instead: torch's RNG is one thread per call
    started = time.perf_counter()
    base = _FolderWriter(out / "base", shapes, shards, torch_dtype, side)
    tasks = [_FolderWriter(out / "tasks" / f"task{t:02d}", shapes, shards, torch_dtype, side)
             for t in range(n_tasks)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llm-family") as pool:
        for i, (name, shape) in enumerate(shapes):
            # the base tensor's row blocks on all threads, then one task per thread
            base_tensor = torch.empty(shape, dtype=torch_dtype)
            list(pool.map(lambda b: fill_base_block(base_tensor, name, b, seed), range(len(_row_blocks(shape)))))
            base.write(name, base_tensor)
            for first in range(0, n_tasks, threads):  # at most `threads` task tensors held at once
                group = range(first, min(first + threads, n_tasks))
                for t, tensor in zip(group, pool.map(lambda t: make_task(base_tensor, name, t, seed), group)):
                    tasks[t].write(name, tensor)
            if log and (i + 1) % 20 == 0:
                log(f"  {i + 1}/{len(shapes)} tensors, {time.perf_counter() - started:.0f} s")
    for writer in [base, *tasks]:
        writer.close()
    seconds = time.perf_counter() - started
    total = base.total * (n_tasks + 1)
    return {"base": out / "base", "tasks": [w.folder for w in tasks], "bytes": total, "seconds": seconds,
            "parameters": base.total // torch_dtype.itemsize, "shards": len(shards)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: every CPU")
    parser.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20, help="shard size in MiB")
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument("--tie", dest="tie", action="store_true", default=None, help="tie the embedding (no lm_head)")
    tie.add_argument("--no-tie", dest="tie", action="store_false", help="an untied lm_head")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    result = generate(args.out, args.preset, args.tasks, args.dtype, args.seed, args.threads,
                      args.shard_mb << 20, args.tie)
    print(f"{args.preset} {args.dtype}: base + {args.tasks} tasks, {result['parameters'] / 1e9:.2f} B parameters "
          f"and {result['shards']} shards each, {result['bytes'] / 1e9:.2f} GB in {result['seconds']:.1f} s "
          f"({result['bytes'] / 1e9 / result['seconds']:.2f} GB/s); pack with: "
          f"tallzip pack {args.out / 'tasks'} --base {args.out / 'base'} -o family.tallz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
