"""OpenAI's images API (`POST /v1/images/generations`), mapped to a worker Job and back.

`size` left out (or "auto") is the model folder's own size, as are steps, guidance and sampler: OpenAI's API has
no such fields. sdonnx reads a few of its own when given: negative_prompt, steps, guidance, sampler, seed."""

from __future__ import annotations

import time

from .. import a1111 as names
from ..errors import SdonnxError
from ..model import ModelInfo
from .a1111 import _float, _int, _str
from .worker import Job, check_size, seeds_from

MAX_N = 10  # OpenAI's own limit for n
KNOWN = {"prompt", "n", "size", "response_format", "model", "negative_prompt", "steps", "guidance", "sampler", "seed"}


def parse(body: dict, info: ModelInfo, max_pixels: int | None) -> Job:
    """A generations body -> the job to run, or a one-line SdonnxError."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise SdonnxError("prompt is required: a non-empty string")
    fmt = body.get("response_format") or "b64_json"
    if fmt == "url":
        raise SdonnxError("response_format 'url' is not supported by this server: use 'b64_json'")
    if fmt != "b64_json":
        raise SdonnxError(f"response_format must be 'b64_json', got {fmt!r}")
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise SdonnxError(f"n must be between 1 and {MAX_N}, got {n}")
    d = info.defaults
    width, height = _size(body.get("size"), d.width, d.height)
    check_size(width, height, max_pixels)
    scheduler = d.scheduler
    if body.get("sampler"):
        try:
            scheduler = names.scheduler_of(_str(body, "sampler", None))
        except names.SamplerNameError as err:
            raise SdonnxError(str(err)) from None
    steps = _int(body, "steps", d.steps)
    if steps < 1:
        raise SdonnxError(f"steps must be at least 1, got {steps}")
    seed = body.get("seed")
    return Job("txt2img", prompt, _str(body, "negative_prompt", "") or "", steps, _float(body, "guidance", d.guidance),
               scheduler, seeds_from(None if seed is None else _int(body, "seed", -1), n), width, height)


def _size(size, width: int, height: int) -> tuple[int, int]:
    if size in (None, "", "auto"):
        return width, height
    if not isinstance(size, str) or size.count("x") != 1:
        raise SdonnxError(f"size must be 'WIDTHxHEIGHT' such as '512x512', got {size!r}")
    w, h = size.split("x")
    if not (w.isdigit() and h.isdigit()):
        raise SdonnxError(f"size must be 'WIDTHxHEIGHT' such as '512x512', got {size!r}")
    return int(w), int(h)


def ignored(body: dict) -> list[str]:
    """Fields of the request this server does not act on (quality, style, user, ...)."""
    return sorted(k for k in body if k not in KNOWN)


def response(images: list[str]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b64} for b64 in images]}


def error(message: str, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error body, which its client turns into an exception with this message."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
