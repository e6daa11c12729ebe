"""`sdonnx export`: tiny random diffusers folders -> ONNX folders checked against diffusers/transformers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import tiny_sd
from helpers import cli_error
from sdonnx.export import cli as export_cli
from sdonnx.export import folder, quantize, verify
from sdonnx.export.onnx import Static

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
TOL = 1e-4


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """family -> (diffusers pipeline, its saved folder), built once per session."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family in ("sd1", "sd2", "inpaint"):
        pipe = tiny_sd.make_pipeline(family, seed=1)
        pipe.save_pretrained(root / family)
        out[family] = (pipe, root / family)
    return out


def run_cli(*args: str):
    return CliRunner().invoke(export_cli.export, [*map(str, args), "--quiet"])


@pytest.fixture(scope="session")
def exported(sources, tmp_path_factory):
    """(family, precision) -> exported model folder, cached for the session."""
    root = tmp_path_factory.mktemp("exported")
    cache: dict = {}

    def get(family: str = "sd1", precision: str = "fp32") -> Path:
        if (family, precision) not in cache:
            out = root / f"{family}-{precision}"
            scheme = ["--int8-scheme", precision.split("-")[1]] if precision.startswith("int8-") else []
            result = run_cli(sources[family][1], out, "--precision", precision.split("-")[0], *scheme)
            assert result.exit_code == 0, result.output
            cache[family, precision] = out
        return cache[family, precision]

    return get


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def reference_outputs(pipe, rng: np.random.Generator) -> dict:
    """Inputs at a batch and non-square size the trace did not use, and diffusers/transformers' outputs."""
    ids = np.stack([pipe.tokenizer(p, padding="max_length", max_length=77).input_ids
                    for p in ("a red circle on a blue background", "a photo of a cat")]).astype(np.int64)
    in_ch = pipe.unet.config.in_channels
    sample = rng.standard_normal((2, in_ch, 8, 12), dtype=np.float32)
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim), dtype=np.float32)
    image = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 8, 12), dtype=np.float32) * 4
    t = torch.from_numpy
    text = pipe.text_encoder(t(ids))
    dist = pipe.vae.encode(t(image)).latent_dist
    return {
        "text_encoder": ({"input_ids": ids}, [text.last_hidden_state, text.pooler_output]),
        "unet": ({"sample": sample, "timestep": np.array(501.0, np.float32), "encoder_hidden_states": context},
                 [pipe.unet(t(sample), 501.0, t(context)).sample]),
        "vae_encoder": ({"sample": image}, [torch.cat([dist.mean, dist.logvar], dim=1)]),
        "vae_decoder": ({"latent_sample": latents}, [pipe.vae.decode(t(latents)).sample]),
    }


@pytest.mark.parametrize("family", ["sd1", "sd2", "inpaint"])
def test_fp32_graphs_match_diffusers(family, sources, exported):
    out = exported(family, "fp32")
    cases = reference_outputs(sources[family][0], np.random.default_rng(0))
    for component, (inputs, expected) in cases.items():
        got = session(out / component / "model.onnx").run(None, inputs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert np.abs(e.numpy()).max() > 1e-3, "all-zero reference proves nothing"
            np.testing.assert_allclose(g, e.numpy(), atol=TOL, rtol=0, err_msg=f"{family} {component}")


def test_graph_signatures_follow_optimum(exported):
    out = exported("sd1", "fp32")
    expect = {"text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
              "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
              "vae_encoder": (["sample"], ["latent_parameters"]),
              "vae_decoder": (["latent_sample"], ["sample"])}
    for component, (inputs, outputs) in expect.items():
        s = session(out / component / "model.onnx")
        assert [i.name for i in s.get_inputs()] == inputs
        assert [o.name for o in s.get_outputs()] == outputs
    unet = {i.name: i for i in session(out / "unet" / "model.onnx").get_inputs()}
    assert unet["timestep"].shape == [] and unet["timestep"].type == "tensor(float)"
    assert all(isinstance(d, str) for d in unet["sample"].shape[:1] + unet["sample"].shape[2:])  # dynamic
    assert onnx.load(str(out / "unet" / "model.onnx")).opset_import[0].version == 17


def test_vae_decoder_upsamples_by_phase_convolutions(exported, sources, tmp_path, monkeypatch):
    """The VAE decoder's upsamplers of upsampling.MIN_CHANNELS or more (SD's: 256-512) are exported as four 2x2
    convolutions and a DepthToSpace each, and decode what diffusers' VAE decodes; narrower ones (the tiny test
    model's) and the U-Net's, whose upsampling may end at an odd size, keep Resize and the 3x3 convolution."""
    from sdonnx import upsampling

    def ops(folder, component):
        return [n for n in onnx.load(str(folder / component / "model.onnx")).graph.node]

    plain = exported("sd1", "fp32")
    assert "Resize" in [n.op_type for n in ops(plain, "vae_decoder")]
    monkeypatch.setattr(upsampling, "MIN_CHANNELS", 1)  # every upsampler of the tiny model
    pipe, src = sources["sd1"]
    out = tmp_path / "phases"
    result = run_cli(src, out, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    decoder = ops(out, "vae_decoder")
    kinds = [n.op_type for n in decoder]
    kernels = [list(a.ints) for n in decoder if n.op_type == "Conv" for a in n.attribute if a.name == "kernel_shape"]
    upsamplers = sum(block.upsamplers is not None for block in pipe.vae.decoder.up_blocks)
    assert "Resize" not in kinds and kinds.count("DepthToSpace") == upsamplers > 0
    assert kernels.count([2, 2]) == 4 * kinds.count("DepthToSpace")
    inputs, expected = reference_outputs(pipe, np.random.default_rng(1))["vae_decoder"]
    got = session(out / "vae_decoder" / "model.onnx").run(None, inputs)[0]
    np.testing.assert_allclose(got, expected[0].numpy(), atol=TOL, rtol=0)
    unet = [n.op_type for n in ops(out, "unet")]
    assert "Resize" in unet and "DepthToSpace" not in unet


def test_unet_feed_forward_projects_value_and_gate_apart(exported):
    """Each GEGLU's projection is exported as two MatMuls (value and gate halves) rather than one whose output is
    split (the U-Net's values are checked against diffusers' above)."""
    graph = onnx.load(str(exported("sd1", "fp32") / "unet" / "model.onnx")).graph
    ff = [n for n in graph.node if "/ff/net/net.0/" in n.name]
    matmuls = sorted(n.name.split("/")[-2] for n in ff if n.op_type == "MatMul")
    blocks = {n.name.split("/ff/")[0] for n in ff}
    assert blocks and matmuls == sorted(["gate", "value"] * len(blocks)), matmuls
    assert not [n for n in ff if n.op_type in ("Split", "Slice")]


@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-qdq", "int8-compact"])
def test_each_precision_loads_and_stays_close(precision, sources, exported):
    out = exported("sd1", precision)
    meta = json.loads((out / "sdonnx.json").read_text())
    cases = reference_outputs(sources["sd1"][0], np.random.default_rng(1))
    for component, (inputs, expected) in cases.items():
        s = session(out / component / "model.onnx")
        # the runtime feeds and reads fp32 whatever the weights are
        assert all(a.type in ("tensor(float)", "tensor(int64)") for a in s.get_inputs() + s.get_outputs())
        got = s.run(None, inputs)[0]
        floor = 25 if precision == "int8-qdq" else 30
        assert verify.psnr(expected[0].numpy(), got) > floor, component
        info = meta["components"][component]
        assert info["precision"] == quantize.scheme(component, precision[:4], "sd1").precision
        assert info["verify"]["psnr"] > floor
    unet_ops = meta["components"]["unet"]["ops"]
    # measured choices are reported: the report names the repository's results file, which holds them
    measured = Path(__file__).resolve().parents[1] / meta["components"]["unet"]["quantization"]["benchmark"]
    assert json.loads(measured.read_text())["setup"]
    if precision == "int8-qdq":  # convolutions run as QDQ int8 but conv_in/conv_out and the residual-stream ones
        assert unet_ops["QuantizeLinear"] > 0 and unet_ops["DequantizeLinear"] > unet_ops["QuantizeLinear"]
        graph = onnx.load(str(out / "unet" / "model.onnx")).graph
        dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        floats = sorted(n.name.split("/")[-2] for n in convs if n.input[1] not in dq_outputs)
        assert set(floats) == {"conv_in", "conv_out", "conv_shortcut", "conv", "proj_out"}, floats
        assert all(n.input[0] in dq_outputs for n in convs if n.input[1] in dq_outputs)  # activations too
        assert sum(n.input[1] in dq_outputs for n in convs) >= len(convs) // 2
    if precision == "int8-compact":  # every conv but conv_in/conv_out reads an int8 weight through a DQ node
        graph = onnx.load(str(out / "unet" / "model.onnx")).graph
        inits = {t.name: t for t in graph.initializer}
        dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        kept = [n for n in convs if n.input[1] not in dq]
        assert sorted(n.name.split("/")[-2] for n in kept) == ["conv_in", "conv_out"], [n.name for n in kept]
        assert all(inits[dq[n.input[1]].input[0]].data_type == onnx.TensorProto.INT8 for n in convs if n not in kept)
        assert "QuantizeLinear" not in unet_ops  # activations stay fp32
        # listed first, so ORT runs each dequantization right before its Conv (not all early: the peak memory)
        ops = [n.op_type for n in graph.node]
        assert ops[:len(dq)] == ["DequantizeLinear"] * len(dq)
    if precision.startswith("int8"):
        assert unet_ops.get("MatMulInteger", 0) + unet_ops.get("com.microsoft.DynamicQuantizeMatMul", 0) > 0
        # the time embedding stays float
        names = [n.name for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node]
        assert not any("time_embedding" in n and "quant" in n.lower() for n in names)
    else:
        dtypes = {t.data_type for t in onnx.load(str(out / "unet" / "model.onnx")).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in dtypes
    fp32 = exported("sd1", "fp32")
    # int8 touches only MatMul/Gemm weights: in this conv-heavy tiny U-Net the saving is small
    shrink = {"fp16": 0.7, "int8": 0.97, "int8-qdq": 0.7, "int8-compact": 0.5}[precision]
    assert (out / "unet" / "model.onnx").stat().st_size < shrink * (fp32 / "unet" / "model.onnx").stat().st_size


def test_sdonnx_json_describes_folder(exported, sources):
    out = exported("sd2", "fp32")
    meta = json.loads((out / "sdonnx.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"sdonnx.json"}
    assert set(meta["files"]) == on_disk
    for rel, entry in meta["files"].items():
        data = (out / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    pipe = sources["sd2"][0]
    assert meta["format"] == 1 and meta["exporter"].startswith("sdonnx ")
    assert meta["family"] == "sd2" and meta["prediction_type"] == "v_prediction"
    # SD 2.x pads with "!", not with the end token
    assert meta["tokenizer"] == {"pad_token_id": pipe.tokenizer.pad_token_id, "max_length": 77}
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id != pipe.tokenizer.eos_token_id
    assert (meta["latent_channels"], meta["unet_in_channels"], meta["vae_scale_factor"]) == (4, 4, 2)
    assert meta["sample_size"] == pipe.unet.config.sample_size * 2 and meta["static_shape"] is None
    assert set(meta["components"]) == set(COMPONENTS)
    assert meta["export_report"]["peak_rss_mb"] > 0
    cfg = json.loads((out / "unet" / "config.json").read_text())
    assert cfg["cross_attention_dim"] == pipe.unet.config.cross_attention_dim
    inpaint = json.loads((exported("inpaint", "fp32") / "sdonnx.json").read_text())
    assert (inpaint["family"], inpaint["unet_in_channels"]) == ("sd1-inpaint", 9)


def test_optimum_runs_our_folder_like_diffusers(exported, sources):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = sources["sd1"][0]
    ours = ORTStableDiffusionPipeline.from_pretrained(exported("sd1", "fp32"))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=7.5, output_type="np")
    got = ours("a red circle", latents=latents, **kwargs).images
    want = pipe("a red circle", latents=latents, **kwargs).images
    assert got.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("precision", ["fp16", "int8-qdq"])  # both also export and optimize fp32 graphs
def test_external_data_path(precision, sources, tmp_path, monkeypatch):
    """Weights over the protobuf limit go to model.onnx_data: forced here with a limit of 0 bytes."""
    from sdonnx.export import onnx as graphs

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "out"
    scheme = ["--int8-scheme", "qdq"] if precision == "int8-qdq" else []
    result = run_cli(sources["sd1"][1], out, "--precision", precision[:4], *scheme)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sdonnx.json").read_text())
    for component in COMPONENTS:
        assert f"{component}/model.onnx_data" in meta["files"]
        graph, data = out / component / "model.onnx", out / component / "model.onnx_data"
        assert data.stat().st_size > graph.stat().st_size  # only tensors under 1 kB stay inline
        session(out / component / "model.onnx")
    assert meta["components"]["unet"]["verify"]["psnr"] > 25
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "model.onnx", "model.onnx_data"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777, (out / "unet" / "model.onnx_data").stat().st_mode & 0o777) == (
        0o777 & ~mask, 0o666 & ~mask)  # not the owner-only modes of a temporary folder


def test_static_shape(sources, tmp_path):
    out = tmp_path / "static"
    result = run_cli(sources["sd1"][1], out, "--static", "24x32")
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "sdonnx.json").read_text())
    assert meta["static_shape"] == {"batch": 2, "height": 32, "width": 24}
    assert (meta["defaults"]["width"], meta["defaults"]["height"]) == (24, 32)
    unet = session(out / "unet" / "model.onnx").get_inputs()[0]
    assert unet.shape == [2, 4, 16, 12]
    assert session(out / "vae_decoder" / "model.onnx").get_inputs()[0].shape == [1, 4, 16, 12]


def test_static_unet_upsamples_by_phase_convolutions(sources, tmp_path, monkeypatch):
    """At a --static size every U-Net upsampling doubles exactly, so the U-Net's upsamplers are phase convolutions
    too (threshold lowered for the tiny model), and the graph still computes diffusers' U-Net."""
    import torch

    from sdonnx import upsampling

    monkeypatch.setattr(upsampling, "MIN_CHANNELS", 1)
    pipe, src = sources["sd1"]
    out = tmp_path / "static"
    result = run_cli(src, out, "--static", "24x32")
    assert result.exit_code == 0, result.output
    ops = [n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node]
    assert "Resize" not in ops and ops.count("DepthToSpace") == sum(
        block.upsamplers is not None for block in pipe.unet.up_blocks) > 0
    rng = np.random.default_rng(3)
    feed = {"sample": rng.standard_normal((2, 4, 16, 12), dtype=np.float32), "timestep": np.array(500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim),
                                                         dtype=np.float32)}
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(feed["sample"]), 500.0,
                         torch.from_numpy(feed["encoder_hidden_states"])).sample.numpy()
        # well-conditioned: a 1e-6 shift of the latents moves diffusers' output far less than the tolerance
        moved = pipe.unet(torch.from_numpy(feed["sample"] + 1e-6), 500.0,
                          torch.from_numpy(feed["encoder_hidden_states"])).sample.numpy()
    assert np.abs(moved - want).max() < TOL / 10
    got = session(out / "unet" / "model.onnx").run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # static qdq keeps the upsamplers float, phased or not: the rule goes by the node names the phases inherit
    qdq = tmp_path / "static-qdq"
    result = run_cli(src, qdq, "--static", "24x32", "--precision", "int8", "--int8-scheme", "qdq")
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(qdq / "unet" / "model.onnx")).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    phases = [n for n in graph.node if n.op_type == "Conv" and
              [list(a.ints) for a in n.attribute if a.name == "kernel_shape"] == [[2, 2]]]
    assert phases and all("upsamplers" in n.name and n.input[1] not in dq_outputs for n in phases)
    assert any(n.op_type == "Conv" and n.input[1] in dq_outputs for n in graph.node)  # the rest is int8


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_interrupt_leaves_nothing(sources, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_cli.opt, "optimize", interrupted)
    result = run_cli(sources["sd1"][1], tmp_path / "out")
    assert result.exit_code != 0
    assert leftovers(tmp_path) == []


# An export whose work stalls (loading the weights sleeps), so SIGTERM surely arrives mid-export
STALLED_EXPORT = """
import sys, time
import sdonnx.export.weights as weights
weights.load_checkpoint = lambda *args, **kwargs: time.sleep(300)
from sdonnx.cli import main
main(["export", *sys.argv[1:], "--quiet"], prog_name="sdonnx")
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is a POSIX signal")
def test_sigterm_leaves_nothing(tmp_path):
    """systemctl stop, docker stop and CI time-outs send SIGTERM: the export unwinds as on Ctrl-C."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_EXPORT, "random:tiny", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers(tmp_path) and leftovers(tmp_path)[0].startswith(folder.partial_prefix(out, proc.pid))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip() == "Error: export stopped by SIGTERM; its partial folder was removed"
    assert leftovers(tmp_path) == []


def test_next_export_removes_partials_of_dead_exports(sources, tmp_path):
    """A killed export (SIGKILL) leaves its partial folder (or the half-deleted old OUT of --force); the next export
    to the same OUT removes it, but never the folder of a live export, of an unknown owner or of another OUT."""
    out = tmp_path / "out"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    dead = [tmp_path / (folder.partial_prefix(out, ended.pid) + "dead"), tmp_path / f".out.old-{ended.pid}"]
    keep = [tmp_path / (folder.partial_prefix(out, os.getpid()) + "live"), tmp_path / ".out.partial-unknown",
            tmp_path / (folder.partial_prefix(tmp_path / "other", ended.pid) + "other"),
            tmp_path / f".out.old-{os.getpid()}", tmp_path / f".other.old-{ended.pid}"]
    for path in [*dead, *keep]:
        (path / "unet").mkdir(parents=True)
    handler = signal.getsignal(signal.SIGTERM)
    assert run_cli(sources["sd1"][1], out).exit_code == 0
    assert leftovers(tmp_path) == sorted(["out", *(p.name for p in keep)])
    assert signal.getsignal(signal.SIGTERM) is handler  # the export's SIGTERM handler is gone with it


def test_existing_out_dir_needs_force(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(sources["sd1"][1], out)
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert leftovers(out) == ["keep.txt"]
    result = run_cli(sources["sd1"][1], out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "unet" / "model.onnx").is_file() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == ["out"]


@pytest.fixture
def unsupported_folder(sources, tmp_path):
    import shutil

    src = tmp_path / "gated"
    shutil.copytree(sources["sd1"][1], src)
    cfg = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps(dict(cfg, attention_type="gated")))
    return src


def test_bad_sources_fail_in_one_line(tmp_path, unsupported_folder, monkeypatch):
    out = tmp_path / "out"
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "no such file" in cli_error(run_cli(tmp_path / "missing", out))
    assert "safetensors" in cli_error(run_cli(garbage, out))
    assert "random:nope" in cli_error(run_cli("random:nope", out))
    assert "gated" in cli_error(run_cli(unsupported_folder, out))
    assert "precision" in cli_error(run_cli("random:tiny", out, "--precision", "int4"))
    assert "WIDTHxHEIGHT" in cli_error(run_cli("random:tiny", out, "--static", "big"))
    assert "int8 scheme" in cli_error(run_cli("random:tiny", out, "--precision", "int8", "--int8-scheme", "int4"))
    monkeypatch.setattr(export_cli, "TINY_WEIGHTS", tmp_path / "no-weights")
    assert "tiny" in cli_error(run_cli("tiny", out))
    assert leftovers(tmp_path) == ["gated", "model.safetensors"]


def test_full_disk_is_one_line_and_leaves_nothing(sources, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_cli.quantize, "apply", no_space)
    assert "disk full" in cli_error(run_cli(sources["sd1"][1], tmp_path / "out"))
    assert leftovers(tmp_path) == []


def test_fp32_unet_error_fails_export_and_low_psnr_warns(monkeypatch):
    ref = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 4, 4, 4)
    monkeypatch.setattr(verify, "run_graph", lambda path, inputs: [ref + 2e-3])
    with pytest.raises(verify.ExportError, match="fp32 unet"):
        verify.verify("unet", Path("unet.onnx"), {}, ref, "fp32")
    result, warning = verify.verify("unet", Path("unet.onnx"), {}, ref, "int8")  # 60 dB: fine for int8
    assert warning is None and result["max_abs_err"] == pytest.approx(2e-3, rel=1e-3)
    monkeypatch.setattr(verify, "run_graph", lambda path, inputs: [ref + 0.3])
    _, warning = verify.verify("unet", Path("unet.onnx"), {}, ref, "int8")
    assert warning and "below" in warning


def test_int8_vae_makes_the_decoder_convolutions_static_int8(sources, tmp_path):
    """--int8-vae: every VAE decoder convolution but the first two and the last reads int8 weights and activations
    through QDQ pairs (no ONNX Runtime-only operator, so OpenVINO runs it), the encoder stays fp32, and the decoded
    image stays near diffusers' VAE."""
    pipe, src = sources["sd1"]
    out = tmp_path / "vae8"
    result = run_cli(src, out, "--precision", "int8", "--int8-vae")
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "vae_decoder" / "model.onnx")).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    int8 = [n.name for n in convs if n.input[0] in dq_outputs and n.input[1] in dq_outputs]
    floats = [n.name for n in convs if n.input[0] not in dq_outputs and n.input[1] not in dq_outputs]
    assert len(int8) + len(floats) == len(convs)
    assert [n.split("/")[-2] for n in floats] == ["post_quant_conv", "conv_in", "conv_out"], floats
    assert any("upsamplers" in n for n in int8)  # the residual-stream rule of the U-Net's qdq does not apply
    meta = json.loads((out / "sdonnx.json").read_text())["components"]
    assert meta["vae_decoder"]["precision"] == "int8" and meta["vae_encoder"]["precision"] == "fp32"
    assert not {"DynamicQuantizeLinear", "MatMulInteger"} & set(meta["vae_decoder"]["ops"])
    assert "percentile" in meta["vae_decoder"]["quantization"]["method"]
    inputs, expected = reference_outputs(pipe, np.random.default_rng(1))["vae_decoder"]
    got = session(out / "vae_decoder" / "model.onnx").run(None, inputs)[0]
    assert verify.psnr(expected[0].numpy(), got) > 25 and not np.allclose(got, expected[0].numpy(), atol=1e-3)
    # the runtime generates through it as through any decoder
    from sdonnx import Pipeline
    assert Pipeline.load(out).txt2img("a red circle", steps=2, seed=1, output_type="np").std() > 0.01
    assert "needs --precision int8" in cli_error(run_cli(src, tmp_path / "x", "--int8-vae"))
    assert not (tmp_path / "x").exists()


def test_int8_vae_streams_in_parts(sources, tmp_path):
    """--int8-vae --stream with a part per layer: the decoder's QDQ chain cut into parts still equals the whole
    graph (export/stream.py checks the chained parts against it and fails the export otherwise)."""
    out = tmp_path / "parts"
    result = run_cli(sources["sd1"][1], out, "--precision", "int8", "--int8-vae", "--stream", "--stream-part-mb", "0")
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "sdonnx.json").read_text())["stream"]["components"]["vae_decoder"]
    assert len(entry["parts"]) > 2 and entry["verify_vs_whole_graph"]["max_abs_err"] <= 1e-4


def test_helpers():
    assert export_cli.default_out_dir("random:sd15", "int8") == Path("models/random-sd15-int8")
    assert export_cli.default_out_dir("/x/sd-v1-5.safetensors", "fp32") == Path("models/sd-v1-5-fp32")
    assert export_cli.default_out_dir("/x/my model/", "fp16") == Path("models/my_model-fp16")
    assert Static.parse("512x768") == Static(512, 768, 2)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        Static.parse("512")
    assert verify.psnr(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == float("inf")
    assert folder._finite({"a": [float("inf")], "b": 1.5}) == {"a": [None], "b": 1.5}
    # the scheme each graph gets: qdq calibrates the full U-Net only, compact concerns the U-Net graphs
    kinds = {c: quantize.kind_of(c, "int8", "qdq") for c in ("text_encoder", "unet", "unet_shallow", "vae_decoder")}
    assert kinds == {"text_encoder": "dynamic", "unet": "qdq", "unet_shallow": "dynamic", "vae_decoder": "none"}
    assert quantize.kind_of("unet_shallow", "int8", "compact") == "compact"
    # openvino: the full U-Net static int8 (convolutions and linear layers), the tiny decoder as qdq's, the rest as
    # dynamic int8's (which --provider openvino runs on ONNX Runtime)
    kinds = {c: quantize.kind_of(c, "int8", "openvino") for c in ("text_encoder", "unet", "unet_shallow",
                                                                   "vae_decoder", quantize.TINY_DECODER)}
    assert kinds == {"text_encoder": "dynamic", "unet": "openvino", "unet_shallow": "dynamic", "vae_decoder": "none",
                     quantize.TINY_DECODER: "qdq"}
    assert quantize.kind_of("unet", "fp16", "qdq") == "fp16" and quantize.kind_of("unet", "fp32", "qdq") == "none"
    # --int8-vae: the full decoder under any int8 scheme, nothing else changes
    for s in quantize.INT8_SCHEMES:
        assert quantize.kind_of("vae_decoder", "int8", s, int8_vae=True) == "vae"
        assert quantize.kind_of("vae_encoder", "int8", s, int8_vae=True) == "none"
        assert quantize.kind_of("unet", "int8", s, int8_vae=True) == quantize.kind_of("unet", "int8", s)
    finals = [np.full((2, 4, 2, 2), i, np.float32) for i in range(3)]
    feeds = quantize.final_decoder_feeds(finals, 0.5)
    assert [f["latent_sample"].shape for f in feeds] == [(1, 4, 2, 2)] * 3
    assert [f["latent_sample"][0, 0, 0, 0] for f in feeds] == [0, 2, 4]
    big = np.arange(40 * 50, dtype=np.float32).reshape(1, 1, 40, 50)  # a --static size: its middle 32x32
    assert np.array_equal(quantize.final_decoder_feeds([big], 1.0)[0]["latent_sample"], big[..., 4:36, 9:41])
    assert "attention softmax" in quantize.scheme("unet", "fp16", "sd2").method
    assert "attention softmax" not in quantize.scheme("unet", "fp16", "sd1").method
    # ORT's calibrator fails when its last fold of feeds is empty
    assert all(n % quantize._fold_size(n) and quantize._fold_size(n) <= max(4, n + 1) for n in range(1, 40))


def test_calibration_follows_guided_sampling():
    """Static int8's calibration feeds are the steps of guided DDIM runs: [unconditional, conditional] batches
    whose latents move from step to step the way the sampler moves them."""
    from sdonnx.export.weights import build_models, load_checkpoint

    ckpt = load_checkpoint("random:tiny", seed=0)
    models = build_models(ckpt)
    sched = dict(ckpt.scheduler_config, prediction_type=ckpt.prediction_type)
    finals: list = []
    feeds = quantize.calibration_feeds(models, ckpt.configs, Path(ckpt.tokenizer_dir), sched,
                                       prompts=("a red circle", "a photo of a cat"), steps=4, latent_hw=(8, 8),
                                       finals=finals)
    assert len(feeds) == 8
    # each run's end (one image: the runs are unguided images in guided batches), one DDIM update past its last feed
    assert [f.shape for f in finals] == [(1, 4, 8, 8)] * 2
    assert not np.allclose(finals[0], feeds[3]["sample"][:1]) and not np.allclose(finals[0], finals[1])
    ts = [float(f["timestep"]) for f in feeds]
    assert ts[:4] == ts[4:] and ts[:4] == sorted(ts[:4], reverse=True)
    for f in feeds:
        assert f["sample"].shape == (2, 4, 8, 8) and np.array_equal(f["sample"][0], f["sample"][1])
        assert not np.allclose(f["encoder_hidden_states"][0], f["encoder_hidden_states"][1])
    # each step starts from where the previous one's DDIM update left the latents
    assert all(not np.allclose(a["sample"], b["sample"]) for a, b in zip(feeds[:3], feeds[1:4]))
    assert not np.allclose(feeds[0]["sample"], feeds[4]["sample"])  # a fresh noise per run


@pytest.mark.slow
def test_sd15_export_fp32(tmp_path):
    result = run_cli("random:sd15", tmp_path / "sd15")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "sd15" / "sdonnx.json").read_text())
    assert meta["components"]["unet"]["verify"]["max_abs_err"] <= verify.FP32_UNET_MAX_ERR
    assert (tmp_path / "sd15" / "unet" / "model.onnx_data").is_file()
