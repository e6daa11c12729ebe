"""Few-step turbo models: export-time defaults (--defaults, random:sd-turbo), one-step guidance-free sampling equal
to diffusers', and qdq calibration on the model's own few-step runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdonnx.export import cli as export_cli
from sdonnx.export import folder
from sdonnx.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
SIZE, LATENT = 32, 16


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    """(diffusers folder, our export with turbo defaults, its pipeline) of a tiny turbo-like model."""
    from tiny_sd import save_pipeline

    root = tmp_path_factory.mktemp("turbo")
    pt = save_pipeline(root / "diffusers", "turbo")
    out = root / "onnx"
    result = CliRunner().invoke(export_cli.export, [str(pt), str(out), "--quiet",
                                                    "--defaults", "steps=1, guidance=0,scheduler=EULER_A"])
    assert result.exit_code == 0, result.output
    return pt, out, Pipeline.load(out)


def test_parse_defaults_checks_every_value():
    assert folder.parse_defaults("steps=2,guidance=0.5,scheduler=Euler_A,vae=tiny") == {
        "steps": 2, "guidance": 0.5, "scheduler": "euler_a", "vae": "tiny"}
    assert folder.parse_defaults("") == {}
    for bad, words in [("steps=0", "steps must be"), ("steps=1.5", "steps=1.5"), ("guidance=-1", "guidance must"),
                       ("guidance=nan", "guidance must"), ("scheduler=magic", "one of ddim"), ("vae=small", "full or tiny"),
                       ("colour=red", "unknown default 'colour'"), ("steps", "KEY=VALUE")]:
        with pytest.raises(ValueError) as err:
            folder.parse_defaults(bad)
        assert words in str(err.value) and "\n" not in str(err.value), (bad, err.value)


def test_generation_defaults_table_preset_source_and_overrides(tmp_path):
    from sdonnx.model import DEFAULTS

    turbo = DEFAULTS["turbo"]
    assert folder.generation_defaults("random:sd-turbo", False) == {
        "steps": turbo.steps, "guidance": turbo.guidance, "scheduler": turbo.scheduler}
    assert folder.generation_defaults("random:sd15", False)["steps"] == DEFAULTS["sd"].steps
    assert folder.generation_defaults("random:sd15-lcm", True)["scheduler"] == "lcm"
    (tmp_path / folder.DEFAULTS_FILE).write_text(json.dumps({"steps": 12, "guidance": 3.0}))
    assert folder.generation_defaults(str(tmp_path), False, {"steps": 2}) == {
        "steps": 2, "guidance": 3.0, "scheduler": DEFAULTS["sd"].scheduler}


def test_sd_turbo_preset_is_sd21_base_with_trailing_euler():
    from sdonnx.export.models.config import get_preset
    from sdonnx.export.weights import PRESET_SCHEDULERS, RANDOM_PRESETS

    cfg = get_preset("sd-turbo")
    assert (cfg.unet.sample_size * cfg.vae.downscale, cfg.unet.cross_attention_dim, cfg.clip.hidden_size) == (512, 1024, 1024)
    sched = PRESET_SCHEDULERS["sd-turbo"]
    assert (sched["_class_name"], sched["timestep_spacing"], sched["prediction_type"]) == (
        "EulerDiscreteScheduler", "trailing", "epsilon")
    assert RANDOM_PRESETS["sd-turbo"] == "sd2"


def test_turbo_folder_defaults_run_one_unguided_step(turbo):
    _, out, pipe = turbo
    d = pipe.info.defaults
    assert (d.steps, d.guidance, d.scheduler) == (1, 0.0, "euler_a")
    assert json.loads((out / "sdonnx.json").read_text())["defaults"]["steps"] == 1
    calls = []
    unet = pipe.components["unet"]
    pipe.components["unet"] = lambda **feeds: calls.append(feeds["sample"].shape) or unet(**feeds)
    try:
        image = pipe.txt2img(PROMPT, seed=1)[0]
    finally:
        pipe.components["unet"] = unet
    assert calls == [(1, 4, LATENT, LATENT)]  # one step, one conditional call: no classifier-free batch
    s = image.info["sdonnx"]
    assert (s.steps, s.guidance, s.scheduler) == (1, 0.0, "euler_a")


@pytest.mark.parametrize("steps,scheduler", [(1, "euler_a"), (2, "euler"), (4, "euler")])
def test_turbo_txt2img_matches_diffusers(turbo, steps, scheduler):
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    pt, _, pipe = turbo
    ref = StableDiffusionPipeline.from_pretrained(pt, safety_checker=None)
    cls = EulerAncestralDiscreteScheduler if scheduler == "euler_a" else EulerDiscreteScheduler
    ref.scheduler = cls.from_config(ref.scheduler.config)
    assert ref.scheduler.config.timestep_spacing == "trailing"
    lat = np.random.default_rng(steps).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    ours = pipe.txt2img(PROMPT, steps=steps, scheduler=scheduler, width=SIZE, height=SIZE, latents=lat,
                        output_type="np")
    theirs = ref(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                 latents=torch.from_numpy(lat), output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert ours.std() > 0.01
    np.testing.assert_allclose(ours, theirs, atol=2 / 255, rtol=0)
    # well-conditioned: a nudge of the latents far below the tolerance moves diffusers' picture far less than it
    nudged = ref(PROMPT, num_inference_steps=steps, guidance_scale=0.0, width=SIZE, height=SIZE,
                 latents=torch.from_numpy(lat + 1e-4), output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.abs(nudged - theirs).max() < 0.1 * 2 / 255


def test_turbo_qdq_calibrates_on_its_own_unguided_runs(turbo):
    from sdonnx.export import quantize
    from sdonnx.export.weights import build_models, load_checkpoint
    from sdonnx.schedulers import create

    pt, _, pipe = turbo
    ckpt = load_checkpoint(str(pt))
    models = build_models(ckpt)
    feeds = quantize.calibration_feeds(models, ckpt.configs, Path(ckpt.tokenizer_dir), ckpt.scheduler_config,
                                       prompts=("a red circle", "a blue square"), guidance=0.0, latent_hw=(8, 8),
                                       sampler="euler_a", steps=4)
    assert len(feeds) == 8 and all(f["sample"].shape == (1, 4, 8, 8) for f in feeds)
    expected = create("euler_a", pipe.info.scheduler_config, 4).timesteps
    np.testing.assert_allclose([float(f["timestep"]) for f in feeds[:4]], expected, rtol=1e-6)
    assert float(feeds[0]["timestep"]) == 999.0  # trailing: the one-step run starts at the last training step


def test_turbo_qdq_export_uses_the_folder_defaults(turbo, tmp_path, monkeypatch):
    from sdonnx.export import quantize

    pt, _, _ = turbo
    seen = {}
    real = quantize.calibration_feeds

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "calibration_feeds", spy)
    out = tmp_path / "qdq"
    result = CliRunner().invoke(export_cli.export, [str(pt), str(out), "--quiet", "--precision", "int8",
                                                    "--int8-scheme", "qdq", "--defaults", "steps=1,guidance=0,scheduler=euler"])
    assert result.exit_code == 0, result.output
    assert (seen["sampler"], seen["steps"], seen["guidance"]) == ("euler", 4, 0.0)  # its own sampler, 4 steps, no guidance
    pipe = Pipeline.load(out)
    assert pipe.txt2img(PROMPT, seed=2, output_type="np").std() > 0.01


def test_bad_defaults_fail_in_one_line_and_write_nothing(turbo, tmp_path):
    pt, _, _ = turbo
    out = tmp_path / "never"
    result = CliRunner().invoke(export_cli.export, [str(pt), str(out), "--quiet", "--defaults", "steps=zero"])
    assert result.exit_code != 0 and "steps=zero" in result.output and "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_static_unguided_export_runs_the_unet_at_batch_one(turbo, tmp_path):
    """A turbo model's U-Net is called at batch 1 (no classifier-free batch): --static fixes that batch, and qdq
    calibrates at it."""
    pt, _, _ = turbo
    out = tmp_path / "static"
    result = CliRunner().invoke(export_cli.export, [str(pt), str(out), "--quiet", "--static", f"{SIZE}x{SIZE}",
                                                    "--precision", "int8", "--int8-scheme", "qdq",
                                                    "--defaults", "steps=1,guidance=0,scheduler=euler"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sdonnx.json").read_text())
    assert meta["static_shape"]["batch"] == 1
    pipe = Pipeline.load(out)
    assert pipe.components["unet"].fixed_batch == 1
    assert pipe.txt2img(PROMPT, seed=1, output_type="np").std() > 0.01
