"""sdonnx.schedulers against diffusers' schedulers on a synthetic model: timesteps, noise levels, trajectories."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from sdonnx import schedulers
from sdonnx.schedulers import NAMES, SchedulerError, create

from tiny_sd import SD1_SCHEDULER, SD2_SCHEDULER

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers' own numpy-2 deprecation noise (np.array over torch tensors), not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (2, 4, 3, 5)
PATTERN = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
DIFFUSERS = {  # name -> (diffusers class, what from_config gets on top of the folder's config)
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                     use_karras_sigmas=False)),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                            use_karras_sigmas=True)),
    "lcm": ("LCMScheduler", {}),
}
DETERMINISTIC = ("ddim", "pndm", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras")
STOCHASTIC = ("ddpm", "euler_a", "lcm")
CONFIGS = {
    "sd1": SD1_SCHEDULER,
    "sd2": SD2_SCHEDULER,
    "trailing": dict(SD1_SCHEDULER, timestep_spacing="trailing"),
    "linspace": dict(SD2_SCHEDULER, timestep_spacing="linspace"),
    "bare": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},  # class defaults
}


def model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the U-Net (numpy, fed the same float32 inputs on both sides)."""
    return (0.1 * x + math.sin(t / 100.0) * PATTERN).astype(np.float32)


def reference(name: str, config: dict, steps: int):
    cls_name, extra = DIFFUSERS[name]
    cfg = {k: v for k, v in config.items() if k != "_class_name"}
    sched = getattr(diffusers, cls_name).from_config(cfg, **extra)
    sched.set_timesteps(steps)
    return sched


def run_reference(sched, x, start=0, noises=None, monkeypatch=None):
    """diffusers' loop as its img2img/txt2img pipelines drive it; returns every intermediate sample."""
    current = [0]
    if noises is not None:
        module = importlib.import_module(type(sched).__module__)
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noises[current[0]]))
    if start and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    x = torch.from_numpy(x)
    out = []
    for k, t in enumerate(sched.timesteps[start:]):
        current[0] = k
        inp = sched.scale_model_input(x, t)
        eps = torch.from_numpy(model(inp.numpy(), float(t)))
        x = sched.step(eps, t, x).prev_sample
        out.append(x.numpy().copy())
    return out


def run_ours(sched, x, start=0, noises=None):
    out = []
    for k, i in enumerate(range(start, len(sched.timesteps))):
        t = sched.timesteps[i]
        eps = model(sched.scale_model_input(x, i), float(t))
        x = sched.step(eps, i, x, noise=None if noises is None else noises[k])
        out.append(x)
    return out


def assert_close(ours, ref, what="", atol=1e-5):
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64),
                               rtol=1e-5, atol=atol, err_msg=what)


def latents(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def check_trajectory(name, config, steps, start=0, noises=None, monkeypatch=None, atol=1e-5):
    ref = reference(name, config, steps)
    ours = create(name, config, steps)
    assert ours.timesteps.dtype == np.float64
    assert_close(ours.timesteps, ref.timesteps.numpy(), "timesteps")
    assert_close(ours.init_noise_sigma, float(ref.init_noise_sigma), "init_noise_sigma")
    assert ours.order == ref.order
    noise = latents(1)
    if start:
        image = latents(2) * 0.5
        x_ref = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[start:start + 1])
        if hasattr(ref, "set_begin_index"):  # the noise level of the begin index, as img2img sets it up
            ref.set_begin_index(start)
            x_ref = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[start:start + 1])
        x_ours = ours.add_noise(image, noise, start)
        assert_close(x_ours, x_ref.numpy(), "add_noise at start")
        x0 = x_ours
    else:
        x0 = (noise * np.float32(ours.init_noise_sigma)).astype(np.float32)
        assert_close(x0, (torch.from_numpy(noise) * ref.init_noise_sigma).numpy(), "initial latents")
    got = run_ours(ours, x0, start, noises)
    want = run_reference(ref, x0, start, noises, monkeypatch)
    assert len(got) == len(want) == len(ours.timesteps) - start
    for k, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, f"{name} step {start + k}", atol)
    return ours


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("steps", [4, 9])
def test_deterministic_matches_diffusers(name, config, steps):
    check_trajectory(name, CONFIGS[config], steps)


@pytest.mark.parametrize("config", ["sd1", "sd2", "trailing"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_img2img_start_matches_diffusers(name, config):
    """From start_index(strength) after add_noise, as diffusers' img2img (set_begin_index) runs it."""
    steps, strength = 10, 0.55
    sched = create(name, CONFIGS[config], steps)
    keep = min(int(steps * strength), steps)
    start = sched.start_index(strength)
    assert start == (steps - keep) * sched.order > 0
    check_trajectory(name, CONFIGS[config], steps, start=start)


@pytest.mark.parametrize("config", ["sd1", "sd2", "linspace"])
@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("steps", [3, 6])
def test_stochastic_matches_diffusers_with_same_noise(name, config, steps, monkeypatch):
    noises = [latents(100 + k) for k in range(40)]
    sched = check_trajectory(name, CONFIGS[config], steps, noises=noises, monkeypatch=monkeypatch)
    assert sched.needs_noise


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_img2img_start(name, monkeypatch):
    sched = create(name, SD1_SCHEDULER, 8)
    noises = [latents(200 + k) for k in range(40)]
    check_trajectory(name, SD1_SCHEDULER, 8, start=sched.start_index(0.5), noises=noises, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers_at_every_index(name):
    steps = 6
    ref = reference(name, SD2_SCHEDULER, steps)
    ours = create(name, SD2_SCHEDULER, steps)
    image, noise = latents(3), latents(4)
    for i in range(len(ours.timesteps)):
        want = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[i:i + 1])
        assert_close(ours.add_noise(image, noise, i), want.numpy(), f"add_noise({i})")
    final = ours.add_noise(image, noise, len(ours.timesteps))  # past the last step: clean
    assert_close(final, image)


EXTRA = {  # less common options, each against diffusers
    "euler-karras": ("euler", dict(SD1_SCHEDULER, use_karras_sigmas=True)),
    "euler-exponential": ("euler", dict(SD1_SCHEDULER, use_exponential_sigmas=True)),
    "euler-sigma-min-final": ("euler", dict(SD1_SCHEDULER, final_sigmas_type="sigma_min")),
    "euler-log-linear": ("euler", dict(SD1_SCHEDULER, interpolation_type="log_linear")),
    "euler-continuous-v": ("euler", dict(SD2_SCHEDULER, timestep_type="continuous")),
    "euler-zero-snr": ("euler", dict(SD2_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    "ddim-zero-snr": ("ddim", dict(SD2_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    "dpm-zero-snr": ("dpmpp_2m", dict(SD2_SCHEDULER, rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    "heun-karras": ("heun", dict(SD2_SCHEDULER, use_karras_sigmas=True)),
    "heun-sigma-bounds": ("heun", dict(SD1_SCHEDULER, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    "ddim-sample-cosine": ("ddim", dict(SD1_SCHEDULER, prediction_type="sample", beta_schedule="squaredcos_cap_v2")),
    "ddim-clip": ("ddim", dict(SD1_SCHEDULER, prediction_type="sample", clip_sample=True)),
    "euler-sample-linear": ("euler", dict(SD1_SCHEDULER, prediction_type="sample", beta_schedule="linear")),
    "pndm-prk-v": ("pndm", dict(SD2_SCHEDULER, skip_prk_steps=False)),
    "pndm-linspace": ("pndm", dict(SD1_SCHEDULER, timestep_spacing="linspace")),
    "dpm-heun-solver": ("dpmpp_2m", dict(SD1_SCHEDULER, solver_type="heun")),
    "dpm-sigma-min-final": ("dpmpp_2m", dict(SD1_SCHEDULER, final_sigmas_type="sigma_min")),
    "dpm-leading-v": ("dpmpp_2m_karras", dict(SD2_SCHEDULER, timestep_spacing="leading")),
    "dpm-many-steps": ("dpmpp_2m", dict(SD1_SCHEDULER, lower_order_final=False, final_sigmas_type="sigma_min")),
    "dpm-lu-lambdas": ("dpmpp_2m", dict(SD1_SCHEDULER, use_lu_lambdas=True)),
    "trained-betas": ("euler", dict(SD1_SCHEDULER, trained_betas=np.linspace(1e-4, 0.02, 1000).tolist())),
    "ignores-default-marked": ("euler", dict(SD1_SCHEDULER, timestep_spacing="leading",
                                             _use_default_values=["timestep_spacing"])),
}


@pytest.mark.parametrize("case", list(EXTRA))
def test_config_options_match_diffusers(case):
    name, config = EXTRA[case]
    steps = 16 if case == "dpm-many-steps" else 7
    atol = 1e-5
    if case == "euler-zero-snr":
        # The zero-SNR schedule's first sigma is sqrt((1 - 2**-24) / 2**-24), just under 4096, and torch's float32
        # sqrt is not correctly rounded (4096.0 where IEEE gives 4095.9998; it differs by one ulp on ~15% of
        # inputs, torch 2.13 CPU). Both sides then agree to 2e-7 given the same sigmas, but Euler's first step
        # x + (x - x0) / sigma * (sigma_next - sigma) takes x ~ sigma * noise (about 1e4) down to about 30, so
        # one ulp of that sigma leaves rounding at the scale of |x|: allow one float32 ulp of the largest |x|.
        atol = float(np.finfo(np.float32).eps * create(name, config, steps).init_noise_sigma * np.abs(latents(1)).max())
    check_trajectory(name, config, steps, atol=atol)


def test_ddpm_variance_types_and_lcm_options(monkeypatch):
    noises = [latents(300 + k) for k in range(20)]
    for variance in ("fixed_small_log", "fixed_large"):
        check_trajectory("ddpm", dict(SD1_SCHEDULER, variance_type=variance), 5, noises=noises,
                         monkeypatch=monkeypatch)
    check_trajectory("ddpm", dict(SD1_SCHEDULER, beta_schedule="sigmoid"), 5, noises=noises, monkeypatch=monkeypatch)
    check_trajectory("lcm", dict(SD2_SCHEDULER, original_inference_steps=20, timestep_scaling=0.05), 4,
                     noises=noises, monkeypatch=monkeypatch)


def test_loop_restart_resets_history():
    """Reusing one object for a second loop (e.g. another image) gives the same result as a fresh one."""
    for name in ("pndm", "heun", "dpmpp_2m"):
        sched = create(name, SD1_SCHEDULER, 6)
        first = run_ours(sched, latents())[-1]
        again = run_ours(sched, latents())[-1]
        np.testing.assert_array_equal(first, again)
        start = sched.start_index(0.5)
        fresh = run_ours(create(name, SD1_SCHEDULER, 6), latents(), start)[-1]
        np.testing.assert_array_equal(run_ours(sched, latents(), start)[-1], fresh)


def test_protocol_attributes():
    for name in NAMES:
        sched = create(name, SD1_SCHEDULER, 5)
        assert sched.name == name and sched.num_steps == 5 and sched.prediction_type == "epsilon"
        assert isinstance(sched.init_noise_sigma, float)
        assert sched.needs_noise == (name in STOCHASTIC)
    assert len(create("heun", SD1_SCHEDULER, 5).timesteps) == 2 * 5 - 1
    assert len(create("pndm", SD1_SCHEDULER, 5).timesteps) == 5 + 1
    assert create("heun", SD1_SCHEDULER, 5).start_index(0.4) == 6


def test_bad_names_and_configs():
    with pytest.raises(ValueError, match="unknown scheduler 'foo'.*ddim.*lcm"):
        create("foo", SD1_SCHEDULER, 10)
    bad = [
        (dict(SD1_SCHEDULER, beta_schedule="cubic"), "beta_schedule 'cubic'"),
        (dict(SD1_SCHEDULER, prediction_type="flow"), "prediction_type 'flow'"),
        (dict(SD1_SCHEDULER, timestep_spacing="random"), "timestep_spacing 'random'"),
        (dict(SD1_SCHEDULER, thresholding=True), "thresholding"),
        (dict(SD1_SCHEDULER, trained_betas=[0.1, 0.2]), "trained_betas has 2 values"),
    ]
    for config, message in bad:
        with pytest.raises(SchedulerError, match=message):
            create("ddim", config, 10)
    with pytest.raises(SchedulerError, match="use_beta_sigmas"):
        create("euler", dict(SD1_SCHEDULER, use_beta_sigmas=True), 10)
    with pytest.raises(SchedulerError, match="only one of"):
        create("dpmpp_2m_karras", dict(SD1_SCHEDULER, use_exponential_sigmas=True), 10)
    with pytest.raises(SchedulerError, match="variance_type"):
        create("ddpm", dict(SD1_SCHEDULER, variance_type="learned_range"), 10)
    with pytest.raises(SchedulerError, match="config must be a dict"):
        create("ddim", "scheduler_config.json", 10)
    for steps in (0, -3, 2.5, 1001):
        with pytest.raises(SchedulerError, match="steps"):
            create("ddim", SD1_SCHEDULER, steps)
    with pytest.raises(SchedulerError, match="original_inference_steps"):
        create("lcm", SD1_SCHEDULER, 60)
    sched = create("euler_a", SD1_SCHEDULER, 4)
    with pytest.raises(SchedulerError, match="strength"):
        sched.start_index(0.0)
    with pytest.raises(SchedulerError, match="strength"):
        sched.start_index(1.5)
    with pytest.raises(SchedulerError, match="noise"):
        sched.step(latents(), 0, latents())
    with pytest.raises(SchedulerError, match="step index 4"):
        create("ddim", SD1_SCHEDULER, 4).step(latents(), 4, latents())
