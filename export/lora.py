"""LoRA adapters (Hu et al. 2021) fused into our PyTorch models before export: W <- W + scale * (alpha / r) * B A.

Reads the two layouts LoRA files come in for Stable Diffusion:
- kohya (sd-scripts, most files people download): `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`; `lora_te_...` for the text encoder;
- diffusers / PEFT: `unet.<module path>.lora_A.weight` and `.lora_B.weight` (`text_encoder.` for the text
  encoder; older diffusers files: `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight`), with an
  optional `.alpha` (absent: alpha = rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# prefix in the file -> which of our models it adapts
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
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


def parse_spec(spec: str) -> tuple[Path, float]:
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def read_lora(path: Path) -> dict[tuple[str, str], Pair]:
    """{(model, layer key): Pair} from a .safetensors LoRA file; layer keys are kohya names or module paths."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LoraError(f"{path}: not a readable safetensors LoRA file ({err})") from None
    pairs: dict[tuple[str, str], Pair] = {}
    for key, value in tensors.items():
        model, layer, part = _split(key)
        if model is None:
            raise LoraError(f"{path}: unrecognised LoRA tensor {key!r} (expected kohya lora_unet_/lora_te_ or "
                            "diffusers unet./text_encoder. keys)")
        pair = pairs.setdefault((model, layer), Pair())
        if part == "alpha":
            pair.alpha = float(value)
        else:
            setattr(pair, part, value.float())
    for (model, layer), pair in pairs.items():
        if pair.down is None or pair.up is None:
            raise LoraError(f"{path}: {model} layer {layer} has only one of its two LoRA matrices")
    return pairs


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
    targets = {}
    for model in {m for m, _ in pairs}:
        if model not in models:
            raise LoraError(f"{source}: adapts the {model}, which this export does not build")
        for name, module in models[model].named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                targets[(model, name)] = module
                targets[(model, name.replace(".", "_"))] = module  # kohya's spelling of the same path
    missing = [f"{m}:{k}" for m, k in pairs if (m, k) not in targets]
    if missing:
        raise LoraError(f"{source}: {len(missing)} LoRA layer(s) match nothing in the model, e.g. "
                        f"{', '.join(missing[:3])} (a LoRA for another architecture or layout?)")
    with torch.no_grad():
        for key, pair in pairs.items():
            module = targets[key]
            rank = pair.down.shape[0]
            factor = scale * (pair.alpha if pair.alpha is not None else rank) / rank
            delta = _delta(pair.down, pair.up)
            if delta is not None and delta.squeeze().shape == module.weight.squeeze().shape:  # 1x1 conv / linear
                delta = delta.reshape(module.weight.shape)
            if delta is None or delta.shape != module.weight.shape:
                raise LoraError(f"{source}: {key[0]} layer {key[1]}: LoRA matrices {tuple(pair.up.shape)} x "
                                f"{tuple(pair.down.shape)} do not fit the weight {tuple(module.weight.shape)}")
            module.weight += (factor * delta).to(module.weight.dtype)
    return len(pairs)


def _delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """B A for a Linear ([out, r] x [r, in]) or a Conv2d (up [out, r, 1, 1] x down [r, in, kh, kw]); None for any
    other pair of shapes."""
    if down.dim() == 2 and up.dim() == 2 and up.shape[1] == down.shape[0]:
        return up @ down
    if down.dim() == 4 and up.dim() == 4 and up.shape[1] == down.shape[0] and up.shape[2:] == (1, 1):
        return torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return None
