"""LCM-distilled U-Nets (guidance scale as a U-Net input, `time_cond_proj_dim`): our model, export and runtime
against diffusers' LatentConsistencyModelPipeline holding the same random weights, given the same noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiny_sd
from sdonnx.export.models import UNet2DConditionModel, UNetConfig
from sdonnx.errors import SdonnxError
from sdonnx.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
SIZE, LATENT, COND = 32, 16, 24


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """(diffusers LCM pipeline, the base folder, our fp32 export of its saved folder, loaded, and optimum's)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    from diffusers import UNet2DConditionModel as RefUNet

    from sdonnx.export import cli as export_cli

    base = tmp_path_factory.mktemp("lcm")
    sd = tiny_sd.make_pipeline("sd1")
    torch.manual_seed(1)
    unet = RefUNet(**tiny_sd.unet_config("sd1"), time_cond_proj_dim=COND)
    sched = LCMScheduler.from_config({k: v for k, v in tiny_sd.SD1_SCHEDULER.items() if k != "_class_name"})
    ref = LatentConsistencyModelPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
                                         scheduler=sched, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    ref.save_pretrained(base / "diffusers")
    result = CliRunner().invoke(export_cli.export, [str(base / "diffusers"), str(base / "onnx"), "--quiet"])
    assert result.exit_code == 0, result.output
    from optimum.exporters.onnx import main_export

    main_export(str(base / "diffusers"), str(base / "optimum"), task="text-to-image")
    return ref, base, Pipeline.load(base / "onnx"), Pipeline.load(base / "optimum")


@torch.no_grad()
def test_unet_with_guidance_embedding_matches_diffusers(lcm):
    ref = lcm[0]
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.unet.config))).eval()
    ours.load_state_dict(ref.unet.state_dict(), strict=True)
    torch.manual_seed(3)
    sample, text = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, 77, 32)
    cond = torch.rand(2, COND) * 2 - 1
    want = ref.unet(sample, 500, text, timestep_cond=cond).sample
    torch.testing.assert_close(ours(sample, 500, text, cond), want, atol=1e-4, rtol=0)
    assert (ours(sample, 500, text, cond * 0) - want).abs().max() > 1e-3  # the embedding is not ignored
    with pytest.raises(ValueError, match="timestep_cond"):
        ours(sample, 500, text)


@pytest.mark.parametrize("folder", [2, 3], ids=["ours", "optimum"])
def test_folders_record_lcm_and_its_defaults(lcm, folder):
    pipe = lcm[folder]
    assert pipe.info.guidance_embedding_dim == COND
    assert "timestep_cond" in pipe.components["unet"].inputs
    d = pipe.info.defaults
    assert (d.steps, d.guidance, d.scheduler) == (4, 8.5, "lcm")
    from sdonnx.cli import main

    shown = CliRunner().invoke(main, ["info", str(pipe.info.path)])
    assert shown.exit_code == 0 and f"LCM U-Net (guidance input of {COND})" in shown.output


@pytest.mark.parametrize("folder, guidance", [(2, 8.5), (2, 2.0), (3, 8.5)], ids=["ours-8.5", "ours-2", "optimum-8.5"])
def test_txt2img_matches_diffusers_lcm_pipeline(lcm, folder, guidance, monkeypatch):
    from diffusers.schedulers import scheduling_lcm

    ref, pipe = lcm[0], lcm[folder]
    latents = np.random.default_rng(0).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    # our loop draws each step's noise from default_rng(seed); the reference's scheduler gets the same draws
    rng = np.random.default_rng(7)
    noises = [rng.standard_normal(latents.shape, dtype=np.float32) for _ in range(4)]
    calls = iter(noises)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: torch.from_numpy(next(calls)))
    theirs = ref(PROMPT, num_inference_steps=4, guidance_scale=guidance, width=SIZE, height=SIZE,
                 latents=torch.from_numpy(latents), output_type="np").images
    ours = pipe.txt2img(PROMPT, guidance=guidance, seed=7, width=SIZE, height=SIZE, latents=latents,
                        output_type="np")
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3) and ours.std() > 0.01
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dim", [COND, 256, 7])
def test_guidance_embedding_is_diffusers(lcm, dim):
    from sdonnx.sampling import guidance_embedding

    for w in (1.0, 2.0, 8.5):
        want = lcm[0].get_guidance_scale_embedding(torch.tensor([w - 1.0] * 3), dim).numpy()
        got = guidance_embedding(w, dim, 3)
        assert got.shape == want.shape == (3, dim) and got.dtype == np.float32
        # both in fp32, where an argument of up to 1000 (w - 1) = 7500 rad has a spacing of 5e-4: numpy's and torch's
        # exp differing in the last bit moves a sine by up to that
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
        assert np.abs(got - want).mean() < 1e-4


def test_guidance_changes_the_picture_and_negative_prompts_are_refused(lcm):
    pipe = lcm[2]
    a, b = (pipe.txt2img(PROMPT, guidance=g, seed=1, output_type="np") for g in (8.5, 2.0))
    assert np.abs(a - b).max() > 1e-3
    with pytest.raises(SdonnxError, match="LCM"):
        pipe.txt2img(PROMPT, negative_prompt="blurry", seed=1)


def test_bench_feeds_the_guidance_input(lcm, monkeypatch):
    """sdonnx bench on an LCM folder: every U-Net call it times, the batch-2 and batch-1 figures and each txt2img
    step, gets the embedding of the model's guidance scale."""
    from sdonnx.bench import run_bench
    from sdonnx.sampling import guidance_embedding
    from sdonnx.session import Component

    unet_feeds = []
    call = Component.__call__

    def recording(self, **feeds):
        if self.path.parent.name == "unet":
            unet_feeds.append(feeds)
        return call(self, **feeds)

    monkeypatch.setattr(Component, "__call__", recording)
    report = run_bench(lcm[1] / "onnx", "cpu", None, 2, 1, None)
    assert report["components_s"]["unet_b2"]["median"] > 0 and report["txt2img_s"]["median"] > 0
    assert (report["scheduler"], report["guidance"]) == ("lcm", 8.5)
    batches = [len(f["sample"]) for f in unet_feeds]
    # unet_b2 and unet_b1: a warm-up and a timed call each; then one 2-step txt2img, one conditional call a step
    assert sorted(batches) == [1, 1, 1, 1, 2, 2], batches
    for feeds in unet_feeds:
        np.testing.assert_array_equal(feeds["timestep_cond"], guidance_embedding(8.5, COND, len(feeds["sample"])))


def test_qdq_calibrates_on_lcm_sampling_and_exports(lcm, tmp_path):
    """Static int8 for an LCM U-Net: calibration feeds are its own 4-step runs (batch 1, the guidance input), and the
    exported graph takes timestep_cond and draws close to fp32."""
    from sdonnx.export import cli as export_cli
    from sdonnx.export import quantize
    from sdonnx.export.weights import build_models, load_checkpoint

    ckpt = load_checkpoint(str(lcm[1] / "diffusers"))
    models = build_models(ckpt)
    feeds = quantize.calibration_feeds(models, ckpt.configs, Path(ckpt.tokenizer_dir), ckpt.scheduler_config,
                                       prompts=("a red circle", "a blue square"), guidance=8.5, latent_hw=(8, 8))
    assert len(feeds) == 8 and all(f["sample"].shape == (1, 4, 8, 8) for f in feeds)
    assert all(f["timestep_cond"].shape == (1, COND) for f in feeds)
    assert [int(f["timestep"]) for f in feeds[:4]] == [int(t) for t in lcm[2]._setup(PROMPT, "", 4, None, "lcm", 0, SIZE, SIZE, 1).sched.timesteps]
    assert not np.allclose(feeds[0]["sample"], feeds[1]["sample"])  # the run moves on from step to step
    out = tmp_path / "qdq"
    result = CliRunner().invoke(export_cli.export, [str(lcm[1] / "diffusers"), str(out), "--precision", "int8",
                                                    "--int8-scheme", "qdq", "--quiet"])
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out)
    assert "timestep_cond" in pipe.components["unet"].inputs
    ours = pipe.txt2img(PROMPT, seed=3, output_type="np")
    fp32 = lcm[2].txt2img(PROMPT, seed=3, output_type="np")
    assert np.abs(ours - fp32).mean() < 0.02, np.abs(ours - fp32).mean()


def test_step_cache_graphs_take_the_guidance_input(lcm, tmp_path):
    from sdonnx.export import cli as export_cli

    out = tmp_path / "cached"
    result = CliRunner().invoke(export_cli.export, [str(lcm[1] / "diffusers"), str(out), "--step-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out)
    for name in ("unet_features", "unet_shallow"):
        with pipe._using(name) as graph:
            assert "timestep_cond" in graph.inputs
    full = pipe.txt2img(PROMPT, seed=2, steps=4, output_type="np")
    cached = pipe.txt2img(PROMPT, seed=2, steps=4, cache_interval=2, output_type="np")
    assert np.isfinite(cached).all() and np.abs(full - cached).max() > 0  # the cached steps ran the shallow graph


def test_static_export_runs_the_lcm_unet_at_batch_1(lcm, tmp_path):
    from sdonnx.export import cli as export_cli

    out = tmp_path / "static"
    result = CliRunner().invoke(export_cli.export, [str(lcm[1] / "diffusers"), str(out), "--static", f"{SIZE}x{SIZE}",
                                                    "--quiet"])
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out)
    assert pipe.components["unet"].inputs["sample"].shape == (1, 4, LATENT, LATENT)
    assert pipe.components["unet"].inputs["timestep_cond"].shape == (1, COND)
    np.testing.assert_allclose(pipe.txt2img(PROMPT, seed=5, output_type="np"),
                               lcm[2].txt2img(PROMPT, seed=5, output_type="np"), atol=1e-4, rtol=0)


def test_img2img_and_low_memory_on_an_lcm_unet(lcm):
    from sdonnx import image as imaging

    pipe = lcm[2]
    start = imaging.to_pil(pipe.txt2img(PROMPT, seed=6, output_type="np"))[0]
    out = pipe.img2img(PROMPT, start, strength=0.5, seed=6, output_type="np")
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()
    low = Pipeline.load(pipe.info.path, low_memory=True)
    np.testing.assert_allclose(low.img2img(PROMPT, start, strength=0.5, seed=6, output_type="np"), out, atol=1e-5)


def test_qdq_export_of_an_lcm_inpainting_unet(tmp_path):
    """A 9-channel LCM U-Net: its calibration feeds carry the mask and masked-image latents."""
    from diffusers import LCMScheduler
    from diffusers import UNet2DConditionModel as RefUNet

    from sdonnx.export import cli as export_cli

    sd = tiny_sd.make_pipeline("inpaint")
    torch.manual_seed(4)
    sd.unet = RefUNet(**tiny_sd.unet_config("inpaint"), time_cond_proj_dim=COND)
    sd.scheduler = LCMScheduler.from_config({k: v for k, v in tiny_sd.SD1_SCHEDULER.items() if k != "_class_name"})
    sd.save_pretrained(tmp_path / "diffusers")
    out = tmp_path / "qdq"
    result = CliRunner().invoke(export_cli.export, [str(tmp_path / "diffusers"), str(out), "--precision", "int8",
                                                    "--int8-scheme", "qdq", "--quiet"])
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out)
    assert pipe.info.is_inpaint and pipe.info.guidance_embedding_dim == COND
    assert '"StableDiffusionInpaintPipeline"' in (out / "model_index.json").read_text()


@pytest.mark.parametrize("system, folder", [("sdonnx-fp32", "onnx"), ("optimum-fp32", "optimum"),
                                            ("diffusers-fp32", "diffusers")])
def test_benchmark_worker_runs_each_system_on_lcm_folders(lcm, system, folder, monkeypatch):
    """benchmarks/worker.py on an LCM folder: the LCM pipelines of diffusers and optimum, our runtime, each U-Net
    call fed the guidance input, one step callback per step."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run

    res = run.run_worker(system, lcm[1] / folder, SIZE, 3, 1, "unet_b2,unet_b1,txt2img")
    assert set(res["times_s"]) == {"unet_b2", "unet_b1", "txt2img"}
    assert all(t[0] > 0 for t in res["times_s"].values())
    assert len(res["generations"]) == 1 and len(res["generations"][0]) == 3
