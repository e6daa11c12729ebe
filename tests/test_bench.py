"""`sdonnx bench` on a tiny model exported by our exporter: the report's structure and that its figures make sense."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdonnx.bench import format_table, parse_size, run_bench
from sdonnx.cli import main
from sdonnx.errors import SdonnxError

FIGURES = ("text_encoder", "unet_b2", "unet_b1", "vae_decode", "vae_encode")


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    """A tiny random diffusers pipeline."""
    from tiny_sd import save_pipeline

    out = tmp_path_factory.mktemp("bench") / "diffusers"
    save_pipeline(out, "sd1")
    return out


def _export(source: Path, out: Path, *options: str) -> Path:
    result = CliRunner().invoke(main, ["export", str(source), str(out), "--quiet", *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny_model(diffusers_dir) -> Path:
    """The tiny pipeline exported with `sdonnx export` (no step-cache graphs)."""
    return _export(diffusers_dir, diffusers_dir.parent / "onnx")


@pytest.fixture(scope="module")
def cache_model(diffusers_dir) -> Path:
    """The same pipeline exported with `--step-cache`, as tests/test_perf_features.py does."""
    return _export(diffusers_dir, diffusers_dir.parent / "onnx-cache", "--step-cache")


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


def bench_json(model: Path, *args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", "--model", str(model), "--size", "32x24", "--steps", "3",
                                       "--runs", "2", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def steps_timed(report: dict) -> None:
    """Every step of every run timed (a step whose U-Net call the clock missed would be left out), all > 0."""
    s = report["step_s"]
    assert s["n"] == report["steps"] * report["runs"], s
    assert all(positive(s[k]) for k in ("median", "min", "max")), s
    assert report["step_s"]["max"] < report["txt2img_s"]["max"]


@pytest.fixture(scope="module")
def cache_report(cache_model) -> dict:
    return bench_json(cache_model, "--cache-interval", "2")


def test_cache_interval(cache_report):
    r = cache_report
    assert r["cache_interval"] == 2 and r["low_memory"] is False
    steps_timed(r)  # steps 2 of 3 runs only the shallow graph: the clock starts on it too
    assert set(r["components_s"]) == set(FIGURES) | {"unet_features_b2", "unet_shallow_b2"}
    for name in ("unet_features_b2", "unet_shallow_b2"):
        s = r["components_s"][name]
        assert s["n"] == 2 and all(positive(s[k]) for k in ("median", "min", "max")), (name, s)
    assert {"unet_features", "unet_shallow"} <= set(r["precision"])
    text = format_table(r)
    for label in ("U-Net features batch 2", "U-Net shallow batch 2", "cache interval 2", "low_memory false"):
        assert label in text


def test_step_cache_figures_at_interval_1(cache_model):
    """The figures come with the folder's step-cache graphs; the runs then use the plain U-Net."""
    r = run_bench(cache_model, size=(32, 24), steps=2, runs=1)
    assert r["cache_interval"] == 1 and {"unet_features_b2", "unet_shallow_b2"} <= set(r["components_s"])
    steps_timed(r)


@pytest.mark.parametrize("folder, interval", [("tiny_model", 1), ("cache_model", 2)])
def test_low_memory(request, folder, interval):
    r = bench_json(request.getfixturevalue(folder), "--low-memory", "--cache-interval", str(interval))
    assert r["low_memory"] is True and r["cache_interval"] == interval
    assert r["components_s"] == {}  # no standalone figures: they would hold sessions open
    steps_timed(r)  # the clock works though low-memory components are opened per run
    assert r["txt2img_s"]["n"] == 2 and positive(r["txt2img_s"]["median"])
    assert {"text_encoder", "vae_decoder", "unet" if interval == 1 else "unet_shallow"} <= set(r["precision"])
    text = format_table(r)
    assert "low_memory true" in text and "denoising step" in text and "U-Net batch 2" not in text
    if interval == 2:
        assert "cache interval 2" in text


def test_cache_interval_needs_the_graphs(tiny_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_model), "--cache-interval", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "needs the step-cache graphs" in errors[0], result.output
    assert "txt2img" not in result.stderr  # refused before any timing


def test_bad_cache_interval(tiny_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(tiny_model), "--cache-interval", "0"])
    assert result.exit_code != 0 and "whole number >= 1" in result.output and "Traceback" not in result.output


def test_benchmark_worker_on_the_bundled_model(tmp_path, monkeypatch):
    """benchmarks/worker.py (the comparison harness's timed process), run as run.py and gpu.py run it: figures,
    steps and the provider recorded; the shared summary (no CPU peak, as on the GPU machine: no bound) and
    gpu.py's table; a half-precision PyTorch system asked for on the CPU is refused with one line."""
    import subprocess
    import sys

    from sdonnx.model import default_model_dir

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    import gpu
    import report
    import run

    res = run.run_worker("sdonnx-fp32", default_model_dir(), 64, 4, 1, "unet_b2,txt2img")
    assert set(res["times_s"]) == {"unet_b2", "txt2img"} and res["provider"] == "cpu"
    # the folder's own scheduler (DDIM here, as diffusers and optimum run it): one callback per step
    assert len(res["step_s"]) == 4 and all(t > 0 for t in res["step_s"])
    assert "gpu_mem_mb" not in res
    runs = [res, dict(res, gpu_mem_mb=321.0)]
    summary = report.summarize({"runs": runs})
    cell = summary["64"]["sdonnx-fp32"]
    assert cell["unet_b2"]["n"] == 2 and cell["gpu_mem_mb"] == 321.0 and "unet_b2_efficiency" not in cell
    table = gpu.markdown({"name": "t", "weights": "bundled", "steps": 4, "warmup": 1, "machine": {},
                          "started": "now", "command": "c", "systems": ["sdonnx-fp32"], "runs": runs,
                          "summary": summary})
    row = next(x for x in table.splitlines() if x.startswith("| sdonnx-fp32 | 2 |"))
    assert f"{cell['unet_b2']['median'] * 1000:.1f}" in row and row.endswith("| 321 |")
    done = subprocess.run([sys.executable, str(bench / "worker.py"), "diffusers-fp16", str(tmp_path), "--size", "64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "runs on a GPU only" in done.stderr


def test_benchmark_exports_run_sdonnx_with_this_interpreter(tmp_path, monkeypatch):
    """benchmarks/prepare.py starts each export with the interpreter running it, not `sdonnx` from PATH (absent
    when a venv's python runs unactivated); that command works with an empty PATH."""
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import prepare

    commands = []
    monkeypatch.setattr(prepare, "_run", lambda cmd, log: commands.append(cmd))
    (tmp_path / "diffusers" / "vae").mkdir(parents=True)
    (tmp_path / "diffusers" / "model_index.json").write_text("{}")  # the weights are there: only exports left
    # the tiny weights' exports carry a tiny VAE of their VAE's downscale (prepare writes it from this config)
    (tmp_path / "diffusers" / "vae" / "config.json").write_text('{"block_out_channels": [32, 64]}')
    prepare.prepare(tmp_path, "tiny", ["sdonnx-fp32", "sdonnx-int8"])
    assert [cmd[:4] for cmd in commands] == [[sys.executable, "-m", "sdonnx", "export"]] * 2
    done = subprocess.run([*commands[0][:3], "--version"], capture_output=True, text=True, timeout=120,
                          env={"PATH": ""})
    assert done.returncode == 0 and done.stdout.startswith("sdonnx, version"), done.stderr
