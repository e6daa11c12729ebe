"""One denoising loop over a model callable, in k-diffusion's manner: `denoise(scheduler, start, predict, rng)`.

`predict(k, sample, t)` returns the model output for step k; guidance, the LCM guidance input and the step cache
are builders around a U-Net graph that return such callables, so the loop stays the same for every model kind,
and the exporter's calibration runs it too, with a PyTorch U-Net behind the same callables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Graph = Callable[..., dict]  # a U-Net: named inputs -> {"out_sample": ..., other outputs}
Call = Callable[..., tuple]  # (sample, t, **more inputs) -> (prediction, the graph's outputs)
Predict = Callable[[int, np.ndarray, float], np.ndarray]  # (step number, scaled sample, timestep) -> prediction
Callback = Callable[[int, int, np.ndarray], None]


@dataclass
class Start:
    """How a run begins: its first timestep index, initial latents, and what img2img/inpaint add."""

    index: int
    latents: np.ndarray
    extra: np.ndarray | None = None  # [mask, masked-image latents] for 9-channel U-Nets
    keep: np.ndarray | None = None  # clean latents re-imposed outside the mask (4-channel inpainting)
    keep_mask: np.ndarray | None = None  # latent-size mask, 1 = repaint
    noise: np.ndarray | None = None  # the noise `keep` is re-noised with
    paste: tuple | None = None  # (original [0,1] HWC, pixel mask HW1) pasted back at the end


def denoise(sched, start: Start, predict: Predict, rng: np.random.Generator,
            callback: Callback | None = None) -> np.ndarray:
    """The one denoising loop; txt2img, img2img and inpainting differ only in `start`."""
    latents = start.latents
    total = len(sched.timesteps) - start.index
    for k, i in enumerate(range(start.index, len(sched.timesteps))):
        sample = sched.scale_model_input(latents, i)
        if start.extra is not None:
            sample = np.concatenate([sample, start.extra], axis=1)
        pred = predict(k, sample, sched.timesteps[i])
        noise = rng.standard_normal(latents.shape, dtype=np.float32) if sched.needs_noise else None
        latents = sched.step(pred, i, latents, noise).astype(np.float32)
        if start.keep_mask is not None:
            latents = reimpose(sched, start, latents, i)
        if callback is not None:
            callback(k, total, latents)
    return latents


def reimpose(sched, start: Start, latents: np.ndarray, i: int) -> np.ndarray:
    """Outside the mask, put back the original latents noised to the next step's level (clean at the end)."""
    known = start.keep
    if i + 1 < len(sched.timesteps):
        known = sched.add_noise(start.keep, start.noise, i + 1)
    m = start.keep_mask
    return ((1.0 - m) * known + m * latents).astype(np.float32)


# ---- model callables ------------------------------------------------------------------------------------


def guided(unet: Graph, context: np.ndarray, w: float, split: bool = False, **inputs: np.ndarray) -> Call:
    """The U-Net conditioned on `context` (plus constant `inputs`), as call(sample, t, **more).

    w > 1: classifier-free guidance (Ho & Salimans 2022), `context` being [uncond, cond]: one U-Net call on the
    doubled batch, then uncond + w (cond - uncond). split: two calls of half the batch instead (half the
    activation memory; low-memory mode). w <= 1: one conditional call."""

    def call(sample: np.ndarray, t: float, **more: np.ndarray) -> tuple[np.ndarray, dict]:
        timestep = np.float64(t)
        feeds = {**inputs, **more}
        if w <= 1.0:
            out = unet(sample=sample, timestep=timestep, encoder_hidden_states=context, **feeds)
            return out["out_sample"], out
        if split:
            halves = [unet(sample=sample, timestep=timestep, encoder_hidden_states=part,
                           **{k: np.split(v, 2)[i] for k, v in feeds.items()})
                      for i, part in enumerate(np.split(context, 2))]
            out = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
        else:
            out = unet(sample=np.concatenate([sample, sample]), timestep=timestep, encoder_hidden_states=context,
                       **feeds)
        uncond, cond = np.split(out["out_sample"], 2)
        return uncond + w * (cond - uncond), out

    return call


def every_step(call: Call) -> Predict:
    """The same model call at every step."""
    return lambda k, sample, t: call(sample, t)[0]


def step_cache(full: Call, shallow: Call, interval: int) -> Predict:
    """DeepCache (Ma et al. 2023): the full U-Net every `interval`-th step, its deep features reused between by
    the shallow graph."""
    deep: dict[str, np.ndarray] = {}

    def predict(k: int, sample: np.ndarray, t: float) -> np.ndarray:
        if k % interval == 0:
            pred, out = full(sample, t)
            deep["features"] = out["deep_features"]
            return pred
        return shallow(sample, t, deep_features=deep["features"])[0]

    return predict


def conditioning(w: float, lcm_dim: int | None, batch: int) -> tuple[float, dict[str, np.ndarray]]:
    """(classifier-free scale, constant U-Net inputs) for guidance scale w.

    An LCM-distilled U-Net (lcm_dim: its time_cond_proj_dim) takes w as its `timestep_cond` input instead, and
    runs one conditional call per step."""
    if lcm_dim:
        return 1.0, {"timestep_cond": guidance_embedding(w, lcm_dim, batch)}
    return w, {}


def guidance_embedding(w: float, dim: int, batch: int) -> np.ndarray:
    """[batch, dim] embedding of guidance scale w that an LCM-distilled U-Net takes as `timestep_cond` (Luo et al.
    2023): sines of 1000 (w - 1) at geometric frequencies, then cosines, in fp32 as diffusers computes it."""
    half = dim // 2
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    args = np.float32(w - 1.0) * np.float32(1000.0) * np.exp(np.arange(half, dtype=np.float32) * -step)
    emb = np.concatenate([np.sin(args), np.cos(args), np.zeros(dim % 2, np.float32)]).astype(np.float32)
    return np.repeat(emb[None], batch, axis=0)
