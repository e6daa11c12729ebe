"""KL autoencoder of latent diffusion (Rombach et al. 2022): image <-> 4-channel latents at 1/8 size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .layers import Attention, Downsample, ResnetBlock, Upsample, group_norm

EPS = 1e-6  # the VAE's GroupNorm epsilon, fixed in the original code


class AttnBlock(Attention):
    """Single-head self-attention over all pixels, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = group_norm(channels, groups, EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(self.group_norm(x).flatten(2).transpose(1, 2))
        return x + h.transpose(1, 2).unflatten(2, x.shape[-2:])


class MidBlock(nn.Module):
    """ResNet, self-attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([AttnBlock(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups, EPS) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(cout, asymmetric=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups, EPS) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(ch[-1], g, EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n))
        self.conv_norm_out = group_norm(ch[-1], g, EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """image [B, 3, H, W] in [-1, 1] <-> raw latents [B, 4, H/8, W/8] (divide by scaling_factor before decode)"""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image -> (mean, logvar) of the latent Gaussian, unscaled and unclamped"""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents -> image in about [-1, 1]"""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image -> reconstruction through the latent mean"""
        return self.decode(self.encode(x)[0])
