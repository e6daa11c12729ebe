"""Building blocks shared by the VAE and the U-Net: ResNet block, attention, down/up sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d]"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads * d]"""
    return x.transpose(1, 2).flatten(2)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus an optional time embedding and a 1x1 shortcut (He et al. 2015)."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, temb_dim: int | None = None,
                 out_scale: float = 1.0):
        super().__init__()
        self.norm1 = group_norm(cin, groups, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_dim is not None:
            self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = group_norm(cout, groups, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return (skip + h) / self.out_scale if self.out_scale != 1.0 else skip + h


class Attention(nn.Module):
    """Multi-head (cross-)attention on [B, T, C] tokens (Vaswani et al. 2017)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0 keeps the reference's key names

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (split_heads(f(t), self.heads) for f, t in
                   ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        if self.upcast:  # SD 2.x overflows fp16 in q @ k
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](merge_heads(out))


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the VAE pads right/bottom only, the U-Net pads all sides."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to a given size, for odd skip sizes), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        if like is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=like.shape[-2:], mode="nearest")
        return self.conv(x)
