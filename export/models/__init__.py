"""Our PyTorch Stable Diffusion models; state_dict keys follow the diffusers/transformers layout."""

from .clip import CLIPTextModel
from .config import PRESETS, CLIPConfig, ConfigError, ModelConfigs, UNetConfig, VAEConfig, get_preset
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = [
    "AutoencoderKL", "CLIPConfig", "CLIPTextModel", "ConfigError", "ModelConfigs", "PRESETS",
    "UNet2DConditionModel", "UNetConfig", "VAEConfig", "get_preset",
]
