"""Parity of exported graphs with our PyTorch modules: max abs error and PSNR per component."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort

# An fp32 U-Net further than this from PyTorch is a broken export: fail loudly.
FP32_UNET_MAX_ERR = 1e-3
# Below these PSNRs (dB, peak = the reference's value range) a graph is reported with a warning.
MIN_PSNR = {"fp32": 60.0, "fp16": 35.0, "int8": 20.0}


class ExportError(RuntimeError):
    """An exported graph does not reproduce the PyTorch module."""


def psnr(reference: np.ndarray, output: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, with the reference's max - min as the peak."""
    ref = reference.astype(np.float64)
    mse = float(np.mean((ref - output.astype(np.float64)) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def compare(reference: np.ndarray, output: np.ndarray) -> dict:
    """{"max_abs_err", "psnr"} of `output` against `reference` (same shape required)."""
    if reference.shape != output.shape:
        raise ExportError(f"output shape {output.shape} differs from PyTorch's {reference.shape}")
    if not np.isfinite(output).all():
        return {"max_abs_err": math.inf, "psnr": -math.inf}
    err = float(np.max(np.abs(reference.astype(np.float64) - output.astype(np.float64))))
    return {"max_abs_err": err, "psnr": round(psnr(reference, output), 2)}


def run_graph(path: Path, inputs: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    """Run `path` once on the CPU provider with all optimizations, as the runtime would."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    # The exporter drops inputs a graph never reads (the shallow step-cache graph of a U-Net without
    # cross-attention in its first block has no use for encoder_hidden_states).
    declared = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in inputs.items() if k in declared})


def verify(component: str, path: Path, inputs: dict[str, np.ndarray], reference: np.ndarray,
           precision: str) -> tuple[dict, str | None]:
    """Compare the graph's first output with PyTorch's; returns (result, warning or None).

    Raises ExportError for an fp32 U-Net off by more than FP32_UNET_MAX_ERR.
    """
    result = compare(reference, run_graph(path, inputs)[0])
    result["inputs"] = {k: list(v.shape) for k, v in inputs.items()}
    if precision == "fp32" and component == "unet" and not result["max_abs_err"] <= FP32_UNET_MAX_ERR:
        raise ExportError(f"fp32 unet differs from PyTorch by {result['max_abs_err']:.3g} "
                          f"(limit {FP32_UNET_MAX_ERR:g}): the export is broken")
    floor = MIN_PSNR[precision]
    if not result["psnr"] >= floor:
        return result, (f"{component} ({precision}) PSNR {result['psnr']} dB vs PyTorch is below {floor} dB "
                        f"(max abs error {result['max_abs_err']:.3g})")
    return result, None
