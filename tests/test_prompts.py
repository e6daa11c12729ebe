"""Weighted, long and clip-skipped prompts through the pipeline, against transformers' text encoder and diffusers
given the same text embeddings (tiny random sd1 model; our export and optimum's of the same weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import SIZE, cli_error, one_line_error, tiny_folders
from sdonnx.export import cli as export_cli
from sdonnx.pipeline import Pipeline

LATENT = SIZE // 2
RUN = dict(steps=3, guidance=7.5, scheduler="ddim", width=SIZE, height=SIZE, output_type="np")
# 4 * 25 one-or-more-token words, no commas: more than one 75-token chunk, cut at exactly 75 tokens
LONG = " ".join(["red circle blue square"] * 25)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(diffusers folder, optimum's ONNX folder, our export) of one tiny random sd1 model."""
    pt, optimum = tiny_folders("sd1", tmp_path_factory.getbasetemp())
    ours = tmp_path_factory.mktemp("prompts") / "sd1"
    result = CliRunner().invoke(export_cli.export, [str(pt), str(ours), "--quiet"])
    assert result.exit_code == 0, result.output
    return pt, optimum, ours


@pytest.fixture(scope="module")
def pipe(folders):
    return Pipeline.load(folders[2], threads=1)


@pytest.fixture(scope="module")
def ref(folders):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folders[0], safety_checker=None)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    return ref


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)


def hf_chunks(ref, text: str, count: int | None = None) -> torch.Tensor:
    """transformers' ids of `text` cut into 75-token chunks, each [start, ids, end, padding], empty chunks
    appended up to `count`."""
    tok = ref.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [ids[k:k + 75] for k in range(0, max(len(ids), 1), 75)]
    pieces += [[] for _ in range((count or 0) - len(pieces))]
    rows = [[tok.bos_token_id, *p, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(p)) for p in pieces]
    return torch.tensor(rows)


def hf_encode(ref, rows: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Each chunk through transformers' CLIPTextModel, joined along the sequence: [1, 77 * chunks, D]."""
    with torch.no_grad():
        out = ref.text_encoder(rows, output_hidden_states=True)
        hidden = out.last_hidden_state if clip_skip == 1 else \
            ref.text_encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip])
    return hidden.reshape(1, -1, hidden.shape[-1])


# ---- attention weights -------------------------------------------------------------------------

def test_weights_of_one_give_the_plain_image_exactly(pipe):
    plain = pipe.txt2img("a red circle on a blue background", seed=5, **RUN)
    weighted = pipe.txt2img("a (red:1.0) circle on a (blue:1) background", seed=5, **RUN)
    literal = pipe.txt2img("a red circle on a blue background", seed=5, prompt_syntax="none", **RUN)
    assert np.array_equal(plain, weighted) and np.array_equal(plain, literal)
    emphasised = pipe.txt2img("a (red:1.4) circle on a ((blue)) background", seed=5, **RUN)
    assert np.abs(emphasised - plain).max() > 1e-3


def test_emphasis_matches_a_torch_reference(pipe, ref):
    parts = [("a", 1.0), ("red", 1.3), ("circle", 1 / 1.1), ("on", 1.0), ("blue", 1.21)]
    ids, weights = [], []
    for word, w in parts:
        word_ids = ref.tokenizer(word, add_special_tokens=False)["input_ids"]
        ids += word_ids
        weights += [w] * len(word_ids)
    tok = ref.tokenizer
    row = torch.tensor([[tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(ids))])
    mult = torch.tensor([1.0, *weights, 1.0] + [1.0] * (75 - len(ids)))
    z = hf_encode(ref, row)
    # A1111's emphasis: scale each token's state, then restore the chunk's mean
    expect = z * mult[None, :, None]
    expect = expect * (z.mean() / expect.mean())
    ours = pipe._encode_texts(["a (red:1.3) [circle] on ((blue))"])[0]
    np.testing.assert_allclose(ours, expect.numpy(), atol=2e-5, rtol=0)
    assert np.abs(ours - z.numpy()).max() > 1e-2


# ---- long prompts --------------------------------------------------------------------------------

def test_long_prompt_equals_diffusers_given_chunked_embeddings(pipe, ref):
    negative = "green square"
    n = len(hf_chunks(ref, LONG))
    assert n == 2
    positive = hf_encode(ref, hf_chunks(ref, LONG))
    negative_embeds = hf_encode(ref, hf_chunks(ref, negative, count=n))  # padded with empty chunks
    lat = noise(1)
    theirs = ref(prompt_embeds=positive, negative_prompt_embeds=negative_embeds, num_inference_steps=3,
                 guidance_scale=7.5, width=SIZE, height=SIZE, latents=torch.from_numpy(lat), output_type="np").images
    ours = pipe.txt2img(LONG, negative, latents=lat, **RUN)
    assert ours.std() > 0.01
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    # and a long negative prompt with a short prompt: the prompt is the one padded
    short = pipe._encode_texts([LONG, "red"])
    assert short[0].shape == short[1].shape == (1, 154, positive.shape[-1])


def test_words_after_token_75_change_the_picture(pipe):
    a = pipe.txt2img(LONG + " circle", seed=2, **RUN)
    b = pipe.txt2img(LONG + " triangle", seed=2, **RUN)
    assert np.abs(a - b).max() > 1e-3


def test_optimum_folder_takes_long_prompts_but_not_clip_skip(folders, pipe):
    theirs = Pipeline.load(folders[1], threads=1)
    assert theirs.component("unet").inputs["encoder_hidden_states"].shape[1] == "sequence_length"
    lat = noise(3)
    np.testing.assert_allclose(theirs.txt2img(LONG, latents=lat, **RUN), pipe.txt2img(LONG, latents=lat, **RUN),
                               atol=1e-4, rtol=0)
    one_line_error(lambda: theirs.txt2img("red", clip_skip=2, **RUN), "clip skip 2", "re-export")


def test_static_export_takes_the_first_chunk_with_a_warning(folders, tmp_path):
    out = tmp_path / "static"
    result = CliRunner().invoke(export_cli.export, [str(folders[0]), str(out), "--static", f"{SIZE}x{SIZE}",
                                                    "--quiet"])
    assert result.exit_code == 0, result.output
    static = Pipeline.load(out, threads=1)
    assert static.component("unet").inputs["encoder_hidden_states"].shape[1] == 77
    with pytest.warns(UserWarning, match="first chunk"):
        a = static.txt2img(LONG + " circle", seed=1, **RUN)
    with pytest.warns(UserWarning, match="first chunk"):
        b = static.txt2img(LONG + " triangle", seed=1, **RUN)
    assert np.array_equal(a, b) and a.std() > 0.01


@pytest.mark.parametrize("options", [["--attention", "mha"],
                                     pytest.param(["--precision", "int8", "--int8-scheme", "qdq"],
                                                  marks=pytest.mark.slow)],  # calibration: ~50 s on 2 cores
                         ids=["mha", "qdq"])
def test_mha_and_qdq_exports_take_long_prompts(folders, pipe, tmp_path, options):
    out = tmp_path / "model"
    result = CliRunner().invoke(export_cli.export, [str(folders[0]), str(out), "--quiet", *options])
    assert result.exit_code == 0, result.output
    other = Pipeline.load(out, threads=1)
    lat = noise(4)
    got, want = other.txt2img(LONG, latents=lat, **RUN), pipe.txt2img(LONG, latents=lat, **RUN)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-3 if options[0] == "--attention" else 0.1, rtol=0)


# ---- clip skip -----------------------------------------------------------------------------------

def test_clip_skip_matches_transformers_hidden_states(pipe, ref):
    for skip in (1, 2):
        want = hf_encode(ref, hf_chunks(ref, "a red circle"), clip_skip=skip).numpy()
        got = pipe._encode_texts(["a red circle"], clip_skip=skip)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(pipe._encode_texts(["a red circle"], clip_skip=2)[0] -
                  pipe._encode_texts(["a red circle"])[0]).max() > 1e-2
    one_line_error(lambda: pipe.txt2img("red", clip_skip=3, **RUN), "clip skip 3", "2 layers")
    one_line_error(lambda: pipe.txt2img("red", clip_skip=0, **RUN), "clip_skip")


def test_clip_skip_image_equals_diffusers(pipe, ref):
    lat = noise(6)
    prompt, negative = "a red circle on a blue background", "green square"
    # diffusers counts the layers skipped after the last (its clip_skip=1 is A1111's 2) and skips them for the
    # prompt only; A1111 skips them for the negative prompt too
    negative_embeds = hf_encode(ref, hf_chunks(ref, negative), clip_skip=2)
    theirs = ref(prompt, negative_prompt_embeds=negative_embeds, num_inference_steps=3, guidance_scale=7.5,
                 width=SIZE, height=SIZE, latents=torch.from_numpy(lat), output_type="np", clip_skip=1).images
    ours = pipe.txt2img(prompt, negative, latents=lat, clip_skip=2, **RUN)
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert pipe.txt2img(prompt, negative, latents=lat, clip_skip=2, **{**RUN, "output_type": "pil"})[0] \
        .info["sdonnx"].clip_skip == 2


def test_generate_cli_options(folders, tmp_path):
    from sdonnx.cli import main

    out = tmp_path / "x.png"
    args = ["generate", "a (red:1.2) circle BREAK blue", "--model", str(folders[2]), "--steps", "2", "--seed", "1",
            "-o", str(out)]
    result = CliRunner().invoke(main, args + ["--clip-skip", "2", "--prompt-syntax", "none"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    cli_error(CliRunner().invoke(main, args + ["--model", str(folders[1]), "--clip-skip", "2"]), "clip skip 2")


def test_img2img_and_inpaint_take_the_prompt_options(pipe):
    from helpers import picture, square_mask

    runs = {"img2img": lambda **kw: pipe.img2img("a (red:1.5) circle", picture(), strength=0.6, steps=3, seed=1, **kw),
            "inpaint": lambda **kw: pipe.inpaint("a (red:1.5) circle", picture(), square_mask(), steps=3, seed=1,
                                                 **kw)}
    for task, run in runs.items():
        image = run(clip_skip=2, prompt_syntax="none")[0]
        assert (image.info["sdonnx"].clip_skip, image.info["sdonnx"].prompt_syntax) == (2, "none"), task
        assert np.asarray(run()[0]).tolist() != np.asarray(image).tolist(), task
        one_line_error(lambda: run(prompt_syntax="comfy"), "unknown prompt syntax")
