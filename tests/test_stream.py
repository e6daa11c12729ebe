"""`export --stream` and the low-memory runtime running the streamed U-Net and VAE decoder part by part."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import tiny_sd
from helpers import cli_error, one_line_error
from sdonnx.cli import main
from sdonnx.export import cli as export_cli
from sdonnx.export import stream
from sdonnx.pipeline import Pipeline
from sdonnx.session import Component
from sdonnx.tiling import Tiles

# int8 compact with MultiHeadAttention, the embedded configuration; one layer per part, so there are many cuts
EXPORT = ["--precision", "int8", "--int8-scheme", "compact", "--attention", "mha", "--step-cache", "--quiet"]
GEN = dict(negative_prompt="green square", steps=3, scheduler="euler", seed=5, output_type="np")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(streamed folder, the same export without --stream) of one tiny random model."""
    root = tmp_path_factory.mktemp("stream")
    tiny_sd.make_pipeline("sd1", seed=4).save_pretrained(root / "src")
    out = []
    for name, extra in (("streamed", ["--stream", "--stream-part-mb", "0"]), ("plain", [])):
        result = CliRunner().invoke(export_cli.export, [str(root / "src"), str(root / name), *EXPORT, *extra])
        assert result.exit_code == 0, result.output
        out.append(root / name)
    return out[0], out[1]


def _meta(folder: Path) -> dict:
    return json.loads((folder / "sdonnx.json").read_text())


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_sdonnx_json_records_the_parts(folders):
    streamed, plain = folders
    meta = _meta(streamed)
    assert _meta(plain)["stream"] is None
    entry = meta["stream"]["components"]
    assert set(entry) == {"unet", "vae_decoder"}
    for name, comp in entry.items():
        parts = comp["parts"]
        assert len(parts) >= 5, (name, len(parts))  # one layer per part: a cut at every layer
        for i, part in enumerate(parts):
            assert part["file"] == f"{name}_stream/part_{i:02d}.onnx"
            for rel in (part["file"], part["file"] + "_data"):
                assert meta["files"][rel]["sha256"] and (streamed / rel).is_file(), rel
        assert comp["output"] in parts[-1]["outputs"]
        assert comp["verify_vs_whole_graph"]["max_abs_err"] <= stream.MAX_ERR
    assert "text_encoder/model.onnx_data" in meta["files"]  # mapped, not copied, by ORT
    shown = CliRunner().invoke(main, ["info", str(streamed)]).output
    assert f"unet (streamed)        {len(entry['unet']['parts'])} parts" in shown


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_parts_chained_equal_the_whole_graph(folders, component):
    streamed, _ = folders
    entry = _meta(streamed)["stream"]["components"][component]
    rng = np.random.default_rng(0)
    if component == "unet":  # batch 2, a non-square latent
        feeds = {"sample": rng.standard_normal((2, 4, 8, 12), dtype=np.float32), "timestep": np.array(421, np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    else:
        feeds = {"latent_sample": rng.standard_normal((1, 4, 6, 10), dtype=np.float32) * 5}
    whole = _session(streamed / component / "model.onnx").run([entry["output"]], feeds)[0]
    chained = stream.run_chain(entry["parts"], streamed, feeds, entry["output"])
    assert whole.shape == chained.shape
    np.testing.assert_allclose(chained, whole, rtol=0, atol=1e-6)
    assert np.abs(whole).max() > 0.1  # a real output, not zeros


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """The graph files Component opens during a test."""
    paths: list[Path] = []
    init = Component.__init__

    def record(self, path, config=None):
        paths.append(Path(path))
        init(self, path, config)

    monkeypatch.setattr(Component, "__init__", record)
    return paths


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_streamed_image_equals_the_plain_low_memory_one(folders, opened, guidance):
    streamed, plain = folders
    tiles = Tiles(size=3, overlap=1)  # the tiny 32x32 picture still decodes in several tiles
    pipe = Pipeline.load(streamed, low_memory=True, threads=1)
    pipe.tiles = tiles
    assert pipe.streams
    image = pipe.txt2img("a red circle", guidance=guidance, **GEN)
    names = {p.relative_to(streamed).as_posix() for p in opened}
    meta = _meta(streamed)["stream"]["components"]
    assert {p["file"] for c in meta.values() for p in c["parts"]} <= names
    assert not names & {"unet/model.onnx", "vae_decoder/model.onnx"}
    reference_pipe = Pipeline.load(plain, low_memory=True, threads=1)
    reference_pipe.tiles = tiles
    reference = reference_pipe.txt2img("a red circle", guidance=guidance, **GEN)
    assert image.shape == reference.shape
    assert np.abs(image - reference).max() <= 1 / 255
    assert image.std() > 0.01


def test_step_cache_with_streaming_is_refused_in_one_line(folders):
    streamed, _ = folders
    pipe = Pipeline.load(streamed, low_memory=True, threads=1)
    one_line_error(lambda: pipe.txt2img("a cat", cache_interval=2, **GEN), "cache_interval 2", "cannot stream")
    # without low-memory mode the same folder runs its step-cache graphs as before
    assert Pipeline.load(streamed, threads=1).txt2img("a cat", cache_interval=2, **GEN).shape == (1, 32, 32, 3)


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_missing_part_is_a_one_line_error_naming_it(folders, tmp_path):
    copy = _copy(folders[0], tmp_path)
    (copy / "unet_stream" / "part_03.onnx").unlink()
    one_line_error(lambda: Pipeline.load(copy, low_memory=True), "unet_stream/part_03.onnx", "missing")
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(copy), "--low-memory", "--steps", "1",
                                       "-o", str(tmp_path / "x.png")])
    cli_error(result, "unet_stream/part_03.onnx", "missing")


def test_corrupt_part_is_a_one_line_error_naming_it(folders, tmp_path):
    copy = _copy(folders[0], tmp_path)
    data = copy / "vae_decoder_stream" / "part_01.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    one_line_error(lambda: Pipeline.load(copy, low_memory=True), "vae_decoder_stream/part_01.onnx_data",
                   "checksum mismatch")
    # without the checksum check (sizes only), a part ORT cannot parse still names itself when it is loaded
    graph = copy / "unet_stream" / "part_02.onnx"
    graph.write_bytes(b"\x00" * graph.stat().st_size)
    pipe = Pipeline.load(copy, low_memory=True, verify=False, threads=1)
    one_line_error(lambda: pipe.txt2img("a cat", **GEN), "part_02.onnx", "cannot load")


def test_stream_with_static_shapes_is_refused(tmp_path):
    result = CliRunner().invoke(export_cli.export, ["random:sd15", str(tmp_path / "x"), "--stream",
                                                    "--static", "512x512"])
    cli_error(result, "--stream", "--static")
    assert not (tmp_path / "x").exists()


def test_memory_benchmark_child_reports_phases(folders, tmp_path):
    """benchmarks/memory.py's measuring child on the tiny streamed folder: its peaks per phase and step times
    come back (it wraps pipeline internals, so a changed signature must fail here, not in a benchmark run)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
    for config in ("streamed", "whole-graphs"):
        done = subprocess.run([sys.executable, str(script), "--child", config, "--model", str(folders[0]),
                               "--size", "32", "--steps", "2", "--image", str(tmp_path / f"{config}.npy")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert {"text encoder", "step 1", "step 2", "vae decoder"} <= set(result["peak_after"]), result
        assert result["peak_rss_mb"] >= max(result["peak_after"].values()) > 0
