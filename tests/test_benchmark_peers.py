"""The benchmark's peers in their own venvs (benchmarks/peers.py): which interpreter runs each system, the
OpenVINO folders' export commands, the preparation record and its table. The OpenVINO venv itself is not needed,
except by the one end-to-end test, which skips without it (CI does not create it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
OPENVINO_SYSTEMS = ("openvino-fp32", "openvino-fp32-f32", "openvino-int8", "openvino-int8-f32", "openvino-fp32-tiny",
                    "openvino-int8-tiny")
OPENVINO_PYTHON = BENCH.parent / "models" / "peers" / "openvino" / "bin" / "python"  # peers.py's own place


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import peers
    import prepare
    import report
    import run

    return peers, prepare, run, report


@pytest.fixture
def fake_venv(bench, tmp_path, monkeypatch) -> Path:
    """An OpenVINO venv's interpreter path that exists (a stand-in file: nothing runs it here)."""
    peers = bench[0]
    monkeypatch.setattr(peers, "VENVS", tmp_path / "peers")
    python = peers.python_of("openvino")
    python.parent.mkdir(parents=True)
    python.write_text("")
    return python


def test_openvino_systems_run_with_the_openvino_venv(bench, fake_venv):
    peers, _, run, _ = bench
    for system in OPENVINO_SYSTEMS:
        assert system in run.KNOWN and peers.interpreter(system) == str(fake_venv)
    for system in ("sdonnx-fp32", "sdonnx-int8-qdq", "optimum-fp32", "diffusers-fp32"):
        assert peers.interpreter(system) == sys.executable
    # the folder and the precision option of each OpenVINO system reach the worker's command line
    folder, extra = run.KNOWN["openvino-int8-f32"]
    cmd = run.worker_command("openvino-int8-f32", Path("/w") / folder, 256, 3, 2, "unet_b2", extra)
    assert cmd[1:3] == ["openvino-int8-f32", str(Path("/w/openvino-int8"))]
    assert cmd[-2:] == ["--inference-precision", "f32"]
    assert run.KNOWN["openvino-int8"] == ("openvino-int8", [])  # OpenVINO's own default precision
    # the tiny-VAE systems: their own folders, OpenVINO's default precision like optimum-fp32-tiny's peer
    assert run.KNOWN["openvino-fp32-tiny"] == ("openvino-fp32-tiny", [])
    assert run.KNOWN["openvino-int8-tiny"] == ("openvino-int8-tiny", [])


def test_missing_venv_is_one_line(bench, tmp_path, monkeypatch):
    peers = bench[0]
    monkeypatch.setattr(peers, "VENVS", tmp_path / "none")
    with pytest.raises(SystemExit, match=r"peers\.py setup openvino"):
        peers.interpreter("openvino-int8")
    if OPENVINO_PYTHON.is_file():  # (monkeypatch does not reach a child process) this checkout has the venv
        pytest.skip("the OpenVINO venv exists here: run.py would start")
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--weights", "tiny", "--work", str(tmp_path / "w"),
                           "--systems", "sdonnx-fp32,openvino-int8"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "HOME": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode != 0 and "peers.py setup openvino" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()  # refused before preparing anything


def _fake_openvino_runs(prepare, monkeypatch, cost) -> list:
    """prepare._run replaced by a stand-in that makes the folder an OpenVINO command would (optimum-cli's last
    argument, openvino_int8.py's third) and records the command; cost(n) -> (seconds, peak MB) of the n-th."""
    commands = []

    def fake_run(cmd, log, env=None):
        commands.append(cmd)
        out = Path(cmd[-1] if "optimum-cli" in cmd[0] else cmd[3])
        out.mkdir(parents=True)
        (out / "model_index.json").write_text("{}")
        seconds, peak = cost(len(commands))
        return {"seconds": seconds, "peak_rss_mb": peak, "command": cmd, "finished": "now"}

    monkeypatch.setattr(prepare, "_run", fake_run)
    return commands


def test_openvino_folders_commands_and_record(bench, fake_venv, tmp_path, monkeypatch):
    """openvino-int8 needs the fp32 IR (optimum-cli export openvino) and quantizes it with our calibration
    prompts; each export's time and peak RSS go into the work folder's prepare.json and the report's table."""
    _, prepare, _, report = bench
    from sdonnx.export.quantize import CALIBRATION_PROMPTS

    commands = _fake_openvino_runs(prepare, monkeypatch, lambda n: (10.0 * n, 100.0))
    work = tmp_path / "work"
    _fake_weights(work / "diffusers")
    paths = prepare.prepare(work, "tiny", ["openvino-int8"])
    assert set(paths) == {"weights", "openvino-int8"}
    export, quantize = commands
    assert export[0] == str(fake_venv.with_name("optimum-cli")) and export[1:3] == ["export", "openvino"]
    assert export[export.index("--weight-format") + 1] == "fp32" and export[-1] == str(work / "openvino-fp32.tmp")
    assert quantize[:2] == [str(fake_venv), str(BENCH / "openvino_int8.py")]
    assert quantize[2:4] == [str(work / "openvino-fp32"), str(work / "openvino-int8")]
    assert [quantize[i + 1] for i, x in enumerate(quantize) if x == "--prompt"] == list(CALIBRATION_PROMPTS)
    made = prepare.preparation(work, ["openvino-fp32", "openvino-int8", "sdonnx-fp32"])
    assert made["openvino-fp32"]["seconds"] == 10.0 and made["openvino-int8"]["after"] == "openvino-fp32"
    assert "sdonnx-fp32" not in made
    prepare.prepare(work, "tiny", ["openvino-int8"])
    assert len(commands) == 2  # both folders are there now: nothing is made again
    lines = report.preparation({"prepare": made, "folder_mib": {"openvino-fp32": 3.0, "openvino-int8": 1.0}})
    assert "| openvino-int8 | 20 (+ openvino-fp32) | 100 | 1 |" in lines


def test_default_prepare_leaves_the_peer_venvs_alone(bench, tmp_path, monkeypatch):
    """prepare() with no names makes every folder of the running interpreter, as before, and none of a venv's."""
    peers, prepare, _, _ = bench
    monkeypatch.setattr(peers, "VENVS", tmp_path / "none")  # a venv's folder asked for would exit here
    monkeypatch.setattr(prepare, "_run", lambda cmd, log, env=None: None)
    monkeypatch.setattr(prepare, "OPTIMUM_EXPORT", "pass")
    _fake_weights(tmp_path / "diffusers")
    (tmp_path / "optimum-fp32").mkdir()
    (tmp_path / "optimum-fp32" / "model_index.json").write_text("{}")
    paths = prepare.prepare(tmp_path, "tiny")
    assert not any(k.startswith("openvino") for k in paths) and "sdonnx-int8-qdq" in paths
    assert not set(prepare.TINY_FROM) & set(paths)  # the tiny-VAE folders only when a system asks for them


def test_openvino_int8_calibrates_at_the_guidance_the_weights_suggest(bench, fake_venv, tmp_path, monkeypatch):
    """Weights whose sdonnx_defaults.json names a guidance (the tiny model's 3.0) get OpenVINO's hybrid int8
    calibrated at it, as our export calibrates them; others keep openvino_int8.py's default (SD's 7.5)."""
    _, prepare, _, _ = bench
    commands = _fake_openvino_runs(prepare, monkeypatch, lambda n: (1.0, 1.0))
    for work, suggested in ((tmp_path / "plain", None), (tmp_path / "tiny", 3.0)):
        _fake_weights(work / "diffusers")
        if suggested is not None:
            (work / "diffusers" / "sdonnx_defaults.json").write_text(json.dumps({"guidance": suggested, "steps": 20}))
        prepare.prepare(work, "tiny", ["openvino-int8"])
        quantize = commands[-1]
        assert quantize[1] == str(BENCH / "openvino_int8.py")
        given = [quantize[i + 1] for i, x in enumerate(quantize) if x == "--guidance"]
        assert given == ([] if suggested is None else [str(suggested)]) and "--steps" not in quantize
    # an int8 folder already made needs no fp32 IR (deleted for disk space): nothing is exported again
    shutil.rmtree(tmp_path / "plain" / "openvino-fp32")
    made = len(commands)
    prepare.prepare(tmp_path / "plain", "tiny", ["openvino-int8"])
    assert len(commands) == made and not (tmp_path / "plain" / "openvino-fp32").exists()


def _fake_weights(folder: Path) -> None:
    """A stand-in diffusers folder: what prepare reads of it (its VAE's stages; the tiny weights' VAE has two)."""
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))


def test_openvino_tiny_vae_folders_plan(bench, fake_venv, tmp_path, monkeypatch):
    """openvino-int8-tiny: the int8 IR (after the fp32 one) and our fp32 export with the tiny VAE, then
    openvino_tiny_vae.py in the venv; the tiny weights' exports carry a TAESD of their VAE's 2x downscale, written
    beside the weights for diffusers; an export made before without the tiny VAE is made again."""
    _, prepare, _, report = bench
    commands = []

    def fake_run(cmd, log, env=None):
        commands.append(cmd)
        if "optimum-cli" in cmd[0]:
            out = Path(cmd[-1])
        elif cmd[1:4] == ["-m", "sdonnx", "export"]:
            out = Path(cmd[5])
            (out / "vae_decoder_tiny").mkdir(parents=True)
            (out / "vae_decoder_tiny" / "model.onnx").write_text("")
            (out / "sdonnx.json").write_text("{}")
            return {"seconds": 1.0, "peak_rss_mb": 1.0, "command": cmd, "finished": "now"}
        else:
            out = Path(cmd[-1] if cmd[1].endswith("openvino_tiny_vae.py") else cmd[3])
        out.mkdir(parents=True)
        (out / "model_index.json").write_text("{}")
        return {"seconds": 10.0, "peak_rss_mb": 100.0, "command": cmd, "finished": "now"}

    monkeypatch.setattr(prepare, "_run", fake_run)
    work = tmp_path / "work"
    _fake_weights(work / "diffusers")
    (work / "sdonnx-fp32").mkdir()
    (work / "sdonnx-fp32" / "sdonnx.json").write_text("{}")  # an export from before the tiny VAE: made again
    paths = prepare.prepare(work, "tiny", ["openvino-int8-tiny"])
    assert set(paths) == {"weights", "openvino-int8-tiny", "openvino-int8", "sdonnx-fp32"}
    ours, export, quantize, tiny = commands
    assert ours[4:7] == [str(work / "diffusers"), str(work / "sdonnx-fp32"), "--precision"]
    assert ours[ours.index("--tiny-vae") + 1] == str(work / "taesd")
    assert export[1:3] == ["export", "openvino"] and quantize[1] == str(BENCH / "openvino_int8.py")
    assert tiny == [str(fake_venv), str(BENCH / "openvino_tiny_vae.py"), str(work / "openvino-int8"),
                    str(work / "sdonnx-fp32"), str(work / "openvino-int8-tiny")]
    taesd = json.loads((work / "taesd" / "config.json").read_text())
    assert taesd["_class_name"] == "AutoencoderTiny" and len(taesd["decoder_block_out_channels"]) == 2
    assert prepare.preparation(work, ["openvino-int8-tiny"])["openvino-int8-tiny"]["after"] == "openvino-int8"
    prepare.prepare(work, "tiny", ["openvino-int8-tiny"])
    assert len(commands) == 4  # all there now: nothing is made again


def test_openvino_tiny_vae_replaces_only_the_vae(bench, tmp_path, monkeypatch):
    """openvino_tiny_vae.py (no OpenVINO needed here: the conversion is stubbed): every other file of the OpenVINO
    folder is a hard link, vae_decoder/ and vae_encoder/ hold the converted tiny graphs and their config.json."""
    monkeypatch.syspath_prepend(str(BENCH))
    import openvino_tiny_vae as tool

    base, ours = tmp_path / "openvino-fp32", tmp_path / "sdonnx-fp32"
    for part in ("unet", "vae_decoder", "vae_encoder"):
        (base / part).mkdir(parents=True)
        (base / part / "openvino_model.xml").write_text(f"full {part}")
    (base / "model_index.json").write_text("{}")
    for part in ("vae_decoder_tiny", "vae_encoder_tiny"):
        (ours / part).mkdir(parents=True)
        (ours / part / "model.onnx").write_text(part)
        (ours / part / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "scaling_factor": 1.0}))

    def fake_convert(onnx, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / tool.IR).write_text("IR of " + onnx.read_text())
        (out_dir / "config.json").write_text((onnx.parent / "config.json").read_text())

    monkeypatch.setattr(tool, "convert", fake_convert)
    out = tool.with_tiny_vae(base, ours, tmp_path / "openvino-fp32-tiny")
    assert (out / "unet" / tool.IR).stat().st_ino == (base / "unet" / tool.IR).stat().st_ino
    assert (out / "model_index.json").stat().st_ino == (base / "model_index.json").stat().st_ino
    assert (out / "vae_decoder" / tool.IR).read_text() == "IR of vae_decoder_tiny"
    assert (out / "vae_encoder" / tool.IR).read_text() == "IR of vae_encoder_tiny"
    assert json.loads((out / "vae_decoder" / "config.json").read_text())["scaling_factor"] == 1.0
    assert (base / "vae_decoder" / tool.IR).read_text() == "full vae_decoder"  # the source folder is untouched
    assert not (tmp_path / "openvino-fp32-tiny.tmp").exists()


def test_worker_refuses_openvino_options_elsewhere():
    done = subprocess.run([sys.executable, str(BENCH / "worker.py"), "sdonnx-fp32", ".", "--inference-precision",
                           "f32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "option of the OpenVINO runs" in done.stderr
    done = subprocess.run([sys.executable, str(BENCH / "worker.py"), "optimum-fp32", ".", "--provider", "openvino"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--provider openvino is our runtime's" in done.stderr


def test_report_shows_the_openvino_precision(bench):
    report = bench[3]
    run = {"system": "openvino-fp32", "size": 64, "steps": 2, "load_s": 1.0, "peak_rss_mb": 10.0,
           "times_s": {"unet_b2": [0.5]}, "step_s": [0.2, 0.1], "inference_precision": "bf16",
           "versions": {"openvino": "1.0"}}
    cell = report.summarize({"runs": [run]})["64"]["openvino-fp32"]
    assert cell["inference_precision"] == "bf16" and cell["unet_b2"]["median"] == 0.5
    assert "unet_b2_efficiency" not in report.summarize({"runs": [run], "unet_flops": {"64x2": {"total": 1e9, "conv": 6e8, "matmul": 4e8}},
                                                         "matmul_peak": {"fp32": 1e11, "int8": 4e11}})["64"][
        "openvino-fp32"]  # no bound of ours describes bf16 / hybrid int8
    assert "openvino 1.0" in report._peer_lines({"runs": [run]})[0]



def test_flops_the_openvino_scheme_keeps_float(bench, tmp_path):
    """The U-Net FLOPs the openvino scheme leaves float: the convolutions static QDQ keeps float, the attention's
    products and the linear layers it keeps float (cross-attention's output, the time embedding's), each counted
    from the model's own modules, a part of the whole."""
    import tiny_sd
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import limit
    from sdonnx.export.models.config import UNetConfig
    from sdonnx.export.models.unet import UNet2DConditionModel

    for part, config in (("unet", tiny_sd.unet_config()), ("vae", tiny_sd.vae_config())):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(config))
    flops = limit.unet_flops(tmp_path, [16], (2,))["16x2"]  # the tiny VAE halves: 8x8 latents
    unet = UNet2DConditionModel(UNetConfig.from_dict(tiny_sd.unet_config())).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(torch.zeros(2, 4, 8, 8), torch.tensor(500.0), torch.zeros(2, 77, 32))
    counts = counter.get_flop_counts()

    linears = {f"UNet2DConditionModel.{name}" for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
               and any(part in name for part in ("attn2.to_out", "time_embedding.", "time_emb_proj"))}
    kept = sum(int(v) for name in linears for op, v in counts[name].items()
               if str(op).split(".")[-1] in ("addmm", "mm"))
    assert kept > 0 and flops["attention"] > 0
    assert flops["float_by_openvino_scheme"] == flops["conv_kept_float_by_qdq"] + flops["attention"] + kept
    assert flops["float_by_openvino_scheme"] < flops["total"]


def test_report_bounds_on_openvino_kernels(bench):
    """With OpenVINO's measured peaks in the report, each system on its kernels gets the bound of what it computes
    in int8 and in float: its float IR all at the default precision's peak (or fp32's at f32), NNCF's hybrid int8
    its convolutions at the int8 peak, our openvino scheme all but what it keeps float; sd.cpp none."""
    report = bench[3]
    flops = {"64x2": {"total": 10e9, "conv": 6e9, "matmul": 4e9, "conv_kept_float_by_qdq": 1e9,
                      "attention": 0.5e9, "float_by_openvino_scheme": 2e9}}
    peak = {"fp32": 1e11, "int8": 4e11, "openvino_default": 2e11, "openvino_int8": 5e11}
    runs = [{"system": system, "size": 64, "steps": 2, "load_s": 1.0, "peak_rss_mb": 10.0,
             "times_s": {"unet_b2": [0.5]}, "step_s": [0.5, 0.5]}
            for system in ("openvino-fp32", "openvino-fp32-f32", "openvino-int8", "openvino-int8-f32",
                           "sdonnx-int8-ov-vae8", "sdonnx-fp32-ov", "sdcpp-q8_0")]
    cells = report.summarize({"runs": runs, "unet_flops": flops, "matmul_peak": peak})["64"]
    want = {"openvino-fp32": 10e9 / 2e11, "openvino-fp32-f32": 10e9 / 1e11,
            "openvino-int8": 6e9 / 5e11 + 4e9 / 2e11, "openvino-int8-f32": 6e9 / 5e11 + 4e9 / 1e11,
            "sdonnx-int8-ov-vae8": 2e9 / 2e11 + 8e9 / 5e11, "sdonnx-fp32-ov": 10e9 / 2e11}
    for system, bound in want.items():
        assert cells[system]["unet_b2_bound_s"] == pytest.approx(bound), system
        assert cells[system]["unet_b2_efficiency"] == pytest.approx(bound / 0.5), system
    assert "unet_b2_bound_s" not in cells["sdcpp-q8_0"]
    assert "int8 500 GOP/s" in report.markdown({"name": "x", "weights": "w", "settings": {"steps": 2},
                                                 "machine": {"onnxruntime": "1", "torch": "1", "diffusers": "1",
                                                             "transformers": "1", "optimum": "1", "numpy": "1"},
                                                 "matmul_peak": peak, "summary": {}, "systems": [],
                                                 "started": "now", "command": "c", "runs": [],
                                                 "unet_flops": flops})


@pytest.mark.skipif(not OPENVINO_PYTHON.is_file(), reason="no OpenVINO venv (python benchmarks/peers.py setup openvino)")
def test_openvino_worker_on_the_tiny_model(tmp_path, monkeypatch):
    """End to end in the real venv: the fp32 IR of the tiny pipeline, timed by worker.py at f32 with static shapes:
    every figure, one step callback per U-Net call of PNDM, the precision OpenVINO really compiled. Then the same
    IR with the tiny VAE (openvino-fp32-tiny), unguided: its VAE figures and generation run the tiny decoder, which
    decodes as our exported graph and as diffusers' AutoencoderTiny from the taesd folder (diffusers-fp32-tiny's)."""
    from tiny_sd import save_pipeline

    monkeypatch.syspath_prepend(str(BENCH))
    import prepare
    import run

    save_pipeline(tmp_path / "diffusers", "sd1")
    folders = prepare.prepare(tmp_path, "tiny", ["openvino-fp32", "openvino-fp32-tiny"])
    assert (folders["openvino-fp32"] / "unet" / "openvino_model.xml").is_file()
    assert json.loads((tmp_path / prepare.RECORD).read_text())["openvino-fp32"]["peak_rss_mb"] > 0
    folder, extra = run.KNOWN["openvino-fp32-f32"]
    figures = ("text_encoder", "unet_b2", "unet_b1", "vae_decode", "vae_encode", "txt2img")
    res = run.run_worker("openvino-fp32-f32", tmp_path / folder, 64, 2, 1, ",".join(figures), extra)
    assert set(res["times_s"]) == set(figures)
    assert all(t[0] > 0 for t in res["times_s"].values())
    assert res["inference_precision"] == "f32" and res["static_shapes"] and len(res["step_s"]) == 3
    assert res["vae"] == "full"

    # unguided, as turbo runs: the static U-Net must then be batch 1 (the pipeline drops the unconditional half)
    tiny = run.run_worker("openvino-fp32-tiny", folders["openvino-fp32-tiny"], 64, 2, 1, "vae_decode,vae_encode,txt2img",
                          [*run.KNOWN["openvino-fp32-tiny"][1], "--guidance", "0"])
    assert tiny["vae"] == "tiny" and all(t[0] > 0 for t in tiny["times_s"].values()) and len(tiny["step_s"]) == 3
    _tiny_decoders_agree(folders, tmp_path)


def _tiny_decoders_agree(folders: dict, tmp_path: Path) -> None:
    """The tiny decoder as OpenVINO IR (f32), as our ONNX graph and as diffusers' AutoencoderTiny: one output."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import AutoencoderTiny

    z = (np.random.default_rng(0).standard_normal((1, 4, 8, 8)) * 2).astype(np.float32)  # into the soft clamp
    np.save(tmp_path / "z.npy", z)
    script = ("import sys, numpy as np, openvino as ov; d, e, z, out = sys.argv[1:]; "
              "m = ov.Core().compile_model(d, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'}); "
              "np.save(out, m(np.load(z))[0]); "
              "print(ov.Core().read_model(d).output(0).get_any_name(), ov.Core().read_model(e).output(0).get_any_name())")
    ir = folders["openvino-fp32-tiny"]
    done = subprocess.run([str(OPENVINO_PYTHON), "-c", script, str(ir / "vae_decoder" / "openvino_model.xml"),
                           str(ir / "vae_encoder" / "openvino_model.xml"), str(tmp_path / "z.npy"),
                           str(tmp_path / "ov.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["sample", "latent_sample"]  # the names optimum-intel's pipeline reads
    openvino = np.load(tmp_path / "ov.npy")
    session = ort.InferenceSession(str(folders["sdonnx-fp32"] / "vae_decoder_tiny" / "model.onnx"))
    ours = session.run(None, {"latent_sample": z})[0]
    with torch.no_grad():
        theirs = AutoencoderTiny.from_pretrained(tmp_path / "taesd").eval().decode(torch.from_numpy(z)).sample.numpy()
    assert theirs.shape == (1, 3, 16, 16) and theirs.std() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(openvino, theirs, atol=1e-4, rtol=0)


# ---- stable-diffusion.cpp (sdcpp-q8_0, sdcpp-f16): its venv, the LDM checkpoint it converts, the GGUF folders

SDCPP_PYTHON = BENCH.parent / "models" / "peers" / "sdcpp" / "bin" / "python"


def _ldm_tool(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import ldm_checkpoint

    return ldm_checkpoint


def test_ldm_checkpoint_round_trip(tmp_path, monkeypatch):
    """The tiny SD 1.x pipeline written as one LDM file reads back through our own single-file loader as the very
    tensors and architecture of the diffusers folder."""
    import torch
    from sdonnx.export.weights import load_checkpoint
    from tiny_sd import save_pipeline

    tool = _ldm_tool(monkeypatch)
    save_pipeline(tmp_path / "diffusers", "sd1")
    out = tool.write(tmp_path / "diffusers", tmp_path / "model.safetensors")
    assert out == tmp_path / "model.safetensors" and not (tmp_path / "model.safetensors.tmp").exists()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    # LDM's own names (the U-Net's flat blocks, the VAE's reversed decoder levels, its attention as 1x1 convs)
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "first_stage_model.decoder.up.0.block.0.conv1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= keys
    assert not any(".down_blocks." in k or ".resnets." in k for k in keys)
    folder, single = load_checkpoint(tmp_path / "diffusers"), load_checkpoint(out)
    assert single.family == "sd1"
    for part in ("unet", "vae", "text_encoder"):
        mine, theirs = single.state_dicts[part], folder.state_dicts[part]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    for field in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
                  "cross_attention_dim"):
        assert getattr(single.configs.unet, field) == getattr(folder.configs.unet, field)
    assert single.configs.vae.block_out_channels == folder.configs.vae.block_out_channels


def test_ldm_names_of_sd15_invert_our_loader(monkeypatch):
    """SD 1.5's layout (two resnets a level, four levels, an upsampler after attention or not): every U-Net and VAE
    key maps to a distinct LDM name that our loader's rules map back to it (models on the meta device: no weights)."""
    import torch
    from sdonnx.export import weights
    from sdonnx.export.models.config import get_preset

    tool = _ldm_tool(monkeypatch)
    cfg = get_preset("sd15")
    with torch.device("meta"):
        unet = weights._model_class("unet")(cfg.unet).state_dict()
        vae = weights._model_class("vae")(cfg.vae).state_dict()
    up = [t.startswith("CrossAttn") for t in cfg.unet.up_block_types]
    layers, levels = cfg.unet.layers_per_block, len(cfg.vae.block_out_channels)
    unet_names = {k: tool.unet_key(k, layers, up) for k in unet}
    vae_names = {k: tool.vae_key(k, levels) for k in vae}
    assert len(set(unet_names.values())) == len(unet) and len(set(vae_names.values())) == len(vae)
    assert all(weights._unet_key(v, layers) == k for k, v in unet_names.items())
    assert all(weights._vae_key(v, levels) == k for k, v in vae_names.items())
    assert unet_names["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert unet_names["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"


def test_ldm_checkpoint_refuses_sd2(tmp_path, monkeypatch):
    from tiny_sd import save_pipeline

    save_pipeline(tmp_path / "sd2", "sd2")
    done = subprocess.run([sys.executable, str(BENCH / "ldm_checkpoint.py"), str(tmp_path / "sd2"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "not an SD 1.x U-Net" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("out.safetensors*"))


def test_sdcpp_systems_run_with_the_sdcpp_venv(bench, tmp_path, monkeypatch):
    peers, _, run, _ = bench
    monkeypatch.setattr(peers, "VENVS", tmp_path / "peers")
    python = peers.python_of("sdcpp")
    python.parent.mkdir(parents=True)
    python.write_text("")
    for system in ("sdcpp-q8_0", "sdcpp-f16"):
        assert run.KNOWN[system] == (system, []) and peers.interpreter(system) == str(python)
    assert peers.PEERS["sdcpp"][-1] == {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}  # built for this CPU
    monkeypatch.setattr(peers, "VENVS", tmp_path / "none")
    with pytest.raises(SystemExit, match=r"peers\.py setup sdcpp"):
        peers.interpreter("sdcpp-q8_0")


def test_sdcpp_folders_commands_and_record(bench, tmp_path, monkeypatch):
    """The weights become one LDM file (this interpreter), sd.cpp's convert makes each GGUF folder from it (the
    venv's); every step's time and peak RSS are recorded, the LDM file's too, and nothing is made twice."""
    peers, prepare, _, report = bench
    monkeypatch.setattr(peers, "VENVS", tmp_path / "peers")
    python = peers.python_of("sdcpp")
    python.parent.mkdir(parents=True)
    python.write_text("")
    commands = []

    def fake_run(cmd, log, env=None):
        commands.append(cmd)
        if cmd[1].endswith("ldm_checkpoint.py"):
            Path(cmd[3]).write_text("ldm")
        else:
            Path(cmd[3]).mkdir(parents=True)
            (Path(cmd[3]) / "model.gguf").write_text("gguf")
        return {"seconds": 10.0 * len(commands), "peak_rss_mb": 100.0, "command": cmd, "finished": "now"}

    monkeypatch.setattr(prepare, "_run", fake_run)
    work = tmp_path / "work"
    _fake_weights(work / "diffusers")
    paths = prepare.prepare(work, "tiny", ["sdcpp-q8_0", "sdcpp-f16"])
    assert set(paths) == {"weights", "sdcpp-q8_0", "sdcpp-f16"}
    ldm, *converts = commands
    checkpoint = work / prepare.LDM / "model.safetensors"
    assert ldm == [sys.executable, str(BENCH / "ldm_checkpoint.py"), str(work / "diffusers"), str(checkpoint)]
    assert sorted(c[2:] for c in converts) == [[str(checkpoint), str(work / "sdcpp-f16"), "f16"],
                                               [str(checkpoint), str(work / "sdcpp-q8_0"), "q8_0"]]
    assert all(c[:2] == [str(python), str(BENCH / "sdcpp_convert.py")] for c in converts)
    made = prepare.preparation(work, ["sdcpp-q8_0"])
    assert set(made) == {"ldm", "sdcpp-q8_0"} and made["sdcpp-q8_0"]["after"] == "ldm"
    assert "ldm" not in prepare.preparation(work, ["sdonnx-fp32"])
    prepare.prepare(work, "tiny", ["sdcpp-q8_0", "sdcpp-f16"])
    assert len(commands) == 3  # all there: nothing made again
    lines = report.preparation({"prepare": made, "folder_mib": {"sdcpp-q8_0": 2.0}})
    assert "| ldm | 10 | 100 | - |" in lines and any(x.startswith("| sdcpp-q8_0 | ") and "(+ ldm)" in x for x in lines)


def test_report_of_sdcpp_runs(bench):
    """sd.cpp's rows: its generation, its steps from the progress callback (the first interval, the prompts, left
    out), the figures its own log timed; no bound of ours, and a line saying how it was measured."""
    report = bench[3]
    run = {"system": "sdcpp-q8_0", "size": 256, "steps": 3, "load_s": 1.0, "peak_rss_mb": 10.0,
           "times_s": {"txt2img": [9.0], "vae_decode": [2.0], "text_encoder": [0.5]}, "step_s": [0.6, 2.0, 2.2, 2.1],
           "generations": [[0.6, 2.0, 2.2, 2.1]], "threads": 2, "sampler": "euler (discrete)",
           "versions": {"stable-diffusion-cpp-python": "0.4.7"}}
    rep = {"runs": [run], "unet_flops": {"256x2": {"total": 1e9, "conv": 6e8, "matmul": 4e8}},
           "matmul_peak": {"fp32": 1e11, "int8": 4e11}}
    cell = report.summarize(rep)["256"]["sdcpp-q8_0"]
    assert cell["step"]["median"] == 2.1 and cell["step"]["n"] == 3 and cell["vae_decode"]["median"] == 2.0
    assert cell["unet_b2"] == {} and "unet_b2_bound_s" not in cell
    line = report._sdcpp_lines(rep)[0]
    assert "stable-diffusion-cpp-python 0.4.7" in line and "2 threads" in line and "euler (discrete)" in line
    assert report._peer_lines(rep) == []  # the OpenVINO line is OpenVINO's only


def test_worker_refuses_a_gpu_for_sdcpp():
    done = subprocess.run([sys.executable, str(BENCH / "worker.py"), "sdcpp-q8_0", ".", "--provider", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "run on the CPU only" in done.stderr


@pytest.mark.skipif(not SDCPP_PYTHON.is_file(), reason="no sdcpp venv (python benchmarks/peers.py setup sdcpp)")
def test_sdcpp_converts_the_ldm_checkpoint(tmp_path):
    """In the real venv: the tiny pipeline's LDM file through sd.cpp's convert at both weight types (its SD 1.x
    network has SD 1.5's fixed sizes, so the tiny weights convert but cannot be run: the worker is checked on SD 1.5
    by the benchmark itself, and says so here). q8_0 quantizes the attention matrices and keeps the 3x3
    convolutions as they are (rows of 3, not a multiple of its 32-block); f16 halves both; biases stay f32."""
    from tiny_sd import save_pipeline

    save_pipeline(tmp_path / "diffusers", "sd1")
    done = subprocess.run([sys.executable, str(BENCH / "prepare.py"), str(tmp_path), "tiny", "sdcpp-q8_0", "sdcpp-f16"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "prepare.json").read_text())
    assert {"ldm", "sdcpp-q8_0", "sdcpp-f16"} <= set(record) and record["sdcpp-f16"]["peak_rss_mb"] > 0
    attention = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    conv, bias = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "first_stage_model.decoder.conv_in.bias"
    q8, f16 = (_gguf_types(tmp_path / name / "model.gguf") for name in ("sdcpp-q8_0", "sdcpp-f16"))
    assert len(q8) == len(f16) > 300
    assert (q8[attention], q8[conv], q8[bias]) == (GGML_Q8_0, GGML_F32, GGML_F32)
    assert (f16[attention], f16[conv], f16[bias]) == (GGML_F16, GGML_F16, GGML_F32)
    # and the worker says in one line that sd.cpp cannot run them (the binding itself would carry on and crash)
    done = subprocess.run([str(SDCPP_PYTHON), str(BENCH / "worker.py"), "sdcpp-q8_0", str(tmp_path / "sdcpp-q8_0"),
                           "--size", "64", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "stable-diffusion.cpp could not load" in done.stderr
    assert "Traceback" not in done.stderr and "RESULT" not in done.stdout


GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8  # ggml's type ids


def _gguf_types(path: Path) -> dict[str, int]:
    """Tensor name -> ggml type id, from a GGUF file's header (metadata values skipped)."""
    import struct

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def text() -> str:
            return f.read(read("Q")).decode()

        def skip(kind: int) -> None:
            if kind == 8:
                text()
            elif kind == 9:  # an array: its item type, its length, the items
                inner, n = read("I"), read("Q")
                for _ in range(n):
                    skip(inner)
            else:
                f.read(scalar[kind])

        assert f.read(4) == b"GGUF"
        _version, tensors, metadata = read("I"), read("Q"), read("Q")
        for _ in range(metadata):
            text()
            skip(read("I"))
        types = {}
        for _ in range(tensors):
            name = text()
            for _ in range(read("I")):  # the dimensions
                read("Q")
            types[name] = read("I")
            read("Q")  # the data offset
    return types
