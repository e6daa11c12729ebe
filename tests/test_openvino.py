"""`--provider openvino`: our ONNX folders on OpenVINO's kernels, through the same Component interface."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import picture, square_mask
from PIL import Image

from sdonnx import Pipeline
from sdonnx.__main__ import main
from sdonnx.session import Component, SessionConfig

pytest.importorskip("openvino")
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO's default on a bf16-capable CPU is bf16


@pytest.fixture(scope="module")
def pipes():
    return Pipeline.load(provider="cpu"), Pipeline.load(provider="openvino", provider_options=F32)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def test_f32_images_equal_onnx_runtime(pipes):
    """In f32, OpenVINO's image of the bundled model is ONNX Runtime's within 1/255, for every task; the U-Net is
    called with batch 2 (guided) and batch 1 (the VAE) shapes in one run, so the per-shape recompile is exercised."""
    ort_pipe, ov_pipe = pipes
    for run in (lambda p: p.txt2img("a red circle", seed=3, steps=4, num_images=2),
                lambda p: p.img2img("a blue square", picture(), strength=0.6, seed=4, steps=4),
                lambda p: p.inpaint("a green dot", picture(), square_mask(), seed=5, steps=4)):
        a, b = pixels(run(ort_pipe)), pixels(run(ov_pipe))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, np.abs(a - b).max()


def test_component_matches_onnx_runtime_across_shapes(pipes):
    """The raw U-Net outputs agree across a change of shape (reshaped and recompiled) and back."""
    ort_pipe, _ = pipes
    path = ort_pipe.component("unet").path
    ours, theirs = Component(path), Component(path, SessionConfig(provider="openvino", provider_options=F32))
    rng = np.random.default_rng(0)
    dim = ours.session.get_inputs()[2].shape[-1]
    for batch, side in ((2, 16), (1, 8), (2, 16)):
        feed = dict(sample=rng.standard_normal((batch, 4, side, side), dtype=np.float32), timestep=np.array(500.0),
                    encoder_hidden_states=rng.standard_normal((batch, 77, dim), dtype=np.float32))
        want, got = ours(**feed)["out_sample"], theirs(**feed)["out_sample"]
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_default_precision_runs_and_stays_near(pipes):
    """OpenVINO's default precision (bf16 where the CPU has it) draws the same picture up to bf16 rounding: far
    closer to ONNX Runtime's image than another seed's image is."""
    ort_pipe, _ = pipes
    default = Pipeline.load(provider="openvino")
    a = pixels(ort_pipe.txt2img("a red circle", seed=1)).astype(float)
    b = pixels(default.txt2img("a red circle", seed=1)).astype(float)
    other = pixels(ort_pipe.txt2img("a red circle", seed=2)).astype(float)
    assert np.abs(a - b).mean() < 0.5 * np.abs(a - other).mean()


def test_cli_generate(tmp_path):
    """`sdonnx generate --provider openvino` writes the picture ONNX Runtime's run writes, up to bf16 rounding."""
    for provider in ("cpu", "openvino"):
        result = CliRunner().invoke(main, ["generate", "a red circle", "--provider", provider, "--steps", "2",
                                           "--seed", "7", "-o", str(tmp_path / f"{provider}.png")])
        assert result.exit_code == 0, result.output
    a, b = (np.asarray(Image.open(tmp_path / f"{p}.png"), dtype=float) for p in ("cpu", "openvino"))
    assert a.shape == b.shape and np.abs(a - b).mean() < 16


def test_openvino_int8_scheme_exports_and_draws_what_fp32_draws(tmp_path):
    """`--int8-scheme openvino`: the U-Net's convolutions and weight MatMuls as calibrated QDQ int8 (no ORT-only
    dynamic int8 ops, attention products float); on OpenVINO and on ONNX Runtime the evaluator reads nearly the
    same scenes off its pictures as off the bundled fp32 folder's."""
    import json

    from sdonnx.export.tiny.shapes import judge, random_scene

    out = tmp_path / "ov8"
    result = CliRunner().invoke(main, ["export", "tiny", str(out), "--precision", "int8", "--int8-scheme", "openvino",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sdonnx.json").read_text())["components"]
    ops = meta["unet"]["ops"]
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "com.microsoft.MultiHeadAttention"} & set(ops), ops
    matmuls = ops.get("MatMul", 0)
    assert ops["QuantizeLinear"] > ops["Conv"] and matmuls > 0  # activations of linear layers quantized too
    assert meta["text_encoder"]["precision"] == "int8" and meta["unet"]["precision"] == "int8"
    # the weight MatMuls read int8 weights, but cross-attention's output projection (quantize.INT8_FLOAT_LINEAR)
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    weights = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
                                                     and n.input[0] in {t.name for t in graph.initializer}}
    linear = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    float_linear = [n.name for n in linear if n.input[1] not in dq]
    blocks = {n.name.split("/attn2/")[0] for n in graph.node if "/attn2/" in n.name}
    assert len(float_linear) == len(blocks) > 0 and all("/attn2/to_out" in n for n in float_linear), float_linear
    # on --provider openvino the U-Net runs on OpenVINO, the dynamic int8 text encoder stays on ONNX Runtime
    on_ov = Pipeline.load(out, provider="openvino")
    assert type(on_ov.component("unet").session).__name__ == "OpenVINOSession"
    assert type(on_ov.component("text_encoder").session).__name__ == "InferenceSession"
    assert type(Pipeline.load(provider="openvino").component("text_encoder").session).__name__ == "OpenVINOSession"
    fp32 = Pipeline.load(provider="cpu")
    rng = np.random.default_rng(321)
    captions = [random_scene(rng).caption() for _ in range(16)]
    for pipe in (Pipeline.load(out, provider="openvino", provider_options=F32), Pipeline.load(out)):
        same = sum(judge(fp32.txt2img(c, seed=k)[0]) == judge(pipe.txt2img(c, seed=k)[0])
                   for k, c in enumerate(captions))
        assert same >= 13, same


def test_openvino_int8_scheme_refuses_mha(tmp_path):
    result = CliRunner().invoke(main, ["export", "tiny", str(tmp_path / "x"), "--precision", "int8",
                                       "--int8-scheme", "openvino", "--attention", "mha", "--quiet"])
    assert result.exit_code == 1 and "needs --attention standard" in result.output
    assert not (tmp_path / "x").exists()


def test_low_memory_streamed_parts_run_on_onnxruntime(tmp_path):
    """`--low-memory --provider openvino` on a folder exported with --stream: the parts are saved in ONNX Runtime's
    extended form (contrib-op fusions, of the int8 QDQ graphs too, which OpenVINO cannot read), so they run on ONNX
    Runtime and the picture is the one the CPU provider draws (OpenVINO failed to load the first part before)."""
    out = tmp_path / "streamed"
    result = CliRunner().invoke(main, ["export", "tiny", str(out), "--precision", "int8", "--int8-scheme", "openvino",
                                       "--stream", "--quiet"])
    assert result.exit_code == 0, result.output
    parts = onnx.load(str(out / "unet_stream" / "part_00.onnx"), load_external_data=False)
    assert any(n.domain == "com.microsoft" for n in parts.graph.node)  # ONNX Runtime's fused form
    pictures = [Pipeline.load(out, low_memory=True, provider=p, provider_options=o).txt2img(
        "a red circle", steps=2, seed=3, output_type="np") for p, o in (("cpu", None), ("openvino", F32))]
    # the text encoder (a whole graph) still runs on OpenVINO, in f32 here
    assert pictures[0].std() > 0.01 and np.abs(pictures[0] - pictures[1]).max() < 1e-3


def _upsampler_graph(path, channels: int, by: str = "sizes", pads: int = 1) -> None:
    """x [B, C, H, W] -> nearest Resize (to skip's size, or by scales of 2) -> 3x3 Conv (bias): an upsampler."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) / (3 * channels ** 0.5)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.standard_normal(channels).astype(
        np.float32), "b"), numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    resize = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    if by == "sizes":
        nodes = [helper.make_node("Shape", ["x"], ["x_nc"], end=2),
                 helper.make_node("Shape", ["skip"], ["hw"], start=2),
                 helper.make_node("Concat", ["x_nc", "hw"], ["sizes"], axis=0),
                 helper.make_node("Resize", ["x", "", "", "sizes"], ["up"], **resize)]
    else:
        nodes = [helper.make_node("Resize", ["x", "", "scales"], ["up"], **resize)]
    nodes.append(helper.make_node("Conv", ["up", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[pads] * 4))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, "H", "W"]),
              helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["B", 1, "H2", "W2"])]
    graph = helper.make_graph(nodes, "up", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_upsamplers_become_phase_convolutions_where_the_size_doubles(tmp_path, rewrites_counted):
    """At the shapes a session compiles for, a nearest Resize that doubles the size exactly (by sizes or by scales)
    and its 3x3 Conv become four 2x2 convolutions and a DepthToSpace, with ONNX Runtime's values; upsampling to an
    odd size (a U-Net after an odd skip), a convolution without padding 1 and narrow layers keep their form, with
    ONNX Runtime's values too."""
    import onnxruntime as ort

    from sdonnx import openvino_session, upsampling

    counts = rewrites_counted("phase_upsampling")
    rng = np.random.default_rng(1)
    wide = upsampling.MIN_CHANNELS
    for channels, by, pads, shape, skip, rewritten in ((wide, "sizes", 1, (2, 5, 7), (10, 14), 1),
                                                       (wide, "scales", 1, (1, 4, 3), (8, 6), 1),
                                                       (wide, "sizes", 1, (1, 5, 7), (9, 13), 0),
                                                       (wide, "scales", 0, (1, 4, 4), (6, 6), 0),
                                                       (wide // 4, "sizes", 1, (1, 4, 4), (8, 8), 0)):
        path = tmp_path / f"up{channels}{by}{pads}.onnx"
        _upsampler_graph(path, channels, by, pads)
        feed = {"x": rng.standard_normal((shape[0], channels, *shape[1:]), dtype=np.float32),
                "skip": np.zeros((shape[0], 1, *skip), np.float32)}
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        got = openvino_session.OpenVINOSession(path, threads=1, options=F32).run(None, feed)[0]
        assert counts[-1] == rewritten, (channels, by, pads, shape, skip)
        assert got.shape == want.shape
        assert np.abs(want).max() > 0.5 and np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def _group_norm_graph(path, channels: int, groups: int, instance_scale: float = 1.0, affine: tuple | None = (-1, 1, 1),
                      epsilon: float = 1e-5) -> None:
    """A GroupNorm as torch's exporter writes it: Reshape to [N, G, -1], InstanceNormalization, Reshape back, then
    the affine weight and bias (shaped `affine`, torch's [C, 1, 1] by default; None: no affine)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped"),
             numpy_helper.from_array(np.full(groups, instance_scale, np.float32), "s"),
             numpy_helper.from_array(np.zeros(groups, np.float32), "b")]
    nodes = [helper.make_node("Reshape", ["x", "grouped"], ["g"]),
             helper.make_node("InstanceNormalization", ["g", "s", "b"], ["n"], epsilon=epsilon),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Reshape", ["n", "shape"], ["y" if affine is None else "back"])]
    if affine is not None:
        inits += [numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32).reshape(affine), name)
                  for name in ("gamma", "beta")]
        nodes += [helper.make_node("Mul", ["back", "gamma"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "beta"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, "H", "W"])]
    graph = helper.make_graph(nodes, "gn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture
def rewrites_counted(monkeypatch):
    """`counted(name)` -> the list each call of that load-time rewrite appends its count to."""
    from sdonnx import openvino_rewrites

    def counted(name: str) -> list[int]:
        counts, rewrite = [], getattr(openvino_rewrites, name)

        def counting(model):
            counts.append(rewrite(model))
            return counts[-1]

        monkeypatch.setattr(openvino_rewrites, name, counting)
        return counts

    return counted


def test_group_norms_become_spatial_reductions(tmp_path, rewrites_counted):
    """At the shapes a session compiles for, each GroupNorm (unit instance scale, with or without its affine)
    becomes reductions over the spatial axes, with ONNX Runtime's values in f32, also where eps matters and where
    the mean is 100 standard deviations from zero (a one-pass variance loses it); a group scale that is not 1
    keeps the MVN form, and an affine that does not broadcast along the channels stays after the rewrite. Every
    GroupNorm of the bundled VAE decoder is rewritten, with ONNX Runtime's values. (The default bf16 path is
    covered by the pipeline tests above and the measured PSNR.)"""
    import onnxruntime as ort

    from sdonnx import openvino_session
    from sdonnx.model import default_model_dir

    counts = rewrites_counted("group_norms")
    rng = np.random.default_rng(3)
    decoder = default_model_dir() / "vae_decoder" / "model.onnx"
    norms = sum(n.op_type == "InstanceNormalization" for n in onnx.load(str(decoder)).graph.node)
    # (graph options, input, GroupNorms rewritten, tolerance): a mean 100 deviations out leaves f32 ~1e-5 of an
    # output's precision (one part in 1e7 of the input is 1e-5 of a deviation), so that case is held to 1e-3; a
    # one-pass variance misses it by 5e-3
    graphs = {"unit": ({}, 3 * rng.standard_normal((2, 32, 5, 7)) + 1, 1, 1e-4),
              "plain": ({"groups": 4, "affine": None}, rng.standard_normal((1, 32, 4, 4)) - 2, 1, 1e-4),
              "eps": ({"epsilon": 0.5}, 0.5 * rng.standard_normal((1, 32, 4, 4)), 1, 1e-4),
              "offset": ({}, 10 + 0.1 * rng.standard_normal((1, 32, 16, 16)), 1, 1e-3),
              "rows": ({"affine": (1, 1, 1, 32)}, rng.standard_normal((1, 32, 3, 32)), 1, 1e-4),
              "scaled": ({"instance_scale": 2.0}, rng.standard_normal((1, 32, 4, 4)), 0, 1e-4)}
    cases = [(decoder, {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)}, norms, 1e-4)]
    for name, (kwargs, x, rewritten, tolerance) in graphs.items():
        _group_norm_graph(tmp_path / f"{name}.onnx", 32, **{"groups": 8, **kwargs})
        cases.append((tmp_path / f"{name}.onnx", {"x": x.astype(np.float32)}, rewritten, tolerance))
    assert norms >= 10
    for path, feed, rewritten, tolerance in cases:
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want = reference.run(None, feed)[0]
        nudged = {k: v + 1e-6 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in feed.items()}
        moved = np.abs(reference.run(None, nudged)[0] - want).max()
        assert moved < tolerance / 3, (path.name, moved)  # well-conditioned: a 1e-6 nudge moves it far less
        got = openvino_session.OpenVINOSession(path, threads=1, options=F32).run(None, feed)[0]
        assert counts[-1] == rewritten, path.name
        assert np.abs(want).max() > 0.5 and np.abs(got - want).max() < tolerance, (path.name, np.abs(got - want).max())
