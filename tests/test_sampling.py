"""The one sampling loop and its model callables (sdonnx.sampling), and the settings a pipeline reports."""

import numpy as np
import pytest

from sdonnx import sampling
from sdonnx.schedulers import create


class Recorder:
    """A stand-in U-Net graph: out_sample = 0.1 * sample + context mean per row; records every call's feeds."""

    def __init__(self):
        self.calls = []

    def __call__(self, **feeds):
        self.calls.append(feeds)
        ctx = feeds["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None]
        out = {"out_sample": 0.1 * feeds["sample"][:, :4] + ctx}  # 9-channel inputs: 4 latent channels out
        if "deep_features" not in feeds:
            out["deep_features"] = feeds["sample"] * 2.0
        return out


def contexts(n=1):
    rng = np.random.default_rng(0)
    return rng.standard_normal((2 * n, 3, 5)).astype(np.float32)


def test_guided_combines_one_doubled_call_and_split_agrees():
    unet, ctx = Recorder(), contexts()
    x = np.random.default_rng(1).standard_normal((1, 4, 2, 2)).astype(np.float32)
    pred, _ = sampling.guided(unet, ctx, 5.0)(x, 7)
    assert len(unet.calls) == 1 and unet.calls[0]["sample"].shape == (2, 4, 2, 2)
    uncond, cond = 0.1 * x + ctx[0].mean(), 0.1 * x + ctx[1].mean()
    np.testing.assert_allclose(pred, uncond + 5.0 * (cond - uncond), rtol=1e-6, atol=1e-6)
    halves = Recorder()
    split, _ = sampling.guided(halves, ctx, 5.0, split=True)(x, 7)
    assert len(halves.calls) == 2 and all(c["sample"].shape == (1, 4, 2, 2) for c in halves.calls)
    np.testing.assert_allclose(split, pred, rtol=1e-6, atol=1e-6)
    plain = Recorder()
    got, _ = sampling.guided(plain, ctx[1:], 1.0, timestep_cond=np.ones((1, 8), np.float32))(x, 7)
    assert plain.calls[0]["timestep_cond"].shape == (1, 8) and plain.calls[0]["sample"].shape == (1, 4, 2, 2)
    np.testing.assert_allclose(got, cond, rtol=1e-6, atol=1e-6)


def test_step_cache_runs_the_full_graph_every_interval():
    full, shallow, ctx = Recorder(), Recorder(), contexts()
    predict = sampling.step_cache(sampling.guided(full, ctx, 3.0), sampling.guided(shallow, ctx, 3.0), 3)
    sched = create("ddim", {}, 7)
    x = np.random.default_rng(2).standard_normal((1, 4, 2, 2)).astype(np.float32)
    sampling.denoise(sched, sampling.Start(0, x), predict, np.random.default_rng(0))
    assert len(full.calls) == 3 and len(shallow.calls) == 4  # steps 0, 3, 6 full
    # each shallow call gets the deep features of the latest full call
    np.testing.assert_array_equal(shallow.calls[0]["deep_features"], full.calls[0]["sample"] * 2.0)
    np.testing.assert_array_equal(shallow.calls[3]["deep_features"], full.calls[1]["sample"] * 2.0)  # step 5: step 3


def test_denoise_appends_the_inpainting_channels():
    unet, ctx = Recorder(), contexts()
    sched = create("euler", {}, 3)
    rng = np.random.default_rng(3)
    extra = np.ones((1, 5, 2, 2), np.float32)
    start = sampling.Start(0, rng.standard_normal((1, 4, 2, 2)).astype(np.float32) * sched.init_noise_sigma,
                           extra=extra)
    steps = []
    sampling.denoise(sched, start, sampling.every_step(sampling.guided(unet, ctx, 2.0)), rng,
                     lambda k, total, lat: steps.append((k, total)))
    assert steps == [(0, 3), (1, 3), (2, 3)]
    assert all(c["sample"].shape == (2, 9, 2, 2) and np.array_equal(c["sample"][:, 4:], np.ones((2, 5, 2, 2)))
               for c in unet.calls)


def test_denoise_reimposes_the_known_latents_outside_the_mask():
    unet, ctx = Recorder(), contexts()
    sched = create("euler_a", {}, 4)
    rng = np.random.default_rng(3)
    keep = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    noise = rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
    mask = np.zeros((1, 1, 2, 2), np.float32)
    mask[..., 0, 0] = 1.0
    start = sampling.Start(0, rng.standard_normal((1, 4, 2, 2)).astype(np.float32) * sched.init_noise_sigma,
                           keep=keep, keep_mask=mask, noise=noise)
    seen = []
    out = sampling.denoise(sched, start, sampling.every_step(sampling.guided(unet, ctx, 2.0)), rng,
                           lambda k, total, lat: seen.append(lat))
    assert all(c["sample"].shape == (2, 4, 2, 2) for c in unet.calls)
    # after step 1, outside the mask: the clean latents noised to step 2's level; after the last, the clean ones
    np.testing.assert_allclose(seen[1][..., 1:, :], sched.add_noise(keep, noise, 2)[..., 1:, :], atol=1e-5)
    np.testing.assert_allclose(out[..., 1:, :], keep[..., 1:, :], atol=1e-6)
    assert not np.allclose(out[..., 0, 0], keep[..., 0, 0])


def test_conditioning_lcm_takes_the_scale_as_input():
    w, inputs = sampling.conditioning(7.5, None, 2)
    assert (w, inputs) == (7.5, {})
    w, inputs = sampling.conditioning(8.5, 16, 2)
    assert w == 1.0 and inputs["timestep_cond"].shape == (2, 16)
    np.testing.assert_array_equal(inputs["timestep_cond"], sampling.guidance_embedding(8.5, 16, 2))


def test_pipeline_reports_the_settings_it_used():
    from sdonnx import Pipeline

    pipe = Pipeline.load()
    d = pipe.info.defaults
    first = pipe.txt2img("a red circle on a blue background", steps=2)[0]
    s = first.info["sdonnx"]
    assert (s.steps, s.guidance, s.scheduler, s.width, s.height) == (2, d.guidance, d.scheduler, d.width, d.height)
    assert isinstance(s.seed, int) and s.strength is None and s.model == pipe.info.path.name
    again = pipe.txt2img("a red circle on a blue background", steps=2, seed=s.seed)[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))  # the reported seed reproduces the picture
    other = pipe.img2img("a red circle", first, strength=0.5, steps=4, guidance=2.0, seed=4)[0].info["sdonnx"]
    assert (other.strength, other.guidance, other.seed, other.steps) == (0.5, 2.0, 4, 4)
    assert s.parameters()["size"] == f"{d.width}x{d.height}" and s.parameters()["cache_interval"] is None
    cached = pipe.txt2img("a red circle", steps=4, cache_interval=2, seed=1)[0].info["sdonnx"]
    assert cached.parameters()["cache_interval"] == 2


@pytest.mark.parametrize("seed", [None, 11])
def test_cli_writes_exactly_the_pipeline_settings(tmp_path, seed):
    from click.testing import CliRunner
    from PIL import Image

    from sdonnx.cli import main

    out = tmp_path / "x.png"
    args = ["generate", "a blue square", "--steps", "2", "-o", str(out)] + ([] if seed is None else ["--seed", str(seed)])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = Image.open(out).text["parameters"]
    written = int(text.split("Seed: ")[1].split(",")[0])
    assert seed is None or written == seed
    from sdonnx import Pipeline

    again = Pipeline.load().txt2img("a blue square", steps=2, seed=written)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(again))
    d = Pipeline.load().info.defaults
    from sdonnx import infotext

    fields = infotext.parse(text)
    assert float(fields["CFG scale"]) == d.guidance and fields["Scheduler"] == d.scheduler
