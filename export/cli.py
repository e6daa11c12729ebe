"""`sdonnx export SOURCE [OUT_DIR]`: checkpoint -> verified, optimized, quantized ONNX model folder."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import math
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..system import peak_rss_mb
from . import embeddings as ti, folder, lora, onnx as graphs, optimize as opt, quantize, stream, tiny_vae, verify

STEPS_PER_COMPONENT = 4  # export, optimize, quantize, verify
DISK_MARGIN = 2 * 2**30  # free disk a saved optimization must leave beside the second copy of the weights
STREAM_PART_MB = stream.PART_BUDGET / 2**20


@dataclass
class ExportJob:
    """One export run: what to build and the numbers collected on the way."""

    source: str
    out_dir: Path
    precision: str = "fp32"
    force: bool = False
    static: graphs.Static | None = None
    seed: int = 0
    prediction_type: str | None = None
    int8_scheme: str = "dynamic"
    step_cache: int | None = None  # shallow-branch depth of the DeepCache graphs; None: not exported
    attention: str = "standard"  # "mha": U-Net attention as ORT's MultiHeadAttention (flash attention on CPU)
    loras: tuple = ()  # (path, scale) of LoRA files fused into the weights before export, in order
    defaults: dict = field(default_factory=dict)  # generation defaults given with --defaults (folder.parse_defaults)
    tiny_vae: str | None = None  # --tiny-vae: a TAESD folder or file, or random; None: not exported
    embeddings: tuple = ()  # (path, token or None) of textual-inversion files added to the text encoder
    stream: bool = False  # --stream: also the U-Net and VAE decoder as chains of part graphs, for --low-memory
    stream_part_mb: float = STREAM_PART_MB  # weights a part may reach by merging whole layers
    int8_vae: bool = False  # --int8-vae: the full VAE decoder static int8 too (faster, measurably less exact)
    timings: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)  # the process's peak RSS (MB) when each step ended
    components: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def default_out_dir(source: str, precision: str) -> Path:
    """models/<name>-<precision>: name from a folder/file name, or `random-sd15` for `random:sd15`."""
    name = source.replace(":", "-") if source.startswith("random:") else Path(source.rstrip("/\\")).stem or "model"
    return Path("models") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{precision}"


class Progress:
    """A tqdm bar over named steps that also times each step."""

    def __init__(self, total: int, timings: dict, enabled: bool = True, peaks: dict | None = None):
        self.bar = tqdm(total=total, unit="step", disable=not enabled, leave=False,
                        bar_format="{desc:<28} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
        self.timings, self.peaks = timings, peaks

    def step(self, name: str, fn, *args, **kwargs):
        self.bar.set_description_str(name)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 2)
        if self.peaks is not None:  # the peak is monotonic: the step that raised it is where memory went
            self.peaks[name] = round(peak_rss_mb())
        self.bar.update()
        return result

    def close(self) -> None:
        self.bar.close()


def _inputs(job: ExportJob, component: str, models: dict, configs, batch: int, hw: tuple, seed: int,
            text_length: int = graphs.TEXT_LENGTH) -> dict:
    if component in graphs.TINY_VAE_COMPONENTS:
        return graphs.tiny_vae_inputs(component, models["tiny_vae"].config, batch, hw, seed)
    if component == "unet_shallow":
        unet_inputs = graphs.sample_inputs("unet", configs, batch, hw, seed, text_length)
        return graphs.with_deep_features(unet_inputs, models["unet"], job.step_cache)
    return graphs.sample_inputs(component, configs, batch, hw, seed, text_length)


def _trace_and_reference(job: ExportJob, component: str, models: dict, configs, path: Path):
    """Export one component and run PyTorch on the verification inputs while the module is alive.

    Returns (inputs, PyTorch's outputs) as NumPy arrays."""
    module = graphs.wrap(component, models, job.step_cache)
    signature = "unet_features" if component == "unet" and job.step_cache is not None else component
    batch, hw = graphs.trace_shape(component, configs, job.static)
    graphs.export_component(signature, module, _inputs(job, component, models, configs, batch, hw, job.seed),
                            path, static=job.static is not None)
    text_length = graphs.TEXT_LENGTH
    if job.static is None:  # check the dynamic axes too: another batch, a non-square size, a two-chunk prompt
        m = graphs.latent_multiple(configs)
        batch, hw, text_length = 2, (3 * m, 2 * m), 2 * graphs.TEXT_LENGTH
    inputs = _inputs(job, component, models, configs, batch, hw, job.seed + 1, text_length)
    with torch.no_grad():
        out = module(**inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return {k: v.numpy() for k, v in inputs.items()}, [o.numpy() for o in outs]


OWNERS = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "unet_shallow": "unet",
          "vae_encoder": "vae", "vae_decoder": "vae", "vae_encoder_tiny": "tiny_vae", "vae_decoder_tiny": "tiny_vae"}


def _free(models: dict, component: str, components: tuple[str, ...]) -> None:
    """Drop a PyTorch model once its last graph is exported, so a full SD 1.5 fits in memory."""
    owner = OWNERS.get(component)
    later = components[components.index(component) + 1:]
    if owner and all(OWNERS.get(c) != owner for c in later):
        models.pop(owner, None)
        gc.collect()


TINY_WEIGHTS = Path(__file__).parent / "tiny" / "weights"


def resolve_source(source: str) -> str:
    """`tiny` names the bundled model's trained weights (a diffusers folder); other sources pass through."""
    if source != "tiny":
        return source
    if not (TINY_WEIGHTS / "model_index.json").is_file():
        raise FileNotFoundError(f"the bundled tiny model's weights are absent ({TINY_WEIGHTS}); "
                                "train them with `python -m sdonnx.export.tiny.train`")
    return str(TINY_WEIGHTS)


def run_export(job: ExportJob, progress: bool = True) -> dict:
    """Do the whole export into a temporary folder that becomes job.out_dir on success; returns sdonnx.json."""
    from .weights import build_models, load_checkpoint, sniff_sdxl

    start = time.perf_counter()
    quantize.check_options(job.precision, job.int8_scheme)  # bad options fail before any work
    if job.int8_vae and job.precision != "int8":
        raise ValueError(f"--int8-vae needs --precision int8 (got {job.precision})")
    calibrate = quantize.kind_of("unet", job.precision, job.int8_scheme) in ("qdq", "openvino") or job.int8_vae
    _check_attention(job)
    if job.stream and job.static is not None:
        raise ValueError("--stream runs a guided batch in halves through each part: export it without --static")
    if job.stream_part_mb < 0:
        raise ValueError(f"--stream-part-mb must be >= 0, got {job.stream_part_mb:g}")
    adapters = [(path, scale, lora.read_lora(path)) for path, scale in job.loras]  # bad files fail before any work
    embeds = [ti.read_embedding(path, token) for path, token in job.embeddings]
    ti.check_unique(embeds)
    if job.defaults.get("vae") == "tiny" and not job.tiny_vae:
        raise ValueError("--defaults vae=tiny needs a tiny VAE: add --tiny-vae PATH|random")
    tiny = tiny_vae.read_tiny_vae(job.tiny_vae, seed=job.seed) if job.tiny_vae else None  # bad files: before any work
    if (job.stream or job.embeddings) and sniff_sdxl(resolve_source(job.source)):
        _check_sdxl(job, sdxl=True)  # before a multi-GB checkpoint loads only to be refused
    extra = graphs.TINY_VAE_COMPONENTS if tiny is not None else ()
    steps = 2 + calibrate + job.stream
    bar = Progress(steps + STEPS_PER_COMPONENT * (len(graphs.COMPONENTS) + len(extra)), job.timings, progress,
                   job.peaks)
    try:
        with folder.atomic_folder(job.out_dir, job.force) as root:
            ckpt = bar.step("load", load_checkpoint, resolve_source(job.source), seed=job.seed,
                            prediction_type=job.prediction_type)
            parts = graphs.components(ckpt.configs, job.step_cache is not None) + extra
            bar.bar.total = steps + STEPS_PER_COMPONENT * len(parts)  # the checkpoint tells SDXL's extra graph
            _check_sdxl(job, ckpt.configs.is_sdxl)  # a source whose family the sniff could not tell
            # a tiny VAE of another model family's latents fails here, in one line, before any export
            tiny_model = tiny_vae.build_tiny_vae(tiny, ckpt.configs.vae) if tiny is not None else None
            # what the folder will generate with: sdonnx.json's defaults, and how calibration samples
            defaults = folder.generation_defaults(resolve_source(job.source), ckpt.configs.unet.is_lcm, job.defaults,
                                                  sdxl=ckpt.configs.is_sdxl)
            if job.static is not None and (ckpt.configs.unet.is_lcm or defaults["guidance"] <= 1.0):
                job.static = dataclasses.replace(job.static, batch=1)  # LCM, turbo: no [uncond, cond] batch
            models = bar.step("build models", build_models, ckpt)
            if tiny_model is not None:
                models["tiny_vae"] = tiny_model
            fused = [{"file": path.name, "scale": scale, "layers": lora.fuse(models, pairs, scale, path.name)}
                     for path, scale, pairs in adapters]
            del adapters  # the models hold the fused weights now
            added = ti.add_to_model(models["text_encoder"], embeds, Path(ckpt.tokenizer_dir)) if embeds else {}
            if added:  # config.json and the check inputs see the grown vocabulary
                rows = models["text_encoder"].text_model.embeddings.token_embedding.num_embeddings
                clip = dataclasses.replace(ckpt.configs.clip, vocab_size=rows)
                ckpt.configs = dataclasses.replace(ckpt.configs, clip=clip)
            norm = models["text_encoder"].text_model.final_layer_norm
            final_norm = {"weight": norm.weight.detach().numpy().copy(), "bias": norm.bias.detach().numpy().copy(),
                          "eps": norm.eps}
            if job.attention == "mha":
                graphs.use_fused_attention(models["unet"])
            # the VAE decoder's upsamplers always double the size exactly: four 2x2 phase convolutions compute the
            # wide ones (the U-Net's may end at an odd size, where the last row's taps differ: they stay as they are)
            graphs.use_phase_upsampling(models["vae"])
            if job.static is not None:  # its sides divide by the latent multiple: every upsampling doubles exactly
                graphs.use_phase_upsampling(models["unet"])
            graphs.use_split_geglu(models["unet"])
            ckpt = _drop_state_dicts(ckpt)
            finals: list = []  # each calibration run's final latents: the full VAE decoder's calibration
            feeds = bar.step("calibration data", _calibration, models, ckpt, job, defaults, finals) if calibrate else None
            work = root / "_work"
            checks = {}
            for c in parts:
                checks[c] = bar.step(f"export {c}", _trace_and_reference, job, c, models, ckpt.configs,
                                     work / c / "raw" / "model.onnx")
                _free(models, c, parts)
            for c in parts:
                bar.step(f"optimize {c}", _optimize, job, c, work / c)
            calibration = {"unet": feeds}  # static int8's inputs of each graph it quantizes
            if feeds is not None and tiny_model is not None:
                t = tiny_model.config
                calibration[quantize.TINY_DECODER] = quantize.decoder_feeds(
                    feeds, ckpt.configs.vae.latent_channels, t.scaling_factor, t.shift_factor)
            if job.int8_vae:
                calibration[quantize.VAE_DECODER] = quantize.final_decoder_feeds(finals,
                                                                                 ckpt.configs.vae.scaling_factor)
            for c in parts:
                scheme = bar.step(f"quantize {c}", quantize.apply, c, job.precision, ckpt.family,
                                  work / c / "opt" / "model.onnx", root / c / "model.onnx", job.int8_scheme,
                                  calibration.get(c), job.int8_vae)
                job.components[c] = {"precision": scheme.precision, "quantization": quantize.notes(c, scheme)}
                _remove(work / c)  # its float copy: the disk holds one large graph's twice at most
            _remove(work)
            if not ckpt.configs.is_sdxl:  # optimum's SD text encoder has two outputs; its SDXL ones all (as ours)
                graphs.split_hidden_states(root / "text_encoder" / "model.onnx")
            step_cache = None
            if job.step_cache is not None:
                _, features = graphs.split_features(root / "unet" / "model.onnx")
                step_cache = _step_cache_report(job, root, features, *checks["unet"])
            for c in parts:
                inputs, outputs = checks[c]
                bar.step(f"verify {c}", _verify, job, c, root / c / "model.onnx", inputs, outputs[0])
            streamed = (bar.step("stream", _stream, root, checks, int(job.stream_part_mb * 2**20))
                        if job.stream else None)
            job.timings["total"] = round(time.perf_counter() - start, 2)
            report = {"timings_s": job.timings, "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_after": job.peaks,
                      "warnings": job.warnings,
                      "precision": job.precision, "torch": torch.__version__, "opset": graphs.OPSET,
                      "attention": job.attention, "loras": fused}
            tiny_entry = None if tiny_model is None else folder.write_tiny_vae(root, tiny_model.config, job.tiny_vae)
            return folder.write_metadata(
                root, version=__version__, source=job.source,
                family="tiny" if job.source == "tiny" else ckpt.family,
                prediction_type=ckpt.prediction_type, configs=ckpt.configs,
                scheduler_config=ckpt.scheduler_config, tokenizer_dir=Path(ckpt.tokenizer_dir),
                components=job.components, report=report, step_cache=step_cache,
                defaults=defaults, tiny_vae=tiny_entry, final_norm=final_norm, added_tokens=added,
                embeddings=[e.record() for e in embeds],
                stream=streamed, tokenizer_2_dir=_tokenizer_2(ckpt),
                static=None if job.static is None else
                {"batch": job.static.batch, "height": job.static.height, "width": job.static.width})
    finally:
        bar.close()


def _tokenizer_2(ckpt) -> Path | None:
    path = getattr(ckpt, "tokenizer_2_dir", None)
    return None if path is None else Path(path)


def _check_sdxl(job: ExportJob, sdxl: bool) -> None:
    """What an SDXL export cannot do yet: one line each, before any work."""
    if not sdxl:
        return
    if job.embeddings:
        raise ValueError("--embedding is not supported for SDXL yet (its embeddings hold a vector per text encoder)")
    if job.stream:
        raise ValueError("--stream is not supported for SDXL yet: export it without --stream")


def _check_attention(job: ExportJob) -> None:
    if job.attention not in graphs.ATTENTION:
        raise ValueError(f"unknown attention {job.attention!r}; choose one of {', '.join(graphs.ATTENTION)}")
    if job.attention == "mha" and job.precision == "int8" and job.int8_scheme == "openvino":
        raise ValueError("--int8-scheme openvino needs --attention standard: OpenVINO does not run ONNX Runtime's "
                         "MultiHeadAttention well")
    if job.attention == "mha" and job.precision == "fp16":
        raise ValueError("--attention mha is for the CPU provider, whose MultiHeadAttention kernel is fp32 only: "
                         "use it with --precision fp32 or int8")


def _drop_state_dicts(ckpt):
    """The modules own copies of the weights now; keeping the loaded tensors would double the memory."""
    try:
        ckpt.state_dicts.clear()
    except AttributeError:
        pass
    gc.collect()
    return ckpt


FEW_STEPS = 4  # a model whose defaults take at most this many steps is a distilled one (LCM, turbo)


def _calibration(models: dict, ckpt, job: ExportJob, defaults: dict, finals: list | None = None) -> list[dict]:
    """U-Net feeds for static int8, at up to 32x32 latents (ranges barely depend on size; memory does) or the
    --static size, sampled as the folder's defaults will say: guided as they say (the tiny model: 3.0; SD: 7.5;
    LCM: 8.5; turbo: none, batch 1), and a distilled model with its own sampler at FEW_STEPS steps (10 DDIM steps
    otherwise)."""
    m = graphs.latent_multiple(ckpt.configs)
    side = max(m, min(32, ckpt.configs.unet.sample_size or 32) // m * m)
    hw = (side, side) if job.static is None else graphs.trace_shape("unet", ckpt.configs, job.static)[1]
    few = defaults["steps"] <= FEW_STEPS
    sched = dict(ckpt.scheduler_config, prediction_type=ckpt.prediction_type)
    # SDXL's time ids: the size the folder generates at by default (diffusers' default ids), not the smaller
    # calibration latents'
    image_hw = (defaults.get("height"), defaults.get("width"))
    pixels = (ckpt.configs.unet.sample_size or 0) * ckpt.configs.vae.downscale
    image_hw = tuple(v or pixels for v in image_hw) if pixels else None
    return quantize.calibration_feeds(models, ckpt.configs, Path(ckpt.tokenizer_dir), sched,
                                      guidance=defaults["guidance"], latent_hw=hw,
                                      sampler=defaults["scheduler"] if few else None, steps=FEW_STEPS if few else 10,
                                      tokenizer_2_dir=_tokenizer_2(ckpt), image_hw=image_hw, finals=finals)


def _optimize(job: ExportJob, component: str, work: Path) -> None:
    """ORT's basic optimizations, saved; a graph whose weights would not fit the disk twice keeps its traced form
    (ONNX Runtime applies the same optimizations when it loads the graph: only that work is not saved)."""
    data = work / "raw" / graphs.EXTERNAL_DATA_NAME
    need = data.stat().st_size if data.exists() else 0
    free = shutil.disk_usage(work).free if need else 0
    if need and free < need + DISK_MARGIN:
        (work / "raw").rename(work / "opt")
        short = math.ceil((need + DISK_MARGIN - free) / 2**30 * 10) / 10  # rounded up: at least this much
        job.warnings.append(f"{component}: offline graph optimization skipped: a second copy of its "
                            f"{need / 2**30:.1f} GiB of weights and a {DISK_MARGIN / 2**30:.0f} GiB margin need "
                            f"{short:.1f} GiB more free disk than the {free / 2**30:.1f} GiB free")
        return
    opt.optimize(work / "raw" / "model.onnx", work / "opt" / "model.onnx")
    _remove(work / "raw")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _verify(job: ExportJob, component: str, path: Path, inputs: dict[str, np.ndarray], reference: np.ndarray):
    info = job.components[component]
    result, warning = verify.verify(component, path, inputs, reference, info["precision"])
    info["verify"] = result
    info["ops"] = opt.op_counts(path)
    if warning:
        job.warnings.append(warning)
        tqdm.write(f"warning: {warning}")


def _step_cache_report(job: ExportJob, root: Path, features: Path, inputs: dict, outputs: list) -> dict:
    """sdonnx.json's step_cache entry: the graphs, the depth, and the deep features checked against PyTorch."""
    result = verify.compare(outputs[1], verify.run_graph(features, inputs)[1])
    precision = job.components["unet"]["precision"]
    if not result["psnr"] >= verify.MIN_PSNR[precision]:
        job.warnings.append(f"unet deep features ({precision}) PSNR {result['psnr']} dB vs PyTorch is below "
                            f"{verify.MIN_PSNR[precision]} dB")
    return {"method": "DeepCache (Ma et al. 2023): deep features of a full step reused by the shallow graph",
            "depth": job.step_cache, "full_graph": f"unet/{features.name}", "shallow_graph": "unet_shallow/model.onnx",
            "deep_features_verify": result}


def _stream(root: Path, checks: dict, budget: int) -> dict:
    """Write <component>_stream/ from each streamed component's final graph and check the chained parts against
    the whole graph on its verification inputs; the text encoder's weights move to an external data file. Returns
    sdonnx.json's stream entry."""
    entry = {"method": stream.METHOD, "part_mb": round(budget / 2**20, 1), "components": {}}
    stream.externalize(root / "text_encoder" / "model.onnx")  # the one whole graph low-memory mode still loads
    for c in stream.STREAMED:
        graph, inputs = root / c / "model.onnx", checks[c][0]
        parts = stream.write_parts(graph, root / f"{c}_stream", budget)
        output = graphs.SIGNATURES[c].outputs[0]
        result = verify.compare(verify.run_graph(graph, inputs)[0], stream.run_chain(parts, root, inputs, output))
        if not result["max_abs_err"] <= stream.MAX_ERR:
            raise verify.ExportError(f"the streamed {c} parts differ from the whole graph by "
                                     f"{result['max_abs_err']:.3g} (limit {stream.MAX_ERR:g}): the cut is broken")
        entry["components"][c] = {"output": output, "parts": parts, "verify_vs_whole_graph": result}
    return entry


class Terminated(KeyboardInterrupt):
    """SIGTERM during an export; a KeyboardInterrupt so that it unwinds (and cleans up) exactly like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While the block runs, SIGTERM (systemctl stop, docker stop, CI time-outs) raises Terminated.

    A second SIGTERM is ignored so it cannot cut short the removal of the partial folder. Signal handlers can
    only be set from the main thread; elsewhere SIGTERM keeps its handler."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


@click.command("export")
@click.argument("source")
@click.argument("out_dir", required=False, type=click.Path(path_type=Path))
@click.option("--precision", default="fp32", show_default=True, help="fp32 | fp16 (GPU) | int8 (CPU)")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--static", "static", metavar="WxH", default=None,
              help="Fix shapes (U-Net batch 2; 1 for an LCM U-Net) at WxH pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed for random:* weights and the check inputs.")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Override what the checkpoint is guessed to predict.")
@click.option("--int8-scheme", default="dynamic", show_default=True,
              help="int8 only: dynamic (MatMul/Gemm) | qdq (also the U-Net's convolutions, static and calibrated) "
                   "| compact (dynamic + the U-Net's conv weights stored int8, dequantized per call: least memory) "
                   "| openvino (the U-Net's convolutions and linear layers static and calibrated: for "
                   "--provider openvino).")
@click.option("--int8-vae", is_flag=True,
              help="int8 only: also the VAE decoder's convolutions static int8 (calibrated): about 2.6x faster on "
                   "ONNX Runtime and 1.6x on --provider openvino (SD 1.5, 512x512), and measurably less exact "
                   "(README).")
@click.option("--step-cache", is_flag=True,
              help="Also export the DeepCache graphs (unet_shallow/, unet/model_features.onnx) for --cache-interval.")
@click.option("--step-cache-depth", default=1, show_default=True,
              help="First-level down layers the shallow graph recomputes (0 .. layers per block).")
@click.option("--attention", default="standard", show_default=True,
              help="standard | mha: U-Net attention as ORT's MultiHeadAttention, which the CPU provider runs as "
                   "flash attention (no full score matrix); fp32/int8 only.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Fuse a LoRA (.safetensors, kohya or diffusers/PEFT layout) into the weights, at SCALE "
                   "(default 1); repeatable.")
@click.option("--tiny-vae", "tiny_vae_source", metavar="PATH|random", default=None,
              help="Also export a tiny VAE (TAESD) as vae_encoder_tiny/ and vae_decoder_tiny/: a diffusers "
                   "AutoencoderTiny folder, a taesd_encoder/taesd_decoder .pth/.safetensors file or folder, or "
                   "random (TAESD with random weights).")
@click.option("--defaults", "defaults", metavar="KEY=VALUE,...", default="",
              help="What `sdonnx generate` runs the folder with when not told: steps, guidance, scheduler, vae "
                   "(e.g. a turbo model: steps=1,guidance=0,scheduler=euler_a).")
@click.option("--embedding", "embeddings", multiple=True, metavar="FILE[:TOKEN]",
              help="Add a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds) as TOKEN "
                   "(default: the file's name; a diffusers file's own token); repeatable.")
@click.option("--stream", "stream_unet", is_flag=True,
              help="Also write the U-Net and the VAE decoder as chains of part graphs (unet_stream/, "
                   "vae_decoder_stream/), each with its own weights file, which generate --low-memory loads one at "
                   "a time.")
@click.option("--stream-part-mb", default=STREAM_PART_MB, show_default=True,
              help="--stream: consecutive layers share a part up to this many MiB of weights (0: one layer "
                   "per part; less memory, more loading).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(source: str, out_dir: Path | None, precision: str, force: bool, static: str | None, seed: int,
           prediction_type: str | None, int8_scheme: str, int8_vae: bool, step_cache: bool, step_cache_depth: int, attention: str,
           loras: tuple[str, ...], tiny_vae_source: str | None, defaults: str, embeddings: tuple[str, ...],
           stream_unet: bool, stream_part_mb: float,
           quiet: bool) -> None:
    """Export SOURCE (diffusers folder, .safetensors/.ckpt file, random:sd15, random:sd15-lcm, random:sd21,
    random:sd-turbo, random:sdxl, random:sdxl-turbo, tiny) to ONNX."""
    try:
        quantize.check_options(precision, int8_scheme)  # before the default OUT_DIR is named after the precision
        job = ExportJob(source, out_dir or default_out_dir(source, precision), precision, force,
                        graphs.Static.parse(static) if static else None, seed, prediction_type, int8_scheme,
                        step_cache_depth if step_cache else None, attention=attention,
                        loras=tuple(lora.parse_spec(spec) for spec in loras), defaults=folder.parse_defaults(defaults),
                        tiny_vae=tiny_vae_source, embeddings=tuple(ti.parse_spec(spec) for spec in embeddings),
                        stream=stream_unet, stream_part_mb=stream_part_mb, int8_vae=int8_vae)
        with _sigterm_unwinds():
            meta = run_export(job, progress=not quiet)
    except Terminated:
        stopped = click.ClickException("export stopped by SIGTERM; its partial folder was removed")
        stopped.exit_code = 128 + signal.SIGTERM  # as a shell reports a process SIGTERM ended
        raise stopped from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise click.ClickException(f"disk full while writing {out_dir or 'the model folder'}; "
                                       "nothing was left behind") from None
        raise click.ClickException(_one_line(err)) from None
    except (ValueError, verify.ExportError, ImportError) as err:
        raise click.ClickException(_one_line(err)) from None
    _print_summary(job, meta)


def _print_summary(job: ExportJob, meta: dict) -> None:
    size = sum(f["size"] for f in meta["files"].values())
    click.echo(f"exported {job.source} -> {job.out_dir} ({job.precision}, {size / 2**20:.1f} MiB, "
               f"{job.timings['total']:.1f} s, peak RSS {meta['export_report']['peak_rss_mb']:.0f} MB)")
    for name, info in meta["components"].items():
        v = info["verify"]
        click.echo(f"  {name:<16} {info['precision']:<5} max abs err {v['max_abs_err']:.2e}  PSNR {v['psnr']} dB")
    for w in job.warnings:
        click.echo(f"  warning: {w}")
