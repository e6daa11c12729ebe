"""Tiny SDXL pipelines with random weights, built with diffusers/transformers (test references).

Families: "sdxl" (SDXL base: two text encoders, the second with a projection; a U-Net with per-block transformer
depths and the text_time addition embedding; Euler with leading timesteps), "sdxl-turbo" (the same architecture
with SDXL-Turbo's scheduler: Euler ancestral, trailing timesteps) and "sdxl-inpaint" (a 9-channel U-Net).
The block layout mirrors SDXL's: no attention in the first level, more transformer layers further down.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tiny_sd import VOCAB_MERGES, WORDS, vae_config

from sdonnx.export.tiny.vocab import write_tokenizer

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
SDXL_TURBO_SCHEDULER = {**SDXL_SCHEDULER, "_class_name": "EulerAncestralDiscreteScheduler",
                        "timestep_spacing": "trailing"}
TIME_EMBED = 8  # addition_time_embed_dim (256 in SDXL)
TEXT_1, TEXT_2 = 32, 32  # hidden sizes of the two text encoders (768 and 1280 in SDXL)


def unet_config(family: str = "sdxl") -> dict:
    return dict(
        sample_size=16,
        in_channels=9 if family == "sdxl-inpaint" else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TEXT_1 + TEXT_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_2 + 6 * TIME_EMBED,
        norm_num_groups=32,
    )


def distilled_unet_config(kind: str) -> dict:
    """Tiny U-Nets laid out like SDXL's distillations, from the facts of their unet/config.json: three levels of two
    resnets, no mid-block transformer (UNetMidBlock2D: one resnet), and per-layer transformer depths that differ
    between the down and up paths. "ssd-1b": down (-, [2, 2], [4, 4]), up ([4, 4, 10], [2, 1, 1], -);
    "vega": down (-, [1, 1], [2, 2]), up ([2, 2, 2], [1, 1, 1], -). Depths here are scaled down (10 -> 3, 4 -> 2)."""
    depths = {"ssd-1b": ((1, (2, 2), (2, 2)), ((2, 2, 3), (2, 1, 1), 1)),
              "vega": ((1, (1, 1), (2, 2)), ((2, 2, 2), (1, 1, 1), 1))}[kind]
    return dict(
        unet_config("sdxl"),
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=depths[0],
        reverse_transformer_layers_per_block=depths[1],
        mid_block_type="UNetMidBlock2D",
    )


def clip_config(hidden: int, vocab_size: int, act: str) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _tokenizer(pad: str):
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="sdonnx-tok-"))
    write_tokenizer(folder, WORDS, VOCAB_MERGES, pad_token=pad)
    return CLIPTokenizer.from_pretrained(folder)


def make_pipeline(family: str = "sdxl", seed: int = 0):
    """A diffusers StableDiffusionXLPipeline (or its inpainting pipeline) with random weights."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer("<|endoftext|>")
    tokenizer_2 = _tokenizer("!")  # SDXL's OpenCLIP tokenizer pads with "!" (id 0)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
    vae = AutoencoderKL(**{**vae_config(), "scaling_factor": 0.13025})
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config(TEXT_1, len(tokenizer), "quick_gelu")))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config(TEXT_2, len(tokenizer_2), "gelu")))
    turbo = family == "sdxl-turbo"
    sched_cfg = SDXL_TURBO_SCHEDULER if turbo else SDXL_SCHEDULER
    cls = EulerAncestralDiscreteScheduler if turbo else EulerDiscreteScheduler
    scheduler = cls.from_config({k: v for k, v in sched_cfg.items() if k != "_class_name"})
    pipe_cls = StableDiffusionXLInpaintPipeline if family == "sdxl-inpaint" else StableDiffusionXLPipeline
    pipe = pipe_cls(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                    tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    return pipe.to(torch.float32)


def save_pipeline(folder: str | Path, family: str = "sdxl", seed: int = 0, **save_kwargs) -> Path:
    """Write a tiny random diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder(_2)/, ...)."""
    folder = Path(folder)
    make_pipeline(family, seed).save_pretrained(folder, **save_kwargs)
    return folder


if __name__ == "__main__":  # pragma: no cover - manual smoke check
    import sys

    out = save_pipeline(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sdxl")
    print(json.dumps(json.loads((out / "model_index.json").read_text()), indent=1))
