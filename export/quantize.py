"""Lower-precision graphs: fp16 for GPU providers, int8 (dynamic, MatMul/Gemm weights) for CPU."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .onnx import EXTERNAL_DATA_NAME, save_model

PRECISIONS = ("fp32", "fp16", "int8")
INT8_SCHEMES = ("dynamic", "qdq", "compact", "openvino")
COMPACT_COMPONENTS = ("unet", "unet_shallow")  # where the compact scheme also stores convolution weights int8

# Ops whose fp16 results overflow or lose too much: normalisations reduce over thousands of values, and
# Softmax of SD 2.x attention scores exceeds fp16's range (its U-Net sets upcast_attention for this reason).
FP16_KEEP_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean", "Pow",
                 "Sqrt", "Erf", "Exp", "Range", "Resize", "Upsample", "CumSum", "Min", "Max", "ArgMax")
FP16_KEEP_OPS_SD2 = FP16_KEEP_OPS + ("Softmax",)

# Layers left in float: the time embedding and SDXL's added (text and size) embedding summed into it (their error
# reaches every resnet), its per-block projection, and the first and last convolutions (they see the raw latents
# and write the prediction itself)
INT8_KEEP_NODES = re.compile(r"time_embedding|add_embedding|time_emb_proj|/conv_in/|/conv_out/")
# Convolutions static QDQ leaves float: those reading the un-normalised residual stream (resnet shortcuts, down-
# and upsamplers, the attention blocks' output projections). Its outlier channels stretch a per-tensor uint8
# range until the ordinary values round away: on the tiny U-Net, quantizing any one of these alone cost its
# output 15-23 dB of SNR against 35-43 dB for a convolution reading a GroupNorm output. About a quarter of SD
# 1.5's convolution work.
QDQ_FLOAT_CONVS = re.compile(r"conv_shortcut|downsamplers|upsamplers|proj_out")

# Linear layers the openvino scheme leaves float: cross-attention's output projection, which reads the text's values
# mixed per pixel. In int8 it drew 6 of the trained tiny model's 200 blue shapes purple (shape colour 97.0%, fp32's
# 100%); float, 100% (and shape 95.5% against 93.0%). Float alone, no other attention projection restored it (to_q,
# to_k/to_v of the text, self-attention's, the feed-forward's). About 2% of SD 1.5's U-Net work.
INT8_FLOAT_LINEAR = re.compile(r"/attn2/to_out")


def qdq_keeps_float(conv_name: str) -> bool:
    """Whether static QDQ leaves the convolution named `conv_name` (a graph node's name) float."""
    return bool(QDQ_FLOAT_CONVS.search(conv_name) or INT8_KEEP_NODES.search(conv_name))
CALIBRATION_PROMPTS = ("a photo of a cat", "an astronaut riding a horse on the moon, highly detailed",
                       "a red circle on a blue background", "oil painting of a castle at sunset",
                       "a small yellow square in the top left on a black background", "portrait of an old man",
                       "a large green triangle on a white background", "a city street at night, rain")


# What each scheme measured on a mid-size U-Net (size, speed, error against PyTorch): the export report names
# the file rather than copying the table into every folder
BENCHMARK_FILE = "benchmarks/results/int8-schemes-unet.json"


def notes(component: str, chosen: Scheme) -> dict:
    """The export report's quantization entry: the method and, for a quantized U-Net, where each choice's
    measurements are."""
    out = {"method": chosen.method}
    if component == "unet" and chosen.precision != "fp32":
        out["benchmark"] = BENCHMARK_FILE
    return out


KINDS = ("none", "fp16") + INT8_SCHEMES + ("vae",)
TINY_DECODER = "vae_decoder_tiny"  # the one VAE graph every static scheme speeds up: TAESD's plain 3x3 convolutions
VAE_DECODER = "vae_decoder"  # the full VAE decoder: static int8 only when asked (--int8-vae), for its quality cost
# The full decoder's activation ranges clip this percentile of the calibration values (both tails): its ~30
# convolutions in a row each add rounding error, and min/max ranges stretched by rare values left the decoded
# image of SD 1.5's VAE (random weights) at 35 dB PSNR against fp32, the 99.99th percentile at 38.7 dB
VAE_PERCENTILE = 99.99


@dataclass(frozen=True)
class Scheme:
    """What one component gets: `kind` picks the conversion, `method` is the export report's description."""

    kind: str  # one of KINDS
    method: str

    @property
    def precision(self) -> str:
        """The precision the graph's weights end up in: fp32, fp16 or int8."""
        return {"none": "fp32", "fp16": "fp16"}.get(self.kind, "int8")


def check_options(precision: str, int8_scheme: str = "dynamic") -> None:
    """The one check of the requested precision and int8 scheme: a one-line ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if int8_scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {int8_scheme!r}; choose one of {', '.join(INT8_SCHEMES)}")


def kind_of(component: str, precision: str, int8_scheme: str = "dynamic", int8_vae: bool = False) -> str:
    """The conversion `component` gets for options that passed `check_options`.

    The VAE decoder overflows in fp16 (diffusers upcasts it too) and its convolutions do not speed up with
    dynamic int8, so the VAE stays fp32; but qdq runs the tiny VAE's decoder as static int8 convolutions, which
    makes it 4x faster (calibrated on the latents the U-Net's calibration runs visit). `int8_vae` (any int8
    scheme) makes the full VAE decoder static int8 convolutions too ("vae"): several times faster on ONNX Runtime,
    1.5x on OpenVINO's kernels, at a measurable quality cost (README). qdq calibrates the full
    U-Net and compact concerns the U-Net graphs' convolutions; every other component gets dynamic int8 under them.
    openvino quantizes the full U-Net for OpenVINO; the others' dynamic int8 is ONNX Runtime's form, which
    `--provider openvino` runs on ONNX Runtime (faster there than OpenVINO's bf16 of the float graph).
    """
    if precision == "int8" and int8_scheme in ("qdq", "openvino") and component == TINY_DECODER:
        return "qdq"
    if precision == "int8" and int8_vae and component == VAE_DECODER:
        return "vae"
    if precision == "fp32" or component.startswith("vae"):
        return "none"
    if precision == "fp16":
        return "fp16"
    if (int8_scheme in ("qdq", "openvino") and component == "unet") or \
            (int8_scheme == "compact" and component in COMPACT_COMPONENTS):
        return int8_scheme
    return "dynamic"


_DYNAMIC = ("dynamic int8 MatMul/Gemm (per-channel 7-bit weights, activations quantized per call); "
            "time embedding and normalisations kept fp32")
METHODS = {
    "none": "none (ORT basic graph optimizations only)",
    "fp16": "fp16 weights and activations; fp32 I/O and {fp16_kept} kept fp32",
    "dynamic": _DYNAMIC + "; convolutions kept fp32",
    "qdq": "static QDQ int8 convolutions (per-channel weights, uint8 activations calibrated on sampling runs "
           "of our models, run as the folder's defaults say; conv_in/conv_out and the convolutions reading "
           "the residual stream (shortcuts, down/upsamplers, proj_out) kept fp32) + " + _DYNAMIC,
    "openvino": "static QDQ int8 convolutions and linear layers (per-channel weights, uint8 activations calibrated "
                "as qdq's; the same convolutions kept fp32, and cross-attention's output projection), attention "
                "products and normalisations float: the form "
                "OpenVINO runs as int8 (--provider openvino); ONNX Runtime runs it slower than qdq",
    "vae": "static QDQ int8 convolutions (per-channel weights, uint8 activations whose ranges clip the "
           f"{VAE_PERCENTILE}th percentile of the decoder's values on each U-Net calibration run's final latents); "
           "post_quant_conv, conv_in and conv_out kept fp32, the attention block float",
    "compact": _DYNAMIC + "; convolution weights stored int8 (per output channel) and dequantized per call "
                          "(DequantizeLinear -> fp32 Conv): a third of the size and memory, conv_in/conv_out kept fp32",
}


def _fp16_keeps_softmax(family: str) -> bool:
    return family.startswith("sd2")


def scheme(component: str, precision: str, family: str, int8_scheme: str = "dynamic",
           int8_vae: bool = False) -> Scheme:
    """The quantization applied to `component` of a `family` checkpoint for a requested `precision`."""
    kind = kind_of(component, precision, int8_scheme, int8_vae)
    if component == TINY_DECODER and kind == "qdq":
        return Scheme(kind, "static QDQ int8 convolutions (per-channel weights, uint8 activations calibrated on the "
                            "latents of the U-Net's calibration runs); its first and last convolutions kept fp32")
    kept = "normalisations" + (", attention softmax" if _fp16_keeps_softmax(family) else "")
    return Scheme(kind, METHODS[kind].format(fp16_kept=kept))


def apply(component: str, precision: str, family: str, src: Path, dst: Path, int8_scheme: str = "dynamic",
          calibration: list[dict] | None = None, int8_vae: bool = False) -> Scheme:
    """Write the `precision` variant of the fp32 graph `src` to `dst` (moved as it is for fp32 / the VAE).

    The static kinds need `calibration`: the graph's inputs drawn through our own models.
    """
    chosen = scheme(component, precision, family, int8_scheme, int8_vae)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if chosen.kind == "none":
        move_model(src, dst)
    elif chosen.kind == "fp16":
        to_fp16(src, dst, FP16_KEEP_OPS_SD2 if _fp16_keeps_softmax(family) else FP16_KEEP_OPS)
    elif chosen.kind == "openvino":
        to_int8_static_convs(src, dst, calibration or [], linear=True)
    elif chosen.kind == "vae":  # no dynamic int8 after it: --provider openvino runs the graph on OpenVINO
        to_int8_static_convs(src, dst, calibration or [], keep=_end_convs(src), residual_float=False,
                             percentile=VAE_PERCENTILE)
    elif chosen.kind == "qdq":
        convs = dst.parent / "_qdq" / "model.onnx"
        to_int8_static_convs(src, convs, calibration or [], keep=_end_convs(src) if component == TINY_DECODER else ())
        to_int8_dynamic(convs, dst)
        shutil.rmtree(convs.parent)
    else:  # dynamic, compact: compact also stores the convolution weights int8
        to_int8_dynamic(src, dst)
        if chosen.kind == "compact":
            int8_conv_weights(dst)
    return chosen


def move_model(src: Path, dst: Path) -> Path:
    """Move a graph file and its external data file, if any, to `dst` (same data file name)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.parent / EXTERNAL_DATA_NAME
    if data.exists():
        data.replace(dst.parent / EXTERNAL_DATA_NAME)
    src.replace(dst)
    return dst


def to_fp16(src: Path, dst: Path, keep_ops: tuple[str, ...]) -> Path:
    """fp16 weights and math, graph inputs/outputs kept fp32 (the runtime feeds and reads fp32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from . import lean_fp16, onnx as graphs

    if (src.parent / EXTERNAL_DATA_NAME).exists():  # a large graph: one weight in memory instead of all twice
        return lean_fp16.convert(src, dst, keep_ops, EXTERNAL_DATA_NAME, graphs.EXTERNAL_DATA_BYTES)
    # infer shapes file to file (a full U-Net proto is over protobuf's 2 GB limit); written beside `src` so
    # its external data reference still resolves
    inferred = src.with_name("inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    try:
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink()
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_ops),
                                     disable_shape_infer=True)
    return save_model(model, dst)


def int8_nodes_to_exclude(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to keep float; the quantizer first splits each Gemm into `<name>_MatMul` + Add."""
    names = [n.name for n in model.graph.node if INT8_KEEP_NODES.search(n.name)]
    return names + [name + "_MatMul" for name in names]


def to_int8_dynamic(src: Path, dst: Path, reduce_range: bool = True) -> Path:
    """Dynamic int8 MatMul/Gemm: weights int8 per output channel, activations quantized per call.

    reduce_range (7-bit weights) avoids the u8*s8 pair-sum saturation of AVX2 without VNNI.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from . import dynamic_int8, onnx as graphs

    exclude = int8_nodes_to_exclude(onnx.load(str(src), load_external_data=False))
    if reduce_range and (src.parent / EXTERNAL_DATA_NAME).exists():
        # a large graph: the same result with one weight in memory instead of the model three times over
        try:
            return dynamic_int8.quantize(src, dst, exclude, EXTERNAL_DATA_NAME, graphs.EXTERNAL_DATA_BYTES)
        except dynamic_int8.Unsupported as err:  # onnxruntime's quantizer holds the model three times over
            logging.getLogger(__name__).warning("%s: %s; quantizing with onnxruntime's quantize_dynamic", src, err)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about pre-processing on every call
    try:
        with _staged(src, dst) as (out, large):
            quantize_dynamic(src, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                             reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                             use_external_data_format=large)
    finally:
        logging.getLogger().setLevel(level)
    return dst


def int8_conv_weights(path: Path) -> Path:
    """Store each Conv's fp32 weight as int8 per output channel (symmetric) behind a DequantizeLinear.

    ONNX Runtime does not constant-fold DequantizeLinear, so the weights stay int8 in memory and each Conv
    gets its fp32 weight from a small per-call dequantization; the convolution itself runs in fp32, so the
    error is only the weights' rounding (unlike static QDQ, which also quantizes the activations).

    The DequantizeLinear nodes go first in the node list. ORT orders execution by a reverse depth-first walk
    from the outputs that enters a node's higher-indexed inputs first, so a dequantization listed after its
    Conv's activation producer ran long before the Conv and its fp32 weight stayed alive all that while
    (SD 1.5 U-Net at 512x512: +147 MiB peak; listed first, each runs right before its Conv)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    keep = set(int8_nodes_to_exclude(model))
    dequantize, nodes = [], []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w is None or node.name in keep or uses[w.name] != 1 or w.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(w)
        scale = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(weight / scale.reshape(-1, *[1] * (weight.ndim - 1))), -127, 127).astype(np.int8)
        base = w.name
        model.graph.initializer.remove(w)
        model.graph.initializer.extend([numpy_helper.from_array(q, base + "_int8"),
                                        numpy_helper.from_array(scale, base + "_scale"),
                                        numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), base + "_zero")])
        dequantize.append(onnx.helper.make_node("DequantizeLinear", [base + "_int8", base + "_scale", base + "_zero"],
                                                [base + "_dq"], name=base + "_DequantizeLinear", axis=0))
        node.input[1] = base + "_dq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(dequantize + nodes)
    return save_model(model, path)


@contextlib.contextmanager
def _staged(src: Path, dst: Path):
    """Yield (output path, large) for a quantizer; a large model (the SD 1.5 U-Net is still 2.4 GB with int8
    linear layers) goes through a staging folder and is re-saved with our external data file name."""
    if not (src.parent / EXTERNAL_DATA_NAME).exists():
        yield dst, False
        return
    stage = dst.parent / "_stage"
    stage.mkdir(parents=True, exist_ok=True)
    try:
        yield stage / "model.onnx", True
        save_model(onnx.load(str(stage / "model.onnx")), dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _end_convs(path: Path) -> list[str]:
    """The first and last Conv of a graph: they see the raw input and write the output itself."""
    convs = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "Conv"]
    return convs[:1] + convs[-1:]


def decoder_feeds(unet_feeds: list[dict], latent_channels: int, scaling: float, shift: float) -> list[dict]:
    """A VAE decoder's calibration inputs from the U-Net's: the latents of every step of the calibration runs (the
    first image of a batch, its latent channels), brought into the decoder's own scale as the runtime does."""
    return [{"latent_sample": (f["sample"][:1, :latent_channels] / scaling + shift).astype(np.float32)}
            for f in unet_feeds]


def final_decoder_feeds(finals: list[np.ndarray], scaling: float, most: int = 32) -> list[dict]:
    """The full VAE decoder's calibration inputs: each calibration run's final latents, scaled as the runtime hands
    them over, their middle `most` x `most` latents at most (a --static 1024x1024 SDXL decode would hold ~16 GB of
    activations in the histogram calibrator; ranges barely depend on size). Not every step's latents: a random-weight
    U-Net's sampling drifts (SD 1.5's: latent std 1 -> 9 over 10 steps), and ranges must fit what the decoder is
    handed: fitted to that whole drift, SD 1.5's decoder was 29.4 dB from fp32 on standard-normal latents, fitted
    to such latents 38.1 dB."""
    def middle(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[-2:]
        top, left = max(0, (h - most) // 2), max(0, (w - most) // 2)
        return x[..., top:top + most, left:left + most]

    return [{"latent_sample": (middle(f[:1]) / scaling).astype(np.float32)} for f in finals]


def to_int8_static_convs(src: Path, dst: Path, feeds: list[dict], keep: tuple | list = (),
                         linear: bool = False, residual_float: bool = True, percentile: float | None = None) -> Path:
    """Static QDQ int8 Conv (per-channel int8 weights, uint8 activations with ranges from `feeds`); the Conv nodes
    named in `keep` stay float, as do those qdq_keeps_float names unless not `residual_float`. `linear`: the
    MatMuls with a weight operand too (not the attention products of two activations). `percentile`: activation
    ranges clipping that percentile of the values (ONNX Runtime's histogram calibrator) instead of min/max.

    Static, unlike dynamic, quantization lets ORT run convolutions as integer kernels (fast with VNNI).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if len(feeds) < 2:
        raise ValueError("static int8 needs at least 2 calibration feeds")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(feeds[start_index:end_index])

    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    exclude = int8_nodes_to_exclude(model) + [n.name for n in model.graph.node if n.op_type == "Conv" and
                                              residual_float and qdq_keeps_float(n.name)] + list(keep)
    if linear:
        weights = {t.name for t in model.graph.initializer}
        exclude += [n.name for n in model.graph.node if n.op_type == "MatMul" and
                    (n.input[1] not in weights or INT8_FLOAT_LINEAR.search(n.name))]
    del model
    if (src.parent / EXTERNAL_DATA_NAME).exists() and percentile is None:
        # a large graph: the same result with one weight in memory instead of the model several times over
        from . import dynamic_int8, onnx as graphs, static_int8
        try:
            return static_int8.quantize(src, dst, feeds, ("Conv", "MatMul") if linear else ("Conv",), exclude,
                                        EXTERNAL_DATA_NAME, graphs.EXTERNAL_DATA_BYTES)
        except dynamic_int8.Unsupported as err:  # onnxruntime's quantizer holds the model several times over
            logging.getLogger(__name__).warning("%s: %s; quantizing with onnxruntime's quantize_static", src, err)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    # min/max: fold the collected activations into ranges every few feeds (a full U-Net's are ~100 MB per feed);
    # ORT's calibrator fails ("No data is collected") if the last fold leaves nothing, so the fold size must not
    # divide the number of feeds
    method, options = CalibrationMethod.MinMax, {"CalibMaxIntermediateOutputs": _fold_size(len(feeds))}
    if percentile is not None:
        # the histogram calibrator holds every activation of the feeds it is given (about 1 GB per 256x256 decode
        # of SD's VAE): it is given one feed at a time and merges the histograms ("strided" is not min/max only)
        method, options = CalibrationMethod.Percentile, {"CalibPercentile": percentile, "CalibStridedMinMax": 1}
    try:
        with _staged(src, dst) as (out, large), contextlib.redirect_stdout(io.StringIO()):  # the histogram's chatter
            quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv", "MatMul"] if linear else ["Conv"],
                            per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=large,
                            calibrate_method=method, extra_options=options)
    finally:
        logging.getLogger().setLevel(level)
    return dst


def _fold_size(feeds: int, most: int = 4) -> int:
    """A fold size that leaves a non-empty last fold of `feeds`: the largest up to `most`, else the next above."""
    fits = [k for k in range(2, feeds + 2) if feeds % k]  # feeds + 1 always fits (no fold at all)
    return max((k for k in fits if k <= most), default=fits[0])


def calibration_feeds(models: dict, configs, tokenizer_dir: Path, scheduler_config: dict,
                      prompts: tuple[str, ...] = CALIBRATION_PROMPTS, steps: int = 10, guidance: float | None = None,
                      latent_hw: tuple = (32, 32), seed: int = 0, sampler: str | None = None,
                      tokenizer_2_dir: Path | None = None, image_hw: tuple | None = None,
                      finals: list | None = None) -> list[dict]:
    """U-Net inputs recorded along sampling runs of our own PyTorch models, one run per prompt.

    The runs are the runtime's own loop (sdonnx.sampling) with the PyTorch U-Net behind its model callables, so
    each feed is exactly what the runtime feeds: a guided step's [unconditional, conditional] batch, or with
    guidance <= 1 one conditional call (batch 1). `sampler` (default DDIM) runs `steps` steps; an LCM U-Net always
    samples its own way (its table row: LCM sampler, 4 steps), with the guidance scale as its input. The
    activation ranges come from the latents sampling really visits (on the tiny model, calibrating on noised
    synthetic images instead left its int8 U-Net 4 points further from fp32 in shape accuracy).
    guidance: the defaults table's for the U-Net kind when None. SDXL: both text encoders (tokenizer_2_dir), and
    time ids (h, w, 0, 0, h, w) of `image_hw` (pixels; default: the latents' size). `finals`: a list that gets each
    run's final latents, what the VAE decoder is handed."""
    import torch
    from sdonnx import sampling
    from sdonnx.model import DEFAULTS
    from sdonnx.schedulers import create

    unet_cfg = configs.unet
    row = DEFAULTS["lcm" if unet_cfg.is_lcm else "sd"]
    if unet_cfg.is_lcm:
        sampler, steps = row.scheduler, row.steps
    name = sampler or "ddim"
    w, inputs = sampling.conditioning(row.guidance if guidance is None else guidance, unet_cfg.time_cond_proj_dim, 1)
    encode = _prompt_encoder(models, configs, tokenizer_dir, tokenizer_2_dir,
                             image_hw or tuple(v * configs.vae.downscale for v in latent_hw))
    rng = np.random.default_rng(seed)
    feeds: list[dict] = []
    unet = _recording(models["unet"], feeds)
    with torch.no_grad():
        for prompt in prompts:
            context, added = encode(prompt, w > 1.0)
            sched = create(name, scheduler_config, steps)
            x = rng.standard_normal((1, unet_cfg.out_channels, *latent_hw)).astype(np.float32)
            extra = _inpainting_inputs(models, configs, rng, *latent_hw) if unet_cfg.is_inpaint else None
            start = sampling.Start(0, x * np.float32(sched.init_noise_sigma), extra=extra)
            call = sampling.guided(unet, context, w, **inputs, **added)
            last = sampling.denoise(sched, start, sampling.every_step(call), rng)
            if finals is not None:
                finals.append(last)
    return feeds


def _prompt_encoder(models: dict, configs, tokenizer_dir: Path, tokenizer_2_dir: Path | None, image_hw: tuple):
    """prompt, guided -> (encoder_hidden_states, constant U-Net inputs) as the runtime makes them: SD's last hidden
    state of ["", prompt]; SDXL's penultimate hidden states of both encoders joined, the second's pooled text_embeds
    and the time ids, with zeros for the empty negative prompt (force_zeros_for_empty_prompt)."""
    import torch
    from sdonnx.sdxl import time_ids as size_conditioning
    from sdonnx.tokenizer import CLIPTokenizer

    tokenize = CLIPTokenizer.from_dir(tokenizer_dir)
    if not configs.is_sdxl:
        def sd(prompt: str, guided: bool) -> tuple[np.ndarray, dict]:
            ids = tokenize(["", prompt] if guided else [prompt])
            return models["text_encoder"](torch.from_numpy(ids))[0].numpy(), {}
        return sd

    tokenize_2 = CLIPTokenizer.from_dir(tokenizer_2_dir)
    h, w = image_hw
    time_ids = size_conditioning(h, w, 1)

    def sdxl(prompt: str, guided: bool) -> tuple[np.ndarray, dict]:
        first = models["text_encoder"].forward_all(torch.from_numpy(tokenize([prompt])))
        second = models["text_encoder_2"].forward_all(torch.from_numpy(tokenize_2([prompt])))
        context = torch.cat([first[-2], second[-2]], dim=-1).numpy()
        pooled = second[0].numpy()
        if guided:
            context = np.concatenate([np.zeros_like(context), context])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        return context, {"text_embeds": pooled, "time_ids": np.repeat(time_ids, len(pooled), axis=0)}
    return sdxl


def _recording(unet, feeds: list[dict]):
    """A PyTorch U-Net as a sampling.Graph that records each call's inputs, as the exported graph takes them."""
    import torch

    def call(**inputs: np.ndarray) -> dict:
        feed = {k: np.asarray(v, np.float32) for k, v in inputs.items()}  # the graph's timestep is a float32 scalar
        feeds.append(feed)
        return {"out_sample": unet(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()}

    return call


def _inpainting_inputs(models: dict, configs, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Mask (all ones: repaint everything) and masked-image latents of a smooth synthetic image."""
    import torch

    scale = configs.vae.downscale
    mean, _ = models["vae"].encode(torch.from_numpy(_smooth_image(rng, 1, h * scale, w * scale)))
    x0 = (mean * configs.vae.scaling_factor).numpy()
    return np.concatenate([np.ones_like(x0[:, :1]), x0], axis=1)


def _smooth_image(rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    """Random colour gradients plus a disc, in [-1, 1]: image statistics closer to photos than noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((batch, 3, height, width), np.float32)
    for b in range(batch):
        a, c = rng.uniform(-1, 1, (3, 1, 1)), rng.uniform(-1, 1, (3, 1, 1))
        img = a * (xx / width) + c * (yy / height)
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.1, 0.4) * min(height, width)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img = np.where(disc, rng.uniform(-1, 1, (3, 1, 1)), img)
        out[b] = np.clip(img, -1, 1)
    return out
