"""SDXL weight loading: diffusers SDXL folders, single-file SDXL checkpoints (SGM names), random SDXL presets, and
the SDXL sources we refuse (refiners, mismatched tokenizers) with one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tiny_sdxl
from helpers import one_line_error
from sdonnx.export.models.config import MID_PLAIN, CLIPConfig, ModelConfigs, UNetConfig, VAEConfig, get_preset
from sdonnx.export.weights import (RANDOM_PRESETS, CheckpointError, _read_tensors, build_models, components,
                                   convert_ldm, load_checkpoint, sniff_sdxl)

PARTS = ("text_encoder", "text_encoder_2", "vae", "unet")


pytestmark = pytest.mark.usefixtures("sdonnx_cache")


def with_unet(pipe, unet_config: dict):
    """The pipeline with another random U-Net (an SSD-1B- or Vega-like layout)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    pipe.unet = UNet2DConditionModel(**unet_config)
    pipe.register_modules(unet=pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return {"sdxl": tiny_sdxl.make_pipeline("sdxl"), "sdxl-inpaint": tiny_sdxl.make_pipeline("sdxl-inpaint"),
            "ssd-1b": with_unet(tiny_sdxl.make_pipeline("sdxl", seed=1), tiny_sdxl.distilled_unet_config("ssd-1b")),
            "vega": with_unet(tiny_sdxl.make_pipeline("sdxl", seed=2), tiny_sdxl.distilled_unet_config("vega"))}


@pytest.fixture(scope="module")
def folders(pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-folders")
    out = {}
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
        out[name] = root / name
    return out


def assert_same_tensors(ours: dict, ref: dict) -> None:
    ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


@torch.no_grad()
def assert_same_outputs(models: dict, pipe) -> None:
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 7] = pipe.text_encoder.config.eos_token_id
    hidden, pooled = models["text_encoder"](ids)
    torch.testing.assert_close(hidden, pipe.text_encoder(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    embeds, hidden_2 = models["text_encoder_2"](ids)
    ref = pipe.text_encoder_2(ids)
    torch.testing.assert_close(embeds, ref.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden_2, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(2)
    sample, context = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    out = models["unet"](sample, torch.tensor(500.0), context, **added)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out, pipe.unet(sample, 500, context, added_cond_kwargs=added).sample, atol=1e-5,
                               rtol=1e-5)


# ----------------------------------------------------------------------------------------- diffusers folders


@pytest.mark.parametrize("name", ["sdxl", "sdxl-inpaint", "ssd-1b", "vega"])
def test_folder_loads_reference_weights_and_outputs(name, folders, pipes):
    ckpt = load_checkpoint(folders[name])
    assert ckpt.family == ("sdxl-inpaint" if name == "sdxl-inpaint" else "sdxl")
    assert ckpt.configs.is_sdxl and ckpt.configs.clip2.hidden_act == "gelu"
    assert ckpt.tokenizer_dir == folders[name] / "tokenizer"
    assert ckpt.tokenizer_2_dir == folders[name] / "tokenizer_2"
    assert ckpt.scheduler_config["_class_name"] == "EulerDiscreteScheduler" and ckpt.prediction_type == "epsilon"
    for part in PARTS:
        assert_same_tensors(ckpt.state_dicts[part], getattr(pipes[name], part).state_dict())
    models = build_models(ckpt)
    assert sorted(models) == sorted(PARTS) and not any(m.training for m in models.values())
    weight = ckpt.state_dicts["text_encoder_2"]["text_projection.weight"]
    assert models["text_encoder_2"].text_projection.weight.data_ptr() == weight.data_ptr()  # shared, not copied
    assert_same_outputs(models, pipes[name])


def test_refiner_folder_and_mismatched_tokenizer_2_are_refused(folders, tmp_path):
    from sdonnx.export.weights import clip_tokenizer_dir

    refiner = tmp_path / "refiner"
    shutil.copytree(folders["sdxl"], refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    one_line_error(lambda: load_checkpoint(refiner), error=CheckpointError, match="an SDXL refiner")

    swapped = tmp_path / "swapped"
    shutil.copytree(folders["sdxl"], swapped)
    shutil.rmtree(swapped / "tokenizer_2")
    shutil.copytree(clip_tokenizer_dir("!"), swapped / "tokenizer_2")  # the full OpenCLIP vocabulary: 49408 tokens
    one_line_error(lambda: load_checkpoint(swapped), error=CheckpointError,
                   match=r"tokenizer_2: 49408 tokens but text_encoder_2 embeds \d+")

    no_second = tmp_path / "no-second"
    shutil.copytree(folders["sdxl"], no_second)
    shutil.rmtree(no_second / "text_encoder_2")
    one_line_error(lambda: load_checkpoint(no_second), error=CheckpointError,
                   match="an SDXL U-Net .* needs a second text encoder")


# ----------------------------------------------------------------------------------- single-file (SGM names)


@pytest.mark.parametrize("name", ["sdxl", "sdxl-inpaint", "ssd-1b", "vega"])
def test_single_file_reads_back_the_folder(name, folders, pipes, ldm_tool, tmp_path):
    path = ldm_tool.write(folders[name], tmp_path / "model.safetensors")
    keys = set(_read_tensors(path))
    assert {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
            "model.diffusion_model.label_emb.0.0.weight"} <= keys
    folder, single = load_checkpoint(folders[name]), load_checkpoint(path)
    assert single.family == folder.family
    assert single.tokenizer_2_dir is not None and single.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    for part in PARTS:
        assert_same_tensors(single.state_dicts[part], folder.state_dicts[part])
    # the architecture comes from the shapes: all of it but the head counts (64 channels a head assumed)
    mine, theirs = single.configs.unet, folder.configs.unet
    assert dataclasses.replace(mine, attention_head_dim=theirs.attention_head_dim, sample_size=theirs.sample_size,
                               flip_sin_to_cos=theirs.flip_sin_to_cos) == _canonical(theirs)
    assert single.configs.clip2.projection_dim == folder.configs.clip2.projection_dim
    assert single.configs.clip2.num_hidden_layers == folder.configs.clip2.num_hidden_layers  # all layers kept
    # with the folder's configs (head counts), the models compute what diffusers' do
    exact = load_checkpoint(path, configs=folder.configs)
    assert_same_outputs(build_models(exact), pipes[name])


def _canonical(cfg: UNetConfig) -> UNetConfig:
    """The same architecture written the way the shape reader writes it (one int where all depths agree)."""
    n = len(cfg.block_out_channels)
    down = [d[0] if len(set(d)) == 1 else d for d in (cfg.down_depths(b) for b in range(n))]
    up = [u[0] if len(set(u)) == 1 else u for u in (cfg.up_depths(b) for b in range(n))]
    for b, kind in enumerate(cfg.down_block_types):
        down[b] = down[b] if kind.startswith("CrossAttn") else (cfg.mid_depth or 1) if b == n - 1 else 1
    for b, kind in enumerate(cfg.up_block_types):
        up[b] = up[b] if kind.startswith("CrossAttn") else 1
    together = down[0] if all(d == down[0] and isinstance(d, int) for d in down) else tuple(down)
    plain = dataclasses.replace(cfg, transformer_layers_per_block=together, reverse_transformer_layers_per_block=None)
    nested = isinstance(together, tuple) and any(isinstance(d, tuple) for d in together)
    if nested or any(plain.up_depths(b) != cfg.up_depths(b) for b in range(n) if cfg.up_block_types[b][0] == "C"):
        return dataclasses.replace(plain, reverse_transformer_layers_per_block=tuple(up))
    return plain


def test_distilled_layouts_are_read_from_shapes(folders, ldm_tool, tmp_path):
    """SSD-1B's and Vega's shapes: no mid-block transformer, up-path depths of their own."""
    for name in ("ssd-1b", "vega"):
        path = ldm_tool.write(folders[name], tmp_path / f"{name}.safetensors")
        unet = load_checkpoint(path).configs.unet
        ref = load_checkpoint(folders[name]).configs.unet
        assert unet.mid_block_type == MID_PLAIN and unet.mid_depth == 0
        assert [unet.down_depths(b) for b in (1, 2)] == [ref.down_depths(b) for b in (1, 2)]
        assert [unet.up_depths(b) for b in (0, 1)] == [ref.up_depths(b) for b in (0, 1)]
        # SSD-1B's up path is not its down path reversed; Vega's is, so one list says it all
        assert (unet.reverse_transformer_layers_per_block is not None) == (name == "ssd-1b")


def test_single_file_matches_diffusers_converters(pipes, ldm_tool):
    """diffusers' own single-file converters read the file we write as we do: our writer is SGM's layout."""
    from diffusers.loaders import single_file_utils as sfu

    pipe = pipes["sdxl"]
    parts = {p: getattr(pipe, p).state_dict() for p in PARTS}
    ldm = ldm_tool.ldm_from_state_dicts(parts, dict(pipe.unet.config), len(pipe.vae.config.block_out_channels))
    configs = ModelConfigs(clip=CLIPConfig.from_dict(pipe.text_encoder.config.to_dict()),
                           clip2=CLIPConfig.from_dict(pipe.text_encoder_2.config.to_dict()),
                           vae=VAEConfig.from_dict(dict(pipe.vae.config)),
                           unet=UNetConfig.from_dict(dict(pipe.unet.config)))
    _, _, ours = convert_ldm(ldm, configs)
    assert_same_tensors(ours["unet"], sfu.convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)))
    assert_same_tensors(ours["vae"], sfu.convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config)))
    theirs = sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, prefix="conditioner.embedders.1.model.")
    assert_same_tensors(ours["text_encoder_2"], theirs)
    assert_same_tensors(ours["text_encoder"], parts["text_encoder"])


@pytest.mark.parametrize("preset", ["sdxl", "sdxl-inpaint"])
def test_full_size_sdxl_architecture_is_read_from_shapes(preset, ldm_tool):
    """Meta tensors: SDXL base's real layout, without its memory."""
    from sdonnx.export.weights import _config_of, _model_class

    cfg = get_preset(preset)
    with torch.device("meta"):
        parts = {p: _model_class(p)(_config_of(cfg, p)).state_dict() for p in PARTS}
        ldm = ldm_tool.ldm_from_state_dicts(parts, cfg.unet.to_dict(), len(cfg.vae.block_out_channels))
        family, configs, state_dicts = convert_ldm(ldm)
    assert family == preset and configs == cfg
    for part in PARTS:
        assert {k: v.shape for k, v in state_dicts[part].items()} == {k: v.shape for k, v in parts[part].items()}


def test_bad_sdxl_files(folders, ldm_tool, tmp_path):
    ldm = ldm_tool.ldm_state_dict(folders["sdxl"])
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in ldm.items()
               if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, tmp_path / "refiner.safetensors")
    one_line_error(lambda: load_checkpoint(tmp_path / "refiner.safetensors"), error=CheckpointError,
                   match="refiner.safetensors: an SDXL refiner")
    no_bigg = {k: v for k, v in ldm.items() if not k.startswith("conditioner.embedders.1.")}
    save_file(no_bigg, tmp_path / "half.safetensors")
    one_line_error(lambda: load_checkpoint(tmp_path / "half.safetensors"), error=CheckpointError,
                   match=r"SDXL checkpoint without text_encoder_2 tensors \(conditioner\.embedders\.1\.model\.\*\)")
    narrow = dict(ldm)
    narrow["conditioner.embedders.1.model.text_projection"] = torch.zeros(32, 16)
    save_file(narrow, tmp_path / "narrow.safetensors")
    one_line_error(lambda: load_checkpoint(tmp_path / "narrow.safetensors"), error=CheckpointError,
                   match=r"narrow.safetensors: SDXL checkpoint: the U-Net takes a \d+-wide pooled text embedding, "
                         r"text_encoder_2 projects to 16")


# ------------------------------------------------------------------------------------- family without weights


def test_sniff_tells_sdxl_as_loading_does(folders, ldm_tool, tmp_path):
    for name in ("sdxl", "sdxl-inpaint"):
        assert sniff_sdxl(folders[name]) is True and load_checkpoint(folders[name]).configs.is_sdxl
    single = ldm_tool.write(folders["sdxl"], tmp_path / "model.safetensors")
    assert sniff_sdxl(single) is True and load_checkpoint(single).configs.is_sdxl
    # the header alone decides: a file cut right after it is still told, though it cannot load
    size = 8 + int.from_bytes(single.read_bytes()[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[:size + 1])
    assert sniff_sdxl(cut) is True
    for preset, family in RANDOM_PRESETS.items():
        assert sniff_sdxl(f"random:{preset}") is family.startswith("sdxl"), preset
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "first_stage_model.x": torch.zeros(1)}
    save_file(sd, tmp_path / "sd.safetensors")
    assert sniff_sdxl(tmp_path / "sd.safetensors") is False
    sd_folder = tmp_path / "sd-folder"
    sd_folder.mkdir()
    (sd_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert sniff_sdxl(sd_folder) is False
    (sd_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert sniff_sdxl(sd_folder) is True


def test_sniff_leaves_undecidable_sources_to_loading(folders, ldm_tool, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save(ldm_tool.ldm_state_dict(folders["sdxl"]), ckpt)
    assert sniff_sdxl(ckpt) is None and load_checkpoint(ckpt).configs.is_sdxl  # pickles: only loading tells
    refiner_folder = tmp_path / "refiner"
    shutil.copytree(folders["sdxl"], refiner_folder)
    shutil.rmtree(refiner_folder / "text_encoder")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    not_index = tmp_path / "no-index"
    not_index.mkdir()
    for source in (refiner_folder, garbage, not_index, "random:nope", tmp_path / "absent.safetensors"):
        assert sniff_sdxl(source) is None, source
        with pytest.raises(CheckpointError):  # and loading names the problem
            load_checkpoint(source)


# ----------------------------------------------------------------------------------------------- random presets


def test_random_tiny_sdxl():
    a, b = load_checkpoint("random:tiny-sdxl"), load_checkpoint("random:tiny-sdxl")
    assert a.family == "sdxl" and a.configs.is_sdxl
    for part in PARTS:
        assert_same_tensors(a.state_dicts[part], b.state_dicts[part])
    vocab = json.loads((a.tokenizer_2_dir / "vocab.json").read_text())
    tok = json.loads((a.tokenizer_2_dir / "tokenizer_config.json").read_text())
    assert tok["pad_token"] == "!" and "!" in vocab and len(vocab) <= a.configs.clip2.vocab_size
    assert a.configs.clip2.eos_token_id == a.configs.clip.eos_token_id == len(vocab) - 1
    models = build_models(a)
    with torch.no_grad():
        ids = torch.tensor([[len(vocab) - 2, 5, len(vocab) - 1]])
        embeds, hidden = models["text_encoder_2"](ids)
        context = torch.cat([models["text_encoder"](ids)[0], hidden], dim=-1)
        out = models["unet"](torch.randn(1, 4, 8, 8), 10, context, text_embeds=embeds,
                             time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", ["sdxl", "sdxl-turbo"])
def test_random_full_size_sdxl_configs(preset, monkeypatch):
    """What random:sdxl(-turbo) holds, with each model built on the meta device (no 14 GB here)."""
    from sdonnx.export import weights

    real = weights._model_class

    def on_meta(component):
        def build(cfg):
            with torch.device("meta"):
                return real(component)(cfg)
        return build

    monkeypatch.setattr(weights, "_model_class", on_meta)
    ckpt = load_checkpoint(f"random:{preset}")
    assert ckpt.configs == get_preset(preset) and ckpt.family == "sdxl"
    assert ckpt.scheduler_config["_class_name"] == ("EulerAncestralDiscreteScheduler" if preset == "sdxl-turbo"
                                                    else "EulerDiscreteScheduler")
    assert sum(v.numel() for v in ckpt.state_dicts["unet"].values()) == 2_567_463_684
    assert json.loads((ckpt.tokenizer_2_dir / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert components(ckpt.configs) == PARTS and sorted(ckpt.state_dicts) == sorted(PARTS)


@pytest.mark.slow
def test_random_full_size_sdxl():
    ckpt = load_checkpoint("random:sdxl")
    assert sum(v.numel() for v in ckpt.state_dicts["unet"].values()) == 2_567_463_684
    build_models(ckpt)
