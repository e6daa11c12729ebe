"""The same app as a Ray Serve deployment: each replica loads its own model and runs its own worker; Ray's proxy
spreads the HTTP requests over them (`sdonnx serve --ray --replicas N`, or `serve run` on serve_config.yaml)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import ray
from ray import serve

from .app import ServeConfig
from .server import build


@serve.deployment(name="sdonnx", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class SdonnxReplica:
    """One replica: a model, a worker thread and the FastAPI app over them."""

    def __init__(self, model_dir: str | None = None, provider: str = "cpu", max_queue: int = 16,
                 batching: bool = True, config: dict | None = None):
        replica = serve.get_replica_context().replica_id.unique_id
        settings = ServeConfig(**{**(config or {}), "replica": replica})
        self.asgi, self.worker = build(model_dir, provider, max_queue, batching, settings)

    def __serve_build_asgi_app__(self):
        return self.asgi

    def __del__(self):
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()


def application(model_dir: str | Path | None = None, provider: str = "cpu", max_queue: int = 16,
                batching: bool = True, config: ServeConfig | None = None, replicas: int = 2):
    """The bound Ray Serve application; Ray's router sends a replica no more requests than its queue holds."""
    config = config or ServeConfig()
    options = {k: v for k, v in asdict(config).items() if k not in ("replica", "options")}
    deployment = SdonnxReplica.options(num_replicas=replicas, max_ongoing_requests=max_queue + 1)
    return deployment.bind(None if model_dir is None else str(model_dir), provider, max_queue, batching, options)


def app_builder(args: dict):
    """`serve run sdonnx.serve.ray:app_builder model_dir=... replicas=2` (see serve_config.yaml)."""
    return application(args.get("model_dir"), args.get("provider", "cpu"), int(args.get("max_queue", 16)),
                       str(args.get("batching", "true")).lower() != "false", ServeConfig(),
                       int(args.get("replicas", 2)))


def start(host: str, port: int, app, address: str | None = None) -> None:
    """Ray on this machine (or `address`), Serve's HTTP proxy on host:port, and the app deployed."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1" if host in ("127.0.0.1", "localhost")
                     else None, runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}}
                     if os.environ.get("OMP_NUM_THREADS") else None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="sdonnx", route_prefix="/")


def run(model_dir, provider: str, host: str, port: int, max_queue: int, batching: bool, config: ServeConfig,
        replicas: int) -> None:
    start(host, port, application(model_dir, provider, max_queue, batching, config, replicas))
    print(f"sdonnx on Ray Serve: {replicas} replicas at http://{host}:{port} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
