"""A diffusers SD 1.x folder -> one LDM (CompVis) single-file checkpoint, the layout stable-diffusion.cpp converts.

    python benchmarks/ldm_checkpoint.py DIFFUSERS_FOLDER OUT.safetensors

The inverse of the renaming `sdonnx.export.weights` applies to an LDM file (`_unet_key`, `_vae_key`, `_clip_key`):
LDM numbers the U-Net's blocks flat (each level's resnets and its down- or upsampler in one list), numbers the
VAE decoder's levels from the lowest resolution up, and stores the VAE's attention as 1x1 convolutions. So
`load_checkpoint(OUT)` gives back the folder's tensors, which is how the test checks this. SD 1.x only (a CLIP
text encoder; SD 2's OpenCLIP layout is not written).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

Tensors = dict[str, torch.Tensor]

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "text_encoder": "cond_stage_model.transformer."}
# diffusers resnet -> LDM: the U-Net's resnets renamed every layer, the VAE's kept LDM's own names but the shortcut
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
               "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
VAE_TOP = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


def ldm_state_dict(folder: Path) -> Tensors:
    """The folder's three models under their LDM names (tensors as stored, fp32 for our random weights)."""
    from safetensors.torch import load_file

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    if unet_config.get("use_linear_projection") or not isinstance(unet_config.get("attention_head_dim", 8), int):
        raise SystemExit(f"{folder}: not an SD 1.x U-Net (linear projections or per-block heads: SD 2's layout)")
    layers = int(unet_config["layers_per_block"])
    up_attention = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    rules = {"unet": lambda k: unet_key(k, layers, up_attention), "vae": lambda k: vae_key(k, levels),
             "text_encoder": lambda k: k}
    out: Tensors = {}
    for part, rule in rules.items():
        for key, value in load_file(str(folder / WEIGHTS[part])).items():
            if key.endswith("position_ids"):  # a constant buffer some transformers versions saved
                continue
            name = rule(key)
            if part == "vae" and ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention is 1x1 convolutions
            out[PREFIX[part] + name] = value.contiguous()
    return out


def unet_key(key: str, layers: int, up_attention: list[bool]) -> str:
    """diffusers U-Net key -> LDM; a level holds `layers` resnets (`layers` + 1 going up) and one resampler."""
    key = _prefix(key, UNET_TOP)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = 1 + int(m[1]) * (layers + 1) + int(m[3])
        return f"input_blocks.{block}.0.{_prefix(m[4], UNET_RESNET)}" if m[2] == "resnets" \
            else f"input_blocks.{block}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_prefix(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(m[1]) * (layers + 1) + int(m[3])
        return f"output_blocks.{block}.0.{_prefix(m[4], UNET_RESNET)}" if m[2] == "resnets" \
            else f"output_blocks.{block}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        level = int(m[1])  # the upsampler sits after the last resnet and, where the level has one, its attention
        return f"output_blocks.{level * (layers + 1) + layers}.{2 if up_attention[level] else 1}.{m[2]}"
    return key


def vae_key(key: str, levels: int) -> str:
    """diffusers VAE key -> LDM; the decoder's levels are numbered the other way round in LDM."""
    key = _prefix(key, VAE_TOP)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_prefix(m[3], VAE_RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION.get(m[2], m[2])}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key):
        where = f"block.{m[3]}" if m[3] is not None else "downsample"
        return f"encoder.down.{m[1]}.{where}.{_prefix(m[4], VAE_RESNET)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key):
        where = f"block.{m[3]}" if m[3] is not None else "upsample"
        return f"decoder.up.{levels - 1 - int(m[1])}.{where}.{_prefix(m[4], VAE_RESNET)}"
    return key


def _prefix(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def write(folder: Path, out: Path) -> Path:
    """Write the checkpoint next to `out` first and move it there when complete (nothing half-written left)."""
    from safetensors.torch import save_file

    for part, name in WEIGHTS.items():
        if not (folder / name).is_file():
            raise SystemExit(f"{folder}: no {name} (expected a diffusers SD 1.x folder)")
    tmp = out.with_name(out.name + ".tmp")
    save_file(ldm_state_dict(folder), str(tmp))
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/ldm_checkpoint.py DIFFUSERS_FOLDER OUT.safetensors")
    print(write(Path(sys.argv[1]), Path(sys.argv[2])))
