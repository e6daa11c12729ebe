"""PyTorch -> ONNX: one wrapper per component whose forward is exactly the exported signature (optimum's layout)."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from sdonnx import upsampling

from . import external
from .models.config import ModelConfigs, TinyVAEConfig
from .models.layers import Attention, Upsample, merge_heads, split_heads
from .models.unet import GEGLU

OPSET = 17
TEXT_LENGTH = 77
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# with the step cache: the shallow graph, and the full U-Net's second graph file that also hands out deep features
STEP_CACHE_COMPONENTS = ("text_encoder", "unet", "unet_shallow", "vae_encoder", "vae_decoder")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SDXL has the second (projected) one
SDXL_INPUTS = ("text_embeds", "time_ids")  # SDXL's added conditioning: pooled text, (h, w, top, left, h, w)
# with --tiny-vae: TAESD's graphs beside the full VAE's, with the same input and image conventions
TINY_VAE_COMPONENTS = ("vae_encoder_tiny", "vae_decoder_tiny")
FEATURES_FILE = "model_features.onnx"
# the text encoder's second graph file: optimum's outputs plus every layer's (hidden_states.K), for clip skip
HIDDEN_STATES_FILE = "model_hidden_states.onnx"
# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself
EXTERNAL_DATA_BYTES = 1_800_000_000
EXTERNAL_DATA_NAME = "model.onnx_data"
ATTENTION = ("standard", "mha")  # how U-Net attention is exported (see FusedAttention)


@dataclass(frozen=True)
class Static:
    """Fixed export shapes (`--static WxH`): image size in pixels and the U-Net batch (2 for guidance; the
    exporter makes it 1 for an LCM U-Net, which takes the guidance as an input)."""

    width: int
    height: int
    batch: int = 2

    @classmethod
    def parse(cls, text: str) -> Static:
        """'512x768' -> Static(width=512, height=768)."""
        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"--static wants WIDTHxHEIGHT in pixels, e.g. 512x512, got {text!r}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"--static sizes must be positive, got {text!r}")
        return cls(w, h)


class _UNetWrapper(nn.Module):
    """Base of the U-Net graphs: inputs after the fixed ones (`extra`: text_embeds, time_ids of SDXL, timestep_cond
    of LCM, in signature order) arrive by position when traced and by name when checked."""

    def __init__(self, unet: nn.Module, extra: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.extra = unet, extra

    def added(self, args: tuple, named: dict) -> dict:
        return {**dict(zip(self.extra, args)), **named}


class UNetGraph(_UNetWrapper):
    """(sample, timestep [], encoder_hidden_states[, text_embeds, time_ids][, timestep_cond]) -> out_sample"""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor, **named: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, **self.added(extra, named))


class UNetFeaturesGraph(_UNetWrapper):
    """(sample, timestep [], encoder_hidden_states, ...) -> (out_sample, deep_features) for the step cache"""

    def __init__(self, unet: nn.Module, depth: int, extra: tuple[str, ...] = ()):
        super().__init__(unet, extra)
        self.depth = unet.check_cache_depth(depth)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor, **named: torch.Tensor):
        return self.unet.forward_with_features(sample, timestep, encoder_hidden_states, self.depth,
                                               **self.added(extra, named))


class UNetShallowGraph(_UNetWrapper):
    """(sample, timestep [], encoder_hidden_states, deep_features, ...) -> out_sample: the cached steps (DeepCache)"""

    def __init__(self, unet: nn.Module, depth: int, extra: tuple[str, ...] = ()):
        super().__init__(unet, extra)
        self.depth = unet.check_cache_depth(depth)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                deep_features: torch.Tensor, *extra: torch.Tensor, **named: torch.Tensor):
        return self.unet.forward_shallow(sample, timestep, encoder_hidden_states, deep_features, self.depth,
                                         **self.added(extra, named))


class OneInputGraph(nn.Module):
    """A graph of one input: `run(module, x)`, the input by position (tracing) or by its graph name (checks)"""

    def __init__(self, module: nn.Module, run: Callable[[nn.Module, torch.Tensor], object]):
        super().__init__()
        self.module, self.run = module, run

    def forward(self, *args: torch.Tensor, **named: torch.Tensor):
        (x,) = (*args, *named.values())
        return self.run(self.module, x)


class _MultiHeadAttention(torch.autograd.Function):
    """q, k, v [B, S, heads * d] -> [B, S, heads * d]; traced as one com.microsoft.MultiHeadAttention node."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool) -> torch.Tensor:
        q, k, v = (split_heads(t.float() if upcast else t, heads) for t in (q, k, v))
        return merge_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v)).to(v.dtype)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, upcast: bool):
        # no scale attribute: the kernel's default is 1/sqrt(head size), as in scaled_dot_product_attention
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())
        return out


class FusedAttention(nn.Module):
    """An Attention whose core exports as MultiHeadAttention: ORT's CPU kernel for it (fp32) runs flash
    attention (Dao et al. 2022) in L2-sized blocks, so the [B*heads, S, S] score matrix never exists."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.heads, self.upcast = attention.heads, attention.upcast
        self.to_q, self.to_k, self.to_v, self.to_out = attention.to_q, attention.to_k, attention.to_v, attention.to_out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = _MultiHeadAttention.apply(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[0](out)


def _swap(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace each module of exactly type `kind` inside `model` by make(it) (None: keep it); returns how many."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is kind]
    count = 0
    for parent, name, child in found:
        replacement = make(child)
        if replacement is not None:
            setattr(parent, name, replacement)
            count += 1
    return count


def use_fused_attention(model: nn.Module) -> int:
    """Swap each plain Attention inside `model` for a FusedAttention on the same weights; returns how many."""
    return _swap(model, Attention, FusedAttention)  # the VAE's AttnBlock subclass keeps its own forward


def phase_kernels(weight: torch.Tensor) -> list[torch.Tensor]:
    """The four 2x2 kernels on the input that compute `weight` (3x3) applied after 2x nearest upsampling."""
    return [torch.from_numpy(k) for k in upsampling.phase_kernels(weight.detach().numpy())]


class _PhaseConvs(torch.autograd.Function):
    """x [B, C, H, W] and the four phases' 2x2 kernels -> [B, O, 2H, 2W]; traced as four Conv nodes whose padding
    places each phase's window, a Concat and one DepthToSpace (DCR: output channel c of phase p is input p*O + c)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, *kernels: torch.Tensor) -> torch.Tensor:
        ys = [torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1 - b, b, 1 - a, a)), k, bias)
              for (a, b), k in zip(upsampling.PHASES, kernels)]
        n, o, h, w = ys[0].shape
        return torch.stack(ys, 2).view(n, o, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, o, 2 * h, 2 * w)

    @staticmethod
    def symbolic(g, x, bias, *kernels):
        ys = [g.op("Conv", x, k, *([bias] if bias is not None else []), kernel_shape_i=[2, 2],
                   pads_i=sum(upsampling.phase_pads(a, b), [])) for (a, b), k in zip(upsampling.PHASES, kernels)]
        out = g.op("DepthToSpace", g.op("Concat", *ys, axis_i=1), blocksize_i=2, mode_s="DCR")
        out.setType(x.type().with_sizes([None] * 4))
        return out


class PhaseUpsample(nn.Module):
    """An Upsample (2x nearest, 3x3 conv) as four 2x2 convolutions on its input and a pixel shuffle: the same values
    with 0.44x the products and no upsampled copy of the input."""

    def __init__(self, up: Upsample):
        super().__init__()
        self.kernels = nn.ParameterList(nn.Parameter(k, requires_grad=False) for k in phase_kernels(up.conv.weight))
        self.bias = up.conv.bias

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        if like is not None and tuple(like.shape[-2:]) != (2 * x.shape[-2], 2 * x.shape[-1]):
            raise ValueError(f"phase upsampling doubles {tuple(x.shape[-2:])}; this skip is {tuple(like.shape[-2:])}")
        return _PhaseConvs.apply(x, self.bias, *self.kernels)


def use_phase_upsampling(model: nn.Module, min_channels: int | None = None) -> int:
    """Swap each Upsample of `min_channels` (default upsampling.MIN_CHANNELS) or more inside `model` for a
    PhaseUpsample on the same weights; returns how many. Only where the upsampling always doubles the size (the
    VAE's; a U-Net's at a --static size, whose sides divide by the latent multiple): upsampling to an odd size (a
    U-Net's after an odd-sized skip) drops the last row, which the zero padding then replaces, so the last row's
    taps differ from the phases' (the swapped module refuses such a skip)."""
    least = upsampling.MIN_CHANNELS if min_channels is None else min_channels
    return _swap(model, Upsample, lambda up: PhaseUpsample(up) if up.conv.in_channels >= least else None)


class SplitGEGLU(nn.Module):
    """A GEGLU whose projection is two linear layers (the value half, the gate half) rather than one whose product
    is split: the same values, and no split, which OpenVINO runs with a reference (non-vectorised) kernel."""

    def __init__(self, geglu: GEGLU):
        super().__init__()
        inner = geglu.proj.out_features // 2
        self.value, self.gate = (nn.Linear(geglu.proj.in_features, inner, device="meta") for _ in range(2))
        for half, layer in enumerate((self.value, self.gate)):  # views of the projection's rows: no copy
            rows = slice(half * inner, (half + 1) * inner)
            layer.weight = nn.Parameter(geglu.proj.weight.detach()[rows], requires_grad=False)
            layer.bias = nn.Parameter(geglu.proj.bias.detach()[rows], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.nn.functional.gelu(self.gate(x))


def use_split_geglu(model: nn.Module) -> int:
    """Swap each GEGLU inside `model` for a SplitGEGLU on the same weights; returns how many."""
    return _swap(model, GEGLU, SplitGEGLU)


@dataclass(frozen=True)
class Signature:
    """Names and dynamic axes of one exported graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict


_LATENTS = {0: "batch_size", 2: "height", 3: "width"}  # the U-Net's latent-sized tensors
_TEXT = {0: "batch_size", 1: "sequence_length"}  # 77 positions per 75-token prompt chunk; long prompts have more


def _image_to_image(inp: str, inp_size: str, out: str, out_size: str) -> Signature:
    """One [batch, channels, H, W] input to one output; sizes name their axes: sample_* (pixels), latent_*."""
    return Signature((inp,), (out,), {inp: {0: "batch_size", 2: f"{inp_size}_height", 3: f"{inp_size}_width"},
                                      out: {0: "batch_size", 2: f"{out_size}_height", 3: f"{out_size}_width"}})


SIGNATURES = {
    "text_encoder": Signature(("input_ids",), ("last_hidden_state", "pooler_output"),
                              {"input_ids": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"},
                               "pooler_output": {0: "batch_size"}}),
    "unet": Signature(("sample", "timestep", "encoder_hidden_states"), ("out_sample",),
                      {"sample": _LATENTS, "encoder_hidden_states": _TEXT, "out_sample": _LATENTS}),
    "unet_features": Signature(("sample", "timestep", "encoder_hidden_states"), ("out_sample", "deep_features"),
                               {"sample": _LATENTS, "encoder_hidden_states": _TEXT,
                                "out_sample": _LATENTS, "deep_features": _LATENTS}),
    "unet_shallow": Signature(("sample", "timestep", "encoder_hidden_states", "deep_features"), ("out_sample",),
                              {"sample": _LATENTS, "encoder_hidden_states": _TEXT,
                               "deep_features": _LATENTS, "out_sample": _LATENTS}),
    "vae_encoder": _image_to_image("sample", "sample", "latent_parameters", "latent"),
    "vae_decoder": _image_to_image("latent_sample", "latent", "sample", "sample"),
    "vae_encoder_tiny": _image_to_image("sample", "sample", "latent_sample", "latent"),
    "vae_decoder_tiny": _image_to_image("latent_sample", "latent", "sample", "sample"),
}


def components(configs: ModelConfigs, step_cache: bool = False) -> tuple[str, ...]:
    """The graphs a checkpoint exports: SDXL's second text encoder after the first."""
    parts = STEP_CACHE_COMPONENTS if step_cache else COMPONENTS
    if configs.is_sdxl:
        parts = (parts[0], "text_encoder_2", *parts[1:])
    return parts


def text_encoder_signature(layers: int, component: str = "text_encoder") -> Signature:
    """optimum's text-encoder signature plus `hidden_states.0` (the embeddings) .. `hidden_states.{layers}` (the
    last layer before the final norm), the names optimum gives them in SDXL's encoders; clip skip reads them.
    An SD folder's model.onnx keeps optimum's two outputs (split_hidden_states); SDXL's keep them all, as optimum's.
    text_encoder_2 (CLIPTextModelWithProjection) starts with the projected pooled output, text_embeds."""
    sig = SIGNATURES["text_encoder"]
    if component == "text_encoder_2":
        sig = Signature(sig.inputs, ("text_embeds", "last_hidden_state"),
                        {"input_ids": {0: "batch_size"}, "text_embeds": {0: "batch_size"},
                         "last_hidden_state": {0: "batch_size"}})
    states = tuple(f"hidden_states.{k}" for k in range(layers + 1))
    return Signature(sig.inputs, sig.outputs + states,
                     {**sig.dynamic_axes, **{name: {0: "batch_size"} for name in states}})


def unet_extra_inputs(cfg) -> tuple[str, ...]:
    """The U-Net graph's inputs after sample, timestep, encoder_hidden_states (and deep_features), in order."""
    return (SDXL_INPUTS if cfg.is_sdxl else ()) + (("timestep_cond",) if cfg.is_lcm else ())


def wrap(component: str, models: dict[str, nn.Module], cache_depth: int | None = None) -> nn.Module:
    """The export wrapper of `component` around our PyTorch models ({"text_encoder", "text_encoder_2", "vae",
    "unet"}).

    With a step-cache depth, `unet` also returns the deep features and `unet_shallow` is the cached-step graph."""
    extra = unet_extra_inputs(models["unet"].config) if component.startswith("unet") else ()
    if component == "unet" and cache_depth is not None:
        return UNetFeaturesGraph(models["unet"], cache_depth, extra).eval()
    if component == "unet_shallow":
        if cache_depth is None:
            raise ValueError("unet_shallow needs a step-cache depth")
        return UNetShallowGraph(models["unet"], cache_depth, extra).eval()
    if component in TEXT_ENCODERS:  # input_ids -> (optimum's outputs, hidden_states.0, ...)
        return OneInputGraph(models[component], lambda te, ids: te.forward_all(ids)).eval()
    if component == "unet":
        return UNetGraph(models["unet"], extra).eval()
    if component == "vae_encoder":  # image in [-1, 1] -> concat(mean, logvar) on channels, as optimum exports it
        return OneInputGraph(models["vae"], lambda vae, x: torch.cat(vae.encode(x), dim=1)).eval()
    if component in ("vae_decoder", "vae_decoder_tiny"):  # raw latents -> image in [-1, 1]
        return OneInputGraph(models["vae" if component == "vae_decoder" else "tiny_vae"],
                             lambda vae, z: vae.decode(z)).eval()
    if component == "vae_encoder_tiny":  # image -> the tiny VAE's latents, deterministic (optimum's latent_sample)
        return OneInputGraph(models["tiny_vae"], lambda vae, x: vae.encode(x)).eval()
    raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")


def latent_multiple(configs: ModelConfigs) -> int:
    """Latent sides must divide by this for the U-Net's down/up sampling to line up."""
    return 2 ** (len(configs.unet.block_out_channels) - 1)


def sample_inputs(component: str, configs: ModelConfigs, batch: int, latent_hw: tuple[int, int],
                  seed: int = 0, text_length: int = TEXT_LENGTH) -> dict[str, torch.Tensor]:
    """Deterministic inputs with realistic ranges for `component` (latents ~ N(0, 1), images in [-1, 1]);
    text_length: the U-Net's text positions (77 per prompt chunk)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    scale = configs.vae.downscale
    lat_ch = configs.vae.latent_channels
    if component in TEXT_ENCODERS:
        clip = configs.clip if component == "text_encoder" else configs.clip2
        ids = torch.randint(0, clip.vocab_size - 2, (batch, TEXT_LENGTH), generator=g)
        ids[:, 0] = clip.bos_token_id
        ids[:, TEXT_LENGTH // 2:] = clip.eos_token_id  # a prompt padded with the end token
        return {"input_ids": ids.to(torch.int64)}
    if component == "unet":
        inputs = {"sample": torch.randn(batch, configs.unet.in_channels, h, w, generator=g),
                  "timestep": torch.tensor(981.0),
                  "encoder_hidden_states": torch.randn(batch, text_length, configs.unet.cross_attention_dim,
                                                       generator=g)}
        if configs.unet.is_sdxl:  # the pooled text, and diffusers' default time ids (h, w, 0, 0, h, w) in pixels
            inputs["text_embeds"] = torch.randn(batch, configs.unet.text_embeds_dim, generator=g)
            size = [float(h * scale), float(w * scale)]
            inputs["time_ids"] = torch.tensor([size + [0.0, 0.0] + size]).repeat(batch, 1)
        if configs.unet.is_lcm:  # a guidance embedding has values in [-1, 1]
            inputs["timestep_cond"] = torch.rand(batch, configs.unet.time_cond_proj_dim, generator=g) * 2 - 1
        return inputs
    if component == "vae_encoder":
        return {"sample": torch.rand(batch, configs.vae.in_channels, h * scale, w * scale, generator=g) * 2 - 1}
    if component == "vae_decoder":
        return {"latent_sample": torch.randn(batch, lat_ch, h, w, generator=g) / configs.vae.scaling_factor}
    raise ValueError(f"unknown component {component!r}")


def tiny_vae_inputs(component: str, cfg: TinyVAEConfig, batch: int, latent_hw: tuple[int, int], seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """sample_inputs for the tiny VAE: images in [-1, 1], or unit-variance diffusion
    latents brought into its own latent scale as the runtime would."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    if component == "vae_encoder_tiny":
        return {"sample": torch.rand(batch, cfg.in_channels, h * cfg.downscale, w * cfg.downscale, generator=g) * 2 - 1}
    if component == "vae_decoder_tiny":
        z = torch.randn(batch, cfg.latent_channels, h, w, generator=g)
        return {"latent_sample": z / cfg.scaling_factor + cfg.shift_factor}
    raise ValueError(f"unknown tiny VAE component {component!r}")


def trace_shape(component: str, configs: ModelConfigs, static: Static | None) -> tuple[int, tuple[int, int]]:
    """(batch, latent (h, w)) the graph is traced with: the static shape, else the smallest that divides."""
    if static is None:
        m = latent_multiple(configs)
        return 1, (2 * m, 2 * m)
    scale = configs.vae.downscale
    if static.width % (scale * latent_multiple(configs)) or static.height % (scale * latent_multiple(configs)):
        raise ValueError(f"--static {static.width}x{static.height}: sides must be multiples of "
                         f"{scale * latent_multiple(configs)} pixels for this model")
    batch = static.batch if component.startswith("unet") else 1
    return batch, (static.height // scale, static.width // scale)


def with_deep_features(unet_inputs: dict[str, torch.Tensor], unet: nn.Module, depth: int
                       ) -> dict[str, torch.Tensor]:
    """The shallow graph's inputs: U-Net inputs plus the deep features the full pass makes from them."""
    with torch.no_grad():
        _, deep = unet.forward_with_features(**unet_inputs, depth=depth)
    return {**unet_inputs, "deep_features": deep}


def export_component(component: str, module: nn.Module, inputs: dict[str, torch.Tensor], path: Path,
                     static: bool = False) -> Path:
    """Trace `module` with `inputs` into `path` (external data when large); returns path.

    `component` names the signature: a graph name, or `unet_features` for the U-Net with deep features."""
    sig = SIGNATURES.get(component)
    if component in TEXT_ENCODERS:
        sig = text_encoder_signature(module.module.config.num_hidden_layers, component)
    extra = module.extra if isinstance(module, _UNetWrapper) else ()  # in unet_extra_inputs' order
    if extra:  # SDXL's added conditioning, an LCM U-Net's guidance embedding, after the usual inputs
        sig = Signature(sig.inputs + extra, sig.outputs, {**sig.dynamic_axes, **{n: {0: "batch_size"} for n in extra}})
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.parent / "_trace"
    scratch.mkdir(exist_ok=True)
    raw = scratch / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected and verified after
        torch.onnx.export(module, tuple(inputs[n] for n in sig.inputs), str(raw), input_names=list(sig.inputs),
                          output_names=list(sig.outputs), dynamic_axes=None if static else sig.dynamic_axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    # the TorchScript exporter scatters >2 GB weights over one file per tensor: gather them into one, tensor by
    # tensor (loading them would hold the weights twice while the PyTorch module still holds them once)
    external.gather(raw, path, EXTERNAL_DATA_NAME, EXTERNAL_DATA_BYTES)
    shutil.rmtree(scratch)
    return path


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to path, with its weights in `model.onnx_data` beside it when over the protobuf limit."""
    data = path.parent / EXTERNAL_DATA_NAME
    if data.exists():
        data.unlink()
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def split_features(path: Path) -> tuple[Path, Path]:
    """A U-Net graph with outputs (out_sample, deep_features) -> `model.onnx` (optimum's one-output signature)
    and FEATURES_FILE beside it, both reading the same weights file, so the folder holds the weights once.

    optimum's pipeline takes the U-Net's first output after renaming, so an extra output would break it.
    """
    return split_outputs(path, lambda name: name == "deep_features", FEATURES_FILE)


def split_hidden_states(path: Path) -> tuple[Path, Path]:
    """The text encoder with every layer's output -> `model.onnx` of optimum's two outputs, and
    HIDDEN_STATES_FILE with all of them (for clip skip), sharing one weights file."""
    return split_outputs(path, lambda name: name.startswith("hidden_states."), HIDDEN_STATES_FILE)


def split_outputs(path: Path, extra: Callable[[str], bool], second: str) -> tuple[Path, Path]:
    """The graph at `path` -> `second` beside it, as it is, and `path` without the outputs `extra` names; both
    read the same weights file."""
    model = onnx.load(str(path))
    data = path.parent / EXTERNAL_DATA_NAME
    if data.exists():  # the writer appends to an existing data file
        data.unlink()
    full = path.parent / second
    onnx.save_model(model, str(full), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_NAME, size_threshold=1024)
    plain = onnx.load(str(full), load_external_data=False)
    keep = [o for o in plain.graph.output if not extra(o.name)]
    del plain.graph.output[:]
    plain.graph.output.extend(keep)
    _prune(plain.graph)
    onnx.save_model(plain, str(path))
    return path, full


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (e.g. the fp16 graph's Cast of the removed output)."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)
