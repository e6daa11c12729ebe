"""Model folders (ours with sdonnx.json, or optimum's layout): what they hold, and whether their files are intact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SdonnxError

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder", "vae_encoder_tiny",
              "vae_decoder_tiny")
REQUIRED = ("text_encoder", "unet", "vae_decoder")
# (encoder, decoder) of each VAE a folder may hold: the full one, and a tiny one (TAESD) exported with --tiny-vae
VAES = {"full": ("vae_encoder", "vae_decoder"), "tiny": ("vae_encoder_tiny", "vae_decoder_tiny")}
# the step cache's graphs (DeepCache), exported with `sdonnx export --step-cache`: used only together
ORT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
STEP_CACHE = {"unet_features": "unet/model_features.onnx", "unet_shallow": "unet_shallow/model.onnx"}
# the text encoder with every layer's output (hidden_states.K), exported beside model.onnx: what clip skip reads
HIDDEN_STATES = {"text_encoder_hidden_states": "text_encoder/model_hidden_states.onnx"}
SHA_LIMIT = 256 * 2**20  # by default only files below this are hashed; sizes are always checked
# diffusers scheduler classes -> our names (the folder's own scheduler is the default one)
SCHEDULER_NAMES = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}


@dataclass(frozen=True)
class Defaults:
    """What a generation runs with when the caller names nothing."""

    steps: int
    guidance: float
    scheduler: str
    width: int = 512
    height: int = 512
    vae: str = "full"  # or "tiny": a tiny VAE (TAESD) exported beside the full one


# The one table of generation defaults, by model kind. The exporter writes the row of its model into sdonnx.json
# (with the image size); a folder's sdonnx.json overrides these, and a folder without one (optimum's) runs the
# scheduler class its scheduler_config.json names.
DEFAULTS = {
    "sd": Defaults(steps=25, guidance=7.5, scheduler="dpmpp_2m_karras"),
    # an LCM-distilled U-Net (Luo et al. 2023): few steps of its own scheduler, the guidance scale a U-Net input
    # (diffusers' LatentConsistencyModelPipeline defaults)
    "lcm": Defaults(steps=4, guidance=8.5, scheduler="lcm"),
    # a one- to four-step adversarially distilled model (SD-Turbo, Sauer et al. 2023): no classifier-free guidance
    "turbo": Defaults(steps=1, guidance=0.0, scheduler="euler_a"),
    # the bundled tiny model (chosen on the step-count/guidance sweep of its training: export/tiny/train.py)
    "tiny": Defaults(steps=20, guidance=3.0, scheduler="ddim", width=64, height=64),
    # SDXL base (Podell et al. 2023): trained at 1024x1024 (the size comes from the U-Net's sample_size); the
    # guidance diffusers' StableDiffusionXLPipeline defaults to
    "sdxl": Defaults(steps=25, guidance=5.0, scheduler="dpmpp_2m_karras", width=1024, height=1024),
}
# the families whose U-Net takes SDXL's pooled text embedding and size/crop numbers (sdxl.py)
SDXL_FAMILIES = ("sdxl", "sdxl-inpaint")


@dataclass(frozen=True)
class ModelInfo:
    """Everything the runtime needs to know about a model folder."""

    path: Path
    family: str
    components: dict  # name -> path of model.onnx, for the components present
    latent_channels: int
    unet_in_channels: int
    vae_scale_factor: int
    scaling_factor: float
    prediction_type: str
    sample_size: int  # pixels
    defaults: Defaults
    scheduler_config: dict
    static_shape: dict | None = None
    guidance_embedding_dim: int | None = None  # an LCM-distilled U-Net's timestep_cond width
    tiny_scaling: tuple[float, float] | None = None  # the tiny VAE's (scaling, shift) factors, where there is one
    # SDXL: an empty negative prompt conditions on zeros rather than on the encoded "" (model_index.json's flag)
    force_zeros_for_empty_prompt: bool = True
    meta: dict = field(default_factory=dict)  # sdonnx.json, {} for optimum folders
    checks: dict = field(default_factory=dict)  # file -> "sha256 ok" | "size ok" | ...

    @property
    def has_step_cache(self) -> bool:
        return all(c in self.components for c in STEP_CACHE)

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, and a U-Net that takes `text_embeds` and `time_ids` (SDXL's conditioning)."""
        return self.family in SDXL_FAMILIES

    @property
    def is_inpaint(self) -> bool:
        return is_inpainting_unet(self.unet_in_channels, self.latent_channels)

    def vae(self, which: str | None) -> tuple[str, str, float, float]:
        """(encoder, decoder, scaling, shift) of the `full` or `tiny` VAE (None: the folder's default); the
        U-Net's latents are (VAE latents - shift) * scaling."""
        which = (which or self.defaults.vae).lower()
        if which not in VAES:
            raise SdonnxError(f"unknown vae {which!r}: choose full or tiny")
        if which == "tiny" and self.tiny_scaling is None:
            raise SdonnxError(f"{self.path.name} has no tiny VAE (vae_decoder_tiny/): export it with "
                              "`sdonnx export ... --tiny-vae PATH`")
        return (*VAES[which], *((self.scaling_factor, 0.0) if which == "full" else self.tiny_scaling))

    @property
    def is_lcm(self) -> bool:
        """An LCM-distilled U-Net, which takes the guidance scale as its `timestep_cond` input."""
        return self.guidance_embedding_dim is not None

    def precision(self, component: str) -> str | None:
        return self._entry(component).get("precision")

    def onnxruntime_only(self, component: str) -> bool:
        """Whether the graph uses ONNX Runtime's own operators (its dynamic int8, com.microsoft ops), which
        OpenVINO runs slowly: `--provider openvino` keeps such graphs on ONNX Runtime (sdonnx.json's op counts)."""
        ops = self._entry(component).get("ops", {})
        return any(op in ORT_OPS or op.startswith("com.microsoft.") for op in ops)

    def _entry(self, component: str) -> dict:
        # the same U-Net or text encoder, more outputs
        owner = {"unet_features": "unet", "text_encoder_hidden_states": "text_encoder"}.get(component, component)
        return self.meta.get("components", {}).get(owner, {})


def is_inpainting_unet(in_channels: int, latent_channels: int) -> bool:
    """SD's inpainting U-Net layout: the noisy latents, then the mask and the masked image's latents as inputs."""
    return in_channels == 2 * latent_channels + 1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise SdonnxError(f"cannot read {path}: {err}") from err


def read_model(path: str | Path, verify: bool | None = None, check: bool = True) -> ModelInfo:
    """Read a model folder; verify=None checks sizes and hashes small files, True hashes all, False sizes only.

    check=False skips the file checks (for `sdonnx info`, which reports them itself)."""
    root = Path(path)
    if not root.is_dir():
        raise SdonnxError(f"model folder not found: {root}")
    components = {c: root / c / "model.onnx" for c in COMPONENTS if (root / c / "model.onnx").is_file()}
    missing = [c for c in REQUIRED if c not in components]
    if missing:
        raise SdonnxError(f"{root} is not a model folder: missing {', '.join(c + '/model.onnx' for c in missing)}")
    if all((root / rel).is_file() for rel in STEP_CACHE.values()):
        components.update({c: root / rel for c, rel in STEP_CACHE.items()})
    components.update({c: root / rel for c, rel in HIDDEN_STATES.items() if (root / rel).is_file()})
    meta = _read_json(root / "sdonnx.json")
    checks = verify_files(root, meta, verify) if meta and check else {}
    unet_cfg = _read_json(root / "unet" / "config.json")
    vae_cfg = _read_json(root / "vae_decoder" / "config.json")
    text_cfg = _read_json(root / "text_encoder" / "config.json")
    sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    latent_ch = int(meta.get("latent_channels", vae_cfg.get("latent_channels", 4)))
    in_ch = int(meta.get("unet_in_channels", unet_cfg.get("in_channels", latent_ch)))
    vsf = int(meta.get("vae_scale_factor", 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)))
    prediction = meta.get("prediction_type", sched_cfg.get("prediction_type", "epsilon"))
    sample = int(meta.get("sample_size", unet_cfg.get("sample_size", 64) * vsf))
    family = meta.get("family") or _infer_family(is_inpainting_unet(in_ch, latent_ch), prediction, text_cfg,
                                                 "text_encoder_2" in components)
    if family in SDXL_FAMILIES and "text_encoder_2" not in components:
        raise SdonnxError(f"{root} is not a model folder: an SDXL one ({family}) missing text_encoder_2/model.onnx")
    lcm = meta.get("guidance_embedding_dim", unet_cfg.get("time_cond_proj_dim"))
    tiny = _read_json(root / "vae_decoder_tiny" / "config.json") if "vae_decoder_tiny" in components else None
    return ModelInfo(
        path=root, family=family, components=components, latent_channels=latent_ch, unet_in_channels=in_ch,
        vae_scale_factor=vsf, scaling_factor=float(meta.get("scaling_factor", vae_cfg.get("scaling_factor", 0.18215))),
        prediction_type=prediction, sample_size=sample, defaults=_defaults(meta, sched_cfg, sample, bool(lcm), family),
        scheduler_config={**sched_cfg, "prediction_type": prediction}, static_shape=meta.get("static_shape"),
        guidance_embedding_dim=int(lcm) if lcm else None,
        tiny_scaling=None if tiny is None else (float(tiny.get("scaling_factor") or 1.0),
                                                float(tiny.get("shift_factor") or 0.0)),
        # SDXL's flag; an SD folder's model_index.json is not read (as before SDXL)
        force_zeros_for_empty_prompt=(not family.startswith("sdxl")) or bool(
            _read_json(root / "model_index.json").get("force_zeros_for_empty_prompt", True)),
        meta=meta, checks=checks)


def _infer_family(inpaint: bool, prediction: str, text_cfg: dict, two_encoders: bool = False) -> str:
    """SDXL has a second text encoder; SD 2.x uses OpenCLIP (gelu) and v-prediction; SD 1.x uses OpenAI CLIP
    (quick_gelu)."""
    if two_encoders:
        return "sdxl" + ("-inpaint" if inpaint else "")
    sd2 = prediction == "v_prediction" or text_cfg.get("hidden_act") == "gelu"
    return ("sd2" if sd2 else "sd1") + ("-inpaint" if inpaint else "")


def scheduler_name(sched_cfg: dict) -> str:
    """Our name for the scheduler a folder's scheduler_config.json describes (pndm for an unknown class)."""
    name = SCHEDULER_NAMES.get(sched_cfg.get("_class_name", ""), "pndm")
    if name == "dpmpp_2m" and sched_cfg.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


def _defaults(meta: dict, sched_cfg: dict, sample: int, lcm: bool = False, family: str = "sd1") -> Defaults:
    """sdonnx.json's defaults over the table's row for the model kind (a folder without them: its own scheduler)."""
    row = "lcm" if lcm else "sdxl" if family in SDXL_FAMILIES else "sd"
    base = dataclasses.replace(DEFAULTS[row], width=sample, height=sample)
    if not lcm:
        base = dataclasses.replace(base, scheduler=scheduler_name(sched_cfg))
    given = meta.get("defaults") or {}
    return Defaults(**{k: type(getattr(base, k))(given.get(k, getattr(base, k)))
                       for k in Defaults.__dataclass_fields__})


def file_status(root: Path, rel: str, expect: dict, verify: bool | None = None) -> str:
    """One file against sdonnx.json: 'sha256 ok', 'size ok', 'missing', 'size mismatch' or 'checksum mismatch'."""
    path = root / rel
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if "size" in expect and size != int(expect["size"]):
        return "size mismatch"
    if expect.get("sha256") and (verify is True or (verify is None and size < SHA_LIMIT)):
        return "sha256 ok" if sha256(path) == expect["sha256"] else "checksum mismatch"
    return "size ok"


def verify_files(root: Path, meta: dict, verify: bool | None = None) -> dict:
    """Check each file sdonnx.json lists; a one-line error on the first that is missing or differs."""
    checks = {}
    for rel, expect in sorted((meta.get("files") or {}).items()):
        status = file_status(root, rel, expect, verify)
        if not status.endswith(" ok"):
            raise SdonnxError(f"corrupt model folder {root}: {rel}: {status} (against sdonnx.json)")
        checks[rel] = status
    return checks


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_dir() -> Path:
    """The bundled tiny model (package data sdonnx/assets/tiny)."""
    path = Path(__file__).resolve().parent / "assets" / "tiny"
    if not (path / "unet" / "model.onnx").is_file():
        raise SdonnxError(f"the bundled tiny model is missing ({path}); pass --model DIR / model_dir= "
                          "or create it with `sdonnx export tiny`")
    return path
