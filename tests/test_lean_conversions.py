"""The lean conversions of graphs with external data (weights streamed one at a time) against onnxruntime's own on
the loaded graph: static QDQ int8 (export/static_int8.py) against quantize_static with the same calibration feeds,
fp16 (export/lean_fp16.py) against convert_float_to_float16."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdonnx.export import optimize, quantize, static_int8
from sdonnx.export import onnx as graphs
from test_export_sdxl import comparable, configs, build, export, external_copy


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """The tiny SDXL U-Net's optimized fp32 graph (inline weights) and three calibration feeds."""
    cfg = configs()
    path = tmp_path_factory.mktemp("unet")
    export("unet", cfg, build(cfg), path / "raw" / "model.onnx")
    opt = optimize.optimize(path / "raw" / "model.onnx", path / "opt" / "model.onnx")
    feeds = [numpy_inputs(cfg, seed) for seed in range(3)]
    return cfg, opt, feeds


def numpy_inputs(cfg, seed: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in graphs.sample_inputs("unet", cfg, 2, (8, 8), seed=seed).items()}


def nodes(model: onnx.ModelProto) -> list[tuple]:
    return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output),
                   tuple(a.SerializeToString() for a in n.attribute)) for n in model.graph.node)


@pytest.mark.parametrize("linear", [False, True], ids=["convs", "convs+linear"])
def test_lean_static_int8_is_quantize_static(linear, unet, tmp_path, monkeypatch):
    """Same nodes (kinds, names, wiring, attributes) and initializers (names, dtypes, values) as quantize_static,
    and so the same outputs; quantize_static is not called for the graph with external data."""
    cfg, opt, feeds = unet
    (tmp_path / "ref").mkdir()
    quantize.to_int8_static_convs(opt, tmp_path / "ref" / "model.onnx", feeds, linear=linear)  # small: ORT's
    ext = external_copy(opt, tmp_path / "ext" / "model.onnx")

    def refuse(*args, **kwargs):
        raise AssertionError("quantize_static loads the whole model")

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", refuse)
    out = quantize.to_int8_static_convs(ext, tmp_path / "lean" / "model.onnx", feeds, linear=linear)
    assert sorted(p.name for p in out.parent.iterdir()) <= ["model.onnx", graphs.EXTERNAL_DATA_NAME]
    assert not (ext.parent / static_int8.CALIBRATION_GRAPH).exists()
    (want, want_w), (got, got_w) = comparable(tmp_path / "ref" / "model.onnx"), comparable(out)
    assert nodes(got) == nodes(want)
    assert sorted(got_w) == sorted(want_w)
    for name, value in want_w.items():
        assert got_w[name].dtype == value.dtype and np.array_equal(got_w[name], value), name
    kinds = [n.op_type for n in got.graph.node]
    assert kinds.count("QuantizeLinear") > 10 and ("MatMul" in kinds) and \
        any(n.op_type == "DequantizeLinear" and n.input[0].endswith(".bias_quantized") for n in got.graph.node)
    inputs = numpy_inputs(cfg, 7)
    a = ort.InferenceSession(str(tmp_path / "ref" / "model.onnx")).run(None, inputs)[0]
    b = ort.InferenceSession(str(out)).run(None, inputs)[0]
    assert np.array_equal(a, b)


def test_lean_qdq_scheme_equals_the_whole_model_one(unet, tmp_path):
    """The qdq scheme (static convolutions, then dynamic int8 linear layers) gives the same outputs on the large
    path (both quantizers streamed) as on the whole-model one."""
    cfg, opt, feeds = unet
    small = quantize.apply("unet", "int8", "sdxl", opt, tmp_path / "small" / "model.onnx", "qdq", feeds)
    ext = external_copy(opt, tmp_path / "ext" / "model.onnx")
    quantize.apply("unet", "int8", "sdxl", ext, tmp_path / "lean" / "model.onnx", "qdq", feeds)
    assert small.kind == "qdq"
    got = onnx.load(str(tmp_path / "lean" / "model.onnx"), load_external_data=False)
    kinds = {n.op_type for n in got.graph.node}
    assert {"QuantizeLinear", "MatMulInteger"} <= kinds
    inputs = numpy_inputs(cfg, 5)
    a = ort.InferenceSession(str(tmp_path / "small" / "model.onnx")).run(None, inputs)[0]
    b = ort.InferenceSession(str(tmp_path / "lean" / "model.onnx")).run(None, inputs)[0]
    assert np.array_equal(a, b)


def test_calibration_ranges_are_min_max_over_feeds(unet, tmp_path):
    """The ranges are the extremes over all feeds of each tensor (here a graph input, so checkable directly)."""
    cfg, opt, feeds = unet
    ext = external_copy(opt, tmp_path / "ext" / "model.onnx")
    model = onnx.load(str(ext), load_external_data=False)
    ranges = static_int8.calibrate(ext, model, ["sample"], feeds)
    low, high = ranges["sample"]
    assert low == min(f["sample"].min() for f in feeds) and high == max(f["sample"].max() for f in feeds)
    assert low < feeds[0]["sample"].min() or high > feeds[0]["sample"].max()  # more than the first feed's
    with pytest.raises(ValueError, match="at least 2"):
        static_int8.calibrate(ext, model, ["sample"], feeds[:1])


@pytest.mark.parametrize("inline_below", [0, graphs.EXTERNAL_DATA_BYTES])
def test_lean_fp16_is_the_converters(inline_below, unet, tmp_path, monkeypatch):
    """fp16 of a graph with external data, weights streamed, is onnxruntime's convert_float_to_float16 result on the
    loaded graph: the same nodes, value infos and initializers (names, order, values)."""
    from sdonnx.export import lean_fp16
    from test_export_sdxl import assert_same_graph

    cfg, opt, _ = unet
    keep = quantize.FP16_KEEP_OPS
    (tmp_path / "ref").mkdir()
    quantize.to_fp16(opt, tmp_path / "ref" / "model.onnx", keep)  # inline weights: the whole-model converter
    ext = external_copy(opt, tmp_path / "ext" / "model.onnx")
    out = lean_fp16.convert(ext, tmp_path / "lean" / "model.onnx", keep, graphs.EXTERNAL_DATA_NAME, inline_below)
    assert (out.parent / graphs.EXTERNAL_DATA_NAME).exists() == (inline_below == 0)
    assert sorted(p.name for p in out.parent.iterdir()) <= ["model.onnx", graphs.EXTERNAL_DATA_NAME]
    got = assert_same_graph(out, tmp_path / "ref" / "model.onnx")
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in got.graph.initializer) > 10
    from onnxruntime.transformers import float16
    assert float16.make_value_info_from_tensor.__name__ == "make_value_info_from_tensor"  # the patch is undone

    calls = []
    real = lean_fp16.convert
    monkeypatch.setattr(lean_fp16, "convert", lambda *a: calls.append(a) or real(*a))
    quantize.to_fp16(ext, tmp_path / "via" / "model.onnx", keep)
    assert len(calls) == 1  # a graph with external data takes the lean path
    assert_same_graph(tmp_path / "via" / "model.onnx", tmp_path / "ref" / "model.onnx")
