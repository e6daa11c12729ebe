"""Weight loading: diffusers folders, single-file LDM checkpoints, random presets, the CLIP BPE assets, bad input."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_sd
from helpers import one_line_error
from sdonnx.export.models.config import ModelConfigs, get_preset
from sdonnx.export.weights import (CheckpointError, build_models, clip_tokenizer_dir, convert_ldm, load_checkpoint,
                                   load_strict)

FAMILY = {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1-inpaint"}


pytestmark = pytest.mark.usefixtures("sdonnx_cache")


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_sd.make_pipeline(family) for family in FAMILY}


@pytest.fixture(scope="module")
def folders(pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    out = {}
    for family, pipe in pipes.items():
        pipe.save_pretrained(root / family)
        out[family] = root / family
    return out


def reference_state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict() for name in ("text_encoder", "vae", "unet")}


def assert_same_tensors(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


def assert_same_outputs(models: dict, pipe) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (2, 77))
    with torch.no_grad():
        ours, ref = models["text_encoder"](ids), pipe.text_encoder(ids)
        torch.testing.assert_close(ours[0], ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[1], ref.pooler_output, atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(models["vae"](x), pipe.vae(x).sample, atol=1e-5, rtol=1e-5)
        cfg = pipe.unet.config
        sample = torch.randn(2, cfg.in_channels, 16, 16)
        context = torch.randn(2, 77, cfg.cross_attention_dim)
        torch.testing.assert_close(models["unet"](sample, torch.tensor(500.0), context),
                                   pipe.unet(sample, 500, context).sample, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- diffusers folders


@pytest.mark.parametrize("family", list(FAMILY))
def test_folder_loads_reference_weights_and_outputs(family, folders, pipes):
    ckpt = load_checkpoint(folders[family])
    assert ckpt.family == FAMILY[family]
    assert ckpt.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert (ckpt.tokenizer_dir / "vocab.json").is_file()
    assert ckpt.configs.unet.in_channels == pipes[family].unet.config.in_channels
    for name, ref in reference_state_dicts(pipes[family]).items():
        assert_same_tensors(ckpt.state_dicts[name], ref)
    models = build_models(ckpt)
    assert not any(m.training for m in models.values())
    # the models hold the checkpoint's tensors rather than copies
    weight = ckpt.state_dicts["unet"]["conv_in.weight"]
    assert models["unet"].state_dict()["conv_in.weight"].data_ptr() == weight.data_ptr()
    assert_same_outputs(models, pipes[family])


def test_folder_bin_fp16_variant_and_shards(pipes, tmp_path):
    pipe = pipes["sd1"]
    ref = reference_state_dicts(pipe)
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert list((tmp_path / "bin" / "unet").glob("*.bin"))
    ckpt = load_checkpoint(tmp_path / "bin")
    for name in ref:
        assert_same_tensors(ckpt.state_dicts[name], ref[name])

    half = tiny_sd.make_pipeline("sd1").to(torch.float16)
    half.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ckpt = load_checkpoint(tmp_path / "fp16")
    for name in ref:
        assert_same_tensors(ckpt.state_dicts[name], {k: v.half().float() for k, v in ref[name].items()})

    pipe.unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    folder = tmp_path / "bin"
    shutil.rmtree(folder / "unet")
    shutil.copytree(tmp_path / "sharded", folder / "unet")
    assert_same_tensors(load_checkpoint(folder).state_dicts["unet"], ref["unet"])


def test_folder_old_vae_attention_names_are_renamed(folders, pipes, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(folders["sd1"], folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = load_file(path)
    pattern = re.compile(r"\.(to_q|to_k|to_v|to_out\.0)\.")
    renamed = {pattern.sub(lambda m: f".{old[m[1]]}.", k): v for k, v in tensors.items()}
    assert any(".query." in k for k in renamed)
    save_file(renamed, path)
    assert_same_tensors(load_checkpoint(folder).state_dicts["vae"], pipes["sd1"].vae.state_dict())


# ----------------------------------------------------------------------- single file: an independent converter

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict, layers: int, levels: int, attn_up: list[bool]) -> dict:
    """diffusers U-Net keys -> LDM keys by walking the block structure in LDM's flat order."""
    blocks = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    flat = 1
    for level in range(levels):
        for j in range(layers):
            blocks[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{flat}.0"
            blocks[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{flat}.1"
            flat += 1
        if level < levels - 1:
            blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{flat}.0.op"
            flat += 1
    flat = 0
    for level in range(levels):
        for j in range(layers + 1):
            blocks[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{flat}.0"
            blocks[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{flat}.1"
            if j == layers and level < levels - 1:
                slot = 2 if attn_up[level] else 1  # after the resnet, and the attention if the level has one
                blocks[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{flat}.{slot}.conv"
            flat += 1
    return {_map_key(k, blocks, RESNET_TO_LDM): v for k, v in sd.items()}


def _map_key(key: str, blocks: dict, inner: dict) -> str:
    head = max((b for b in blocks if key.startswith(b + ".")), key=len)  # fails loudly on an unmapped key
    rest = key[len(head) + 1:]
    if ".resnets." in head:
        first, _, tail = rest.partition(".")
        rest = f"{inner.get(first, first)}.{tail}"
    return f"{blocks[head]}.{rest}"


def vae_to_ldm(sd: dict, levels: int) -> dict:
    blocks = {n: n for n in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                             "quant_conv", "post_quant_conv")}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        blocks[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        blocks[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        for name, ldm in attention.items():
            blocks[f"{part}.mid_block.attentions.0.{name}"] = f"{part}.mid.attn_1.{ldm}"
    for level in range(levels):
        blocks[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        blocks[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - level}.upsample.conv"
        for j in range(3):
            blocks[f"encoder.down_blocks.{level}.resnets.{j}"] = f"encoder.down.{level}.block.{j}"
            blocks[f"decoder.up_blocks.{level}.resnets.{j}"] = f"decoder.up.{levels - 1 - level}.block.{j}"
    out = {}
    for key, value in sd.items():
        new = _map_key(key, blocks, {"conv_shortcut": "nin_shortcut"})
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[new] = value
    return out


def clip_to_ldm(sd: dict) -> dict:
    out = {"cond_stage_model.transformer." + k: v for k, v in sd.items()}
    # transformers < 4.31 saved this buffer, so real SD 1 files carry it
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def openclip_to_ldm(sd: dict, num_layers: int) -> dict:
    """transformers CLIP -> OpenCLIP keys, plus the last layer and projection SD 2 files carry but ignore."""
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           p + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(num_layers + 1):
        src = i if i < num_layers else 0  # the extra (24th) layer: any tensors of the right shapes
        t = f"text_model.encoder.layers.{src}."
        d = f"{p}transformer.resblocks.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"{d}{theirs}.{kind}"] = sd[f"{t}{ours}.{kind}"] + (i == num_layers)
        for kind in ("weight", "bias"):
            out[f"{d}attn.in_proj_{kind}"] = torch.cat([sd[f"{t}self_attn.{q}_proj.{kind}"] for q in "qkv"])
    hidden = out[p + "ln_final.weight"].shape[0]
    out[p + "text_projection"] = torch.ones(hidden, hidden, device=out[p + "ln_final.weight"].device)
    out[p + "logit_scale"] = torch.ones((), device=out[p + "ln_final.weight"].device)
    return out


def to_ldm(pipe) -> dict:
    """A whole LDM checkpoint from a diffusers pipeline's (or meta models') state dicts."""
    ucfg = pipe.unet.config
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(
        pipe.unet.state_dict(), ucfg.layers_per_block, len(ucfg.block_out_channels),
        [t == "CrossAttnUpBlock2D" for t in ucfg.up_block_types]).items()}
    ldm.update({"first_stage_model." + k: v
                for k, v in vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)).items()})
    text = pipe.text_encoder.state_dict()
    if pipe.text_encoder.config.hidden_act == "gelu":
        ldm.update(openclip_to_ldm(text, pipe.text_encoder.config.num_hidden_layers))
    else:
        ldm.update(clip_to_ldm(text))
    ldm["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # schedule buffers and EMA bookkeeping are ignored
    ldm["model_ema.num_updates"] = torch.tensor(3)
    return ldm


def save_ldm(ldm: dict, path, fmt: str):
    if fmt == "safetensors":
        save_file({k: v.contiguous().clone() for k, v in ldm.items()}, path)
    else:
        torch.save({"state_dict": ldm, "global_step": 10}, path)
    return path


def folder_configs(pipe) -> ModelConfigs:
    from sdonnx.export.models.config import CLIPConfig, UNetConfig, VAEConfig
    return ModelConfigs(clip=CLIPConfig.from_dict(pipe.text_encoder.config.to_dict()),
                        vae=VAEConfig.from_dict(dict(pipe.vae.config)),
                        unet=UNetConfig.from_dict(dict(pipe.unet.config)))


@pytest.mark.parametrize("family,fmt", [("sd1", "safetensors"), ("sd1", "ckpt"), ("sd2", "safetensors"),
                                        ("inpaint", "ckpt")])
def test_single_file_gives_reference_tensors(family, fmt, pipes, tmp_path):
    pipe = pipes[family]
    path = save_ldm(to_ldm(pipe), tmp_path / f"model.{fmt}", fmt)
    ckpt = load_checkpoint(path)
    assert ckpt.family == FAMILY[family]
    for name, ref in reference_state_dicts(pipe).items():
        assert_same_tensors(ckpt.state_dicts[name], ref)
    unet = ckpt.configs.unet
    assert unet.in_channels == pipe.unet.config.in_channels
    assert list(unet.block_out_channels) == list(pipe.unet.config.block_out_channels)
    assert unet.cross_attention_dim == pipe.unet.config.cross_attention_dim
    assert unet.use_linear_projection == pipe.unet.config.use_linear_projection
    assert list(unet.down_block_types) == list(pipe.unet.config.down_block_types)
    assert list(unet.up_block_types) == list(pipe.unet.config.up_block_types)
    assert ckpt.configs.clip.num_hidden_layers == pipe.text_encoder.config.num_hidden_layers
    assert ckpt.configs.clip.hidden_act == pipe.text_encoder.config.hidden_act
    assert ckpt.scheduler_config["_class_name"] == ("DDIMScheduler" if family == "sd2" else "PNDMScheduler")
    assert ckpt.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")


@pytest.mark.parametrize("family", list(FAMILY))
def test_single_file_matches_diffusers_converters(family, pipes):
    from diffusers.loaders import single_file_utils as sfu

    pipe = pipes[family]
    ldm = to_ldm(pipe)
    _, _, ours = convert_ldm(ldm, folder_configs(pipe))
    assert_same_tensors(ours["unet"], sfu.convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config)))
    assert_same_tensors(ours["vae"], sfu.convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config)))
    if family == "sd2":
        theirs = sfu.convert_open_clip_checkpoint(pipe.text_encoder, ldm)
        # diffusers drops the penultimate-layer model's last block by its full-size name (resblocks.23)
        n = pipe.text_encoder.config.num_hidden_layers
        theirs = {k: v for k, v in theirs.items() if f"encoder.layers.{n}." not in k}
    else:
        theirs = sfu.convert_ldm_clip_checkpoint(ldm)
        theirs.pop("text_model.embeddings.position_ids")  # a constant buffer diffusers ignores when loading
    assert_same_tensors(ours["text_encoder"], theirs)


@pytest.mark.parametrize("family", ["sd2", "inpaint"])
def test_single_file_model_matches_folder_model(family, pipes, folders, tmp_path):
    pipe = pipes[family]
    path = save_ldm(to_ldm(pipe), tmp_path / "model.safetensors", "safetensors")
    # head counts are not recorded in tensor shapes: take them from the folder, as diffusers' `config=` does
    ckpt = load_checkpoint(path, configs=load_checkpoint(folders[family]).configs, prediction_type="epsilon")
    assert ckpt.prediction_type == ckpt.scheduler_config["prediction_type"] == "epsilon"
    assert_same_outputs(build_models(ckpt), pipe)


@pytest.mark.parametrize("preset", ["sd15", "sd15-inpaint", "sd21"])
def test_full_size_architecture_is_read_from_shapes(preset):
    """Meta tensors: the real SD 1.5 / 2.1 layouts, without their memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = get_preset(preset)
    with torch.device("meta"):
        fake = type("Pipe", (), {})()
        fake.unet = UNet2DConditionModel.from_config(cfg.unet.to_dict())
        fake.vae = AutoencoderKL.from_config(cfg.vae.to_dict())
        fake.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg.clip.to_dict()))
        family, configs, state_dicts = convert_ldm(to_ldm(fake))
    assert family == {"sd15": "sd1", "sd15-inpaint": "sd1-inpaint", "sd21": "sd2"}[preset]
    assert configs == cfg
    for name in state_dicts:
        ref = getattr(fake, name).state_dict()
        assert {k: v.shape for k, v in state_dicts[name].items()} == {k: v.shape for k, v in ref.items()}


# ------------------------------------------------------------------------------------------- CLIP BPE assets


@pytest.mark.parametrize("pad,pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_clip_bpe_assets_reproduce_the_clip_tokenizer(pad, pad_id):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_dir(pad))
    assert len(tok) == 49408 and tok.pad_token_id == pad_id
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for prompt in ("An astronaut riding a horse", "oil painting of a castle at sunset, highly detailed"):
        ids = tok(prompt).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407 and all(i < 49406 for i in ids[1:-1])
    padded = tok(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[4:] == [pad_id] * 73


def test_runtime_tokenizer_reads_the_built_folder():
    from transformers import CLIPTokenizer

    from sdonnx.tokenizer import CLIPTokenizer as RuntimeTokenizer

    prompts = ["a photo of a cat", "An astronaut riding a horse, 4k!", "Ünïcode café — déjà vu"]
    for pad in ("<|endoftext|>", "!"):
        folder = clip_tokenizer_dir(pad)
        ref = CLIPTokenizer.from_pretrained(folder)(prompts, padding="max_length", max_length=77).input_ids
        assert RuntimeTokenizer.from_dir(folder)(prompts).tolist() == ref


def test_tokenizer_of_each_source(folders):
    assert load_checkpoint(folders["sd2"]).tokenizer_dir == folders["sd2"] / "tokenizer"
    tiny = load_checkpoint("random:tiny")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny.tokenizer_dir)
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tiny.configs.clip.bos_token_id and ids[-1] == tiny.configs.clip.eos_token_id
    assert max(tok.get_vocab().values()) < tiny.configs.clip.vocab_size


# ----------------------------------------------------------------------------------------------- random presets


def test_random_tiny_is_deterministic_by_seed():
    a, b, c = (load_checkpoint("random:tiny", seed=s) for s in (0, 0, 1))
    assert a.family == "sd1" and a.prediction_type == "epsilon"
    for name in a.state_dicts:
        assert_same_tensors(a.state_dicts[name], b.state_dicts[name])
    assert not torch.equal(a.state_dicts["unet"]["conv_in.weight"], c.state_dicts["unet"]["conv_in.weight"])
    models = build_models(a)
    with torch.no_grad():
        clip = a.configs.clip
        hidden, pooled = models["text_encoder"](torch.tensor([[clip.bos_token_id, 5, clip.eos_token_id]]))
    assert hidden.shape == (1, 3, a.configs.clip.hidden_size) and torch.isfinite(pooled).all()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_random_full_size(preset):
    ckpt = load_checkpoint(f"random:{preset}")
    assert ckpt.configs == get_preset(preset)
    assert sum(v.numel() for v in ckpt.state_dicts["unet"].values()) > 800_000_000
    build_models(ckpt)


# ---------------------------------------------------------------------------------------------------- bad input


def load_error(source, match: str, **kwargs) -> str:
    return one_line_error(lambda: load_checkpoint(source, **kwargs), error=CheckpointError, match=match)


def test_bad_files(pipes, tmp_path):
    good = save_ldm(to_ldm(pipes["sd1"]), tmp_path / "good.safetensors", "safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    load_error(tmp_path / "truncated.safetensors", "truncated.safetensors: not a readable safetensors file")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00garbage" * 100)
    load_error(tmp_path / "garbage.ckpt", "garbage.ckpt: not a readable PyTorch checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    load_error(tmp_path / "list.ckpt", "list.ckpt: holds a list with no tensors")
    save_file({"conv_in.weight": torch.zeros(3)}, tmp_path / "unet_only.safetensors")
    load_error(tmp_path / "unet_only.safetensors", "single diffusers component")
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, tmp_path / "xl.safetensors")
    # SDXL files load (tests/test_weights_sdxl.py); a fragment of one is still named for what it lacks
    load_error(tmp_path / "xl.safetensors", "xl.safetensors: not a Stable Diffusion checkpoint: no model.diffusion")
    load_error(tmp_path / "nope.safetensors", "no such file or folder")
    (tmp_path / "notes.txt").write_text("hi")
    load_error(tmp_path / "notes.txt", "unknown checkpoint type '.txt'")


def test_wrong_shapes_and_missing_tensors_are_named(pipes, tmp_path):
    ldm = to_ldm(pipes["sd1"])
    conv1_bias = ldm.pop("first_stage_model.decoder.up.0.block.0.conv1.bias")
    path = save_ldm(ldm, tmp_path / "bad.ckpt", "ckpt")
    load_error(path, r"bad.ckpt: vae: 1 missing \(decoder\.up_blocks\.1\.resnets\.0\.conv1\.bias\)")
    ldm["first_stage_model.decoder.up.0.block.0.conv1.bias"] = conv1_bias
    ldm["model.diffusion_model.middle_block.1.proj_out.bias"] = torch.zeros(7)
    ldm["model.diffusion_model.middle_block.1.extra.weight"] = torch.zeros(7)
    path = save_ldm(ldm, tmp_path / "bad.ckpt", "ckpt")
    load_error(path, r"unet: 1 unexpected \(mid_block\.attentions\.0\.extra\.weight\); "
                         r"1 misshapen \(mid_block\.attentions\.0\.proj_out\.bias \(7,\) != \(64,\)\)")

    module = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match=r"unet: 1 missing \(bias\); 1 unexpected \(extra\.weight\)"):
        load_strict(module, {"weight": torch.zeros(3, 2), "extra.weight": torch.zeros(1)}, "unet")


def test_bad_folders_and_sources(folders, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(folders["sd1"], folder)
    shutil.rmtree(folder / "unet")
    load_error(folder, "diffusers folder without unet/")
    (folder / "model_index.json").unlink()
    load_error(folder, "not a diffusers folder")
    folder = tmp_path / "noweights"
    shutil.copytree(folders["sd1"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    load_error(folder, "vae: no weights")
    load_error("random:sd99", "unknown source random:sd99; choose one of random:sd15")
    load_error("random:tiny", "unknown prediction_type", prediction_type="x0")
    load_error(folders["sd1"], "configs= only applies to single-file", configs=get_preset("tiny"))
    ckpt = load_checkpoint("random:tiny", prediction_type="v_prediction")
    assert ckpt.prediction_type == ckpt.scheduler_config["prediction_type"] == "v_prediction"


def test_folder_with_wrong_shape_is_named(folders, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(folders["sd1"], folder)
    path = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    tensors["text_model.final_layer_norm.weight"] = torch.zeros(5)
    save_file(tensors, path)
    load_error(folder, r"text_encoder: 1 misshapen \(text_model\.final_layer_norm\.weight \(5,\) != \(32,\)\)")
