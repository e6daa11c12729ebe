"""ONNX Runtime's fp16 conversion (onnxruntime.transformers.float16.convert_float_to_float16) for graphs whose
weights live in an external data file, with one weight in memory at a time.

The converter works on a loaded model: a full SDXL U-Net's 10.3 GB of fp32 weights plus their fp16 copies. Here it
runs on the graph without its weights (it only retypes the initializers it converts), then each converted weight is
read, cast with the converter's own clamping and written to the new data file in turn. Tests compare the result
with the converter's on the loaded model, node for node and value for value."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from . import external

SCRATCH = "_fp16_weights.bin"


def convert(src: Path, dst: Path, keep_ops: tuple[str, ...], data_name: str, inline_below: int) -> Path:
    """convert_float_to_float16(model, keep_io_types=True, op_block_list=keep_ops, disable_shape_infer=True) on
    `src` with shapes inferred, weights streamed; `dst`'s weights go to `data_name` beside it when over
    `inline_below` bytes."""
    from onnxruntime.transformers import float16

    inferred = src.with_name(src.stem + "-inferred.onnx")  # beside src: the weights' references still resolve
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    try:
        model = onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink()
    was_fp32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    with _shapes_from_dims(float16):
        model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                                 disable_shape_infer=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = dst.parent / SCRATCH
    try:
        with open(scratch, "wb") as out:
            for t in model.graph.initializer:
                if t.name in was_fp32 and t.data_type == onnx.TensorProto.FLOAT16 and uses_external_data(t):
                    values = np.frombuffer(external.read_bytes(t, src.parent), dtype=np.float32)
                    data = float16.convert_np_to_float16(values).tobytes()
                    del values
                    offset = out.tell()
                    out.write(data)
                    external.point(t, SCRATCH, offset, len(data))
        return external.rewrite(model, src.parent, dst, data_name, inline_below, fresh=scratch)
    finally:
        scratch.unlink(missing_ok=True)


@contextlib.contextmanager
def _shapes_from_dims(float16):
    """The converter types each converted initializer's value info from the array it loads; a weight not loaded
    has its shape in its dims (the same shape, without reading 10 GB)."""
    original = float16.make_value_info_from_tensor

    def from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

    float16.make_value_info_from_tensor = from_dims
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original
