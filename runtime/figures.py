"""What a benchmark times: the figure names, the prompts, the figures' inputs and calls, and the step clock.

Shared by `sdonnx bench` and benchmarks/worker.py, which times the same figures on diffusers and optimum too;
so this module imports no more than numpy (a peer's process should not load onnxruntime for it).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from .sdxl import time_ids

if TYPE_CHECKING:
    from .pipeline import Pipeline

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"
FIGURES = ("text_encoder", "unet_b2", "unet_b1", "vae_decode", "vae_encode")  # one call each, every folder
STEP_CACHE_FIGURES = ("unet_features_b2", "unet_shallow_b2")  # folders exported with --step-cache
UNETS = ("unet", "unet_features", "unet_shallow")  # the graphs whose first call in a step starts its clock
SEED = 0


def prompts(pipe: Pipeline) -> tuple[str, str]:
    """(prompt, negative prompt) of the timed generations; an LCM U-Net takes no negative prompt."""
    return PROMPT, "" if pipe.info.is_lcm else NEGATIVE


def figure_inputs(width: int, height: int, factor: int, unet_channels: int, latent_channels: int,
                  context_dim: int, ids: np.ndarray, pooled_dim: int | None = None) -> dict[str, np.ndarray]:
    """The random inputs every system's figures get: batch 2 is [uncond, cond] as guidance runs the U-Net,
    batch 1 its first half; `ids` are the token ids of [NEGATIVE, PROMPT] from that system's tokenizer.
    pooled_dim: an SDXL U-Net's pooled text width; adds its `text_embeds2` and `time_ids2` (diffusers' default
    size conditioning: original size = target size = the image's, no crop)."""
    rng = np.random.default_rng(SEED)
    h, w = height // factor, width // factor
    x = {
        "ids": np.asarray(ids, dtype=np.int64),
        "latents2": rng.standard_normal((2, unet_channels, h, w), dtype=np.float32),
        "context2": rng.standard_normal((2, 77, context_dim), dtype=np.float32),
        "latents1": rng.standard_normal((1, latent_channels, h, w), dtype=np.float32),
        "image": rng.uniform(-1.0, 1.0, (1, 3, height, width)).astype(np.float32),
    }
    if pooled_dim:
        x["text_embeds2"] = rng.standard_normal((2, pooled_dim), dtype=np.float32)
        x["time_ids2"] = time_ids(height, width, 2)
    return x


def component_calls(pipe: Pipeline, width: int, height: int, names: tuple[str, ...] = FIGURES + STEP_CACHE_FIGURES,
                    guidance: float | None = None, vae: str | None = None) -> dict[str, Callable[[], object]]:
    """One zero-argument call per figure in `names` that the folder has, on `figure_inputs` of the run's shapes;
    an LCM U-Net gets the guidance input of `guidance` (default: the model's), the VAE figures time the `vae`
    ("full" or "tiny"; default: the model's)."""
    info, c = pipe.info, pipe.components
    x = figure_inputs(width, height, info.vae_scale_factor, info.unet_in_channels, info.latent_channels,
                      _context_dim(pipe), pipe.tokenizer([NEGATIVE, PROMPT]))
    w = info.defaults.guidance if guidance is None else guidance
    unet2 = dict(sample=x["latents2"], timestep=np.float64(info.scheduler_config.get("num_train_timesteps", 1000) // 2),
                 encoder_hidden_states=x["context2"], **pipe.guidance_input(w, 2),  # {} unless an LCM U-Net
                 **pipe.added_inputs(2, width, height))  # {} unless an SDXL U-Net
    unet1 = dict(unet2, sample=x["latents2"][:1], encoder_hidden_states=x["context2"][:1], **pipe.guidance_input(w, 1),
                 **pipe.added_inputs(1, width, height))
    calls = {
        "text_encoder": _text_encoders(pipe, x["ids"]),
        "unet_b2": lambda: c["unet"](**unet2),
        "unet_b1": lambda: c["unet"](**unet1),
    }
    encoder, decoder = info.vae(vae)[:2]
    vae_decoder = pipe.component(decoder)
    calls["vae_decode"] = lambda: vae_decoder(latent_sample=x["latents1"])
    if encoder in info.components:
        vae_encoder = pipe.component(encoder)
        calls["vae_encode"] = lambda: vae_encoder(sample=x["image"])
    if info.has_step_cache and set(STEP_CACHE_FIGURES) & set(names):
        calls.update(_step_cache_calls(pipe, unet2))
    return {name: call for name, call in calls.items() if name in names}


def _text_encoders(pipe: Pipeline, ids: np.ndarray) -> Callable[[], object]:
    """A call of the text encoder, and of SDXL's second one (on its own tokenizer's ids, made here: untimed)."""
    feeds = [("text_encoder", ids)]
    if pipe.tokenizer_2 is not None:
        feeds.append(("text_encoder_2", pipe.tokenizer_2([NEGATIVE, PROMPT])))
    return lambda: [pipe.components[name](input_ids=i) for name, i in feeds]


def _context_dim(pipe: Pipeline) -> int:
    dim = pipe.components["unet"].inputs["encoder_hidden_states"].shape[-1]
    if isinstance(dim, int):
        return dim
    if pipe.info.is_sdxl:  # both encoders' widths
        return pipe._encode_texts([""])[0].hidden.shape[-1]
    return pipe.components["text_encoder"](input_ids=pipe.tokenizer([""]))["last_hidden_state"].shape[-1]


def _step_cache_calls(pipe: Pipeline, feeds: dict) -> dict[str, Callable[[], object]]:
    with pipe._using("unet_features") as features, pipe._using("unet_shallow") as shallow:  # kept open
        deep = features(**feeds)["deep_features"]
    return {"unet_features_b2": lambda: features(**feeds),
            "unet_shallow_b2": lambda: shallow(**feeds, deep_features=deep)}


class StepClock:
    """Wall time of each denoising step; a step ends at the pipeline's step callback (`tick`).

    `sdonnx bench` starts each step at its first U-Net call (`clocked_unets`), so a step is its U-Net calls and the
    scheduler's update. The comparison harness cannot see inside the peers' loops, so it runs the clock back to
    back: `begin()` as a generation starts, and each step starts where the previous one ended (so the first also
    encodes the prompts)."""

    def __init__(self, back_to_back: bool = False):
        self.back_to_back = back_to_back
        self.started: float | None = None
        self.steps: list[float] = []

    def begin(self) -> None:
        """A generation starts now."""
        self.started = time.perf_counter() if self.back_to_back else None

    def start(self) -> None:
        """A step starts now, unless one is running."""
        if self.started is None:
            self.started = time.perf_counter()

    def tick(self, *_args) -> None:
        """The step callback: the running step ends."""
        now = time.perf_counter()
        if self.started is not None:
            self.steps.append(now - self.started)
        self.started = now if self.back_to_back else None


@contextlib.contextmanager
def clocked_unets(pipe: Pipeline, clock: StepClock) -> Iterator[dict[str, str]]:
    """While entered, each U-Net graph the pipeline gets through `_using` (kept open or opened per run, as in low
    memory) starts the clock's step when called; yields {component: I/O precision}, filled in as they are used."""
    using = pipe._using
    precision: dict[str, str] = {}

    @contextlib.contextmanager
    def hooked(name: str):
        with using(name) as component:
            precision[name] = pipe.info.precision(name) or component.io_precision
            yield _Starter(component, clock) if name in UNETS else component

    pipe._using = hooked  # an instance attribute shadows the method until the end
    try:
        yield precision
    finally:
        del pipe._using


class _Starter:
    """A U-Net component that starts the step clock when called."""

    def __init__(self, unet, clock: StepClock):
        self.unet, self.clock = unet, clock

    def __call__(self, **feeds):
        self.clock.start()
        return self.unet(**feeds)

    def __getattr__(self, name):
        return getattr(self.unet, name)
