"""Helpers shared by the test files: tiny optimum-exported folders, small input pictures, one-line error checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdonnx.errors import SdonnxError

TASKS = {"sd1": "text-to-image", "sd2": "text-to-image", "inpaint": "inpainting"}
SIZE = 32  # pixels of the tiny models' pictures (sample size 16, the tiny VAE upsamples by 2)


def tiny_folders(family: str, base: Path) -> tuple[Path, Path]:
    """(diffusers folder, optimum ONNX folder) of a tiny random model; exported once per test session."""
    pt, onnx = base / f"{family}-diffusers", base / f"{family}-onnx"
    if not (onnx / "model_index.json").is_file():
        from optimum.exporters.onnx import main_export
        from tiny_sd import save_pipeline

        save_pipeline(pt, family)
        main_export(str(pt), str(onnx), task=TASKS[family])
    return pt, onnx


def picture() -> Image.Image:
    """A smooth colourful 32x32 picture."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def square_mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:24, 4:20] = 255
    return Image.fromarray(m, "L")


def one_line_error(fn, *words: str, error: type[Exception] = SdonnxError, match: str | None = None) -> str:
    """fn() must raise `error` with a one-line message holding every word (and matching the regex `match`)."""
    with pytest.raises(error, match=match) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


def cli_error(result, *words: str) -> str:
    """A CLI run (click's CliRunner result) that failed with exit status 1 and printed only `Error: ...` holding
    every word, on stderr, with no traceback; returns that line."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and lines[0] in result.stderr, result.output
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ---- tiny SDXL folders ----------------------------------------------------------------------------------------

SDXL_TASKS = {"sdxl": "text-to-image", "sdxl-inpaint": "inpainting"}
# who writes a tiny SDXL ONNX folder; the SDXL tests run on each ("sdonnx", our own export, joins when it exists)
SDXL_EXPORTERS = ("sdonnx", "optimum")


def tiny_sdxl_folders(family: str, base: Path, exporter: str = "optimum", build=None) -> tuple[Path, Path]:
    """(diffusers folder, ONNX folder written by `exporter`) of a tiny random SDXL, built once per test session;
    build(folder) writes the diffusers folder (default: tests/tiny_sdxl.py's pipeline of `family`)."""
    pt, onnx = base / f"{family}-diffusers", base / f"{family}-onnx-{exporter}"
    if not (pt / "model_index.json").is_file():
        from tiny_sdxl import save_pipeline

        (build or (lambda folder: save_pipeline(folder, family)))(pt)
    if not (onnx / "model_index.json").is_file():
        if exporter == "sdonnx":
            from click.testing import CliRunner

            from sdonnx.export.cli import export

            # a turbo folder is exported as a user of a real one would: with its generation defaults
            turbo = ["--defaults", "steps=1,guidance=0,scheduler=euler_a"] if family.endswith("-turbo") else []
            result = CliRunner().invoke(export, [str(pt), str(onnx), "--precision", "fp32", *turbo, "--quiet"])
            assert result.exit_code == 0, result.output
        elif exporter == "optimum":
            from optimum.exporters.onnx import main_export

            main_export(str(pt), str(onnx), task=SDXL_TASKS.get(family, "text-to-image"))
        else:
            raise ValueError(f"unknown SDXL exporter {exporter!r}")
    return pt, onnx


def ldm_tool():
    """benchmarks/ldm_checkpoint.py (ours -> one LDM single-file checkpoint), imported from its folder."""
    import sys

    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import ldm_checkpoint
    finally:
        sys.path.remove(bench)
    return ldm_checkpoint
