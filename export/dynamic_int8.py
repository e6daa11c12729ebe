"""ONNX Runtime's dynamic int8 (quantize_dynamic: MatMulInteger, per-channel int8 weights) with one weight in memory.

quantize_dynamic loads the whole model, deep-copies it and reloads it with inferred shapes: three times the model
in memory (SD 1.5's U-Net: 10.6 GB for 3.4 GB of weights; SDXL's would need 31 GB). This builds the same graph,
node for node and value for value (tests compare the two), on the graph without its weights, with ONNX Runtime's
own helpers for the structural steps (Gemm -> MatMul, initializer clean-up, topological order) and its
`quantize_data` for each channel's numbers; weights are read from and written to the data files one at a time.

It covers what our graphs hold (MatMul and Gemm weights, activations from other nodes or graph inputs, outputs not
read by a quantized MatMul); anything else raises Unsupported, and the caller falls back to quantize_dynamic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from . import external

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
SCRATCH = "_int8_weights.bin"


class Unsupported(ValueError):
    """The graph holds something this quantizer does not reproduce."""


def quantize(src: Path, dst: Path, exclude: list[str], data_name: str, inline_below: int) -> Path:
    """quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=True,
    weight_type=QInt8, nodes_to_exclude=exclude), weights streamed; `dst`'s weights go to `data_name` beside it
    when over `inline_below` bytes."""
    model = _with_shapes(_load_inferred(src), src.parent)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = dst.parent / SCRATCH
    try:
        with open(scratch, "wb") as out:
            nodes = _Quantizer(model, src.parent, set(exclude), out).run()
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return save_quantized(model, src, dst, scratch, data_name, inline_below)
    finally:
        scratch.unlink(missing_ok=True)


def save_quantized(model: onnx.ModelProto, src: Path, dst: Path, scratch: Path, data_name: str,
                   inline_below: int) -> Path:
    """The quantizers' last steps, as ONNX Runtime's: unused initializers dropped, its producer mark, nodes in
    topological order; then saved with the weights the scratch file holds (it becomes the data file) and the
    untouched ones copied from `src`'s."""
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import __producer__, __version__

    onx = ONNXModel(model)
    _, missing = onx.clean_initializers()
    if missing:
        raise Unsupported(f"unknown tensors {sorted(missing)[:3]}")
    model.producer_name, model.producer_version = __producer__, __version__
    onx.topological_sort()
    return external.rewrite(onx.model, src.parent, dst, data_name, inline_below, fresh=scratch)


def _load_inferred(path: Path) -> onnx.ModelProto:
    """The graph with inferred shapes and the quantizer's metadata mark, weights not loaded (as the quantizer's
    load_model_with_shape_infer, less the weights)."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inferred = path.with_name(path.stem + "-inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    try:
        model = onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink()
    add_infer_metadata(model)
    return model


def _with_shapes(model: onnx.ModelProto, base: Path) -> onnx.ModelProto:
    """Gemm -> MatMul (+ Add), as dynamic quantization first does, then shapes inferred again on the result.

    Only the Gemms' weights are read (their transposes become new initializers); they are small."""
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in inits:
            weight = inits[node.input[1]]
            if uses_external_data(weight):
                load_external_data_for_tensor(weight, str(base))
                del weight.external_data[:]
                weight.data_location = onnx.TensorProto.DEFAULT
    onx = ONNXModel(model)
    onx.replace_gemm_with_matmul()
    # the graph file goes beside the weights so their references resolve; shape inference reads no weights
    staged, inferred = base / "_shapes.onnx", base / "_shapes-inferred.onnx"
    try:
        onnx.save_model(onx.model, str(staged))
        onnx.shape_inference.infer_shapes_path(str(staged), str(inferred))
        again = onnx.load(str(inferred), load_external_data=False)
    finally:
        staged.unlink(missing_ok=True)
        inferred.unlink(missing_ok=True)
    add_infer_metadata(again)
    return again


class _Quantizer:
    """One pass over the nodes as ONNXQuantizer.quantize_model makes it in IntegerOps mode for MatMul."""

    def __init__(self, model: onnx.ModelProto, base: Path, exclude: set[str], out):
        self.model, self.base, self.exclude, self.out = model, base, exclude, out
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.output, *graph.input)
                      if v.type.HasField("tensor_type")}
        self.quantized: dict[str, tuple[str, str, str]] = {}  # tensor -> (quantized, scale, zero point)
        self.new_nodes: list[onnx.NodeProto] = []

    def run(self) -> list[onnx.NodeProto]:
        for node in self.model.graph.node:
            if self._should_quantize(node):
                self.new_nodes += self._matmul(node)
            else:
                self.new_nodes.append(node)
        if any(o.name in self.quantized for o in self.model.graph.output):
            raise Unsupported("a graph output is a quantized tensor")
        return self.new_nodes

    def _is_float(self, name: str) -> bool:
        if name in self.inits:
            return self.inits[name].data_type in FLOATS
        return self.types.get(name) in FLOATS

    def _should_quantize(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "Gemm":
            raise Unsupported(f"Gemm {node.name} was not turned into a MatMul")
        if node.op_type != "MatMul" or node.name in self.exclude:
            return False
        if not self._is_float(node.input[1]) and not self._is_float(node.input[0]):
            return False
        return node.input[1] in self.inits  # MatMulConstBOnly

    def _matmul(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        helper = onnx.helper
        nodes = []
        x = node.input[0]
        if x in self.inits:
            raise Unsupported(f"MatMul {node.name} has a constant first input")
        if x not in self.quantized:
            if not x:
                raise Unsupported(f"MatMul {node.name} has an empty input")
            q, scale, zp = x + "_quantized", x + "_scale", x + "_zero_point"
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [q, scale, zp], x + "_QuantizeLinear"))
            self.quantized[x] = (q, scale, zp)
        xq, xs, xz = self.quantized[x]
        wq, ws, wz = self._weight(node.input[1])
        name = node.name + "_quant" if node.name else ""
        if not name:
            raise Unsupported("a MatMul without a name")
        integer = node.output[0] + "_output_quantized"
        nodes.append(helper.make_node("MatMulInteger", [xq, wq, xz, wz], [integer], name))
        otype = self.types.get(node.output[0]) or 0
        if not otype:
            raise Unsupported(f"no type for {node.output[0]}")
        nodes.append(helper.make_node("Cast", [integer], [integer + "_cast_output"], integer + "_cast", to=otype))
        scales = name + "_scales_mul"
        nodes.append(helper.make_node("Mul", [xs, ws], [scales + ":0"], scales))
        nodes.append(helper.make_node("Mul", [integer + "_cast_output", scales + ":0"], [node.output[0]],
                                      name + "_output_scale_mul"))
        return nodes

    def _weight(self, name: str) -> tuple[str, str, str]:
        """Per-output-channel symmetric int8 with reduced range, ONNX Runtime's numbers; the int8 tensor goes to the
        scratch file at once."""
        from onnxruntime.quantization.quant_utils import quantize_data

        if name in self.quantized:
            return self.quantized[name]
        init = self.inits[name]
        if init.data_type not in FLOATS:
            raise Unsupported(f"weight {name} is not float")
        weights = external.read_array(init, self.base)
        if weights.ndim != 2:
            raise Unsupported(f"weight {name} has rank {weights.ndim}")
        zero_points, scales, columns = [], [], []
        for i in range(weights.shape[1]):
            try:
                zp, scale, q = quantize_data(weights.take(i, 1).flatten(), onnx.TensorProto.INT8, True,
                                             reduce_range=True, min_real_range=None, rmin_override=None,
                                             rmax_override=None)
            except TypeError as err:  # an older onnxruntime's quantize_data (other keywords): its own quantizer
                raise Unsupported(f"this onnxruntime's quantize_data: {err}") from err
            zero_points.append(zp)
            scales.append(scale)
            columns.append(np.asarray(q).reshape(weights.shape[0], 1))
        quantized = np.asarray(np.concatenate(columns, 1), dtype=np.int8).reshape(tuple(init.dims))
        del weights, columns
        helper = onnx.helper
        names = (name + "_quantized", name + "_scale", name + "_zero_point")
        shape = [init.dims[1]]
        self.model.graph.initializer.extend([
            helper.make_tensor(names[1], init.data_type, shape, np.hstack(scales).tolist()),
            helper.make_tensor(names[2], onnx.TensorProto.INT8, shape, np.hstack(zero_points).tolist())])
        tensor = onnx.TensorProto(name=names[0], data_type=onnx.TensorProto.INT8, dims=init.dims)
        offset = self.out.tell()
        data = quantized.tobytes()
        self.out.write(data)
        external.point(tensor, SCRATCH, offset, len(data))
        self.model.graph.initializer.append(tensor)
        self.quantized[name] = names
        return names
