"""Train the bundled tiny text-to-image model: a latent diffusion model of coloured shapes.

    python -m sdonnx.export.tiny.train [--out export/tiny/weights] [--vae-steps N] [--unet-steps N]

Writes a diffusers-layout folder (model_index.json, tokenizer/, text_encoder/, vae/, unet/, scheduler/)
that `sdonnx export` reads like any other checkpoint. Stages: tokenizer, VAE, latent scale, then the
text encoder and U-Net together on the v-prediction loss (Salimans & Ho 2022), with captions dropped a
fraction of the time so that classifier-free guidance works (Ho & Salimans 2022). v-prediction because
with noise prediction the loss hardly weighs what the model believes about the clean image at high
noise levels, and the picture's global colour (here: the background) is decided there: an
epsilon-trained run ignored the background word entirely.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdonnx.model import DEFAULTS

from ..models import AutoencoderKL, CLIPConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig
from .shapes import all_scenes, render, vocabulary
from .vocab import write_tokenizer

RESOLUTION = 64
DEFAULT_OUT = Path(__file__).parent / "weights"
# DDPM's linear schedule (Ho et al. 2020) rather than SD's scaled_linear: it leaves ~0.6% of the signal at
# t=999 instead of ~7%, so the model cannot read the image's mean colour (here: the background) off the
# noise in training and must take it from the text (the problem offset noise works around in SD).
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
    "trained_betas": None,
}
VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=RESOLUTION,
)
# Cross-attention only at the coarser level: self-attention over all 16x16 latents tripled the
# training step's cost for no visible gain on this data.
UNET = UNetConfig(
    sample_size=RESOLUTION // 4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=2, norm_num_groups=32,
)
CAPTION_DROPOUT = 0.1


def images_and_captions() -> tuple[torch.Tensor, list[str]]:
    """All scenes of the language rendered once: (N, 3, 64, 64) in [-1, 1] and their captions."""
    scenes = all_scenes()
    pix = np.stack([np.asarray(render(s, RESOLUTION), dtype=np.float32) for s in scenes])
    return torch.from_numpy(pix.transpose(0, 3, 1, 2) / 127.5 - 1.0), [s.caption() for s in scenes]


def load_vae(folder: Path) -> AutoencoderKL:
    """The VAE of an earlier run's output folder (with the scaling factor it measured)."""
    vae = AutoencoderKL(VAEConfig.from_dict(json.loads((folder / "vae" / "config.json").read_text())))
    vae.load_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), strict=True)
    return vae.eval()


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(images: torch.Tensor, steps: int, batch: int, gen: torch.Generator) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) with a small KL term, as the SD VAE was trained (minus the GAN)."""
    vae = AutoencoderKL(VAE)

    def loss() -> torch.Tensor:
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-5 * kl

    _minimize(list(vae.parameters()), loss, steps, 1e-3, "vae")
    return vae.eval()


def _minimize(params: list[torch.Tensor], loss, steps: int, peak_lr: float, desc: str) -> None:
    """AdamW (no weight decay) on `loss()` for `steps` steps at the `lr_at` schedule, with a progress bar."""
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value.item():.4f}")


def finetune_decoder(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int,
                     gen: torch.Generator) -> AutoencoderKL:
    """More reconstruction training for the decoder alone, the encoder frozen: the latent space (and so a
    U-Net trained on it) stays valid. A short joint VAE run decodes small circles as rounded squares."""
    with torch.no_grad():
        moments = [vae.encode(chunk) for chunk in images.split(256)]
    means = torch.cat([m for m, _ in moments])
    stds = torch.cat([torch.exp(0.5 * lv) for _, lv in moments])

    def loss() -> torch.Tensor:
        pick = torch.randint(len(images), (batch,), generator=gen)
        z = means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=gen)
        recon, x = vae.decode(z), images[pick]
        return F.l1_loss(recon, x) + F.mse_loss(recon, x)

    vae.train()
    _minimize(list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()), loss, steps, 5e-4,
              "vae decoder")
    return vae.eval()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk)[0] for chunk in images.split(256)])


def train_denoiser(
    latents: torch.Tensor, captions: list[str], tokenizer_dir: Path, steps: int, batch: int, gen: torch.Generator,
    checkpoint=None, every: int = 1000, init: Path | None = None, peak_lr: float = 5e-4,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Text encoder and U-Net together on the v-prediction loss; EMA weights are what ships."""
    from sdonnx.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_dir(tokenizer_dir)
    torch.manual_seed(gen.initial_seed())
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    clip = CLIPTextModel(clip_config(len(vocab)))
    unet = UNet2DConditionModel(UNET)
    if init is not None:  # continue an earlier run (its EMA weights) instead of starting from scratch
        clip.load_state_dict(load_file(init / "text_encoder" / "model.safetensors"), strict=True)
        unet.load_state_dict(load_file(init / "unet" / "diffusion_pytorch_model.safetensors"), strict=True)
    ids = torch.from_numpy(tokenizer(captions))
    empty = torch.from_numpy(tokenizer([""]))[0]
    betas = torch.linspace(SCHEDULER["beta_start"], SCHEDULER["beta_end"], SCHEDULER["num_train_timesteps"],
                           dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    params = list(clip.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=1e-2)
    ema = [copy.deepcopy(clip).eval().requires_grad_(False), copy.deepcopy(unet).eval().requires_grad_(False)]
    bar = tqdm(range(steps), desc="unet+clip", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        pick = torch.randint(len(latents), (batch,), generator=gen)
        x0, tokens = latents[pick], ids[pick].clone()
        tokens[torch.rand(batch, generator=gen) < CAPTION_DROPOUT] = empty
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(unet(noisy, t, clip(tokens)[0]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, live in zip(ema, (clip, unet)):
                for s, p in zip(shadow.parameters(), live.parameters()):
                    s.lerp_(p, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(ema[0], ema[1], step + 1)
    return ema[0], ema[1]


def clip_config(vocab_size: int) -> CLIPConfig:
    return CLIPConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
        num_attention_heads=4, hidden_act="quick_gelu", max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def save_component(folder: Path, config: dict, module: torch.nn.Module, weights_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / weights_name)


def write_folder(out: Path, tokenizer_dir: Path, clip: CLIPTextModel, vae: AutoencoderKL,
                 unet: UNet2DConditionModel, report: dict) -> None:
    """A diffusers-layout folder, written beside `out` and renamed into place when complete."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    save_component(tmp / "text_encoder", clip.config.to_dict(), clip, "model.safetensors")
    save_component(tmp / "vae", vae.config.to_dict(), vae, "diffusion_pytorch_model.safetensors")
    save_component(tmp / "unet", unet.config.to_dict(), unet, "diffusion_pytorch_model.safetensors")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.2",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    # what the bundled folder generates with when the user names nothing (the defaults table's "tiny" row, chosen
    # on the step-count/guidance sweep in benchmarks/tiny_quality.py); the exporter copies it into sdonnx.json
    tiny = DEFAULTS["tiny"]
    suggested = {"steps": tiny.steps, "guidance": tiny.guidance, "scheduler": tiny.scheduler}
    (tmp / "sdonnx_defaults.json").write_text(json.dumps(suggested, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--vae-steps", default=800, show_default=True)
@click.option("--decoder-steps", default=1500, show_default=True,
              help="Decoder-only fine-tuning after the VAE stage (0: none; the latent space does not change).")
@click.option("--unet-steps", default=8000, show_default=True,
              help="Text encoder + U-Net steps (the shipped weights: 8000 in one run, both cores, 61.5 min here).")
@click.option("--batch", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--save-every", default=0, help="Also write intermediate folders OUT.stepN every N steps.")
@click.option("--vae-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Reuse the VAE of an earlier run's folder instead of training one (same seed: same result).")
@click.option("--continue-from", "continue_from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Start the text encoder and U-Net (and VAE) from an earlier run's folder.")
@click.option("--lr", default=5e-4, show_default=True, help="Peak learning rate of the denoiser stage.")
@click.option("--threads", default=0, help="Torch threads (0: torch's default). One thread is fastest on a busy machine.")
def main(out: Path, vae_steps: int, decoder_steps: int, unet_steps: int, batch: int, seed: int, save_every: int, threads: int,
         vae_from: Path | None, continue_from: Path | None, lr: float) -> None:
    """Train the tiny shapes model from scratch and write its diffusers-layout folder."""
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    torch.manual_seed(seed)
    images, captions = images_and_captions()
    tokenizer_dir = out.with_name(out.name + ".tokenizer")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    write_tokenizer(tokenizer_dir, vocabulary(), num_merges=200)
    vae_from = vae_from or continue_from
    if vae_from is None:
        vae = train_vae(images, vae_steps, 16, torch.Generator().manual_seed(seed))
        latents = encode_all(vae, images)
        vae.config = dataclasses.replace(vae.config, scaling_factor=round(float(1.0 / latents.std()), 5))
    else:
        vae = load_vae(vae_from)
        latents = encode_all(vae, images)
    if decoder_steps:
        vae = finetune_decoder(vae, images, decoder_steps, 32, torch.Generator().manual_seed(seed + 2))
    vae_seconds = time.time() - start
    with torch.no_grad():
        recon_err = float((vae.decode(latents[:64]) - images[:64]).abs().mean())
    report = {
        "seed": seed, "vae_steps": vae_steps, "decoder_steps": decoder_steps, "unet_steps": unet_steps, "batch": batch, "lr": lr,
        "continued_from": None if continue_from is None else json.loads((continue_from / "training.json").read_text()),
        "vae_l1_on_training_images": round(recon_err, 5), "scaling_factor": vae.config.scaling_factor,
        "vae_seconds": round(vae_seconds),
        "threads": torch.get_num_threads(),
    }

    def checkpoint(clip, unet, step):
        write_folder(out.with_name(out.name + f".step{step}"), tokenizer_dir, clip, vae, unet, dict(report, unet_steps=step))

    gen = torch.Generator().manual_seed(seed + 1)
    clip, unet = train_denoiser(latents * vae.config.scaling_factor, captions, tokenizer_dir, unet_steps, batch, gen,
                                checkpoint if save_every else None, save_every, continue_from, lr)
    report["total_seconds"] = round(time.time() - start)
    write_folder(out, tokenizer_dir, clip, vae, unet, report)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    click.echo(json.dumps(report))


if __name__ == "__main__":
    main()
