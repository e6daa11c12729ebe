"""The benchmark's peers in their own venvs (benchmarks/peers.py): which interpreter runs each system, the
OpenVINO folders' export commands, the preparation record and its table. The OpenVINO venv itself is not needed,
except by the one end-to-end test, which skips without it (CI does not create it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
OPENVINO_SYSTEMS = ("openvino-fp32", "openvino-fp32-f32", "openvino-int8", "openvino-int8-f32")
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


def test_openvino_folders_commands_and_record(bench, fake_venv, tmp_path, monkeypatch):
    """openvino-int8 needs the fp32 IR (optimum-cli export openvino) and quantizes it with our calibration
    prompts; each export's time and peak RSS go into the work folder's prepare.json and the report's table."""
    _, prepare, _, report = bench
    from sdonnx.export.quantize import CALIBRATION_PROMPTS

    commands = []

    def fake_run(cmd, log, env=None):
        commands.append(cmd)
        out = Path(cmd[-1] if "optimum-cli" in cmd[0] else cmd[3])
        out.mkdir(parents=True)
        (out / "model_index.json").write_text("{}")
        return {"seconds": 10.0 * len(commands), "peak_rss_mb": 100.0, "command": cmd, "finished": "now"}

    monkeypatch.setattr(prepare, "_run", fake_run)
    work = tmp_path / "work"
    (work / "diffusers").mkdir(parents=True)
    (work / "diffusers" / "model_index.json").write_text("{}")
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
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "model_index.json").write_text("{}")
    (tmp_path / "optimum-fp32").mkdir()
    (tmp_path / "optimum-fp32" / "model_index.json").write_text("{}")
    paths = prepare.prepare(tmp_path, "tiny")
    assert not any(k.startswith("openvino") for k in paths) and "sdonnx-int8-qdq" in paths


def test_worker_refuses_openvino_options_elsewhere():
    done = subprocess.run([sys.executable, str(BENCH / "worker.py"), "sdonnx-fp32", ".", "--inference-precision",
                           "f32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "options of the OpenVINO systems" in done.stderr


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



@pytest.mark.skipif(not OPENVINO_PYTHON.is_file(), reason="no OpenVINO venv (python benchmarks/peers.py setup openvino)")
def test_openvino_worker_on_the_tiny_model(tmp_path, monkeypatch):
    """End to end in the real venv: the fp32 IR of the tiny pipeline, timed by worker.py at f32 with static shapes:
    every figure, one step callback per U-Net call of PNDM, the precision OpenVINO really compiled."""
    from tiny_sd import save_pipeline

    monkeypatch.syspath_prepend(str(BENCH))
    import prepare
    import run

    save_pipeline(tmp_path / "diffusers", "sd1")
    folders = prepare.prepare(tmp_path, "tiny", ["openvino-fp32"])
    assert (folders["openvino-fp32"] / "unet" / "openvino_model.xml").is_file()
    assert json.loads((tmp_path / prepare.RECORD).read_text())["openvino-fp32"]["peak_rss_mb"] > 0
    folder, extra = run.KNOWN["openvino-fp32-f32"]
    figures = ("text_encoder", "unet_b2", "unet_b1", "vae_decode", "vae_encode", "txt2img")
    res = run.run_worker("openvino-fp32-f32", tmp_path / folder, 64, 2, 1, ",".join(figures), extra)
    assert set(res["times_s"]) == set(figures)
    assert all(t[0] > 0 for t in res["times_s"].values())
    assert res["inference_precision"] == "f32" and res["static_shapes"] and len(res["step_s"]) == 3
