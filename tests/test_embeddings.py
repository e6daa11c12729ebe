"""Textual inversion: `sdonnx export --embedding` against transformers' CLIPTextModel with the same vectors added."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tiny_sd
from helpers import cli_error
from sdonnx.export import cli as export_cli
from sdonnx.pipeline import Pipeline
from sdonnx.tokenizer import CLIPTokenizer

DIM = 32  # the tiny sd1 text encoder's width


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Embeddings in the three formats, and the source model."""
    root = tmp_path_factory.mktemp("ti")
    g = torch.Generator().manual_seed(0)
    out = {"a1111_pt": root / "mystyle.pt", "a1111_st": root / "neg.safetensors",
           "diffusers": root / "learned_embeds.bin"}
    torch.save({"string_to_param": {"*": torch.randn(2, DIM, generator=g)}, "name": "mystyle", "step": 10},
               out["a1111_pt"])
    save_file({"emb_params": torch.randn(3, DIM, generator=g)}, str(out["a1111_st"]))
    torch.save({"<toy>": torch.randn(DIM, generator=g)}, out["diffusers"])
    tiny_sd.make_pipeline("sd1", seed=3).save_pretrained(root / "src")
    out["src"] = root / "src"
    return out


@pytest.fixture(scope="module")
def exported(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ti-out") / "model"
    args = [str(files["src"]), str(out), "--quiet", "--embedding", str(files["a1111_pt"]),
            "--embedding", f"{files['a1111_st']}:bad-hands", "--embedding", str(files["diffusers"])]
    result = CliRunner().invoke(export_cli.export, args)
    assert result.exit_code == 0, result.output
    return out


def vectors(files) -> list[torch.Tensor]:
    """The files' vectors in the order export adds them."""
    return [torch.load(files["a1111_pt"])["string_to_param"]["*"],
            load_file(str(files["a1111_st"]))["emb_params"],
            torch.load(files["diffusers"])["<toy>"][None]]


def test_tokens_recorded_and_read_by_both_tokenizers(files, exported):
    from transformers import CLIPTokenizer as HFTokenizer

    meta = json.loads((exported / "sdonnx.json").read_text())
    assert [(e["token"], e["vectors"]) for e in meta["embeddings"]] == [("mystyle", 2), ("bad-hands", 3), ("<toy>", 1)]
    from sdonnx.model import sha256

    assert [e["sha256"] for e in meta["embeddings"]] == [sha256(files[k]) for k in ("a1111_pt", "a1111_st", "diffusers")]
    ours = CLIPTokenizer.from_dir(exported / "tokenizer")
    theirs = HFTokenizer.from_pretrained(exported / "tokenizer")
    expanded = "a mystyle mystyle_1 cat, bad-hands bad-hands_1 bad-hands_2 <toy>"
    hf_ids = theirs(expanded, padding="max_length", max_length=77)["input_ids"]
    np.testing.assert_array_equal(ours(["a mystyle cat, bad-hands <toy>"])[0], hf_ids)
    assert ours.encode("mystyle_1") == [ours.encoder["mystyle_1"]]  # a later vector alone stays alone
    size = len(json.loads((files["src"] / "tokenizer" / "vocab.json").read_text()))
    assert sorted(ours.encoder[t] for t in ("mystyle", "mystyle_1", "bad-hands", "bad-hands_1", "bad-hands_2",
                                            "<toy>")) == list(range(size, size + 6))
    # the special tokens are what they were
    before = CLIPTokenizer.from_dir(files["src"] / "tokenizer")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (before.bos_id, before.eos_id, before.pad_id)


def test_embedding_tokens_encode_as_transformers_with_the_vectors(files, exported):
    from transformers import CLIPTextModel, CLIPTokenizer as HFTokenizer

    model = CLIPTextModel.from_pretrained(files["src"] / "text_encoder").eval()
    rows = model.get_input_embeddings().weight.shape[0]
    added = torch.cat(vectors(files))
    model.resize_token_embeddings(rows + len(added))
    with torch.no_grad():
        model.get_input_embeddings().weight[rows:] = added
    tok = HFTokenizer.from_pretrained(exported / "tokenizer")
    ids = tok("a mystyle mystyle_1 cat, bad-hands bad-hands_1 bad-hands_2 <toy>", padding="max_length",
              max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).last_hidden_state.numpy()
    pipe = Pipeline.load(exported, threads=1)
    got = pipe._encode_texts(["a mystyle cat, bad-hands <toy>"])[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    plain = pipe._encode_texts(["a cat,"])[0]
    assert np.abs(got - plain).max() > 1e-2
    # weighted: the whole embedding takes the weight
    assert np.abs(pipe._encode_texts(["a (mystyle:1.5) cat, bad-hands <toy>"])[0] - got).max() > 1e-3


@pytest.mark.parametrize("case, words", [
    ("dimension", ["16 values", "32"]),
    ("unreadable", ["cannot read embedding"]),
    ("duplicate", ["twice"]),
    ("in-vocab", ["already in the tokenizer"]),
    ("sdxl", ["SDXL"]),
    ("missing", ["not found"]),
    ("not-an-embedding", ["not a textual-inversion embedding"]),
])
def test_bad_embeddings_are_one_line_errors(files, tmp_path, case, words):
    specs = {
        "dimension": lambda p: torch.save({"string_to_param": {"*": torch.zeros(2, 16)}}, p / "small.pt"),
        "unreadable": lambda p: (p / "junk.pt").write_bytes(b"not a pickle at all"),
        "duplicate": lambda p: None,
        "in-vocab": lambda p: torch.save({"red": torch.zeros(DIM)}, p / "learned_embeds.bin"),
        "sdxl": lambda p: save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
                                    str(p / "xl.safetensors")),
        "missing": lambda p: None,
        "not-an-embedding": lambda p: save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(p / "two.safetensors")),
    }
    specs[case](tmp_path)
    emb = {"dimension": [tmp_path / "small.pt"], "unreadable": [tmp_path / "junk.pt"],
           "duplicate": [files["a1111_pt"], f"{files['diffusers']}:mystyle"],
           "in-vocab": [tmp_path / "learned_embeds.bin"], "sdxl": [tmp_path / "xl.safetensors"],
           "missing": [tmp_path / "nope.pt"], "not-an-embedding": [tmp_path / "two.safetensors"]}[case]
    out = tmp_path / "model"
    args = [str(files["src"]), str(out), "--quiet"]
    for e in emb:
        args += ["--embedding", str(e)]
    cli_error(CliRunner().invoke(export_cli.export, args), *words)
    assert not out.exists() and not list(tmp_path.glob(".model*"))
