"""ONNX Runtime sessions: provider choice, session options tuned for speed, and feeds adapted to each graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import openvino_session
from .errors import SdonnxError
from .system import physical_cores

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINO",  # not an ONNX Runtime provider: the openvino package runs the graph (openvino_session)
}
AUTO_ORDER = ("cuda", "dml", "cpu")
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# ONNX tensor type strings -> NumPy dtypes for the inputs SD graphs take.
ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,  # a streamed U-Net's parts hand on quantized activations (stream.py)
    "tensor(int8)": np.int8,
}


def available_providers() -> list[str]:
    """Short names (cpu, cuda, dml, openvino) of the providers usable here: this onnxruntime build's, and
    openvino when its package is installed."""
    installed = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items()
            if full in installed or (short == "openvino" and openvino_session.available())]


def resolve_provider(name: str) -> str:
    """`cpu | cuda | dml | openvino | auto` -> the provider's full name; a one-line error if it is not installed."""
    name = name.lower()
    have = available_providers()
    if name == "auto":
        return PROVIDERS[next(p for p in AUTO_ORDER if p in have or p == "cpu")]
    if name not in PROVIDERS:
        raise SdonnxError(f"unknown provider {name!r}: choose one of cpu, cuda, dml, openvino, auto "
                          f"(installed here: {', '.join(have)})")
    if name == "openvino" and name not in have:
        raise SdonnxError("provider 'openvino' needs the openvino package: pip install 'sdonnx[openvino]'")
    if name not in have:
        raise SdonnxError(f"provider {name!r} is not installed in this onnxruntime; available: {', '.join(have)}")
    return PROVIDERS[name]


@dataclass(frozen=True)
class SessionConfig:
    """Session settings; the defaults favour throughput for one image at a time."""

    provider: str = "cpu"
    threads: int | None = None  # intra-op threads; None = physical cores
    inter_threads: int = 1
    optimization: str = "all"
    mem_pattern: bool = True
    cpu_arena: bool = True
    log_severity: int = 3  # errors only: the ORT warnings about unused initializers are noise here
    provider_options: dict | None = None

    def session_options(self, provider_name: str) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads or physical_cores()
        so.inter_op_num_threads = self.inter_threads
        if self.optimization not in OPT_LEVELS:
            raise SdonnxError(f"unknown optimization level {self.optimization!r}: "
                              f"choose one of {', '.join(OPT_LEVELS)}")
        so.graph_optimization_level = OPT_LEVELS[self.optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # DirectML cannot run with memory patterns or parallel execution.
        so.enable_mem_pattern = self.mem_pattern and provider_name != PROVIDERS["dml"]
        so.enable_cpu_mem_arena = self.cpu_arena
        so.log_severity_level = self.log_severity
        return so

    def providers(self) -> list:
        """The provider list for InferenceSession, with CPU as fallback for ops a GPU provider lacks (OpenVINO:
        itself alone; its provider_options are its compile properties)."""
        name = resolve_provider(self.provider)
        if name in (PROVIDERS["cpu"], PROVIDERS["openvino"]):
            return [name]
        options = dict(self.provider_options or {})
        if name == PROVIDERS["cuda"]:
            # Fixed shapes per run: exhaustive cuDNN search pays off after the first step.
            options.setdefault("cudnn_conv_algo_search", "EXHAUSTIVE")
            options.setdefault("arena_extend_strategy", "kSameAsRequested")
        return [(name, options), PROVIDERS["cpu"]]


def session_config(provider: str = "cpu", **overrides: Any) -> SessionConfig:
    """A SessionConfig from keyword overrides, with a one-line error naming an unknown option."""
    known = set(SessionConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SdonnxError(f"unknown session option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known - {'provider'}))}")
    return SessionConfig(provider=provider, **overrides)


@dataclass(frozen=True)
class Port:
    name: str
    dtype: type
    shape: tuple  # ints for fixed dims, str/None for symbolic ones


class Component:
    """One ONNX graph; reads its signature once and adapts what we feed (dtype, timestep shape, batch)."""

    def __init__(self, path: str | Path, config: SessionConfig | None = None):
        self.path = Path(path)
        config = config or SessionConfig()
        try:
            self.session = _open(self.path, config)
        except Exception as err:  # ORT raises its own exception types; keep the message, drop the trace
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SdonnxError(f"cannot load {self.path}: {first}") from err
        self.inputs = {i.name: Port(i.name, ONNX_DTYPES.get(i.type, np.float32), tuple(i.shape))
                       for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def close(self) -> None:
        """Release the ORT session and its memory now (low-memory mode); the component cannot run after."""
        self.session = None

    @property
    def io_precision(self) -> str:
        """fp16 when the graph's float inputs are float16, else fp32 (graphs may compute in fp16 behind fp32 I/O)."""
        floats = [p.dtype for p in self.inputs.values() if p.dtype in (np.float16, np.float32)]
        return "fp16" if floats and all(d == np.float16 for d in floats) else "fp32"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size when the graph was exported with a static one."""
        dims = [p.shape[0] for p in self.inputs.values() if len(p.shape) > 1]
        return dims[0] if dims and isinstance(dims[0], int) else None

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph; float outputs come back as float32."""
        if self.session is None:
            raise SdonnxError(f"{self.path.parent.name}: session was closed")
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise SdonnxError(f"{self.path.parent.name}: graph input(s) {', '.join(missing)} not fed")
        batch = max((np.shape(v)[0] for v in feeds.values() if np.ndim(v) > 1), default=None)
        fixed = self.fixed_batch
        if fixed and batch and batch != fixed:
            return self._run_in_chunks(feeds, batch, fixed)
        return self._run({k: self._adapt(self.inputs[k], np.asarray(v), batch) for k, v in feeds.items()
                          if k in self.inputs})

    def run_with(self, feeds: dict[str, np.ndarray], made: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on `feeds` adapted as __call__ adapts them plus `made`: tensors another graph produced for this one
        (a streamed graph's parts), fed as they are."""
        if self.session is None:
            raise SdonnxError(f"{self.path.parent.name}: session was closed")
        batch = max((np.shape(v)[0] for v in feeds.values() if np.ndim(v) > 1), default=None)
        return self._run({**{k: self._adapt(self.inputs[k], np.asarray(v), batch) for k, v in feeds.items()}, **made})

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.session.run(None, feeds)
        return {name: (v.astype(np.float32) if v.dtype == np.float16 else v) for name, v in zip(self.outputs, out)}

    def _run_in_chunks(self, feeds: dict, batch: int, fixed: int) -> dict[str, np.ndarray]:
        """A static-batch graph: run slices of `fixed` rows, padding the last by repeating its final row."""
        parts: list[dict] = []
        for start in range(0, batch, fixed):
            chunk = {}
            for k, v in feeds.items():
                v = np.asarray(v)
                if np.ndim(v) > 1:
                    v = v[start:start + fixed]
                    if len(v) < fixed:
                        v = np.concatenate([v, np.repeat(v[-1:], fixed - len(v), axis=0)])
                chunk[k] = self._adapt(self.inputs[k], v, fixed)
            parts.append(self._run(chunk))
        return {k: np.concatenate([p[k] for p in parts])[:batch] for k in parts[0]}

    def _adapt(self, port: Port, value: np.ndarray, batch: int | None) -> np.ndarray:
        rank = len(port.shape)
        if value.ndim != rank:
            if rank == 0 and value.size == 1:  # a timestep given as [1] or [B] of equal values
                value = value.reshape(-1)[:1].reshape(())
            elif rank == 1 and value.size == 1:  # a scalar timestep for a graph that wants [B]
                n = port.shape[0] if isinstance(port.shape[0], int) else (batch or 1)
                value = np.full((n,), value.reshape(()), dtype=value.dtype)
            else:
                raise SdonnxError(f"{self.path.parent.name}: input {port.name!r} expects rank {rank} "
                                  f"{_shape_text(port.shape)}, got shape {tuple(value.shape)}")
        for axis, (want, got) in enumerate(zip(port.shape, value.shape)):
            if isinstance(want, int) and want != got:
                raise SdonnxError(f"{self.path.parent.name}: input {port.name!r} expects shape "
                                  f"{_shape_text(port.shape)}, got {tuple(value.shape)} (axis {axis})")
        if np.issubdtype(port.dtype, np.integer) and np.issubdtype(value.dtype, np.floating):
            value = np.round(value)
        value = value.astype(port.dtype, copy=False)
        # (np.ascontiguousarray would turn a 0-d timestep into shape [1])
        return value if value.flags.c_contiguous else value.copy(order="C")


def _open(path: Path, config: SessionConfig):
    """An ONNX Runtime session, or an OpenVINO compiled model behind the same interface."""
    providers = config.providers()
    if providers == [PROVIDERS["openvino"]]:
        return openvino_session.OpenVINOSession(path, config.threads or physical_cores(), config.provider_options)
    name = providers[0] if isinstance(providers[0], str) else providers[0][0]
    return ort.InferenceSession(str(path), sess_options=config.session_options(name), providers=providers)


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
