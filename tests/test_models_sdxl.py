"""Our SDXL models (U-Net layouts of SDXL and its distillations, the projected text encoder) against
diffusers/transformers holding the same random weights; the full-size presets checked on the meta device."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import tiny_sdxl
from sdonnx.export.models import (PRESETS, CLIPConfig, CLIPTextModel, CLIPTextModelWithProjection, ConfigError,
                                  UNet2DConditionModel, UNetConfig, get_preset)

TOL = 1e-4
LAYOUTS = {
    "sdxl": tiny_sdxl.unet_config("sdxl"),
    "sdxl-inpaint": tiny_sdxl.unet_config("sdxl-inpaint"),
    "ssd-1b": tiny_sdxl.distilled_unet_config("ssd-1b"),
    "vega": tiny_sdxl.distilled_unet_config("vega"),
}


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Diffusers zero-initialises some layers; random ones everywhere make every path show in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)  # keeps activations near unit variance
            else:
                p.add_(torch.randn_like(p) * 0.1)  # norms stay near 1, biases near 0
    return module.eval()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def unets(request):
    """(diffusers U-Net, ours) holding the same random weights (loaded strictly)."""
    from diffusers import UNet2DConditionModel as Reference

    ref = randomise(Reference(**LAYOUTS[request.param]), 0)
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(unet: UNet2DConditionModel, batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 1) -> dict:
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, cfg.in_channels, *size, generator=g),
                encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
                text_embeds=torch.randn(batch, cfg.text_embeds_dim, generator=g),
                time_ids=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                                       [768.0, 512.0, 16.0, 8.0, 1024.0, 896.0]][:batch]))


def reference(ref, timestep, x: dict) -> torch.Tensor:
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    return ref(x["sample"], timestep, x["encoder_hidden_states"], added_cond_kwargs=added).sample


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 1e-2, "reference output is ~zero: the comparison would prove nothing"
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("timestep", [torch.tensor(981.0), 7, torch.tensor([3, 640])], ids=["0d", "int", "per-sample"])
@torch.no_grad()
def test_unet_matches_diffusers(unets, timestep):
    ref, ours = unets
    x = inputs(ours)
    close(ours(x["sample"], timestep, x["encoder_hidden_states"], text_embeds=x["text_embeds"],
               time_ids=x["time_ids"]), reference(ref, timestep, x))


@torch.no_grad()
def test_unet_odd_size_and_added_conditioning_matter(unets):
    ref, ours = unets
    x = inputs(ours, batch=1, size=(13, 10))
    out = ours(x["sample"], 500, x["encoder_hidden_states"], text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    close(out, reference(ref, 500, x))
    # the pooled text and the size/crop numbers reach the output (else the check above would not cover them)
    for key in ("text_embeds", "time_ids"):
        other = {**x, key: x[key] * 0.5 + 1}
        moved = ours(other["sample"], 500, other["encoder_hidden_states"], text_embeds=other["text_embeds"],
                     time_ids=other["time_ids"])
        assert (moved - out).abs().max() > 1e-3, key


def test_layouts_build_diffusers_blocks(unets):
    """Same modules in the same places: per-layer transformer depths, the reverse path, the mid block."""
    ref, ours = unets
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for a, b in [*zip(ours.down_blocks, ref.down_blocks), *zip(ours.up_blocks, ref.up_blocks),
                 (ours.mid_block, ref.mid_block)]:
        assert depths(a) == depths(b)
    assert len(ours.mid_block.resnets) == (2 if ours.config.mid_depth else 1)


def depths(block: torch.nn.Module) -> list[int]:
    return [len(a.transformer_blocks) for a in getattr(block, "attentions", [])]


@torch.no_grad()
def test_step_cache_methods_reproduce_the_full_pass(unets):
    _, ours = unets
    x = inputs(ours)
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    full = ours(x["sample"], 300.0, x["encoder_hidden_states"], **added)
    for depth in range(ours.config.layers_per_block + 1):
        out, deep = ours.forward_with_features(x["sample"], 300.0, x["encoder_hidden_states"], depth, **added)
        assert torch.equal(out, full)
        shallow = ours.forward_shallow(x["sample"], 300.0, x["encoder_hidden_states"], deep, depth, **added)
        torch.testing.assert_close(shallow, full, rtol=0, atol=1e-5)
        other = {"text_embeds": added["text_embeds"] + 1, "time_ids": added["time_ids"]}
        moved = ours.forward_shallow(x["sample"], 300.0, x["encoder_hidden_states"], deep, depth, **other)
        assert not torch.allclose(moved, full)  # the shallow branch reads the added conditioning too


def test_sdxl_inputs_are_required_exactly_when_the_unet_takes_them(unets):
    _, ours = unets
    x = inputs(ours, batch=1)
    with pytest.raises(ValueError, match="text_embeds and time_ids must be given"):
        ours(x["sample"], 1, x["encoder_hidden_states"], text_embeds=x["text_embeds"])
    with pytest.raises(ValueError, match="text_embeds and time_ids must be given"):
        ours.forward_shallow(x["sample"], 1, x["encoder_hidden_states"], x["sample"], 0)
    sd = UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                                         "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                         layers_per_block=1, cross_attention_dim=16, attention_head_dim=2))
    with pytest.raises(ValueError, match="text_embeds and time_ids must be given"):
        sd(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 3, 16), text_embeds=torch.zeros(1, 4),
           time_ids=torch.zeros(1, 6))


def test_configs_round_trip_through_diffusers(unets):
    from diffusers import UNet2DConditionModel as Reference

    ref, ours = unets
    cfg = ours.config
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.is_sdxl and cfg.text_embeds_dim == tiny_sdxl.TEXT_2
    # our written config.json is read back by diffusers as the same model
    assert as_json(Reference.from_config(cfg.to_dict()).config) == as_json(ref.config)


def as_json(config) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


@torch.no_grad()
def test_projected_text_encoder_matches_transformers():
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModelWithProjection as Reference

    d = tiny_sdxl.clip_config(tiny_sdxl.TEXT_2, 300, "gelu")
    ref = randomise(Reference(CLIPTextConfig(**d)), 2)
    ours = CLIPTextModelWithProjection(CLIPConfig.from_dict(ref.config.to_dict())).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(0, 298, (2, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 9] = d["eos_token_id"]
    theirs = ref(ids, output_hidden_states=True)
    embeds, hidden = ours(ids)
    close(embeds, theirs.text_embeds)
    close(hidden, theirs.last_hidden_state)
    every = ours.forward_all(ids)
    assert len(every) == 2 + d["num_hidden_layers"] + 1
    close(every[0], theirs.text_embeds)
    for a, b in zip(every[2:], theirs.hidden_states):
        close(a, b)
    # the config.json we would write names the projected class and reads back the same
    written = ours.config.to_dict(projection=True)
    assert written["architectures"] == ["CLIPTextModelWithProjection"]
    assert CLIPConfig.from_dict(written) == ours.config


def meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, in_channels, sample_size", [("sdxl", 4, 128), ("sdxl-turbo", 4, 64),
                                                            ("sdxl-inpaint", 9, 128)])
def test_sdxl_presets_are_sdxl_base_on_the_meta_device(name, in_channels, sample_size):
    """Full size without allocating: our modules have diffusers'/transformers' shapes and SDXL's parameter counts."""
    import diffusers
    import transformers

    p = get_preset(name)
    assert p.is_sdxl and p.clip2 is not None and p.vae.scaling_factor == 0.13025
    assert (p.unet.in_channels, p.unet.sample_size) == (in_channels, sample_size)
    with torch.device("meta"):
        ours = (CLIPTextModel(p.clip), CLIPTextModelWithProjection(p.clip2), UNet2DConditionModel(p.unet))
        refs = (transformers.CLIPTextModel(transformers.CLIPTextConfig(**p.clip.to_dict())),
                transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**p.clip2.to_dict(True))),
                diffusers.UNet2DConditionModel.from_config(p.unet.to_dict()))
    for a, b in zip(ours, refs):
        assert meta_shapes(a) == meta_shapes(b)
    unet = 2_567_463_684 + (in_channels - 4) * 320 * 9  # conv_in takes the extra inpainting channels
    assert tuple(count(m) for m in ours) == (123_060_480, 694_659_840, unet)
    assert [len(a.transformer_blocks) for b in ours[2].down_blocks for a in b.attentions] == [2, 2, 10, 10]
    assert len(ours[2].mid_block.attentions[0].transformer_blocks) == 10


def test_presets_name_sdxl():
    assert {n for n, p in PRESETS.items() if p.is_sdxl} == {"sdxl", "sdxl-turbo", "sdxl-inpaint", "tiny-sdxl"}
    assert not any(p.clip2 for n, p in PRESETS.items() if not p.is_sdxl)
    assert get_preset("sdxl-turbo").unet == dataclasses.replace(get_preset("sdxl").unet, sample_size=64)


def test_bad_sdxl_configs_raise_clear_errors():
    base = LAYOUTS["sdxl"]
    with pytest.raises(ConfigError, match="needs reverse_transformer_layers_per_block"):
        UNetConfig.from_dict({**base, "transformer_layers_per_block": [1, [2]]})
    with pytest.raises(ConfigError, match="transformer_layers_per_block needs 2 entries"):
        UNetConfig.from_dict({**base, "transformer_layers_per_block": [1, 2, 3]})
    with pytest.raises(ConfigError, match="reverse_transformer_layers_per_block needs 2 entries"):
        UNetConfig.from_dict({**base, "reverse_transformer_layers_per_block": [[1, 1, 1], 1]})
    with pytest.raises(ConfigError, match="addition_embed_type='text'"):
        UNetConfig.from_dict({**base, "addition_embed_type": "text"})
    with pytest.raises(ConfigError, match="needs addition_time_embed_dim"):
        UNetConfig.from_dict({**base, "addition_time_embed_dim": None})
    with pytest.raises(ConfigError, match="mid_block_type='UNetMidBlock2DSimpleCrossAttn'"):
        UNetConfig.from_dict({**base, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})


@torch.no_grad()
def test_sdxl_unet_exports_with_dynamic_batch_and_size():
    """The added conditioning traces to ONNX without fixing the batch: traced at batch 2, run at batch 3."""
    from test_models import export_and_run

    torch.manual_seed(4)
    unet = randomise(UNet2DConditionModel(UNetConfig.from_dict(LAYOUTS["sdxl"])), 4)
    x = inputs(unet, batch=2)
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    args = (x["sample"], torch.tensor(1.0), x["encoder_hidden_states"], None, x["text_embeds"], x["time_ids"])
    feed = inputs(unet, batch=3, size=(8, 12), seed=9)
    feed["time_ids"] = torch.cat([feed["time_ids"], feed["time_ids"][:1] * 0.5])
    dynamic = {n: {0: "B"} for n in names if n != "timestep"}
    dynamic["sample"] = {0: "B", 2: "H", 3: "W"}
    [out] = export_and_run(unet, args, names, ["out_sample"], dynamic,
                           {**{k: v.numpy() for k, v in feed.items()}, "timestep": np.array(421.0, np.float32)})
    expected = unet(feed["sample"], 421.0, feed["encoder_hidden_states"], text_embeds=feed["text_embeds"],
                    time_ids=feed["time_ids"])
    np.testing.assert_allclose(out, expected.numpy(), atol=TOL)
