"""2x nearest upsampling followed by a 3x3 convolution, as four 2x2 convolutions on the input (sub-pixel
convolution, Shi et al. 2016): the exporter writes SD's VAE decoder this way, and `--provider openvino` rewrites
the U-Net's upsamplers where its static shapes show an exact doubling."""

from __future__ import annotations

import numpy as np

# Input channels from which the phase form pays: one SD-sized upsampler (256 to 1280 channels) took 0.47-0.80x the
# time on ONNX Runtime's and OpenVINO's CPU kernels, 128 channels 0.58x on OpenVINO but 1.1x on ONNX Runtime, TAESD's
# 64 channels 1.3-4.0x (scratch timings of single layers: four small convolutions' fixed costs)
MIN_CHANNELS = 256

# the four output phases (row, column): phase (a, b) holds output pixels (2i + a, 2j + b); in this order they are
# DepthToSpace's DCR (blocks first) channel groups
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def phase_kernels(weight: np.ndarray) -> list[np.ndarray]:
    """A [O, C, 3, 3] kernel applied after 2x nearest upsampling -> the four phases' [O, C, 2, 2] kernels on the
    input. Output row 2i reads input rows (i-1, i) with kernel rows (w0, w1 + w2), row 2i + 1 reads (i, i+1) with
    (w0 + w1, w2); columns alike. 16 products per output pixel and input channel instead of 36."""
    def fold(w: np.ndarray, phase: int, axis: int) -> np.ndarray:
        first, middle, last = np.moveaxis(w, axis, 0)
        return np.stack((first, middle + last) if phase == 0 else (first + middle, last), axis)

    w = np.asarray(weight, np.float64)
    return [fold(fold(w, a, 2), b, 3).astype(weight.dtype) for a, b in PHASES]


def phase_pads(a: int, b: int) -> tuple[list[int], list[int]]:
    """(pads at the start, pads at the end) of rows and columns that place phase (a, b)'s 2x2 window: (i-1, i) for
    phase 0, (i, i+1) for phase 1."""
    return [1 - a, 1 - b], [a, b]
