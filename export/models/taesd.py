"""Tiny autoencoder (TAESD, Bohan 2023): SD's latent space at about 1% of the full VAE's work.

Plain 3x3 convolutions and ReLU residual blocks, no normalisation and no attention. Module names follow
diffusers' AutoencoderTiny (`encoder.layers.N`, `decoder.layers.N`), whose Sequential indices are TAESD's own
(the decoder's shifted by one: TAESD's layer 0 is the input clamp, done in forward here).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TinyVAEConfig


def conv(cin: int, cout: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kwargs)


class Block(nn.Module):
    """x -> relu(x + conv-relu-conv-relu-conv(x))"""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                                  conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x)


class Encoder(nn.Module):
    """image in [-1, 1] -> latents; per stage: a stride-2 conv (not the first), then blocks"""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        ch = cfg.encoder_block_out_channels[0]
        layers: list[nn.Module] = [conv(cfg.in_channels, ch)]
        for stage, blocks in enumerate(cfg.num_encoder_blocks):
            if stage:
                layers.append(conv(ch, ch, stride=2, bias=False))
            layers += [Block(ch) for _ in range(blocks)]
        layers.append(conv(ch, cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x + 1) / 2)  # TAESD was trained on [0, 1] images


class Decoder(nn.Module):
    """latents -> image in [-1, 1]; per stage: blocks, then 2x nearest upsampling and a conv (not the last)"""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        ch, stages = cfg.decoder_block_out_channels[0], len(cfg.num_decoder_blocks)
        layers: list[nn.Module] = [conv(cfg.latent_channels, ch), nn.ReLU()]
        for stage, blocks in enumerate(cfg.num_decoder_blocks):
            layers += [Block(ch) for _ in range(blocks)]
            if stage < stages - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(ch, ch, bias=False)]
        layers.append(conv(ch, cfg.out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(z / 3) * 3  # soft clamp to [-3, 3], where TAESD's latents live
        return self.layers(z) * 2 - 1


class AutoencoderTiny(nn.Module):
    """image [B, 3, H, W] in [-1, 1] <-> latents [B, C, H/8, W/8] of the diffusion model, already scaled
    (config.scaling_factor is 1 for TAESD/TAESDXL: divide by it, and add shift_factor, before decode)"""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """image -> latents (deterministic: TAESD has no variance)"""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents -> image in about [-1, 1]"""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image -> reconstruction"""
        return self.decode(self.encode(x))
