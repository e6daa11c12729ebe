"""A diffusers SD 1.x or SDXL folder -> one LDM (CompVis; SGM for SDXL) single-file checkpoint, the layout
stable-diffusion.cpp converts and most downloadable checkpoints have.

    python benchmarks/ldm_checkpoint.py DIFFUSERS_FOLDER OUT.safetensors

The inverse of the renaming `sdonnx.export.weights` applies to an LDM file (`_unet_key`, `_vae_key`, `_clip_key`,
`_openclip_key`): LDM numbers the U-Net's blocks flat (each level's resnets and its down- or upsampler in one list),
numbers the VAE decoder's levels from the lowest resolution up, and stores the VAE's attention as 1x1 convolutions.
SDXL files keep CLIP ViT-L under `conditioner.embedders.0.transformer.` in transformers' names and OpenCLIP ViT-bigG
under `conditioner.embedders.1.model.` in OpenCLIP's (fused q/k/v, a projection matrix applied as x @ P). So
`load_checkpoint(OUT)` gives back the folder's tensors, which is how the tests check this. SD 2's OpenCLIP text
encoder (its penultimate-layer variant) is not written.
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
SDXL_PREFIX = {**PREFIX, "text_encoder": "conditioner.embedders.0.transformer.",
               "text_encoder_2": "conditioner.embedders.1.model."}
# diffusers resnet -> LDM: the U-Net's resnets renamed every layer, the VAE's kept LDM's own names but the shortcut
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
               "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
            "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
VAE_TOP = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}
OPENCLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
                  "self_attn.out_proj.": "attn.out_proj."}
OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias"}


def ldm_state_dict(folder: Path) -> Tensors:
    """The folder's models under their LDM names (tensors as stored, fp32 for our random weights)."""
    from safetensors.torch import load_file

    sdxl = (folder / "text_encoder_2").is_dir()
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    sd1 = not unet_config.get("use_linear_projection") and isinstance(unet_config.get("attention_head_dim", 8), int)
    if not (sd1 or sdxl):
        raise SystemExit(f"{folder}: not an SD 1.x U-Net (linear projections or per-block heads: SD 2's layout)")
    levels = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    parts = {part: load_file(str(folder / WEIGHTS[part]))
             for part in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if sdxl else ()))}
    return ldm_from_state_dicts(parts, unet_config, levels)


def ldm_from_state_dicts(parts: dict[str, Tensors], unet_config: dict, vae_levels: int) -> Tensors:
    """{component: diffusers state dict} -> one LDM state dict; a text_encoder_2 makes it SDXL's layout."""
    layers = int(unet_config["layers_per_block"])
    up_attention = [t.startswith("CrossAttn") for t in unet_config["up_block_types"]]
    rules = {"unet": lambda k: unet_key(k, layers, up_attention), "vae": lambda k: vae_key(k, vae_levels),
             "text_encoder": lambda k: k}
    prefix = SDXL_PREFIX if "text_encoder_2" in parts else PREFIX
    out: Tensors = {}
    for part, rule in rules.items():
        for key, value in parts[part].items():
            if key.endswith("position_ids"):  # a constant buffer some transformers versions saved
                continue
            name = rule(key)
            if part == "vae" and ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention is 1x1 convolutions
            out[prefix[part] + name] = value.contiguous()
    if "text_encoder_2" in parts:
        out.update({prefix["text_encoder_2"] + k: v for k, v in openclip_state_dict(parts["text_encoder_2"]).items()})
    return out


def openclip_state_dict(sd: Tensors) -> Tensors:
    """transformers CLIPTextModelWithProjection -> OpenCLIP's text tower names (q/k/v fused into in_proj)."""
    out: Tensors = {}
    for key, value in sd.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # OpenCLIP computes x @ P
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer = f"text_model.encoder.layers.{m[1]}.self_attn."
            fused = torch.cat([sd[f"{layer}{p}_proj.{m[2]}"] for p in "qkv"])
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"] = fused
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            if not re.match(r"self_attn\.[kv]_proj\.", m[2]):
                out[f"transformer.resblocks.{m[1]}.{_prefix(m[2], OPENCLIP_LAYER)}"] = value
        elif not key.endswith("position_ids"):
            raise SystemExit(f"unexpected text_encoder_2 tensor {key!r}")
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
        if not (folder / name).is_file() and (part != "text_encoder_2" or (folder / part).is_dir()):
            raise SystemExit(f"{folder}: no {name} (expected a diffusers SD 1.x or SDXL folder)")
    tmp = out.with_name(out.name + ".tmp")
    save_file(ldm_state_dict(folder), str(tmp))
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/ldm_checkpoint.py DIFFUSERS_FOLDER OUT.safetensors")
    print(write(Path(sys.argv[1]), Path(sys.argv[2])))
