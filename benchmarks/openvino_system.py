"""The OpenVINO peers for worker.py: optimum-intel's OVStableDiffusionPipeline on an OpenVINO IR folder.

Imported by worker.py in the OpenVINO venv only (benchmarks/peers.py). Static shapes, as FastSD runs it: the
pipeline is reshaped to one prompt at the run's size (U-Net batch 2 for guidance, batch 1 at a guidance scale <= 1,
where diffusers' pipeline drops the unconditional half; text encoder and VAE batch 1) and compiled. A figure whose inputs have another shape (the text encoder at batch 2, the U-Net at batch 1) gets
its part reshaped and recompiled in its untimed `setup`, and the generation's setup puts the pipeline's shapes
back: so only one compiled copy of each part is ever resident, and the peak RSS stays the pipeline's own.
`precision` None keeps OpenVINO's default inference precision (bf16 on a CPU with AVX512-BF16 or AMX);
"f32" sets INFERENCE_PRECISION_HINT. A folder whose VAE is the tiny one (openvino_tiny_vae.py) runs and times it
like the full one: the pipeline takes its scaling factor (1) and downscale from the tiny VAE's config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from sdonnx.figures import NEGATIVE, PROMPT, SEED, StepClock, figure_inputs

TIMESTEP = 500


def openvino_system(folder: str, size: int, steps: int, guidance: float, precision: str | None = None,
                    dynamic: bool = False) -> tuple[dict[str, Callable], StepClock, dict]:
    """{figure: zero-argument call (some with a `setup`)}, the generation's step clock, and facts for the result."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: no hub look-up (none is reachable here)
    from optimum.intel import OVStableDiffusionPipeline, OVStableDiffusionXLPipeline

    if _unet_config(folder).get("time_cond_proj_dim"):
        raise SystemExit("the OpenVINO systems run SD's guided pipeline; an LCM folder is not supported here")
    config = {} if precision is None else {"INFERENCE_PRECISION_HINT": precision}
    xl = (Path(folder) / "text_encoder_2").is_dir()  # SDXL: two text encoders, pooled text and size conditioning
    cls = OVStableDiffusionXLPipeline if xl else OVStableDiffusionPipeline
    pipe = cls.from_pretrained(folder, compile=False, ov_config=config)
    pipe.set_progress_bar_config(disable=True)
    if not dynamic:
        pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
        if guidance <= 1:  # no classifier-free batch (turbo at guidance 0): the pipeline calls its U-Net at batch 1
            pipe.unet.model.reshape(_batch(_shapes(pipe.unet), 1))
    pipe.compile()
    parts = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae_decoder,
             "vae_encoder": pipe.vae_encoder}
    if xl:
        parts["text_encoder_2"] = pipe.text_encoder_2
    own = {name: _shapes(part) for name, part in parts.items()}  # the pipeline's own (static or dynamic) shapes

    ids = pipe.tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=77, truncation=True,
                         return_tensors="np").input_ids
    channels = int(pipe.unet.config["in_channels"])
    ctx_dim = int(pipe.unet.model.input("encoder_hidden_states").get_partial_shape()[-1].get_length())
    pooled = int(pipe.unet.model.input("text_embeds").get_partial_shape()[-1].get_length()) if xl else None
    x = figure_inputs(size, size, pipe.vae_scale_factor, channels, int(pipe.vae_decoder.config["latent_channels"]),
                      ctx_dim, ids, pooled)
    encoders = [(pipe.text_encoder, x["ids"])]
    if xl:
        encoders.append((pipe.text_encoder_2, pipe.tokenizer_2([NEGATIVE, PROMPT], padding="max_length", max_length=77,
                                                               truncation=True, return_tensors="np").input_ids))
    t = np.array([TIMESTEP], np.int64)  # the IR's timestep: int64, shape [1]
    clock = StepClock(back_to_back=True)

    def step_end(p, i, ts, kw):
        clock.tick()
        return kw

    def txt2img(n: int = steps):
        clock.begin()
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n, guidance_scale=guidance, height=size,
             width=size, generator=torch.Generator().manual_seed(SEED), output_type="np",
             callback_on_step_end=step_end)

    def shaped(call: Callable, **shapes: dict) -> Callable:
        """`call` with a setup that gives each named part these input shapes (or the pipeline's own)."""
        def setup():
            for name, part in parts.items():
                _reshape(part, own[name] if dynamic else shapes.get(name, own[name]))
        call.setup = setup
        return call

    def unet(batch: int) -> Callable:
        feeds = dict(sample=x["latents2"][:batch], timestep=t, encoder_hidden_states=x["context2"][:batch])
        if xl:
            feeds.update(text_embeds=x["text_embeds2"][:batch], time_ids=x["time_ids2"][:batch])
        return lambda: pipe.unet(**feeds)

    calls = {
        "text_encoder": shaped(lambda: [enc(input_ids=ids) for enc, ids in encoders],
                               text_encoder={"input_ids": [2, 77]}, text_encoder_2={"input_ids": [2, 77]}),
        "unet_b2": shaped(unet(2), unet=_batch(own["unet"], 2)),
        "unet_b1": shaped(unet(1), unet=_batch(own["unet"], 1)),
        "vae_decode": shaped(lambda: pipe.vae_decoder(latent_sample=x["latents1"])),
        "vae_encode": shaped(lambda: pipe.vae_encoder(sample=x["image"])),
        "txt2img": shaped(txt2img),
    }
    request = pipe.unet.request
    facts = {"inference_precision": request.get_property("INFERENCE_PRECISION_HINT").to_string(),
             "threads": int(request.get_property("INFERENCE_NUM_THREADS")), "static_shapes": not dynamic,
             "vae": _vae_kind(folder), "versions": _versions()}
    return calls, clock, facts


def _unet_config(folder: str) -> dict:
    path = Path(folder) / "unet" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _vae_kind(folder: str) -> str:
    """"tiny" where the folder's VAE is the tiny one (openvino_tiny_vae.py), so the VAE figures time TAESD."""
    config = json.loads((Path(folder) / "vae_decoder" / "config.json").read_text())
    return "tiny" if config.get("_class_name") == "AutoencoderTiny" else "full"


def _shapes(part) -> dict[str, list[int] | None]:
    """Input name -> static shape, or None where a dimension is dynamic."""
    out = {}
    for inp in part.model.inputs:
        shape = inp.get_partial_shape()
        out[inp.get_any_name()] = None if shape.is_dynamic else [d.get_length() for d in shape]
    return out


def _batch(shapes: dict, batch: int) -> dict:
    """The U-Net's shapes at another batch (its timestep stays [1])."""
    return {k: v if v is None or k == "timestep" else [batch, *v[1:]] for k, v in shapes.items()}


def _reshape(part, shapes: dict) -> None:
    """Give a compiled part these static input shapes, recompiling it only if they change; the old compiled model
    is dropped first, so two copies are never resident."""
    if _shapes(part) == shapes or any(v is None for v in shapes.values()):
        return
    part.request = None
    part.model.reshape(shapes)
    part.compile()


def _versions() -> dict[str, str]:
    """The peer's own packages (its venv differs from the harness's)."""
    from importlib.metadata import version

    names = ("openvino", "nncf", "optimum-intel", "optimum", "diffusers", "transformers", "torch")
    return {name: version(name) for name in names}
