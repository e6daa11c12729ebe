"""The CUDA execution provider gives the CPU provider's pictures (skipped where onnxruntime has no CUDA provider).

CI has no GPU, so every test here skips there; run them on a machine with onnxruntime-gpu:
`pytest tests/test_cuda.py`.
"""

import numpy as np
import onnxruntime as ort
import pytest

from sdonnx.pipeline import Pipeline

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider here")

PROMPTS = ["a small red circle in the top left on a blue background", "a yellow square on a black background",
           "a large green triangle on a white background"]


@pytest.fixture(scope="module")
def cpu():
    return Pipeline.load()


@pytest.fixture(scope="module")
def gpu():
    return Pipeline.load(provider="cuda")


def judged(images: np.ndarray) -> list:
    from sdonnx.export.tiny.shapes import judge

    return [judge((im * 255).round().astype(np.uint8)) for im in images]


def test_sessions_run_on_cuda(gpu):
    gpu.txt2img(PROMPTS[0], steps=2, output_type="np")
    assert gpu.components, "no component was opened"
    for name, comp in gpu.components.items():
        assert comp.session.get_providers()[0] == "CUDAExecutionProvider", name


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_txt2img_matches_cpu(cpu, gpu, scheduler):
    kw = dict(steps=12, seed=7, scheduler=scheduler, output_type="np")
    for prompt in PROMPTS:
        a, b = cpu.txt2img(prompt, **kw), gpu.txt2img(prompt, **kw)
        assert np.abs(a - b).mean() < 2e-3, prompt
        assert np.abs(a - b).max() < 5e-2, prompt
        assert judged(a) == judged(b), prompt


def test_img2img_and_step_cache_match_cpu(cpu, gpu):
    start = cpu.txt2img(PROMPTS[1], steps=10, seed=1)[0]  # a PIL image
    kw = dict(strength=0.6, steps=10, seed=2, output_type="np")
    a, b = cpu.img2img(PROMPTS[2], start, **kw), gpu.img2img(PROMPTS[2], start, **kw)
    assert np.abs(a - b).mean() < 2e-3
    if cpu.info.has_step_cache:  # the bundled folder is exported with --step-cache
        kw = dict(steps=12, seed=3, output_type="np", cache_interval=3)
        a, b = cpu.txt2img(PROMPTS[0], **kw), gpu.txt2img(PROMPTS[0], **kw)
        assert np.abs(a - b).mean() < 2e-3


def test_fp16_export_runs_on_cuda(cpu, tmp_path):
    """`sdonnx export tiny --precision fp16` on the CUDA provider: fp16 U-Net, the same shapes as fp32 on the CPU."""
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from sdonnx.cli import main

    out = tmp_path / "fp16"
    result = CliRunner().invoke(main, ["export", "tiny", str(out), "--precision", "fp16", "--quiet"])
    assert result.exit_code == 0, result.output
    half = Pipeline.load(out, provider="cuda")
    assert half.info.precision("unet") == "fp16"
    kw = dict(steps=20, seed=11, output_type="np")
    for prompt in PROMPTS:
        a, b = cpu.txt2img(prompt, **kw), half.txt2img(prompt, **kw)
        assert np.abs(a - b).mean() < 2e-2, prompt
        assert judged(a) == judged(b), prompt
