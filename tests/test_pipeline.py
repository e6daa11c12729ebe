"""The runtime pipeline against diffusers on tiny random models exported by optimum (same weights, same noise)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import SIZE, one_line_error, picture, square_mask, tiny_folders
from sdonnx import image as imaging
from sdonnx.errors import SdonnxError
from sdonnx.model import default_model_dir, read_model, sha256
from sdonnx.pipeline import Pipeline
from sdonnx.session import Component, available_providers, resolve_provider

LATENT = SIZE // 2  # the tiny VAE downsamples by 2
PROMPT, NEGATIVE = "a red circle on a blue background", "green square"


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def sd1(base):
    pt, onnx = tiny_folders("sd1", base)
    return pt, onnx, Pipeline.load(onnx)


@pytest.fixture(scope="session")
def ref_sd1(sd1):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd1[0], safety_checker=None)
    ref.folder_scheduler = dict(ref.scheduler.config)  # tests swap schedulers; each starts from the folder's
    return ref


def diffusers_scheduler(name: str, config):
    import diffusers as d

    cls = {"ddim": d.DDIMScheduler, "euler": d.EulerDiscreteScheduler, "pndm": d.PNDMScheduler,
           "dpmpp_2m_karras": d.DPMSolverMultistepScheduler}[name]
    return cls.from_config(config, **({"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}))


def noise(shape=(1, 4, LATENT, LATENT), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
    """Stands in for diffusers' retrieve_latents: the VAE posterior's mean, as our runtime takes."""
    return encoder_output.latent_dist.mode()


def run_reference(ref, latents, steps=4, guidance=7.5, **kw) -> np.ndarray:
    import torch

    return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, width=SIZE,
               height=SIZE, latents=torch.from_numpy(latents), output_type="np", **kw).images


# ---- txt2img parity ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m_karras", "pndm"])
def test_txt2img_matches_diffusers(sd1, ref_sd1, name):
    _, _, pipe = sd1
    ref_sd1.scheduler = diffusers_scheduler(name, ref_sd1.folder_scheduler)
    lat = noise()
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=4, guidance=7.5, scheduler=name, width=SIZE, height=SIZE,
                        latents=lat, output_type="np")
    theirs = run_reference(ref_sd1, lat)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert ours.std() > 0.01  # a real picture, not a constant
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def test_txt2img_without_guidance_and_several_images(sd1, ref_sd1):
    _, _, pipe = sd1
    ref_sd1.scheduler = diffusers_scheduler("euler", ref_sd1.folder_scheduler)
    lat = noise((2, 4, LATENT, LATENT))
    for guidance in (1.0, 7.5):
        ours = pipe.txt2img(PROMPT, NEGATIVE, steps=3, guidance=guidance, scheduler="euler", width=SIZE,
                            height=SIZE, num_images=2, latents=lat, output_type="np")
        theirs = run_reference(ref_sd1, lat, steps=3, guidance=guidance, num_images_per_prompt=2)
        np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert not np.allclose(ours[0], ours[1], atol=1e-3)


def test_txt2img_sd2_v_prediction_matches_diffusers(base):
    from diffusers import StableDiffusionPipeline

    pt, onnx = tiny_folders("sd2", base)
    pipe = Pipeline.load(onnx)
    assert (pipe.info.family, pipe.info.prediction_type) == ("sd2", "v_prediction")
    ref = StableDiffusionPipeline.from_pretrained(pt, safety_checker=None)
    lat = noise()
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=4, guidance=7.5, scheduler="ddim", width=SIZE, height=SIZE,
                        latents=lat, output_type="np")
    np.testing.assert_allclose(ours, run_reference(ref, lat), atol=1e-3, rtol=0)


# ---- img2img and inpainting ----------------------------------------------------------------------

def test_img2img_matches_diffusers(sd1, ref_sd1, monkeypatch):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

    _, _, pipe = sd1
    lat = noise(seed=3)
    # diffusers samples the VAE posterior and draws its own noise: make both what we use
    monkeypatch.setattr(mod, "retrieve_latents", posterior_mean)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **_: torch.from_numpy(lat))
    ddim = diffusers_scheduler("ddim", ref_sd1.folder_scheduler)
    ref = StableDiffusionImg2ImgPipeline(**{**ref_sd1.components, "scheduler": ddim})
    ours = pipe.img2img(PROMPT, picture(), strength=0.5, negative_prompt=NEGATIVE, steps=4, guidance=7.5,
                        scheduler="ddim", latents=lat, output_type="np")
    theirs = ref(PROMPT, picture(), strength=0.5, negative_prompt=NEGATIVE, num_inference_steps=4,
                 guidance_scale=7.5, output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


def test_img2img_low_strength_returns_nearly_the_input(sd1):
    _, _, pipe = sd1
    image = picture()
    clean = pipe._encode(imaging.to_array(image))
    # a random VAE does not reproduce its input, so compare where the denoising ends: the latents
    def final_latents(strength: float) -> np.ndarray:
        seen = []
        pipe.img2img(PROMPT, image, strength=strength, steps=10, scheduler="ddim", seed=1,
                     callback=lambda i, n, x: seen.append(x))
        return seen[-1]

    low, full = final_latents(0.1), final_latents(1.0)
    assert np.abs(low - clean).mean() < 0.1 * np.abs(full - clean).mean()
    # so little strength that no step remains: the image's own VAE round trip
    round_trip = pipe._decode(clean)[0]
    none_left = pipe.img2img(PROMPT, image, strength=0.01, steps=10, scheduler="ddim", seed=1, output_type="np")[0]
    np.testing.assert_allclose(none_left, round_trip, atol=1e-6)


def inpaint_reference(pt_dir: Path, monkeypatch, scheduler: str):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod

    monkeypatch.setattr(mod, "retrieve_latents", posterior_mean)
    ref = StableDiffusionInpaintPipeline.from_pretrained(pt_dir, safety_checker=None)
    ref.scheduler = diffusers_scheduler(scheduler, ref.scheduler.config)
    return ref


@pytest.mark.parametrize("family", ["sd1", "inpaint"])
def test_inpaint_matches_diffusers_and_keeps_unmasked_pixels(base, family, monkeypatch):
    import torch

    pt, onnx = tiny_folders(family, base)
    pipe = Pipeline.load(onnx)
    assert pipe.info.is_inpaint == (family == "inpaint")
    image, mask, lat = picture(), square_mask(), noise(seed=5)
    ours = pipe.inpaint(PROMPT, image, mask, negative_prompt=NEGATIVE, steps=3, guidance=7.5, scheduler="euler",
                        latents=lat, output_type="np")[0]
    ref = inpaint_reference(pt, monkeypatch, "euler")
    theirs = ref(PROMPT, image, mask, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
                 height=SIZE, width=SIZE, latents=torch.from_numpy(lat), output_type="np").images[0]
    inside = np.asarray(mask) >= 128
    # diffusers does not paste the original back; inside the mask both must agree
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-3, rtol=0)
    if family == "inpaint":
        one_line_error(lambda: pipe.txt2img(PROMPT, steps=1), "inpainting model", "inpaint()")
    pil = pipe.inpaint(PROMPT, image, mask, steps=2, scheduler="euler", seed=0)[0]
    assert np.array_equal(np.asarray(pil)[~inside], np.asarray(image)[~inside])
    assert not np.array_equal(np.asarray(pil)[inside], np.asarray(image)[inside])


# ---- seeds, callback, output --------------------------------------------------------------------

def test_seeds_and_callback(sd1):
    _, _, pipe = sd1
    calls = []
    a = pipe.txt2img(PROMPT, steps=3, scheduler="euler", seed=7, callback=lambda i, n, x: calls.append((i, n, x.shape)))
    b = pipe.txt2img(PROMPT, steps=3, scheduler="euler", seed=7)
    c = pipe.txt2img(PROMPT, steps=3, scheduler="euler", seed=8)
    assert isinstance(a[0], Image.Image) and a[0].size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert [(i, n) for i, n, _ in calls] == [(0, 3), (1, 3), (2, 3)]
    assert calls[0][2] == (1, 4, LATENT, LATENT)


def test_defaults_come_from_the_folder(sd1):
    _, _, pipe = sd1
    d = pipe.info.defaults
    assert (d.scheduler, d.width, d.height) == ("pndm", SIZE, SIZE)
    assert pipe.info.family == "sd1" and pipe.info.vae_scale_factor == 2


# ---- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors(sd1, tmp_path):
    _, _, pipe = sd1
    one_line_error(lambda: pipe.txt2img(PROMPT, width=30, height=32, steps=1), "multiples of 8", "30x32")
    one_line_error(lambda: pipe.txt2img(PROMPT, scheduler="magic", steps=1), "unknown scheduler", "magic")
    one_line_error(lambda: pipe.txt2img(PROMPT, steps=1, latents=noise((1, 4, 8, 8))), "latents", "shape")
    for strength in (0.0, 1.5, -0.2):
        one_line_error(lambda: pipe.img2img(PROMPT, picture(), strength=strength, steps=1), "strength")
    small_mask = square_mask().resize((16, 16))
    one_line_error(lambda: pipe.inpaint(PROMPT, picture(), small_mask, steps=1), "mask", "16x16", "32x32")
    junk = tmp_path / "notes.png"
    junk.write_text("not a picture")
    one_line_error(lambda: pipe.img2img(PROMPT, junk, steps=1), "not an image", "notes.png")
    one_line_error(lambda: pipe.img2img(PROMPT, tmp_path / "absent.png", steps=1), "not found")


def test_nan_in_decoded_image_is_reported(sd1, monkeypatch):
    _, _, pipe = sd1
    real = pipe.components["vae_decoder"]
    monkeypatch.setitem(pipe.components, "vae_decoder",
                        lambda **feeds: {"sample": real(**feeds)["sample"] * np.float32("nan")})
    one_line_error(lambda: pipe.txt2img(PROMPT, steps=1), "NaN")


def test_model_folder_checks(sd1, tmp_path):
    _, onnx, _ = sd1
    one_line_error(lambda: read_model(tmp_path / "nowhere"), "not found")
    one_line_error(lambda: Pipeline.load(tmp_path), "not a model folder", "text_encoder/model.onnx")
    partial = tmp_path / "partial"
    shutil.copytree(onnx, partial, ignore=shutil.ignore_patterns("unet"))
    one_line_error(lambda: read_model(partial), "missing", "unet/model.onnx")

    ours = tmp_path / "ours"
    shutil.copytree(onnx, ours)
    files = {rel: {"sha256": sha256(ours / rel), "size": (ours / rel).stat().st_size}
             for rel in ("unet/model.onnx", "vae_decoder/model.onnx")}
    meta = {"format": 1, "family": "tiny", "prediction_type": "epsilon", "latent_channels": 4, "unet_in_channels": 4,
            "vae_scale_factor": 2, "scaling_factor": 0.5, "sample_size": 48, "files": files,
            "components": {"unet": {"precision": "fp32"}},
            "defaults": {"steps": 3, "guidance": 4.0, "scheduler": "euler", "width": 48, "height": 40}}
    (ours / "sdonnx.json").write_text(json.dumps(meta))
    info = read_model(ours, verify=True)
    assert (info.family, info.scaling_factor, info.defaults.steps, info.defaults.scheduler) == ("tiny", 0.5, 3, "euler")
    assert (info.defaults.width, info.defaults.height) == (48, 40) and info.precision("unet") == "fp32"
    assert info.checks == {rel: "sha256 ok" for rel in files}

    meta["files"]["unet/model.onnx"]["sha256"] = "0" * 64
    (ours / "sdonnx.json").write_text(json.dumps(meta))
    one_line_error(lambda: read_model(ours), "checksum mismatch", "unet/model.onnx")
    assert read_model(ours, verify=False).checks["unet/model.onnx"] == "size ok"
    meta["files"]["unet/model.onnx"]["size"] += 1
    (ours / "sdonnx.json").write_text(json.dumps(meta))
    one_line_error(lambda: read_model(ours, verify=False), "size mismatch")


def test_default_model_dir_is_the_bundled_one_or_a_clear_error():
    try:
        path = default_model_dir()
    except SdonnxError as err:
        assert "bundled tiny model" in str(err)
    else:
        assert (path / "unet" / "model.onnx").is_file()


# ---- sessions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("openvino", [False, True])
@pytest.mark.parametrize("installed, have, auto", [
    (["CPUExecutionProvider"], ["cpu"], "CPUExecutionProvider"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["cpu", "cuda"], "CUDAExecutionProvider"),
    (["DmlExecutionProvider", "CPUExecutionProvider"], ["cpu", "dml"], "DmlExecutionProvider"),
    (["AzureExecutionProvider", "DmlExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["cpu", "cuda", "dml"], "CUDAExecutionProvider"),
])
def test_providers(installed, have, auto, openvino, monkeypatch):
    """Provider choice on onnxruntime builds with and without the GPU providers, with and without the openvino
    package, whichever this machine has; auto never picks OpenVINO (it changes the numerics: bf16)."""
    from sdonnx import openvino_session, session

    assert "cpu" in available_providers()  # this machine's own build
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: installed)
    monkeypatch.setattr(openvino_session, "available", lambda: openvino)
    have = have + ["openvino"] * openvino
    assert available_providers() == have
    assert resolve_provider("auto") == auto
    assert resolve_provider("cpu") == resolve_provider("CPU") == "CPUExecutionProvider"
    one_line_error(lambda: resolve_provider("tpu"), "unknown provider", "cpu, cuda, dml, openvino, auto",
                   ", ".join(have))
    for name, full in (("cuda", "CUDAExecutionProvider"), ("dml", "DmlExecutionProvider")):
        if full in installed:
            assert resolve_provider(name) == full
        else:
            one_line_error(lambda: resolve_provider(name), f"provider {name!r} is not installed", ", ".join(have))
    if openvino:
        assert resolve_provider("openvino") == "OpenVINO"
    else:
        one_line_error(lambda: resolve_provider("openvino"), "pip install 'sdonnx[openvino]'")


def toy_graph(path: Path, float_type, time_type, time_shape, batch) -> Path:
    """y = x * 2 + timestep, with the given dtypes and a fixed or symbolic batch."""
    import onnx
    from onnx import TensorProto, helper

    ft = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT}[float_type]
    tt = {np.int64: TensorProto.INT64, np.float32: TensorProto.FLOAT}[time_type]
    nodes = [helper.make_node("Cast", ["timestep"], ["t"], to=ft),
             helper.make_node("Mul", ["sample", "two"], ["x2"]),
             helper.make_node("Add", ["x2", "t"], ["out_sample"])]
    two = helper.make_tensor("two", ft, [], [2.0])
    time_dims = ["batch"] if time_shape == "batch" else []
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("sample", ft, [batch, 3]),
                                             helper.make_tensor_value_info("timestep", tt, time_dims)],
                              [helper.make_tensor_value_info("out_sample", ft, [batch, 3])], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path / "model.onnx")
    return path / "model.onnx"


@pytest.mark.parametrize("float_type,time_type,time_shape,batch", [
    (np.float16, np.int64, "batch", "batch"), (np.float32, np.float32, "scalar", "batch"),
    (np.float32, np.float32, "scalar", 2)])
def test_component_adapts_feeds(tmp_path, float_type, time_type, time_shape, batch):
    comp = Component(toy_graph(tmp_path, float_type, time_type, time_shape, batch))
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = comp(sample=x, timestep=np.float64(10))["out_sample"]
    if time_shape == "batch" and batch == "batch":
        assert comp.io_precision == "fp16"
    assert out.dtype == np.float32 and out.shape == (3, 3)  # fixed batch 2: run in chunks of two
    np.testing.assert_allclose(out, x * 2 + 10)
    one_line_error(lambda: comp(sample=x[0], timestep=np.float64(1)), "sample", "rank 2")


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="CUDAExecutionProvider not available")
def test_cuda_matches_cpu(sd1):
    _, onnx, cpu = sd1
    gpu = Pipeline.load(onnx, provider="cuda")
    kw = dict(steps=3, scheduler="euler", seed=3, output_type="np")
    np.testing.assert_allclose(gpu.txt2img(PROMPT, **kw), cpu.txt2img(PROMPT, **kw), atol=5e-3)


# ---- our own exporter's folders ------------------------------------------------------------------

def test_runs_sdonnx_exported_fp16_folder(sd1, tmp_path):
    """The exporter's folder (sdonnx.json, fp16 graphs) gives the optimum fp32 folder's picture."""
    from click.testing import CliRunner

    from sdonnx.cli import main

    pt, _, reference = sd1
    out = tmp_path / "fp16"
    result = CliRunner().invoke(main, ["export", str(pt), str(out), "--precision", "fp16"])
    if result.exit_code != 0 and "needs the export extra" in result.output:
        pytest.skip("export extra not installed")
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out, verify=True)
    assert pipe.info.meta and all(status == "sha256 ok" for status in pipe.info.checks.values())
    assert pipe.info.precision("unet") == "fp16"  # computed in fp16 behind float32 inputs and outputs
    kw = dict(negative_prompt=NEGATIVE, steps=3, guidance=7.5, scheduler="euler", latents=noise(), output_type="np")
    np.testing.assert_allclose(pipe.txt2img(PROMPT, **kw), reference.txt2img(PROMPT, **kw), atol=2e-2, rtol=0)


# ---- image helpers -------------------------------------------------------------------------------

def test_image_sizing_masks_and_png(tmp_path):
    import torch

    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    cropped = imaging.fit(big)  # no size asked: centred crop to multiples of 8, pixels untouched
    assert cropped.size == (64, 48)
    assert np.array_equal(np.asarray(cropped), np.asarray(big)[1:49, 3:67])
    assert imaging.fit(big, 32, 24).size == (32, 24)
    one_line_error(lambda: imaging.fit(big, 33, 24), "multiples of 8")
    x = imaging.to_array(cropped)
    assert x.shape == (1, 3, 48, 64) and x.min() >= -1 and x.max() <= 1

    grey = Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8), "L")
    assert imaging.mask_array(grey).ravel().tolist() == [0, 0, 1, 1]  # diffusers: >= 0.5 repaints
    m = (np.random.default_rng(1).random((1, 1, 24, 40)) > 0.5).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m), size=(6, 10)).numpy()
    np.testing.assert_array_equal(imaging.shrink_mask(m, 6, 10), ref)

    path = imaging.save_png(cropped, tmp_path / "sub" / "x.png", {"prompt": "cat", "negative_prompt": "dog",
                                                                   "steps": 3, "seed": 9, "mask": None})
    text = Image.open(path).text["parameters"]
    assert text == "cat\nNegative prompt: dog\nSteps: 3, Seed: 9"
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's owner-only one
