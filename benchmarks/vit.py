"""A small vision transformer whose state dict uses open_clip's vision-tower names.

Parameter names and shapes follow ``open_clip.transformer.VisionTransformer`` (default
settings: class token pooling, learnable positional embedding, ln_pre, no layer scale):

    conv1.weight, class_embedding, positional_embedding, ln_pre.{weight,bias},
    transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
    attn.out_proj.{weight,bias}, ln_2, mlp.c_fc, mlp.c_proj}.{weight,bias},
    ln_post.{weight,bias}, proj

so the checkpoints tallzip packs in the benchmark go through the same code path (same key
patterns, 1-D vs 2-D tensors, an unbiased conv stem, fused qkv projections) as a real
CLIP image encoder.  A state dict from this module loads into open_clip's class with the
same sizes and gives the same outputs (tests/test_family_smoke.py checks this when
open_clip is installed).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    patch_size: int = 7
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    output_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        # nn.MultiheadAttention stores the fused qkv projection as in_proj_weight/in_proj_bias
        # and the output projection as out_proj -- exactly open_clip's names.
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Image encoder: [B, 3, H, W] -> [B, output_dim] (unnormalised, like open_clip)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        width = config.width
        grid = config.image_size // config.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, patches, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classify(features: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
    """Logits of a task head on L2-normalised image features (CLIP-style heads)."""
    return F.normalize(features, dim=-1) @ head_weight.T + head_bias
