"""LoRA files fused at export (`sdonnx export --lora FILE[:SCALE]`) against diffusers' load_lora_weights + fuse_lora
on a tiny random model: the same adapted weights, the same pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tiny_sd
from sdonnx.export import lora
from sdonnx.export.weights import build_models, load_checkpoint
from sdonnx.pipeline import Pipeline

pytest.importorskip("peft")

PROMPT = "a red circle on a blue background"
RANK = 4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(base diffusers folder, PEFT-layout LoRA file, the same LoRA in kohya layout with alpha = rank / 2)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = tmp_path_factory.mktemp("lora")
    pipe = tiny_sd.make_pipeline("sd1")
    pipe.save_pretrained(base / "diffusers")
    torch.manual_seed(11)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_TARGETS, init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TEXT_TARGETS,
                                             init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(base / "peft", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    peft_file = base / "peft" / "pytorch_lora_weights.safetensors"
    kohya = {}
    for key, value in load_file(str(peft_file)).items():
        model, rest = key.split(".", 1)
        path, _, part = rest.rpartition(".lora_")
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[model] + path.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(RANK / 2)
    save_file(kohya, str(base / "kohya.safetensors"))
    return base / "diffusers", peft_file, base / "kohya.safetensors"


def reference(folder: Path, lora_file: Path, scale: float):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    ref.fuse_lora(lora_scale=scale)
    ref.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return ref


@torch.no_grad()
def outputs(unet, text_encoder):
    torch.manual_seed(0)
    sample, ids = torch.randn(2, 4, 16, 16), torch.randint(0, 600, (2, 77))
    text = text_encoder(ids)[0]
    out = unet(sample, 400, text)
    return text, out.sample if hasattr(out, "sample") else out


def test_fused_models_match_diffusers(files):
    folder, peft_file, kohya_file = files
    ref = reference(folder, peft_file, 0.7)
    want = outputs(ref.unet, ref.text_encoder)
    models = build_models(load_checkpoint(str(folder)))
    plain = outputs(models["unet"], models["text_encoder"])
    layers = lora.fuse(models, lora.read_lora(peft_file), 0.7, peft_file.name)
    assert layers == len(load_file(str(peft_file))) // 2
    got = outputs(models["unet"], models["text_encoder"])
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
        assert (g - p).abs().max() > 1e-2  # the adapter changed the model
    # kohya layout, alpha = rank / 2: the same update at twice the scale, and what diffusers reads from it
    models = build_models(load_checkpoint(str(folder)))
    lora.fuse(models, lora.read_lora(kohya_file), 1.4, kohya_file.name)
    for g, w in zip(outputs(models["unet"], models["text_encoder"]), want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
    ref = reference(folder, kohya_file, 1.4)
    for g, w in zip(outputs(models["unet"], models["text_encoder"]), outputs(ref.unet, ref.text_encoder)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_older_diffusers_lora_names_read_the_same(files, tmp_path):
    folder, peft_file, _ = files
    old = {}
    for key, value in load_file(str(peft_file)).items():
        part = "down" if key.endswith("lora_A.weight") else "up"
        stem = key.rsplit(".lora_", 1)[0]
        old[f"{stem}.{'lora' if key.startswith('unet.') else 'lora_linear_layer'}.{part}.weight"] = value
    save_file(old, str(tmp_path / "old.safetensors"))
    new, older = lora.read_lora(peft_file), lora.read_lora(tmp_path / "old.safetensors")
    assert new.keys() == older.keys()
    assert all(torch.equal(new[k].down, older[k].down) and torch.equal(new[k].up, older[k].up) for k in new)


def test_export_with_lora_draws_what_diffusers_draws(files, tmp_path):
    from sdonnx.export import cli as export_cli

    folder, peft_file, _ = files
    out = tmp_path / "onnx"
    result = CliRunner().invoke(export_cli.export, [str(folder), str(out), "--lora", f"{peft_file}:0.7", "--quiet"])
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(out)
    assert pipe.info.meta["export_report"]["loras"] == [
        {"file": peft_file.name, "scale": 0.7, "layers": len(load_file(str(peft_file))) // 2}]
    from sdonnx.cli import main

    shown = CliRunner().invoke(main, ["info", str(out)])
    assert shown.exit_code == 0 and f"loras        {peft_file.name} x 0.7" in shown.output
    ref = reference(folder, peft_file, 0.7)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ours = pipe.txt2img(PROMPT, steps=4, guidance=7.5, scheduler="ddim", width=32, height=32, latents=latents,
                        output_type="np")
    from diffusers import DDIMScheduler

    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    theirs = ref(PROMPT, num_inference_steps=4, guidance_scale=7.5, width=32, height=32,
                 latents=torch.from_numpy(latents), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("content, message", [
    (None, "LoRA file not found"),
    (b"junk", "not a readable safetensors"),
    ({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
      "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4)}, "match nothing in the model"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 32, 3, 3)}, "only one of"),
    ({"some.other.tensor": torch.zeros(2)}, "unrecognised LoRA tensor"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": torch.zeros(1, 32, 1, 1)}, "a DoRA adapter"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(0, 32, 3, 3),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 0, 1, 1)}, "not a rank-r pair"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 32, 3, 3),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 4, 3, 3)}, "do not fit the weight"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 16),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(32, 4)}, "do not fit the weight"),
])
def test_bad_lora_files_fail_in_one_line_and_leave_nothing(files, tmp_path, content, message):
    from sdonnx.export import cli as export_cli

    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        save_file(content, str(path))
    out = tmp_path / "out"
    result = CliRunner().invoke(export_cli.export, [str(files[0]), str(out), "--lora", str(path), "--quiet"])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_parse_spec():
    assert lora.parse_spec("a.safetensors") == (Path("a.safetensors"), 1.0)
    assert lora.parse_spec("dir/a.safetensors:0.8") == (Path("dir/a.safetensors"), 0.8)
    assert lora.parse_spec("C:/x/a.safetensors") == (Path("C:/x/a.safetensors"), 1.0)
    assert lora.parse_spec("C:a.safetensors") == (Path("C:a.safetensors"), 1.0)
    assert lora.parse_spec("a.safetensors:-1e-1") == (Path("a.safetensors"), -0.1)
    for bad in ("a.safetensors:nan", "a.safetensors:0,8", "a.safetensors:1_0", "a.safetensors:inf"):
        with pytest.raises(lora.LoraError, match="must be a number"):
            lora.parse_spec(bad)


def test_peft_alpha_from_the_file_header_matches_diffusers(tmp_path):
    """diffusers >= 0.34 saves lora_alpha (and alpha_pattern) in the safetensors header, not as tensors."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd.make_pipeline("sd1")
    pipe.save_pretrained(tmp_path / "diffusers")
    torch.manual_seed(12)
    cfg = LoraConfig(r=RANK, lora_alpha=16, alpha_pattern={"conv1": 2}, target_modules=["to_q", "to_v", "conv1"],
                     init_lora_weights=False)
    pipe.unet.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    pairs = lora.read_lora(file)
    assert {p.alpha for (_, k), p in pairs.items() if k.endswith("conv1")} == {2.0}
    assert {p.alpha for (_, k), p in pairs.items() if not k.endswith("conv1")} == {16.0}
    ref = reference(tmp_path / "diffusers", file, 1.0)
    models = build_models(load_checkpoint(str(tmp_path / "diffusers")))
    lora.fuse(models, pairs, 1.0, file.name)
    for g, w in zip(outputs(models["unet"], models["text_encoder"]), outputs(ref.unet, ref.text_encoder)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)
