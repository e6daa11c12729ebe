"""Tiny VAE weights (TAESD, TAESDXL) as people have them -> our AutoencoderTiny.

Sources: a diffusers AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors), the original
`taesd_encoder` / `taesd_decoder` .pth or .safetensors pair of madebyollin/taesd (nn.Sequential keys `0.weight`,
`1.conv.0.weight`, ...), or `random` / `random:taesd` / `random:taesdxl`.

The original files and diffusers share the Sequential indices, except that the original decoder's layer 0 is
its input clamp (no weights), which diffusers applies in forward: decoder indices differ by one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.config import TINY_VAE_PRESETS, ConfigError, TinyVAEConfig, VAEConfig
from .models.taesd import AutoencoderTiny
from .weights import CheckpointError, Tensors, _read_json, _read_tensors, _to_fp32, _weight_files, load_strict

COMPONENT = "tiny VAE"
RANDOM = "random"
ORIGINAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_DECODER_SHIFT = 1  # the original decoder's Sequential starts with the clamp


@dataclass(frozen=True)
class TinyVAEWeights:
    """A tiny VAE read and checked: its config and diffusers-layout tensors (None: random, built on demand)."""

    source: str
    config: TinyVAEConfig
    state_dict: Tensors | None
    seed: int = 0


# ---------------------------------------------------------------------------------------------------- public API


def read_tiny_vae(source: str | Path, seed: int = 0) -> TinyVAEWeights:
    """Read and validate a diffusers AutoencoderTiny folder, an original encoder/decoder pair (a folder holding
    one, or either file) or `random[:taesd|:taesdxl]`; any problem is a one-line CheckpointError."""
    text = str(source)
    if text == RANDOM or text.startswith(RANDOM + ":"):
        return TinyVAEWeights(text, _random_preset(text), None, seed)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"tiny VAE {text}: no such file or folder (expected a diffusers AutoencoderTiny "
                              f"folder, a taesd_encoder/taesd_decoder file or folder, or random)")
    if path.is_dir() and (path / "config.json").is_file():
        config, state_dict = _read_diffusers_folder(path)
    else:
        encoder, decoder = _original_pair(path)
        state_dict = from_original(_read(encoder), _read(decoder))
        config = _config_from_shapes(state_dict, f"{encoder.name} + {decoder.name}")
    _check_tensors(config, state_dict, text)
    return TinyVAEWeights(text, config, _to_fp32(state_dict), seed)


def build_tiny_vae(weights: TinyVAEWeights, vae: VAEConfig | None = None) -> AutoencoderTiny:
    """Our AutoencoderTiny holding `weights`, in eval mode; with the model's `vae`, checked to share its latent
    space (a random tiny VAE takes as many stages as `vae` needs to reach its downscale)."""
    config = weights.config
    if weights.state_dict is None:
        if vae is not None:
            config = fit_stages(config, vae.downscale)
        model = _random_model(config, weights.seed)
    else:
        with torch.device("meta"):  # skip initialising weights that are replaced at once
            model = AutoencoderTiny(config)
        load_strict(model, weights.state_dict, COMPONENT, assign=True)
    if vae is not None:
        check_compatible(config, vae, weights.source)
    return model.eval()


def load_tiny_vae(source: str | Path, seed: int = 0, vae: VAEConfig | None = None) -> AutoencoderTiny:
    """read_tiny_vae + build_tiny_vae."""
    return build_tiny_vae(read_tiny_vae(source, seed), vae)


def random_tiny_vae(preset: str = "taesd", seed: int = 0, downscale: int = 8) -> AutoencoderTiny:
    """TAESD's (or TAESDXL's) architecture with seeded random weights, in eval mode; a `downscale` other than 8
    changes the number of stages (the tiny test models scale by 2)."""
    config = fit_stages(_random_preset(f"{RANDOM}:{preset}"), downscale)
    return _random_model(config, seed).eval()


def check_compatible(config: TinyVAEConfig, vae: VAEConfig, source: str = COMPONENT) -> None:
    """The tiny VAE must read and write the model's latents: same channel count and the same downscale."""
    if config.latent_channels != vae.latent_channels:
        raise CheckpointError(f"tiny VAE {source} has {config.latent_channels} latent channels but the model's VAE "
                              f"has {vae.latent_channels}: it belongs to another model family")
    if config.downscale != vae.downscale:
        raise CheckpointError(f"tiny VAE {source} scales images by {config.downscale} but the model's VAE by "
                              f"{vae.downscale}")


def fit_stages(config: TinyVAEConfig, downscale: int) -> TinyVAEConfig:
    """TAESD's block pattern (encoder 1, 3, 3, ...; decoder ..., 3, 3, 1) over as many stages as `downscale` needs."""
    if downscale < 1 or downscale & (downscale - 1):
        raise CheckpointError(f"a tiny VAE scales by a power of two, not {downscale}")
    stages = downscale.bit_length()
    enc, dec = config.encoder_block_out_channels[0], config.decoder_block_out_channels[0]
    return dataclasses.replace(config, encoder_block_out_channels=(enc,) * stages,
                               decoder_block_out_channels=(dec,) * stages,
                               num_encoder_blocks=(1,) + (3,) * (stages - 1),
                               num_decoder_blocks=(3,) * (stages - 1) + (1,))


def from_original(encoder: Tensors, decoder: Tensors) -> Tensors:
    """The original taesd_encoder / taesd_decoder state dicts -> one state dict in diffusers' layout."""
    out = {}
    for part, tensors, shift in (("encoder", encoder, 0), ("decoder", decoder, _DECODER_SHIFT)):
        for key, value in tensors.items():
            index, rest = _split_index(key, part)
            out[f"{part}.layers.{index - shift}.{rest}"] = value
    return out


def to_original(state_dict: Tensors) -> tuple[Tensors, Tensors]:
    """A diffusers-layout state dict -> the original (encoder, decoder) state dicts (from_original's inverse)."""
    encoder, decoder = {}, {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".layers.")
        index, rest = _split_index(rest, part)
        if part == "encoder":
            encoder[f"{index}.{rest}"] = value
        elif part == "decoder":
            decoder[f"{index + _DECODER_SHIFT}.{rest}"] = value
        else:
            raise CheckpointError(f"{key}: not an AutoencoderTiny tensor")
    return encoder, decoder


# ------------------------------------------------------------------------------------------------ reading files


def _random_preset(text: str) -> TinyVAEConfig:
    name = text.partition(":")[2] or "taesd"
    if name not in TINY_VAE_PRESETS:
        raise CheckpointError(f"unknown tiny VAE {text}; choose random, "
                              f"{', '.join(RANDOM + ':' + n for n in TINY_VAE_PRESETS)} or a path")
    return TINY_VAE_PRESETS[name]


def _random_model(config: TinyVAEConfig, seed: int) -> AutoencoderTiny:
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's generator
        torch.manual_seed(seed)
        return AutoencoderTiny(config)


def _read(path: Path) -> Tensors:
    try:
        return _read_tensors(path)
    except CheckpointError as err:
        raise CheckpointError(f"tiny VAE {err}") from None


def _read_diffusers_folder(folder: Path) -> tuple[TinyVAEConfig, Tensors]:
    raw = _read_json(folder / "config.json")
    kind = raw.get("_class_name", "AutoencoderTiny")
    if kind != "AutoencoderTiny":
        raise CheckpointError(f"tiny VAE {folder}: config.json describes a {kind}, not an AutoencoderTiny")
    try:
        config = TinyVAEConfig.from_dict(raw)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"tiny VAE {folder / 'config.json'}: {err}") from None
    tensors: Tensors = {}
    for path in _weight_files(folder):
        tensors.update(_read(path))
    return config, tensors


def _original_pair(path: Path) -> tuple[Path, Path]:
    """(encoder file, decoder file) of the original layout, from either file or the folder holding them."""
    if path.is_dir():
        stems = sorted({p.name[: -len(p.suffix) - len("encoder")] for p in path.iterdir()
                        if p.suffix in ORIGINAL_SUFFIXES and p.stem.endswith("encoder")})
        if not stems:
            raise CheckpointError(f"tiny VAE {path}: neither a diffusers folder (config.json) nor one holding "
                                  f"taesd_encoder/taesd_decoder weights")
        if len(stems) > 1:
            names = ", ".join(s + "encoder" for s in stems)
            raise CheckpointError(f"tiny VAE {path}: holds several encoders ({names}); pass one file, e.g. "
                                  f"{path / (stems[0] + 'encoder.pth')}")
        return _find(path, stems[0] + "encoder"), _find(path, stems[0] + "decoder")
    m = re.fullmatch(r"(.*)(encoder|decoder)", path.stem)
    if m is None:
        raise CheckpointError(f"tiny VAE {path}: expected a taesd_encoder or taesd_decoder file (the name finds "
                              f"its other half) or a folder")
    return _find(path.parent, m[1] + "encoder", path), _find(path.parent, m[1] + "decoder", path)


def _find(folder: Path, stem: str, given: Path | None = None) -> Path:
    """`given` if it has this stem, else the first file named stem + suffix, safetensors first."""
    if given is not None and given.stem == stem:
        return given
    for suffix in ((given.suffix,) if given is not None else ()) + ORIGINAL_SUFFIXES:
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    raise CheckpointError(f"tiny VAE: {folder / stem}.* is missing (the encoder and the decoder come as a pair)")


def _split_index(key: str, part: str) -> tuple[int, str]:
    index, _, rest = key.partition(".")
    if not index.isdigit() or not rest:
        raise CheckpointError(f"tiny VAE {part} tensor {key!r} is not in TAESD's Sequential layout")
    return int(index), rest


# ---------------------------------------------------------------------------------------- architecture from shapes


def _config_from_shapes(state_dict: Tensors, name: str) -> TinyVAEConfig:
    """The original files carry no config: the stages are the runs of residual blocks between bare convolutions."""
    try:
        enc_in, enc_stages, enc_out = _layout(state_dict, "encoder")
        dec_in, dec_stages, dec_out = _layout(state_dict, "decoder")
        return TinyVAEConfig(
            in_channels=enc_in.shape[1], out_channels=dec_out.shape[0],
            encoder_block_out_channels=(enc_in.shape[0],) * len(enc_stages),
            decoder_block_out_channels=(dec_in.shape[0],) * len(dec_stages),
            latent_channels=enc_out.shape[0], num_encoder_blocks=enc_stages, num_decoder_blocks=dec_stages)
    except (ConfigError, IndexError) as err:
        raise CheckpointError(f"tiny VAE {name}: not TAESD's architecture ({err})") from None


def _layout(state_dict: Tensors, part: str) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor]:
    """(first conv weight, residual blocks per stage, last conv weight) of encoder.layers / decoder.layers."""
    kinds: dict[int, str] = {}
    for key in state_dict:
        if m := re.fullmatch(rf"{part}\.layers\.(\d+)\.(weight|conv\.0\.weight)", key):
            kinds[int(m[1])] = "conv" if m[2] == "weight" else "block"
    order = [kinds[i] for i in sorted(kinds)]
    if len(order) < 2 or order[0] != "conv" or order[-1] != "conv":
        raise IndexError(f"no {part} convolutions at both ends")
    stages, run = [], 0
    for kind in order[1:]:
        if kind == "block":
            run += 1
        else:
            stages.append(run)
            run = 0
    first, last = min(kinds), max(kinds)
    return state_dict[f"{part}.layers.{first}.weight"], tuple(stages), state_dict[f"{part}.layers.{last}.weight"]


def _check_tensors(config: TinyVAEConfig, state_dict: Tensors, source: str) -> None:
    """Missing, unexpected or misshapen tensors (another architecture, e.g. TAEF2's normalised mid blocks)."""
    with torch.device("meta"):
        model = AutoencoderTiny(config)
    load_strict(model, state_dict, f"{COMPONENT} {source}", assign=True)
