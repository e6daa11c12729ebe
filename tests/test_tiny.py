"""The bundled tiny model: its folder, its defaults, and that it draws what it is asked for."""

import json
from pathlib import Path

import numpy as np
import pytest

from sdonnx.export.folder import SUGGESTIBLE, source_defaults


def test_source_defaults_read_from_a_folder(tmp_path):
    assert source_defaults(str(tmp_path)) == {}
    assert source_defaults("random:sd15") == {}
    (tmp_path / "sdonnx_defaults.json").write_text(json.dumps({"steps": 12, "guidance": 3.0, "colour": "x"}))
    assert source_defaults(str(tmp_path)) == {"steps": 12, "guidance": 3.0}
    assert set(source_defaults(str(tmp_path))) <= set(SUGGESTIBLE)


@pytest.fixture(scope="module")
def bundled():
    from sdonnx import Pipeline

    return Pipeline.load()


def test_bundled_folder_is_intact(bundled):
    from sdonnx.model import read_model

    info = read_model(bundled.info.path, verify=True)  # every checksum in sdonnx.json
    assert info.family == "tiny"
    assert (info.defaults.width, info.defaults.height) == (64, 64)
    assert info.prediction_type == "v_prediction"


def test_generate_with_no_model_uses_the_bundled_one(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sdonnx.cli import main

    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["generate", "a red circle on a blue background", "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (64, 64)
    assert "a red circle on a blue background" in image.info["parameters"]


def test_bundled_model_draws_what_it_is_asked(bundled):
    from sdonnx.export.tiny.shapes import random_scene, score

    rng = np.random.default_rng(123)
    scenes = [random_scene(rng) for _ in range(16)]
    images = [bundled.txt2img(s.caption(), seed=k)[0] for k, s in enumerate(scenes)]
    acc = score(scenes, images)
    # Measured on 200 captions in benchmarks/results/tiny_quality.md; loose bounds for 16 of them.
    assert acc["background"] >= 85 and acc["color"] >= 80 and acc["position"] >= 80 and acc["shape"] >= 60, acc


def test_bundled_graphs_are_the_bundled_weights(bundled):
    """The committed ONNX folder is an export of the committed PyTorch weights."""
    import torch

    from sdonnx.export.cli import TINY_WEIGHTS
    from sdonnx.export.weights import build_models, load_checkpoint

    models = build_models(load_checkpoint(TINY_WEIGHTS))
    ids = bundled.tokenizer(["a small green triangle in the top left on a white background"])
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        context = models["text_encoder"](torch.from_numpy(ids))[0]
        expected = models["unet"](torch.from_numpy(sample), torch.tensor(500.0), context.repeat(2, 1, 1)).numpy()
    got_context = bundled.components["text_encoder"](input_ids=ids)["last_hidden_state"]
    np.testing.assert_allclose(got_context, context.numpy(), atol=1e-4)
    got = bundled.components["unet"](sample=sample, timestep=np.float64(500.0),
                                      encoder_hidden_states=np.repeat(got_context, 2, 0))["out_sample"]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_qdq_int8_export_draws_what_fp32_draws(bundled, tmp_path):
    """`sdonnx export tiny --precision int8 --int8-scheme qdq` (static int8 convolutions, calibrated on sampling
    runs): the evaluator reads nearly the same scenes off its pictures as off the fp32 folder's."""
    from click.testing import CliRunner

    from sdonnx.cli import main
    from sdonnx.export.tiny.shapes import judge, random_scene

    out = tmp_path / "qdq"
    result = CliRunner().invoke(main, ["export", "tiny", str(out), "--precision", "int8", "--int8-scheme", "qdq",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    from sdonnx import Pipeline

    qdq = Pipeline.load(out)
    ops = json.loads((out / "sdonnx.json").read_text())["components"]["unet"]["ops"]
    assert ops.get("QuantizeLinear", 0) > 0  # the convolutions' activations really are quantized
    rng = np.random.default_rng(321)
    captions = [random_scene(rng).caption() for _ in range(16)]
    same = sum(judge(bundled.txt2img(c, seed=k)[0]) == judge(qdq.txt2img(c, seed=k)[0])
               for k, c in enumerate(captions))
    assert same >= 13, same


def test_tiny_quality_pairs_settings_on_the_same_pictures(bundled, monkeypatch):
    """benchmarks/tiny_quality.py: K seeds per caption draw K different pictures (the first seed as before),
    shape accuracy splits by caption size, and the paired count and McNemar's exact p come out right."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import tiny_quality as tq

    scenes = tq.fresh_scenes(3, 5)
    one = tq.generate(bundled, scenes, 100, steps=2)
    two = tq.generate(bundled, scenes, 100, seeds=2, steps=2)
    assert len(two) == 6
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one, two[:3]))
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(two[:3], two[3:]))
    acc = tq.evaluate(bundled, scenes, 100, seeds=2, steps=2)
    assert len(acc["shape_hits"]) == 6 and abs(acc["shape"] - 100 * sum(acc["shape_hits"]) / 6) < 1e-9

    from sdonnx.export.tiny.shapes import Scene
    sized = [Scene("circle", "red", "blue", "small"), Scene("square", "red", "blue"), Scene("circle", "red", "blue", "small")]
    assert tq.shape_by_size(sized, [True, False, False]) == {"small": 50.0, "medium": 0.0}
    assert tq.paired([True, True, False, True], [False, True, True, False]) == {
        "only_this": 2, "only_baseline": 1, "p": 1.0}
    assert tq.mcnemar(0, 5) == 2 / 32 and tq.mcnemar(0, 0) == 1.0
    assert abs(tq.mcnemar(10, 0) - 2 / 1024) < 1e-15 and tq.mcnemar(3, 7) == tq.mcnemar(7, 3)


def test_tiny_quality_judges_openvino_pictures_from_our_noise(bundled, tmp_path, monkeypatch):
    """benchmarks/tiny_quality.py --openvino: the request hands OpenVINO's pipeline our captions and the very noise
    our runtime draws for each seed (so the two runtimes' pictures pair up), its pictures file is read back and
    judged in drawing order, and each int8 setting is paired with its own system's fp32 and with the other's int8."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import tiny_quality as tq
    from sdonnx.export.tiny.shapes import render

    scenes = tq.fresh_scenes(3, 5)
    shape = tq.latent_shape(bundled)
    assert shape == (1, 4, 16, 16)
    ours = tq.generate(bundled, scenes[:1], 100, steps=2)[0]
    drawn = bundled.txt2img(scenes[0].caption(), seed=100, steps=2)[0]  # the runtime's own draw for seed 100
    assert np.array_equal(np.asarray(ours), np.asarray(drawn))

    tq.openvino_request(tmp_path / "request.npz", bundled, scenes, 100, seeds=2)
    with np.load(tmp_path / "request.npz") as req:
        assert [str(c) for c in req["captions"]] == [s.caption() for s in scenes * 2]
        assert req["latents"].shape == (6, 4, 16, 16)
        np.testing.assert_array_equal(req["latents"][4], tq.start_noise(104, shape)[0])  # 2nd seed, 2nd caption
        assert (int(req["steps"]), float(req["guidance"]), int(req["size"])) == (20, 3.0, 64)

    truth = np.stack([np.asarray(render(s, 64)) for s in scenes])
    wrong = truth[[1, 0, 2]]  # the first two captions' pictures swapped
    np.savez(tmp_path / "images.npz", images=np.concatenate([truth, wrong]), precision="bf16",
             scheduler="DDIMScheduler", seconds=1.5)
    images, facts = tq.read_openvino_images(tmp_path / "images.npz")
    assert facts == {"precision": "bf16", "scheduler": "DDIMScheduler", "seconds": 1.5}
    acc = tq.judged(list(images), scenes * 2, facts["seconds"])
    assert acc["shape_hits"][:3] == [True] * 3 and acc["shape_hits"][5]
    assert acc["color_hits"][:3] == [True] * 3
    assert acc["background"] < 100 and acc["seconds"] == 1.5
    with pytest.raises(SystemExit, match="5 pictures for 6 captions"):
        tq.judged(list(images[:5]), scenes * 2, 0.0)
    np.savez(tmp_path / "float.npz", images=truth / 255.0, precision="f32", scheduler="DDIMScheduler", seconds=1.0)
    with pytest.raises(SystemExit, match="uint8"):
        tq.read_openvino_images(tmp_path / "float.npz")

    ov = [("fp32 IR", "OV fp32"), ("hybrid int8", "OV int8")]
    assert tq.system_pairs("fp32", ["int8"], ov) == [("int8", "fp32"), ("OV fp32", "fp32"), ("OV int8", "OV fp32"),
                                                     ("int8", "OV int8")]
    assert tq.system_pairs("fp32", ["int8"], []) == [("int8", "fp32")]
    hits = {"a": {"shape_hits": [True, True, False], "color_hits": [True] * 3},
            "b": {"shape_hits": [False, True, True], "color_hits": [False] * 3}}
    assert tq.pairs_table(hits, [("a", "b")]).splitlines()[-1] == "| a | b | 1 | 1 | 1 | 3 | 0 | 0.25 |"
    (tmp_path / "ir").mkdir()
    assert tq.openvino_kind(tmp_path / "ir") == "fp32 IR"
    (tmp_path / "ir" / "openvino_config.json").write_text(json.dumps({"quantization_config": {
        "bits": 8, "quant_method": "hybrid"}}))
    assert tq.openvino_kind(tmp_path / "ir") == "hybrid int8"
    with pytest.raises(SystemExit, match="no OpenVINO U-Net"):
        tq.check_openvino(tmp_path / "ir")

    from sdonnx.export.quantize import METHODS

    for scheme in ("openvino", "qdq", "compact"):  # the openvino scheme's U-Net is static QDQ too: not "qdq"
        unet = {"quantization": {"method": METHODS[scheme]}}
        (tmp_path / "sdonnx.json").write_text(json.dumps({"components": {"unet": unet}}))
        assert tq.int8_scheme(tmp_path) == scheme
        assert tq.int8_label(tmp_path, "openvino") == f"int8 ({scheme}), defaults, provider openvino"
    # an int8 VAE decoder (--int8-vae) is named in the label, so two such folders do not share one
    (tmp_path / "sdonnx.json").write_text(json.dumps({"components": {"unet": unet, "vae_decoder": {"precision": "int8"}}}))
    assert tq.int8_label(tmp_path, "cpu") == "int8 (compact + int8 VAE), defaults"
    # a folder exported before the scheme's description changed: named by its wording
    old = {"quantization": {"method": "static QDQ int8 convolutions and linear layers (an older wording)"}}
    (tmp_path / "sdonnx.json").write_text(json.dumps({"components": {"unet": old}}))
    assert tq.int8_scheme(tmp_path) == "openvino"
