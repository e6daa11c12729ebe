"""Lower-precision graphs: fp16 for GPU providers, int8 (dynamic, MatMul/Gemm weights) for CPU."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from .onnx import EXTERNAL_DATA_NAME, save_model

PRECISIONS = ("fp32", "fp16", "int8")

# Ops whose fp16 results overflow or lose too much: normalisations reduce over thousands of values, and
# Softmax of SD 2.x attention scores exceeds fp16's range (its U-Net sets upcast_attention for this reason).
FP16_KEEP_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean", "Pow",
                 "Sqrt", "Erf", "Exp", "Range", "Resize", "Upsample", "CumSum", "Min", "Max", "ArgMax")
FP16_KEEP_OPS_SD2 = FP16_KEEP_OPS + ("Softmax",)

# Linear layers left in float: the time embedding (its error reaches every resnet) and its per-block projection
INT8_KEEP_NODES = re.compile(r"time_embedding|time_emb_proj")


@dataclass(frozen=True)
class Scheme:
    """What one component gets at one precision; `method` is written to the export report."""

    precision: str  # precision the graph's weights end up in: fp32, fp16 or int8
    method: str


def scheme(component: str, precision: str, family: str) -> Scheme:
    """The quantization applied to `component` for a requested `precision` (the VAE always stays fp32).

    The VAE decoder overflows in fp16 (diffusers upcasts it too) and its convolutions do not speed up
    with dynamic int8, so both lower precisions leave it fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or component.startswith("vae"):
        return Scheme("fp32", "none (ORT basic graph optimizations only)")
    if precision == "fp16":
        kept = "normalisations" + (", attention softmax" if family.startswith("sd2") else "")
        return Scheme("fp16", f"fp16 weights and activations; fp32 I/O and {kept} kept fp32")
    return Scheme("int8", "dynamic int8 (per-channel int8 weights, uint8 activations) for MatMul/Gemm; "
                          "convolutions, time embedding and normalisations kept fp32")


def apply(component: str, precision: str, family: str, src: Path, dst: Path) -> Scheme:
    """Write the `precision` variant of the fp32 graph `src` to `dst` (moved as it is for fp32 / the VAE)."""
    chosen = scheme(component, precision, family)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if chosen.precision == "fp16":
        to_fp16(src, dst, FP16_KEEP_OPS_SD2 if family.startswith("sd2") else FP16_KEEP_OPS)
    elif chosen.precision == "int8":
        to_int8_dynamic(src, dst)
    else:
        move_model(src, dst)
    return chosen


def move_model(src: Path, dst: Path) -> Path:
    """Move a graph file and its external data file, if any, to `dst` (same data file name)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.parent / EXTERNAL_DATA_NAME
    if data.exists():
        data.replace(dst.parent / EXTERNAL_DATA_NAME)
    src.replace(dst)
    return dst


def to_fp16(src: Path, dst: Path, keep_ops: tuple[str, ...]) -> Path:
    """fp16 weights and math, graph inputs/outputs kept fp32 (the runtime feeds and reads fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # infer shapes file to file (a full U-Net proto is over protobuf's 2 GB limit); written beside `src` so
    # its external data reference still resolves
    inferred = src.with_name("inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    try:
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink()
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                     disable_shape_infer=True)
    return save_model(model, dst)


def int8_nodes_to_exclude(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to keep float; the quantizer first splits each Gemm into `<name>_MatMul` + Add."""
    names = [n.name for n in model.graph.node if INT8_KEEP_NODES.search(n.name)]
    return names + [name + "_MatMul" for name in names]


def to_int8_dynamic(src: Path, dst: Path, reduce_range: bool = True) -> Path:
    """Dynamic int8 MatMul/Gemm: weights int8 per output channel, activations quantized per call.

    reduce_range (7-bit weights) avoids the u8*s8 pair-sum saturation of AVX2 without VNNI.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = int8_nodes_to_exclude(onnx.load(str(src), load_external_data=False))
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about pre-processing on every call
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=False)  # int8 SD graphs are < 1 GB
    finally:
        logging.getLogger().setLevel(level)
    return dst
