"""Text-to-image, image-to-image and inpainting over one denoising loop (latent diffusion, Rombach et al. 2022)."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from . import image as imaging
from . import prompt_chunks, prompt_syntax, sampling, schedulers, sdxl, text_encoding
from .model import HIDDEN_STATES, VAES, ModelInfo, default_model_dir, read_model
from .sampling import Callback, Start
from .errors import SdonnxError
from .session import Component, SessionConfig, session_config
from .stream import Streamed, read_parts, streamed_components
from .system import return_freed_memory, trim_heap
from .tiling import Tiles, decode_tiled
from .tokenizer import CLIPTokenizer

TEXT_CACHE_SIZE = 8  # distinct prompts whose encodings a pipeline keeps
# live previews at half size: a quarter of the tiny decoder's work, so that one every step stays a few percent of
# a 512x512 step (measured: benchmarks/results/sd-turbo-preview-cpu.json)
PREVIEW_DOWNSCALE = 2
HIDDEN_STATES_GRAPH = next(iter(HIDDEN_STATES))  # opened only for clip skip > 1
EAGER = ("text_encoder", "text_encoder_2", "unet")  # loaded up front unless low_memory, with the default VAE


@dataclass(frozen=True)
class Settings:
    """What one call actually ran with, defaults and the drawn seed resolved; each PIL image it returns carries
    them as `image.info["sdonnx"]`, and the CLI writes exactly these into the PNG (as `infotext()`)."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    scheduler: str
    seed: int
    width: int
    height: int
    model: str
    cache_interval: int = 1
    strength: float | None = None  # img2img / inpainting only
    vae: str = "full"
    clip_skip: int = 1  # A1111's meaning: 1 = the text encoder's last layer
    prompt_syntax: str = "a1111"  # or "none": brackets are plain text (prompt_syntax.py)

    def infotext(self, extra: dict | None = None) -> str:
        """The PNG's `parameters` text as AUTOMATIC1111 writes it (see sdonnx.infotext)."""
        from . import infotext

        return infotext.format(self, extra)

    def parameters(self) -> dict:
        """The PNG's parameters, in the order they are written (None: not written)."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                    guidance=self.guidance, scheduler=self.scheduler, seed=self.seed,
                    size=f"{self.width}x{self.height}", model=self.model, strength=self.strength,
                    cache_interval=self.cache_interval if self.cache_interval > 1 else None,
                    vae=self.vae if self.vae != "full" else None)


@dataclass
class _Run:
    """One call's settings and what they set up: the scheduler, the noise generator, the latent shape."""

    settings: Settings
    sched: schedulers.Scheduler
    rng: np.random.Generator
    shape: tuple[int, int, int, int]


class Pipeline:
    """A loaded model folder: tokenizer, ONNX components and the folder's defaults.

    `components` holds the sessions kept open; others (the step-cache graphs, or all of them in low-memory
    mode) are opened on first use. `tiles` set: the VAE decodes in overlapping tiles (tiling.py). An SDXL folder
    has a second tokenizer for its second text encoder (`tokenizer_2`)."""

    def __init__(self, info: ModelInfo, tokenizer: CLIPTokenizer, components: dict[str, Component],
                 config: SessionConfig | None = None, low_memory: bool = False, tiles: Tiles | None = None,
                 stream: bool = True, tokenizer_2: CLIPTokenizer | None = None):
        self.info = info
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.components = components
        self.config = config or SessionConfig()
        self.low_memory = low_memory
        self.tiles = tiles
        self.stream = stream
        self._texts: OrderedDict[bytes, np.ndarray | sdxl.Text] = OrderedDict()

    @classmethod
    def load(cls, model_dir: str | Path | None = None, provider: str = "cpu", verify: bool | None = None,
             low_memory: bool = False, stream: bool = True, **session_options) -> "Pipeline":
        """Open a model folder (default: the bundled tiny model) on `cpu`, `cuda`, `dml` or `auto`.

        low_memory: each session exists only while its component runs, without ORT's memory arena and
        patterns, and the VAE decodes in tiles; a folder exported with --stream runs its U-Net and VAE decoder
        part by part (stream=False: their whole graphs, as a folder without parts would). On Linux (glibc) it
        also makes the process return large freed buffers to the system at once (`system.return_freed_memory`), a
        process-wide allocator setting."""
        info = read_model(model_dir if model_dir is not None else default_model_dir(), verify=verify)
        if low_memory:  # arena and patterns keep peak-sized buffers for the session's lifetime
            session_options = {"cpu_arena": False, "mem_pattern": False, **session_options}
            return_freed_memory()
        config = session_config(provider, **session_options)
        eager = (*EAGER, *info.vae(None)[:2])
        components = {} if low_memory else {name: Component(path, _config_for(info, name, config))
                                            for name, path in info.components.items() if name in eager}
        tokenizer = CLIPTokenizer.from_dir(info.path / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_dir(info.path / "tokenizer_2") if info.is_sdxl else None
        return cls(info, tokenizer, components, config, low_memory, Tiles() if low_memory else None, stream,
                   tokenizer_2)

    # ---- the three public tasks ------------------------------------------------------------------

    def txt2img(self, prompt: str, negative_prompt: str = "", steps: int | None = None,
                guidance: float | None = None, scheduler: str | None = None, seed: int | None = None,
                width: int | None = None, height: int | None = None, num_images: int = 1,
                latents: np.ndarray | None = None, callback: Callback | None = None, output_type: str = "pil",
                cache_interval: int = 1, vae: str | None = None,
                prompt_syntax: str = "a1111", clip_skip: int = 1):
        """Images from a prompt; `latents` are unit-variance noise (N, C, H/f, W/f), as in diffusers.

        cache_interval k > 1: the full U-Net runs every k-th step, the shallow graph reuses its deep features
        in between (DeepCache; needs a folder exported with --step-cache). vae: "full" or "tiny" (a folder
        exported with --tiny-vae), None for the folder's default; img2img and inpainting encode with it too.
        prompt_syntax: "a1111" reads `(word:1.3)`, `[word]`, BREAK (prompt_syntax.py), "none" takes brackets as text;
        prompts of any length run in 75-token chunks. clip_skip N: the text encoder's N-th layer from the end."""
        run = self._setup(prompt, negative_prompt, steps, guidance, scheduler, seed, width, height, num_images,
                          cache_interval, vae=vae, syntax=prompt_syntax, clip_skip=clip_skip)
        noise = self._noise(run, latents)
        start = Start(0, noise * run.sched.init_noise_sigma)
        return self._generate(run, start, callback, output_type)

    def img2img(self, prompt: str, image, strength: float = 0.8, negative_prompt: str = "", steps: int | None = None,
                guidance: float | None = None, scheduler: str | None = None, seed: int | None = None,
                width: int | None = None, height: int | None = None, num_images: int = 1,
                latents: np.ndarray | None = None, callback: Callback | None = None, output_type: str = "pil",
                cache_interval: int = 1, vae: str | None = None,
                prompt_syntax: str = "a1111", clip_skip: int = 1):
        """Images from a prompt and a starting image; `strength` in (0, 1] is how much of it to repaint."""
        _check_strength(strength)
        img = imaging.fit(imaging.load_image(image), width, height)
        run = self._setup(prompt, negative_prompt, steps, guidance, scheduler, seed, img.width, img.height,
                          num_images, cache_interval, strength, vae, prompt_syntax, clip_skip)
        start = self._noised_start(run, img, strength, latents, pure_at_max=False)
        return self._generate(run, start, callback, output_type)

    def inpaint(self, prompt: str, image, mask, strength: float = 1.0, negative_prompt: str = "",
                steps: int | None = None, guidance: float | None = None, scheduler: str | None = None,
                seed: int | None = None, width: int | None = None, height: int | None = None,
                num_images: int = 1, latents: np.ndarray | None = None, callback: Callback | None = None,
                output_type: str = "pil", cache_interval: int = 1, vae: str | None = None,
                prompt_syntax: str = "a1111", clip_skip: int = 1):
        """Repaint the white part of `mask`; pixels outside it come back unchanged."""
        _check_strength(strength)
        src = imaging.load_image(image)
        msk = imaging.load_mask(mask, src)
        img, msk = imaging.fit(src, width, height), imaging.fit(msk, width, height)
        run = self._setup(prompt, negative_prompt, steps, guidance, scheduler, seed, img.width, img.height,
                          num_images, cache_interval, strength, vae, prompt_syntax, clip_skip)
        pixel_mask = imaging.mask_array(msk)
        start = self._noised_start(run, img, strength, latents, pure_at_max=True)
        h, w = start.latents.shape[-2:]
        latent_mask = np.repeat(imaging.shrink_mask(pixel_mask, h, w), run.shape[0], axis=0)
        if self.info.is_inpaint:
            masked = imaging.to_array(img) * (pixel_mask < 0.5)
            masked_latents = np.repeat(self._encode(masked, run.settings.vae), run.shape[0], axis=0)
            start.extra = np.concatenate([latent_mask, masked_latents], axis=1)
        else:
            start.keep_mask = latent_mask
        start.paste = (imaging.to_unit(img), pixel_mask[0].transpose(1, 2, 0))
        return self._generate(run, start, callback, output_type)

    # ---- set-up ------------------------------------------------------------------------------------

    def _setup(self, prompt: str, negative_prompt: str, steps, guidance, scheduler, seed, width, height,
               num_images, cache_interval=1, strength: float | None = None, vae: str | None = None,
               syntax: str = "a1111", clip_skip: int = 1) -> _Run:
        """Resolve one call's settings against the folder's defaults, after checking them."""
        d = self.info.defaults
        width, height = width or d.width, height or d.height
        imaging.check_size(width, height)
        static = self.info.static_shape
        if static and (width, height) != (static["width"], static["height"]):
            raise SdonnxError(f"this model was exported for {static['width']}x{static['height']} only, "
                              f"not {width}x{height}")
        if self.info.unet_in_channels != self.info.latent_channels and not self.info.is_inpaint:
            raise SdonnxError(f"{self.info.path.name}: a U-Net of {self.info.unet_in_channels} input channels is "
                              f"neither a text-to-image ({self.info.latent_channels}) nor an inpainting one "
                              f"({2 * self.info.latent_channels + 1}); it is not supported")
        if int(num_images) < 1:
            raise SdonnxError(f"num_images must be at least 1, got {num_images}")
        steps = int(steps if steps is not None else d.steps)
        if steps < 1:
            raise SdonnxError(f"steps must be at least 1, got {steps}")
        name = (scheduler or d.scheduler).lower()
        if name not in schedulers.NAMES:
            raise SdonnxError(f"unknown scheduler {name!r}; choose one of {', '.join(schedulers.NAMES)}")
        interval = self._check_interval(cache_interval)
        vae = (vae or d.vae).lower()
        self.info.vae(vae)  # a one-line error for an unknown one, or a tiny one the folder lacks
        if syntax not in prompt_syntax.SYNTAXES:
            raise SdonnxError(f"unknown prompt syntax {syntax!r}: choose {' or '.join(prompt_syntax.SYNTAXES)}")
        if isinstance(clip_skip, bool) or int(clip_skip) != clip_skip or clip_skip < 1:
            raise SdonnxError(f"clip_skip must be a whole number >= 1, got {clip_skip!r}")
        seed = secrets.randbelow(2**32) if seed is None else int(seed)
        settings = Settings(prompt, negative_prompt, steps, float(guidance if guidance is not None else d.guidance),
                            name, seed, width, height, self.info.path.name, interval,
                            None if strength is None else float(strength), vae, int(clip_skip), syntax)
        sched = schedulers.create(name, self.info.scheduler_config, steps)
        f = self.info.vae_scale_factor
        shape = (int(num_images), self.info.latent_channels, height // f, width // f)
        return _Run(settings, sched, np.random.default_rng(seed), shape)

    def _check_interval(self, cache_interval) -> int:
        if isinstance(cache_interval, bool) or int(cache_interval) != cache_interval or cache_interval < 1:
            raise SdonnxError(f"cache_interval must be a whole number >= 1, got {cache_interval!r}")
        if cache_interval > 1 and not self.info.has_step_cache:
            raise SdonnxError(f"cache_interval {cache_interval} needs the step-cache graphs, which {self.info.path.name} "
                              "lacks: export it with `sdonnx export ... --step-cache`")
        if cache_interval > 1 and self.streams:  # the step-cache graphs are whole U-Nets: no memory bound left
            raise SdonnxError(f"cache_interval {cache_interval} cannot stream: low-memory mode runs "
                              f"{self.info.path.name}'s U-Net part by part, which the step cache's whole graphs "
                              "are not; use cache_interval 1, or drop low-memory mode")
        return int(cache_interval)

    @property
    def streams(self) -> bool:
        """Whether the U-Net runs part by part: low-memory mode on a folder exported with --stream."""
        return self.low_memory and self.stream and "unet" in streamed_components(self.info.meta)

    @contextlib.contextmanager
    def _graph(self, name: str, chunks: int = 1) -> Iterator:
        """The component `name` as _using gives it, or in low-memory mode its streamed parts where it has them."""
        if self.low_memory and self.stream and name in streamed_components(self.info.meta):
            yield Streamed(*read_parts(self.info.path, self.info.meta, name), _onnxruntime_form(self.config), chunks)
            return
        with self._using(name) as component:
            yield component

    @staticmethod
    def _noise(run: _Run, latents: np.ndarray | None) -> np.ndarray:
        if latents is None:
            return run.rng.standard_normal(run.shape, dtype=np.float32)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != run.shape:
            raise SdonnxError(f"latents must have shape {run.shape}, got {latents.shape}")
        return latents

    def _noised_start(self, run: _Run, img: Image.Image, strength: float, latents, pure_at_max: bool) -> Start:
        """Encode the image and noise it to the level where `strength` of the schedule remains."""
        sched = run.sched
        clean = np.repeat(self._encode(imaging.to_array(img), run.settings.vae), run.shape[0], axis=0)
        noise = self._noise(run, latents)
        index = sched.start_index(strength)
        if index >= len(sched.timesteps):  # so little strength that no step remains: the encoded image itself
            return Start(index, clean, keep=clean, noise=noise)
        if pure_at_max and strength >= 1.0:  # inpainting at full strength starts from pure noise, as txt2img
            start = noise * sched.init_noise_sigma
        else:
            start = sched.add_noise(clean, noise, index).astype(np.float32)
        return Start(index, start, keep=clean, noise=noise)

    # ---- models ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, name: str) -> Iterator[Component]:
        """The component `name`: an open one, else opened now; low-memory mode closes it after the block."""
        if name in self.components:
            yield self.components[name]
            return
        if name not in self.info.components:
            raise SdonnxError(f"{self.info.path} has no {name}/model.onnx, which this task needs")
        component = Component(self.info.components[name], _config_for(self.info, name, self.config))
        if not self.low_memory:
            self.components[name] = component
            yield component
            return
        try:
            yield component
        finally:
            component.close()
            trim_heap()

    def forget_prompts(self) -> None:
        """Drop the cached prompt encodings, so that the next call encodes its prompts again (benchmarks time a
        whole generation, prompt encoding included, as a first call with a new prompt pays it)."""
        self._texts.clear()

    def _encode_texts(self, prompts: list[str], syntax: str = "a1111", clip_skip: int = 1) -> list:
        """One encoding per prompt, all of as many 75-token chunks as the longest prompt needs: [1, 77 * chunks, D]
        arrays, or for SDXL sdxl.Text (both encoders' hidden states and the pooled embedding). A small LRU keyed
        by the chunks' token ids, weights and the clip skip saves re-encoding repeated prompts."""
        tokenizers = (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)
        fragments = [prompt_syntax.parse(p, syntax) for p in prompts]
        chunks = [[prompt_chunks.chunk(f, tok) for f in fragments] for tok in tokenizers]
        count = max(len(c) for own in chunks for c in own)
        chunks = [[prompt_chunks.pad_chunks(c, count, tok) for c in own] for tok, own in zip(tokenizers, chunks)]
        per_prompt = list(zip(*chunks))  # each prompt: its Chunks for each tokenizer
        keys = [b"|".join(c.key() for c in own) + f"|{clip_skip}".encode() for own in per_prompt]
        missing = {k: own for k, own in zip(keys, per_prompt) if k not in self._texts}
        if missing:
            self._texts.update(zip(missing, self._run_encoders(list(missing.values()), clip_skip)))
        out = []
        for key in keys:
            self._texts.move_to_end(key)
            out.append(self._texts[key])
        while len(self._texts) > max(TEXT_CACHE_SIZE, len(prompts)):
            self._texts.popitem(last=False)
        return out

    def _run_encoders(self, prompts: list[tuple], clip_skip: int) -> list:
        """Each prompt's chunks (one Chunks per tokenizer) through the text encoder(s), the sessions opened once
        for all of them, which matters in low-memory mode; the results are read-only (shared between calls)."""
        if self.info.is_sdxl:  # one encoder after the other: in low-memory mode only one is loaded at a time
            runs = []
            for k, name in enumerate(("text_encoder", "text_encoder_2")):
                with self._using(name) as encoder:
                    runs.append([sdxl.run_encoder(encoder, own[k], clip_skip) for own in prompts])
            texts = [sdxl.join(first, second) for first, second in zip(*runs)]
            for text in texts:
                text.hidden.setflags(write=False)
                text.pooled.setflags(write=False)
            return texts
        with self._using(self._text_graph(clip_skip)) as encoder:
            output, norm = text_encoding.clip_skip_reader(encoder, clip_skip)
            hiddens = [text_encoding.encode(encoder, own[0], output, norm) for own in prompts]
        for hidden in hiddens:
            hidden.setflags(write=False)
        return hiddens

    def _text_graph(self, clip_skip: int) -> str:
        """The text-encoder graph a clip skip reads: optimum's for 1, the one with every layer's output else."""
        if clip_skip == 1:
            return "text_encoder"
        if HIDDEN_STATES_GRAPH not in self.info.components:
            raise SdonnxError(f"clip skip {clip_skip} needs the text encoder's layer outputs "
                              f"({self.info.path.name} has no text_encoder/model_hidden_states.onnx): "
                              "re-export it with this version of `sdonnx export`")
        return HIDDEN_STATES_GRAPH

    def _encode(self, pixels: np.ndarray, vae: str | None = None) -> np.ndarray:
        """[-1, 1] pixels -> scaled latents; the mean of the latent distribution, so img2img is deterministic."""
        name, _, scale, shift = self.info.vae(vae)
        with self._using(name) as encoder:
            out = encoder(sample=pixels)
        if "latent_parameters" in out:
            moments = out["latent_parameters"]
            latents = moments[:, : moments.shape[1] // 2]
        else:  # older exports sample inside the graph; a tiny VAE's encoder gives the latents themselves
            latents = out["latent_sample"]
        return ((latents - shift) * scale).astype(np.float32)

    def _decode(self, latents: np.ndarray, vae: str | None = None) -> np.ndarray:
        """Scaled latents -> [0, 1] pixels (NHWC) through the `full` or `tiny` VAE decoder."""
        _, name, scale, shift = self.info.vae(vae)
        raw = latents / scale + shift
        with self._graph(name) as decoder:
            if self.tiles is None or name == VAES["tiny"][1]:  # the tiny decoder needs little memory: never tiled
                sample = decoder(latent_sample=raw)["sample"]
            else:
                sample = decode_tiled(lambda z: decoder(latent_sample=z)["sample"], raw, self.tiles,
                                      self.info.vae_scale_factor)
        if not np.isfinite(sample).all():
            raise SdonnxError(f"{name} produced NaN/inf (an fp16 overflow?): use an fp32 {name}")
        return imaging.decoded_to_unit(sample)

    def preview(self, latents: np.ndarray, downscale: int = 1) -> list[Image.Image]:
        """A quick look at a run's current latents (a step callback's third argument) through the tiny VAE.

        downscale k: the latents averaged over k x k blocks first, a picture k times smaller for about 1/k^2 of the
        decoder's work (generate --preview-every uses PREVIEW_DOWNSCALE)."""
        if downscale > 1:
            n, c, h, w = latents.shape
            h, w = h // downscale, w // downscale
            latents = latents[:, :, :h * downscale, :w * downscale].reshape(n, c, h, downscale, w, downscale)
            latents = latents.mean(axis=(3, 5))
        return imaging.to_pil(self._decode(latents, "tiny"))

    def component(self, name: str) -> Component:
        """The open session of component `name`, opened now if it is not yet (not in low-memory mode)."""
        with self._using(name) as component:
            return component

    def guidance_input(self, w: float, batch: int) -> dict[str, np.ndarray]:
        """An LCM U-Net's `timestep_cond` input for guidance scale w ({} for other U-Nets)."""
        return sampling.conditioning(w, self.info.guidance_embedding_dim, batch)[1]

    def added_inputs(self, batch: int, width: int, height: int) -> dict[str, np.ndarray]:
        """An SDXL U-Net's inputs beside the text encodings, for `batch` images of width x height of the empty
        prompt ({} for other U-Nets): what a lone U-Net call (a benchmark's) needs."""
        if not self.info.is_sdxl:
            return {}
        text = self._encode_texts([""])[0]
        return sdxl.unet_inputs([text] * batch, 1, height, width)[1]

    # ---- the loop ----------------------------------------------------------------------------------

    def _generate(self, run: _Run, start: Start, callback, output_type):
        s, n = run.settings, run.shape[0]
        if self.info.is_inpaint and start.extra is None:
            raise SdonnxError(f"{self.info.path.name} is an inpainting model ({self.info.unet_in_channels}-channel "
                              "U-Net): use inpaint() / --init-image with --mask")
        if self.info.is_lcm and s.negative_prompt:
            raise SdonnxError(f"{self.info.path.name} is an LCM-distilled U-Net, which takes the guidance scale "
                              "as an input and has no negative prompt")
        w, inputs = sampling.conditioning(s.guidance, self.info.guidance_embedding_dim, n)
        context, more = self._conditioning(s, w, n)
        with self._predictor(context, w, {**inputs, **more}, s.cache_interval) as predict:
            latents = sampling.denoise(run.sched, start, predict, run.rng, callback)
        pixels = self._decode(latents, s.vae)
        if start.paste is not None:
            original, mask = start.paste
            pixels = original * (1.0 - mask) + pixels * mask
        if output_type == "np":
            return pixels.astype(np.float32)
        images = imaging.to_pil(pixels)
        for image in images:
            image.info["sdonnx"] = s
        return images

    def _conditioning(self, s: Settings, w: float, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(encoder_hidden_states, other text inputs of the U-Net) for n images: the prompt's encoding, or with
        classifier-free guidance (w > 1) the negative prompt's then the prompt's. SDXL adds its pooled embedding
        and size numbers, and an empty negative prompt is zeros where the model asks for that."""
        xl = self.info.is_sdxl
        zeros = xl and w > 1.0 and s.negative_prompt == "" and self.info.force_zeros_for_empty_prompt
        prompts = [s.prompt] if w <= 1.0 or zeros else [s.negative_prompt, s.prompt]
        texts = self._encode_texts(prompts, s.prompt_syntax, s.clip_skip)
        if not xl:
            return np.concatenate([np.repeat(t, n, axis=0) for t in texts]), {}
        if zeros:
            texts = [texts[0].zeros(), texts[0]]
        return sdxl.unet_inputs(texts, n, s.height, s.width)

    @contextlib.contextmanager
    def _predictor(self, context: np.ndarray, w: float, inputs: dict, interval: int) -> Iterator[sampling.Predict]:
        """The loop's model callable, its graphs open while the loop runs: the guided U-Net, or with the step
        cache the full graph every `interval`-th step and the shallow one between."""
        split = self.low_memory
        if self.streams:  # each part loaded once per step, and run on both halves of a guided batch
            with self._graph("unet", chunks=2 if w > 1.0 else 1) as unet:
                yield sampling.every_step(sampling.guided(unet, context, w, False, **inputs))
            return
        if interval == 1:
            with self._using("unet") as unet:
                context = _fit_text_length(unet, context)
                yield sampling.every_step(sampling.guided(unet, context, w, split, **inputs))
            return
        with self._using("unet_features") as full, self._using("unet_shallow") as shallow:
            context = _fit_text_length(full, context)
            yield sampling.step_cache(sampling.guided(full, context, w, split, **inputs),
                                      sampling.guided(shallow, context, w, split, **inputs), interval)


def _config_for(info: ModelInfo, name: str, config: SessionConfig) -> SessionConfig:
    """The session settings of one component: on `--provider openvino`, a graph in ONNX Runtime's own int8 form
    (the dynamic int8 text encoder of every int8 scheme) runs on ONNX Runtime's CPU provider, where it is faster
    than OpenVINO runs it, beside the graphs OpenVINO runs."""
    return _onnxruntime_form(config) if info.onnxruntime_only(name) else config


def _onnxruntime_form(config: SessionConfig) -> SessionConfig:
    """Settings for a graph in ONNX Runtime's own form (its dynamic int8; the streamed parts, saved with its contrib-op
    fusions, which OpenVINO cannot read): on `--provider openvino`, ONNX Runtime's CPU provider."""
    if config.provider.lower() == "openvino":
        return dataclasses.replace(config, provider="cpu", provider_options=None)
    return config


def _check_strength(strength: float) -> None:
    if not 0.0 < float(strength) <= 1.0:
        raise SdonnxError(f"strength must be in (0, 1], got {strength}")


def _fit_text_length(unet: Component, context: np.ndarray) -> np.ndarray:
    """The text encodings a U-Net graph takes: a graph with a fixed text length (a --static export, or one exported
    before long prompts) gets each prompt's first chunk only, with a warning, as a too-long prompt was cut before."""
    port = getattr(unet, "inputs", {}).get("encoder_hidden_states")
    fixed = port.shape[1] if port is not None and len(port.shape) == 3 else None
    if not isinstance(fixed, int) or fixed >= context.shape[1]:
        return context
    warnings.warn(f"this model's U-Net takes {fixed} text positions, one 75-token chunk: only the prompts' first "
                  f"chunks were used (re-export the model without --static for long prompts)", stacklevel=4)
    return context[:, :fixed]
