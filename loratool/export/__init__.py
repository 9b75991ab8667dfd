"""ONNX export, validation and latency comparison (the `onnx` extra)."""
