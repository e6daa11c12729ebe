"""One model, one generating thread, a bounded queue: requests wait their turn, and waiting txt2img requests that
differ only in their seeds run as one batched pipeline call."""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..errors import SdonnxError
from ..pipeline import PREVIEW_DOWNSCALE, Pipeline, Settings
from .. import schedulers

MAX_BATCH = 8  # images in one batched call: past this the U-Net's activations grow with little gain on a CPU


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class Interrupted(Exception):
    """The job was stopped between two denoising steps (interrupt, disconnect or timeout)."""


def accepts(method: Callable, name: str) -> bool:
    """Whether a Pipeline method takes keyword `name` (clip_skip arrives with prompt syntax in another change)."""
    return name in inspect.signature(method).parameters


@dataclass
class Job:
    """One request's generation: what to run and, once run, its images and their settings."""

    task: str  # txt2img | img2img | inpaint
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    scheduler: str
    seeds: list[int]  # one per image; image k is what a one-image request with seeds[k] gives
    width: int
    height: int
    strength: float | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    clip_skip: int | None = None
    deadline: float | None = None  # time.monotonic() past which the job is dropped
    # filled in by the worker
    images: list[Image.Image] = field(default_factory=list)
    settings: list[Settings] = field(default_factory=list)
    error: BaseException | None = None
    batched_with: int = 0  # other requests that shared its pipeline call
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    on_done: Callable[["Job"], None] | None = field(default=None, repr=False)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one call (None: never batched)."""
        if self.task != "txt2img":
            return None
        return (self.prompt, self.negative_prompt, self.steps, self.guidance, self.scheduler, self.width,
                self.height, self.clip_skip)

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


@dataclass
class Progress:
    """What /sdapi/v1/progress reports about the call that runs now."""

    step: int = 0
    total: int = 0
    started: float = 0.0  # time.time() of the call's start
    jobs: int = 0  # requests in the running call
    latents: np.ndarray | None = None
    interrupted: bool = False


class Worker:
    """Owns a Pipeline and the thread that runs it; every public method is safe to call from any thread."""

    def __init__(self, pipe: Pipeline, max_queue: int = 16, batching: bool = True, max_batch: int = MAX_BATCH):
        self.pipe = pipe
        self.max_queue = max_queue
        self.batching = batching
        self.max_batch = max_batch
        self.progress = Progress()
        self.served = 0  # requests answered, for the page and the tests
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._lock = threading.Condition()
        self._preview_lock = threading.Lock()
        self._preview: tuple[tuple[int, int], Image.Image | None] = ((0, -1), None)  # ((call, step), picture)
        self._stopped = False
        self._clip_skip = accepts(pipe.txt2img, "clip_skip")
        if self.has_preview:  # opened now, so previews from request threads never race to open it
            pipe.component("vae_decoder_tiny")
        self._thread = threading.Thread(target=self._loop, name="sdonnx-worker", daemon=True)
        self._thread.start()

    # ---- the request side -----------------------------------------------------------------------

    @property
    def has_preview(self) -> bool:
        return "vae_decoder_tiny" in self.pipe.info.components

    @property
    def accepts_clip_skip(self) -> bool:
        return self._clip_skip

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._stopped:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose client left or timed out: a waiting one frees its place now, a running one stops at
        the next step unless other requests share its call."""
        with self._lock:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.finish(Interrupted("cancelled while waiting"))

    def interrupt(self) -> bool:
        """Stop the running call at its next step (A1111's /interrupt); False when nothing runs."""
        with self._lock:
            if not self._running:
                return False
            self.progress.interrupted = True
            return True

    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def preview(self) -> Image.Image | None:
        """The tiny VAE's picture of the running call's first image (None: idle, no step yet, or no tiny VAE)."""
        p = self.progress
        latents, step = p.latents, p.step
        if latents is None or not self.has_preview:
            return None
        with self._preview_lock:  # one decode per step of this call, however many pollers
            if self._preview[0] != (id(p), step):
                self._preview = ((id(p), step), self.pipe.preview(latents[:1], PREVIEW_DOWNSCALE)[0])
            return self._preview[1]

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for job in self._waiting:
                job.finish(Interrupted("the server is shutting down"))
            self._waiting.clear()
            self.progress.interrupted = True
            self._lock.notify_all()
        self._thread.join(timeout=30)

    # ---- the worker thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                jobs = [self._waiting.popleft()]
                self._running = jobs
                self.progress = Progress(started=time.time(), jobs=1)
            try:
                self._batch(jobs)
                self._run(jobs)
            except BaseException as err:  # a failed call fails its requests, never the server
                for job in jobs:
                    if not job.done.is_set():
                        job.finish(err)
            finally:
                with self._lock:
                    self._running = []
                    self.progress = Progress()
                    self.served += len(jobs)

    def _batch(self, jobs: list[Job]) -> None:
        """With batching, move the waiting jobs that can share the first one's call into `jobs`."""
        first = jobs[0]
        key = first.batch_key()
        if not self.batching or key is None or self._stochastic(first):
            return
        with self._lock:
            images = len(first.seeds)
            for job in list(self._waiting):
                if job.batch_key() == key and images + len(job.seeds) <= self.max_batch:
                    self._waiting.remove(job)
                    jobs.append(job)
                    images += len(job.seeds)
            self.progress.jobs = len(jobs)

    def _stochastic(self, job: Job) -> bool:
        """Samplers that draw fresh noise every step: batching would tie each image's noise to the batch."""
        try:
            return schedulers.create(job.scheduler, self.pipe.info.scheduler_config, job.steps).needs_noise
        except ValueError:  # the pipeline says why when the job runs alone
            return True

    def _callback(self, jobs: list[Job]) -> Callable[[int, int, np.ndarray], None]:
        def step(k: int, total: int, latents: np.ndarray) -> None:
            now = time.monotonic()
            if self.progress.interrupted or self._stopped:
                raise Interrupted("interrupted")
            if all(j.cancelled or (j.deadline is not None and now > j.deadline) for j in jobs):
                raise Interrupted("every request of this call was cancelled or timed out")
            self.progress.step, self.progress.total, self.progress.latents = k + 1, total, latents
        return step

    def _run(self, jobs: list[Job]) -> None:
        first = jobs[0]
        extra = {"clip_skip": first.clip_skip} if first.clip_skip is not None else {}
        callback = self._callback(jobs)
        if len(jobs) > 1 or (first.task == "txt2img" and not self._stochastic(first)):
            images = self._batched(jobs, callback, extra)
        else:
            images = [img for seed in first.seeds for img in self._one(first, seed, callback, extra)]
        start = 0
        for job in jobs:
            n = len(job.seeds)
            job.images = images[start:start + n]
            job.settings = [dataclasses.replace(img.info["sdonnx"], seed=seed)
                            for img, seed in zip(job.images, job.seeds)]
            job.batched_with = len(jobs) - 1
            start += n
            job.finish()

    def _batched(self, jobs: list[Job], callback, extra: dict) -> list[Image.Image]:
        """One txt2img call for all their images, each image's noise drawn from its own seed as a one-image call
        would draw it, so batching changes no picture (for samplers that draw no noise while they step)."""
        first, info = jobs[0], self.pipe.info
        f = info.vae_scale_factor
        shape = (1, info.latent_channels, first.height // f, first.width // f)
        seeds = [s for job in jobs for s in job.seeds]
        images: list[Image.Image] = []
        for start in range(0, len(seeds), self.max_batch):  # one request's many images too: max_batch per call
            group = seeds[start:start + self.max_batch]
            latents = np.concatenate([np.random.default_rng(s).standard_normal(shape, dtype=np.float32)
                                      for s in group])
            images += self.pipe.txt2img(first.prompt, first.negative_prompt, steps=first.steps,
                                        guidance=first.guidance, scheduler=first.scheduler, seed=group[0],
                                        width=first.width, height=first.height, num_images=len(group),
                                        latents=latents, callback=callback, **_supported(self.pipe.txt2img, extra))
        return images

    def _one(self, job: Job, seed: int, callback, extra: dict) -> list[Image.Image]:
        common: dict[str, Any] = dict(negative_prompt=job.negative_prompt, steps=job.steps, guidance=job.guidance,
                                      scheduler=job.scheduler, seed=seed, width=job.width, height=job.height,
                                      callback=callback)
        if job.task == "inpaint":
            return self.pipe.inpaint(job.prompt, job.image, job.mask, strength=job.strength, **common,
                                     **_supported(self.pipe.inpaint, extra))
        if job.task == "img2img":
            return self.pipe.img2img(job.prompt, job.image, strength=job.strength, **common,
                                     **_supported(self.pipe.img2img, extra))
        return self.pipe.txt2img(job.prompt, **common, **_supported(self.pipe.txt2img, extra))


def _supported(method: Callable, options: dict) -> dict:
    """The options `method` takes (clip_skip may reach txt2img before img2img)."""
    return {k: v for k, v in options.items() if accepts(method, k)}


def random_seed() -> int:
    """A seed as A1111 draws one for seed -1."""
    return int(np.random.default_rng().integers(0, 2**32 - 1))


def seeds_from(seed: int | None, count: int) -> list[int]:
    """A1111's all_seeds: seed, seed+1, ...; -1 or None draws the first."""
    first = random_seed() if seed is None or seed == -1 else int(seed)
    return [(first + k) % 2**32 for k in range(count)]


def check_size(width: int, height: int, max_pixels: int | None) -> None:
    """Sizes a request may ask for: multiples of 8, and no more pixels than --max-pixels."""
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise SdonnxError(f"width and height must be positive multiples of 8, got {width}x{height}")
    if max_pixels and width * height > max_pixels:
        raise SdonnxError(f"{width}x{height} is {width * height} pixels, more than this server's --max-pixels "
                          f"{max_pixels}")
