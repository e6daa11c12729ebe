"""`sdonnx bench`: load time, per-component latency, per-step latency and peak memory of a model on this machine."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .errors import SdonnxError
from .model import default_model_dir
from .pipeline import Pipeline
from .system import machine, peak_rss_mb

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
COMPONENT_FIGURES = ("text_encoder", "unet_b2", "unet_b1", "vae_decode", "vae_encode",
                     "unet_features_b2", "unet_shallow_b2")  # the last two for folders with the step cache
UNETS = ("unet", "unet_features", "unet_shallow")  # the graphs whose first call in a step starts its clock
Progress = Callable[[str], None]


def stats(xs: list[float]) -> dict:
    """median / min / max / n of a list of seconds."""
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' or '512' -> (width, height)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        w = h = 0
    if w <= 0 or h <= 0:
        raise SdonnxError(f"size must look like WIDTHxHEIGHT (e.g. 512x512), got {text!r}")
    return w, h


class _StepClock:
    """Times each denoising step from its first U-Net call to the pipeline's step callback.

    While entered it hooks the pipeline's `_using`, through which the loop gets its U-Net graphs ("unet", or
    "unet_features" and "unet_shallow" with the step cache), whether kept open or opened per run (low memory).
    It also notes the I/O precision of every component the runs use."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.started: float | None = None
        self.steps: list[float] = []
        self.precision: dict[str, str] = {}

    def __enter__(self) -> "_StepClock":
        using = self.pipe._using

        @contextlib.contextmanager
        def hooked(name: str):
            with using(name) as component:
                self.precision[name] = self.pipe.info.precision(name) or component.io_precision
                yield _Starter(component, self) if name in UNETS else component

        self.pipe._using = hooked  # an instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *_exc) -> None:
        del self.pipe._using

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def callback(self, _k: int, _total: int, _latents) -> None:
        if self.started is not None:
            self.steps.append(time.perf_counter() - self.started)
        self.started = None


class _Starter:
    """A U-Net component that starts the step clock when called."""

    def __init__(self, unet, clock: _StepClock):
        self.unet, self.clock = unet, clock

    def __call__(self, **feeds):
        self.clock.start()
        return self.unet(**feeds)

    def __getattr__(self, name):
        return getattr(self.unet, name)


def _timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _component_calls(pipe: Pipeline, width: int, height: int) -> dict[str, Callable[[], object]]:
    """One zero-argument call per component figure, on random inputs of the run's shapes."""
    info, c = pipe.info, pipe.components
    rng = np.random.default_rng(0)
    f, ch = info.vae_scale_factor, info.latent_channels
    lat2 = rng.standard_normal((2, info.unet_in_channels, height // f, width // f), dtype=np.float32)
    ctx_dim = c["unet"].inputs["encoder_hidden_states"].shape[-1]
    if not isinstance(ctx_dim, int):  # a symbolic width: ask the text encoder
        ctx_dim = c["text_encoder"](input_ids=pipe.tokenizer([""]))["last_hidden_state"].shape[-1]
    ctx = rng.standard_normal((2, 77, ctx_dim), dtype=np.float32)
    t = np.float64(info.scheduler_config.get("num_train_timesteps", 1000) // 2)
    ids = pipe.tokenizer([NEGATIVE, PROMPT])
    latent = rng.standard_normal((1, ch, height // f, width // f), dtype=np.float32)
    image = rng.uniform(-1.0, 1.0, (1, 3, height, width)).astype(np.float32)
    lcm = pipe.guidance_input(info.defaults.guidance, 2)  # an LCM U-Net's guidance input, else {}
    lcm1 = pipe.guidance_input(info.defaults.guidance, 1)
    calls = {
        "text_encoder": lambda: c["text_encoder"](input_ids=ids),
        "unet_b2": lambda: c["unet"](sample=lat2, timestep=t, encoder_hidden_states=ctx, **lcm),
        "unet_b1": lambda: c["unet"](sample=lat2[:1], timestep=t, encoder_hidden_states=ctx[:1], **lcm1),
        "vae_decode": lambda: c["vae_decoder"](latent_sample=latent),
    }
    if "vae_encoder" in c:
        calls["vae_encode"] = lambda: c["vae_encoder"](sample=image)
    if info.has_step_cache:
        with pipe._using("unet_features") as features, pipe._using("unet_shallow") as shallow:  # kept open
            deep = features(sample=lat2, timestep=t, encoder_hidden_states=ctx, **lcm)["deep_features"]
        calls["unet_features_b2"] = lambda: features(sample=lat2, timestep=t, encoder_hidden_states=ctx, **lcm)
        calls["unet_shallow_b2"] = lambda: shallow(sample=lat2, timestep=t, encoder_hidden_states=ctx,
                                                   deep_features=deep, **lcm)
    return calls


def run_bench(model_dir: str | Path | None = None, provider: str = "cpu", size: tuple[int, int] | None = None,
              steps: int = 5, runs: int = 3, scheduler: str | None = None, cache_interval: int = 1,
              low_memory: bool = False, progress: Progress | None = None) -> dict:
    """Measure one model folder on one provider; returns the report as a JSON-ready dict (times in seconds).

    cache_interval > 1 runs txt2img with the step cache; low_memory loads with Pipeline.load(low_memory=True)
    and then times only the txt2img runs and their steps (standalone component figures would keep sessions
    open and distort the peak memory)."""
    if steps < 1 or runs < 1:
        raise SdonnxError(f"steps and runs must be at least 1, got steps={steps}, runs={runs}")
    say = progress or (lambda _msg: None)
    say(f"loading {model_dir or 'the bundled tiny model'} on {provider}" + (" (low memory)" if low_memory else ""))
    t0 = time.perf_counter()
    pipe = Pipeline.load(model_dir if model_dir is not None else default_model_dir(), provider=provider,
                         low_memory=low_memory)
    load_s = time.perf_counter() - t0
    info = pipe.info
    if info.is_inpaint:
        raise SdonnxError(f"{info.path.name} is an inpainting model; bench measures txt2img models")
    static = info.static_shape
    width, height = size or ((static["width"], static["height"]) if static else
                             (info.defaults.width, info.defaults.height))
    pipe._setup(steps, scheduler, 0, width, height, 1, cache_interval)  # the pipeline's own checks, before timing
    components = {}
    if not low_memory:
        for name, call in _component_calls(pipe, width, height).items():
            say(f"timing {name} ({runs} runs after a warm-up)")
            components[name] = stats(_timed(call, runs))
    end_to_end = []
    cached = f" (cache interval {cache_interval})" if cache_interval != 1 else ""
    negative = "" if info.guidance_embedding_dim else NEGATIVE  # an LCM U-Net has no negative prompt
    with _StepClock(pipe) as clock:
        for r in range(runs):
            say(f"txt2img {width}x{height}, {steps} steps{cached}: run {r + 1}/{runs}")
            t0 = time.perf_counter()
            pipe.txt2img(PROMPT, negative, steps=steps, scheduler=scheduler, seed=r, width=width, height=height,
                         callback=_echo_steps(clock, say), cache_interval=cache_interval)
            end_to_end.append(time.perf_counter() - t0)
    precision = {n: info.precision(n) or pipe.components[n].io_precision for n in pipe.components}
    return {
        "sdonnx": __version__, "model": str(info.path), "family": info.family, "provider": provider,
        "precision": {**clock.precision, **precision},
        "size": [width, height], "steps": steps, "runs": runs, "scheduler": scheduler or info.defaults.scheduler,
        "guidance": info.defaults.guidance, "cache_interval": int(cache_interval), "low_memory": low_memory,
        "load_s": load_s, "components_s": components,
        "step_s": stats(clock.steps), "txt2img_s": stats(end_to_end), "peak_rss_mb": peak_rss_mb(),
        "machine": machine(),
    }


def _echo_steps(clock: _StepClock, say: Progress):
    def callback(k: int, total: int, latents) -> None:
        clock.callback(k, total, latents)
        say(f"  step {k + 1}/{total}: {clock.steps[-1]:.3f} s")

    return callback


def _ms(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1000:.1f}"


def format_table(report: dict) -> str:
    """The report as a plain-text table (milliseconds)."""
    m = report["machine"]
    w, h = report["size"]
    lines = [f"model     {report['model']} ({report['family']})",
             f"provider  {report['provider']} on {m['cpu']}, {m['physical_cores']} physical cores, "
             f"onnxruntime {m['onnxruntime']}",
             f"run       {w}x{h}, {report['steps']} steps ({report['scheduler']}, guidance {report['guidance']}, "
             f"cache interval {report.get('cache_interval', 1)}), {report['runs']} timed runs"
             + ("" if report.get("low_memory") else " after a warm-up"),
             f"memory    low_memory {'true' if report.get('low_memory') else 'false'}"
             + (" (sessions opened per use; no component figures)" if report.get("low_memory") else ""),
             f"load      {report['load_s']:.2f} s",
             "",
             f"{'':<22}{'median ms':>12}{'min ms':>12}{'max ms':>12}"]
    rows = [(f"text encoder 2x77", report["components_s"].get("text_encoder")),
            ("U-Net batch 2", report["components_s"].get("unet_b2")),
            ("U-Net batch 1", report["components_s"].get("unet_b1")),
            ("VAE decode", report["components_s"].get("vae_decode")),
            ("VAE encode", report["components_s"].get("vae_encode")),
            ("U-Net features batch 2", report["components_s"].get("unet_features_b2")),
            ("U-Net shallow batch 2", report["components_s"].get("unet_shallow_b2")),
            ("denoising step", report["step_s"]),
            (f"txt2img ({report['steps']} steps)", report["txt2img_s"])]
    for label, s in rows:
        if s:
            lines.append(f"{label:<22}{_ms(s['median']):>12}{_ms(s['min']):>12}{_ms(s['max']):>12}")
    lines += ["", f"peak RSS  {report['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)
