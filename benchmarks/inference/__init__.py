"""Inference: batch size, `cnnkit predict` over a folder, PyTorch against onnxruntime, export parity,
Grad-CAM sanity. `python -m benchmarks.inference.<name> --help`."""
