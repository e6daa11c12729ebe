"""ONNX Runtime's static QDQ int8 (quantize_static: QDQ format, MinMax ranges, per-channel symmetric int8 weights,
uint8 activations) for graphs whose weights live in an external data file, with one weight in memory at a time.

quantize_static holds a large model several times over (its calibration session on an augmented copy, then the
quantizer's loaded and shape-inferred copies): a full SDXL U-Net needs about 31 GB. Here the ranges come from one
ONNX Runtime session on the float graph with the needed tensors' minima and maxima added as outputs (the graph file
only is rewritten;
the session reads the weights from the data file once), and the QDQ graph is built on the graph without its
weights, each weight read, quantized with ONNX Runtime's own numeric helpers and written out in turn. Tests compare
the result with quantize_static's, node kind for node kind and value for value.

It covers what our graphs hold (Conv and MatMul nodes with an initializer weight; activations from other nodes or
graph inputs); anything else raises dynamic_int8.Unsupported, and the caller falls back to quantize_static."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from . import external
from .dynamic_int8 import FLOATS, SCRATCH, Unsupported, _load_inferred, save_quantized

WEIGHT_AXIS = {"Conv": 0, "MatMul": 1}  # each weight's output-channel axis, as quantize_static takes it
CALIBRATION_GRAPH = "_calibrate.onnx"


def quantize(src: Path, dst: Path, feeds: list[dict], op_types: tuple[str, ...], exclude: list[str],
             data_name: str, inline_below: int) -> Path:
    """quantize_static(src, dst, reader(feeds), quant_format=QDQ, op_types_to_quantize=op_types, per_channel=True,
    reduce_range=False, activation_type=QUInt8, weight_type=QInt8, nodes_to_exclude=exclude,
    calibrate_method=MinMax), weights streamed; `dst`'s weights go to `data_name` beside it when over
    `inline_below` bytes."""
    model = _load_inferred(src)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = [n for n in graph.node if n.op_type in op_types and n.name not in set(exclude)]
    _check(targets, inits)  # before the calibration session reads every weight
    activations = _activations(model, targets, inits)
    ranges = calibrate(src, model, activations, feeds)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = dst.parent / SCRATCH
    try:
        with open(scratch, "wb") as out:
            _Rewriter(model, src.parent, out).run(targets, activations, ranges)
        return save_quantized(model, src, dst, scratch, data_name, inline_below)
    finally:
        scratch.unlink(missing_ok=True)


def _check(targets: list[onnx.NodeProto], inits: dict) -> None:
    """What the rewriter reproduces: each target reads its own fp32 initializer weight (and Conv bias), with the
    output-channel axis in range."""
    seen: set[str] = set()
    for node in targets:
        name = f"{node.op_type} {node.name or '(unnamed)'}"
        if node.op_type not in WEIGHT_AXIS or len(node.input) < 2 or node.input[1] not in inits:
            raise Unsupported(f"{name} has no initializer weight")
        params = [node.input[1]] + ([_conv_bias(node)] if _conv_bias(node) else [])
        for param in params:
            init = inits.get(param)
            if init is None or init.data_type != onnx.TensorProto.FLOAT:
                raise Unsupported(f"{name}: {param} is not an fp32 initializer")
            if param in seen:  # quantize_static gives a shared bias a copy per reader; not reproduced here
                raise Unsupported(f"{name}: {param} is shared with another quantized node")
            seen.add(param)
        if WEIGHT_AXIS[node.op_type] >= len(inits[node.input[1]].dims):
            raise Unsupported(f"{name}: its weight has no axis {WEIGHT_AXIS[node.op_type]}")


def _conv_bias(node: onnx.NodeProto) -> str | None:
    """A Conv's bias input, if it has one (quantize_static makes it int32)."""
    return node.input[2] if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] else None


def _activations(model: onnx.ModelProto, targets: list[onnx.NodeProto], inits: dict) -> list[str]:
    """The tensors quantize_static puts a QDQ pair on: each target's first input and its output, when float."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.output, *graph.input)
             if v.type.HasField("tensor_type")}
    names: list[str] = []
    for node in targets:
        for name in (node.input[0], node.output[0]):
            if not name or name in inits:
                raise Unsupported(f"{node.op_type} {node.name} reads a constant or empty first input")
            if types.get(name) in FLOATS and name not in names:
                names.append(name)
    return names


def calibrate(src: Path, model: onnx.ModelProto, tensors: list[str], feeds: list[dict]) -> dict[str, tuple]:
    """MinMax ranges of `tensors` over `feeds` (as ONNX Runtime's MinMaxCalibrater: the min of the minima, the max
    of the maxima), from one session on `src`'s float graph with each tensor's ReduceMin and ReduceMax added as
    outputs."""
    import onnxruntime as ort

    if len(feeds) < 2:
        raise ValueError("static int8 needs at least 2 calibration feeds")
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)  # no weights in it: they stay in the data file, read by the session
    fetch = []
    for i, name in enumerate(tensors):  # each tensor's extremes as scalars (not the tensors: they are large)
        for op in ("ReduceMin", "ReduceMax"):
            out = f"_calibration_{op}_{i}"
            augmented.graph.node.append(onnx.helper.make_node(op, [name], [out], out, keepdims=0))
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, []))
            fetch.append(out)
    path = src.parent / CALIBRATION_GRAPH  # beside the data file, so the weights' references resolve
    try:
        onnx.save_model(augmented, str(path))
        del augmented
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        options.add_session_config_entry("session.disable_prepacking", "1")  # one copy of the weights
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    finally:
        path.unlink(missing_ok=True)
    low = np.full(len(tensors), np.inf, np.float32)
    high = np.full(len(tensors), -np.inf, np.float32)
    for feed in feeds:
        got = np.asarray(session.run(fetch, feed), dtype=np.float32).reshape(len(tensors), 2)
        low, high = np.fmin(low, got[:, 0]), np.fmax(high, got[:, 1])  # NaNs ignored, as ORT's nanmin/nanmax
    return {n: (low[i], high[i]) for i, n in enumerate(tensors)}


class _Rewriter:
    """The QDQ graph as QDQQuantizer makes it: a Q/DQ pair per activation that every reader goes through, a DQ per
    int8 weight, Conv biases int32 at input scale x weight scale."""

    def __init__(self, model: onnx.ModelProto, base: Path, out):
        self.model, self.base, self.out = model, base, out
        self.inits = {t.name: t for t in model.graph.initializer}
        self.scales: dict[str, np.ndarray] = {}  # tensor -> its scale (activations and weights)
        self.renamed: dict[str, str] = {}  # tensor -> the DQ output its readers take instead
        self.added: list[onnx.NodeProto] = []

    def run(self, targets: list[onnx.NodeProto], activations: list[str], ranges: dict) -> None:
        graph = self.model.graph
        graph_outputs = {o.name for o in graph.output}
        for name in activations:
            self._activation(name, *ranges[name], name in graph_outputs)
        for node in targets:
            bias = _conv_bias(node)
            self._weight(node.input[1], WEIGHT_AXIS[node.op_type],
                         (bias, self.scales[node.input[0]]) if bias else None)
        for node in targets:
            if _conv_bias(node):
                self._bias(_conv_bias(node), node.input[0], node.input[1])
        produced = {o: n for n in graph.node for o in n.output}
        for name in activations:
            if name in graph_outputs and name in produced:  # its producer writes the Q input; the DQ writes it
                node = produced[name]
                node.output[list(node.output).index(name)] = name + "_QuantizeLinear_Input"
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in self.renamed:
                    node.input[i] = self.renamed[name]
        graph.node.extend(self.added)

    def _activation(self, name: str, low: np.float32, high: np.float32, is_output: bool) -> None:
        from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

        qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.UINT8, reduce_range=False, symmetric=False)
        zero, scale = compute_scale_zp(low, high, qmin, qmax, False, None)
        scale_name, zp_name = name + "_scale", name + "_zero_point"
        self.model.graph.initializer.extend([
            onnx.numpy_helper.from_array(np.asarray(scale, dtype=np.float32).reshape(()), scale_name),
            onnx.numpy_helper.from_array(np.asarray(zero, dtype=np.uint8).reshape(()), zp_name)])
        q_in, dq_out = (name + "_QuantizeLinear_Input", name) if is_output else (name, name + "_DequantizeLinear_Output")
        q_out = name + "_QuantizeLinear_Output"
        helper = onnx.helper
        self.added += [helper.make_node("QuantizeLinear", [q_in, scale_name, zp_name], [q_out],
                                        name + "_QuantizeLinear"),
                       helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out],
                                        name + "_DequantizeLinear")]
        self.scales[name] = np.asarray(scale, dtype=np.float32)
        if not is_output:
            self.renamed[name] = dq_out

    def _weight(self, name: str, axis: int, bias: tuple[str, np.ndarray] | None) -> None:
        """Per-channel symmetric int8 along `axis` ([-127, 127], ONNX Runtime's numbers); the int8 tensor goes to
        the scratch file at once. `bias`: the Conv's bias and input scale, for quantize_static's int32-bias
        adjustment of the weight scales."""
        from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

        init = self.inits[name]
        weights = external.read_array(init, self.base)
        channels = [weights.take(i, axis).ravel() for i in range(weights.shape[axis])]
        params = [compute_data_quant_params(c, onnx.TensorProto.INT8, True, reduce_range=False) for c in channels]
        zeros = [zero for zero, _ in params]
        scales = np.hstack([scale for _, scale in params]).astype(np.float32)
        if bias is not None:
            scales = _bias_safe_scales(scales, external.read_array(self.inits[bias[0]], self.base), bias[1])
        shape = list(weights.shape)
        shape[axis] = 1
        quantized = np.ascontiguousarray(np.concatenate(
            [np.asarray(quantize_nparray(onnx.TensorProto.INT8, c, scales[i], zeros[i])).reshape(shape)
             for i, c in enumerate(channels)], axis), dtype=np.int8)
        del weights, channels
        q_name, scale_name, zp_name = name + "_quantized", name + "_scale", name + "_zero_point"
        self.model.graph.initializer.extend([
            onnx.helper.make_tensor(scale_name, onnx.TensorProto.FLOAT, [len(scales)], scales.tolist()),
            onnx.helper.make_tensor(zp_name, onnx.TensorProto.INT8, [len(zeros)], np.hstack(zeros).tolist())])
        self._write(q_name, onnx.TensorProto.INT8, init.dims, quantized.tobytes())
        out = name + "_DequantizeLinear_Output"
        self.added.append(onnx.helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name], [out],
                                                name + "_DequantizeLinear", axis=axis))
        self.scales[name] = scales
        self.renamed[name] = out

    def _bias(self, name: str, x: str, weight: str) -> None:
        """int32 with scale = input scale x weight scale per channel and zero point 0 (quantize_bias_static)."""
        init = self.inits[name]
        bias = external.read_array(init, self.base)
        scale = self.scales[x] * self.scales[weight]
        values = np.round(np.asarray(bias, np.float64) / np.asarray(scale, np.float64))
        info = np.iinfo(np.int32)
        quantized = np.clip(values, info.min, info.max).astype(np.int32).reshape(tuple(init.dims))
        q_name = name + "_quantized"
        zero = (onnx.numpy_helper.from_array(np.zeros(scale.size, np.int32), q_name + "_zero_point") if scale.size > 1
                else onnx.helper.make_tensor(q_name + "_zero_point", onnx.TensorProto.INT32, [], [0]))
        self.model.graph.initializer.extend([
            onnx.numpy_helper.from_array(np.asarray(scale, np.float32).reshape(-1), q_name + "_scale"), zero])
        self.model.graph.initializer.append(onnx.numpy_helper.from_array(quantized, q_name))
        # the DQ writes the bias's own name, which the float initializer gave up (as quantize_static)
        self.model.graph.initializer.remove(init)
        axis = {"axis": 0} if scale.size > 1 else {}
        self.added.append(onnx.helper.make_node("DequantizeLinear", [q_name, q_name + "_scale",
                                                                     q_name + "_zero_point"], [name],
                                                name + "_DequantizeLinear", **axis))

    def _write(self, name: str, data_type: int, dims, data: bytes) -> None:
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        offset = self.out.tell()
        self.out.write(data)
        external.point(tensor, SCRATCH, offset, len(data))
        self.model.graph.initializer.append(tensor)


def _bias_safe_scales(scales: np.ndarray, bias: np.ndarray, input_scale: np.ndarray) -> np.ndarray:
    """quantize_static's per-channel weight scales raised where input scale x weight scale would clip the int32
    bias (channels of near-zero weights under a real bias), by the ratio that makes the bias fit."""
    info = np.iinfo(np.int32)
    span = np.float64(info.max) - np.float64(info.min + 1)
    out = scales.copy()
    x = np.float64(np.asarray(input_scale).item())
    for i in range(out.size):
        smallest = 1.0001 * (2.0 * np.abs(bias.reshape(-1)[i])) / span  # float32 until the division, as ORT
        candidate = x * np.float64(out[i])
        if 0.0 < candidate < smallest:
            out[i] = np.float32(np.float64(out[i]) * (smallest / candidate))
    return out
