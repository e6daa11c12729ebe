"""Our PyTorch Stable Diffusion models; state_dict keys follow the diffusers/transformers layout."""

from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .config import (PRESETS, TINY_VAE_PRESETS, CLIPConfig, ConfigError, ModelConfigs, TinyVAEConfig, UNetConfig,
                     VAEConfig, get_preset)
from .taesd import AutoencoderTiny
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = [
    "AutoencoderKL", "AutoencoderTiny", "CLIPConfig", "CLIPTextModel", "CLIPTextModelWithProjection", "ConfigError",
    "ModelConfigs", "PRESETS", "TINY_VAE_PRESETS", "TinyVAEConfig", "UNet2DConditionModel", "UNetConfig", "VAEConfig",
    "get_preset",
]
