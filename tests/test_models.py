"""Our PyTorch models against diffusers/transformers holding the same random weights."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

import tiny_sd
from sdonnx.export.models import (PRESETS, AutoencoderKL, CLIPConfig, CLIPTextModel, ConfigError, UNet2DConditionModel,
                                  UNetConfig, VAEConfig, get_preset)

FAMILIES = ("sd1", "sd2", "inpaint")
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(reference pipeline, our clip, vae, unet) with the reference's weights loaded strictly."""
    ref = tiny_sd.make_pipeline(request.param)
    clip = CLIPTextModel(CLIPConfig.from_dict(ref.text_encoder.config.to_dict()))
    vae = AutoencoderKL(VAEConfig.from_dict(dict(ref.vae.config)))
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.unet.config)))
    for ours, theirs in ((clip, ref.text_encoder), (vae, ref.vae), (unet, ref.unet)):
        ours.load_state_dict(theirs.state_dict(), strict=True)
        ours.eval()
    return ref, clip, vae, unet


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 1e-3, "reference output is all zeros: the comparison would prove nothing"
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@torch.no_grad()
def test_clip_matches_transformers(pair):
    ref, clip, _, _ = pair
    ids = torch.from_numpy(np.stack([ref.tokenizer(p, padding="max_length", max_length=77).input_ids for p in
                                     ("a red circle on a blue background", "a photo of a cat")]))
    theirs = ref.text_encoder(ids)
    hidden, pooled = clip(ids)
    close(hidden, theirs.last_hidden_state)
    close(pooled, theirs.pooler_output)


@torch.no_grad()
def test_clip_pooled_uses_argmax_for_legacy_eos_id():
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as Reference

    d = dict(tiny_sd.clip_config("sd1", 100), bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    ref = Reference(CLIPTextConfig(**d)).eval()
    ours = CLIPTextModel(CLIPConfig.from_dict(d))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(3, 90, (3, 12))
    ids[:, 5] = 2  # an eos id that is not the largest: the legacy rule still takes the argmax
    close(ours(ids)[1], ref(ids).pooler_output)


@torch.no_grad()
def test_vae_matches_diffusers(pair):
    ref, _, vae, _ = pair
    torch.manual_seed(1)
    image = torch.rand(2, 3, 32, 48) * 2 - 1
    dist = ref.vae.encode(image).latent_dist
    mean, logvar = vae.encode(image)
    close(mean, dist.mean)
    close(logvar, dist.logvar)
    z = torch.randn(2, 4, 12, 8)
    close(vae.decode(z), ref.vae.decode(z).sample)


@pytest.mark.parametrize("timestep", [torch.tensor(981.0), 7, torch.tensor([3, 640])], ids=["0d", "int", "per-sample"])
@torch.no_grad()
def test_unet_matches_diffusers(pair, timestep):
    ref, _, _, unet = pair
    torch.manual_seed(2)
    sample = torch.randn(2, unet.config.in_channels, 16, 16)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    close(unet(sample, timestep, text), ref.unet(sample, timestep, text).sample)


@torch.no_grad()
def test_unet_odd_latent_size_matches_diffusers(pair):
    ref, _, _, unet = pair
    sample = torch.randn(1, unet.config.in_channels, 13, 10)
    text = torch.randn(1, 5, unet.config.cross_attention_dim)
    close(unet(sample, 500, text), ref.unet(sample, 500, text).sample)


def as_json(config: dict) -> dict:
    """A diffusers config as its config.json would hold it, less bookkeeping keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


def test_configs_round_trip(pair):
    ref, clip, vae, unet = pair
    from diffusers import AutoencoderKL as RefVAE
    from diffusers import UNet2DConditionModel as RefUNet
    from transformers import CLIPTextConfig

    for model in (clip, vae, unet):
        cfg = model.config
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    # our written config.json is read back by the reference libraries as the same model
    assert as_json(RefUNet.from_config(unet.config.to_dict()).config) == as_json(ref.unet.config)
    assert as_json(RefVAE.from_config(vae.config.to_dict()).config) == as_json(ref.vae.config)
    theirs = CLIPTextConfig(**clip.config.to_dict())
    for f in dataclasses.fields(CLIPConfig):
        assert getattr(theirs, f.name) == getattr(ref.text_encoder.config, f.name), f.name


def meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, counts", [
    ("sd15", (123_060_480, 83_653_863, 859_520_964)),
    ("sd15-inpaint", (123_060_480, 83_653_863, 859_535_364)),
    ("sd15-lcm", (123_060_480, 83_653_863, 859_520_964 + 256 * 320)),
    ("sd21", (340_387_840, 83_653_863, 865_910_724)),
    ("tiny", None),
])
def test_presets_build_the_reference_architectures(name, counts):
    import diffusers
    import transformers

    p = get_preset(name)
    with torch.device("meta"):  # full-size shapes without allocating weights
        ours = (CLIPTextModel(p.clip), AutoencoderKL(p.vae), UNet2DConditionModel(p.unet))
        refs = (transformers.CLIPTextModel(transformers.CLIPTextConfig(**p.clip.to_dict())),
                diffusers.AutoencoderKL.from_config(p.vae.to_dict()),
                diffusers.UNet2DConditionModel.from_config(p.unet.to_dict()))
    for a, b in zip(ours, refs):
        assert meta_shapes(a) == meta_shapes(b)
    if counts:
        assert tuple(sum(t.numel() for t in m.parameters()) for m in ours) == counts


def test_presets_name_their_unet_kind():
    kinds = {name: (p.unet.is_lcm, p.unet.is_inpaint) for name, p in PRESETS.items()}
    assert kinds == {"sd15": (False, False), "sd15-inpaint": (False, True), "sd15-lcm": (True, False),
                     "sd21": (False, False), "sd-turbo": (False, False), "tiny": (False, False),
                     "sdxl": (False, False), "sdxl-turbo": (False, False), "sdxl-inpaint": (False, True),
                     "tiny-sdxl": (False, False)}
    # the inpainting layout is latents + mask + masked-image latents, whatever the latent width
    assert UNetConfig(in_channels=17, out_channels=8).is_inpaint and not UNetConfig(in_channels=8).is_inpaint


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ConfigError, match="unknown preset 'sd99'"):
        get_preset("sd99")
    with pytest.raises(ConfigError, match="hidden_act='relu'"):
        CLIPConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(ConfigError, match="class_embed_type='timestep'"):
        UNetConfig.from_dict({"class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match="unsupported down block 'AttnDownBlock2D'"):
        UNetConfig.from_dict({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"], "block_out_channels": [32, 64],
                              "up_block_types": ["UpBlock2D", "UpBlock2D"]})
    with pytest.raises(ConfigError, match="attention_head_dim needs 4 entries"):
        UNetConfig.from_dict({"attention_head_dim": [5, 10]})
    with pytest.raises(ConfigError, match="shift_factor"):
        VAEConfig.from_dict({"shift_factor": 0.1159})
    # unknown keys are ignored, per-block lists repeating the one supported value are fine
    assert UNetConfig.from_dict({"foo": 1, "only_cross_attention": [False] * 4}) == UNetConfig()
    assert dataclasses.replace(PRESETS["sd15"].unet, in_channels=9) == PRESETS["sd15-inpaint"].unet


def export_and_run(model: torch.nn.Module, args: tuple, names: list[str], outputs: list[str], dynamic: dict,
                   feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Export with the TorchScript exporter at opset 17, run `feed` (other shapes than `args`) in ORT."""
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(model, args, buf, input_names=names, output_names=outputs, dynamic_axes=dynamic,
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


class VAEPart(torch.nn.Module):
    """The VAE's encode (mean and logvar concatenated) or decode as a plain forward."""

    def __init__(self, vae: AutoencoderKL, part: str):
        super().__init__()
        self.vae, self.part = vae, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.vae.encode(x), dim=1) if self.part == "encode" else self.vae.decode(x)


@torch.no_grad()
def test_onnx_export_keeps_batch_and_size_dynamic():
    """sd2-style tiny models (linear projections, per-block heads): traced at one shape, run at others."""
    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPConfig.from_dict(tiny_sd.clip_config("sd2"))).eval()
    unet = UNet2DConditionModel(UNetConfig.from_dict(tiny_sd.unet_config("sd2"))).eval()
    vae = AutoencoderKL(VAEConfig.from_dict(tiny_sd.vae_config())).eval()
    rng = np.random.default_rng(0)

    ids = rng.integers(0, clip.config.vocab_size, (3, 77)).astype(np.int64)
    hidden, pooled = export_and_run(clip, (torch.zeros(1, 77, dtype=torch.long),), ["input_ids"],
                                    ["last_hidden_state", "pooler_output"], {"input_ids": {0: "B"}},
                                    {"input_ids": ids})
    theirs = clip(torch.from_numpy(ids))
    np.testing.assert_allclose(hidden, theirs[0].numpy(), atol=TOL)
    np.testing.assert_allclose(pooled, theirs[1].numpy(), atol=TOL)

    sample = rng.standard_normal((3, 4, 12, 20), dtype=np.float32)
    text = rng.standard_normal((3, 77, unet.config.cross_attention_dim), dtype=np.float32)
    [out] = export_and_run(unet, (torch.zeros(2, 4, 16, 16), torch.tensor(1.0), torch.zeros(2, 77, 48)),
                           ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                           {"sample": {0: "B", 2: "H", 3: "W"}, "encoder_hidden_states": {0: "B"}},
                           {"sample": sample, "timestep": np.array(421.0, np.float32), "encoder_hidden_states": text})
    expected = unet(torch.from_numpy(sample), torch.tensor(421.0), torch.from_numpy(text)).numpy()
    np.testing.assert_allclose(out, expected, atol=TOL)

    for part, shape in (("encode", (1, 3, 24, 40)), ("decode", (3, 4, 6, 10))):
        x = rng.standard_normal(shape, dtype=np.float32)
        trace = torch.zeros(2, shape[1], 16, 16)
        [out] = export_and_run(VAEPart(vae, part), (trace,), ["x"], ["y"],
                               {"x": {0: "B", 2: "H", 3: "W"}}, {"x": x})
        np.testing.assert_allclose(out, VAEPart(vae, part)(torch.from_numpy(x)).numpy(), atol=TOL)


@torch.no_grad()
def test_phase_upsampling_computes_the_vae_decoder_exactly():
    """The VAE decoder with its upsamplers as four 2x2 phase convolutions: the same image as diffusers' VAE, in
    PyTorch and as an ONNX graph (Conv with asymmetric pads, DepthToSpace) run at other sizes than traced."""
    import copy

    import onnx

    from sdonnx.export.models.layers import Upsample
    from sdonnx.export.onnx import PhaseUpsample, use_phase_upsampling

    ref = tiny_sd.make_pipeline("sd1").vae
    vae = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    vae.load_state_dict(ref.state_dict(), strict=True)
    phased = copy.deepcopy(vae).eval()
    assert use_phase_upsampling(copy.deepcopy(vae)) == 0  # the tiny VAE's channels are below the default's
    assert use_phase_upsampling(phased, min_channels=0) == sum(isinstance(m, Upsample) for m in vae.modules()) > 0
    assert not any(isinstance(m, Upsample) for m in phased.modules())
    torch.manual_seed(4)
    z = torch.randn(2, 4, 7, 5)  # sizes unlike the traced ones below, odd ones too
    expected = ref.decode(z).sample
    close(phased.decode(z), expected)
    # well-conditioned: a 1e-6 shift of the latents moves diffusers' image far less than the tolerance
    assert (ref.decode(z + 1e-6).sample - expected).abs().max() < TOL / 10

    buf = io.BytesIO()
    torch.onnx.export(VAEPart(phased, "decode"), (torch.zeros(1, 4, 8, 8),), buf, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "B", 2: "H", 3: "W"}}, opset_version=17,
                      dynamo=False)
    ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
    assert "Resize" not in ops and ops.count("DepthToSpace") == sum(isinstance(m, PhaseUpsample) for m in
                                                                    phased.modules())
    import onnxruntime as ort
    [got] = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": z.numpy()})
    close(torch.from_numpy(got), expected)


def test_phase_kernels_fold_the_three_taps_per_phase():
    """Row phase 0 reads input rows (i-1, i) with kernel rows (w0, w1 + w2), phase 1 rows (i, i+1) with
    (w0 + w1, w2); columns alike."""
    from sdonnx.export.onnx import phase_kernels

    w = torch.arange(9.0).view(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k00, k01, k10, k11 = (k[0, 0].tolist() for k in phase_kernels(w))
    assert k00 == [[0, 3], [9, 24]]  # rows (w0, w1 + w2) = ([0 1 2], [9 11 13]), then columns (c0, c1 + c2)
    assert k11 == [[8, 7], [13, 8]]  # rows (w0 + w1, w2) = ([3 5 7], [6 7 8]), columns (c0 + c1, c2)
    assert k01 == [[1, 2], [20, 13]] and k10 == [[3, 12], [6, 15]]


def test_phase_upsampling_refuses_a_skip_it_does_not_double_to():
    """A U-Net upsampler after an odd-sized skip crops nearest upsampling to 2n - 1; the phase form cannot, and says
    so rather than compute something else."""
    from sdonnx.export.models.layers import Upsample
    from sdonnx.export.onnx import PhaseUpsample

    up = PhaseUpsample(Upsample(4))
    x = torch.randn(1, 4, 5, 6)
    assert up(x, torch.zeros(1, 1, 10, 12)).shape == (1, 4, 10, 12)
    with pytest.raises(ValueError, match="doubles"):
        up(x, torch.zeros(1, 1, 9, 12))
