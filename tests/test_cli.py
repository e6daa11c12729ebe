"""`sdonnx generate` and `sdonnx info` on a tiny optimum-exported model: files written, errors as one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import cli_error, picture, square_mask, tiny_folders
from sdonnx.cli import main
from sdonnx.model import sha256
from sdonnx.pipeline import Pipeline
from sdonnx.session import available_providers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folders("sd1", tmp_path_factory.getbasetemp())[1]


def sdonnx(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def generate(folder, out, *args):
    return sdonnx("generate", "a red circle", "--model", folder, "--steps", "2", "-o", out, *args)


def test_generate_writes_png_with_parameters(folder, tmp_path):
    out = tmp_path / "cat.png"
    result = generate(folder, out, "--seed", "5", "--negative-prompt", "blue", "--scheduler", "euler",
                      "--guidance", "6")
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    assert img.size == (32, 32) and img.format == "PNG"
    text = img.text["parameters"]
    assert text.splitlines()[:2] == ["a red circle", "Negative prompt: blue"]
    for part in ("Steps: 2", "CFG scale: 6", "Scheduler: euler", "Seed: 5", "Size: 32x32"):
        assert part in text
    again = tmp_path / "again.png"
    assert generate(folder, again, "--seed", "5", "--negative-prompt", "blue", "--scheduler", "euler",
                    "--guidance", "6").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(img))


def test_generate_several_img2img_and_inpaint(folder, tmp_path):
    result = generate(folder, tmp_path / "many.png", "--num-images", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many-1.png", "many-2.png"]
    picture().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    result = generate(folder, tmp_path / "i2i.png", "--init-image", tmp_path / "in.png", "--strength", "0.5")
    assert result.exit_code == 0, result.output
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i2i.png").text["parameters"]
    result = generate(folder, tmp_path / "fill.png", "--init-image", tmp_path / "in.png",
                      "--mask", tmp_path / "mask.png")
    assert result.exit_code == 0, result.output
    keep = np.asarray(square_mask()) < 128
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fill.png"))[keep], np.asarray(picture())[keep])


def test_bad_inputs_exit_with_one_line_and_no_file(folder, tmp_path):
    picture().save(tmp_path / "in.png")
    square_mask().resize((16, 16)).save(tmp_path / "small-mask.png")
    (tmp_path / "notes.png").write_text("not a picture")
    out = tmp_path / "out.png"
    image = ("--init-image", tmp_path / "in.png")
    cases = [
        (("--width", "30"), ("multiples of 8",)),
        (("--height", "36"), ("multiples of 8",)),
        ((*image, "--mask", tmp_path / "small-mask.png"), ("mask", "16x16", "32x32")),
        ((*image, "--strength", "0"), ("strength",)),
        ((*image, "--strength", "1.5"), ("strength",)),
        (("--scheduler", "magic"), ("unknown scheduler", "magic")),
        (("--init-image", tmp_path / "notes.png"), ("not an image", "notes.png")),
        (("--mask", tmp_path / "small-mask.png"), ("--mask needs --init-image",)),
        (("--provider", "tpu"), ("unknown provider", ", ".join(available_providers()))),
    ]
    for args, words in cases:
        cli_error(generate(folder, out, *args), *words)
        assert not out.exists() and not list(tmp_path.glob(".sdonnx-*")), args
    if "cuda" not in available_providers():
        cli_error(generate(folder, out, "--provider", "cuda"), "not installed", "available: ")
    cli_error(generate(tmp_path / "nowhere", out), "model folder not found")
    assert not out.exists()


def test_nan_image_is_reported_not_saved(folder, tmp_path, monkeypatch):
    real_load = Pipeline.load

    def poisoned(cls, *args, **kwargs):  # a VAE decoder that overflows, as fp16 ones can
        pipe = real_load(*args, **kwargs)
        decoder = pipe.components["vae_decoder"]
        pipe.components["vae_decoder"] = lambda **feeds: {"sample": decoder(**feeds)["sample"] * np.float32("nan")}
        return pipe

    monkeypatch.setattr(Pipeline, "load", classmethod(poisoned))
    out = tmp_path / "black.png"
    cli_error(generate(folder, out), "NaN")
    assert not out.exists()


def test_info(folder, tmp_path):
    result = sdonnx("info", folder)
    assert result.exit_code == 0, result.output
    for part in ("family       sd1", "text_encoder", "unet", "vae_encoder", "vae_decoder", "pndm", "32x32",
                 "none recorded"):
        assert part in result.output
    ours = tmp_path / "ours"
    shutil.copytree(folder, ours)
    unet = ours / "unet/model.onnx"
    files = {"unet/model.onnx": {"sha256": sha256(unet), "size": unet.stat().st_size}}
    meta = {"format": 1, "exporter": "sdonnx 0.1.0", "family": "tiny", "files": files,
            "components": {"unet": {"precision": "int8"}}, "defaults": {"steps": 4, "scheduler": "euler"}}
    (ours / "sdonnx.json").write_text(json.dumps(meta))
    result = sdonnx("info", ours)
    assert result.exit_code == 0, result.output
    for part in ("family       tiny", "int8", "4 steps", "euler", "1/1 files ok", "sha256 ok"):
        assert part in result.output
    (ours / "unet/model.onnx").write_bytes(b"x" * files["unet/model.onnx"]["size"])
    result = sdonnx("info", ours)
    assert result.exit_code != 0 and "checksum mismatch" in result.output
    cli_error(generate(ours, tmp_path / "x.png"), "corrupt model folder", "unet/model.onnx")
    cli_error(sdonnx("info", tmp_path / "nowhere"), "not found")


def test_info_without_a_folder_describes_the_bundled_model():
    from sdonnx.model import default_model_dir

    result = sdonnx("info")
    assert result.exit_code == 0, result.output
    assert f"model        {default_model_dir()}" in result.output and "files ok" in result.output


def test_group_keeps_version_and_lazy_export():
    assert sdonnx("--version").output.startswith("sdonnx, version")
    listed = sdonnx("--help").output
    assert all(name in listed for name in ("export", "generate", "info"))
