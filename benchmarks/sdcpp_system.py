"""The stable-diffusion.cpp peers for worker.py: its Python binding on one GGUF file (sdcpp_convert.py's).

Imported by worker.py in the sdcpp venv only (benchmarks/peers.py). sd.cpp offers one call, the whole generation,
so the only figure timed from outside is txt2img. Inside it, sd.cpp reports each sampling step through its progress
callback (the step clock ticks there: once as sampling starts, after the prompts are encoded, then after each step)
and logs its own timers of the prompt encoding (both prompts, its "get_learned_condition") and of the VAE decode
("latent 1 decoded"), at 10 ms resolution: those two are reported as the text encoder and VAE decode figures of
the timed generations. Its U-Net and the VAE encoder cannot be called alone ('-').

Sampler: Euler on sd.cpp's discrete schedule, one guided U-Net evaluation per step (sd.cpp has no PNDM, the
others' SD 1.5 sampler, whose N steps make N + 1 U-Net calls). Threads: set explicitly, one per physical core as for
the other systems (the binding's default, half the logical CPUs, would be one here). Only the VAE decoder is loaded
(`vae_decode_only`, as sd.cpp's CLI does for txt2img): a txt2img never encodes.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path
from typing import Callable

from sdonnx.figures import NEGATIVE, PROMPT, SEED, StepClock

SAMPLER, SCHEDULE = "euler", "discrete"
# sd.cpp's log lines with its own timers -> our figure names
TIMERS = {"text_encoder": re.compile(r"get_learned_condition completed, taking ([\d.]+)s"),
          "vae_decode": re.compile(r"latent 1 decoded, taking ([\d.]+)s")}


class SdLog:
    """sd.cpp's log, kept per generation (the binding's own callback would print it; this replaces it)."""

    def __init__(self):
        import stable_diffusion_cpp as sd_cpp

        self.lines: list[str] = []
        self.errors: list[str] = []  # sd.cpp's ERROR level (3)
        self._callback = sd_cpp.sd_log_callback(self._receive)  # referenced here, or ctypes frees it under sd.cpp
        sd_cpp.sd_set_log_callback(self._callback, ctypes.c_void_p(0))

    def _receive(self, level: int, text: bytes, _data) -> None:
        line = text.decode("utf-8", errors="replace").rstrip()
        self.lines.append(line)
        if level >= 3:
            self.errors.append(line)

    def timers(self, since: int) -> dict[str, float]:
        """{figure: seconds} from the lines logged after line `since`."""
        out = {}
        for line in self.lines[since:]:
            for name, rx in TIMERS.items():
                if m := rx.search(line):
                    out[name] = float(m[1])
        return out


def sdcpp_system(folder: str, size: int, steps: int, guidance: float,
                 threads: int) -> tuple[dict[str, Callable], StepClock, dict]:
    """{"txt2img": call}, the step clock, and facts for the result; the call's `inside(n)` gives the sd.cpp timers
    of the last n generations ({figure: [seconds]})."""
    from stable_diffusion_cpp import StableDiffusion

    model = Path(folder) / "model.gguf"
    if not model.is_file():
        raise SystemExit(f"{folder}: no model.gguf (prepare.py makes it with sdcpp_convert.py)")
    log = SdLog()
    sd = StableDiffusion(model_path=str(model), n_threads=threads, vae_decode_only=True, verbose=False)
    if log.errors:  # e.g. not SD 1.5's sizes (sd.cpp's networks have them fixed): the binding carries on regardless
        sys.stderr.write(f"stable-diffusion.cpp could not load {model}: {' | '.join(log.errors[-3:])}\n")
        sys.stderr.flush()
        os._exit(1)  # not SystemExit: the binding's finalizer crashes (SIGSEGV) on the half-made context
    clock = StepClock(back_to_back=True)
    per_generation: list[dict[str, float]] = []

    def txt2img(n: int = steps):
        since = len(log.lines)
        clock.begin()
        images = sd.generate_image(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, cfg_scale=guidance,
                                   sample_method=SAMPLER, scheduler=SCHEDULE, sample_steps=n, seed=SEED,
                                   progress_callback=clock.tick)
        if not images:
            raise RuntimeError("stable-diffusion.cpp generated no image: " + " | ".join(log.errors[-5:]))
        per_generation.append(log.timers(since))

    def inside(n: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for timers in per_generation[len(per_generation) - n:] if n else []:
            for name, seconds in timers.items():
                out.setdefault(name, []).append(seconds)
        return out

    txt2img.inside = inside
    txt2img.warmup_steps = 1  # Euler has no minimum; every step is the same two U-Net evaluations
    facts = {"threads": threads, "sampler": f"{SAMPLER} ({SCHEDULE})", "weights_file": model.name,
             "figures_from_sdcpp_log": sorted(TIMERS), "versions": _versions()}
    return {"txt2img": txt2img}, clock, facts


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import stable_diffusion_cpp as sd_cpp

    out = {"stable-diffusion-cpp-python": version("stable-diffusion-cpp-python")}
    built = sd_cpp.sd_version().decode()
    if built != "unknown":  # (a build from the binding's sdist does not know its sd.cpp commit)
        out["stable-diffusion.cpp"] = f"{built} ({sd_cpp.sd_commit().decode()})"
    return out
