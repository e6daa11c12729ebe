"""SDXL LoRA files fused into our SDXL models against diffusers' StableDiffusionXLPipeline load_lora_weights +
fuse_lora (PEFT layout and kohya's SGM-named layout); SDXL LoRAs refused on SD 1.x/2.x models in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_sdxl
from sdonnx.export import lora
from sdonnx.export.models import UNet2DConditionModel, get_preset
from sdonnx.export.weights import build_models, load_checkpoint

pytest.importorskip("peft")

RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


pytestmark = pytest.mark.usefixtures("sdonnx_cache")


def sgm_name(tool, unet_config, path: str) -> str:
    """A diffusers U-Net module path in kohya's SDXL spelling (SGM module path, underscores)."""
    up = [t.startswith("CrossAttn") for t in unet_config.up_block_types]
    return tool.unet_key(path + ".weight", unet_config.layers_per_block, up).removesuffix(".weight").replace(".", "_")


@pytest.fixture(scope="module")
def files(tmp_path_factory, ldm_tool):
    """(base SDXL folder, PEFT-layout LoRA of both text encoders and the U-Net, the same in kohya's SDXL layout with
    alpha = rank / 2)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = tmp_path_factory.mktemp("lora-sdxl")
    pipe = tiny_sdxl.make_pipeline("sdxl")
    pipe.save_pretrained(base / "diffusers")
    torch.manual_seed(13)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_TARGETS, init_lora_weights=False))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TEXT_TARGETS, init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(
        base / "peft", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2))
    peft_file = base / "peft" / "pytorch_lora_weights.safetensors"
    kohya = {}
    for key, value in load_file(str(peft_file)).items():
        model, rest = key.split(".", 1)
        path, _, part = rest.rpartition(".lora_")
        if model == "unet":
            name = "lora_unet_" + sgm_name(ldm_tool, pipe.unet.config, path)
        else:
            name = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[model] + path.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(RANK / 2)
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
    save_file(kohya, str(base / "kohya.safetensors"))
    return base / "diffusers", peft_file, base / "kohya.safetensors"


def reference(folder: Path, lora_file: Path, scale: float):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    ref.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    ref.fuse_lora(lora_scale=scale)
    ref.unload_lora_weights()
    return ref


@torch.no_grad()
def outputs(unet, text_encoder, text_encoder_2) -> list[torch.Tensor]:
    """Both encoders' hidden states, the pooled projection and the U-Net's prediction on them."""
    ids = torch.randint(0, 300, (2, 77), generator=torch.Generator().manual_seed(0))
    first, second = text_encoder(ids), text_encoder_2(ids)
    if isinstance(second, tuple):  # ours: (text_embeds, last_hidden_state)
        hidden, (embeds, hidden_2) = first[0], second
    else:
        hidden, embeds, hidden_2 = first.last_hidden_state, second.text_embeds, second.last_hidden_state
    context = torch.cat([hidden, hidden_2], dim=-1)
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    out = unet(sample, 400, context, **added) if not hasattr(unet, "add_time_proj") else \
        unet(sample, 400, context, added_cond_kwargs=added).sample
    return [hidden, embeds, hidden_2, out]


def ours(folder: Path) -> dict:
    return build_models(load_checkpoint(str(folder)))


@pytest.mark.parametrize("layout, scale", [("peft", 0.7), ("kohya", 1.4)])
def test_fused_sdxl_models_match_diffusers(files, layout, scale):
    folder, peft_file, kohya_file = files
    file = peft_file if layout == "peft" else kohya_file
    ref = reference(folder, file, scale)
    want = outputs(ref.unet, ref.text_encoder, ref.text_encoder_2)
    models = ours(folder)
    plain = outputs(models["unet"], models["text_encoder"], models["text_encoder_2"])
    pairs = lora.read_lora(file)
    assert {m for m, _ in pairs} == {"unet", "text_encoder", "text_encoder_2"}
    assert lora.fuse(models, pairs, scale, file.name) == len(load_file(str(peft_file))) // 2
    got = outputs(models["unet"], models["text_encoder"], models["text_encoder_2"])
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
        assert (g - p).abs().max() > 1e-2  # the adapter changed every part


@pytest.mark.parametrize("preset", ["tiny-sdxl", "sdxl"])
def test_every_sgm_layer_name_reaches_its_module(preset, ldm_tool):
    """kohya's SGM spelling of each Linear / Conv2d of the U-Net (resnets, resamplers, embeddings included) maps back
    to that module (SDXL base's full layout on the meta device)."""
    cfg = get_preset(preset).unet
    with torch.device("meta"):
        unet = UNet2DConditionModel(cfg)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    sgm = {n: sgm_name(ldm_tool, cfg, n) for n in names}
    assert len(set(sgm.values())) == len(names)
    assert any(s.startswith("output_blocks_") and s.endswith("_conv") for s in sgm.values())  # an upsampler
    assert "label_emb_0_0" in sgm.values() and "input_blocks_1_0_in_layers_2" in sgm.values()
    for name, spelled in sgm.items():
        assert lora._sgm_to_kohya(spelled, cfg.layers_per_block) == name.replace(".", "_"), spelled


@pytest.mark.parametrize("keys", [
    ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"],
    ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"],  # fits SD 1.x's CLIP, but half of an SDXL LoRA
    ["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"],
    ["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"],
    ["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"],
], ids=["te2", "te1", "peft-unet", "kohya-unet", "peft-te2"])
def test_sdxl_lora_on_sd_model_is_refused_in_one_line(keys, tmp_path):
    models = build_models(load_checkpoint("random:tiny"))
    tensors = {}
    for key in keys:
        a, b = torch.randn(2, 64), torch.randn(64, 2)
        if key.startswith("lora_"):
            tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b})
        else:
            tensors.update({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b})
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    before = {k: v.clone() for k, v in models["text_encoder"].state_dict().items()}
    with pytest.raises(lora.LoraError, match=r"xl.safetensors: an SDXL LoRA \(e\.g\. \w+:.+\) cannot be fused into "
                                             r"this SD 1\.x/2\.x model$") as info:
        lora.fuse(models, lora.read_lora(tmp_path / "xl.safetensors"), 1.0, "xl.safetensors")
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in models["text_encoder"].state_dict().items())
