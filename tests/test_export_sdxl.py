"""`sdonnx export` for SDXL: graphs against our PyTorch models, optimum's SDXL layout, and the lean large-model path
(weights streamed tensor by tensor) against the whole-model one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import tiny_sd
import tiny_sdxl
from sdonnx.export import dynamic_int8, external, optimize, quantize
from sdonnx.export import onnx as graphs
from sdonnx.export.models import CLIPConfig, CLIPTextModel, ModelConfigs, UNet2DConditionModel, UNetConfig, VAEConfig
from sdonnx.export.models.clip import CLIPTextModelWithProjection

TOL = 1e-4


def configs(**unet) -> ModelConfigs:
    """Our configs of tests/tiny_sdxl.py's pipeline (`unet`: fields to change)."""
    return ModelConfigs(
        clip=CLIPConfig.from_dict(tiny_sdxl.clip_config(tiny_sdxl.TEXT_1, 100, "quick_gelu")),
        clip2=CLIPConfig.from_dict(tiny_sdxl.clip_config(tiny_sdxl.TEXT_2, 100, "gelu")),
        vae=VAEConfig.from_dict({**tiny_sd.vae_config(), "scaling_factor": 0.13025}),
        unet=UNetConfig.from_dict({**tiny_sdxl.unet_config(), **unet}))


def build(cfg: ModelConfigs, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    models = {"text_encoder": CLIPTextModel(cfg.clip), "text_encoder_2": CLIPTextModelWithProjection(cfg.clip2),
              "unet": UNet2DConditionModel(cfg.unet)}
    with torch.no_grad():  # weights of a trained model's size, not zero-initialised output layers
        for p in models["unet"].parameters():
            p.normal_(0, 0.2)
    return {k: m.eval() for k, m in models.items()}


@pytest.fixture(scope="module")
def sdxl():
    cfg = configs()
    return cfg, build(cfg)


def export(component: str, cfg: ModelConfigs, models: dict, path, depth: int | None = None):
    module = graphs.wrap(component, models, depth)
    signature = "unet_features" if component == "unet" and depth is not None else component
    batch, hw = graphs.trace_shape(component, cfg, None)
    if component == "unet_shallow":
        inputs = graphs.with_deep_features(graphs.sample_inputs("unet", cfg, batch, hw, 0), models["unet"], depth)
    else:
        inputs = graphs.sample_inputs(component, cfg, batch, hw, 0)
    graphs.export_component(signature, module, inputs, path)
    return module


def run(path, inputs: dict) -> tuple[ort.InferenceSession, list[np.ndarray]]:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    declared = {i.name for i in s.get_inputs()}  # a graph drops inputs it never reads
    return s, s.run(None, {k: v.numpy() for k, v in inputs.items() if k in declared})


def test_text_encoder_2_is_optimums_signature_and_matches_pytorch(sdxl, tmp_path):
    cfg, models = sdxl
    module = export("text_encoder_2", cfg, models, tmp_path / "te2" / "model.onnx")
    inputs = graphs.sample_inputs("text_encoder_2", cfg, 2, (8, 8), seed=3)
    s, got = run(tmp_path / "te2" / "model.onnx", inputs)
    layers = cfg.clip2.num_hidden_layers
    assert [o.name for o in s.get_outputs()] == ["text_embeds", "last_hidden_state", *(
        f"hidden_states.{k}" for k in range(layers + 1))]
    with torch.no_grad():
        want = module(**inputs)
    assert got[0].shape == (2, cfg.clip2.projection_dim)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=TOL)


@pytest.mark.parametrize("kind", ["sdxl", "lcm"])
def test_unet_takes_text_embeds_and_time_ids(kind, tmp_path):
    cfg = configs(**({"time_cond_proj_dim": 16} if kind == "lcm" else {}))
    models = build(cfg, seed=1)
    module = export("unet", cfg, models, tmp_path / "unet" / "model.onnx")
    inputs = graphs.sample_inputs("unet", cfg, 2, (6, 4), seed=4)  # another batch and a non-square size
    s, (got,) = run(tmp_path / "unet" / "model.onnx", inputs)
    extra = ["timestep_cond"] if kind == "lcm" else []
    assert [i.name for i in s.get_inputs()] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                "time_ids", *extra]
    assert s.get_inputs()[3].shape == ["batch_size", cfg.unet.text_embeds_dim]
    assert s.get_inputs()[4].shape == ["batch_size", 6]
    with torch.no_grad():
        want = module(**inputs).numpy()
        other = module(**{**inputs, "time_ids": inputs["time_ids"] * 0.5}).numpy()
    np.testing.assert_allclose(got, want, atol=TOL)
    assert np.abs(other - want).max() > 100 * TOL  # the time ids reach the output: the check above can fail
    h, w = 6 * cfg.vae.downscale, 4 * cfg.vae.downscale  # diffusers' default time ids: (h, w, 0, 0, h, w)
    assert inputs["time_ids"][0].tolist() == [h, w, 0, 0, h, w]


def test_step_cache_graphs_take_sdxl_inputs(sdxl, tmp_path):
    cfg, models = sdxl
    full = export("unet", cfg, models, tmp_path / "unet" / "model.onnx", depth=0)
    shallow = export("unet_shallow", cfg, models, tmp_path / "shallow" / "model.onnx", depth=0)
    inputs = graphs.sample_inputs("unet", cfg, 2, (6, 4), seed=5)
    _, (out, deep) = run(tmp_path / "unet" / "model.onnx", inputs)
    s, (cached,) = run(tmp_path / "shallow" / "model.onnx", {**inputs, "deep_features": torch.from_numpy(deep)})
    assert {"text_embeds", "time_ids"} <= {i.name for i in s.get_inputs()}
    with torch.no_grad():
        want, want_deep = full(**inputs)
        want_cached = shallow(**inputs, deep_features=torch.from_numpy(deep))
    np.testing.assert_allclose(out, want.numpy(), atol=TOL)
    np.testing.assert_allclose(cached, want_cached.numpy(), atol=TOL)
    np.testing.assert_allclose(cached, out, atol=1e-3)  # the same step from the same deep features


def test_add_embedding_stays_float_in_int8(sdxl, tmp_path):
    cfg, models = sdxl
    export("unet", cfg, models, tmp_path / "raw" / "model.onnx")
    optimize.optimize(tmp_path / "raw" / "model.onnx", tmp_path / "opt" / "model.onnx")
    quantize.apply("unet", "int8", "sdxl", tmp_path / "opt" / "model.onnx", tmp_path / "q" / "model.onnx")
    nodes = onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node
    integer = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    assert integer and not any("add_embedding" in n or "time_embedding" in n for n in integer)
    assert any("add_embedding" in n.name and n.op_type == "MatMul" for n in nodes)


def external_copy(src, dst):
    """`src` re-saved with every tensor of 1 kB or more in model.onnx_data (how a large graph arrives)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=graphs.EXTERNAL_DATA_NAME, size_threshold=1024)
    return dst


def comparable(path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The graph with its weights loaded, split into the proto without weight bytes and the weights."""
    model = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model, weights


@pytest.mark.parametrize("component", ["unet", "text_encoder_2"])
@pytest.mark.parametrize("inline_below", [0, graphs.EXTERNAL_DATA_BYTES])
def test_streamed_int8_is_quantize_dynamic(component, inline_below, sdxl, tmp_path):
    """The large-model int8 path writes onnxruntime's quantize_dynamic result exactly: the same nodes, value infos,
    metadata and initializers (names, order, values)."""
    cfg, models = sdxl
    export(component, cfg, models, tmp_path / "raw" / "model.onnx")
    opt = optimize.optimize(tmp_path / "raw" / "model.onnx", tmp_path / "opt" / "model.onnx")
    (tmp_path / "ref").mkdir()
    quantize.to_int8_dynamic(opt, tmp_path / "ref" / "model.onnx")  # small: the whole-model quantizer
    ext = external_copy(opt, tmp_path / "ext" / "model.onnx")
    exclude = quantize.int8_nodes_to_exclude(onnx.load(str(ext), load_external_data=False))
    out = dynamic_int8.quantize(ext, tmp_path / "lean" / "model.onnx", exclude, graphs.EXTERNAL_DATA_NAME,
                                inline_below)
    assert (out.parent / graphs.EXTERNAL_DATA_NAME).exists() == (inline_below == 0)
    assert {p.name for p in out.parent.iterdir()} <= {"model.onnx", graphs.EXTERNAL_DATA_NAME}
    got = assert_same_graph(out, tmp_path / "ref" / "model.onnx")
    assert sum(n.op_type == "MatMulInteger" for n in got.graph.node) > 3


def assert_same_graph(path, reference) -> onnx.ModelProto:
    """The graph at `path` is `reference`'s: the same nodes, value infos, metadata and initializers (names, order,
    values); returns it without its weight bytes."""
    (want, want_w), (got, got_w) = comparable(reference), comparable(path)
    assert got.SerializeToString() == want.SerializeToString()
    assert list(got_w) == list(want_w)
    for name, value in want_w.items():
        assert got_w[name].dtype == value.dtype and np.array_equal(got_w[name], value), name
    return got


def test_streamed_int8_of_qdq_convs_is_quantize_dynamic(sdxl, tmp_path):
    """The qdq scheme's second step: dynamic int8 of a U-Net that already holds static QDQ convolutions, streamed,
    is quantize_dynamic's result exactly (the QDQ nodes and their int8 weights pass through untouched)."""
    cfg, models = sdxl
    export("unet", cfg, models, tmp_path / "raw" / "model.onnx")
    opt = optimize.optimize(tmp_path / "raw" / "model.onnx", tmp_path / "opt" / "model.onnx")
    declared = {i.name for i in ort.InferenceSession(str(opt)).get_inputs()}
    feeds = [{k: v.numpy() for k, v in graphs.sample_inputs("unet", cfg, 2, (8, 8), seed).items() if k in declared}
             for seed in range(3)]
    qdq = quantize.to_int8_static_convs(opt, tmp_path / "qdq" / "model.onnx", feeds)
    (tmp_path / "ref").mkdir()
    quantize.to_int8_dynamic(qdq, tmp_path / "ref" / "model.onnx")  # small: the whole-model quantizer
    ext = external_copy(qdq, tmp_path / "ext" / "model.onnx")
    exclude = quantize.int8_nodes_to_exclude(onnx.load(str(ext), load_external_data=False))
    out = dynamic_int8.quantize(ext, tmp_path / "lean" / "model.onnx", exclude, graphs.EXTERNAL_DATA_NAME, 0)
    got = assert_same_graph(out, tmp_path / "ref" / "model.onnx")
    made = {o: n for n in got.graph.node for o in n.output}
    qdq_convs = [n for n in got.graph.node if n.op_type == "Conv" and n.input[1] in made
                 and made[n.input[1]].op_type == "DequantizeLinear"]
    assert len(qdq_convs) > 3 and sum(n.op_type == "MatMulInteger" for n in got.graph.node) > 3


def test_to_int8_dynamic_streams_large_graphs(sdxl, tmp_path, monkeypatch):
    """A graph with an external data file takes the streamed path (quantize_dynamic is not called)."""
    cfg, models = sdxl
    export("text_encoder_2", cfg, models, tmp_path / "raw" / "model.onnx")
    ext = external_copy(tmp_path / "raw" / "model.onnx", tmp_path / "ext" / "model.onnx")

    def refuse(*args, **kwargs):
        raise AssertionError("quantize_dynamic loads the whole model")

    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", refuse)
    (tmp_path / "q").mkdir()
    quantize.to_int8_dynamic(ext, tmp_path / "q" / "model.onnx")
    inputs = graphs.sample_inputs("text_encoder_2", cfg, 1, (8, 8), seed=2)
    _, got = run(tmp_path / "q" / "model.onnx", inputs)
    _, want = run(ext, inputs)
    assert np.abs(got[0] - want[0]).max() < 0.1 * np.abs(want[0]).max()


def test_gather_joins_per_tensor_files_without_loading(tmp_path):
    """torch.onnx.export's >2 GB layout (a file per tensor) -> one data file with the same tensors."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}")
               for i, shape in enumerate([(64, 64), (3,), (16, 64)])]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w0"], ["h"]), onnx.helper.make_node("MatMul", ["w2", "h"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16, 64])], weights)
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()

    def trace():
        onnx.save_model(onnx.helper.make_model(graph), str(raw), save_as_external_data=True,
                        all_tensors_to_one_file=False, size_threshold=0)
        assert len(list(raw.parent.iterdir())) == 4

    trace()
    out = external.gather(raw, tmp_path / "out" / "model.onnx", "model.onnx_data", inline_below=0)
    assert [p.name for p in raw.parent.iterdir()] == ["model.onnx"]  # each file went once copied: disk held once
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    loaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for w in weights:
        np.testing.assert_array_equal(loaded[w.name], onnx.numpy_helper.to_array(w))
    small = [t for t in onnx.load(str(out), load_external_data=False).graph.initializer if t.name == "w1"]
    assert small[0].data_location == onnx.TensorProto.DEFAULT  # under 1 kB stays inline, as onnx writes it
    trace()
    inline = external.gather(raw, tmp_path / "inline" / "model.onnx", "model.onnx_data", inline_below=10**9)
    assert [p.name for p in inline.parent.iterdir()] == ["model.onnx"]


# ------------------------------------------------------------------------- the whole export of a diffusers folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(diffusers StableDiffusionXLPipeline, its saved folder)."""
    folder = tmp_path_factory.mktemp("sdxl-src") / "sdxl"
    pipe = tiny_sdxl.make_pipeline("sdxl", seed=1)
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """precision -> our export of the tiny SDXL folder, cached for the module."""
    root, cache = tmp_path_factory.mktemp("sdxl-out"), {}

    def get(precision: str = "fp32"):
        if precision not in cache:
            result = run_cli(source[1], root / precision, "--precision", precision)
            assert result.exit_code == 0, result.output
            cache[precision] = root / precision
        return cache[precision]

    return get


def run_cli(*args):
    from click.testing import CliRunner

    from sdonnx.export import cli as export_cli

    return CliRunner().invoke(export_cli.export, [*map(str, args), "--quiet"])


def test_folder_is_optimums_sdxl_layout(exported, source):
    import json

    pipe, _ = source
    out = exported("fp32")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    meta = json.loads((out / "sdonnx.json").read_text())
    assert meta["family"] == "sdxl" and "text_encoder_2" in meta["components"]
    assert meta["scaling_factor"] == 0.13025
    assert meta["tokenizer_2"] == {"pad_token_id": pipe.tokenizer_2.pad_token_id, "max_length": 77}
    assert pipe.tokenizer_2.pad_token == "!"
    te = ort.InferenceSession(str(out / "text_encoder" / "model.onnx"))
    layers = pipe.text_encoder.config.num_hidden_layers  # SDXL's folders keep every hidden state in model.onnx
    assert [o.name for o in te.get_outputs()] == ["last_hidden_state", "pooler_output", *(
        f"hidden_states.{k}" for k in range(layers + 1))]
    cfg2 = json.loads((out / "text_encoder_2" / "config.json").read_text())
    assert cfg2["architectures"] == ["CLIPTextModelWithProjection"]
    assert cfg2["projection_dim"] == pipe.text_encoder_2.config.projection_dim


@torch.no_grad()
def test_graphs_match_diffusers_and_transformers(exported, source):
    pipe, _ = source
    out = exported("fp32")
    rng = np.random.default_rng(0)
    ids = np.stack([pipe.tokenizer_2(p, padding="max_length", max_length=77).input_ids
                    for p in ("a red circle", "a photo of a cat")]).astype(np.int64)
    got = ort.InferenceSession(str(out / "text_encoder_2" / "model.onnx")).run(None, {"input_ids": ids})
    want = pipe.text_encoder_2(torch.from_numpy(ids), output_hidden_states=True)
    np.testing.assert_allclose(got[0], want.text_embeds.numpy(), atol=TOL)
    np.testing.assert_allclose(got[-2], want.hidden_states[-2].numpy(), atol=TOL)  # what SDXL conditions on
    cfg = pipe.unet.config
    feeds = {"sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32), "timestep": np.array(421.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, cfg.cross_attention_dim), dtype=np.float32),
             "text_embeds": rng.standard_normal((2, tiny_sdxl.TEXT_2), dtype=np.float32),
             "time_ids": np.array([[16, 24, 0, 0, 16, 24]] * 2, np.float32)}
    (unet,) = ort.InferenceSession(str(out / "unet" / "model.onnx")).run(None, feeds)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
    ref = pipe.unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample
    np.testing.assert_allclose(unet, ref.numpy(), atol=TOL)


def test_optimum_runs_our_folder_like_diffusers(exported, source):
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    pipe, _ = source
    ours = ORTStableDiffusionXLPipeline.from_pretrained(exported("fp32"))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=5.0, output_type="np")
    got = ours("a red circle", latents=latents, **kwargs).images
    want = pipe("a red circle", latents=latents, **kwargs).images
    assert got.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precisions_keep_the_vae_fp32_and_stay_close(precision, exported):
    import json

    meta = json.loads((exported(precision) / "sdonnx.json").read_text())
    comps = meta["components"]
    assert comps["vae_decoder"]["precision"] == comps["vae_encoder"]["precision"] == "fp32"  # SDXL's VAE overflows
    want = "fp16" if precision == "fp16" else "int8"
    assert comps["text_encoder"]["precision"] == comps["text_encoder_2"]["precision"] == comps["unet"]["precision"] \
        == want
    assert all(c["verify"]["psnr"] > 25 for c in comps.values())


def test_int8_qdq_calibrates_on_sdxl_runs(source, tmp_path):
    import json

    result = run_cli(source[1], tmp_path / "qdq", "--precision", "int8", "--int8-scheme", "qdq")
    assert result.exit_code == 0, result.output
    nodes = onnx.load(str(tmp_path / "qdq" / "unet" / "model.onnx")).graph.node
    assert any(n.op_type == "QuantizeLinear" for n in nodes) and any(n.op_type == "MatMulInteger" for n in nodes)
    meta = json.loads((tmp_path / "qdq" / "sdonnx.json").read_text())
    assert meta["components"]["unet"]["verify"]["psnr"] > 25


def test_calibration_feeds_are_sdxl_guided_calls(source):
    from sdonnx.export import weights

    _, folder = source
    ckpt = weights.load_checkpoint(folder)
    models = weights.build_models(ckpt)
    feeds = quantize.calibration_feeds(models, ckpt.configs, ckpt.tokenizer_dir, ckpt.scheduler_config,
                                       prompts=("a red circle",), steps=2, guidance=5.0, latent_hw=(8, 8),
                                       tokenizer_2_dir=ckpt.tokenizer_2_dir, image_hw=(64, 48))
    assert len(feeds) == 2
    f = feeds[0]
    assert set(f) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert f["time_ids"].tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    # the empty negative prompt is zeros (force_zeros_for_empty_prompt); the prompt's are not
    assert not f["encoder_hidden_states"][0].any() and not f["text_embeds"][0].any()
    assert np.abs(f["encoder_hidden_states"][1]).max() > 0.1 and np.abs(f["text_embeds"][1]).max() > 0.1


@pytest.mark.parametrize("args, message", [
    (["--embedding", "EMB"], "--embedding is not supported for SDXL"),
    (["--stream"], "--stream is not supported for SDXL"),
])
def test_unsupported_options_fail_in_one_line(args, message, source, tmp_path):
    from helpers import cli_error

    emb = tmp_path / "emb.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, tiny_sdxl.TEXT_1)}, str(emb))
    args = [str(emb) if a == "EMB" else a for a in args]
    result = run_cli(source[1], tmp_path / "out", *args)
    cli_error(result, message)
    assert not (tmp_path / "out").exists()


def sdxl_sources(kind: str, folder, tmp_path) -> str:
    """A tiny SDXL source of `kind`: random preset, diffusers folder, single .safetensors file or pickled .ckpt."""
    from helpers import ldm_tool

    if kind == "random":
        return "random:tiny-sdxl"
    if kind == "folder":
        return str(folder)
    path = tmp_path / f"model.{kind}"
    if kind == "safetensors":
        return str(ldm_tool().write(folder, path))
    torch.save(ldm_tool().ldm_state_dict(folder), path)
    return str(path)


def embedding_file(tmp_path) -> str:
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(1, tiny_sdxl.TEXT_1)}, str(tmp_path / "emb.safetensors"))
    return str(tmp_path / "emb.safetensors")


@pytest.mark.parametrize("kind", ["random", "folder", "safetensors"])
@pytest.mark.parametrize("option, message", [("--embedding", "--embedding is not supported for SDXL"),
                                             ("--stream", "--stream is not supported for SDXL")])
def test_unsupported_options_fail_before_loading(kind, option, message, source, tmp_path, monkeypatch):
    """An SDXL source told by its preset, folder or file header is refused before its weights are read."""
    from helpers import cli_error

    from sdonnx.export import weights

    src = sdxl_sources(kind, source[1], tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("load_checkpoint was called")

    monkeypatch.setattr(weights, "load_checkpoint", no_loading)
    args = [option, embedding_file(tmp_path)] if option == "--embedding" else [option]
    cli_error(run_cli(src, tmp_path / "new" / "out", *args), message)
    assert not (tmp_path / "new").exists()


def test_unsupported_options_of_a_pickled_sdxl_fail_after_loading(source, tmp_path, monkeypatch):
    """A .ckpt's family is known only once it is loaded: the refusal comes then, and leaves nothing."""
    from helpers import cli_error

    from sdonnx.export import weights

    src = sdxl_sources("ckpt", source[1], tmp_path)
    calls, load = [], weights.load_checkpoint
    monkeypatch.setattr(weights, "load_checkpoint", lambda *a, **k: calls.append(a) or load(*a, **k))
    cli_error(run_cli(src, tmp_path / "new" / "out", "--stream"), "--stream is not supported for SDXL")
    assert calls and not any((tmp_path / "new").iterdir())


def test_short_disk_skips_the_saved_optimization(sdxl, tmp_path, monkeypatch):
    """A graph whose weights would not fit the disk twice keeps its traced form and the report says so; with room
    it is optimized."""
    import collections

    from sdonnx.export import cli as export_cli

    cfg, models = sdxl
    export("text_encoder_2", cfg, models, tmp_path / "traced" / "model.onnx")
    usage = collections.namedtuple("usage", "total used free")
    for free, skipped in ((2**20, True), (2**40, False)):
        work = tmp_path / f"work-{free}"
        external_copy(tmp_path / "traced" / "model.onnx", work / "raw" / "model.onnx")
        monkeypatch.setattr(export_cli.shutil, "disk_usage", lambda path: usage(2**41, 0, free))
        job = export_cli.ExportJob("x", tmp_path / "out")
        export_cli._optimize(job, "text_encoder_2", work)
        assert not (work / "raw").exists() and (work / "opt" / "model.onnx").exists()
        assert bool(job.warnings) == skipped
        assert all("offline graph optimization skipped" in w for w in job.warnings)
        inputs = graphs.sample_inputs("text_encoder_2", cfg, 1, (8, 8), seed=2)
        _, got = run(work / "opt" / "model.onnx", inputs)
        _, want = run(tmp_path / "traced" / "model.onnx", inputs)
        np.testing.assert_allclose(got[0], want[0], atol=TOL)


@pytest.mark.parametrize("free_gib, short", [(1.5, "3.5"), (4.96, "0.1")])
def test_short_disk_warning_names_the_shortfall(free_gib, short, tmp_path, monkeypatch):
    """Weights of 3 GiB (a sparse file) beside 1.5 GiB free: 3 GiB again plus the 2 GiB margin is 3.5 GiB short;
    a shortfall under 0.1 GiB rounds up, never down to 0.0."""
    import collections

    from sdonnx.export import cli as export_cli

    (tmp_path / "raw").mkdir()
    with open(tmp_path / "raw" / graphs.EXTERNAL_DATA_NAME, "wb") as f:
        f.truncate(3 * 2**30)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export_cli.shutil, "disk_usage", lambda path: usage(2**41, 0, int(free_gib * 2**30)))
    job = export_cli.ExportJob("x", tmp_path / "out")
    export_cli._optimize(job, "unet", tmp_path)
    (warning,) = job.warnings
    assert warning == (f"unet: offline graph optimization skipped: a second copy of its 3.0 GiB of weights and a 2 GiB "
                       f"margin need {short} GiB more free disk than the {free_gib:.1f} GiB free")
    assert (tmp_path / "opt" / graphs.EXTERNAL_DATA_NAME).exists()


@pytest.mark.parametrize("args", [["--static", "32x48"], ["--attention", "mha"], ["--step-cache"]])
def test_export_options_work_for_sdxl(args, source, tmp_path):
    import json

    result = run_cli(source[1], tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    meta = json.loads((out / "sdonnx.json").read_text())
    assert all(c["verify"]["max_abs_err"] < 1e-3 for c in meta["components"].values())
    names = [i.name for i in ort.InferenceSession(str(out / "unet" / "model.onnx")).get_inputs()]
    assert names[-2:] == ["text_embeds", "time_ids"]
    if args[0] == "--static":
        assert ort.InferenceSession(str(out / "unet" / "model.onnx")).get_inputs()[0].shape == [2, 4, 24, 16]
    if args[0] == "--step-cache":
        shallow = ort.InferenceSession(str(out / "unet_shallow" / "model.onnx"))
        assert {"text_embeds", "time_ids", "deep_features"} <= {i.name for i in shallow.get_inputs()}
        assert meta["step_cache"]["deep_features_verify"]["max_abs_err"] < 1e-3
    if args[0] == "--attention":
        assert any(n.op_type == "MultiHeadAttention" for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node)


def test_sdxl_inpainting_folder(tmp_path):
    import json

    src = tiny_sdxl.save_pipeline(tmp_path / "src", "sdxl-inpaint", seed=2)
    result = run_cli(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    meta = json.loads((tmp_path / "out" / "sdonnx.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    assert (meta["family"], meta["unet_in_channels"]) == ("sdxl-inpaint", 9)


def test_random_tiny_sdxl_preset_exports(tmp_path):
    """`sdonnx export random:tiny-sdxl` (the CLI's small SDXL) writes a loadable SDXL folder."""
    import json

    result = run_cli("random:tiny-sdxl", tmp_path / "out", "--precision", "int8")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "sdonnx.json").read_text())
    assert meta["family"] == "sdxl" and set(meta["components"]) >= {"text_encoder_2", "unet"}
    assert meta["components"]["text_encoder_2"]["precision"] == "int8"
    assert (tmp_path / "out" / "tokenizer_2" / "vocab.json").is_file()
