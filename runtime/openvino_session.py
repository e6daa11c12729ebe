"""Our ONNX graphs on OpenVINO's CPU kernels (`--provider openvino`, the `sdonnx[openvino]` extra).

OpenVINO reads ONNX files directly; this wraps a compiled model behind the small part of ONNX Runtime's
`InferenceSession` interface that `session.Component` uses (get_inputs, get_outputs, run), so every pipeline,
the benchmarks and low-memory mode work unchanged. On CPUs with AVX512-BF16 or AMX, OpenVINO computes float
graphs in bf16 by default; `provider_options={"INFERENCE_PRECISION_HINT": "f32"}` keeps fp32.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import openvino_rewrites
from .errors import SdonnxError

# OpenVINO element type names -> the ONNX type strings ONNX Runtime reports
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)", "i64": "tensor(int64)",
          "i32": "tensor(int32)"}
# OpenVINO's model cache, when this names a folder: a second load of the same graph and shapes skips compilation.
# Off by default: a cache hit of a reshaped model read from ONNX costs about the compiled model's size in extra
# resident memory (SD-Turbo int8, 512x512: 7.9 GB peak against 5.5 GB without it).
CACHE_ENV = "SDONNX_OPENVINO_CACHE"


def available() -> bool:
    """Whether the openvino package is importable (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _openvino():
    try:
        import openvino
    except ImportError as err:
        raise SdonnxError("provider 'openvino' needs the openvino package: pip install 'sdonnx[openvino]'") from err
    return openvino


def cache_dir() -> Path | None:
    """Where compiled models are cached: $SDONNX_OPENVINO_CACHE, else nowhere."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else None


@dataclass(frozen=True)
class _Port:
    name: str
    type: str
    shape: tuple


class OpenVINOSession:
    """A compiled OpenVINO model with ONNX Runtime's session interface.

    Static shapes run faster on OpenVINO's CPU plugin than dynamic ones, so the graph is reshaped to the shapes of
    each new call and compiled for them (one compiled model kept at a time; reading the ONNX file again for it
    takes well under a second)."""

    def __init__(self, path: str | Path, threads: int, options: dict | None = None, static: bool = True):
        ov = _openvino()
        self._core = ov.Core()
        cache = cache_dir()
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                self._core.set_property({"CACHE_DIR": str(cache)})
            except OSError:
                pass  # no cache: every compile is a full one, nothing worse
        self._path = str(path)
        model = self._core.read_model(self._path)
        self._config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
                                        **(options or {})}
        self._static = static
        self._lock = threading.Lock()
        self._compiled = None
        self._shapes: tuple | None = None
        self._inputs = [_Port(p.get_any_name(), _TYPES.get(p.get_element_type().get_type_name(), "tensor(float)"),
                              _dims(p.get_partial_shape())) for p in model.inputs]
        self._outputs = [_Port(p.get_any_name(), _TYPES.get(p.get_element_type().get_type_name(), "tensor(float)"),
                               _dims(p.get_partial_shape())) for p in model.outputs]
        del model  # read again for each compile: a model kept beside its compiled form holds its weights twice
        if not self._static or all(all(isinstance(d, int) for d in p.shape) for p in self._inputs):
            self._compile(None)  # nothing to specialise: compile now, so load time is load time

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        shapes = tuple((name, np.shape(value)) for name, value in sorted(feeds.items()))
        with self._lock:  # one infer request, recompiled on a new shape: callers on two threads take turns
            if self._compiled is None or (self._static and shapes != self._shapes):
                self._compile(dict(shapes) if self._static else None)
                self._shapes = shapes
            result = self._request.infer(feeds)
            # by position: a tensor may carry several names and the compiled port need not report the ONNX one
            # first; copies, because the request reuses its output buffers on the next call
            return [np.array(result[i], copy=True) for i in range(len(self._outputs))]

    def _compile(self, shapes: dict | None) -> None:
        self._compiled = self._request = None  # free the previous compiled model before building the next
        model = self._core.read_model(self._path)
        if shapes:
            model.reshape({name: list(shape) for name, shape in shapes.items()})
        try:
            openvino_rewrites.apply(model)  # exact rewrites at the static shapes
            self._compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as err:  # OpenVINO raises RuntimeError with a long multi-line message
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SdonnxError(f"OpenVINO cannot compile this graph: {first}") from err
        self._request = self._compiled.create_infer_request()


def _dims(shape) -> tuple:
    return tuple(d.get_length() if d.is_static else None for d in shape)
