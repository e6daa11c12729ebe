"""`sdonnx bench`: load time, per-component latency, per-step latency and peak memory of a model on this machine."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import SdonnxError
from .figures import StepClock, clocked_unets, component_calls, prompts
from .model import default_model_dir
from .pipeline import PREVIEW_DOWNSCALE, Pipeline
from .system import machine, peak_rss_mb

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


def _timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run_bench(model_dir: str | Path | None = None, provider: str = "cpu", size: tuple[int, int] | None = None,
              steps: int = 5, runs: int = 3, scheduler: str | None = None, cache_interval: int = 1,
              low_memory: bool = False, progress: Progress | None = None, vae: str | None = None,
              preview_every: int | None = None) -> dict:
    """Measure one model folder on one provider; returns the report as a JSON-ready dict (times in seconds).

    cache_interval > 1 runs txt2img with the step cache; low_memory loads with Pipeline.load(low_memory=True)
    and then times only the txt2img runs and their steps (standalone component figures would keep sessions
    open and distort the peak memory). vae: time the full or the tiny VAE (default: the model's); preview_every
    K: the txt2img runs make a tiny-VAE preview every K steps, as `generate --preview-every`, each one timed."""
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
    prompt, negative = prompts(pipe)
    pipe._setup(prompt, negative, steps, None, scheduler, 0, width, height, 1, cache_interval, vae=vae)  # checks
    if preview_every is not None:
        info.vae("tiny")  # previews need the tiny VAE
    components = {}
    if not low_memory:
        for name, call in component_calls(pipe, width, height, vae=vae).items():
            say(f"timing {name} ({runs} runs after a warm-up)")
            components[name] = stats(_timed(call, runs))
    end_to_end = []
    cached = f" (cache interval {cache_interval})" if cache_interval != 1 else ""
    clock, previews = StepClock(), []
    with clocked_unets(pipe, clock) as used:
        for r in range(runs):
            say(f"txt2img {width}x{height}, {steps} steps{cached}: run {r + 1}/{runs}")
            t0 = time.perf_counter()
            pipe.txt2img(prompt, negative, steps=steps, scheduler=scheduler, seed=r, width=width, height=height,
                         callback=_echo_steps(clock, say, pipe, preview_every, previews), cache_interval=cache_interval,
                         vae=vae)
            end_to_end.append(time.perf_counter() - t0)
    precision = {n: info.precision(n) or pipe.components[n].io_precision for n in pipe.components}
    return {
        "sdonnx": __version__, "model": str(info.path), "family": info.family, "provider": provider,
        "precision": {**used, **precision},
        "size": [width, height], "steps": steps, "runs": runs, "scheduler": scheduler or info.defaults.scheduler,
        "guidance": info.defaults.guidance, "cache_interval": int(cache_interval), "low_memory": low_memory,
        "load_s": load_s, "components_s": components,
        "step_s": stats(clock.steps), "txt2img_s": stats(end_to_end), "peak_rss_mb": peak_rss_mb(),
        "vae": (vae or info.defaults.vae).lower(), "preview_every": preview_every, "preview_s": stats(previews),
        "machine": machine(),
    }


def _echo_steps(clock: StepClock, say: Progress, pipe: Pipeline, every: int | None, previews: list[float]):
    def callback(k: int, total: int, latents) -> None:
        clock.tick()
        say(f"  step {k + 1}/{total}: {clock.steps[-1]:.3f} s")
        if every and (k + 1) % every == 0 and k + 1 < total:  # as generate --preview-every: not after the last
            t0 = time.perf_counter()
            pipe.preview(latents[:1], PREVIEW_DOWNSCALE)
            previews.append(time.perf_counter() - t0)

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
    tiny = " (tiny)" if report.get("vae") == "tiny" else ""
    rows = [(f"text encoder 2x77", report["components_s"].get("text_encoder")),
            ("U-Net batch 2", report["components_s"].get("unet_b2")),
            ("U-Net batch 1", report["components_s"].get("unet_b1")),
            ("VAE decode" + tiny, report["components_s"].get("vae_decode")),
            ("VAE encode" + tiny, report["components_s"].get("vae_encode")),
            ("U-Net features batch 2", report["components_s"].get("unet_features_b2")),
            ("U-Net shallow batch 2", report["components_s"].get("unet_shallow_b2")),
            ("denoising step", report["step_s"]),
            (f"txt2img ({report['steps']} steps)", report["txt2img_s"]),
            (f"preview every {report.get('preview_every')}", report.get("preview_s") if report.get("preview_every")
             else None)]
    for label, s in rows:
        if s:
            lines.append(f"{label:<22}{_ms(s['median']):>12}{_ms(s['min']):>12}{_ms(s['max']):>12}")
    lines += ["", f"peak RSS  {report['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines)
