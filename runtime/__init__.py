"""sdonnx: Stable Diffusion on ONNX Runtime with a NumPy runtime (no torch)."""

__version__ = "0.1.0"
