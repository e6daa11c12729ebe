"""Text-conditioned U-Net of latent diffusion (Rombach et al. 2022): noisy latents, timestep, text -> noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CROSS_DOWN, CROSS_UP, MID_CROSS, UNetConfig
from .layers import Attention, Downsample, ResnetBlock, Upsample, group_norm


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal embedding of [B] timesteps (Vaswani et al. 2017), computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
    args = t.float()[:, None] * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim is not None:  # LCM: a projection of the guidance embedding, added to the timestep's
            self.cond_proj = nn.Linear(cond_dim, cin, bias=False)
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond.to(x.dtype))
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """LayerNorm-then-residual: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> `depth` transformer blocks -> feature map, with a residual."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig, depth: int = 1):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = group_norm(channels, cfg.norm_num_groups, 1e-6)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, cfg.cross_attention_dim, cfg.upcast_attention) for _ in range(depth))
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = h if self.linear else self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C]
        h = self.proj_in(h) if self.linear else h
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h) if self.linear else h
        h = h.transpose(1, 2).unflatten(2, x.shape[-2:])
        h = h if self.linear else self.proj_out(h)
        return h + x


class DownBlock(nn.Module):
    """ResNets (each followed by a transformer when `cross`), then an optional stride-2 conv."""

    def __init__(self, cin: int, cout: int, heads: int, depths: tuple[int, ...] | None, downsample: bool,
                 cfg: UNetConfig):
        """`depths`: transformer layers after each resnet; None: no transformers (DownBlock2D)."""
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim)
            for i in range(n))
        self.attentions = nn.ModuleList(SpatialTransformer(cout, heads, cfg, d) for d in depths or ())
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = self.attentions[i](x, context) if len(self.attentions) else x
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """ResNets over [x, skip] concatenations (each followed by a transformer when `cross`), then upsampling."""

    def __init__(self, cin: int, cout: int, cskip: int, heads: int, depths: tuple[int, ...] | None, upsample: bool,
                 cfg: UNetConfig):
        super().__init__()
        n = cfg.layers_per_block + 1
        # the last resnet takes the skip from the block below (or conv_in), which has `cskip` channels
        skip_ch = [cout] * (n - 1) + [cskip]
        self.resnets = nn.ModuleList(
            ResnetBlock((cin if i == 0 else cout) + skip_ch[i], cout, cfg.norm_num_groups, cfg.norm_eps,
                        cfg.time_embed_dim) for i in range(n))
        self.attentions = nn.ModuleList(SpatialTransformer(cout, heads, cfg, d) for d in depths or ())
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                like: torch.Tensor | None = None) -> torch.Tensor:
        """`skips` in the order the down path made them; `like` sets the upsampled size."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            x = self.attentions[i](x, context) if len(self.attentions) else x
        for up in self.upsamplers:
            x = up(x, like)
        return x


class MidBlock(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution; a single ResNet without cross-attention (SSD-1B)."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        cross = cfg.mid_block_type == MID_CROSS
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, cfg, cfg.mid_depth)] if cross else [])
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim,
                        out_scale=cfg.mid_block_scale_factor) for _ in range(2 if cross else 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UNet2DConditionModel(nn.Module):
    """(sample [B, C, h, w], timestep [] or [B], encoder_hidden_states [B, T, D]) -> prediction [B, 4, h, w]

    SDXL U-Nets also take text_embeds [B, text_embeds_dim] and time_ids [B, 6] (original size, crop top-left and
    target size, each as (height, width))."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, heads, n = cfg.block_out_channels, cfg.heads, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
        if cfg.is_sdxl:
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], heads[i],
                      cfg.down_depths(i) if cfg.down_block_types[i] == CROSS_DOWN else None,
                      downsample=i < n - 1, cfg=cfg) for i in range(n))
        self.mid_block = MidBlock(ch[-1], heads[-1], cfg) if cfg.mid_block_type is not None else None
        rch, rheads = ch[::-1], heads[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], rheads[i],
                    cfg.up_depths(i) if cfg.up_block_types[i] == CROSS_UP else None, upsample=i < n - 1, cfg=cfg)
            for i in range(n))
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def embed_time(self, timestep: torch.Tensor | float, sample: torch.Tensor,
                   timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                   time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """timestep (python number, [] or [B]) -> time embedding [B, 4 * ch0] in the sample's dtype;
        timestep_cond [B, time_cond_proj_dim]: the guidance embedding of an LCM U-Net (required there);
        text_embeds [B, text_embeds_dim] and time_ids [B, 6]: SDXL's added conditioning (required there)"""
        cfg = self.config
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0])  # a shape op, so the batch stays dynamic in ONNX
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        if (timestep_cond is not None) != cfg.is_lcm:
            raise ValueError("timestep_cond must be given exactly when the U-Net has time_cond_proj_dim "
                             f"(here {cfg.time_cond_proj_dim})")
        temb = self.time_embedding(emb.to(sample.dtype), timestep_cond)
        if (text_embeds is not None, time_ids is not None) != (cfg.is_sdxl, cfg.is_sdxl):
            raise ValueError("text_embeds and time_ids must be given exactly when the U-Net has "
                             f"addition_embed_type 'text_time' (here {cfg.addition_embed_type!r})")
        return temb + self.embed_added(text_embeds, time_ids) if cfg.is_sdxl else temb

    def embed_added(self, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL: [pooled text, sinusoids of the 6 time ids] -> an embedding added to the timestep's"""
        cfg = self.config
        ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                 cfg.freq_shift)
        added = torch.cat([text_embeds, ids.reshape(text_embeds.shape[0], -1).to(text_embeds.dtype)], dim=-1)
        return self.add_embedding(added.to(self.add_embedding.linear_1.weight.dtype))

    def down(self, sample: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in and the down blocks -> (lowest-resolution features, skips in order made)"""
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        return x, skips

    def mid(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.mid_block(x, temb, context) if self.mid_block is not None else x

    def up(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor
           ) -> torch.Tensor:
        """up blocks, consuming the skips from the end"""
        for block in self.up_blocks:
            k = len(block.resnets)
            mine, skips = skips[-k:], skips[:-k]
            x = block(x, mine, temb, context, like=skips[-1] if skips else None)
        return x

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                encoder_hidden_states: torch.Tensor, timestep_cond: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.embed_time(timestep, sample, timestep_cond, text_embeds, time_ids)
        x, skips = self.down(sample, temb, encoder_hidden_states)
        x = self.mid(x, temb, encoder_hidden_states)
        return self.out(self.up(x, skips, temb, encoder_hidden_states))

    # ---- step cache (DeepCache, Ma et al. 2023): a shallow branch at full resolution, deep features reused ----

    def check_cache_depth(self, depth: int) -> int:
        """How many first-level down layers the shallow branch keeps: 0 .. layers_per_block."""
        most = self.config.layers_per_block
        if not 0 <= int(depth) <= most:
            raise ValueError(f"step-cache depth must be in 0..{most} (layers per block) for this U-Net, got {depth}")
        return int(depth)

    def forward_with_features(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                              encoder_hidden_states: torch.Tensor, depth: int,
                              timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                              time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The full pass -> (prediction, deep features): the input of the last up block's final depth+1 layers"""
        temb = self.embed_time(timestep, sample, timestep_cond, text_embeds, time_ids)
        context = encoder_hidden_states
        x, skips = self.down(sample, temb, context)
        x = self.mid(x, temb, context)
        last = self.up_blocks[-1]
        mine, skips = skips[:len(last.resnets)], skips[len(last.resnets):]  # the last block takes the first skips
        for block in self.up_blocks[:-1]:
            k = len(block.resnets)
            theirs, skips = skips[-k:], skips[:-k]
            x = block(x, theirs, temb, context, like=mine[-1] if not skips else skips[-1])
        split = len(last.resnets) - 1 - self.check_cache_depth(depth)
        deep = _up_layers(last, x, mine[depth + 1:], temb, context, 0, split)
        return self.out(_up_layers(last, deep, mine[:depth + 1], temb, context, split, len(last.resnets))), deep

    def forward_shallow(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                        encoder_hidden_states: torch.Tensor, deep: torch.Tensor, depth: int,
                        timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                        time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """conv_in and the first `depth` down layers, then the last up block's final layers on cached `deep`"""
        temb = self.embed_time(timestep, sample, timestep_cond, text_embeds, time_ids)
        context = encoder_hidden_states
        first = self.down_blocks[0]
        x = self.conv_in(sample)
        skips = [x]
        for i in range(self.check_cache_depth(depth)):
            x = first.resnets[i](x, temb)
            x = first.attentions[i](x, context) if len(first.attentions) else x
            skips.append(x)
        last = self.up_blocks[-1]
        split = len(last.resnets) - 1 - depth
        return self.out(_up_layers(last, deep, skips, temb, context, split, len(last.resnets)))


def _up_layers(block: UpBlock, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor,
               context: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Layers start..stop-1 of an up block without upsamplers; `skips` ends with the one layer `start` takes."""
    for n, i in enumerate(range(start, stop)):
        x = block.resnets[i](torch.cat([x, skips[-1 - n]], dim=1), temb)
        x = block.attentions[i](x, context) if len(block.attentions) else x
    return x
