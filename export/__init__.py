"""sdonnx.export: PyTorch models, weight loading and ONNX export (needs the [export] extra)."""
