"""One system in its own process: load, warm up, time each figure, print one JSON line, exit.

    python benchmarks/worker.py SYSTEM FOLDER --size 256 --steps 3 [--repeat 1] [--figures unet_b2,txt2img]
                                [--cache-interval K] [--low-memory] [--provider cuda]

SYSTEM: sdonnx-* (our runtime on one of our exports, e.g. sdonnx-fp32, sdonnx-int8, sdonnx-int8-cache),
optimum-fp32 (ORTStableDiffusionPipeline on optimum's export), diffusers-fp32 (StableDiffusionPipeline on
PyTorch, CPU, torch.inference_mode), diffusers-fp16 (the same in half precision; on a GPU only), openvino-*
(optimum-intel's OVStableDiffusionPipeline on an OpenVINO IR folder, static shapes; run by the OpenVINO venv's
python, see peers.py; --inference-precision f32 overrides OpenVINO's default, bf16 where the CPU has it), sdcpp-*
(stable-diffusion.cpp's binding on the folder's model.gguf, in the sdcpp venv: whole generations only, see
sdcpp_system.py).
--provider cuda runs our runtime on ONNX Runtime's CUDA execution provider and diffusers on the GPU (each call
synchronised before its clock stops). --cache-interval and --low-memory apply to our runtime only; in low-memory
mode only the txt2img figure is timed (standalone component calls would keep sessions open).
A fresh process per run makes the peak RSS this system's own; run.py interleaves the systems.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import numpy as np

from sdonnx import figures
from sdonnx.figures import NEGATIVE, PROMPT, SEED, StepClock, figure_inputs
from sdonnx.model import DEFAULTS
from sdonnx.system import peak_rss_mb

# every system runs SD's default guidance (LCM folders too: the same scale reaches their U-Net as an input)
GUIDANCE, TIMESTEP = DEFAULTS["sd"].guidance, 500
FIGURES = (*figures.FIGURES, "txt2img")
PEERS = ("optimum-fp32", "diffusers-fp32", "diffusers-fp16", "optimum-fp32-tiny", "diffusers-fp32-tiny")
OPENVINO = "openvino-"  # any openvino-<name>: the folder decides what runs, the options how
SDCPP = "sdcpp-"  # any sdcpp-<weight type>: the folder's GGUF file decides


def gpu_used_mb() -> float | None:
    """Memory in use on GPU 0 (NVML), or None without an NVIDIA GPU and nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:  # no driver, no GPU, no pynvml: the figure is simply absent
        return None


# ---- the systems: each returns {figure: zero-argument callable}, and the back-to-back StepClock of its txt2img

def sdonnx_system(folder: str, size: int, steps: int, cache_interval: int = 1, low_memory: bool = False,
                  provider: str = "cpu", guidance: float = GUIDANCE, vae: str = "full",
                  inference_precision: str | None = None) -> tuple[dict[str, Callable], StepClock]:
    from sdonnx.model import scheduler_name
    from sdonnx.pipeline import Pipeline

    options = {"provider_options": {"INFERENCE_PRECISION_HINT": inference_precision}} if inference_precision else {}
    pipe = Pipeline.load(folder, provider=provider, low_memory=low_memory, **options)
    clock = StepClock(back_to_back=True)  # as the peers' steps are timed: between consecutive callbacks
    # the scheduler class of the folder's scheduler_config.json, which diffusers and optimum run (PNDM for SD 1.5,
    # DDIM for the bundled model), not the folder's suggested default: the same number of U-Net calls for all
    scheduler = scheduler_name(pipe.info.scheduler_config)
    prompt, negative = figures.prompts(pipe)

    def txt2img(n: int = steps):
        pipe.forget_prompts()  # the peers encode the prompt on every call; a repeated prompt's cache is not timed
        clock.begin()
        pipe.txt2img(prompt, negative, steps=n, guidance=guidance, scheduler=scheduler, seed=SEED, width=size,
                     height=size, callback=clock.tick, output_type="np", cache_interval=cache_interval, vae=vae)

    if low_memory:  # no component stays open between calls: only the whole generation is meaningful
        return {"txt2img": txt2img}, clock
    return {**figures.component_calls(pipe, size, size, figures.FIGURES, guidance, vae), "txt2img": txt2img}, clock


def torch_system(system: str, folder: str, size: int, steps: int, provider: str = "cpu", guidance: float = GUIDANCE,
                 vae: str = "full") -> tuple[dict[str, Callable], StepClock]:
    """diffusers on PyTorch, or optimum's ORT pipeline (which runs diffusers' loop over ORT components).

    vae "tiny": diffusers with pipe.vae = AutoencoderTiny from the `taesd` folder beside the weights; optimum's
    folder then is one whose vae_decoder/vae_encoder graphs are the tiny VAE's (prepare.py makes it)."""
    import torch

    device = "cuda" if provider == "cuda" else "cpu"
    dtype = torch.float16 if system.endswith("fp16") else torch.float32
    if dtype == torch.float16 and device == "cpu":
        raise SystemExit(f"{system} runs on a GPU only: add --provider cuda")

    lcm = _unet_config(folder).get("time_cond_proj_dim")  # LCM-distilled: its own pipeline, guidance an input
    # SDXL: the U-Net also takes the pooled text embedding and the size conditioning (added_cond_kwargs)
    pooled = _unet_config(folder).get("projection_class_embeddings_input_dim")
    pooled = pooled - 6 * _unet_config(folder)["addition_time_embed_dim"] if pooled else None
    if system.startswith("optimum"):
        from optimum.onnxruntime import (ORTLatentConsistencyModelPipeline, ORTStableDiffusionPipeline,
                                         ORTStableDiffusionXLPipeline)

        cls = ORTStableDiffusionXLPipeline if pooled else ORTLatentConsistencyModelPipeline if lcm \
            else ORTStableDiffusionPipeline
        pipe = cls.from_pretrained(folder)
        te, unet, dec, enc = pipe.text_encoder, pipe.unet, pipe.vae_decoder, pipe.vae_encoder
        ctx_dim = int(pipe.unet.config.cross_attention_dim)
        decode = lambda z: dec(latent_sample=z)  # noqa: E731
        encode = lambda im: enc(sample=im)  # noqa: E731
    else:
        from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        if pooled:
            pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        else:
            cls = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
            pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                       torch_dtype=dtype).to(device)
        te, unet = pipe.text_encoder, pipe.unet
        ctx_dim = int(pipe.unet.config.cross_attention_dim)
        if vae == "tiny":
            from pathlib import Path

            from diffusers import AutoencoderTiny

            pipe.vae = AutoencoderTiny.from_pretrained(Path(folder).parent / "taesd", torch_dtype=dtype).to(device)
        decode = lambda z: pipe.vae.decode(z).sample  # noqa: E731
        encode = ((lambda im: pipe.vae.encode(im).latents) if vae == "tiny"  # noqa: E731
                  else (lambda im: pipe.vae.encode(im).latent_dist.mean))
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=77, truncation=True,
                         return_tensors="np").input_ids
    channels, latent = int(pipe.unet.config.in_channels), int(pipe.unet.config.out_channels)
    x = {k: torch.from_numpy(v).to(device, dtype if v.dtype == np.float32 and system.startswith("diffusers") else None)
         for k, v in figure_inputs(size, size, pipe.vae_scale_factor, channels, latent, ctx_dim, ids, pooled).items()}
    encoders = [te]
    if pooled:  # SDXL encodes with both text encoders; the second's ids come from its own tokenizer
        encoders.append(pipe.text_encoder_2)
        ids2 = torch.from_numpy(pipe.tokenizer_2([NEGATIVE, PROMPT], padding="max_length", max_length=77,
                                                 truncation=True, return_tensors="np").input_ids).to(device)
    t = torch.tensor(TIMESTEP)
    clock = StepClock(back_to_back=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step_end(p, i, ts, kw):
        sync()  # the clock of a step stops when its GPU work is done
        clock.tick()
        return kw

    negative = {} if lcm else {"negative_prompt": NEGATIVE}
    cond = {}
    if lcm:  # the guidance embedding both LCM pipelines feed their U-Net (the same numbers as our runtime's)
        from sdonnx.sampling import guidance_embedding

        emb = torch.from_numpy(guidance_embedding(guidance, lcm, 2))
        cond = {"timestep_cond": emb.to(device, dtype) if system.startswith("diffusers") else emb}
    if pooled:
        cond["added_cond_kwargs"] = {"text_embeds": x["text_embeds2"], "time_ids": x["time_ids2"]}
    cond1 = {k: v[:1] if k != "added_cond_kwargs" else {n: t[:1] for n, t in v.items()} for k, v in cond.items()}

    def txt2img(n: int = steps):
        clock.begin()
        pipe(PROMPT, **negative, num_inference_steps=n, guidance_scale=guidance, height=size,
             width=size, generator=torch.Generator().manual_seed(SEED), output_type="np", callback_on_step_end=step_end)

    def synced(fn: Callable) -> Callable:
        def call():
            out = fn()
            sync()
            return out
        return call

    return {
        "text_encoder": synced(lambda: [enc(input_ids=i) for enc, i in zip(encoders, (x["ids"], ids2 if pooled
                                                                                       else None))]),
        "unet_b2": synced(lambda: unet(sample=x["latents2"], timestep=t, encoder_hidden_states=x["context2"], **cond)),
        "unet_b1": synced(lambda: unet(sample=x["latents2"][:1], timestep=t, encoder_hidden_states=x["context2"][:1],
                                       **cond1)),
        "vae_decode": synced(lambda: decode(x["latents1"])),
        "vae_encode": synced(lambda: encode(x["image"])),
        "txt2img": txt2img,
    }, clock


def measure(system: str, folder: str, size: int, steps: int, repeat: int, warmup: int,
            wanted: tuple[str, ...] = FIGURES, cache_interval: int = 1, low_memory: bool = False,
            provider: str = "cpu", guidance: float = GUIDANCE, vae: str = "full",
            inference_precision: str | None = None, dynamic: bool = False) -> dict:
    gpu_before = gpu_used_mb() if provider == "cuda" else None
    start = time.perf_counter()
    facts: dict = {}
    if system.startswith("sdonnx"):
        calls, clock = sdonnx_system(folder, size, steps, cache_interval, low_memory, provider, guidance, vae,
                                     inference_precision)
        guard = _nullcontext
    elif system.startswith(OPENVINO):
        import torch
        from openvino_system import openvino_system

        calls, clock, facts = openvino_system(folder, size, steps, guidance, inference_precision, dynamic)
        guard = torch.inference_mode  # the pipeline's loop (scheduler, guidance) runs on torch tensors
    elif system.startswith(SDCPP):
        from sdcpp_system import sdcpp_system
        from sdonnx.system import physical_cores

        calls, clock, facts = sdcpp_system(folder, size, steps, guidance, physical_cores())
        guard = _nullcontext
    else:
        import torch

        calls, clock = torch_system(system, folder, size, steps, provider, guidance, vae)
        guard = torch.inference_mode
    load_s = time.perf_counter() - start
    names = [f for f in FIGURES if f in wanted and f in calls]
    times: dict[str, list[float]] = {f: [] for f in names}
    step_s: list[float] = []
    generations: list[list[float]] = []  # step_s split per timed txt2img (--repeat)
    with guard():
        for name in names:
            # a figure may need its graphs shaped first (OpenVINO's static shapes: a recompile), untimed
            setup = getattr(calls[name], "setup", None)
            if setup is not None:
                setup()
            if name == "txt2img":
                # after every component figure's warm-up the whole generation needs none of its own; otherwise
                # (a subset of figures, the step-cache graphs, sessions opened per call, graphs its setup just
                # recompiled) a short one: 4 steps, PNDM's minimum without skip_prk_steps. On a GPU, a whole warm-up
                # generation: without one, the first step of the timed one took ~300 ms against ~23 ms for the others
                # (H200, ORT CUDA, after the batch-1 figures)
                if warmup and provider != "cpu":
                    calls[name]()
                elif warmup and (set(names) != set(FIGURES) or cache_interval > 1 or low_memory or setup):
                    calls[name](getattr(calls[name], "warmup_steps", 4))  # (a sampler without PNDM's minimum: fewer)
            else:
                for _ in range(warmup):
                    calls[name]()
            for _ in range(repeat):
                done = len(clock.steps)
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
                if name == "txt2img":
                    generations.append(clock.steps[done:])
                    step_s.extend(generations[-1])
        # figures a peer times only inside its generation (sd.cpp's own timers): those of the timed generations
        inside = getattr(calls.get("txt2img"), "inside", None)
        if inside is not None:
            for name, seconds in inside(len(times.get("txt2img", []))).items():
                if name in wanted:
                    times[name] = seconds
    result = {"system": system, "size": size, "steps": steps, "load_s": load_s, "times_s": times, "step_s": step_s,
              "generations": generations,
              "peak_rss_mb": peak_rss_mb(), "threads": _threads(system), "cache_interval": cache_interval,
              "low_memory": low_memory, "provider": provider, "guidance": guidance, "vae": vae, **facts}
    if gpu_before is not None:
        # ORT's CUDA arena and PyTorch's caching allocator keep what they took, so at the end this is the peak
        after = gpu_used_mb()
        result["gpu_mem_mb"] = None if after is None else after - gpu_before
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _unet_config(folder: str) -> dict:
    from pathlib import Path

    path = Path(folder) / "unet" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _threads(system: str) -> int | None:
    if system.startswith("diffusers"):
        import torch

        return torch.get_num_threads()
    if system.startswith("sdonnx"):
        from sdonnx.system import physical_cores

        return physical_cores()
    return None  # optimum leaves ORT's default (one thread per physical core)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", help="sdonnx-<anything> (our runtime), optimum-fp32 or diffusers-fp32")
    ap.add_argument("folder")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each figure in this process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--figures", default=",".join(FIGURES), help="comma-separated subset of " + ", ".join(FIGURES))
    ap.add_argument("--cache-interval", type=int, default=1, help="sdonnx only: the step cache's interval")
    ap.add_argument("--low-memory", action="store_true", help="sdonnx only: Pipeline.load(low_memory=True)")
    ap.add_argument("--provider", choices=["cpu", "cuda", "openvino"], default="cpu",
                    help="cuda: ONNX Runtime's CUDA execution provider / PyTorch on the GPU; openvino: our runtime "
                         "on OpenVINO's kernels (sdonnx-* systems)")
    ap.add_argument("--guidance", type=float, default=GUIDANCE, help="guidance scale of the txt2img figure")
    ap.add_argument("--vae", choices=["full", "tiny"], default="full",
                    help="tiny: decode and encode with the tiny VAE (TAESD) in every figure")
    ap.add_argument("--inference-precision", choices=["f32", "bf16"], default=None,
                    help="OpenVINO systems and --provider openvino: INFERENCE_PRECISION_HINT (default: OpenVINO's "
                         "own choice for this CPU)")
    ap.add_argument("--dynamic", action="store_true", help="openvino only: keep the IR's dynamic shapes")
    a = ap.parse_args()
    openvino = a.system.startswith(OPENVINO)
    if not a.system.startswith(("sdonnx-", SDCPP)) and a.system not in PEERS and not openvino:
        ap.error(f"unknown system {a.system!r}")
    on_openvino = openvino or a.provider == "openvino"
    if a.provider == "openvino" and not a.system.startswith("sdonnx-"):
        ap.error("--provider openvino is our runtime's (sdonnx-* systems); the openvino-* systems are OpenVINO's own")
    if (a.inference_precision and not on_openvino) or (a.dynamic and not openvino):
        ap.error("--inference-precision is an option of the OpenVINO runs (openvino-*, --provider openvino), "
                 "--dynamic of the openvino-* systems")
    if (openvino or a.system.startswith(SDCPP)) and a.provider != "cpu":  # (their own pipeline: it takes no provider)
        ap.error("the OpenVINO and stable-diffusion.cpp systems run on the CPU only here")
    if (a.cache_interval > 1 or a.low_memory) and not a.system.startswith("sdonnx-"):
        ap.error("--cache-interval and --low-memory are options of our runtime (sdonnx-* systems)")
    wanted = tuple(f for f in a.figures.split(",") if f)
    unknown = set(wanted) - set(FIGURES)
    if unknown:
        ap.error(f"unknown figures: {', '.join(sorted(unknown))}")
    result = measure(a.system, a.folder, a.size, a.steps, a.repeat, a.warmup, wanted, a.cache_interval, a.low_memory,
                     a.provider, a.guidance, a.vae, a.inference_precision, a.dynamic)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
