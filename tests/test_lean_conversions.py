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
    assert {p.name for p in out.parent.iterdir()} <= {"model.onnx", graphs.EXTERNAL_DATA_NAME}
    assert {p.name for p in ext.parent.iterdir()} == {"model.onnx", graphs.EXTERNAL_DATA_NAME}  # nothing left
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
    assert {p.name for p in out.parent.iterdir()} <= {"model.onnx", graphs.EXTERNAL_DATA_NAME}
    assert {p.name for p in ext.parent.iterdir()} == {"model.onnx", graphs.EXTERNAL_DATA_NAME}
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


def small_graph(path, tiny_channel: bool) -> None:
    """x -> Conv(W, B) -> h (a graph output too) -> Relu -> MatMul(M) -> y; with `tiny_channel`, one output
    channel's weights are ~1e-12 under a bias of 5, so int32 cannot hold bias / (input scale x weight scale)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    if tiny_channel:
        w[2] *= 1e-12
        b[2] = 5.0
    inits = [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(b, "B"),
             onnx.numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "M")]
    nodes = [onnx.helper.make_node("Conv", ["x", "W", "B"], ["h"], "conv", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["h"], ["r"], "relu"),
             onnx.helper.make_node("MatMul", ["r", "M"], ["y"], "matmul")]
    f = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", f, [1, 4, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("y", f, [1, 6, 8, 5]),
                                    onnx.helper.make_tensor_value_info("h", f, [1, 6, 8, 8])], inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", graphs.OPSET)]),
                    str(path))


@pytest.mark.parametrize("tiny_channel", [False, True], ids=["plain", "int32-bias-adjusted"])
def test_lean_static_int8_edge_cases_are_quantize_static(tiny_channel, tmp_path):
    """A quantized tensor that is also a graph output, and quantize_static's raising of a weight scale whose int32
    bias would clip: the same graph and values as quantize_static."""
    src = tmp_path / "src" / "model.onnx"
    small_graph(src, tiny_channel)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(3)]
    (tmp_path / "ref").mkdir()
    quantize.to_int8_static_convs(src, tmp_path / "ref" / "model.onnx", feeds, linear=True)  # ORT's
    out = static_int8.quantize(src, tmp_path / "lean" / "model.onnx", feeds, ("Conv", "MatMul"), [],
                               graphs.EXTERNAL_DATA_NAME, graphs.EXTERNAL_DATA_BYTES)
    (want, want_w), (got, got_w) = comparable(tmp_path / "ref" / "model.onnx"), comparable(out)
    assert nodes(got) == nodes(want)
    assert sorted(got_w) == sorted(want_w)
    for name, value in want_w.items():
        assert got_w[name].dtype == value.dtype and np.array_equal(got_w[name], value), name
    assert "h" in {o.name for o in got.graph.output} and \
        any(n.op_type == "DequantizeLinear" and n.output[0] == "h" for n in got.graph.node)
    plain_scale = np.abs(onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0])[2]).max() / 127
    assert (got_w["W_scale"][2] > 1e3 * plain_scale) == tiny_channel  # raised only where the bias needs it
    a = ort.InferenceSession(str(tmp_path / "ref" / "model.onnx")).run(None, feeds[0])
    b = ort.InferenceSession(str(out)).run(None, feeds[0])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_lean_static_int8_refuses_what_it_does_not_reproduce_before_calibrating(tmp_path, monkeypatch):
    """A bias two quantized convolutions share: Unsupported before any calibration session (the caller then
    falls back to quantize_static)."""
    src = tmp_path / "src" / "model.onnx"
    small_graph(src, False)
    model = onnx.load(str(src))
    model.graph.node.insert(1, onnx.helper.make_node("Conv", ["h", "W2", "B"], ["h2"], "conv2", pads=[1, 1, 1, 1]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((6, 6, 3, 3), np.float32), "W2"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("h2", onnx.TensorProto.FLOAT, [1, 6, 8, 8]))
    onnx.save_model(model, str(src))
    monkeypatch.setattr(static_int8, "calibrate", lambda *a: pytest.fail("calibrated before refusing"))
    with pytest.raises(static_int8.Unsupported, match="B is shared"):
        static_int8.quantize(src, tmp_path / "lean" / "model.onnx", [{}, {}], ("Conv",), [],
                             graphs.EXTERNAL_DATA_NAME, graphs.EXTERNAL_DATA_BYTES)
