"""A tiny Vision Transformer backbone (:class:`TinyViT`) sized for CPU training on 28x28 images.

Every linear map (patch embedding, ``qkv``, attention projection, MLP) has a bias and every
LayerNorm is affine, as in ViT-S — the model HyperFlow bias-tunes in the paper. No dropout and no
BatchNorm, so ``train()`` and ``eval()`` compute the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int
from ._checks import check_image_batch

__all__ = ["TinyViT", "Attention", "TransformerBlock"]


class Attention(nn.Module):
    """Multi-head self-attention with a biased ``qkv`` projection.

    Shape:
        - Input: ``(batch, tokens, dim)``.
        - Output: ``(batch, tokens, dim)``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (batch, heads, tokens, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    Shape:
        - Input / output: ``(batch, tokens, dim)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=True), nn.GELU(),
                                 nn.Linear(hidden, dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small ViT: non-overlapping patches, learned positions, pre-norm blocks, mean pooling.

    Args:
        in_channels: image channels.
        image_size: input height and width (the positional table is sized for it).
        patch_size: patch side; must divide ``image_size``.
        dim: token width (``feature_dim``).
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.

    Shape:
        - Input: ``(batch, in_channels, image_size, image_size)``.
        - Output: ``(batch, dim)`` — the final LayerNorm of the mean over patch tokens.

    Example:
        >>> TinyViT()(torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 64])
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.in_channels = check_int("TinyViT", "in_channels", in_channels)
        self.image_size = check_int("TinyViT", "image_size", image_size)
        self.patch_size = check_int("TinyViT", "patch_size", patch_size)
        self.dim = check_int("TinyViT", "dim", dim)
        self.depth = check_int("TinyViT", "depth", depth)
        self.heads = check_int("TinyViT", "heads", heads)
        if image_size % patch_size:
            raise ValueError(f"TinyViT: patch_size ({patch_size}) must divide image_size "
                             f"({image_size})")
        if dim % heads:
            raise ValueError(f"TinyViT: heads ({heads}) must divide dim ({dim})")
        if not mlp_ratio > 0:
            raise ValueError(f"TinyViT: mlp_ratio must be > 0, got {mlp_ratio}")
        self.mlp_ratio = float(mlp_ratio)
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=True)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, self.mlp_ratio)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch("TinyViT.forward", x, self.in_channels)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"TinyViT.forward: x must be {self.image_size}x{self.image_size} "
                             f"(image_size), got {x.shape[-2]}x{x.shape[-1]}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(tokens).mean(dim=1))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, image_size={self.image_size}, "
                f"patch_size={self.patch_size}, dim={self.dim}, depth={self.depth}, "
                f"heads={self.heads}, mlp_ratio={self.mlp_ratio}")
