"""Model folders for the comparison: one diffusers folder of random weights, and each system's export of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import peers

# every system reads these folders, so all of them run the SAME weights
FOLDERS = {
    "weights": "diffusers",  # the PyTorch weights (diffusers layout), read by diffusers and by both exporters
    "sdonnx-fp32": "sdonnx-fp32",
    "sdonnx-int8": "sdonnx-int8",
    "optimum-fp32": "optimum-fp32",
    "sdonnx-int8-cache": "sdonnx-int8-cache",
    "sdonnx-int8-compact": "sdonnx-int8-compact",
    "sdonnx-int8-qdq": "sdonnx-int8-qdq",
    "sdonnx-int8-ov": "sdonnx-int8-ov",  # the int8 form OpenVINO runs as int8 (--int8-scheme openvino)
    "sdonnx-int8-ov-vae8": "sdonnx-int8-ov-vae8",  # the same with the VAE decoder static int8 too (--int8-vae)
    "sdonnx-fp16": "sdonnx-fp16",  # for GPU providers (benchmarks/gpu.py)
    "openvino-fp32": "openvino-fp32",  # OpenVINO IR (optimum-cli export openvino), in the OpenVINO venv
    "openvino-int8": "openvino-int8",  # its hybrid int8 quantization (openvino_int8.py), made from openvino-fp32
    # IRs exported straight at another weight format (optimum-cli --weight-format): fp16 weights (half the disk of
    # fp32; computed at OpenVINO's default bf16 all the same) and int8 weight compression of every part (what
    # optimum-cli does by default to models past a billion parameters); for SDXL, where NNCF's hybrid
    # quantization of the 2.6e9-parameter U-Net would take hours on two cores
    "openvino-fp16": "openvino-fp16",
    "openvino-int8w": "openvino-int8w",
    "openvino-int8w-tiny": "openvino-int8w-tiny",
    "taesd": "taesd",  # a tiny VAE (diffusers AutoencoderTiny folder, random TAESD): the --weights sd-turbo runs
    "optimum-fp32-tiny": "optimum-fp32-tiny",  # optimum's folder with the tiny VAE's graphs as its VAE
    # the OpenVINO folders with those graphs converted to IR as their VAE (openvino_tiny_vae.py, in the venv)
    "openvino-fp32-tiny": "openvino-fp32-tiny",
    "openvino-int8-tiny": "openvino-int8-tiny",
    # stable-diffusion.cpp's GGUF files (sdcpp_convert.py, in the sdcpp venv), converted from the weights written as
    # one LDM single-file checkpoint (ldm_checkpoint.py, into LDM below)
    "sdcpp-q8_0": "sdcpp-q8_0",
    "sdcpp-f16": "sdcpp-f16",
}
LDM = "ldm"  # the LDM checkpoint's folder in the work folder (ldm/model.safetensors), read by sd.cpp's convert only
# a tiny-VAE folder -> the folders it is made from (the other one's VAE replaced by our export's tiny graphs)
TINY_FROM = {"optimum-fp32-tiny": ("optimum-fp32", "sdonnx-fp32"),
             "openvino-fp32-tiny": ("openvino-fp32", "sdonnx-fp32"),
             "openvino-int8-tiny": ("openvino-int8", "sdonnx-fp32"),
             "openvino-int8w-tiny": ("openvino-int8w", "sdonnx-fp32")}
RECORD = "prepare.json"  # in the work folder: how long each folder took to make, and its process's peak RSS
# the sdonnx command of this interpreter: `sdonnx` on PATH may be absent (a venv not activated) or another install's
SDONNX = [sys.executable, "-m", "sdonnx"]
# sdonnx export options of our folders
EXPORTS = {
    "sdonnx-fp32": ["--precision", "fp32"],
    "sdonnx-int8": ["--precision", "int8"],
    "sdonnx-int8-cache": ["--precision", "int8", "--attention", "mha", "--step-cache"],
    "sdonnx-int8-compact": ["--precision", "int8", "--int8-scheme", "compact", "--attention", "mha", "--step-cache"],
    "sdonnx-int8-qdq": ["--precision", "int8", "--int8-scheme", "qdq", "--attention", "mha", "--step-cache"],
    "sdonnx-int8-ov": ["--precision", "int8", "--int8-scheme", "openvino", "--step-cache"],
    "sdonnx-int8-ov-vae8": ["--precision", "int8", "--int8-scheme", "openvino", "--int8-vae", "--step-cache"],
    "sdonnx-fp16": ["--precision", "fp16"],
}
# what every export of a --weights kind adds: a turbo model's defaults (1 step, no guidance; and its qdq
# calibration on its own unguided few-step runs); `{taesd}` is the tiny VAE's folder, exported beside the full one
# (the tiny weights get one too, at their VAE's 2x downscale, so the tiny-VAE systems can be checked in seconds)
WEIGHT_EXPORTS = {"sd-turbo": ["--defaults", "steps=1,guidance=0,scheduler=euler_a", "--tiny-vae", "{taesd}"],
                  # the tiny VAE's folder is TAESDXL's architecture (TAESD's, with SDXL-latent weights when trained)
                  "sdxl-turbo": ["--defaults", "steps=1,guidance=0,scheduler=euler_a", "--tiny-vae", "{taesd}"],
                  "tiny": ["--tiny-vae", "{taesd}"]}


def write_random_sd15(out: Path, seed: int = 0, preset: str = "sd15") -> Path:
    """SD 1.5's architecture with random weights (the exporter's `random:sd15`, or `random:sd15-lcm`: its LCM-distilled
    layout) written as a diffusers folder."""
    from safetensors.torch import save_file
    from sdonnx.export import folder
    from sdonnx.export.weights import load_checkpoint

    ckpt = load_checkpoint(f"random:{preset}", seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    files = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    configs = {"unet": ckpt.configs.unet, "vae": ckpt.configs.vae, "text_encoder": ckpt.configs.clip}
    for name, stem in files.items():
        (tmp / name).mkdir(parents=True, exist_ok=True)
        folder.write_json(tmp / name / "config.json", configs[name].to_dict())
        # safetensors refuses tensors that share storage; the random state dicts own theirs, contiguous
        save_file({k: v.contiguous() for k, v in ckpt.state_dicts[name].items()}, str(tmp / name / f"{stem}.safetensors"))
        ckpt.state_dicts[name].clear()
    folder.copy_tokenizer(Path(ckpt.tokenizer_dir), tmp)
    folder.write_json(tmp / "scheduler" / "scheduler_config.json", ckpt.scheduler_config)
    index = folder.model_index(ckpt.configs.unet, ckpt.scheduler_config["_class_name"])
    folder.write_json(tmp / "model_index.json", index)
    tmp.rename(out)
    return out


# SDXL base 1.0's architecture (its published config.json numbers); SDXL-Turbo is the same network
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, pad_token_id=1, bos_token_id=0, eos_token_id=2)
SDXL_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280, pad_token_id=1, bos_token_id=0, eos_token_id=2)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def write_random_sdxl(out: Path, seed: int = 0, turbo: bool = False) -> Path:
    """SDXL's architecture with random weights (2.6e9-parameter U-Net, CLIP-L and OpenCLIP bigG text encoders) as a
    diffusers folder, written by diffusers itself one component at a time (about 14 GB of fp32 safetensors);
    `turbo`: SDXL-Turbo's scheduler (Euler ancestral, trailing timesteps)."""
    import gc

    import torch
    import diffusers
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from sdonnx.export import folder
    from sdonnx.export.weights import clip_tokenizer_dir
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    makers = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(vocab_size=49408, **SDXL_CLIP_L)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **SDXL_CLIP_G)),
        "vae": lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, scaling_factor=0.13025),
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET),
    }
    for name, make in makers.items():  # one component in memory at a time
        model = make()
        model.save_pretrained(tmp / name, safe_serialization=True)
        del model
        gc.collect()
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir()).save_pretrained(tmp / "tokenizer")
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir("!")).save_pretrained(tmp / "tokenizer_2")  # OpenCLIP pads with "!"
    cls = EulerAncestralDiscreteScheduler if turbo else EulerDiscreteScheduler
    config = {**SDXL_SCHEDULER, "timestep_spacing": "trailing"} if turbo else SDXL_SCHEDULER
    cls(**config).save_pretrained(tmp / "scheduler")
    folder.write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", cls.__name__], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    tmp.rename(out)
    return out


def write_taesd(out: Path, seed: int = 0, downscale: int = 8) -> Path:
    """TAESD's architecture with random weights as a diffusers AutoencoderTiny folder (what diffusers loads and
    `sdonnx export --tiny-vae` reads), so every system decodes with the same tiny VAE; `downscale`: the full VAE's
    (another number of stages, e.g. 2 for the tiny test weights)."""
    from safetensors.torch import save_file
    from sdonnx.export import folder
    from sdonnx.export.tiny_vae import random_tiny_vae

    model = random_tiny_vae(seed=seed, downscale=downscale)
    tmp = out.with_name(out.name + ".tmp")
    folder.write_json(tmp / "config.json", model.config.to_dict())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "diffusion_pytorch_model.safetensors"))
    tmp.rename(out)
    return out


def vae_downscale(weights: Path) -> int:
    """How much the diffusers folder's VAE scales images down (2 per stage after the first)."""
    config = json.loads((weights / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def write_tiny(out: Path) -> Path:
    """A tiny random diffusers pipeline (tests/tiny_sd.py) to develop the harness on: seconds per round."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_sd import save_pipeline

    save_pipeline(out, "sd1")
    return out


def copy_bundled(out: Path) -> Path:
    """The bundled tiny model's trained PyTorch weights (a diffusers folder) as every system's source."""
    import shutil

    from sdonnx.export.cli import TINY_WEIGHTS

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(TINY_WEIGHTS, tmp)
    tmp.rename(out)
    return out


def _run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Each export in its own process, so its memory is returned before the next one starts; its wall time and
    peak RSS (the process's own, from wait4, which the harness reports as the system's preparation cost)."""
    start = time.perf_counter()
    print(f"  $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    print(f"    done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "command": cmd,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _record(work: Path, name: str, made: dict | None) -> None:
    """Keep what making `name` cost in the work folder's record (folders made before the record existed have none)."""
    if not made:
        return
    path = work / RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[name] = made
    path.write_text(json.dumps(record, indent=1) + "\n")


def preparation(work: Path, names: list[str]) -> dict[str, dict]:
    """What making each of these folders cost, where recorded."""
    path = work / RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    if any(k.startswith("sdcpp-") for k in names):  # the GGUF files are converted from the LDM file
        names = [LDM, *names]
    return {k: record[k] for k in names if k in record}


OPTIMUM_EXPORT = "from optimum.exporters.onnx import main_export; import sys; " \
                 "main_export(sys.argv[1], sys.argv[2], task='text-to-image')"


# the IRs optimum-cli exports straight from the weights, by --weight-format
OPENVINO_FORMATS = {"openvino-fp16": "fp16", "openvino-int8w": "int8"}


def _openvino_formats(work: Path, paths: dict[str, Path]) -> None:
    """The IRs of OPENVINO_FORMATS that `paths` asks for, each exported by the OpenVINO venv's optimum-cli."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders: no hub look-up
    for name, weight_format in OPENVINO_FORMATS.items():
        out = paths.get(name)
        if out is None or (out / "model_index.json").is_file():
            continue
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cli = str(Path(peers.interpreter(name)).with_name("optimum-cli"))
        made = _run([cli, "export", "openvino", "--model", str(paths["weights"]), "--task", "text-to-image",
                     "--weight-format", weight_format, str(tmp)], work / f"export-{name}.log", env)
        tmp.rename(out)
        _record(work, name, made)


def _openvino(work: Path, paths: dict[str, Path]) -> None:
    """The OpenVINO folders, each made by the OpenVINO venv (peers.py) into a temporary folder first."""
    _openvino_formats(work, paths)
    if "openvino-fp32" in paths or "openvino-int8" in paths:
        _openvino_quantized(work, paths)
    _openvino_tiny(work, paths)


def _openvino_quantized(work: Path, paths: dict[str, Path]) -> None:
    """The fp32 IR, and NNCF's hybrid int8 made from it."""
    src = paths["weights"]
    python = peers.interpreter("openvino-fp32")
    fp32 = paths.get("openvino-fp32") or work / FOLDERS["openvino-fp32"]  # the int8 folder is made from it
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders: no hub look-up
    out = paths.get("openvino-int8")
    int8_due = out is not None and not (out / "model_index.json").is_file()
    # the fp32 IR when asked for, or as the int8 folder's source; not again beside an int8 folder already made
    if ("openvino-fp32" in paths or int8_due) and not (fp32 / "model_index.json").is_file():
        tmp = fp32.with_name(fp32.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
        cli = str(Path(python).with_name("optimum-cli"))
        made = _run([cli, "export", "openvino", "--model", str(src), "--task", "text-to-image",
                     "--weight-format", "fp32", str(tmp)], work / "export-openvino-fp32.log", env)
        tmp.rename(fp32)
        _record(work, "openvino-fp32", made)
    if int8_due:
        from sdonnx.export.folder import source_defaults
        from sdonnx.export.quantize import CALIBRATION_PROMPTS  # the prompts our qdq export calibrates on

        prompts = [x for p in CALIBRATION_PROMPTS for x in ("--prompt", p)]
        # at the guidance the weights suggest, as our export calibrates them (the tiny model's 3.0; SD's 7.5 without
        # a suggestion). A turbo model's: still 7.5 and 10 steps, where ours calibrates unguided at 4 steps
        suggested = source_defaults(str(src)).get("guidance")
        guidance = [] if suggested is None else ["--guidance", str(suggested)]
        made = _run([python, str(Path(__file__).with_name("openvino_int8.py")), str(fp32), str(out), *prompts,
                     *guidance], work / "export-openvino-int8.log", env)
        _record(work, "openvino-int8", made and {**made, "after": "openvino-fp32"})


def _openvino_tiny(work: Path, paths: dict[str, Path]) -> None:
    """The IR folders whose VAE is our export's tiny one, converted to IR (openvino_tiny_vae.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("openvino-fp32-tiny", "openvino-int8-tiny", "openvino-int8w-tiny"):
        out = paths.get(name)
        if out is not None and not (out / "model_index.json").is_file():
            base, ours = (paths[k] for k in TINY_FROM[name])
            made = _run([peers.interpreter(name), str(Path(__file__).with_name("openvino_tiny_vae.py")), str(base),
                         str(ours), str(out)],
                        work / f"export-{name}.log", env)
            _record(work, name, made and {**made, "after": base.name})


def _sdcpp(work: Path, paths: dict[str, Path]) -> None:
    """The GGUF folders: the diffusers weights written as one LDM file (by this interpreter: torch), then sd.cpp's
    convert of it at each weight type (by the sdcpp venv); each step timed, with its peak RSS, in prepare.json."""
    wanted = {name: out for name, out in paths.items() if name.startswith("sdcpp-")}
    missing = {name: out for name, out in wanted.items() if not (out / "model.gguf").is_file()}
    if not missing:
        return
    ldm = work / LDM / "model.safetensors"
    if not ldm.is_file():
        ldm.parent.mkdir(exist_ok=True)
        tool = str(Path(__file__).with_name("ldm_checkpoint.py"))
        made = _run([sys.executable, tool, str(paths["weights"]), str(ldm)], work / "export-ldm.log")
        _record(work, LDM, made)
    python = peers.interpreter(next(iter(missing)))
    for name, out in missing.items():
        made = _run([python, str(Path(__file__).with_name("sdcpp_convert.py")), str(ldm), str(out),
                     name.removeprefix("sdcpp-")], work / f"export-{name}.log")
        _record(work, name, {**made, "after": LDM})


def prepare(work: Path, weights: str, needed: list[str] | None = None) -> dict[str, Path]:
    """Create whatever of the `needed` folders is missing (default: all that the running interpreter makes, not
    those of the peers in their own venvs); returns name -> folder."""
    work.mkdir(parents=True, exist_ok=True)
    if needed is not None:  # a tiny-VAE folder is made from two others (only when it is still to be made: the
        # fp32 source of an SDXL one is 13 GB of disk and minutes of export)
        needed = [*needed, *(k for n in needed if not (work / FOLDERS.get(n, n)).is_dir()
                             for k in TINY_FROM.get(n, ()))]
    # default: every folder of our venv's systems, but not the tiny-VAE ones
    wanted = ((lambda k: k in needed) if needed is not None else
              (lambda k: peers.venv_of(k) is None and k != "taesd" and k not in TINY_FROM))
    paths = {k: work / v for k, v in FOLDERS.items() if wanted(k) or k == "weights"}
    src, taesd = paths["weights"], work / FOLDERS["taesd"]
    if not (src / "model_index.json").is_file():
        print(f"writing {weights} weights -> {src}", file=sys.stderr, flush=True)
        {"sd15": write_random_sd15, "sd15-lcm": lambda o: write_random_sd15(o, preset="sd15-lcm"),
         "sd-turbo": lambda o: write_random_sd15(o, preset="sd-turbo"),
         "sdxl": write_random_sdxl, "sdxl-turbo": lambda o: write_random_sdxl(o, turbo=True),
         "bundled": copy_bundled, "tiny": write_tiny}[weights](src)
    extra = [x.format(taesd=taesd) for x in WEIGHT_EXPORTS.get(weights, [])]
    if "{taesd}" in WEIGHT_EXPORTS.get(weights, []) and not (taesd / "config.json").is_file():
        write_taesd(taesd, downscale=vae_downscale(src))
    for name, options in EXPORTS.items():
        out = paths.get(name)
        if out is not None and not _exported(out, extra):
            _record(work, name, _run([*SDONNX, "export", str(src), str(out), *options, *extra, "--force", "--quiet"],
                                     work / f"export-{name.removeprefix('sdonnx-')}.log"))
    out = paths.get("optimum-fp32")
    if out is not None and not (out / "model_index.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        made = _run([sys.executable, "-c", OPTIMUM_EXPORT, str(src), str(tmp)], work / "export-optimum.log")
        tmp.rename(out)
        _record(work, "optimum-fp32", made)
    out = paths.get("optimum-fp32-tiny")
    if out is not None and not (out / "model_index.json").is_file():
        with_tiny_vae(paths["optimum-fp32"], paths["sdonnx-fp32"], out)
    _openvino(work, paths)
    _sdcpp(work, paths)
    return paths


def _exported(out: Path, extra: list[str]) -> bool:
    """Our export is there, with the tiny VAE the weights' options ask for (an earlier export may lack it)."""
    tiny = "--tiny-vae" in extra
    return (out / "sdonnx.json").is_file() and (not tiny or (out / "vae_decoder_tiny" / "model.onnx").is_file())


def with_tiny_vae(optimum: Path, ours: Path, out: Path) -> Path:
    """optimum's folder with our export's tiny VAE graphs as its vae_decoder/vae_encoder (their config.json says
    scaling factor 1, so optimum's pipeline scales as diffusers does with pipe.vae = AutoencoderTiny); the other
    files are hard links, not copies."""
    import os
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(optimum, tmp, copy_function=os.link)
    for part in ("vae_decoder", "vae_encoder"):
        shutil.rmtree(tmp / part)
        shutil.copytree(ours / f"{part}_tiny", tmp / part)
    tmp.rename(out)
    return out


def folder_sizes(paths: dict[str, Path]) -> dict[str, float]:
    """MiB on disk per folder."""
    return {k: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1) for k, p in paths.items()}


if __name__ == "__main__":
    print(json.dumps({k: str(v) for k, v in prepare(Path(sys.argv[1]), sys.argv[2], sys.argv[3:] or None).items()}))
