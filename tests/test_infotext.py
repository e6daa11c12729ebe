"""PNG infotext as AUTOMATIC1111 writes and reads it, and `sdonnx generate --from-png` on the bundled tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from helpers import cli_error, one_line_error, picture
from sdonnx import infotext
from sdonnx.cli import main
from sdonnx.pipeline import Pipeline, Settings
from sdonnx.schedulers import NAMES

# ---- parsing A1111's infotexts ------------------------------------------------------------------------

HIRES = """masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer
Negative prompt: (worst quality, low quality:1.4), lowres, bad anatomy
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3456789012, Size: 512x768, Model hash: 7f96a1a9ca, \
Model: anything-v5, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, \
Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", TI hashes: "easynegative: c74b4e810b03", \
Version: v1.6.0"""

SCHEDULE_TYPE = """a photo of a cat
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: \
6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, \
Version: v1.10.1"""

MULTILINE = """a castle on a hill,
BREAK
sunset, dramatic sky
Negative prompt: blurry,
text, watermark
Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 42, Size: 768x512, Model: sd15"""

QUOTED = """portrait of a knight
Steps: 25, Sampler: DDIM, CFG scale: 8, Seed: 7, Size: 512x512, ADetailer prompt: "a \\"smiling\\" face, \
detailed", ADetailer model: face_yolov8n.pt, Seed: 8"""

CASES = [
    # (text, expected fields (a subset), expected options (a subset), expected ignored)
    (HIRES, {"Prompt": "masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer",
             "Negative prompt": "(worst quality, low quality:1.4), lowres, bad anatomy",
             "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef",
             "TI hashes": "easynegative: c74b4e810b03", "Size": "512x768", "Version": "v1.6.0"},
     {"steps": 28, "scheduler": "dpmpp_2m_karras", "guidance": 7.0, "seed": 3456789012, "width": 512,
      "height": 768, "strength": 0.5, "clip_skip": 2},
     ["Model hash", "Hires upscale", "Hires steps", "Hires upscaler", "Lora hashes", "TI hashes", "Version"]),
    (SCHEDULE_TYPE, {"Prompt": "a photo of a cat", "Negative prompt": "", "Schedule type": "Karras",
                     "VAE": "vae-ft-mse-840000-ema-pruned.safetensors"},
     {"scheduler": "dpmpp_2m_karras", "guidance": 7.5, "width": 512, "height": 512},
     ["Model hash", "VAE hash", "VAE", "Version"]),
    (MULTILINE, {"Prompt": "a castle on a hill,\nBREAK\nsunset, dramatic sky", "Negative prompt": "blurry,\ntext, watermark"},
     {"scheduler": "euler_a", "steps": 30, "width": 768, "height": 512, "seed": 42}, []),
    # a quoted value with escaped quotes and a comma; a repeated key keeps its last value
    (QUOTED, {"ADetailer prompt": 'a "smiling" face, detailed', "Seed": "8"},
     {"scheduler": "ddim", "seed": 8}, ["ADetailer prompt", "ADetailer model"]),
    ("an old one\nSteps: 50, Sampler: PLMS, CFG scale: 7, Seed: 3, Size: 512x512, Model hash: 7460a6fa",
     {"Prompt": "an old one"}, {"scheduler": "pndm", "steps": 50}, ["Model hash"]),
]


@pytest.mark.parametrize("text, fields, options, ignored", CASES)
def test_parse_a1111_infotexts(text, fields, options, ignored):
    parsed = infotext.parse(text)
    assert {k: parsed.get(k) for k in fields} == fields
    read = infotext.recipe(parsed)
    assert {k: read.options.get(k) for k in options} == options
    assert read.ignored == ignored


def test_parse_follows_a1111s_last_line_rule():
    # fewer than three pairs on the last line: it is prompt text, as A1111 reads it
    assert infotext.parse("a dog\nSteps: 20, Seed: 5") == {"Prompt": "a dog\nSteps: 20, Seed: 5", "Negative prompt": ""}
    lone = infotext.parse("just a prompt: with a colon")
    assert lone["Prompt"] == "just a prompt: with a colon" and not infotext.has_settings(lone)
    # no prompt at all, and surrounding blank lines and spaces
    bare = infotext.parse("\n  Steps: 4, Sampler: Euler, CFG scale: 2, Seed: 0, Size: 64x64  \n")
    assert bare["Prompt"] == "" and infotext.recipe(bare).options["scheduler"] == "euler"
    assert infotext.has_settings(bare)


def test_quoting():
    assert infotext.quote("plain") == "plain" and infotext.quote(7) == "7"
    assert infotext.quote("a, b") == '"a, b"' and infotext.quote("k: v") == '"k: v"'
    assert infotext.quote('say "hi"') == '"say \\"hi\\""'
    assert infotext.quote("two\nlines") == '"two\\nlines"'
    assert infotext.quote("été: chaud") == '"été: chaud"'  # JSON-quoted but not ASCII-escaped, as A1111 writes
    assert infotext.number(7.0) == "7" and infotext.number(7.5) == "7.5" and infotext.number(0.1 + 0.2) == "0.30000000000000004"


def test_samplers_and_values_we_cannot_use_are_one_line_errors():
    base = "x\nSteps: 20, CFG scale: 7, Seed: 1, Size: 512x512, "
    for tail, words in (("Sampler: DPM++ SDE Karras", ("unknown sampler", "DPM++ SDE")),
                        ("Sampler: Euler, Schedule type: Exponential", ("schedule type", "Exponential")),
                        ("Sampler: Euler, Steps: many", ("Steps", "many")),
                        ("Sampler: Euler, Size: 512 by 512", ("Size", "512 by 512"))):
        one_line_error(lambda: infotext.recipe(infotext.parse(base + tail)), *words)
    # our own Scheduler field wins over A1111's sampler name (it is exact where the names fold, e.g. PLMS)
    ours = infotext.parse(base + "Sampler: PLMS, Scheduler: pndm")
    assert infotext.recipe(ours).options["scheduler"] == "pndm" and infotext.recipe(ours).ignored == []
    # another tool's "Scheduler" that is not one of ours is left to the note, the sampler decides
    other = infotext.recipe(infotext.parse(base + "Sampler: Euler, Scheduler: karras"))
    assert other.options["scheduler"] == "euler" and other.ignored == ["Scheduler"]


# ---- writing ours: the exact A1111 layout, and round trips -------------------------------------------


def settings(**kw) -> Settings:
    base = dict(prompt="a red circle", negative_prompt="", steps=20, guidance=7.0, scheduler="dpmpp_2m_karras",
                seed=1, width=512, height=512, model="sd15")
    return Settings(**{**base, **kw})


def test_format_writes_a1111s_layout():
    text = infotext.format(settings(negative_prompt="blurry, ugly", strength=0.75, clip_skip=2))
    assert text == ("a red circle\nNegative prompt: blurry, ugly\n"
                    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
                    "Model: sd15, Denoising strength: 0.75, Clip skip: 2, Scheduler: dpmpp_2m_karras, VAE: full")
    text = infotext.format(settings(scheduler="euler_a", guidance=7.5, cache_interval=3, vae="tiny",
                                    prompt_syntax="none", model="my, model: v2"), {"Batch size": 2, "Batch pos": 1})
    assert text == ("a red circle\n"
                    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 1, Size: 512x512, "
                    'Model: "my, model: v2", Scheduler: euler_a, VAE: tiny, Cache interval: 3, Prompt syntax: none, '
                    "Batch size: 2, Batch pos: 1")
    assert settings().infotext() == infotext.format(settings())


def from_recipe(read: infotext.Recipe) -> Settings:
    return Settings(**read.options, model=read.model)


ROUND_TRIPS = [
    settings(),
    settings(prompt="a (red:1.3) fox, ((masterpiece))\nsecond line: with a colon", negative_prompt="blurry,\n[text]",
             guidance=7.123456789, seed=2**32 - 1, width=768, height=448, strength=0.3, clip_skip=3,
             prompt_syntax="none", vae="tiny", cache_interval=2, model='odd "name", v1'),
    *(settings(scheduler=name, guidance=0.0, strength=1.0) for name in NAMES),
]


@pytest.mark.parametrize("original", ROUND_TRIPS, ids=lambda s: s.scheduler)
def test_our_infotext_round_trips_exactly(original):
    read = infotext.recipe(infotext.parse(infotext.format(original)))
    assert from_recipe(read) == original and read.ignored == []


def test_save_png_writes_settings_strings_and_dicts(tmp_path):
    from sdonnx.image import save_png

    s = settings(negative_prompt="dog")
    path = tmp_path / "x.png"
    for params, expected in ((s, s.infotext()), ("free text", "free text"),
                             ({"prompt": "cat", "steps": 3}, "cat\nSteps: 3")):
        save_png(picture(), path, params)
        assert Image.open(path).text["parameters"] == expected == infotext.read_image(path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ---- sdonnx generate --from-png ----------------------------------------------------------------------


def sdonnx(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def a1111_png(path, text: str, size=(48, 32)):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", size, (200, 30, 30)).save(path, pnginfo=info)


def test_from_png_regenerates_our_picture_exactly(tmp_path):
    first = tmp_path / "first.png"
    result = sdonnx("generate", "a red circle, on blue: big", "--negative-prompt", 'a "green"\nsquare', "--steps", "4",
                    "--guidance", "4.5", "--scheduler", "pndm", "--seed", "123", "--width", "48", "--height", "32",
                    "--cache-interval", "2", "-o", first)
    assert result.exit_code == 0, result.output
    again = tmp_path / "again.png"
    result = sdonnx("generate", "--from-png", first, "-o", again)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # our own fields are all used, the model is the same: nothing to note
    assert np.array_equal(pixels(again), pixels(first))
    assert Image.open(again).text["parameters"] == Image.open(first).text["parameters"]
    # the picture is the one the settings draw, and a change to one of them changes it
    other = tmp_path / "other.png"
    assert sdonnx("generate", "--from-png", first, "--seed", "124", "-o", other).exit_code == 0
    read = infotext.recipe(infotext.parse(infotext.read_image(other)))
    assert read.options["seed"] == 124 and read.options["scheduler"] == "pndm" and read.options["cache_interval"] == 2
    assert not np.array_equal(pixels(other), pixels(first))


def test_from_png_regenerates_one_picture_of_a_batch(tmp_path):
    out = tmp_path / "many.png"
    assert sdonnx("generate", "a blue square", "--steps", "2", "--seed", "5", "--num-images", "2", "-o", out).exit_code == 0
    second = tmp_path / "many-2.png"
    assert "Batch size: 2, Batch pos: 1" in Image.open(second).text["parameters"]
    again = tmp_path / "again.png"
    result = sdonnx("generate", "--from-png", second, "-o", again)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "many-1.png", "many-2.png"]
    assert np.array_equal(pixels(again), pixels(second))
    assert not np.array_equal(pixels(again), pixels(tmp_path / "many-1.png"))


def test_from_png_img2img_uses_the_strength_only_with_an_init_image(tmp_path):
    picture().resize((64, 64)).save(tmp_path / "in.png")
    first = tmp_path / "first.png"
    assert sdonnx("generate", "a cat", "--steps", "4", "--seed", "3", "--init-image", tmp_path / "in.png",
                  "--strength", "0.6", "-o", first).exit_code == 0
    assert "Denoising strength: 0.6" in Image.open(first).text["parameters"]
    again = tmp_path / "again.png"
    result = sdonnx("generate", "--from-png", first, "--init-image", tmp_path / "in.png", "-o", again)
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(again), pixels(first))
    result = sdonnx("generate", "--from-png", first, "-o", tmp_path / "plain.png")
    assert result.exit_code == 0 and result.stderr.count("\n") == 1
    assert "Denoising strength (no --init-image)" in result.stderr and "Init image" in result.stderr


def test_from_png_reads_a1111_pictures(tmp_path):
    text = ("a red circle, (on blue:1.0)\nNegative prompt: green\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, "
            "Seed: 77, Size: 48x32, Model hash: 7f96a1a9ca, Model: anything-v5, "
            'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0')
    png = tmp_path / "a1111.png"
    a1111_png(png, text)
    exif = Image.Exif()
    # A1111's JPEG/WebP: the infotext in EXIF UserComment, character set UNICODE, UTF-16 big-endian
    exif.get_ifd(infotext.EXIF_IFD)[infotext.USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    jpeg, webp = tmp_path / "a1111.jpg", tmp_path / "a1111.webp"
    Image.new("RGB", (48, 32)).save(jpeg, exif=exif.tobytes())
    Image.new("RGB", (48, 32)).save(webp, exif=exif.tobytes())
    expected = Pipeline.load().txt2img("a red circle, (on blue:1.0)", negative_prompt="green", steps=3, guidance=5.0,
                                       scheduler="dpmpp_2m_karras", seed=77, width=48, height=32)[0]
    for source in (png, jpeg, webp):
        out = tmp_path / f"from-{source.suffix[1:]}.png"
        result = sdonnx("generate", "--from-png", source, "-o", out)
        assert result.exit_code == 0, result.output
        assert np.array_equal(pixels(out), np.asarray(expected)), source
        notes = result.stderr.splitlines()
        assert notes == ["note: ignored from a1111" + source.suffix + ": Model hash, Lora hashes, Version",
                         f"note: a1111{source.suffix} was made with model 'anything-v5'; generating with 'tiny'"]


def test_from_png_clip_skip(tmp_path):
    """`Clip skip: 2` reaches the pipeline and comes back in the new PNG; `--clip-skip 1` overrides it and draws
    another picture."""
    png = tmp_path / "skip.png"
    a1111_png(png, "a cat\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64, Clip skip: 2")
    result = sdonnx("generate", "--from-png", png, "-o", tmp_path / "two.png")
    assert result.exit_code == 0, result.output
    assert "Clip skip: 2" in Image.open(tmp_path / "two.png").text["parameters"]
    result = sdonnx("generate", "--from-png", png, "--clip-skip", "1", "-o", tmp_path / "one.png")
    assert result.exit_code == 0, result.output
    assert "Clip skip" not in Image.open(tmp_path / "one.png").text["parameters"]
    two, one = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("two", "one"))
    assert np.abs(two - one).max() > 0


def test_from_png_errors_are_one_line_and_write_nothing(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "notes.png").write_text("not a picture")
    a1111_png(tmp_path / "sde.png", "x\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 1, Size: 64x64")
    a1111_png(tmp_path / "preview.png", "\nPreview: step 2/5")  # what our live previews carry
    out = tmp_path / "out.png"
    for name, words in (("plain.png", ("no generation parameters",)), ("notes.png", ("not a readable image",)),
                        ("absent.png", ("not found",)), ("sde.png", ("unknown sampler", "DPM++ SDE")),
                        ("preview.png", ("no generation settings",))):
        cli_error(sdonnx("generate", "--from-png", tmp_path / name, "-o", out), name, *words)
        assert not out.exists()
    cli_error(sdonnx("generate", "-o", out), "PROMPT", "--from-png")
    assert not out.exists()


def test_settings_fields_all_reach_the_infotext():
    # a new Settings field must be written (or deliberately left out) here, or PNGs stop reproducing pictures
    known = {"prompt", "negative_prompt", "steps", "guidance", "scheduler", "seed", "width", "height", "model",
             "cache_interval", "strength", "vae", "clip_skip", "prompt_syntax"}
    assert {f.name for f in dataclasses.fields(Settings)} == known


def test_a1111_sampler_names_both_ways():
    from sdonnx import a1111

    for name in NAMES:
        assert a1111.scheduler_of(*a1111.sampler_of(name)) == name
        assert a1111.scheduler_of(name) == name  # our own names read too
    assert a1111.scheduler_of("dpm++ 2m  karras") == a1111.scheduler_of("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert a1111.scheduler_of("Euler a", "Automatic") == "euler_a"
    # a Karras schedule on a sampler whose Karras variant we lack is refused, not silently dropped
    one_line_error(lambda: a1111.scheduler_of("Euler", "Karras"), "Euler", "Karras", error=a1111.SamplerNameError)
