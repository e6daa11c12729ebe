"""Tiny Stable Diffusion pipelines with random weights, built with diffusers/transformers (test references).

Families: "sd1" (quick_gelu CLIP, int head dim, PNDM, epsilon), "sd2" (gelu CLIP, linear projections,
per-block head dims, DDIM v-prediction, pad token 0), "inpaint" (sd1 with a 9-channel U-Net) and "turbo" (sd2's
architecture with SD-Turbo's scheduler: Euler, trailing timesteps, epsilon).
"""

from __future__ import annotations

import json
from pathlib import Path

from sdonnx.export.tiny.vocab import write_tokenizer

WORDS = (
    "a an the of on in with and red green blue yellow purple orange white black circle square "
    "triangle small large top bottom left right center background photo painting portrait of a cat "
    "dog astronaut riding horse mountain lake sunset city street night forest castle dragon robot "
    "highly detailed digital art trending oil canvas cinematic lighting"
).split()
VOCAB_MERGES = 300
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "v_prediction",
}
TURBO_SCHEDULER = {**SD2_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                   "prediction_type": "epsilon"}


def unet_config(family: str = "sd1") -> dict:
    cfg = dict(
        sample_size=16,
        in_channels=9 if family == "inpaint" else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    if family in ("sd2", "turbo"):
        cfg.update(use_linear_projection=True, attention_head_dim=(2, 4), cross_attention_dim=48)
    return cfg


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.18215,
    )


def clip_config(family: str = "sd1", vocab_size: int = 1000) -> dict:
    sd2 = family in ("sd2", "turbo")
    hidden = 48 if sd2 else 32
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def make_pipeline(family: str = "sd1", seed: int = 0):
    """A diffusers StableDiffusionPipeline (or inpainting pipeline) with random weights."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import tempfile

    pad = "!" if family in ("sd2", "turbo") else "<|endoftext|>"  # SD 2.x pads with id 0 ("!")
    tok_dir = Path(tempfile.mkdtemp(prefix="sdonnx-tok-"))
    write_tokenizer(tok_dir, WORDS, VOCAB_MERGES, pad_token=pad)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config(family, len(tokenizer))))
    sched_cfg = dict({"sd2": SD2_SCHEDULER, "turbo": TURBO_SCHEDULER}.get(family, SD1_SCHEDULER))
    cls = {"sd2": DDIMScheduler, "turbo": EulerDiscreteScheduler}.get(family, PNDMScheduler)
    scheduler = cls.from_config({k: v for k, v in sched_cfg.items() if k != "_class_name"})
    pipe_cls = StableDiffusionInpaintPipeline if family == "inpaint" else StableDiffusionPipeline
    pipe = pipe_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(torch.float32)


def save_pipeline(folder: str | Path, family: str = "sd1", seed: int = 0, **save_kwargs) -> Path:
    """Write a tiny random diffusers folder (model_index.json, unet/, vae/, text_encoder/, ...)."""
    folder = Path(folder)
    make_pipeline(family, seed).save_pretrained(folder, **save_kwargs)
    return folder


if __name__ == "__main__":  # pragma: no cover - manual smoke check
    import sys

    out = save_pipeline(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sd1")
    print(json.dumps(json.loads((out / "model_index.json").read_text()), indent=1))
