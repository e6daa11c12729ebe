"""The HTTP app (FastAPI): AUTOMATIC1111's /sdapi/v1, OpenAI's /v1/images/generations and the page at /, over one
Worker. Every error is a 4xx/5xx with a one-line reason; nothing a request does stops the server."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import SdonnxError
from . import a1111, openai
from .codec import infotext, png_base64
from .worker import Interrupted, Job, QueueFull, Worker

POLL_S = 0.2  # how often a waiting request looks for its client having left
PUBLIC = ("/", "/favicon.ico")  # served without credentials: the page asks for the API key itself
MAX_BODY = 64 * 2**20  # bytes of one request body (base64 images included)


@dataclass
class ServeConfig:
    max_pixels: int | None = None
    timeout: float | None = 600.0  # seconds a request may wait and run
    api_key: str | None = None  # bearer token
    api_auth: str | None = None  # "user:pass" for HTTP basic auth, as A1111's --api-auth
    replica: str | None = None  # which Ray Serve replica this is (None: a single process)
    options: dict[str, Any] = field(default_factory=dict)  # /sdapi/v1/options as set by clients


class Failure(Exception):
    """An HTTP error with its one-line reason."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _error_body(path: str, status: int, message: str) -> dict:
    if path.startswith("/v1/"):
        return openai.error(message, "rate_limit_error" if status == 429 else "invalid_request_error"
                            if status < 500 else "server_error")
    return {"error": {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 429: "TooManyRequests",
                      504: "Timeout"}.get(status, "Error"), "detail": message}


def create_app(worker: Worker, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app over `worker`; Ray Serve replicas build the same one around their own worker."""
    config = config or ServeConfig()
    app = FastAPI(title="sdonnx", version=__version__, docs_url="/docs", redoc_url=None)
    info = worker.pipe.info
    served_by = {"pid": os.getpid(), "replica": config.replica}
    durations: list[float] = []  # recent seconds per request, for Retry-After

    @app.exception_handler(Failure)
    async def failure(request: Request, err: Failure):
        return JSONResponse(_error_body(request.url.path, err.status, err.message), err.status, err.headers)

    @app.exception_handler(SdonnxError)
    async def bad_request(request: Request, err: SdonnxError):
        return JSONResponse(_error_body(request.url.path, 400, _one_line(err)), 400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        return JSONResponse(_error_body(request.url.path, 500, f"{type(err).__name__}: {_one_line(err)}"), 500)

    if config.api_key or config.api_auth:
        app.add_middleware(Authenticate, config=config)

    async def body_of(request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise Failure(413, f"request body over {MAX_BODY // 2**20} MiB")
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Failure(400, f"invalid JSON: {err}") from None
        if not isinstance(body, dict):
            raise Failure(400, "the request body must be a JSON object")
        return body

    async def run(request: Request, job: Job) -> Job:
        """Queue the job and wait for it; a client that leaves or runs out of time frees its place."""
        loop, done = asyncio.get_running_loop(), asyncio.Event()
        job.on_done = lambda _: None if loop.is_closed() else loop.call_soon_threadsafe(done.set)
        deadline = None if not config.timeout else time.monotonic() + config.timeout
        job.deadline = deadline
        started = time.monotonic()
        try:
            worker.submit(job)
        except QueueFull as err:
            raise Failure(429, f"server busy: {err}", {"Retry-After": str(_retry_after(durations, worker))}) from None
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:  # the server shutting down with this request waiting
                worker.cancel(job)
                raise
            if done.is_set():
                break
            if deadline is not None and time.monotonic() > deadline:
                worker.cancel(job)
                raise Failure(504, f"timed out after {config.timeout:g} s (--timeout)")
            if await request.is_disconnected():
                worker.cancel(job)
                raise Failure(499, "client disconnected")
        durations[:] = [*durations[-19:], time.monotonic() - started]
        if isinstance(job.error, Interrupted) and deadline is not None and time.monotonic() > deadline:
            # the worker stops a run past its deadline itself; that may land before this loop looks at the clock
            raise Failure(504, f"timed out after {config.timeout:g} s (--timeout)")
        if isinstance(job.error, Interrupted):
            return job
        if isinstance(job.error, ValueError):  # the pipeline's one-line verdict on the request
            raise Failure(400, _one_line(job.error))
        if job.error is not None:
            raise job.error
        return job

    async def encoded(job: Job) -> list[str]:
        pairs = list(zip(job.images, job.settings))
        return await run_in_threadpool(lambda: [png_base64(img, infotext(s)) for img, s in pairs])

    async def sdapi(request: Request, task: str) -> dict:
        body = await body_of(request)
        parsed = a1111.parse(body, task, config.options, info.path.name, config.max_pixels, worker.accepts_clip_skip)
        job = await run(request, parsed.job)
        return a1111.response(parsed, await encoded(job), served_by, interrupted=job.error is not None)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await sdapi(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await sdapi(request, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        p = worker.progress
        image = None
        if p.jobs and not skip_current_image:
            preview = await run_in_threadpool(worker.preview)
            image = png_base64(preview, None) if preview is not None else None
        return a1111.progress(p.step, p.total, p.started, p.jobs, worker.queued(), p.interrupted, image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():  # one image per call here, so skipping it is interrupting it
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return a1111.sd_models(info.path.name, str(info.path))

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": info.path.name, a1111.CLIP_SKIP: 1, "samples_format": "png",
                **config.options}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await body_of(request)
        a1111.check_options(body, info.path.name)
        if config.replica is not None and a1111.CLIP_SKIP in body:  # the others would keep theirs, silently
            raise Failure(400, f"{a1111.CLIP_SKIP} cannot be set for a Ray Serve deployment (each replica holds "
                               "its own options): send it in each request's override_settings")
        config.options.update(body)
        return None

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await body_of(request)
        job = await run(request, openai.parse(body, info, config.max_pixels))
        if job.error is not None:
            raise Failure(503, "the job was interrupted")
        out = openai.response(await encoded(job))
        out["sdonnx"] = {"ignored": openai.ignored(body), "seeds": job.seeds, "served_by": served_by,
                         "batched_with": job.batched_with}
        return out

    @app.get("/sdonnx/v1/status")
    async def status():
        d = info.defaults
        return {"model": info.path.name, "version": __version__, "served_by": served_by, "queued": worker.queued(),
                "busy": worker.busy(), "served": worker.served, "has_preview": worker.has_preview,
                "max_pixels": config.max_pixels, "batching": worker.batching,
                "defaults": {"steps": d.steps, "guidance": d.guidance, "width": d.width, "height": d.height,
                             "sampler": a1111.names.sampler_of(d.scheduler)[0] + (
                                 " Karras" if d.scheduler in a1111.names.KARRAS else "")}}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return app


class Authenticate:
    """Bearer token or basic auth on every path, as plain ASGI (a BaseHTTPMiddleware would hide the client's
    disconnect from the routes, which free a waiting request's place on it)."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope.get("method") == "GET" and scope["path"] in PUBLIC:  # the page holds no data; it asks for the key
            return await self.app(scope, receive, send)
        if _authorized(headers.get(b"authorization", b"").decode("latin-1"), self.config):
            return await self.app(scope, receive, send)
        extra = {"WWW-Authenticate": 'Basic realm="sdonnx"'} if self.config.api_auth else {}
        response = JSONResponse(_error_body(scope["path"], 401, "missing or wrong credentials"), 401, extra)
        await response(scope, receive, send)


def _authorized(header: str, config: ServeConfig) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and config.api_key:
        return secrets.compare_digest(value.strip().encode(), config.api_key.encode())
    if scheme.lower() == "basic" and config.api_auth:
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(given, config.api_auth.encode())
    return False


def _retry_after(durations: list[float], worker: Worker) -> int:
    """Seconds until a place is likely free: the queue ahead at the recent pace."""
    pace = sum(durations) / len(durations) if durations else 5.0
    return max(1, round(pace * max(worker.queued(), 1) / max(worker.max_batch if worker.batching else 1, 1)))
