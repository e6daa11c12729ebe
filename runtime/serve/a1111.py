"""AUTOMATIC1111's /sdapi/v1 request and response shapes, mapped to a worker Job and back.

Field names and defaults are A1111's (its StableDiffusionProcessing dataclass and API models): a field a client
leaves out gets A1111's default (steps 50, cfg_scale 7, 512x512, sampler Euler), not the model folder's. Fields we
do not implement are accepted, and listed in `info.ignored` when they are set to something that would matter."""

from __future__ import annotations

import math

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import a1111 as names
from .. import __version__
from ..errors import SdonnxError
from ..pipeline import Settings
from .codec import image_from_base64, infotext
from .worker import Job, check_size, seeds_from

MAX_IMAGES = 16  # batch_size x n_iter of one request

# A1111's fields shared by both tasks, with its defaults
COMMON: dict[str, Any] = dict(
    prompt="", negative_prompt="", styles=None, seed=-1, subseed=-1, subseed_strength=0, seed_resize_from_h=-1,
    seed_resize_from_w=-1, sampler_name=None, scheduler=None, batch_size=1, n_iter=1, steps=50, cfg_scale=7.0,
    width=512, height=512, restore_faces=None, tiling=None, do_not_save_samples=False, do_not_save_grid=False,
    eta=None, s_min_uncond=None, s_churn=None, s_tmax=None, s_tmin=None, s_noise=None, override_settings=None,
    override_settings_restore_afterwards=True, refiner_checkpoint=None, refiner_switch_at=None,
    disable_extra_networks=False, comments=None, sampler_index="Euler", script_name=None, script_args=[],
    send_images=True, save_images=False, alwayson_scripts={}, force_task_id=None, infotext=None,
)
TXT2IMG: dict[str, Any] = dict(
    COMMON, denoising_strength=0, enable_hr=False, firstphase_width=0, firstphase_height=0, hr_scale=2.0,
    hr_upscaler=None, hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, hr_checkpoint_name=None,
    hr_sampler_name=None, hr_scheduler=None, hr_prompt="", hr_negative_prompt="", firstpass_image=None,
)
IMG2IMG: dict[str, Any] = dict(
    COMMON, init_images=None, resize_mode=0, image_cfg_scale=None, mask=None, mask_blur_x=4, mask_blur_y=4,
    mask_blur=None, mask_round=True, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=0,
    inpainting_mask_invert=0, initial_noise_multiplier=None, latent_mask=None, denoising_strength=0.75,
    include_init_images=False,
)
# fields we act on; the others are accepted and reported when set
USED = {"prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
        "steps", "cfg_scale", "width", "height", "override_settings", "send_images", "init_images", "mask",
        "denoising_strength", "inpainting_mask_invert", "resize_mode", "inpainting_fill"}
# set or not, these change nothing here: we never save, and there is nothing to restore or to tag
NO_EFFECT = {"do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards", "force_task_id",
             "include_init_images", "comments", "mask_blur_x", "mask_blur_y", "mask_blur", "mask_round",
             "inpaint_full_res", "inpaint_full_res_padding"}
CLIP_SKIP = "CLIP_stop_at_last_layers"


@dataclass
class Parsed:
    job: Job
    parameters: dict  # A1111's `parameters` echo: the request over the defaults
    ignored: list[str]
    send_images: bool


MAX_STEPS = 1000  # a request's sampling steps: more is a mistake or an attack on a shared server


def _number(body: dict, key: str, default: Any, kind: str) -> float:
    """A JSON number or numeric string as a float; `kind` names what it must be in the one-line error."""
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SdonnxError(f"{key} must be {kind}, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise SdonnxError(f"{key} must be {kind}, got {value!r}") from None


def _int(body: dict, key: str, default: Any) -> int:
    number = _number(body, key, default, "a whole number")
    if not math.isfinite(number) or number != int(number):
        raise SdonnxError(f"{key} must be a whole number, got {body.get(key, default)!r}")
    return int(number)


def _float(body: dict, key: str, default: Any) -> float:
    number = _number(body, key, default, "a number")
    if not math.isfinite(number):
        raise SdonnxError(f"{key} must be a finite number, got {body.get(key, default)!r}")
    return number


def _str(body: dict, key: str, default: str | None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise SdonnxError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _set(value: Any, default: Any) -> bool:
    """Whether a field's value asks for something (a client sending every default asks for nothing)."""
    return value != default and value not in (None, False, 0, "", [], {})


def sampler(body: dict) -> str:
    """Our scheduler for the request's sampler_name (else sampler_index) and schedule type."""
    name = _str(body, "sampler_name", None) or _str(body, "sampler_index", "Euler") or "Euler"
    try:
        return names.scheduler_of(name, _str(body, "scheduler", None))
    except names.SamplerNameError as err:
        raise SdonnxError(str(err)) from None


def _overrides(body: dict, options: dict, model: str, clip_skip_ok: bool) -> tuple[int | None, list[str]]:
    """(clip skip, ignored override keys) from override_settings over the server's options."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise SdonnxError("override_settings must be an object")
    merged, ignored = {**options, **overrides}, []
    clip = merged.get(CLIP_SKIP)
    clip_skip = None
    if clip is not None:
        clip_skip = _int(merged, CLIP_SKIP, 1)
        if clip_skip < 1:
            raise SdonnxError(f"{CLIP_SKIP} must be at least 1, got {clip_skip}")
        if not clip_skip_ok:
            if clip_skip != 1:
                ignored.append(f"override_settings.{CLIP_SKIP}")
            clip_skip = None
    for key, value in overrides.items():
        if key == CLIP_SKIP:
            continue
        if key == "sd_model_checkpoint" and value in (None, "", model):
            continue
        ignored.append(f"override_settings.{key}")
    return clip_skip, ignored


def check_options(body: dict, model: str) -> None:
    """What POST /sdapi/v1/options may set: only the loaded model, and a whole clip skip of at least 1."""
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint not in (None, "", model):
        raise SdonnxError(f"model {checkpoint!r} is not loaded; this server holds only {model!r}")
    if CLIP_SKIP in body:
        _overrides({"override_settings": {CLIP_SKIP: body[CLIP_SKIP]}}, {}, model, True)


def parse(body: dict, task: str, options: dict, model: str, max_pixels: int | None,
          clip_skip_ok: bool) -> Parsed:
    """A /sdapi/v1/txt2img or img2img body -> the job to run, or a one-line SdonnxError."""
    defaults = TXT2IMG if task == "txt2img" else IMG2IMG
    prompt, negative = _str(body, "prompt", "") or "", _str(body, "negative_prompt", "") or ""
    steps, width, height = _int(body, "steps", 50), _int(body, "width", 512), _int(body, "height", 512)
    if not 1 <= steps <= MAX_STEPS:
        raise SdonnxError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    count = _int(body, "batch_size", 1) * _int(body, "n_iter", 1)
    if not 1 <= count <= MAX_IMAGES:
        raise SdonnxError(f"batch_size x n_iter must be between 1 and {MAX_IMAGES}, got {count}")
    seeds = seeds_from(_int(body, "seed", -1), count)
    clip_skip, ignored = _overrides(body, options, model, clip_skip_ok)
    job = Job("txt2img", prompt, negative, steps, _float(body, "cfg_scale", 7.0), sampler(body), seeds, width, height,
              clip_skip=clip_skip)
    check_size(width, height, max_pixels)
    if task == "img2img":
        _image_inputs(body, job)
    ignored += [k for k, v in body.items() if k not in USED and k not in NO_EFFECT and _set(v, defaults.get(k))]
    if task == "img2img" and job.mask is not None and _int(body, "inpainting_fill", 0) != 1:
        ignored.append("inpainting_fill")  # we always start from the original image ("original", 1)
    if task == "img2img" and _int(body, "resize_mode", 0) != 0:
        ignored.append("resize_mode")  # we always resize to width x height ("Just resize", 0)
    parameters = {**defaults, **body, "seed": seeds[0]}
    for key in ("init_images", "mask"):  # echoing megabytes of base64 back helps no client
        if parameters.get(key):
            parameters[key] = None
    return Parsed(job, parameters, sorted(set(ignored)), bool(body.get("send_images", True)))


def _image_inputs(body: dict, job: Job) -> None:
    """init_images, mask and denoising_strength of an img2img body into the job."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise SdonnxError("init_images must be a list of one or more base64-encoded images")
    job.task = "img2img"
    job.image = image_from_base64(images[0], "init_images[0]").resize((job.width, job.height))
    job.strength = _float(body, "denoising_strength", 0.75)
    if not 0.0 < job.strength <= 1.0:
        raise SdonnxError(f"denoising_strength must be in (0, 1], got {job.strength}")
    if body.get("mask"):
        mask = image_from_base64(body["mask"], "mask", "L").resize((job.width, job.height))
        if _int(body, "inpainting_mask_invert", 0):
            mask = mask.point(lambda v: 255 - v)
        job.task, job.mask = "inpaint", mask


def response(parsed: Parsed, images: list[str], served_by: dict, interrupted: bool = False) -> dict:
    """The {images, parameters, info} of a finished job; info is a JSON string, as A1111 sends it."""
    job, settings = parsed.job, parsed.job.settings
    first: Settings | None = settings[0] if settings else None
    info = dict(
        prompt=job.prompt, all_prompts=[job.prompt] * len(job.seeds), negative_prompt=job.negative_prompt,
        all_negative_prompts=[job.negative_prompt] * len(job.seeds), seed=job.seeds[0], all_seeds=job.seeds,
        subseed=-1, all_subseeds=[-1] * len(job.seeds), subseed_strength=0, width=job.width, height=job.height,
        sampler_name=names.sampler_of(job.scheduler)[0], scheduler=names.sampler_of(job.scheduler)[1],
        cfg_scale=job.guidance, steps=job.steps, batch_size=len(job.seeds), restore_faces=False,
        face_restoration_model=None, sd_model_name=first.model if first else None, sd_model_hash=None,
        sd_vae_name=None, sd_vae_hash=None, seed_resize_from_w=-1, seed_resize_from_h=-1,
        denoising_strength=job.strength, extra_generation_params={}, index_of_first_image=0,
        infotexts=[infotext(s) for s in settings], styles=[], job_timestamp=time.strftime("%Y%m%d%H%M%S"),
        clip_skip=job.clip_skip or 1, is_using_inpainting_conditioning=job.task == "inpaint",
        version=f"sdonnx {__version__}", ignored=parsed.ignored, interrupted=interrupted,
        batched_with=job.batched_with, served_by=served_by,
    )
    return {"images": images if parsed.send_images else [], "parameters": parsed.parameters,
            "info": json.dumps(info)}


def samplers() -> list[dict]:
    """/sdapi/v1/samplers: A1111's names of the samplers we run, `DPM++ 2M Karras` as its own entry too."""
    out, seen = [], set()
    for ours, theirs in names.SAMPLERS.items():
        name = theirs + (" Karras" if ours in names.KARRAS else "")
        if name in seen:
            continue
        seen.add(name)
        options = {"scheduler": "karras"} if ours in names.KARRAS else {}
        out.append({"name": name, "aliases": [ours], "options": options})
    return out


def schedulers() -> list[dict]:
    """/sdapi/v1/schedulers: the schedule types we tell apart."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": ["karras"], "default_rho": 7.0,
             "need_inner_model": False}]


def sd_models(model: str, path: str) -> list[dict]:
    """/sdapi/v1/sd-models: the one folder this server holds."""
    return [{"title": model, "model_name": model, "hash": None, "sha256": None, "filename": path, "config": None}]


def progress(step: int, total: int, started: float, jobs: int, queued: int, interrupted: bool,
             current_image: str | None, now: Callable[[], float] = time.time) -> dict:
    """/sdapi/v1/progress in A1111's shape: progress in [0, 1], eta_relative seconds, a state snapshot."""
    state = dict(skipped=False, interrupted=interrupted, stopping_generation=False, job="" if not jobs else "txt2img",
                 job_count=(1 if jobs else 0) + queued, job_timestamp="0", job_no=0, sampling_step=step,
                 sampling_steps=total)
    if not jobs:
        return dict(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
    done = 0.01 + (step / total if total else 0.0)  # A1111 starts at 0.01 so the eta never divides by zero
    elapsed = now() - started
    return dict(progress=min(done, 1.0), eta_relative=max(elapsed / done - elapsed, 0.0), state=state,
                current_image=current_image, textinfo=None)
