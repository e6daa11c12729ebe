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

from . import upsampling
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
            phase_upsampling(model)  # at static shapes (a --static folder's wide upsamplers come phased already)
            self._compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as err:  # OpenVINO raises RuntimeError with a long multi-line message
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SdonnxError(f"OpenVINO cannot compile this graph: {first}") from err
        self._request = self._compiled.create_infer_request()


def _dims(shape) -> tuple:
    return tuple(d.get_length() if d.is_static else None for d in shape)


def phase_upsampling(model) -> int:
    """Rewrite each 2x nearest Interpolate feeding only a 3x3 Convolution (constant f32 weights, unit stride and
    dilation, padding 1, `upsampling.MIN_CHANNELS` inputs or more) into `upsampling`'s phase form (four 2x2
    Convolutions, a Concat, a DepthToSpace) where the static shapes show an exact doubling; returns how many. An
    upsampling to an odd size (a U-Net after an odd skip) is left as it is: its last row's taps differ."""
    from openvino import opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Interpolate" or not _doubles(op):
            continue
        consumers = list(op.output(0).get_target_inputs())
        conv = consumers[0].get_node() if len(consumers) == 1 else None
        if conv is None or conv.get_type_name() != "Convolution" or consumers[0].get_index() != 0:
            continue
        attrs, weight = conv.get_attributes(), conv.input_value(1).get_node()
        if (attrs.get("strides") != [1, 1] or attrs.get("dilations") != [1, 1] or
                attrs.get("pads_begin") != [1, 1] or attrs.get("pads_end") != [1, 1] or
                attrs.get("auto_pad") not in ("explicit", "notset") or weight.get_type_name() != "Constant"):
            continue
        kernel = weight.get_data()
        if kernel.ndim != 4 or kernel.shape[2:] != (3, 3) or kernel.dtype != np.float32:
            continue
        x = op.input_value(0)
        phases = [ops.convolution(x, ops.constant(k), [1, 1], *upsampling.phase_pads(a, b), [1, 1])
                  for (a, b), k in zip(upsampling.PHASES, upsampling.phase_kernels(kernel))]
        out = ops.depth_to_space(ops.concat(phases, 1), "blocks_first", 2)
        out.set_friendly_name(conv.get_friendly_name() + "/phases")
        conv.output(0).replace(out.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def _doubles(op) -> bool:
    """Whether an Interpolate is a 2x nearest upsampling of a static [N, C >= MIN_CHANNELS, H, W] tensor whose
    output pixel (i, j) reads input pixel (i // 2, j // 2): by sizes, or by constant scales of exactly 2."""
    attrs = op.get_attributes()
    src, dst = op.get_input_partial_shape(0), op.get_output_partial_shape(0)
    if (attrs.get("mode") != "nearest" or attrs.get("coordinate_transformation_mode") != "asymmetric"
            or attrs.get("nearest_mode") != "floor" or attrs.get("antialias")
            or any(attrs.get("pads_begin", [])) or any(attrs.get("pads_end", []))
            or not (src.is_static and dst.is_static) or len(src) != 4):
        return False
    n, c, h, w = (d.get_length() for d in src)
    if [d.get_length() for d in dst] != [n, c, 2 * h, 2 * w] or c < upsampling.MIN_CHANNELS:
        return False
    if attrs.get("shape_calculation_mode") == "sizes":
        return True
    # by scales (one input of floats): output pixel i reads floor(i / scale), so the scale itself must be 2
    scales = [op.input_value(i).get_node() for i in range(1, op.get_input_size())
              if op.input_value(i).get_element_type().is_real()]
    return (len(scales) == 1 and scales[0].get_type_name() == "Constant"
            and set(np.asarray(scales[0].get_data()).ravel().tolist()) <= {1.0, 2.0})
