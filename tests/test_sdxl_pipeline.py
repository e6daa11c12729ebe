"""The runtime on SDXL folders against diffusers' StableDiffusionXL pipelines (tiny random models, same weights, same
noise): txt2img, img2img, inpainting in both U-Net layouts, guidance on and off, the empty negative prompt, clip
skip, prompt weights and long prompts, the tiny VAE, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import SDXL_EXPORTERS, SIZE, cli_error, one_line_error, picture, square_mask, tiny_sdxl_folders
from sdonnx import prompt_chunks, prompt_syntax, sdxl
from test_schedulers import DIFFUSERS
from tiny_sdxl import TEXT_1, TEXT_2
from sdonnx.model import DEFAULTS, read_model
from sdonnx.pipeline import Pipeline

LATENT = SIZE // 2  # the tiny VAE downsamples by 2
PROMPT, NEGATIVE = "a red circle on a blue background", "green square"
TOL = 2 / 255  # per pixel, in [0, 1]
# ours -> (diffusers class, what from_config gets on top of the folder's config); lcm needs an LCM U-Net
SCHEDULERS = {name: spec for name, spec in DIFFUSERS.items() if name != "lcm"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module", params=SDXL_EXPORTERS)
def sdxl_exporter(request) -> str:
    """Who wrote the ONNX folders the module's tests run on (helpers.SDXL_EXPORTERS)."""
    return request.param


@pytest.fixture(scope="module")
def xl(base, sdxl_exporter):
    """(diffusers folder, ONNX folder, our pipeline, diffusers' StableDiffusionXLPipeline) of the tiny SDXL."""
    from diffusers import StableDiffusionXLPipeline

    pt, onnx = tiny_sdxl_folders("sdxl", base, sdxl_exporter)
    ref = StableDiffusionXLPipeline.from_pretrained(pt, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.folder_scheduler = dict(ref.scheduler.config)  # tests swap schedulers; each starts from the folder's
    return pt, onnx, Pipeline.load(onnx), ref


@pytest.fixture(scope="module")
def xl_inpaint(base, sdxl_exporter):
    """(diffusers folder, ONNX folder, our pipeline) of the tiny SDXL with a 9-channel inpainting U-Net."""
    pt, onnx = tiny_sdxl_folders("sdxl-inpaint", base, sdxl_exporter)
    return pt, onnx, Pipeline.load(onnx)


def scheduler(name: str, config: dict):
    import diffusers

    cls, extra = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **extra)


def noise(shape=(1, 4, LATENT, LATENT), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def same_step_noise(monkeypatch, sched, seed: int, shape=(1, 4, LATENT, LATENT)) -> None:
    """A stochastic sampler in diffusers draws, step by step, the noise our loop draws from its seed's generator
    (the run's first draws, as the starting latents are given)."""
    import importlib

    import torch

    rng = np.random.default_rng(seed)
    module = importlib.import_module(type(sched).__module__)
    if not hasattr(module, "randn_tensor"):  # a deterministic sampler
        return
    monkeypatch.setattr(module, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)))


def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
    """Stands in for diffusers' retrieve_latents: the VAE posterior's mean, as our runtime takes."""
    return encoder_output.latent_dist.mode()


def reference(ref, latents, steps=4, guidance=7.5, negative=NEGATIVE, prompt=PROMPT, **kw) -> np.ndarray:
    """diffusers' images; our empty negative prompt is its None (both: zeros where the model asks for them)."""
    import torch

    kw = {"width": SIZE, "height": SIZE, **kw}
    return ref(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
               latents=torch.from_numpy(latents), output_type="np", **kw).images


def close(ours: np.ndarray, theirs: np.ndarray) -> float:
    """The largest per-pixel difference, asserted within TOL, of pictures that are not constant."""
    assert ours.shape == theirs.shape
    assert ours.std() > 0.01
    diff = float(np.abs(ours - theirs).max())
    assert diff < TOL, diff
    return diff


# ---- the folder ---------------------------------------------------------------------------------------------

def test_folder_reads_as_sdxl(xl, xl_inpaint, sdxl_exporter):
    pt, onnx, pipe, ref = xl
    info = pipe.info
    assert (info.family, info.is_sdxl, info.is_inpaint) == ("sdxl", True, False)
    assert (xl_inpaint[2].info.family, xl_inpaint[2].info.is_inpaint) == ("sdxl-inpaint", True)
    assert "text_encoder_2" in info.components and info.scaling_factor == pytest.approx(0.13025)
    assert info.force_zeros_for_empty_prompt
    # the SDXL row (its guidance) with the folder's size; optimum's folder runs its own scheduler, ours the row's
    d = info.defaults
    scheduler = DEFAULTS["sdxl"].scheduler if sdxl_exporter == "sdonnx" else "euler"
    assert (d.steps, d.guidance, d.scheduler, d.width) == (DEFAULTS["sdxl"].steps, DEFAULTS["sdxl"].guidance,
                                                          scheduler, SIZE)
    assert DEFAULTS["sdxl"].width == DEFAULTS["sdxl"].height == 1024
    assert pipe.tokenizer_2.pad_id == ref.tokenizer_2.pad_token_id != pipe.tokenizer.pad_id  # "!"
    theirs = ref.tokenizer_2(PROMPT, padding="max_length", max_length=77).input_ids
    np.testing.assert_array_equal(pipe.tokenizer_2([PROMPT]), [theirs])


def test_folder_without_second_encoder_is_a_one_line_error(xl, tmp_path):
    _, onnx, _, _ = xl
    broken = tmp_path / "broken"
    shutil.copytree(onnx, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    (broken / "sdonnx.json").write_text(json.dumps({"format": 1, "family": "sdxl"}))
    one_line_error(lambda: read_model(broken), "SDXL", "text_encoder_2/model.onnx")


# ---- txt2img ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_txt2img_matches_diffusers(xl, name, monkeypatch):
    _, _, pipe, ref = xl
    ref.scheduler = scheduler(name, ref.folder_scheduler)
    lat = noise()
    same_step_noise(monkeypatch, ref.scheduler, seed=11)
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=4, guidance=7.5, scheduler=name, seed=11, latents=lat,
                        output_type="np")
    theirs = reference(ref, lat)
    print(f"sdxl txt2img {name}: max pixel diff {close(ours, theirs):.2e}")
    same_step_noise(monkeypatch, ref.scheduler, seed=11)
    nudged = reference(ref, lat + 1e-5)  # well-conditioned: far below the tolerance in, far below it out
    assert np.abs(nudged - theirs).max() < 0.1 * TOL


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_guidance_and_the_empty_negative_prompt_match_diffusers(xl, guidance, negative):
    """guidance <= 1 runs one conditional batch (turbo); an empty negative prompt is zeros
    (force_zeros_for_empty_prompt); two images per prompt."""
    _, _, pipe, ref = xl
    ref.scheduler = scheduler("euler", ref.folder_scheduler)
    lat = noise((2, 4, LATENT, LATENT), seed=1)
    ours = pipe.txt2img(PROMPT, negative, steps=3, guidance=guidance, scheduler="euler", num_images=2, latents=lat,
                        output_type="np")
    theirs = reference(ref, lat, steps=3, guidance=guidance, negative=negative, num_images_per_prompt=2)
    print(f"sdxl txt2img guidance {guidance} negative {negative!r}: max pixel diff {close(ours, theirs):.2e}")
    assert np.abs(ours[0] - ours[1]).max() > 10 * TOL


def test_non_square_txt2img_matches_diffusers(xl):
    """time_ids hold (height, width) in that order."""
    _, _, pipe, ref = xl
    ref.scheduler = scheduler("euler", ref.folder_scheduler)
    lat = noise((1, 4, LATENT, 2 * LATENT), seed=8)
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=3, guidance=7.5, scheduler="euler", width=2 * SIZE, height=SIZE,
                        latents=lat, output_type="np")
    theirs = reference(ref, lat, steps=3, width=2 * SIZE)
    print(f"sdxl txt2img {SIZE}x{2 * SIZE}: max pixel diff {close(ours, theirs):.2e}")


def test_conditioning_moves_the_picture_far_more_than_the_tolerance(xl):
    """The parity tests could not miss a wrong negative prompt, pooled embedding or size numbers."""
    _, _, pipe, ref = xl
    ref.scheduler = scheduler("euler", ref.folder_scheduler)
    lat = noise(seed=2)
    base = reference(ref, lat)
    assert np.abs(base - reference(ref, lat, negative="")).max() > 10 * TOL
    assert np.abs(base - reference(ref, lat, prompt="blue")).max() > 10 * TOL
    # the size numbers weigh least in this tiny U-Net: SDXL's 1024 everywhere moves it ~3 TOL
    sizes = dict(original_size=(1024, 1024), target_size=(1024, 1024), negative_original_size=(1024, 1024),
                 negative_target_size=(1024, 1024))
    assert np.abs(base - reference(ref, lat, **sizes)).max() > 2 * TOL
    # the pooled embedding alone (hidden states kept): ours with the prompt's pooled output swapped
    texts = pipe._encode_texts([NEGATIVE, PROMPT, "blue"])
    swapped = sdxl.unet_inputs([texts[0], sdxl.Text(texts[1].hidden, texts[2].pooled)], 1, SIZE, SIZE)
    real = sdxl.unet_inputs(texts[:2], 1, SIZE, SIZE)
    assert np.array_equal(swapped[0], real[0]) and not np.allclose(swapped[1]["text_embeds"], real[1]["text_embeds"])
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=4, guidance=7.5, scheduler="euler", latents=lat, output_type="np")
    close(ours, base)


def test_empty_negative_prompt_is_encoded_without_force_zeros(xl, tmp_path):
    pt, onnx, _, ref = xl
    folder = tmp_path / "no-zeros"
    shutil.copytree(onnx, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    if (folder / "sdonnx.json").is_file():  # our folder records its files' sizes: this edit is deliberate
        meta = json.loads((folder / "sdonnx.json").read_text())
        del meta["files"]["model_index.json"]
        (folder / "sdonnx.json").write_text(json.dumps(meta))
    pipe = Pipeline.load(folder)
    assert not pipe.info.force_zeros_for_empty_prompt
    ref.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        ref.scheduler = scheduler("euler", ref.folder_scheduler)
        lat = noise(seed=4)
        ours = pipe.txt2img(PROMPT, steps=3, guidance=7.5, scheduler="euler", latents=lat, output_type="np")
        close(ours, reference(ref, lat, steps=3, negative=""))
    finally:
        ref.register_to_config(force_zeros_for_empty_prompt=True)


def test_clip_skip_matches_diffusers(xl):
    """Our clip skip N (A1111's: 1 = the default) is diffusers' clip_skip N - 1 on both encoders (diffusers reads
    the negative prompt at its default layer: the empty one, zeros, keeps the comparison fair)."""
    _, _, pipe, ref = xl
    ref.scheduler = scheduler("euler", ref.folder_scheduler)
    lat = noise(seed=6)
    ours = pipe.txt2img(PROMPT, steps=3, guidance=7.5, scheduler="euler", latents=lat, output_type="np",
                        clip_skip=2)
    theirs = reference(ref, lat, steps=3, negative="", clip_skip=1)
    print(f"sdxl clip skip 2: max pixel diff {close(ours, theirs):.2e}")
    assert np.abs(theirs - reference(ref, lat, steps=3, negative="")).max() > 10 * TOL
    one_line_error(lambda: pipe.txt2img(PROMPT, steps=1, clip_skip=3), "clip skip 3", "text_encoder")


# ---- prompt weights and long prompts ----------------------------------------------------------------------

def test_prompt_weights_act_on_each_encoder(xl):
    """A1111's emphasis on each encoder's chunk output; the pooled embedding is the unweighted prompt's."""
    from sdonnx.text_encoding import emphasis

    _, _, pipe, _ = xl
    plain, weighted = pipe._encode_texts(["a red circle", "a (red:1.4) [circle]"])
    ids = [tok(["a red circle"]) for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    weights = np.ones(77, np.float32)
    weights[2], weights[3] = 1.4, 1 / 1.1
    expect = []
    for name, own in zip(("text_encoder", "text_encoder_2"), ids):
        out = pipe.components[name](input_ids=own)
        layer = sdxl.hidden_output(pipe.components[name], 1)
        expect.append(emphasis(out[layer], weights))
    np.testing.assert_allclose(weighted.hidden, np.concatenate(expect, axis=-1), atol=1e-6)
    np.testing.assert_array_equal(weighted.pooled, plain.pooled)
    assert np.abs(weighted.hidden - plain.hidden).max() > 1e-2


def test_long_prompts_run_in_chunks_on_both_encoders(xl):
    _, _, pipe, _ = xl
    long = ", ".join(["a red circle on a blue background"] * 12)
    first, short = pipe._encode_texts([long, "red"])
    assert first.hidden.shape == short.hidden.shape == (1, 2 * 77, TEXT_1 + TEXT_2)
    assert first.pooled.shape == (1, TEXT_2)
    chunks = prompt_chunks.chunk(prompt_syntax.parse(long), pipe.tokenizer_2)
    assert len(chunks) == 2  # the pooled embedding is the first chunk's
    pooled = pipe.components["text_encoder_2"](input_ids=chunks.ids[:1])["text_embeds"]
    np.testing.assert_allclose(first.pooled, pooled, atol=1e-6)
    pipe.txt2img(long, NEGATIVE, steps=1, guidance=7.5, seed=0)


# ---- img2img and inpainting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_img2img_matches_diffusers(xl, name, monkeypatch):
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as mod

    _, _, pipe, base_ref = xl
    lat = noise(seed=3)
    # diffusers samples the VAE posterior and draws its own noise: make both what we use
    monkeypatch.setattr(mod, "retrieve_latents", posterior_mean)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **_: torch.from_numpy(lat))
    ref = StableDiffusionXLImg2ImgPipeline(**{**base_ref.components,
                                              "scheduler": scheduler(name, base_ref.folder_scheduler)})
    ref.set_progress_bar_config(disable=True)
    ours = pipe.img2img(PROMPT, picture(), strength=0.5, negative_prompt=NEGATIVE, steps=4, guidance=7.5,
                        scheduler=name, latents=lat, output_type="np")
    theirs = ref(PROMPT, image=picture(), strength=0.5, negative_prompt=NEGATIVE, num_inference_steps=4,
                 guidance_scale=7.5, output_type="np").images
    print(f"sdxl img2img {name}: max pixel diff {close(ours, theirs):.2e}")


@pytest.mark.parametrize("layout,name", [("sdxl", "euler"), ("sdxl", "dpmpp_2m"), ("sdxl-inpaint", "euler"),
                                         ("sdxl-inpaint", "ddim")])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_inpaint_matches_diffusers_and_keeps_unmasked_pixels(xl, xl_inpaint, layout, name, guidance, monkeypatch):
    """Latent re-imposing with SDXL's 4-channel U-Net, the masked picture as input of a 9-channel one."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as mod

    if layout == "sdxl":
        pipe = xl[2]
        components = xl[3].components
    else:
        pipe = xl_inpaint[2]
        components = StableDiffusionXLInpaintPipeline.from_pretrained(xl_inpaint[0], add_watermarker=False).components
    monkeypatch.setattr(mod, "retrieve_latents", posterior_mean)
    ref = StableDiffusionXLInpaintPipeline(**{**components, "scheduler": scheduler(name, xl[3].folder_scheduler)},
                                           add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    image, mask, lat = picture(), square_mask(), noise(seed=5)
    ours = pipe.inpaint(PROMPT, image, mask, negative_prompt=NEGATIVE, steps=3, guidance=guidance, scheduler=name,
                        latents=lat, output_type="np")[0]
    theirs = ref(PROMPT, image=image, mask_image=mask, negative_prompt=NEGATIVE, num_inference_steps=3,
                 guidance_scale=guidance, strength=1.0, height=SIZE, width=SIZE, latents=torch.from_numpy(lat), output_type="np").images[0]
    inside = np.asarray(mask) >= 128
    # diffusers does not paste the original back; inside the mask both must agree
    print(f"sdxl inpaint {layout} {name} guidance {guidance}: max pixel diff "
          f"{close(ours[inside], theirs[inside]):.2e}")
    if layout == "sdxl-inpaint":
        one_line_error(lambda: pipe.txt2img(PROMPT, steps=1), "inpainting model", "inpaint()")
    pil = pipe.inpaint(PROMPT, image, mask, steps=2, scheduler=name, seed=0)[0]
    assert np.array_equal(np.asarray(pil)[~inside], np.asarray(image)[~inside])


# ---- the CLI ------------------------------------------------------------------------------------------------

def test_cli_generates_and_describes_an_sdxl_folder(xl, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sdonnx.cli import main

    _, onnx, pipe, _ = xl
    out = tmp_path / "xl.png"
    args = ["generate", PROMPT, "--model", str(onnx), "--steps", "2", "--seed", "3", "--scheduler", "euler_a",
            "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    png = Image.open(out)
    assert png.size == (SIZE, SIZE)
    want = pipe.txt2img(PROMPT, steps=2, seed=3, scheduler="euler_a")[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(want))
    result = CliRunner().invoke(main, ["info", str(onnx)])
    assert result.exit_code == 0 and "family       sdxl " in result.output and "text_encoder_2" in result.output
    cli_error(CliRunner().invoke(main, [*args[:-2], "--clip-skip", "9", "-o", str(tmp_path / "no.png")]),
              "clip skip 9")
    assert not (tmp_path / "no.png").exists()
    result = CliRunner().invoke(main, ["bench", "--model", str(onnx), "--runs", "1", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["family"] == "sdxl"


# ---- the LCM input, the tiny VAE, low-memory mode ----------------------------------------------------------

def save_lcm_pipeline(folder: Path) -> None:
    """The tiny SDXL with an LCM-distilled U-Net's guidance input (time_cond_proj_dim) and the LCM scheduler."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    import tiny_sdxl

    pipe = tiny_sdxl.make_pipeline("sdxl")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**tiny_sdxl.unet_config("sdxl"), time_cond_proj_dim=16)
    with torch.no_grad():  # so that the guidance input weighs in this tiny U-Net as much as the text does
        unet.time_embedding.cond_proj.weight.mul_(20.0)
    StableDiffusionXLPipeline(**{**pipe.components, "unet": unet,
                                 "scheduler": LCMScheduler.from_config(pipe.scheduler.config)}).save_pretrained(folder)


def test_lcm_unet_matches_diffusers(base, sdxl_exporter, monkeypatch):
    """The guidance scale as the U-Net's timestep_cond input beside SDXL's inputs, one conditional batch."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pt, onnx = tiny_sdxl_folders("sdxl-lcm", base, sdxl_exporter, build=save_lcm_pipeline)
    pipe = Pipeline.load(onnx)
    assert pipe.info.is_sdxl and pipe.info.is_lcm and pipe.info.defaults.scheduler == "lcm"
    ref = StableDiffusionXLPipeline.from_pretrained(pt, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    lat = noise(seed=9)
    same_step_noise(monkeypatch, ref.scheduler, seed=9)
    ours = pipe.txt2img(PROMPT, steps=4, guidance=8.5, seed=9, latents=lat, output_type="np")
    theirs = ref(PROMPT, num_inference_steps=4, guidance_scale=8.5, width=SIZE, height=SIZE,
                 latents=torch.from_numpy(lat), output_type="np").images
    print(f"sdxl lcm: max pixel diff {close(ours, theirs):.2e}")
    other = pipe.txt2img(PROMPT, steps=4, guidance=1.0, seed=9, latents=lat, output_type="np")
    assert np.abs(ours - other).max() > 10 * TOL


def add_tiny_decoder(folder: Path):
    """A random TAESDXL decoder (AutoencoderTiny, scaling 1) written as folder/vae_decoder_tiny; returns it."""
    import torch
    from diffusers import AutoencoderTiny

    from sdonnx.export.tiny_vae import random_tiny_vae

    ours = random_tiny_vae("taesdxl", seed=0, downscale=2)
    tiny = AutoencoderTiny.from_config(ours.config.to_dict())
    tiny.load_state_dict(ours.state_dict(), strict=True)
    tiny.eval()

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tiny = tiny

        def forward(self, latent_sample):
            return self.tiny.decode(latent_sample).sample

    out = folder / "vae_decoder_tiny"
    out.mkdir()
    with torch.no_grad():
        torch.onnx.export(Decode(), (torch.zeros(1, 4, LATENT, LATENT),), str(out / "model.onnx"),
                          input_names=["latent_sample"], output_names=["sample"], dynamo=False,
                          dynamic_axes={"latent_sample": {0: "batch", 2: "h", 3: "w"}})
    tiny.save_config(out)
    return tiny


def test_tiny_vae_matches_diffusers(xl, tmp_path):
    """The VAE code is the same for SDXL: the full VAE's scaling 0.13025, TAESDXL's 1 (vae="tiny")."""
    from diffusers import StableDiffusionXLPipeline

    pt, onnx, full, ref = xl
    folder = tmp_path / "tiny"
    shutil.copytree(onnx, folder)
    tiny = add_tiny_decoder(folder)
    pipe = Pipeline.load(folder)
    assert pipe.info.vae("tiny")[2:] == (1.0, 0.0) and pipe.info.vae("full")[2] == pytest.approx(0.13025)
    ref = StableDiffusionXLPipeline(**{**ref.components, "vae": tiny,
                                       "scheduler": scheduler("euler", ref.folder_scheduler)}, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    lat = noise(seed=10)
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=3, guidance=7.5, scheduler="euler", latents=lat, output_type="np",
                        vae="tiny")
    print(f"sdxl tiny vae: max pixel diff {close(ours, reference(ref, lat, steps=3)):.2e}")
    kw = dict(steps=3, guidance=7.5, scheduler="euler", latents=lat, output_type="np")
    assert np.abs(ours - full.txt2img(PROMPT, NEGATIVE, **kw)).max() > 10 * TOL


def test_low_memory_mode_gives_the_same_picture(xl):
    """Low-memory mode runs the guided batch in two halves: SDXL's extra inputs split with it."""
    _, onnx, pipe, _ = xl
    low = Pipeline.load(onnx, low_memory=True)
    kw = dict(negative_prompt=NEGATIVE, steps=3, guidance=7.5, scheduler="euler", seed=2, output_type="np")
    np.testing.assert_allclose(low.txt2img(PROMPT, **kw), pipe.txt2img(PROMPT, **kw), atol=1e-5)


def test_openvino_f32_draws_what_onnx_runtime_draws(xl):
    pytest.importorskip("openvino")
    _, onnx, pipe, _ = xl
    ov = Pipeline.load(onnx, provider="openvino", provider_options={"INFERENCE_PRECISION_HINT": "f32"})
    kw = dict(negative_prompt=NEGATIVE, steps=3, guidance=7.5, scheduler="euler", seed=1, output_type="np")
    close(ov.txt2img(PROMPT, **kw), pipe.txt2img(PROMPT, **kw))


def test_serving_an_sdxl_folder(xl):
    """The A1111 and OpenAI APIs run on an SDXL folder as on any other; the image is the pipeline's."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import png, post, serving

    _, _, pipe, _ = xl
    with serving(pipe) as (url, _):
        r = post(url, "/sdapi/v1/txt2img", {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 4, "steps": 2,
                                             "width": SIZE, "height": SIZE, "cfg_scale": 6, "batch_size": 2,
                                             "sampler_name": "Euler"})
        assert r.status_code == 200, r.text
        served = [np.asarray(png(b).convert("RGB")) for b in r.json()["images"]]
        r = post(url, "/v1/images/generations", {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}"})
        assert r.status_code == 200, r.text
    want = pipe.txt2img(PROMPT, NEGATIVE, steps=2, guidance=6, scheduler="euler", seed=4, width=SIZE, height=SIZE)
    assert np.array_equal(served[0], np.asarray(want[0]))
    assert len(served) == 2 and not np.array_equal(served[0], served[1])


def test_turbo_folder_one_step_without_guidance_matches_diffusers(base, sdxl_exporter, monkeypatch):
    """An SDXL-Turbo folder (Euler ancestral, trailing timesteps): one step, no classifier-free guidance."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pt, onnx = tiny_sdxl_folders("sdxl-turbo", base, sdxl_exporter)
    pipe = Pipeline.load(onnx)
    assert (pipe.info.family, pipe.info.defaults.scheduler) == ("sdxl", "euler_a")
    ref = StableDiffusionXLPipeline.from_pretrained(pt, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    lat = noise(seed=12)
    for steps in (1, 2):
        same_step_noise(monkeypatch, ref.scheduler, seed=12)
        ours = pipe.txt2img(PROMPT, steps=steps, guidance=0.0, seed=12, latents=lat, output_type="np")
        theirs = ref(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                     latents=torch.from_numpy(lat), output_type="np").images
        print(f"sdxl-turbo {steps} step(s): max pixel diff {close(ours, theirs):.2e}")


def test_encoder_without_layer_outputs_is_a_one_line_error():
    from types import SimpleNamespace

    bare = SimpleNamespace(outputs=["text_embeds", "last_hidden_state"], path=Path("m/text_encoder_2/model.onnx"))
    one_line_error(lambda: sdxl.hidden_output(bare, 1), "text_encoder_2/model.onnx", "hidden_states")


def test_step_cache_runs_sdxl_with_its_added_inputs(base, tmp_path):
    """An SDXL folder exported with --step-cache: interval 1 is exactly the plain run, and the cached graphs (which
    take text_embeds / time_ids too) give a picture near it, not the same one (the shallow steps do run)."""
    from click.testing import CliRunner

    from sdonnx.export.cli import export

    pt, _ = tiny_sdxl_folders("sdxl", base, "sdonnx")
    out = tmp_path / "cached"
    result = CliRunner().invoke(export, [str(pt), str(out), "--precision", "fp32", "--step-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out)
    assert pipe.info.has_step_cache
    gen = dict(steps=6, guidance=5.0, scheduler="euler", latents=noise(seed=8), output_type="np")
    plain = pipe.txt2img(PROMPT, NEGATIVE, **gen)
    assert np.array_equal(pipe.txt2img(PROMPT, NEGATIVE, cache_interval=1, **gen), plain)
    cached = pipe.txt2img(PROMPT, NEGATIVE, cache_interval=2, **gen)
    diff = float(np.abs(cached - plain).max())
    assert 0 < diff < 0.5, diff
