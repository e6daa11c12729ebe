"""The runtime with a tiny VAE (TAESD) beside the full one: whole pipelines equal diffusers' with
pipe.vae = AutoencoderTiny on the same latents, previews, folder defaults and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import SIZE, cli_error, one_line_error, picture, square_mask
from sdonnx.pipeline import Pipeline

PROMPT, NEGATIVE = "a red circle on a blue background", "green square"
LATENT = SIZE // 2  # the tiny test VAE downsamples by 2
TOL = 2 / 255


def export(*args):
    from sdonnx.export import cli as export_cli

    return CliRunner().invoke(export_cli.export, [*map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (diffusers folder, our export with --tiny-vae random, its pipeline)."""
    import tiny_sd

    root, out = tmp_path_factory.mktemp("tiny-vae"), {}
    for family in ("sd1", "inpaint"):
        pt = tiny_sd.save_pipeline(root / family, family, seed=1)
        onnx = root / f"{family}-onnx"
        result = export(pt, onnx, "--tiny-vae", "random")
        assert result.exit_code == 0, result.output
        out[family] = (pt, onnx, Pipeline.load(onnx))
    return out


def reference(cls, pt):
    """diffusers' pipeline `cls` on the folder, its VAE swapped for the AutoencoderTiny `random` stands for."""
    from diffusers import AutoencoderTiny

    from sdonnx.export.tiny_vae import random_tiny_vae

    ours = random_tiny_vae(seed=0, downscale=2)
    tiny = AutoencoderTiny.from_config(ours.config.to_dict())
    tiny.load_state_dict(ours.state_dict(), strict=True)
    ref = cls.from_pretrained(pt, safety_checker=None)
    ref.vae = tiny.eval()
    return ref


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)


def well_conditioned(run, lat: np.ndarray, got: np.ndarray) -> None:
    """A nudge of the latents far below the tolerance moves the reference far less than it."""
    assert np.abs(run(lat + 1e-5) - got).max() < 0.1 * TOL


def test_txt2img_with_the_tiny_vae_matches_diffusers(folders):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pt, _, pipe = folders["sd1"]
    ref = reference(StableDiffusionPipeline, pt)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    lat = noise(1)

    def theirs(x):
        return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, width=SIZE,
                   height=SIZE, latents=torch.from_numpy(x), output_type="np").images

    want = theirs(lat)
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=4, guidance=7.5, scheduler="ddim", width=SIZE, height=SIZE,
                        latents=lat, output_type="np", vae="tiny")
    full = pipe.txt2img(PROMPT, NEGATIVE, steps=4, guidance=7.5, scheduler="ddim", width=SIZE, height=SIZE,
                        latents=lat, output_type="np")
    assert want.std() > 0.01 and np.abs(full - want).max() > 10 * TOL  # the tiny VAE draws its own picture
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    well_conditioned(theirs, lat, want)


def test_img2img_encodes_with_the_tiny_vae_as_diffusers(folders, monkeypatch):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

    pt, _, pipe = folders["sd1"]
    lat = noise(3)
    drawn = {"noise": lat}
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **_: torch.from_numpy(drawn["noise"]))
    ref = reference(StableDiffusionImg2ImgPipeline, pt)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)

    def theirs(x):
        drawn["noise"] = x
        return ref(PROMPT, picture(), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=5,
                   guidance_scale=7.5, output_type="np").images

    want = theirs(lat)
    ours = pipe.img2img(PROMPT, picture(), strength=0.6, negative_prompt=NEGATIVE, steps=5, guidance=7.5,
                        scheduler="ddim", latents=lat, output_type="np", vae="tiny")
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    well_conditioned(theirs, lat, want)


@pytest.mark.parametrize("family", ["sd1", "inpaint"])
def test_inpaint_with_the_tiny_vae_matches_diffusers(folders, family):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    pt, _, pipe = folders[family]
    ref = reference(StableDiffusionInpaintPipeline, pt)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    image, mask, lat = picture(), square_mask(), noise(5)

    def theirs(x):
        return ref(PROMPT, image, mask, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
                   height=SIZE, width=SIZE, latents=torch.from_numpy(x), output_type="np").images[0]

    want = theirs(lat)
    ours = pipe.inpaint(PROMPT, image, mask, negative_prompt=NEGATIVE, steps=3, guidance=7.5, scheduler="euler",
                        latents=lat, output_type="np", vae="tiny")[0]
    inside = np.asarray(mask) >= 128  # diffusers does not paste the original back outside the mask
    np.testing.assert_allclose(ours[inside], want[inside], atol=TOL, rtol=0)
    well_conditioned(lambda x: theirs(x)[inside], lat, want[inside])


def test_preview_decodes_the_current_latents(folders):
    _, _, pipe = folders["sd1"]
    seen = []

    def callback(k, total, latents):
        seen.append(pipe.preview(latents))

    final = pipe.txt2img(PROMPT, steps=3, seed=2, width=SIZE, height=SIZE, vae="tiny", callback=callback)[0]
    assert [len(p) for p in seen] == [1, 1, 1] and seen[0][0].size == (SIZE, SIZE)
    # the last step's latents are the final ones: the preview of them is the picture itself
    assert np.array_equal(np.asarray(seen[-1][0]), np.asarray(final))
    assert not np.array_equal(np.asarray(seen[0][0]), np.asarray(final))
    assert final.info["sdonnx"].vae == "tiny"
    # at half size: the latents averaged over 2x2 blocks, then decoded
    half = pipe.preview(np.ones((1, 4, LATENT, LATENT), np.float32), downscale=2)[0]
    assert half.size == (SIZE // 2, SIZE // 2)
    lat = np.random.default_rng(0).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    pooled = lat.reshape(1, 4, LATENT // 2, 2, LATENT // 2, 2).mean(axis=(3, 5))
    assert np.array_equal(np.asarray(pipe.preview(lat, 2)[0]), np.asarray(pipe.preview(pooled)[0]))


def test_generate_vae_and_preview_every(folders, tmp_path, monkeypatch):
    from sdonnx import cli, image

    _, onnx, _ = folders["sd1"]
    written = []
    real = image.save_png
    monkeypatch.setattr(image, "save_png", lambda img, path, params=None: written.append(path.name) or
                        real(img, path, params))
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(cli.main, ["generate", PROMPT, "--model", str(onnx), "--steps", "5", "--seed", "3",
                                           "--vae", "tiny", "--preview-every", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert written == ["cat-preview.png", "cat-preview.png", "cat.png"]  # after steps 2 and 4, not the last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # the preview is gone once the image is there
    assert "VAE: tiny" in Image.open(out).text["parameters"]


def test_folder_default_vae(folders, tmp_path):
    pt, _, _ = folders["sd1"]
    out = tmp_path / "tiny-default"
    result = export(pt, out, "--tiny-vae", "random", "--defaults", "vae=tiny,steps=2")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sdonnx.json").read_text())["defaults"]["vae"] == "tiny"
    pipe = Pipeline.load(out)
    assert pipe.txt2img(PROMPT, seed=1)[0].info["sdonnx"].vae == "tiny"
    assert pipe.txt2img(PROMPT, seed=1, vae="full")[0].info["sdonnx"].vae == "full"


def test_tiny_vae_bad_input_is_one_line(folders, tmp_path):
    from sdonnx import cli

    pt, _, pipe = folders["sd1"]
    one_line_error(lambda: pipe.txt2img(PROMPT, steps=1, vae="small"), "unknown vae", "small")
    # a folder without a tiny VAE: one line, no picture and no preview written
    bare = tmp_path / "bare"
    assert export(pt, bare).exit_code == 0
    one_line_error(lambda: Pipeline.load(bare).txt2img(PROMPT, steps=1, vae="tiny"), "no tiny VAE", "--tiny-vae")
    for extra in (["--vae", "tiny"], ["--preview-every", "1"]):
        out = tmp_path / "x.png"
        result = CliRunner().invoke(cli.main, ["generate", PROMPT, "--model", str(bare), "--steps", "2",
                                               "-o", str(out), *extra])
        cli_error(result, "no tiny VAE")
        assert not out.exists() and not (tmp_path / "x-preview.png").exists()
    cli_error(export(pt, tmp_path / "never", "--defaults", "vae=tiny"), "--tiny-vae")
    assert not (tmp_path / "never").exists()


def test_bench_times_the_tiny_vae_and_previews(folders):
    from sdonnx.bench import format_table, run_bench

    _, onnx, _ = folders["sd1"]
    report = run_bench(onnx, steps=3, runs=1, size=(SIZE, SIZE), vae="tiny", preview_every=1)
    assert report["vae"] == "tiny" and report["components_s"]["vae_decode"]["n"] == 1
    assert report["preview_s"]["n"] == 2 and report["preview_s"]["median"] > 0  # after steps 1 and 2, not 3
    assert "preview every 1" in format_table(report) and "VAE decode (tiny)" in format_table(report)
    plain = run_bench(onnx, steps=2, runs=1, size=(SIZE, SIZE))
    assert plain["vae"] == "full" and plain["preview_s"]["n"] == 0 and "preview" not in format_table(plain)


def test_preview_with_low_memory_and_several_images(folders, tmp_path):
    from sdonnx import cli

    _, onnx, _ = folders["sd1"]
    out = tmp_path / "two.png"
    result = CliRunner().invoke(cli.main, ["generate", PROMPT, "--model", str(onnx), "--steps", "3", "--seed", "1",
                                           "--low-memory", "--num-images", "2", "--preview-every", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two-1.png", "two-2.png"]
    # a file of the preview's name that this run did not write is not this run's to remove
    (tmp_path / "mine-preview.png").write_bytes(b"not ours")
    result = CliRunner().invoke(cli.main, ["generate", PROMPT, "--model", str(tmp_path / "missing"),
                                           "--preview-every", "1", "-o", str(tmp_path / "mine.png")])
    assert result.exit_code != 0 and (tmp_path / "mine-preview.png").read_bytes() == b"not ours"


def test_sdonnx_info_lists_the_tiny_vae(folders):
    from sdonnx import cli

    _, onnx, _ = folders["sd1"]
    result = CliRunner().invoke(cli.main, ["info", str(onnx)])
    assert result.exit_code == 0, result.output
    assert "vae_decoder_tiny" in result.output and "vae_encoder_tiny" in result.output and "full VAE" in result.output


def test_qdq_runs_the_tiny_decoder_as_static_int8(folders, tmp_path):
    """--int8-scheme qdq also quantizes the tiny VAE's decoder (its first and last convolutions float), calibrated
    on the U-Net calibration runs' latents; the picture stays close to the fp32 folder's."""
    import onnx

    pt, _, fp32 = folders["sd1"]
    out = tmp_path / "qdq"
    result = export(pt, out, "--precision", "int8", "--int8-scheme", "qdq", "--tiny-vae", "random")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sdonnx.json").read_text())
    assert meta["components"]["vae_decoder_tiny"]["precision"] == "int8"
    assert "first and last convolutions kept fp32" in meta["components"]["vae_decoder_tiny"]["quantization"]["method"]
    assert meta["components"]["vae_encoder_tiny"]["precision"] == "fp32" and meta["components"]["vae_decoder"]["precision"] == "fp32"
    graph = onnx.load(str(out / "vae_decoder_tiny" / "model.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = [producers.get(c.input[0]) is not None and producers[c.input[0]].op_type == "DequantizeLinear"
                 for c in convs]
    assert quantized[1:-1] and all(quantized[1:-1]) and not quantized[0] and not quantized[-1]
    pipe = Pipeline.load(out)
    lat = noise(7)
    ours = pipe.txt2img(PROMPT, steps=2, scheduler="euler", latents=lat, output_type="np", vae="tiny")
    ref = fp32.txt2img(PROMPT, steps=2, scheduler="euler", latents=lat, output_type="np", vae="tiny")
    assert np.abs(ours - ref).mean() < 0.02, np.abs(ours - ref).mean()
