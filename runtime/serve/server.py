"""Run the app in this process with uvicorn: one model, one worker thread."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from ..pipeline import Pipeline
from .app import ServeConfig, create_app
from .worker import Worker


def build(model_dir: str | Path | None = None, provider: str = "cpu", max_queue: int = 16, batching: bool = True,
          config: ServeConfig | None = None):
    """(app, worker) over a freshly loaded model folder (default: the bundled tiny model)."""
    worker = Worker(Pipeline.load(model_dir, provider=provider), max_queue=max_queue, batching=batching)
    return create_app(worker, config), worker


def run(model_dir: str | Path | None, provider: str, host: str, port: int, max_queue: int, batching: bool,
        config: ServeConfig, log_level: str = "info") -> None:
    app, worker = build(model_dir, provider, max_queue, batching, config)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        worker.stop()
