"""Stable Diffusion weights -> our key layout: a diffusers folder, an LDM single file, or a random preset.

Our models keep diffusers/transformers key names, so a diffusers folder loads almost as is; a single-file
(CompVis LDM, or Stability's SGM layout for SDXL) checkpoint is renamed by a handful of rules with per-block index
arithmetic.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .models.config import (MID_CROSS, MID_PLAIN, CLIPConfig, ConfigError, ModelConfigs, UNetConfig, VAEConfig,
                            get_preset)

COMPONENTS = ("text_encoder", "vae", "unet")
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet")
FAMILIES = ("sd1", "sd2", "sd1-inpaint", "sd2-inpaint", "sdxl", "sdxl-inpaint")
PREDICTION_TYPES = ("epsilon", "v_prediction")
RANDOM_PRESETS = {"sd15": "sd1", "sd15-inpaint": "sd1-inpaint", "sd15-lcm": "sd1", "sd21": "sd2", "sd-turbo": "sd2",
                  "tiny": "sd1", "sdxl": "sdxl", "sdxl-turbo": "sdxl", "sdxl-inpaint": "sdxl-inpaint",
                  "tiny-sdxl": "sdxl"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

Tensors = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A source that is not a usable Stable Diffusion checkpoint; the message is one line naming the problem."""


@dataclass
class Checkpoint:
    """Everything export needs from one source: configs, fp32 state dicts in our layout, tokenizer, scheduler."""

    source: str
    family: str
    configs: ModelConfigs
    state_dicts: dict[str, Tensors]
    tokenizer_dir: Path
    scheduler_config: dict
    prediction_type: str
    tokenizer_2_dir: Path | None = None  # SDXL's second tokenizer (OpenCLIP's: pads with "!", id 0)


# ---------------------------------------------------------------------------------------------------- public API


def load_checkpoint(source: str | Path, *, seed: int = 0, prediction_type: str | None = None,
                    configs: ModelConfigs | None = None) -> Checkpoint:
    """Read a diffusers folder, a single-file LDM checkpoint or `random:PRESET` into a validated Checkpoint.

    `configs` overrides what a single file's shapes cannot tell (head counts); `prediction_type` overrides
    the scheduler's (an LDM file does not record it).
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    text = str(source)
    path = Path(source)
    if not text.startswith("random:") and not path.exists():
        raise CheckpointError(f"{text}: no such file or folder (expected a diffusers folder, a "
                              f"{'/'.join(SINGLE_FILE_SUFFIXES)} file or random:PRESET)")
    if configs is not None and (text.startswith("random:") or path.is_dir()):
        raise CheckpointError(f"{text}: configs= only applies to single-file checkpoints")
    if text.startswith("random:"):
        ckpt = _load_random(text[len("random:"):], seed)
    else:
        ckpt = _load_folder(path) if path.is_dir() else _load_single_file(path, configs)
    if prediction_type is not None:
        ckpt.prediction_type = prediction_type
        ckpt.scheduler_config = {**ckpt.scheduler_config, "prediction_type": prediction_type}
    return ckpt


def sniff_sdxl(source: str | Path) -> bool | None:
    """Whether a source is SDXL, told without reading its weights (a preset's config, a folder's layout, a
    .safetensors header's key names); None when that cannot be told cheaply (a pickled file) or the source is not
    well formed (load_checkpoint then says why)."""
    text = str(source)
    if text.startswith("random:"):
        name = text[len("random:"):]
        return get_preset(name).is_sdxl if name in RANDOM_PRESETS else None
    path = Path(source)
    if path.is_dir():
        return _sniff_folder(path)
    if path.suffix.lower() == ".safetensors" and path.is_file():
        keys = _safetensors_keys(path)
        return None if keys is None else _sniff_ldm_keys(keys)
    return None


def _sniff_folder(folder: Path) -> bool | None:
    if (folder / "text_encoder_2").is_dir():  # the rule _load_folder goes by; a refiner is its own error
        return True if (folder / "text_encoder").is_dir() else None
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name.startswith("StableDiffusionXL") if isinstance(name, str) else None


_MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers itself


def _safetensors_keys(path: Path) -> list[str] | None:
    """The tensor names of a .safetensors file from its header alone: an 8-byte little-endian length, then JSON."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(_MAX_HEADER, path.stat().st_size - 8):
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def _sniff_ldm_keys(keys: list[str]) -> bool | None:
    if any(k.startswith(_SDXL_PREFIXES["text_encoder_2"]) for k in keys):
        return True
    if any(k.startswith(_SDXL_CONDITIONER) for k in keys):  # a refiner: load_checkpoint names it
        return None
    return False if any(k.startswith(_LDM_PREFIXES["unet"]) for k in keys) else None


def components(configs: ModelConfigs) -> tuple[str, ...]:
    """The models a checkpoint of these configs holds: SDXL adds text_encoder_2."""
    return SDXL_COMPONENTS if configs.is_sdxl else COMPONENTS


def build_models(ckpt: Checkpoint) -> dict[str, torch.nn.Module]:
    """Our PyTorch models (text_encoder(s), vae, unet) holding the checkpoint's tensors (shared, not copied), in
    eval mode."""
    models = {}
    for name in components(ckpt.configs):
        cls, cfg = _model_class(name), _config_of(ckpt.configs, name)
        with torch.device("meta"):  # skip allocating and initialising weights that are replaced at once
            module = cls(cfg)
        load_strict(module, ckpt.state_dicts[name], name, assign=True)
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):  # a buffer built in __init__
            module = cls(cfg)
            load_strict(module, ckpt.state_dicts[name], name)
        models[name] = module.eval()
    return models


def load_strict(module: torch.nn.Module, state_dict: Tensors, component: str, assign: bool = False) -> None:
    """load_state_dict(strict=True), but any missing / unexpected / misshapen tensor is a CheckpointError."""
    _check_keys(component, _shapes(module), state_dict)
    module.load_state_dict(state_dict, strict=True, assign=assign)


def convert_ldm(state_dict: Tensors,
                configs: ModelConfigs | None = None) -> tuple[str, ModelConfigs, dict[str, Tensors]]:
    """An LDM (CompVis) state dict -> (family, configs, {component: fp32 state dict in our layout})."""
    _reject_unsupported(state_dict)
    if any(k.startswith(_SDXL_CONDITIONER) for k in state_dict):
        return _convert_sdxl(state_dict, configs)
    parts = _split_ldm(state_dict)
    base = "sd2" if parts["openclip"] else "sd1"
    configs = configs or _ldm_configs(base, parts)
    family = base + _inpaint_suffix(configs.unet)
    layers = configs.unet.layers_per_block
    n_vae = len(configs.vae.block_out_channels)
    text_rules = _openclip_key if family.startswith("sd2") else _clip_key
    out = {
        "unet": _rename(parts["unet"], lambda k: _unet_key(k, layers)),
        "vae": _rename(parts["vae"], lambda k: _vae_key(k, n_vae)),
        "text_encoder": _rename(parts["text_encoder"], text_rules),
    }
    if family.startswith("sd2"):
        out["text_encoder"] = _drop_last_openclip_layer(out["text_encoder"], configs.clip.num_hidden_layers)
    out["vae"] = {k: _squeeze_1x1(k, v) for k, v in out["vae"].items()}
    out["unet"] = {k: _fit_projection(k, v, configs.unet.use_linear_projection) for k, v in out["unet"].items()}
    return family, configs, {name: _to_fp32(sd) for name, sd in out.items()}


def clip_tokenizer_dir(pad_token: str = "<|endoftext|>") -> Path:
    """A folder holding OpenAI CLIP's BPE tokenizer (vocab.json, merges.txt, configs), built once and cached."""
    tags = {"<|endoftext|>": "sd1", "!": "sd2"}
    if pad_token not in tags:
        raise CheckpointError(f"pad_token {pad_token!r}: SD uses '<|endoftext|>' (1.x) or '!' (2.x)")
    tag = tags[pad_token]
    folder = _cache_dir() / f"clip-bpe-v1-{tag}"
    if not (folder / "tokenizer_config.json").exists():
        _write_clip_tokenizer(folder, pad_token)
    return folder


# ------------------------------------------------------------------------------------------------ tensor checks


def _check_keys(component: str, expected: dict[str, tuple], state_dict: Tensors) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = [f"{len(items)} {what} ({_first_few(items)})"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                if items]
    if problems:
        raise CheckpointError(f"{component}: " + "; ".join(problems) + " tensors")


def _first_few(items: list[str], n: int = 3) -> str:
    more = f", ... {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _validate(component: str, cfg, state_dict: Tensors) -> None:
    """Check keys and shapes against our model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        module = _model_class(component)(cfg)
    _check_keys(component, _shapes(module), state_dict)


def _shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _model_class(component: str) -> Callable:
    if component == "text_encoder":
        from .models.clip import CLIPTextModel
        return CLIPTextModel
    if component == "text_encoder_2":
        from .models.clip import CLIPTextModelWithProjection
        return CLIPTextModelWithProjection
    if component == "vae":
        from .models.vae import AutoencoderKL
        return AutoencoderKL
    from .models.unet import UNet2DConditionModel
    return UNet2DConditionModel


def _config_of(configs: ModelConfigs, component: str):
    return {"text_encoder": configs.clip, "text_encoder_2": configs.clip2, "vae": configs.vae,
            "unet": configs.unet}[component]


def _to_fp32(state_dict: Tensors) -> Tensors:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _finish(source: str, family: str, configs: ModelConfigs, state_dicts: dict[str, Tensors], tokenizer_dir: Path,
            scheduler_config: dict, tokenizer_2_dir: Path | None = None) -> Checkpoint:
    for name in components(configs):
        _validate(name, _config_of(configs, name), state_dicts[name])
    prediction = scheduler_config.get("prediction_type", "epsilon")
    return Checkpoint(source, family, configs, state_dicts, tokenizer_dir, scheduler_config, prediction,
                      tokenizer_2_dir)


# -------------------------------------------------------------------------------------------------- reading files


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_tensors(path: Path) -> Tensors:
    """Tensors of one .safetensors or pickled (.ckpt/.pt/.bin) file; a top-level "state_dict" is unwrapped."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated/garbage headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(err)})") from None
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r} (expected one of "
                              f"{', '.join(SINGLE_FILE_SUFFIXES)})")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(err)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__} with no tensors, not a state dict")
    return tensors


# ----------------------------------------------------------------------------------------------- diffusers folder

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _load_folder(folder: Path) -> Checkpoint:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: not a diffusers folder (no model_index.json)")
    sdxl = (folder / "text_encoder_2").is_dir()
    if sdxl and not (folder / "text_encoder").is_dir():
        raise CheckpointError(f"{folder}: an SDXL refiner (text_encoder_2/ without text_encoder/); only SDXL base "
                              "models (two text encoders) are supported")
    names = SDXL_COMPONENTS if sdxl else COMPONENTS
    for part in (*names, "tokenizer", "scheduler", *(("tokenizer_2",) if sdxl else ())):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: diffusers folder without {part}/")
    configs = ModelConfigs(
        clip=_read_config(folder / "text_encoder", CLIPConfig),
        vae=_read_config(folder / "vae", VAEConfig),
        unet=_read_config(folder / "unet", UNetConfig),
        clip2=_read_config(folder / "text_encoder_2", CLIPConfig) if sdxl else None,
    )
    _check_text_encoders(folder, configs)
    state_dicts = {name: _to_fp32(_rename_old_vae_attention(_read_component(folder / name))) for name in names}
    tokenizer_dir = _tokenizer_folder(folder / "tokenizer")
    tokenizer_2_dir = _tokenizer_folder(folder / "tokenizer_2") if sdxl else None
    if sdxl:  # SDXL's two tokenizers differ (pad token) and are easily swapped or taken from another model
        _check_vocabulary(tokenizer_dir, configs.clip, "text_encoder")
        _check_vocabulary(tokenizer_2_dir, configs.clip2, "text_encoder_2")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    base = "sdxl" if sdxl else "sd2" if configs.clip.hidden_act == "gelu" else "sd1"
    return _finish(str(folder), base + _inpaint_suffix(configs.unet), configs, state_dicts, tokenizer_dir, scheduler,
                   tokenizer_2_dir)


def _tokenizer_folder(folder: Path) -> Path:
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: missing {name}")
    return folder


def _check_text_encoders(source: Path | str, configs: ModelConfigs) -> None:
    """An SDXL U-Net reads both text encoders' hidden states side by side and the second one's projection."""
    unet, clip, clip2 = configs.unet, configs.clip, configs.clip2
    if clip2 is None:
        if unet.is_sdxl:
            raise CheckpointError(f"{source}: an SDXL U-Net (addition_embed_type 'text_time') needs a second text "
                                  "encoder (text_encoder_2/)")
        return
    if not unet.is_sdxl:
        raise CheckpointError(f"{source}: two text encoders but the U-Net lacks SDXL's text_time conditioning")
    if unet.cross_attention_dim != clip.hidden_size + clip2.hidden_size:
        raise CheckpointError(f"{source}: the U-Net attends to {unet.cross_attention_dim} channels, not the text "
                              f"encoders' {clip.hidden_size} + {clip2.hidden_size}")
    if unet.text_embeds_dim != clip2.projection_dim:
        raise CheckpointError(f"{source}: the U-Net takes a {unet.text_embeds_dim}-wide pooled text embedding, "
                              f"text_encoder_2 projects to {clip2.projection_dim}")


def _check_vocabulary(tokenizer_dir: Path, clip: CLIPConfig, encoder: str) -> None:
    """The tokenizer's ids must be the rows of the encoder's token embedding: same count."""
    vocab = _read_json(tokenizer_dir / "vocab.json")
    added = tokenizer_dir / "added_tokens.json"
    ids = [*vocab.values(), *(_read_json(added).values() if added.is_file() else ())]
    size = max((i for i in ids if isinstance(i, int)), default=-1) + 1
    if size != clip.vocab_size:
        raise CheckpointError(f"{tokenizer_dir}: {size} tokens but {encoder} embeds {clip.vocab_size} "
                              "(a tokenizer of another model?)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_config(component_dir: Path, cls):
    path = component_dir / "config.json"
    try:
        return cls.from_dict(_read_json(path))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _inpaint_suffix(unet: UNetConfig) -> str:
    return "-inpaint" if unet.is_inpaint else ""


def _weight_files(component_dir: Path) -> list[Path]:
    """The files of the best weights present: plain before fp16 variant, safetensors before .bin, then shards."""
    for variant in ("", ".fp16"):
        for ext in ("safetensors", "bin"):
            for stem in _WEIGHT_STEMS:
                single = component_dir / f"{stem}{variant}.{ext}"
                if single.is_file():
                    return [single]
                index = component_dir / f"{stem}.{ext}.index{variant}.json"
                if index.is_file():
                    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                    if not shards:
                        raise CheckpointError(f"{index}: empty weight_map")
                    return [component_dir / s for s in shards]
    raise CheckpointError(f"{component_dir}: no weights (expected diffusion_pytorch_model.safetensors, "
                          f"model.safetensors or .bin, optionally .fp16 or sharded)")


def _read_component(component_dir: Path) -> Tensors:
    tensors: Tensors = {}
    for path in _weight_files(component_dir):
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in the index is missing")
        tensors.update(_read_tensors(path))
    # transformers < 4.31 saved this constant arange buffer; our model computes positions instead
    return {k: v for k, v in tensors.items() if not k.endswith("embeddings.position_ids")}


def _rename_old_vae_attention(state_dict: Tensors) -> Tensors:
    """diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn."""
    pattern = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: f"{m[1]}.{_OLD_VAE_ATTENTION[m[2]]}.", k): v for k, v in state_dict.items()}


# ------------------------------------------------------------------------------------------ single-file (LDM)

_LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
    "openclip": "cond_stage_model.model.",
}
_RESNET_LDM = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
               "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
               "nin_shortcut.": "conv_shortcut."}
_UNET_LDM = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
# SDXL (Stability's SGM layout): the U-Net and VAE as in LDM, two text encoders under the conditioner
_SDXL_CONDITIONER = "conditioner.embedders."
_SDXL_PREFIXES = {
    "unet": _LDM_PREFIXES["unet"],
    "vae": _LDM_PREFIXES["vae"],
    "text_encoder": "conditioner.embedders.0.transformer.",  # CLIP ViT-L in transformers' own names
    "text_encoder_2": "conditioner.embedders.1.model.",  # OpenCLIP ViT-bigG in OpenCLIP's names
}
_VAE_LDM = {"encoder.norm_out.": "encoder.conv_norm_out.", "decoder.norm_out.": "decoder.conv_norm_out."}
_VAE_ATTENTION_LDM = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OPENCLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                   "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None, "timestep_spacing": "leading", "prediction_type": "epsilon",
}
# SD 1.5's noise schedule under LCM's sampler (what LCMScheduler.from_config of SD 1.5's scheduler gives): steps
# picked from the 50-step DDIM grid the model was distilled on
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "original_inference_steps": 50, "set_alpha_to_one": False, "steps_offset": 1,
    "clip_sample": False, "timestep_spacing": "leading", "timestep_scaling": 10.0, "trained_betas": None,
    "prediction_type": "epsilon",
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
    "trained_betas": None, "timestep_spacing": "leading", "prediction_type": "v_prediction",
}
# SD-Turbo (adversarial diffusion distillation of SD 2.1 at 512x512, Sauer et al. 2023): epsilon prediction, Euler
# with trailing timesteps so that one step starts at the highest noise level
TURBO_SCHEDULER = {
    **SD2_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
}
# SDXL base 1.0: Euler with leading timesteps; SDXL-Turbo: Euler ancestral with trailing ones (one step starts at
# the highest noise level)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
    "interpolation_type": "linear", "use_karras_sigmas": False, "trained_betas": None, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "clip_sample": False, "set_alpha_to_one": False,
}
SDXL_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "_class_name": "EulerAncestralDiscreteScheduler",
                        "timestep_spacing": "trailing"}
PRESET_SCHEDULERS = {"sd-turbo": TURBO_SCHEDULER, "sdxl-turbo": SDXL_TURBO_SCHEDULER}


def _load_single_file(path: Path, configs: ModelConfigs | None) -> Checkpoint:
    state_dict = _read_tensors(path)
    try:
        family, configs, state_dicts = convert_ldm(state_dict, configs)
        tokenizer_2 = clip_tokenizer_dir("!") if configs.is_sdxl else None  # OpenCLIP's tokenizer pads with id 0
        return _finish(str(path), family, configs, state_dicts, _family_tokenizer(family), _family_scheduler(family),
                       tokenizer_2)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _family_tokenizer(family: str) -> Path:
    return clip_tokenizer_dir("!" if family.startswith("sd2") else "<|endoftext|>")  # SD 2.x pads with id 0


def _family_scheduler(family: str) -> dict:
    if family.startswith("sdxl"):
        return dict(SDXL_SCHEDULER)
    if family == "sd2":
        return dict(SD2_SCHEDULER)
    if family == "sd2-inpaint":  # the 512 inpainting model of SD 2 was trained with the epsilon objective
        return {**SD2_SCHEDULER, "prediction_type": "epsilon"}
    return dict(SD1_SCHEDULER)


def _reject_unsupported(state_dict: Tensors) -> None:
    keys = state_dict.keys()
    if "model.diffusion_model.input_blocks.0.0.weight" not in keys:
        if "conv_in.weight" in keys or any(k.startswith(("down_blocks.", "text_model.")) for k in keys):
            raise CheckpointError("a single diffusers component, not a full checkpoint; pass the diffusers folder")
        raise CheckpointError(f"not a Stable Diffusion checkpoint: no model.diffusion_model.* U-Net tensors "
                              f"(first keys: {_first_few(sorted(keys))})")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointError("an SDXL refiner (one OpenCLIP text encoder, no CLIP ViT-L in conditioner.embedders.0); "
                              "only SDXL base models (two text encoders) are supported")


def _split_ldm(state_dict: Tensors) -> dict[str, Tensors]:
    """Group tensors by LDM sub-model, prefixes stripped; EMA copies, schedule buffers and the rest are dropped."""
    parts: dict[str, Tensors] = {name: {} for name in _LDM_PREFIXES}
    for key, value in state_dict.items():
        for name, prefix in _LDM_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
    if not parts["vae"]:
        raise CheckpointError("no VAE tensors (first_stage_model.*)")
    text = parts["openclip"] or parts["clip"]
    if not text:
        raise CheckpointError("no text encoder tensors (cond_stage_model.transformer.* or cond_stage_model.model.*)")
    return {"unet": parts["unet"], "vae": parts["vae"], "text_encoder": text, "openclip": bool(parts["openclip"])}


def _count(keys: Iterable[str], pattern: str) -> int:
    """How many distinct indices fill the (\\d+) group of `pattern`."""
    rx = re.compile(pattern)
    return len({m[1] for k in keys if (m := rx.match(k))})


def _ldm_configs(base: str, parts: dict) -> ModelConfigs:
    """The preset of the base family (sd1, sd2), with every size the tensor shapes reveal (the U-Net's input
    channels, so the inpainting layout, among them) replaced by the file's own."""
    preset = get_preset("sd15" if base == "sd1" else "sd21")
    try:
        return ModelConfigs(
            clip=_ldm_clip_config(preset.clip, parts["text_encoder"], parts["openclip"]),
            vae=_ldm_vae_config(preset.vae, parts["vae"]),
            unet=_ldm_unet_config(preset.unet, parts["unet"], base == "sd2"),
        )
    except KeyError as err:
        raise CheckpointError(f"missing tensor {err.args[0]} needed to read the architecture") from None
    except ConfigError as err:
        raise CheckpointError(f"unsupported architecture: {err}") from None


def _ldm_unet_config(preset: UNetConfig, sd: Tensors, heads_of_64: bool) -> UNetConfig:
    levels = _count(sd, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    per_level = _count(sd, r"input_blocks\.(\d+)\.") // levels  # resnets + 1 (a downsampler or the skip slot)
    first = [1 + b * per_level for b in range(levels)]  # input block of each level's first resnet
    channels = tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first)
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in sd for i in first]
    up_attn = [f"output_blocks.{b * per_level}.1.proj_in.weight" in sd for b in range(levels)]
    proj = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    context = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), preset.cross_attention_dim)
    # head counts are not in the shapes: LDM's SD 1 yaml fixes 8 heads, SD 2's and SDXL's 64 channels per head
    heads = tuple(max(1, c // 64) for c in channels) if heads_of_64 else preset.attention_head_dim
    cfg = dataclasses.replace(
        preset, in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
        block_out_channels=channels, layers_per_block=per_level - 1, cross_attention_dim=context,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn),
        use_linear_projection=proj is not None and proj.ndim == 2, attention_head_dim=heads,
        transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,  # counted next
    )
    return _ldm_depths(cfg, sd, down_attn, up_attn)


def _ldm_depths(cfg: UNetConfig, sd: Tensors, down_attn: list[bool], up_attn: list[bool]) -> UNetConfig:
    """Transformer layers per resnet and the mid block's kind, counted in the file, in diffusers' terms: one int
    when all agree, per block, per layer (with the up path given separately) only where they differ."""
    levels, layers = len(cfg.block_out_channels), cfg.layers_per_block

    def depth(block: str) -> int:
        return _count(sd, re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\.")

    mid_type = MID_CROSS if "middle_block.1.proj_in.weight" in sd else \
        MID_PLAIN if "middle_block.0.in_layers.0.weight" in sd else None
    mid = depth("middle_block") if mid_type == MID_CROSS else 1
    down = [tuple(depth(f"input_blocks.{1 + b * (layers + 1) + j}") for j in range(layers)) for b in range(levels)]
    up = [tuple(depth(f"output_blocks.{b * (layers + 1) + j}") for j in range(layers + 1)) for b in range(levels)]
    # a level without transformers says nothing; the last down level's value also sets the mid block's depth
    fills = [1] * (levels - 1) + [mid]
    down_values = [_one_or_all(d) if a else f for d, a, f in zip(down, down_attn, fills)]
    up_values = [_one_or_all(u) if a else 1 for u, a in zip(up, up_attn)]
    together = down_values[0] if all(v == down_values[0] and isinstance(v, int) for v in down_values) else \
        tuple(down_values)
    cfg = dataclasses.replace(cfg, transformer_layers_per_block=together, reverse_transformer_layers_per_block=None,
                              mid_block_type=mid_type)
    nested = isinstance(together, tuple) and any(isinstance(v, tuple) for v in together)
    if nested or any(cfg.up_depths(b) != up[b] for b in range(levels) if up_attn[b]):
        cfg = dataclasses.replace(cfg, reverse_transformer_layers_per_block=tuple(up_values))
    if mid_type == MID_CROSS and cfg.mid_depth != mid:
        raise CheckpointError(f"the mid block has {mid} transformer layers, the last level's first one "
                              f"{cfg.mid_depth}: diffusers' UNet2DConditionModel cannot describe that")
    return cfg


def _one_or_all(depths: tuple[int, ...]) -> int | tuple[int, ...]:
    return depths[0] if len(set(depths)) == 1 else depths


def _ldm_vae_config(preset: VAEConfig, sd: Tensors) -> VAEConfig:
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    return dataclasses.replace(
        preset, in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        block_out_channels=tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)),
        layers_per_block=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        latent_channels=sd["decoder.conv_in.weight"].shape[1],
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
    )


def _ldm_clip_config(preset: CLIPConfig, sd: Tensors, openclip: bool, drop_last: bool = True) -> CLIPConfig:
    if openclip:
        tokens, positions = sd["token_embedding.weight"], sd["positional_embedding"]
        # SD 2 conditions on the penultimate layer, so the last residual block is dropped (SDXL keeps it: its
        # pooled output comes from the last)
        layers = _count(sd, r"transformer\.resblocks\.(\d+)\.") - drop_last
        inner = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    else:
        sd = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in sd.items()}
        tokens = sd["text_model.embeddings.token_embedding.weight"]
        positions = sd["text_model.embeddings.position_embedding.weight"]
        layers = _count(sd, r"text_model\.encoder\.layers\.(\d+)\.")
        inner = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    hidden = tokens.shape[1]
    return dataclasses.replace(
        preset, vocab_size=tokens.shape[0], hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        max_position_embeddings=positions.shape[0], num_attention_heads=max(1, hidden // 64),  # 64-wide heads
    )


def _convert_sdxl(state_dict: Tensors, configs: ModelConfigs | None) -> tuple[str, ModelConfigs, dict[str, Tensors]]:
    """An SDXL single file (SGM names) -> (family, configs, {component: fp32 state dict in our layout})."""
    parts: dict[str, Tensors] = {name: {} for name in _SDXL_PREFIXES}
    for key, value in state_dict.items():
        for name, prefix in _SDXL_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
    for name, prefix in _SDXL_PREFIXES.items():
        if not parts[name]:
            raise CheckpointError(f"SDXL checkpoint without {name} tensors ({prefix}*)")
    configs = configs or _sdxl_ldm_configs(parts)
    _check_text_encoders("SDXL checkpoint", configs)
    layers, n_vae = configs.unet.layers_per_block, len(configs.vae.block_out_channels)
    bigg = parts["text_encoder_2"]
    out = {
        "unet": _rename(parts["unet"], lambda k: _unet_key(k, layers)),
        "vae": _rename(parts["vae"], lambda k: _vae_key(k, n_vae)),
        "text_encoder": _rename(parts["text_encoder"], _clip_key),
        "text_encoder_2": _rename(bigg, _openclip_key),
    }
    if "text_projection" in bigg:  # OpenCLIP applies it as x @ P; a Linear computes x @ W.T
        out["text_encoder_2"]["text_projection.weight"] = bigg["text_projection"].t().contiguous()
    out["vae"] = {k: _squeeze_1x1(k, v) for k, v in out["vae"].items()}
    out["unet"] = {k: _fit_projection(k, v, configs.unet.use_linear_projection) for k, v in out["unet"].items()}
    family = "sdxl" + _inpaint_suffix(configs.unet)
    return family, configs, {name: _to_fp32(sd) for name, sd in out.items()}


def _sdxl_ldm_configs(parts: dict[str, Tensors]) -> ModelConfigs:
    """SDXL base's configs with every size the tensor shapes reveal replaced by the file's own."""
    preset = get_preset("sdxl")
    try:
        clip2 = _ldm_clip_config(preset.clip2, parts["text_encoder_2"], openclip=True, drop_last=False)
        projection = parts["text_encoder_2"]["text_projection"].shape[1]
        clip2 = dataclasses.replace(clip2, projection_dim=projection)
        unet = _ldm_unet_config(preset.unet, parts["unet"], heads_of_64=True)
        added = parts["unet"]["label_emb.0.0.weight"].shape[1]  # pooled text + 6 sinusoids of the time ids
        unet = dataclasses.replace(unet, projection_class_embeddings_input_dim=added,
                                   addition_time_embed_dim=(added - projection) // 6)
        return ModelConfigs(clip=_ldm_clip_config(preset.clip, parts["text_encoder"], openclip=False), clip2=clip2,
                            vae=_ldm_vae_config(preset.vae, parts["vae"]), unet=unet)
    except KeyError as err:
        raise CheckpointError(f"missing tensor {err.args[0]} needed to read the architecture") from None
    except ConfigError as err:
        raise CheckpointError(f"unsupported architecture: {err}") from None


def _rename(state_dict: Tensors, rule: Callable[[str], str | list[str] | None]) -> Tensors:
    """Apply a key rule; None drops the tensor, an unmatched key passes through (strict loading reports it)."""
    out: Tensors = {}
    for key, value in state_dict.items():
        new = rule(key)
        if new is None:
            continue
        if isinstance(new, list):  # a fused tensor split into equal parts along dim 0
            out.update(zip(new, value.chunk(len(new), dim=0)))
        else:
            out[new] = value
    return out


def _replace_prefix(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _unet_key(key: str, layers: int) -> str:
    """LDM U-Net key -> diffusers; blocks are numbered flat in LDM (resnets + one down/upsampler per level)."""
    key = _replace_prefix(key, _UNET_LDM)
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, slot = divmod(int(m[1]) - 1, layers + 1)
        if slot == layers:  # the level's last slot is its downsampler
            return f"down_blocks.{level}.downsamplers.0.conv.{m[3].removeprefix('op.')}"
        if m[2] == "0":
            return f"down_blocks.{level}.resnets.{slot}.{_replace_prefix(m[3], _RESNET_LDM)}"
        return f"down_blocks.{level}.attentions.{slot}.{m[3]}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{_replace_prefix(m[2], _RESNET_LDM)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
        level, slot = divmod(int(m[1]), layers + 1)
        if m[3].startswith("conv."):  # the upsampler follows the resnet (and the attention, if any)
            return f"up_blocks.{level}.upsamplers.0.{m[3]}"
        if m[2] == "0":
            return f"up_blocks.{level}.resnets.{slot}.{_replace_prefix(m[3], _RESNET_LDM)}"
        return f"up_blocks.{level}.attentions.{slot}.{m[3]}"
    return key


def _vae_key(key: str, levels: int) -> str:
    """LDM VAE key -> diffusers; LDM numbers decoder levels from the lowest resolution up, diffusers reversed."""
    key = _replace_prefix(key, _VAE_LDM)
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_replace_prefix(m[3], _RESNET_LDM)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.attentions.0.{_VAE_ATTENTION_LDM.get(m[2], m[2])}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)", key):
        where = f"resnets.{m[3]}" if m[3] is not None else "downsamplers.0"
        return f"encoder.down_blocks.{m[1]}.{where}.{_replace_prefix(m[4], _RESNET_LDM)}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)", key):
        where = f"resnets.{m[3]}" if m[3] is not None else "upsamplers.0"
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{where}.{_replace_prefix(m[4], _RESNET_LDM)}"
    return key


def _clip_key(key: str) -> str | None:
    """SD 1 stores transformers' own CLIPTextModel keys (very old files without the text_model. level)."""
    if key.endswith("position_ids"):
        return None
    return key if key.startswith("text_model.") else "text_model." + key


def _openclip_key(key: str) -> str | list[str] | None:
    """OpenCLIP text tower key -> transformers CLIP; the fused attention in_proj becomes q/k/v."""
    if key in _OPENCLIP_TOP:
        return "text_model." + _OPENCLIP_TOP[key]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if m is None:
        return None  # text_projection, logit_scale, attn_mask: outside the text model diffusers keeps
    layer = f"text_model.encoder.layers.{m[1]}."
    if m[2].startswith("attn.in_proj_"):
        kind = m[2].removeprefix("attn.in_proj_")
        return [f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv"]
    return layer + _replace_prefix(m[2], _OPENCLIP_LAYER)


def _drop_last_openclip_layer(state_dict: Tensors, keep: int) -> Tensors:
    return {k: v for k, v in state_dict.items()
            if not (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)) or int(m[1]) < keep}


def _squeeze_1x1(key: str, value: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 4:
        return value[:, :, 0, 0]
    return value


def _fit_projection(key: str, value: torch.Tensor, linear: bool) -> torch.Tensor:
    """Transformer proj_in/proj_out: 1x1 conv or linear, whichever the config builds."""
    if not re.search(r"\.proj_(in|out)\.weight$", key):
        return value
    if linear and value.ndim == 4:
        return value[:, :, 0, 0]
    if not linear and value.ndim == 2:
        return value[:, :, None, None]
    return value


# --------------------------------------------------------------------------------------------------- random:NAME


def _load_random(name: str, seed: int) -> Checkpoint:
    if name not in RANDOM_PRESETS:
        raise CheckpointError(f"unknown source random:{name}; choose one of "
                              f"{', '.join('random:' + n for n in RANDOM_PRESETS)}")
    configs = get_preset(name)
    family = RANDOM_PRESETS[name]
    if name.startswith("tiny"):
        tokenizer_dir, configs = _tiny_tokenizer(configs)
        tokenizer_2_dir = _tiny_tokenizer(configs, pad_token="!")[0] if configs.is_sdxl else None
    else:
        tokenizer_dir = _family_tokenizer(family)
        tokenizer_2_dir = clip_tokenizer_dir("!") if configs.is_sdxl else None
    torch.manual_seed(seed)
    state_dicts = {}
    # one model at a time, its tensors kept and the module dropped: full-size SDXL holds one copy (~14 GB fp32)
    for component in components(configs):
        state_dicts[component] = _model_class(component)(_config_of(configs, component)).state_dict()
    scheduler = dict(LCM_SCHEDULER) if configs.unet.is_lcm else _family_scheduler(family)
    scheduler = dict(PRESET_SCHEDULERS.get(name, scheduler))
    return _finish(f"random:{name}", family, configs, state_dicts, tokenizer_dir, scheduler, tokenizer_2_dir)


def _tiny_tokenizer(configs: ModelConfigs, pad_token: str | None = None) -> tuple[Path, ModelConfigs]:
    """A small BPE over the tiny world's words (the real vocabulary does not fit 1000 embeddings); both text
    encoders of a tiny SDXL take its ids. `pad_token` "!": the variant padding with "!" (as SDXL's second does)."""
    from .tiny.shapes import vocabulary
    from .tiny.vocab import write_tokenizer

    if pad_token is None:
        folder = write_tokenizer(_cache_dir() / "tiny-bpe-v1", vocabulary(), num_merges=200)
    else:
        folder = write_tokenizer(_cache_dir() / "tiny-bpe-v1-pad0", vocabulary(), num_merges=200, pad_token=pad_token)
    size = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    if size > configs.clip.vocab_size:
        raise CheckpointError(f"tiny tokenizer has {size} tokens, more than the preset's {configs.clip.vocab_size}")
    ids = {"bos_token_id": size - 2, "eos_token_id": size - 1, "pad_token_id": size - 1}
    clip2 = dataclasses.replace(configs.clip2, **ids) if configs.clip2 is not None else None
    return folder, dataclasses.replace(configs, clip=dataclasses.replace(configs.clip, **ids), clip2=clip2)


# ------------------------------------------------------------------------------------------- CLIP BPE tokenizer

_BPE_FILE = Path(__file__).parent / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
_START, _END = "<|startoftext|>", "<|endoftext|>"
_CLIP_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges so that the vocabulary has 49408 entries


def _cache_dir() -> Path:
    root = os.environ.get("SDONNX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "sdonnx")
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:  # read-only home: fall back to a private temporary folder
        return Path(tempfile.mkdtemp(prefix="sdonnx-cache-"))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's vocabulary and merges, rebuilt from its BPE file (Radford et al. 2021, simple_tokenizer.py)."""
    from .tiny.vocab import byte_alphabet

    lines = gzip.open(_BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_CLIP_MERGES + 1]]
    # CLIP lists the printable byte symbols first, then the remapped ones: i.e. by code point
    symbols = sorted(byte_alphabet(), key=ord)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_START, _END]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    vocab, merges = clip_vocab()
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
              "bos_token": _START, "eos_token": _END, "unk_token": _END, "pad_token": pad_token}
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),  # written last: marks the folder complete
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)  # atomic: a concurrent reader never sees half a file
