"""The model folder: written atomically, readable by our runtime and by optimum's ORTStableDiffusionPipeline."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from sdonnx import schedulers
from sdonnx.model import DEFAULTS, VAES, sha256
from sdonnx.text_encoding import FINAL_NORM_FILE

from .models.config import PRESET_DEFAULTS, ModelConfigs, TinyVAEConfig, UNetConfig

FORMAT = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
SUGGESTIBLE = ("steps", "guidance", "scheduler")  # what a source folder's sdonnx_defaults.json may set
DEFAULTS_FILE = "sdonnx_defaults.json"


class FolderExistsError(ValueError):
    """OUT_DIR exists and --force was not given."""


@contextlib.contextmanager
def atomic_folder(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; it becomes `out_dir` only if the block completes.

    Any exception, KeyboardInterrupt included, removes it, so no partial model folder is ever left; what a
    killed export (SIGKILL, power loss) leaves, the next export to `out_dir` removes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FolderExistsError(f"{out_dir} already exists (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out_dir, os.getpid()), dir=out_dir.parent))
    try:
        yield tmp
        _share(tmp)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "_"


def partial_prefix(out_dir: Path, pid: int) -> str:
    """Name start of the hidden folder process `pid` of this host exports `out_dir` into.

    The host is named too: on a shared disk, or in containers with their own PID numbering, a PID means
    nothing on another host."""
    return _partials(out_dir) + f"pid{pid}-{_host()}-"


def _partials(out_dir: Path) -> str:
    return f".{Path(out_dir).name}.partial-"


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove the partial folders of `out_dir` whose exporting process (on this host) is gone, and the replaced
    folders (`.OUT.old-PID`, --force) a killed export was still deleting; returns them.

    Folders of live exports, of other hosts and of unknown owners (no PID in the name) stay."""
    partial = re.compile(re.escape(_partials(out_dir)) + r"pid(\d+)-" + re.escape(_host()) + "-")
    replaced = re.compile(re.escape(f".{Path(out_dir).name}.old-") + r"(\d+)$")
    stale = []
    for path in Path(out_dir).parent.iterdir():
        found = partial.match(path.name) or replaced.match(path.name)
        if found and path.is_dir() and not _alive(int(found[1])):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there; without a safe probe, assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        pass
    return True


def _share(root: Path) -> None:
    """mkdtemp (and onnx's external data writer) create owner-only entries; give the folder the umask's modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _replace(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`; an old `out_dir` (--force) is moved aside first and deleted after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    try:
        new.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # SIGTERM or Ctrl-C mid-way: finish it (a second SIGTERM is ignored), then stop
            shutil.rmtree(old, ignore_errors=True)
            raise


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _finite(value):
    """JSON has no inf/nan: write them as null (e.g. the PSNR of an exact match)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_configs(root: Path, configs: ModelConfigs) -> None:
    """config.json per component, in the diffusers/transformers format optimum reads."""
    write_json(root / "text_encoder" / "config.json", configs.clip.to_dict())
    if configs.clip2 is not None:
        write_json(root / "text_encoder_2" / "config.json", configs.clip2.to_dict(projection=True))
    write_json(root / "unet" / "config.json", configs.unet.to_dict())
    for part in ("vae_encoder", "vae_decoder"):
        write_json(root / part / "config.json", configs.vae.to_dict())


def copy_tokenizer(src: Path, root: Path, name: str = "tokenizer") -> Path:
    """Copy the CLIP tokenizer files into root/name; vocab.json and merges.txt are required."""
    dst = root / name
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
        elif name in ("vocab.json", "merges.txt"):
            raise FileNotFoundError(f"tokenizer folder {src} has no {name}")
    return dst


def pad_token_id(tokenizer_dir: Path) -> int:
    """Id of the pad token named by tokenizer_config.json (SD 1.x: the end token, SD 2.x: '!' = 0)."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    pad = "<|endoftext|>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = tokenizer_dir / name
        if path.is_file():
            given = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if given:
                pad = given["content"] if isinstance(given, dict) else given
                break
    if pad not in vocab:
        raise ValueError(f"pad token {pad!r} is not in {tokenizer_dir / 'vocab.json'}")
    return int(vocab[pad])


def model_index(unet: UNetConfig, scheduler_class: str) -> dict:
    """diffusers' model_index.json: which library class loads each sub-folder (optimum reads it).

    The pipeline class follows the U-Net's kind: diffusers runs an LCM U-Net (guidance as an input) with its LCM
    pipeline, and has no LCM inpainting pipeline."""
    if unet.is_sdxl:
        return sdxl_model_index(unet, scheduler_class)
    pipeline = "StableDiffusionPipeline"
    if unet.is_inpaint:
        pipeline = "StableDiffusionInpaintPipeline"
    elif unet.is_lcm:
        pipeline = "LatentConsistencyModelPipeline"
    return {
        "_class_name": pipeline, "_diffusers_version": "0.35.2",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def sdxl_model_index(unet: UNetConfig, scheduler_class: str) -> dict:
    """model_index.json of an SDXL folder (two text encoders; an empty negative prompt means zero embeddings, as
    in SDXL base's own index). diffusers has no SDXL LCM pipeline: an LCM U-Net runs in the plain one."""
    return {
        "_class_name": "StableDiffusionXLInpaintPipeline" if unet.is_inpaint else "StableDiffusionXLPipeline",
        "_diffusers_version": "0.35.2", "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None], "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


def file_table(root: Path) -> dict:
    """{relative path: {"sha256", "size"}} for every file under root except sdonnx.json itself."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != "sdonnx.json":
            table[rel] = {"sha256": sha256(path), "size": path.stat().st_size}
    return table


def source_defaults(source: str) -> dict:
    """Generation defaults a source folder suggests in its sdonnx_defaults.json (the tiny trainer writes one)."""
    path = Path(source) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    suggested = json.loads(path.read_text(encoding="utf-8"))
    return {k: suggested[k] for k in SUGGESTIBLE if k in suggested}


DEFAULT_RULES = {  # export --defaults: key -> (convert, accept, what is accepted)
    "steps": (int, lambda v: v >= 1, "a whole number >= 1"),
    "guidance": (float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
    "scheduler": (str.lower, lambda v: v in schedulers.NAMES, "one of " + ", ".join(schedulers.NAMES)),
    "vae": (str.lower, lambda v: v in VAES, " or ".join(VAES)),
}


def parse_defaults(text: str) -> dict:
    """`steps=1,guidance=0,scheduler=euler_a,vae=tiny` (export --defaults) -> checked values; a one-line error."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not value:
            raise ValueError(f"--defaults: {item!r} is not KEY=VALUE")
        if key not in DEFAULT_RULES:
            raise ValueError(f"unknown default {key!r} in --defaults; set {', '.join(DEFAULT_RULES)}")
        convert, accept, allowed = DEFAULT_RULES[key]
        try:
            out[key] = convert(value)
        except ValueError:
            out[key] = None
        if out[key] is None or not accept(out[key]):
            raise ValueError(f"--defaults: {key} must be {allowed}, got {key}={value}")
    return out


def generation_defaults(source: str, lcm: bool, overrides: dict | None = None, sdxl: bool = False) -> dict:
    """Steps, guidance and scheduler for sdonnx.json: the defaults table's row for the model (a random preset's own,
    else the U-Net kind's), overridden by what the source folder suggests, then by `overrides` (export --defaults)."""
    preset = source[len("random:"):] if source.startswith("random:") else None
    kind = "lcm" if lcm else "sdxl" if sdxl else "sd"
    row = DEFAULTS[PRESET_DEFAULTS.get(preset, kind)]
    return {"steps": row.steps, "guidance": row.guidance, "scheduler": row.scheduler, **source_defaults(source),
            **(overrides or {})}


def write_tiny_vae(root: Path, config: TinyVAEConfig, source: str) -> dict:
    """The tiny VAE graphs' config.json (AutoencoderTiny's, for optimum); returns sdonnx.json's tiny_vae entry.

    Its graphs work in its own latent scale, like the full VAE's: decode(latents / scaling_factor + shift_factor),
    and encode gives latent_sample, which (latent_sample - shift_factor) * scaling_factor brings to the diffusion
    model's latents. For TAESD/TAESDXL the factors are 1 and 0.
    """
    for part in ("vae_encoder_tiny", "vae_decoder_tiny"):
        write_json(root / part / "config.json", config.to_dict())
    return {"source": str(source), "encoder": "vae_encoder_tiny/model.onnx", "decoder": "vae_decoder_tiny/model.onnx",
            "latent_channels": config.latent_channels, "vae_scale_factor": config.downscale,
            "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor}


def write_final_norm(folder: Path, norm: dict) -> Path:
    """text_encoder/final_layer_norm.npz: what the runtime puts a clip-skip layer's output through."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FINAL_NORM_FILE
    with open(path, "wb") as f:
        np.savez(f, weight=np.asarray(norm["weight"], np.float32), bias=np.asarray(norm["bias"], np.float32),
                 eps=np.float32(norm["eps"]))
    return path


def write_metadata(root: Path, *, version: str, source: str, family: str, prediction_type: str,
                   configs: ModelConfigs, scheduler_config: dict, tokenizer_dir: Path, components: dict,
                   static: dict | None, report: dict, defaults: dict, step_cache: dict | None = None,
                   tiny_vae: dict | None = None, final_norm: dict | None = None, added_tokens: dict | None = None,
                   embeddings: list | None = None, stream: dict | None = None,
                   tokenizer_2_dir: Path | None = None) -> dict:
    """Write tokenizer/, scheduler/, config.json files, model_index.json and, last, sdonnx.json.

    `defaults`: steps, guidance and scheduler (generation_defaults); the image size is the model's.
    `tiny_vae`: write_tiny_vae's entry, when the folder holds one.
    `final_norm`: the text encoder's final LayerNorm (weight, bias, eps) for clip skip.
    `added_tokens` ({token: id}) and `embeddings` (their records): textual-inversion tokens (embeddings.py).
    `stream`: the streamed U-Net's entry (export --stream): its part files in running order, their inputs and outputs.
    `tokenizer_2_dir`: SDXL's second tokenizer (required for SDXL).
    """
    from .embeddings import write_tokens

    copy_tokenizer(tokenizer_dir, root)
    if configs.is_sdxl:
        if tokenizer_2_dir is None:
            raise ValueError("an SDXL checkpoint needs its second tokenizer (tokenizer_2)")
        copy_tokenizer(tokenizer_2_dir, root, "tokenizer_2")
    if added_tokens:
        write_tokens(root / "tokenizer", added_tokens)
    if final_norm is not None:
        write_final_norm(root / "text_encoder", final_norm)
    sched = dict(scheduler_config, prediction_type=prediction_type)
    write_json(root / "scheduler" / "scheduler_config.json", sched)
    write_configs(root, configs)
    write_json(root / "model_index.json", model_index(configs.unet, sched.get("_class_name", "PNDMScheduler")))
    scale = configs.vae.downscale
    pixels = (configs.unet.sample_size or configs.vae.sample_size // scale) * scale
    meta = {
        "format": FORMAT, "exporter": f"sdonnx {version}", "source": str(source), "family": family,
        "prediction_type": prediction_type, "latent_channels": configs.vae.latent_channels,
        "unet_in_channels": configs.unet.in_channels, "vae_scale_factor": scale,
        "scaling_factor": configs.vae.scaling_factor, "sample_size": pixels,
        "tokenizer": {"pad_token_id": pad_token_id(root / "tokenizer"), "max_length": 77},
        **({"tokenizer_2": {"pad_token_id": pad_token_id(root / "tokenizer_2"), "max_length": 77}}
           if configs.is_sdxl else {}),
        "files": file_table(root), "components": components,
        "guidance_embedding_dim": configs.unet.time_cond_proj_dim,
        "defaults": dict(defaults, width=(static or {}).get("width", pixels),
                         height=(static or {}).get("height", pixels)),
        "static_shape": static,
        "step_cache": step_cache,
        "tiny_vae": tiny_vae,
        "embeddings": embeddings or [],
        "stream": stream,
        "export_report": report,
    }
    write_json(root / "sdonnx.json", meta)
    return meta
