"""Frozen configs for the three Stable Diffusion models, read from and written to diffusers/transformers config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from sdonnx.model import is_inpainting_unet

DIFFUSERS_VERSION = "0.35.2"
TRANSFORMERS_VERSION = "4.57.6"


class ConfigError(ValueError):
    """A config.json holds a setting our models do not implement, or a bad value."""


def _tuple(value: Any) -> Any:
    """JSON lists become tuples so configs stay hashable and frozen."""
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _read(cls: type, d: dict, fixed: dict[str, Any]) -> Any:
    """Build `cls` from the known keys of `d`; keys in `fixed` must hold the only value we implement."""
    name = cls.__name__
    for key, allowed in fixed.items():
        value = _tuple(d.get(key, allowed))
        if isinstance(value, tuple) and not isinstance(allowed, tuple) and all(v == allowed for v in value):
            value = allowed  # a per-block list that repeats the one value we implement
        if value != allowed and not (key == "mid_block_only_cross_attention" and value is False):
            raise ConfigError(f"{name}: unsupported {key}={value!r} (only {allowed!r} is implemented)")
    known = {f.name for f in fields(cls)}
    return cls(**{k: _tuple(v) for k, v in d.items() if k in known})


def _depths_ok(value: Any, per_layer: int) -> bool:
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, tuple) and len(value) == per_layer and all(isinstance(v, int) and v >= 0 for v in value)


def _write(cfg: Any, header: dict, fixed: dict[str, Any]) -> dict:
    out = dict(header)
    out.update({k: _jsonable(v) for k, v in fixed.items()})
    out.update({f.name: _jsonable(getattr(cfg, f.name)) for f in fields(cfg)})
    return out


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP text transformer (transformers CLIPTextConfig defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    ACTS: ClassVar[tuple[str, ...]] = ("quick_gelu", "gelu")

    def __post_init__(self) -> None:
        if self.hidden_act not in self.ACTS:
            raise ConfigError(f"CLIPConfig: unsupported hidden_act={self.hidden_act!r} (one of {self.ACTS})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"CLIPConfig: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        """From a transformers text_encoder/config.json (a full CLIPConfig's text_config also works)."""
        return _read(cls, d.get("text_config", d), {})

    def to_dict(self, projection: bool = False) -> dict:
        """transformers' config.json; `projection`: of a CLIPTextModelWithProjection (SDXL's second encoder)."""
        arch = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
        header = {"architectures": [arch], "model_type": "clip_text_model",
                  "transformers_version": TRANSFORMERS_VERSION, "torch_dtype": "float32"}
        return _write(self, header, {"attention_dropout": 0.0, "dropout": 0.0})


_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (diffusers defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ConfigError(f"VAEConfig: down_block_types must be {n} x DownEncoderBlock2D, "
                              f"got {self.down_block_types}")
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ConfigError(f"VAEConfig: up_block_types must be {n} x UpDecoderBlock2D, got {self.up_block_types}")
        if not isinstance(self.layers_per_block, int):
            raise ConfigError(f"VAEConfig: layers_per_block must be an int, got {self.layers_per_block!r}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """From a diffusers vae/config.json."""
        return _read(cls, d, _VAE_FIXED)

    def to_dict(self) -> dict:
        header = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
        return _write(self, header, _VAE_FIXED)


_TINY_VAE_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}


@dataclass(frozen=True)
class TinyVAEConfig:
    """AutoencoderTiny (diffusers defaults, which are TAESD's; TAESDXL's config is the same, only its weights differ).

    Its latents are the diffusion model's scaled latents: scaling_factor 1 and shift_factor 0 for SD and SDXL.
    latent_magnitude / latent_shift only map latents to [0, 1] for storing them as 8-bit images.
    """

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    latent_channels: int = 4
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    force_upcast: bool = False

    def __post_init__(self) -> None:
        for part in ("encoder", "decoder"):
            channels, blocks = getattr(self, f"{part}_block_out_channels"), getattr(self, f"num_{part}_blocks")
            if len(channels) != len(blocks) or not channels:
                raise ConfigError(f"TinyVAEConfig: {part} needs one block count per stage, got {channels} "
                                  f"channels and {blocks} blocks")
            # diffusers builds each stage's first conv from that stage's own width, so only equal widths run
            if len(set(channels)) != 1:
                raise ConfigError(f"TinyVAEConfig: {part}_block_out_channels must all be equal, got {channels}")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ConfigError(f"TinyVAEConfig: encoder and decoder need as many stages (so one undoes the other's "
                              f"scaling), got {len(self.encoder_block_out_channels)} and "
                              f"{len(self.decoder_block_out_channels)}")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for TAESD)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> TinyVAEConfig:
        """From a diffusers AutoencoderTiny config.json."""
        return _read(cls, d, _TINY_VAE_FIXED)

    def to_dict(self) -> dict:
        # diffusers also records the decoder widths as block_out_channels
        header = {"_class_name": "AutoencoderTiny", "_diffusers_version": DIFFUSERS_VERSION,
                  "block_out_channels": list(self.decoder_block_out_channels)}
        return _write(self, header, _TINY_VAE_FIXED)


# TAESD (SD 1.x/2.x latents) and TAESDXL (SDXL latents) share one architecture; their trained weights differ
TINY_VAE_PRESETS: dict[str, TinyVAEConfig] = {"taesd": TinyVAEConfig(), "taesdxl": TinyVAEConfig()}


CROSS_DOWN, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

_UNET_FIXED = {
    "center_input_sample": False, "only_cross_attention": False,
    "downsample_padding": 1, "dropout": 0.0, "act_fn": "silu", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
MID_CROSS, MID_PLAIN = "UNetMidBlock2DCrossAttn", "UNetMidBlock2D"
# SDXL's micro-conditioning: the pooled text embedding plus six size/crop numbers (Podell et al. 2023)
TEXT_TIME = "text_time"
Depths = int | tuple  # transformer layers: one for a whole block, or one per layer of the block


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel (diffusers defaults, i.e. SD 1.x numbers).

    `attention_head_dim` keeps diffusers' naming: for these U-Nets it is the number of heads per block.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN)
    up_block_types: tuple[str, ...] = (UP, CROSS_UP, CROSS_UP, CROSS_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # width of an extra embedding added to the timestep's (LCM-distilled U-Nets take the guidance scale this
    # way, Luo et al. 2023); None: no such input
    time_cond_proj_dim: int | None = None
    # transformer layers per block (diffusers' meaning): an int for all, one per block, or one tuple per block
    # with a depth per layer; the up path reads `reverse_transformer_layers_per_block` when given (SSD-1B, Vega)
    transformer_layers_per_block: Depths | tuple[Depths, ...] = 1
    reverse_transformer_layers_per_block: tuple[Depths, ...] | None = None
    # UNetMidBlock2DCrossAttn (resnet, transformer, resnet), UNetMidBlock2D (one resnet: SSD-1B, Vega) or None
    mid_block_type: str | None = MID_CROSS
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"UNetConfig: need {n} down and up block types for {n} block_out_channels")
        for kind in self.down_block_types:
            if kind not in (CROSS_DOWN, DOWN):
                raise ConfigError(f"UNetConfig: unsupported down block {kind!r} (use {CROSS_DOWN} or {DOWN})")
        for kind in self.up_block_types:
            if kind not in (CROSS_UP, UP):
                raise ConfigError(f"UNetConfig: unsupported up block {kind!r} (use {CROSS_UP} or {UP})")
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, key), int):
                raise ConfigError(f"UNetConfig: per-block {key} is not supported, got {getattr(self, key)!r}")
        if isinstance(self.attention_head_dim, tuple) and len(self.attention_head_dim) != n:
            raise ConfigError(f"UNetConfig: attention_head_dim needs {n} entries, got {self.attention_head_dim}")
        for ch, heads in zip(self.block_out_channels, self.heads):
            if ch % heads:
                raise ConfigError(f"UNetConfig: {ch} channels do not split into {heads} heads")
        self._check_depths()
        if self.mid_block_type not in (MID_CROSS, MID_PLAIN, None):
            raise ConfigError(f"UNetConfig: unsupported mid_block_type={self.mid_block_type!r} "
                              f"(use {MID_CROSS}, {MID_PLAIN} or null)")
        self._check_addition()

    def _check_depths(self) -> None:
        n, layers = len(self.block_out_channels), self.layers_per_block
        down, up = self.transformer_layers_per_block, self.reverse_transformer_layers_per_block
        for name, value, per_layer in (("transformer_layers_per_block", down, layers),
                                       ("reverse_transformer_layers_per_block", up, layers + 1)):
            if value is None or isinstance(value, int):
                continue
            if len(value) != n or not all(_depths_ok(v, per_layer) for v in value):
                raise ConfigError(f"UNetConfig: {name} needs {n} entries, each an int or {per_layer} ints, "
                                  f"got {value!r}")
        if isinstance(down, int) and down < 0:
            raise ConfigError(f"UNetConfig: transformer_layers_per_block must be >= 0, got {down}")
        if isinstance(up, int):
            raise ConfigError(f"UNetConfig: reverse_transformer_layers_per_block must list {n} blocks, got {up}")
        if up is None and not isinstance(down, int) and any(isinstance(v, tuple) for v in down):
            # diffusers refuses this too: the up path's per-layer depths cannot be guessed
            raise ConfigError("UNetConfig: per-layer transformer_layers_per_block needs "
                              "reverse_transformer_layers_per_block")

    def _check_addition(self) -> None:
        if self.addition_embed_type not in (None, TEXT_TIME):
            raise ConfigError(f"UNetConfig: unsupported addition_embed_type={self.addition_embed_type!r} "
                              f"(only {TEXT_TIME!r} or null)")
        if self.is_sdxl and not all(isinstance(v, int) and v > 0 for v in
                                    (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)):
            raise ConfigError("UNetConfig: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")
        if self.is_sdxl and self.text_embeds_dim <= 0:
            raise ConfigError(f"UNetConfig: projection_class_embeddings_input_dim "
                              f"{self.projection_class_embeddings_input_dim} leaves no room for the text embedding "
                              f"after 6 x {self.addition_time_embed_dim} time ids")

    def down_depths(self, block: int) -> tuple[int, ...]:
        """Transformer layers after each resnet of down block `block` (diffusers' reading of the config)."""
        d = self.transformer_layers_per_block
        d = d if isinstance(d, int) else d[block]
        return (d,) * self.layers_per_block if isinstance(d, int) else d

    def up_depths(self, block: int) -> tuple[int, ...]:
        """Transformer layers after each resnet of up block `block` (counted from the lowest resolution)."""
        n, d = len(self.block_out_channels), self.reverse_transformer_layers_per_block
        if d is None:
            d = self.transformer_layers_per_block
            d = d if isinstance(d, int) else d[n - 1 - block]
        else:
            d = d[block]
        return (d,) * (self.layers_per_block + 1) if isinstance(d, int) else d

    @property
    def mid_depth(self) -> int:
        """Transformer layers of the mid block (0 without one): the last down block's, its first layer's if nested."""
        if self.mid_block_type != MID_CROSS:
            return 0
        d = self.transformer_layers_per_block
        d = d if isinstance(d, int) else d[-1]
        return d if isinstance(d, int) else d[0]

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers reads attention_head_dim as a head count)."""
        h = self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # The model kinds, named once: code asks these rather than re-deriving them from the numbers
    @property
    def is_lcm(self) -> bool:
        """LCM-distilled: the guidance scale enters as an embedding (timestep_cond), not as a second batch."""
        return self.time_cond_proj_dim is not None

    @property
    def is_inpaint(self) -> bool:
        return is_inpainting_unet(self.in_channels, self.out_channels)

    @property
    def is_sdxl(self) -> bool:
        """SDXL's conditioning: takes text_embeds (the pooled, projected text) and time_ids (6 numbers per image)."""
        return self.addition_embed_type == TEXT_TIME

    @property
    def text_embeds_dim(self) -> int:
        """Width of the pooled text embedding an SDXL U-Net takes (0 for others)."""
        if not self.is_sdxl:
            return 0
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """From a diffusers unet/config.json."""
        return _read(cls, d, _UNET_FIXED)

    def to_dict(self) -> dict:
        # addition_embed_type_num_heads is unused without addition embeddings; written for completeness
        header = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
                  "addition_embed_type_num_heads": 64}
        return _write(self, header, _UNET_FIXED)


@dataclass(frozen=True)
class ModelConfigs:
    """The model configs of one Stable Diffusion checkpoint (SDXL: a second, projected text encoder `clip2`)."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    clip2: CLIPConfig | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.unet.is_sdxl


_SD_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, scaling_factor=0.18215,
)
_SD15 = ModelConfigs(
    # OpenAI CLIP ViT-L/14 text tower; SD 1.5's config.json carries bos 0 / eos 2 (the argmax rule)
    clip=CLIPConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                    num_attention_heads=12, hidden_act="quick_gelu", pad_token_id=1, bos_token_id=0,
                    eos_token_id=2),
    vae=_SD_VAE,
    unet=UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
)
# OpenCLIP ViT-H/14 text tower, last of its 24 layers dropped as SD 2.x uses the penultimate one
_SD21_CLIP = CLIPConfig(hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
                        num_attention_heads=16, hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2)
# SDXL base 1.0 (Podell et al. 2023): CLIP ViT-L and OpenCLIP ViT-bigG (all 32 layers: SDXL reads the penultimate
# hidden state and the last layer's projected pooled output), three U-Net levels with deeper transformers lower down
_SDXL = ModelConfigs(
    clip=_SD15.clip,
    clip2=CLIPConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                     num_attention_heads=20, hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2),
    vae=dataclasses.replace(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
    unet=UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                    down_block_types=(DOWN, CROSS_DOWN, CROSS_DOWN), up_block_types=(CROSS_UP, CROSS_UP, UP),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                    cross_attention_dim=2048, addition_embed_type=TEXT_TIME, addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816),
)
PRESETS: dict[str, ModelConfigs] = {
    "sd15": _SD15,
    "sd15-inpaint": dataclasses.replace(_SD15, unet=dataclasses.replace(_SD15.unet, in_channels=9)),
    # SD 1.5 distilled by LCM with the guidance scale as an input (LCM-Dreamshaper-v7's layout)
    "sd15-lcm": dataclasses.replace(_SD15, unet=dataclasses.replace(_SD15.unet, time_cond_proj_dim=256)),
    "sd21": ModelConfigs(
        clip=_SD21_CLIP,
        vae=dataclasses.replace(_SD_VAE, sample_size=768),
        unet=UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                        use_linear_projection=True, upcast_attention=True),
    ),
    # SD-Turbo: SD 2.1's architecture at 512x512 (the 2.1-base sizes)
    "sd-turbo": ModelConfigs(
        clip=_SD21_CLIP,
        vae=_SD_VAE,
        unet=UNetConfig(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                        use_linear_projection=True, upcast_attention=True),
    ),
    "sdxl": _SDXL,
    # SDXL-Turbo: SDXL's architecture distilled for 512x512 (Sauer et al. 2023)
    "sdxl-turbo": dataclasses.replace(_SDXL, unet=dataclasses.replace(_SDXL.unet, sample_size=64),
                                      vae=dataclasses.replace(_SDXL.vae, sample_size=512)),
    "sdxl-inpaint": dataclasses.replace(_SDXL, unet=dataclasses.replace(_SDXL.unet, in_channels=9)),
    "tiny": ModelConfigs(
        clip=CLIPConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, projection_dim=64,
                        num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu",
                        pad_token_id=999, bos_token_id=998, eos_token_id=999),
        vae=VAEConfig(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      block_out_channels=(32, 64), layers_per_block=1, sample_size=64),
        unet=UNetConfig(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=(CROSS_DOWN, DOWN), up_block_types=(UP, CROSS_UP),
                        cross_attention_dim=64, attention_head_dim=4),
    ),
}
# a tiny SDXL for fast end-to-end tests (tests/tiny_sdxl.py's layout): no attention in the first level, two
# transformer layers in the second, both text encoders 32 wide
PRESETS["tiny-sdxl"] = ModelConfigs(
    clip=dataclasses.replace(PRESETS["tiny"].clip, hidden_size=32, intermediate_size=128, projection_dim=32,
                             num_hidden_layers=3),
    clip2=dataclasses.replace(PRESETS["tiny"].clip, hidden_size=32, intermediate_size=128, projection_dim=32,
                              num_hidden_layers=3, hidden_act="gelu"),
    vae=dataclasses.replace(PRESETS["tiny"].vae, scaling_factor=0.13025),
    unet=dataclasses.replace(PRESETS["tiny"].unet, down_block_types=(DOWN, CROSS_DOWN), up_block_types=(CROSS_UP, UP),
                             transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
                             addition_embed_type=TEXT_TIME, addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=32 + 6 * 8),
)
# the defaults-table row (sdonnx.model.DEFAULTS) a preset's model generates with, where not its kind's
PRESET_DEFAULTS = {"sd-turbo": "turbo", "sdxl-turbo": "turbo"}


def get_preset(name: str) -> ModelConfigs:
    """The configs of a named architecture: sd15, sd15-inpaint, sd15-lcm, sd21, sd-turbo, sdxl, sdxl-turbo,
    sdxl-inpaint, tiny or tiny-sdxl."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
