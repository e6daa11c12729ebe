"""LoRA adapters (Hu et al. 2021) fused into our PyTorch models before export: W <- W + scale * (alpha / r) * B A.

Reads the two layouts LoRA files come in for Stable Diffusion:
- kohya (sd-scripts, most files people download): `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; `lora_te_...` for the text encoder (SDXL: `lora_te1_`, `lora_te2_`, and U-Net
  paths in Stability's SGM names, `input_blocks_4_1_...`, renamed here by the single-file loader's rules);
- diffusers / PEFT: `unet.<module path>.lora_A.weight` and `.lora_B.weight` (`text_encoder.` / `text_encoder_2.`
  for the text encoders; older diffusers files: `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight`), with
  an optional `.alpha` (absent: alpha = rank).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# prefix in the file -> which of our models it adapts
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
SDXL_KOHYA = ("lora_te1_", "lora_te2_")
# kohya's SDXL U-Net layer names are SGM's (LDM's) module paths
SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_?(.*)|middle_block_(\d+)_(.+)"
                       r"|(time_embed|label_emb_0|out)_(\d+)")
SGM_RESNET = {"in_layers_0": "in_layers.0", "in_layers_2": "in_layers.2", "emb_layers_1": "emb_layers.1",
              "out_layers_0": "out_layers.0", "out_layers_3": "out_layers.3", "skip_connection": "skip_connection"}
# PEFT's names, then those of diffusers before it used PEFT (LoRACompatible layers; the text encoder's
# lora_linear_layer)
PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha"),
                 (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                 (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"))


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass
class Pair:
    """One adapted layer: down (A, [r, in, ...]) and up (B, [out, r, ...]) projections and their alpha."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    rslora: bool = False  # rank-stabilised (Kalajdzievski 2023): alpha / sqrt(r) instead of alpha / r
    sdxl: bool = False  # named the way only SDXL files name layers (kohya's lora_te1_ / lora_te2_)

    def factor(self) -> float:
        rank = self.down.shape[0]
        alpha = self.alpha if self.alpha is not None else rank
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


SCALE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon with a Tucker core",
               "hada_": "LoHa", "lokr_": "LoKr"}


def parse_spec(spec: str) -> tuple[Path, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, scale); a colon inside a path (C:\\...) is kept."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and SCALE.fullmatch(scale):
        return Path(path), float(scale)
    if sep and path and not any(c in scale for c in "/\\") and not scale.lower().endswith(".safetensors"):
        raise LoraError(f"--lora {spec!r}: the scale after ':' must be a number, got {scale!r}")
    return Path(spec), 1.0


def read_lora(path: Path) -> dict[tuple[str, str], Pair]:
    """{(model, layer key): Pair} from a .safetensors LoRA file; layer keys are kohya names or module paths."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        peft = json.loads(header.get("lora_adapter_metadata", "{}"))  # diffusers >= 0.34 keeps PEFT's config here
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{path}: not a readable safetensors LoRA file ({err})") from None
    pairs: dict[tuple[str, str], Pair] = {}
    for key, value in tensors.items():
        model, layer, part = _split(key)
        if model is None:
            kind = next((name for marker, name in UNSUPPORTED.items() if marker in key), None)
            if kind:
                raise LoraError(f"{path}: a {kind} adapter ({key!r}); only plain LoRA can be fused")
            raise LoraError(f"{path}: unrecognised LoRA tensor {key!r} (expected kohya lora_unet_/lora_te_ or "
                            "diffusers unet./text_encoder. keys)")
        pair = pairs.setdefault((model, layer), Pair())
        pair.sdxl = pair.sdxl or key.startswith(SDXL_KOHYA)
        if part == "alpha":
            if value.numel() != 1:
                raise LoraError(f"{path}: {model} layer {layer}: alpha has {value.numel()} values, not one")
            pair.alpha = float(value)
        else:
            setattr(pair, part, value.float())
    for (model, layer), pair in pairs.items():
        if pair.down is None or pair.up is None:
            raise LoraError(f"{path}: {model} layer {layer} has only one of its two LoRA matrices")
        if pair.down.dim() not in (2, 4) or pair.up.dim() != pair.down.dim() or pair.down.shape[0] == 0:
            raise LoraError(f"{path}: {model} layer {layer}: LoRA matrices of shapes {tuple(pair.up.shape)} and "
                            f"{tuple(pair.down.shape)} are not a rank-r pair")
        _peft_alpha(pair, model, layer, peft, path)
    return pairs


def _peft_alpha(pair: Pair, model: str, layer: str, peft: dict, path: Path) -> None:
    """alpha (and rsLoRA) from the PEFT config saved in the file's header, for pairs without an alpha tensor:
    `lora_alpha`, overridden by the first `alpha_pattern` key that ends the module path (PEFT's rule)."""
    if peft.get(f"{model}.use_dora"):
        raise LoraError(f"{path}: a DoRA adapter ({model}); only plain LoRA can be fused")
    pair.rslora = bool(peft.get(f"{model}.use_rslora"))
    if pair.alpha is not None or f"{model}.lora_alpha" not in peft:
        return
    pair.alpha = float(peft[f"{model}.lora_alpha"])
    for pattern, alpha in (peft.get(f"{model}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            pair.alpha = float(alpha)
            break


def _split(key: str) -> tuple[str | None, str, str]:
    """A tensor name -> (model, layer key, 'down' | 'up' | 'alpha'); model None when not a LoRA tensor."""
    for prefix, model in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            layer, _, rest = key[len(prefix):].partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
            return (model if part else None), layer, part or ""
    for prefix, model in PEFT_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, part in PEFT_SUFFIXES:
                if key.endswith(suffix):
                    return model, key[len(prefix):-len(suffix)], part
    return None, "", ""


def fuse(models: dict[str, nn.Module], pairs: dict[tuple[str, str], Pair], scale: float, source: str) -> int:
    """Add every pair's update into the matching Linear / Conv2d weight of `models`; returns the layers changed.

    A layer the model does not have is an error (a LoRA for another architecture), not silently skipped."""
    sdxl_model = "text_encoder_2" in models
    if not sdxl_model:  # named as only SDXL LoRAs are: say so rather than fuse their CLIP ViT-L part alone
        _refuse_sdxl([(m, k) for (m, k), p in pairs.items() if p.sdxl or m == "text_encoder_2"], source)
    targets = {}
    for model in {m for m, _ in pairs}:
        if model not in models:
            raise LoraError(f"{source}: adapts the {model}, which this export does not build")
        for name, module in models[model].named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                targets[(model, name)] = module
                targets[(model, name.replace(".", "_"))] = module  # kohya's spelling of the same path
    if "unet" in models:  # kohya's SGM spelling (SDXL files, some SD ones) -> ours
        layers = models["unet"].config.layers_per_block
        pairs = {(m, _sgm_to_kohya(k, layers) if m == "unet" and (m, k) not in targets else k): p
                 for (m, k), p in pairs.items()}
    missing = [(m, k) for m, k in pairs if (m, k) not in targets]
    if not sdxl_model:
        _refuse_sdxl([(m, k) for m, k in missing if _sdxl_layer(k)], source)
    if missing:
        raise LoraError(f"{source}: {len(missing)} LoRA layer(s) match nothing in the model, e.g. "
                        f"{', '.join(f'{m}:{k}' for m, k in missing[:3])} (a LoRA for another architecture or "
                        "layout?)")
    with torch.no_grad():
        for key, pair in pairs.items():
            module = targets[key]
            factor = scale * pair.factor()
            delta = _delta(pair.down, pair.up)
            if delta is not None and delta.squeeze().shape == module.weight.squeeze().shape:  # 1x1 conv / linear
                delta = delta.reshape(module.weight.shape)
            if delta is None or delta.shape != module.weight.shape:
                raise LoraError(f"{source}: {key[0]} layer {key[1]}: LoRA matrices {tuple(pair.up.shape)} x "
                                f"{tuple(pair.down.shape)} do not fit the weight {tuple(module.weight.shape)}")
            module.weight += (factor * delta).to(module.weight.dtype)
    return len(pairs)


def _refuse_sdxl(layers: list[tuple[str, str]], source: str) -> None:
    if layers:
        model, layer = layers[0]
        raise LoraError(f"{source}: an SDXL LoRA (e.g. {model}:{layer}) cannot be fused into this SD 1.x/2.x model")


def _sdxl_layer(layer: str) -> bool:
    """A U-Net layer SDXL has and SD 1.x/2.x lack: a second transformer layer, the added embedding."""
    return re.search(r"transformer_blocks[._][1-9]", layer) is not None or "add_embedding" in layer


def _sgm_to_kohya(layer: str, layers_per_block: int) -> str:
    """kohya's SDXL spelling (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`) -> ours with underscores, by the
    single-file loader's renaming of the dotted SGM key; an unknown name comes back as is."""
    from .weights import _unet_key

    m = SGM_BLOCK.fullmatch(layer)
    if m is None:
        return layer
    if m[1]:
        rest = m[4] or ""
        inner = SGM_RESNET.get(rest, rest)
        key = f"{m[1]}.{m[2]}.{m[3]}." + (f"{inner}." if inner else "") + "weight"
    elif m[5]:
        key = f"middle_block.{m[5]}.{SGM_RESNET.get(m[6], m[6])}.weight"
    else:
        key = f"{m[7].replace('_0', '.0')}.{m[8]}.weight"
    return _unet_key(key, layers_per_block).removesuffix(".weight").replace(".", "_")


def _delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """B A for a Linear ([out, r] x [r, in]) or a Conv2d (up [out, r, 1, 1] x down [r, in, kh, kw]); None for any
    other pair of shapes."""
    if down.dim() == 2 and up.dim() == 2 and up.shape[1] == down.shape[0]:
        return up @ down
    if down.dim() == 4 and up.dim() == 4 and up.shape[1] == down.shape[0] and up.shape[2:] == (1, 1):
        return torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return None
