"""`sdonnx bench` on a tiny model exported by our exporter: the report's structure and that its figures make sense."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdonnx.bench import format_table, parse_size, run_bench
from sdonnx.cli import main
from sdonnx.session import SdonnxError

FIGURES = ("text_encoder", "unet_b2", "unet_b1", "vae_decode", "vae_encode")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random diffusers pipeline, exported with `sdonnx export`."""
    from tiny_sd import save_pipeline

    base = tmp_path_factory.mktemp("bench")
    save_pipeline(base / "diffusers", "sd1")
    out = base / "onnx"
    result = CliRunner().invoke(main, ["export", str(base / "diffusers"), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def report(tiny_model) -> dict:
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_model), "--size", "32x24", "--steps", "3",
                                       "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert "txt2img 32x24, 3 steps: run 2/2" in result.stderr  # progress goes to stderr, the report to stdout
    return json.loads(result.stdout)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_report_structure(report, tiny_model):
    assert report["model"] == str(tiny_model)
    assert report["provider"] == "cpu"
    assert report["size"] == [32, 24] and report["steps"] == 3 and report["runs"] == 2
    assert set(report["components_s"]) == set(FIGURES)
    assert set(report["precision"]) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert report["machine"]["physical_cores"] >= 1 and report["machine"]["onnxruntime"]


def test_figures_positive_and_finite(report):
    assert positive(report["load_s"]) and positive(report["peak_rss_mb"])
    for name in FIGURES:
        s = report["components_s"][name]
        assert s["n"] == 2, name
        assert all(positive(s[k]) for k in ("median", "min", "max")), (name, s)
        assert s["min"] <= s["median"] <= s["max"]
    assert report["step_s"]["n"] == 3 * 2  # every step of every run, each timed from its first U-Net call
    assert report["txt2img_s"]["n"] == 2
    for s in (report["step_s"], report["txt2img_s"]):
        assert all(positive(s[k]) for k in ("median", "min", "max"))
    # a step is part of a whole run, which also encodes the prompts and decodes the image
    assert report["step_s"]["max"] < report["txt2img_s"]["max"]


def test_table(report):
    text = format_table(report)
    for label in ("U-Net batch 2", "VAE encode", "denoising step", "txt2img (3 steps)", "peak RSS"):
        assert label in text


def test_default_size_is_the_models(tiny_model):
    r = run_bench(tiny_model, steps=1, runs=1)
    assert r["size"] == [32, 32]  # tiny_sd's sample_size 16 x VAE factor 2
    assert r["step_s"]["n"] == 1


@pytest.mark.parametrize("args, message", [
    (["--size", "3x"], "WIDTHxHEIGHT"),
    (["--size", "30x30"], "multiples of 8"),
    (["--steps", "0"], "at least 1"),
    (["--provider", "tpu"], "unknown provider"),
])
def test_bad_options_fail_in_one_line(tiny_model, args, message):
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_model), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_missing_folder():
    result = CliRunner().invoke(main, ["bench", "--model", "/nonexistent/model"])
    assert result.exit_code != 0 and "model folder not found" in result.output


def test_parse_size():
    assert parse_size("512x768") == (512, 768) and parse_size("256") == (256, 256)
    with pytest.raises(SdonnxError):
        parse_size("axb")
    with pytest.raises(SdonnxError, match="runs"):
        run_bench("/nonexistent", runs=0)
