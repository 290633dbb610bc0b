"""A generated family of checkpoints shaped like an open_clip ViT image encoder, for the demo and benchmarks.

Task vectors are heavy-tailed (Laplace) with a per-weight gain shared across tasks and a per-task
scale, the way fine-tuning updates concentrate on some weights; each task also has its own head
(a tensor the base lacks), and a frozen block (like the unused text tower of the paper's released
encoders) that no task changes. Generated, not trained: use the real-data benchmark for accuracy.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from tallzip.errors import TallzipError
from tallzip.formats.checkpoints.outputs import save_tensors

VIT_B32 = dict(width=768, layers=12, patch=32, image=224, embed=512)


def vit_shapes(width=64, layers=2, patch=8, image=32, embed=32) -> "OrderedDict[str, tuple]":
    """Tensor names and shapes of an open_clip VisionTransformer (`visual.` prefix as in a CLIP state dict)."""
    grid = image // patch
    s = OrderedDict()
    s["visual.class_embedding"] = (width,)
    s["visual.positional_embedding"] = (grid * grid + 1, width)
    s["visual.proj"] = (width, embed)
    s["visual.conv1.weight"] = (width, 3, patch, patch)
    s["visual.ln_pre.weight"] = (width,)
    s["visual.ln_pre.bias"] = (width,)
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        s[p + "ln_1.weight"] = (width,)
        s[p + "ln_1.bias"] = (width,)
        s[p + "attn.in_proj_weight"] = (3 * width, width)
        s[p + "attn.in_proj_bias"] = (3 * width,)
        s[p + "attn.out_proj.weight"] = (width, width)
        s[p + "attn.out_proj.bias"] = (width,)
        s[p + "ln_2.weight"] = (width,)
        s[p + "ln_2.bias"] = (width,)
        s[p + "mlp.c_fc.weight"] = (4 * width, width)
        s[p + "mlp.c_fc.bias"] = (4 * width,)
        s[p + "mlp.c_proj.weight"] = (width, 4 * width)
        s[p + "mlp.c_proj.bias"] = (width,)
    s["visual.ln_post.weight"] = (width,)
    s["visual.ln_post.bias"] = (width,)
    return s


# The text side of the paper's released ViT-B/32 image-encoder checkpoints, which no task changes:
# with VIT_B32's 87,849,216 visual parameters, 113,448,705 in all (22.6% frozen), as those files hold.
CLIP_TEXT_FROZEN = dict(frozen_width=512, frozen_vocab=49408, frozen_context=77)


def make_base(shapes, *, frozen_width=0, frozen_vocab=None, frozen_context=0, seed=0) -> "OrderedDict[str, torch.Tensor]":
    """Base tensors for `shapes`, plus frozen ones when frozen_width > 0: a token embedding of
    frozen_vocab (default 4 x frozen_width) rows and a logit scale; with frozen_context > 0 also a
    text positional embedding, final LayerNorm and text projection, named as in a CLIP state dict."""
    gen = torch.Generator().manual_seed(seed)
    base = OrderedDict()
    for name, shape in shapes.items():
        if name.endswith((".weight", "_weight")) and ("ln_" in name):
            base[name] = 1.0 + 0.02 * torch.randn(shape, generator=gen)
        else:
            base[name] = 0.02 * torch.randn(shape, generator=gen)
    if frozen_width:
        base["token_embedding.weight"] = 0.02 * torch.randn((frozen_vocab or 4 * frozen_width, frozen_width), generator=gen)
        base["logit_scale"] = torch.tensor(4.6052)
        if frozen_context:
            base["positional_embedding"] = 0.01 * torch.randn((frozen_context, frozen_width), generator=gen)
            base["ln_final.weight"] = 1.0 + 0.02 * torch.randn((frozen_width,), generator=gen)
            base["ln_final.bias"] = 0.02 * torch.randn((frozen_width,), generator=gen)
            base["text_projection"] = frozen_width ** -0.5 * torch.randn((frozen_width, frozen_width), generator=gen)
    return base


def make_task(base, task_index: int, *, seed=0, scale=1e-3, n_classes=10, embed=None) -> "OrderedDict[str, torch.Tensor]":
    """One fine-tuned checkpoint: base + a heavy-tailed task vector on the visual tensors, plus a head."""
    gain_gen = torch.Generator().manual_seed(seed + 7919)  # shared by all tasks: the weights that matter
    gen = torch.Generator().manual_seed(seed + 1000 + task_index)
    task_scale = scale * (0.5 + torch.rand((), generator=gen).item())
    out = OrderedDict()
    for name, tensor in base.items():
        if name.startswith("visual."):
            gain = torch.exp(0.75 * torch.randn(tensor.shape, generator=gain_gen))
            # Laplace(0, 1): an exponential magnitude with a random sign
            magnitude = -torch.log(torch.rand(tensor.shape, generator=gen).clamp_min(1e-12))
            sign = torch.randint(0, 2, tensor.shape, generator=gen) * 2 - 1
            laplace = magnitude * sign
            out[name] = tensor + task_scale * gain * laplace
        else:
            out[name] = tensor.clone()
    embed = embed or base["visual.proj"].shape[1]
    out["head.weight"] = 0.1 * torch.randn((n_classes + task_index % 3, embed), generator=gen)
    out["head.num_updates"] = torch.tensor([1000 + task_index], dtype=torch.int64)
    return out


def make_family(folder, n_tasks=6, *, fmt="safetensors", seed=0, frozen_width=32, **shape_kwargs) -> tuple[Path, Path]:
    """Write base and n_tasks fine-tuned checkpoints under folder/; returns (base path, tasks folder)."""
    folder = Path(folder)
    tasks_dir = folder / "finetuned"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    ext = ".safetensors" if fmt == "safetensors" else ".pt"
    base = make_base(vit_shapes(**shape_kwargs), frozen_width=frozen_width, seed=seed)
    base_path = folder / f"base{ext}"
    save_tensors(base, base_path, fmt, {"source": "tallzip demo base"} if fmt == "safetensors" else None)
    for i in range(n_tasks):
        task = make_task(base, i, seed=seed)
        save_tensors(task, tasks_dir / f"task{i:02d}{ext}", fmt,
                     {"task": f"task{i:02d}"} if fmt == "safetensors" else None)
    return base_path, tasks_dir


def demo_files(n_tasks: int, fmt="safetensors") -> list[str]:
    """What make_family writes under its folder, relative to it (the demo adds its archive and one extract)."""
    ext = ".safetensors" if fmt == "safetensors" else ".pt"
    return [f"base{ext}", *(f"finetuned/task{i:02d}{ext}" for i in range(n_tasks))]


def check_demo_folder(folder, outputs, *, force: bool):
    """Refuse a folder the demo would write into that holds anything but the demo's own outputs
    `outputs` (relative paths): without `force`, any non-empty folder; with it, a folder whose
    finetuned/ holds other files too (pack would take them for tasks). Nothing is deleted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TallzipError(f"{folder}: exists and is not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not force:
        raise TallzipError(f"{folder}: already exists and is not empty (use --force to replace "
                           "the demo's own files there; nothing else is touched)")
    for rel in outputs:
        if (folder / rel).is_dir():
            raise TallzipError(f"{folder / rel}: is a folder, where the demo writes a file")
    ours = {Path(rel).name for rel in outputs if Path(rel).parent.name == "finetuned"}
    tasks_dir = folder / "finetuned"
    others = sorted(p.name for p in tasks_dir.iterdir() if p.name not in ours) if tasks_dir.is_dir() else []
    if others:
        raise TallzipError(f"{tasks_dir}: holds {others[0]}, which the demo does not write (it would pack it as "
                           "a task); give another --folder")
