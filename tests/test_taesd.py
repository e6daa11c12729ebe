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


# ------------------------------------------------------------------------------------ sdonnx export --tiny-vae


def run_cli(*args) -> object:
    from click.testing import CliRunner

    from sdonnx.export import cli as export_cli

    return CliRunner().invoke(export_cli.export, [*map(str, args), "--quiet"])


def diffusers_twin(model: AutoencoderTiny):
    """diffusers' AutoencoderTiny holding our model's weights."""
    from diffusers import AutoencoderTiny as Reference

    ref = Reference.from_config(model.config.to_dict())
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import tiny_sd

    return tiny_sd.save_pipeline(tmp_path_factory.mktemp("tiny-sd") / "sd1", seed=1)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "with-tiny-vae"
    result = run_cli(source, out, "--tiny-vae", "random")
    assert result.exit_code == 0, result.output
    return out


def session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_export_writes_verified_tiny_vae_graphs(exported):
    import hashlib

    meta = json.loads((exported / "sdonnx.json").read_text())
    on_disk = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()} - {"sdonnx.json"}
    assert set(meta["files"]) == on_disk
    for part in ("vae_encoder_tiny", "vae_decoder_tiny"):
        for name in ("model.onnx", "config.json"):
            data = (exported / part / name).read_bytes()
            assert meta["files"][f"{part}/{name}"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        info = meta["components"][part]
        assert info["precision"] == "fp32" and info["verify"]["psnr"] > 60 and info["verify"]["max_abs_err"] < 1e-4
        assert info["ops"]["Conv"] > 0
    assert set(meta["components"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder", "vae_encoder_tiny",
                                       "vae_decoder_tiny"}
    assert meta["tiny_vae"] == {"source": "random", "encoder": "vae_encoder_tiny/model.onnx",
                                "decoder": "vae_decoder_tiny/model.onnx", "latent_channels": 4,
                                "vae_scale_factor": meta["vae_scale_factor"], "scaling_factor": 1.0,
                                "shift_factor": 0.0}
    config = TinyVAEConfig.from_dict(json.loads((exported / "vae_decoder_tiny" / "config.json").read_text()))
    assert config == tiny_vae.random_tiny_vae(downscale=meta["vae_scale_factor"]).config


@torch.no_grad()
def test_exported_tiny_vae_matches_diffusers(exported):
    """The graphs, at a batch and size they were not traced with, against diffusers' AutoencoderTiny holding the
    weights `random` stands for (seed 0, fitted to the tiny model's 2x downscale)."""
    ref = diffusers_twin(tiny_vae.random_tiny_vae(seed=0, downscale=2))
    encoder = session(exported / "vae_encoder_tiny" / "model.onnx")
    decoder = session(exported / "vae_decoder_tiny" / "model.onnx")
    names = [([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) for s in (encoder, decoder)]
    assert names == [(["sample"], ["latent_sample"]), (["latent_sample"], ["sample"])]
    for s in (encoder, decoder):  # batch and sizes stay dynamic
        assert all(isinstance(d, str) for a in s.get_inputs() + s.get_outputs() for d in (a.shape[0], *a.shape[2:]))
    torch.manual_seed(2)
    image = torch.rand(3, 3, 10, 14) * 2 - 1
    latents = torch.randn(3, 4, 5, 7) * 2
    for got, want in ((encoder.run(None, {"sample": image.numpy()})[0], ref.encode(image).latents),
                      (decoder.run(None, {"latent_sample": latents.numpy()})[0], ref.decode(latents).sample)):
        assert want.std() > 1e-3
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


def test_optimum_runs_the_tiny_graphs_as_its_vae(exported, source, tmp_path):
    """Swapped in as optimum's vae_encoder/vae_decoder (their config.json says scaling_factor 1), the tiny graphs
    give the images of diffusers' pipeline with pipe.vae = AutoencoderTiny."""
    import shutil

    import numpy as np
    from diffusers import StableDiffusionPipeline
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    folder = tmp_path / "optimum"
    shutil.copytree(exported, folder)
    for part in ("vae_encoder", "vae_decoder"):
        shutil.rmtree(folder / part)
        (folder / f"{part}_tiny").rename(folder / part)
    pipe = StableDiffusionPipeline.from_pretrained(source)
    pipe.vae = diffusers_twin(tiny_vae.random_tiny_vae(seed=0, downscale=2))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=7.5, output_type="np")
    got = ORTStableDiffusionPipeline.from_pretrained(folder)("a red circle", latents=latents, **kwargs).images
    want = pipe("a red circle", latents=latents, **kwargs).images
    assert want.std() > 1e-3
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_bad_tiny_vae_fails_in_one_line_before_any_export(source, tmp_path, monkeypatch):
    from sdonnx.export import cli as export_cli

    def no_export(*args, **kwargs):
        raise AssertionError("a graph was exported before the tiny VAE was checked")

    monkeypatch.setattr(export_cli.graphs, "export_component", no_export)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "taesd_encoder.safetensors").write_bytes(b"garbage")
    (broken / "taesd_decoder.safetensors").write_bytes(b"garbage")
    sd3_like = tmp_path / "sd3-like"  # 16 latent channels, the right 2x scale
    reference(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
              num_decoder_blocks=(1, 1), latent_channels=16).save_pretrained(sd3_like)
    taesd = tmp_path / "taesd"  # 4 latent channels but 8x
    reference().save_pretrained(taesd)
    out = tmp_path / "out"
    cases = {tmp_path / "missing": "no such file", broken: "not a readable safetensors",
             sd3_like: "16 latent channels but the model's VAE has 4",
             taesd: "scales images by 8 but the model's VAE by 2", "random:sdxl": "unknown tiny VAE"}
    for path, expected in cases.items():
        result = run_cli(source, out, "--tiny-vae", path)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert expected in lines[0], lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "sd3-like", "taesd"]  # nothing written


@torch.no_grad()
def test_real_taesd_graphs_keep_sizes_dynamic(tmp_path):
    """The standard (8x, four-stage) TAESD exports and runs at a batch and size other than the traced one."""
    from sdonnx.export import onnx as graphs
    from sdonnx.export import verify

    model = tiny_vae.random_tiny_vae(seed=0)
    for component in graphs.TINY_VAE_COMPONENTS:
        module = graphs.wrap(component, {"tiny_vae": model})
        path = graphs.export_component(component, module,
                                       graphs.tiny_vae_inputs(component, model.config, 1, (2, 2)),
                                       tmp_path / component / "model.onnx")
        inputs = graphs.tiny_vae_inputs(component, model.config, 2, (3, 5), seed=1)
        want = module(**inputs)
        got = verify.run_graph(path, {k: v.numpy() for k, v in inputs.items()}, threads=1)[0]
        assert got.shape == tuple(want.shape) == ((2, 4, 3, 5) if component == "vae_encoder_tiny" else (2, 3, 24, 40))
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)
