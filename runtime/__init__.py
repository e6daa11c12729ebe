"""sdonnx: Stable Diffusion on ONNX Runtime with a NumPy runtime (no torch)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "SdonnxError", "__version__"]


def __getattr__(name: str):
    # Lazy, so `sdonnx --version` and `sdonnx export` do not pay for importing onnxruntime.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "SdonnxError":
        from .errors import SdonnxError

        return SdonnxError
    raise AttributeError(f"module 'sdonnx' has no attribute {name!r}")
