"""Our tiny VAE (TAESD) against diffusers' AutoencoderTiny with the same random weights, and its weight sources."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from sdonnx.export import tiny_vae
from sdonnx.export.models import TINY_VAE_PRESETS, AutoencoderTiny, ConfigError, TinyVAEConfig, VAEConfig

TOL = 1e-5
# A nudge of the input this size must move the reference output by at most TOL / 10: then a TOL-sized
# difference is a real disagreement, not amplified float rounding.
NUDGE = 1e-6
# small enough for speed; three stages and unequal block counts so that index arithmetic is exercised
TINY = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 2, 3),
            num_decoder_blocks=(3, 2, 1), latent_channels=4)


def reference(seed: int = 0, **config):
    from diffusers import AutoencoderTiny as Reference

    torch.manual_seed(seed)
    return Reference(**config).eval()


def ours_from(ref) -> AutoencoderTiny:
    model = AutoencoderTiny(TinyVAEConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


def assert_matches(fn_ours, fn_ref, x: torch.Tensor) -> None:
    """ours(x) == reference(x) within TOL, on a reference that is well-conditioned at x and not constant."""
    want = fn_ref(x)
    nudged = fn_ref(x + NUDGE * torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    assert (nudged - want).abs().max() < TOL / 10, "reference is ill-conditioned here: the tolerance means nothing"
    assert want.std() > 1e-3, "a constant reference output proves nothing"
    got = fn_ours(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("config", [TINY, {}], ids=["tiny", "taesd"])
@torch.no_grad()
def test_encoder_and_decoder_match_diffusers(config):
    ref = reference(**config)
    ours = ours_from(ref)
    scale = ours.config.downscale
    torch.manual_seed(1)
    image = torch.rand(2, 3, 3 * scale, 2 * scale) * 2 - 1  # batch 2, not square
    assert_matches(ours.encode, lambda x: ref.encode(x).latents, image)
    latents = torch.randn(2, 4, 3, 2) * 2  # reaches into the decoder's tanh soft clamp
    assert_matches(ours.decode, lambda z: ref.decode(z).sample, latents)
    assert_matches(ours, lambda x: ref.decode(ref.encode(x).latents).sample, image)


def test_config_round_trips_through_diffusers():
    from diffusers import AutoencoderTiny as Reference

    ref = reference(**TINY)
    cfg = TinyVAEConfig.from_dict(dict(ref.config))
    assert (cfg.num_encoder_blocks, cfg.num_decoder_blocks, cfg.downscale) == ((1, 2, 3), (3, 2, 1), 4)
    again = Reference.from_config(cfg.to_dict())
    assert TinyVAEConfig.from_dict(dict(again.config)) == cfg
    assert TinyVAEConfig.from_dict(dict(reference().config)) == TINY_VAE_PRESETS["taesd"] == TinyVAEConfig()
    assert (cfg.scaling_factor, cfg.shift_factor) == (1.0, 0.0)  # TAESD's latents are already scaled


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ConfigError, match="must all be equal"):
        TinyVAEConfig(encoder_block_out_channels=(32, 64, 64, 64))
    with pytest.raises(ConfigError, match="one block count per stage"):
        TinyVAEConfig(num_decoder_blocks=(3, 3, 1))
    with pytest.raises(ConfigError, match="as many stages"):
        TinyVAEConfig(encoder_block_out_channels=(64,) * 3, num_encoder_blocks=(1, 3, 3))
    with pytest.raises(ConfigError, match="act_fn"):
        TinyVAEConfig.from_dict({"act_fn": "silu"})


def test_original_layout_is_taesds_sequential():
    """The key facts of taesd.py's nn.Sequential (encoder: conv, blocks, stride-2 convs without bias, conv out;
    decoder: clamp, conv, ReLU, blocks, upsample + conv without bias, conv out) for the standard TAESD."""
    encoder, decoder = tiny_vae.to_original(reference().state_dict())
    assert encoder["0.weight"].shape == (64, 3, 3, 3) and "1.conv.0.weight" in encoder
    assert "2.weight" in encoder and "2.bias" not in encoder  # the first stride-2 conv
    assert encoder["14.weight"].shape == (4, 64, 3, 3) and max(int(k.split(".")[0]) for k in encoder) == 14
    assert min(int(k.split(".")[0]) for k in decoder) == 1  # layer 0 is the clamp, layer 2 a ReLU
    assert decoder["1.weight"].shape == (64, 4, 3, 3) and "3.conv.0.weight" in decoder and "2.weight" not in decoder
    assert "7.weight" in decoder and "7.bias" not in decoder and "6.weight" not in decoder  # 6: upsample
    assert decoder["19.weight"].shape == (3, 64, 3, 3) and "19.bias" in decoder


@pytest.fixture
def saved(tmp_path):
    """(reference, folder holding its diffusers layout and its original pair: .pth encoder, .safetensors decoder)"""
    ref = reference(**TINY)
    ref.save_pretrained(tmp_path / "diffusers")
    encoder, decoder = tiny_vae.to_original(ref.state_dict())
    pair = tmp_path / "pair"
    pair.mkdir()
    torch.save(encoder, pair / "taesd_encoder.pth")
    save_file({k: v.contiguous() for k, v in decoder.items()}, str(pair / "taesd_decoder.safetensors"))
    return ref, tmp_path


@torch.no_grad()
def test_every_source_layout_loads_the_same_model(saved):
    ref, root = saved
    z = torch.randn(1, 4, 3, 2)
    image = torch.rand(1, 3, 12, 8) * 2 - 1
    sources = [root / "diffusers", root / "pair", root / "pair" / "taesd_encoder.pth",
               root / "pair" / "taesd_decoder.safetensors"]
    for source in sources:
        model = tiny_vae.load_tiny_vae(source)
        assert model.config == TinyVAEConfig.from_dict(dict(ref.config)), source  # the pair's read from shapes
        assert_matches(model.decode, lambda x: ref.decode(x).sample, z)
        assert_matches(model.encode, lambda x: ref.encode(x).latents, image)
    weights = tiny_vae.read_tiny_vae(root / "pair")
    assert tiny_vae.from_original(*tiny_vae.to_original(weights.state_dict)).keys() == weights.state_dict.keys()


def test_random_is_taesd_seeded_and_fits_the_model():
    before = torch.get_rng_state()
    a, b, c = tiny_vae.random_tiny_vae(seed=0), tiny_vae.random_tiny_vae(seed=0), tiny_vae.random_tiny_vae(seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left alone
    assert a.config == TINY_VAE_PRESETS["taesd"] and a.config.latent_channels == 4 and a.config.downscale == 8
    w = "decoder.layers.3.conv.0.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert tiny_vae.random_tiny_vae("taesdxl").config == TINY_VAE_PRESETS["taesdxl"]
    small = tiny_vae.random_tiny_vae(downscale=2).config
    assert (small.downscale, small.num_encoder_blocks, small.num_decoder_blocks) == (2, (1, 3), (3, 1))
    # random against a model: its stages follow the model's VAE
    vae = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    block_out_channels=(32, 64))
    fitted = tiny_vae.load_tiny_vae("random", seed=3, vae=vae)
    assert fitted.config == small
    assert torch.equal(fitted.state_dict()[w], tiny_vae.random_tiny_vae(seed=3, downscale=2).state_dict()[w])


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, ValueError)
    return text


def test_bad_sources_fail_in_one_line(saved, tmp_path):
    ref, root = saved
    cases = {}
    cases["no such file"] = tmp_path / "missing"
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "taesd_encoder.safetensors").write_bytes(b"not a tensor file")
    (garbage / "taesd_decoder.safetensors").write_bytes(b"not a tensor file")
    cases["not a readable safetensors"] = garbage
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "taesd_encoder.pth").write_bytes(b"\x80\x04garbage")
    (pickled / "taesd_decoder.pth").write_bytes(b"\x80\x04garbage")
    cases["not a readable PyTorch"] = pickled / "taesd_encoder.pth"
    half = tmp_path / "half"
    half.mkdir()
    (half / "taesd_encoder.pth").write_bytes((root / "pair" / "taesd_encoder.pth").read_bytes())
    cases["is missing"] = half
    several = tmp_path / "several"
    several.mkdir()
    for name in ("taesd_encoder.pth", "taesdxl_encoder.pth"):
        (several / name).write_bytes(b"")
    cases["several encoders"] = several
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")  # neither layout's file names
    cases["neither a diffusers folder"] = empty
    kl = tmp_path / "kl"
    kl.mkdir()
    (kl / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    cases["not an AutoencoderTiny"] = kl
    cases["unknown tiny VAE random:sd3"] = "random:sd3"
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    encoder, decoder = tiny_vae.to_original(ref.state_dict())
    torch.save(decoder, swapped / "taesd_encoder.pth")
    torch.save(encoder, swapped / "taesd_decoder.pth")
    cases["not TAESD's architecture"] = swapped
    for expected, source in cases.items():
        with pytest.raises(ValueError) as err:
            tiny_vae.read_tiny_vae(source)
        assert expected in one_line(err), (source, str(err.value))


def test_latent_space_mismatch_fails_in_one_line(saved):
    _, root = saved
    sd_vae = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                       block_out_channels=(8, 8, 8))
    assert tiny_vae.load_tiny_vae(root / "diffusers", vae=sd_vae).config.downscale == 4
    with pytest.raises(ValueError) as err:
        tiny_vae.load_tiny_vae(root / "diffusers", vae=dataclasses.replace(sd_vae, latent_channels=16))
    assert "4 latent channels but the model's VAE has 16" in one_line(err)
    with pytest.raises(ValueError) as err:
        tiny_vae.load_tiny_vae(root / "diffusers", vae=VAEConfig())  # one stage: no downscaling
    assert "scales images by 4 but the model's VAE by 1" in one_line(err)
