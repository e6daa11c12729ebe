"""Diffusion samplers in NumPy, set up from a diffusers `scheduler_config.json` exactly as diffusers 0.35 does.

Each step's math is a short pure function over arrays and the schedule's alphas/sigmas (in the style of
k-diffusion); a thin `Scheduler` object per method holds the schedule and, for multistep methods, the
history. Arithmetic follows diffusers' dtypes (float32 for the schedule and samples) so that
trajectories agree with it to ~1e-6.
"""

from __future__ import annotations

import math

import numpy as np

NAMES: tuple[str, ...] = ("ddim", "ddpm", "pndm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "lcm")
F32 = np.float32


class SchedulerError(ValueError):
    """An unknown scheduler, an unsupported config value or a bad call."""


# ----------------------------------------------------------------------------------------------------------------
# Config: each method accepts the init keys of its diffusers class; keys a config lacks take that class's default.
_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
             prediction_type="epsilon", steps_offset=0)
_SIGMA_KINDS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
DEFAULTS: dict[str, dict] = {
    "ddim": dict(_BASE, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
                 timestep_spacing="leading", rescale_betas_zero_snr=False),
    "ddpm": dict(_BASE, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
                 timestep_spacing="leading", rescale_betas_zero_snr=False),
    "pndm": dict(_BASE, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "euler": dict(_BASE, **_SIGMA_KINDS, interpolation_type="linear", sigma_min=None, sigma_max=None,
                  timestep_spacing="linspace", timestep_type="discrete", rescale_betas_zero_snr=False,
                  final_sigmas_type="zero"),
    "euler_a": dict(_BASE, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "heun": dict(_BASE, **_SIGMA_KINDS, beta_start=0.00085, beta_end=0.012, clip_sample=False, clip_sample_range=1.0,
                 timestep_spacing="linspace"),
    "dpmpp_2m": dict(_BASE, **_SIGMA_KINDS, solver_order=2, thresholding=False, algorithm_type="dpmsolver++",
                     solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_lu_lambdas=False,
                     use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                     variance_type=None, timestep_spacing="linspace", rescale_betas_zero_snr=False,
                     use_dynamic_shifting=False),
    "lcm": dict(_BASE, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
                clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, thresholding=False,
                timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
}
DEFAULTS["dpmpp_2m_karras"] = DEFAULTS["dpmpp_2m"]
# What the name itself fixes, whatever the folder's config says.
FORCED = {"dpmpp_2m": dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False),
          "dpmpp_2m_karras": dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)}
BETA_SCHEDULES = {"linear", "scaled_linear", "squaredcos_cap_v2"}
PREDICTION_TYPES = {"ddim": ("epsilon", "sample", "v_prediction"), "ddpm": ("epsilon", "sample", "v_prediction"),
                    "pndm": ("epsilon", "v_prediction"), "euler": ("epsilon", "sample", "v_prediction"),
                    "euler_a": ("epsilon", "v_prediction"), "heun": ("epsilon", "sample", "v_prediction"),
                    "dpmpp_2m": ("epsilon", "sample", "v_prediction"), "lcm": ("epsilon", "sample", "v_prediction")}


def resolve_config(name: str, config: dict) -> dict:
    """The config diffusers' `TargetClass.from_config(config)` would end up with (only the keys we use)."""
    if not isinstance(config, dict):
        raise SchedulerError(f"scheduler config must be a dict, got {type(config).__name__}")
    family = "dpmpp_2m" if name.startswith("dpmpp_2m") else name
    skip = set(config.get("_use_default_values") or ())  # keys saved only as another class's defaults
    given = {k: v for k, v in config.items() if k not in skip}
    cfg = {k: given.get(k, v) for k, v in DEFAULTS[family].items()}
    for key in ("sigma_min", "sigma_max"):  # diffusers keeps unknown keys as "hidden" config that karras reads
        if key in given:
            cfg[key] = given[key]
    cfg.update(FORCED.get(name, {}))
    _validate(family, cfg)
    return cfg


def _validate(family: str, cfg: dict) -> None:
    allowed_betas = BETA_SCHEDULES | ({"sigmoid"} if family == "ddpm" else set()) | ({"exp"} if family == "heun" else set())
    checks = [
        (cfg["trained_betas"] is not None or cfg["beta_schedule"] in allowed_betas,
         f"beta_schedule {cfg['beta_schedule']!r} is not one of {sorted(allowed_betas)}"),
        (cfg["prediction_type"] in PREDICTION_TYPES[family],
         f"prediction_type {cfg['prediction_type']!r} is not one of {PREDICTION_TYPES[family]} for {family}"),
        (cfg["timestep_spacing"] in ("linspace", "leading", "trailing"),
         f"timestep_spacing {cfg['timestep_spacing']!r} is not one of linspace, leading, trailing"),
        (not cfg.get("thresholding"), "thresholding=True (dynamic thresholding) is not supported"),
        (not cfg.get("use_beta_sigmas"), "use_beta_sigmas is not supported (it needs scipy)"),
        (sum(bool(cfg.get(k)) for k in _SIGMA_KINDS) <= 1,
         "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"),
        (cfg.get("final_sigmas_type", "zero") in ("zero", "sigma_min"),
         f"final_sigmas_type {cfg.get('final_sigmas_type')!r} is not one of zero, sigma_min"),
        (cfg.get("interpolation_type", "linear") in ("linear", "log_linear"),
         f"interpolation_type {cfg.get('interpolation_type')!r} is not one of linear, log_linear"),
        (cfg.get("variance_type") in (None, "fixed_small", "fixed_small_log", "fixed_large"),
         f"variance_type {cfg.get('variance_type')!r} is not supported (fixed_small, fixed_small_log, fixed_large)"),
        (cfg.get("solver_type", "midpoint") in ("midpoint", "heun", "logrho", "bh1", "bh2"),
         f"solver_type {cfg.get('solver_type')!r} is not one of midpoint, heun"),
        (not cfg.get("use_flow_sigmas") and not cfg.get("use_dynamic_shifting"),
         "flow-matching sigmas (use_flow_sigmas / use_dynamic_shifting) are not supported"),
    ]
    for ok, message in checks:
        if not ok:
            raise SchedulerError(message)


# ----------------------------------------------------------------------------------------------------------------
# The training noise schedule.
def _alpha_bar_betas(n: int, fn) -> np.ndarray:
    return np.array([min(1 - fn((i + 1) / n) / fn(i / n), 0.999) for i in range(n)], dtype=F32)


def train_betas(cfg: dict) -> np.ndarray:
    """float32 betas for the `num_train_timesteps` training steps."""
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=F32)
        if betas.shape != (n,):
            raise SchedulerError(f"trained_betas has {betas.size} values, num_train_timesteps is {n}")
        return betas
    kind = cfg["beta_schedule"]
    if kind == "linear":
        return np.linspace(b0, b1, n).astype(F32)
    if kind == "scaled_linear":
        return np.linspace(b0 ** 0.5, b1 ** 0.5, n).astype(F32) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine schedule
        return _alpha_bar_betas(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    if kind == "exp":
        return _alpha_bar_betas(n, lambda t: math.exp(t * -12.0))
    # sigmoid (DDPM only)
    return (1 / (1 + np.exp(-np.linspace(-6, 6, n).astype(F32))) * (b1 - b0) + b0).astype(F32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    return np.cumprod(x.astype(np.float64)).astype(F32)  # torch's CPU cumprod accumulates in double


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last step has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules are Flawed")."""
    root = np.sqrt(_cumprod(1 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bars = root ** 2
    return (1 - np.concatenate([bars[:1], bars[1:] / bars[:-1]])).astype(F32)


def train_alphas_cumprod(cfg: dict) -> np.ndarray:
    """float32 cumulative products of alphas (alpha-bar) over the training steps."""
    betas = train_betas(cfg)
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return _cumprod(1 - betas)


def spaced_timesteps(spacing: str, n_train: int, steps: int, offset: int) -> np.ndarray:
    """Descending float64 timesteps as diffusers spaces them (linspace is left unrounded)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (n_train // steps)).round()[::-1] + offset
    return np.round(np.arange(n_train, 0, -n_train / steps)) - 1  # trailing


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


# ----------------------------------------------------------------------------------------------------------------
# Step math: pure functions over float32 arrays and schedule scalars.
def x0_eps_from_alpha(out: np.ndarray, x: np.ndarray, a: F32, prediction: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted clean sample, predicted noise) from a model output at alpha-bar `a`."""
    b = 1 - a
    if prediction == "epsilon":
        return (x - b ** 0.5 * out) / a ** 0.5, out
    if prediction == "v_prediction":
        return a ** 0.5 * x - b ** 0.5 * out, a ** 0.5 * out + b ** 0.5 * x
    return out, (x - a ** 0.5 * out) / b ** 0.5  # "sample"


def x0_from_sigma(out: np.ndarray, x: np.ndarray, sigma: F32, prediction: str) -> np.ndarray:
    """Predicted clean sample from a model output on x = x0 + sigma * noise (Karras' VE view)."""
    if prediction == "epsilon":
        return x - sigma * out
    if prediction == "v_prediction":
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    return out


def ddim_step(x0: np.ndarray, eps: np.ndarray, a_prev: F32) -> np.ndarray:
    """Song et al. 2021 eq. 12 with eta = 0."""
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def ddpm_mean_std(x0: np.ndarray, x: np.ndarray, a: F32, a_prev: F32, variance_type: str):
    """Ho et al. 2020 posterior q(x_{t-1} | x_t, x0): mean and standard deviation."""
    alpha = a / a_prev
    beta = 1 - alpha
    mean = (a_prev ** 0.5 * beta) / (1 - a) * x0 + alpha ** 0.5 * (1 - a_prev) / (1 - a) * x
    var = max((1 - a_prev) / (1 - a) * beta, F32(1e-20))
    std = {"fixed_small": var ** 0.5, "fixed_small_log": np.exp(F32(0.5) * np.log(var)),
           "fixed_large": beta ** 0.5}[variance_type]
    return mean, std


def pndm_transfer(x: np.ndarray, eps: np.ndarray, a: F32, a_prev: F32) -> np.ndarray:
    """Liu et al. 2022 (PNDM) eq. 11: move x from alpha-bar `a` to `a_prev` along eps."""
    denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
    return (a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom


def euler_step(x: np.ndarray, x0: np.ndarray, sigma: F32, sigma_next: F32) -> np.ndarray:
    """Karras et al. 2022 Algorithm 1 (one Euler step of the probability-flow ODE)."""
    return x + (x - x0) / sigma * (sigma_next - sigma)


def ancestral_sigmas(sigma: F32, sigma_next: F32) -> tuple[F32, F32]:
    """(sigma_down, sigma_up) splitting the move to sigma_next into a deterministic and a noise part."""
    up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    return (sigma_next ** 2 - up ** 2) ** 0.5, up


def vp_alpha_sigma(sigma: F32) -> tuple[F32, F32]:
    """(alpha_t, sigma_t) of the variance-preserving process with noise-to-signal ratio `sigma`."""
    alpha = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lam(sigma: F32) -> tuple[F32, F32, F32]:
    alpha, sig = vp_alpha_sigma(sigma)
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, exp(-h) = 0
        return alpha, sig, np.log(alpha) - np.log(sig)


def dpmpp_2m_step(x: np.ndarray, x0: np.ndarray, x0_prev: np.ndarray | None, sigmas: np.ndarray, j: int,
                  solver_type: str = "midpoint") -> np.ndarray:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2; first order when `x0_prev` is None."""
    alpha_t, sigma_t, lam_t = _lam(sigmas[j + 1])
    _, sigma_s0, lam_s0 = _lam(sigmas[j])
    h = lam_t - lam_s0
    with np.errstate(invalid="ignore"):
        e = np.exp(-h) - 1
    if x0_prev is None:
        return (sigma_t / sigma_s0) * x - (alpha_t * e) * x0
    _, _, lam_s1 = _lam(sigmas[j - 1])
    r0 = (lam_s0 - lam_s1) / h
    d1 = (1 / r0) * (x0 - x0_prev)
    if solver_type == "heun":
        return (sigma_t / sigma_s0) * x - (alpha_t * e) * x0 + (alpha_t * (e / h + 1)) * d1
    return (sigma_t / sigma_s0) * x - (alpha_t * e) * x0 - 0.5 * (alpha_t * e) * d1


def lcm_boundary(t: float, scaling: float) -> tuple[F32, F32]:
    """(c_skip, c_out) of the consistency-model boundary condition, sigma_data = 0.5 (Luo et al. 2023)."""
    s = F32(t * scaling)
    return F32(0.25) / (s ** 2 + F32(0.25)), s / (s ** 2 + F32(0.25)) ** 0.5


# ----------------------------------------------------------------------------------------------------------------
class Scheduler:
    """A scheduler set up for `num_steps` steps; `timesteps[i]` is the i-th U-Net call's timestep."""

    order: int = 1
    needs_noise: bool = False

    def __init__(self, name: str, cfg: dict, steps: int):
        self.name = name
        self.cfg = cfg
        self.prediction_type: str = cfg["prediction_type"]
        self.num_steps = steps
        self.init_noise_sigma: float = 1.0
        self.timesteps: np.ndarray = np.zeros(0)
        self._last: int | None = None  # index of the previous step() call, to detect a fresh loop

    def _continues(self, i: int) -> bool:
        """True if step(i) directly follows step(i - 1); a jump starts a fresh loop (as set_begin_index does)."""
        if not 0 <= i < len(self.timesteps):
            raise SchedulerError(f"step index {i} is outside 0..{len(self.timesteps) - 1}")
        cont = self._last == i - 1
        self._last = i
        return cont

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        raise NotImplementedError

    def start_index(self, strength: float) -> int:
        """First timesteps index of img2img at `strength`, as diffusers' get_timesteps (may be len(timesteps))."""
        if not 0 < strength <= 1:
            raise SchedulerError(f"strength must be in (0, 1], got {strength}")
        keep = min(int(self.num_steps * strength), self.num_steps)
        return max(self.num_steps - keep, 0) * self.order

    def _clip(self, x0: np.ndarray) -> np.ndarray:
        """Clamp the predicted clean sample where the config asks for it (clip_sample)."""
        if self.cfg.get("clip_sample"):
            r = self.cfg["clip_sample_range"]
            return np.clip(x0, -r, r)
        return x0

    def _noise(self, noise: np.ndarray | None, like: np.ndarray) -> np.ndarray:
        if noise is None:
            raise SchedulerError(f"scheduler {self.name!r} is stochastic: pass noise= to step()")
        return np.asarray(noise, dtype=F32).reshape(like.shape)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} steps={self.num_steps} prediction={self.prediction_type}>"


def _f32(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, dtype=F32) for a in arrays]


class _AlphaScheduler(Scheduler):
    """Methods over alpha-bar at integer timesteps (DDIM, DDPM, PNDM, LCM): unscaled inputs, unit initial noise."""

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        self.alphas_cumprod = train_alphas_cumprod(cfg)
        self.final_alpha_cumprod = F32(1.0) if cfg.get("set_alpha_to_one", True) else self.alphas_cumprod[0]

    def _alpha(self, t: float) -> F32:
        return self.alphas_cumprod[int(t)] if t >= 0 else self.final_alpha_cumprod

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        original, noise = _f32(original, noise)
        if i >= len(self.timesteps):  # past the last step: the clean level
            return original
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return a ** 0.5 * original + (1 - a) ** 0.5 * noise


def _integer_timesteps(cfg: dict, steps: int) -> np.ndarray:
    t = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], steps, cfg["steps_offset"])
    if cfg["timestep_spacing"] == "linspace":
        t = t.round()
    return t.astype(np.int64).astype(np.float64)


class DDIM(_AlphaScheduler):
    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        self.timesteps = _integer_timesteps(cfg, steps)
        self._stride = cfg["num_train_timesteps"] // steps  # diffusers' DDIM steps back by this, whatever the spacing

    def step(self, model_output, i, sample, noise=None):
        self._continues(i)
        out, x = _f32(model_output, sample)
        t = int(self.timesteps[i])
        x0, eps = x0_eps_from_alpha(out, x, self.alphas_cumprod[t], self.prediction_type)
        return ddim_step(self._clip(x0), eps, self._alpha(t - self._stride))


class DDPM(_AlphaScheduler):
    needs_noise = True

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        self.final_alpha_cumprod = F32(1.0)
        self.timesteps = _integer_timesteps(cfg, steps)

    def step(self, model_output, i, sample, noise=None):
        self._continues(i)
        out, x = _f32(model_output, sample)
        t = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a, a_prev = self.alphas_cumprod[t], self._alpha(prev)
        x0, _ = x0_eps_from_alpha(out, x, a, self.prediction_type)
        mean, std = ddpm_mean_std(self._clip(x0), x, a, a_prev, self.cfg["variance_type"])
        return mean + std * self._noise(noise, x) if t > 0 else mean


class PNDM(_AlphaScheduler):
    """PLMS with an optional Runge-Kutta warm-up (skip_prk_steps=False), Liu et al. 2022."""

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        n_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
        base = spaced_timesteps(spacing, n_train, steps, cfg["steps_offset"])[::-1]  # ascending
        base = base.round() if spacing == "linspace" else base
        base = base.astype(np.int64)
        self._stride = n_train // steps
        if cfg["skip_prk_steps"]:
            self.prk_steps = 0
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
            self.timesteps = plms.astype(np.float64)
        else:
            if steps < 4:
                raise SchedulerError("pndm with skip_prk_steps=False needs at least 4 steps")
            prk = base[-4:].repeat(2) + np.tile(np.array([0, self._stride // 2]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            self.prk_steps = len(prk)
            self.timesteps = np.concatenate([prk, base[:-3][::-1]]).astype(np.float64)
        self._reset()

    def _reset(self) -> None:
        self.counter, self.ets, self.cur_sample, self.cur_out = 0, [], None, 0.0

    def step(self, model_output, i, sample, noise=None):
        if not self._continues(i):
            self._reset()
        out, x = _f32(model_output, sample)
        t = int(self.timesteps[i])
        if self.counter < self.prk_steps:
            x = self._step_prk(out, t, x)
        else:
            x = self._step_plms(out, t, x)
        self.counter += 1
        return x

    def _eps(self, out: np.ndarray, x: np.ndarray, t: int) -> np.ndarray:
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t]
            return a ** 0.5 * out + (1 - a) ** 0.5 * x
        return out

    def _move(self, x: np.ndarray, out: np.ndarray, t: int, t_prev: int) -> np.ndarray:
        return pndm_transfer(x, self._eps(out, x, t), self.alphas_cumprod[t], self._alpha(t_prev))

    def _step_prk(self, out: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        k = self.counter % 4
        t_prev = t - (0 if self.counter % 2 else self._stride // 2)
        t_base = int(self.timesteps[self.counter // 4 * 4])
        if k == 0:
            self.cur_out = self.cur_out + 1 / 6 * out
            self.ets.append(out)
            self.cur_sample = x
        elif k in (1, 2):
            self.cur_out = self.cur_out + 1 / 3 * out
        else:
            out = self.cur_out + 1 / 6 * out
            self.cur_out = 0.0
        return self._move(self.cur_sample, out, t_base, t_prev)

    def _step_plms(self, out: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        t_prev = t - self._stride
        if self.counter != 1:
            self.ets = self.ets[-3:] + [out]
        else:  # the second call repeats the first timestep: a Heun-like correction of step one
            t_prev, t = t, t + self._stride
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            out, x, self.cur_sample = (out + ets[-1]) / 2, self.cur_sample, None
        elif len(ets) == 2:
            out = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            out = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._move(x, out, t, t_prev)


class LCM(_AlphaScheduler):
    """Latent consistency models' multistep sampler (Luo et al. 2023)."""

    needs_noise = True

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        original = cfg["original_inference_steps"]
        if original > cfg["num_train_timesteps"] or steps > original:
            raise SchedulerError(f"lcm needs steps <= original_inference_steps ({original}), got {steps}")
        origin = (np.arange(1, original + 1) * (cfg["num_train_timesteps"] // original) - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.float64)

    def step(self, model_output, i, sample, noise=None):
        self._continues(i)
        out, x = _f32(model_output, sample)
        t = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a, a_prev = self.alphas_cumprod[t], self._alpha(prev)
        c_skip, c_out = lcm_boundary(t, self.cfg["timestep_scaling"])
        x0, _ = x0_eps_from_alpha(out, x, a, self.prediction_type)
        denoised = c_out * self._clip(x0) + c_skip * x
        if i == self.num_steps - 1:
            return denoised
        return a_prev ** 0.5 * denoised + (1 - a_prev) ** 0.5 * self._noise(noise, x)


# ----------------------------------------------------------------------------------------------------------------
class _SigmaScheduler(Scheduler):
    """Methods over sigma = sqrt((1 - alpha-bar) / alpha-bar) (Euler, Euler ancestral, Heun, DPM++)."""

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        self.alphas_cumprod = train_alphas_cumprod(cfg)
        if cfg.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = F32(2.0 ** -24)  # keep sigma finite at the zero-SNR step
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32, ascending in t

    def _base_sigmas(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float32, sigmas float64) before any Karras/exponential remapping."""
        t = spaced_timesteps(self.cfg["timestep_spacing"], self.cfg["num_train_timesteps"], steps,
                             self.cfg["steps_offset"]).astype(F32)
        return t, np.interp(t, np.arange(len(self.train_sigmas)), self.train_sigmas)

    def _remap(self, sigmas: np.ndarray, steps: int) -> np.ndarray | None:
        """Karras or exponential sigmas between the schedule's ends (config sigma_min/max override), or None."""
        lo = self.cfg.get("sigma_min") if self.cfg.get("sigma_min") is not None else float(sigmas[-1])
        hi = self.cfg.get("sigma_max") if self.cfg.get("sigma_max") is not None else float(sigmas[0])
        if self.cfg.get("use_karras_sigmas"):
            return karras_sigmas(lo, hi, steps)
        if self.cfg.get("use_exponential_sigmas"):
            return exponential_sigmas(lo, hi, steps)
        return None

    def _init_sigma(self) -> float:
        top = self.sigmas.max()
        if self.cfg["timestep_spacing"] in ("linspace", "trailing"):
            return float(top)
        return float((top ** 2 + 1) ** 0.5)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return np.asarray(sample, dtype=F32) / (sigma ** 2 + 1) ** 0.5

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        original, noise = _f32(original, noise)
        return original + noise * self.sigmas[i]

    def _final_sigma(self) -> float:
        if self.cfg.get("final_sigmas_type", "zero") == "sigma_min":
            return float(self.train_sigmas[0])
        return 0.0


class Euler(_SigmaScheduler):
    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        timesteps, sigmas = self._base_sigmas(steps)
        log_sigmas = np.log(self.train_sigmas)
        if cfg["interpolation_type"] == "log_linear":  # diffusers' quirk: steps + 1 values here
            sigmas = np.exp(np.linspace(np.log(self.train_sigmas[-1]), np.log(self.train_sigmas[0]),
                                        steps + 1).astype(F32))
        remapped = self._remap(sigmas, steps)
        if remapped is not None:
            sigmas, timesteps = remapped, sigma_to_t(remapped, log_sigmas)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        if cfg["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            timesteps = F32(0.25) * np.log(self.sigmas[:-1])
        self.timesteps = np.asarray(timesteps, dtype=F32).astype(np.float64)
        self.init_noise_sigma = self._init_sigma()

    def step(self, model_output, i, sample, noise=None):
        self._continues(i)
        out, x = _f32(model_output, sample)
        sigma = self.sigmas[i]
        return euler_step(x, x0_from_sigma(out, x, sigma, self.prediction_type), sigma, self.sigmas[i + 1])


class EulerAncestral(_SigmaScheduler):
    needs_noise = True

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        timesteps, sigmas = self._base_sigmas(steps)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps.astype(np.float64)
        self.init_noise_sigma = self._init_sigma()

    def step(self, model_output, i, sample, noise=None):
        self._continues(i)
        out, x = _f32(model_output, sample)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = x0_from_sigma(out, x, sigma, self.prediction_type)
        down, up = ancestral_sigmas(sigma, sigma_next)
        return euler_step(x, x0, sigma, down) + self._noise(noise, x) * up


class Heun(_SigmaScheduler):
    """Karras et al. 2022 Algorithm 1 with the 2nd-order correction: two U-Net calls per step but the last."""

    order = 2

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        timesteps, sigmas = self._base_sigmas(steps)
        remapped = self._remap(sigmas, steps)
        if remapped is not None:
            sigmas, timesteps = remapped, sigma_to_t(remapped, np.log(self.train_sigmas))
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.asarray(timesteps)
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(F32).astype(np.float64)
        self.init_noise_sigma = self._init_sigma()
        self._pending = None  # (derivative, dt, sample) of a first-order step awaiting its correction

    def step(self, model_output, i, sample, noise=None):
        if not self._continues(i):
            self._pending = None
        out, x = _f32(model_output, sample)
        if self._pending is None:  # first order: Euler to the next sigma, remember the slope
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            x0 = self._clip(x0_from_sigma(out, x, sigma, self.prediction_type))
            derivative = (x - x0) / sigma
            dt = sigma_next - sigma
            self._pending = (derivative, dt, x)
            return x + derivative * dt
        sigma_next = self.sigmas[i]  # second order: average the slopes at both ends, restart from the saved x
        x0 = self._clip(x0_from_sigma(out, x, sigma_next, self.prediction_type))
        prev_derivative, dt, x_start = self._pending
        self._pending = None
        derivative = (prev_derivative + (x - x0) / sigma_next) / 2
        return x_start + derivative * dt


class DPMSolverPP2M(_SigmaScheduler):
    """DPM-Solver++(2M) over a VP schedule; inputs unscaled, unit initial noise."""

    def __init__(self, name: str, cfg: dict, steps: int):
        super().__init__(name, cfg, steps)
        n_train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
        lambdas = np.log(self.alphas_cumprod ** 0.5) - np.log((1 - self.alphas_cumprod) ** 0.5)
        last = n_train - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            timesteps = np.arange(last, 0, -n_train / steps).round() - 1
        timesteps = timesteps.astype(np.int64)
        log_sigmas = np.log(self.train_sigmas)
        if cfg["use_lu_lambdas"]:  # uniform in log-SNR (Lu et al. 2023, "DPM-Solver-v3" appendix)
            sigmas = np.exp(karras_sigmas(float(log_sigmas[0]), float(log_sigmas[-1]), steps, rho=1.0))
        else:
            sigmas = self._remap(self.train_sigmas[::-1], steps)
        if sigmas is not None:
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if cfg["use_karras_sigmas"] or cfg["use_lu_lambdas"]:
                if cfg["beta_schedule"] != "squaredcos_cap_v2":
                    timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = timesteps.astype(np.int64).astype(np.float64)
        self._prev_x0 = None

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        original, noise = _f32(original, noise)
        alpha, sigma = vp_alpha_sigma(self.sigmas[i])
        return alpha * original + sigma * noise

    def _x0(self, out: np.ndarray, x: np.ndarray, i: int) -> np.ndarray:
        alpha, sigma = vp_alpha_sigma(self.sigmas[i])
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x - sigma * out
        return out

    def step(self, model_output, i, sample, noise=None):
        prev_x0 = self._prev_x0 if self._continues(i) else None
        out, x = _f32(model_output, sample)
        x0 = self._x0(out, x, i)
        self._prev_x0 = x0
        n = len(self.timesteps)
        final_first_order = i == n - 1 and (self.cfg["euler_at_final"] or self.cfg["final_sigmas_type"] == "zero"
                                            or (self.cfg["lower_order_final"] and n < 15))
        if final_first_order:
            prev_x0 = None
        solver = self.cfg["solver_type"] if self.cfg["solver_type"] in ("midpoint", "heun") else "midpoint"
        return dpmpp_2m_step(x, x0, prev_x0, self.sigmas, i, solver)


_CLASSES = {"ddim": DDIM, "ddpm": DDPM, "pndm": PNDM, "euler": Euler, "euler_a": EulerAncestral, "heun": Heun,
            "dpmpp_2m": DPMSolverPP2M, "dpmpp_2m_karras": DPMSolverPP2M, "lcm": LCM}


def create(name: str, config: dict, steps: int) -> Scheduler:
    """A scheduler `name` for `steps` steps, from a folder's scheduler_config.json dict."""
    if name not in _CLASSES:
        raise SchedulerError(f"unknown scheduler {name!r}; choose one of: {', '.join(NAMES)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise SchedulerError(f"steps must be a positive integer, got {steps!r}")
    cfg = resolve_config(name, config)
    if steps > cfg["num_train_timesteps"]:
        raise SchedulerError(f"steps ({steps}) cannot exceed num_train_timesteps ({cfg['num_train_timesteps']})")
    return _CLASSES[name](name, cfg, int(steps))
