"""An ONNX export (from `cnnkit export`) in onnxruntime, without PyTorch: predict and serve run it
in processes that never import torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import CnnkitError

# Images per onnxruntime call. The call size matters little on 2 CPU cores (64 to 512 within 7% for
# seed-mnist-torch, seed-cifar10 and seed-patch64: `python -m benchmarks.inference.runtimes`); 64 keeps the
# arrays handed over small.
BATCH = 64


class OnnxRunner:
    """An ONNX export in onnxruntime: uint8 (N, C, H, W) or (N, H, W, C) -> probabilities (N, K)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CnnkitError("running ONNX needs onnxruntime: pip install 'cnnkit[export]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        # No busy-waiting between runs: the spinning threads would take the cores the decoders need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CnnkitError(f"{path} is not a runnable ONNX file: {str(e).splitlines()[0][:200]}") from None
        self.input_name = self.session.get_inputs()[0].name
        raw = self.session.get_modelmeta().custom_metadata_map.get("cnnkit")
        self.meta = json.loads(raw) if raw else None

    def __call__(self, images: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        x = images.transpose(0, 2, 3, 1) if layout == "NCHW" else images
        out = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + BATCH])})[0]
               for i in range(0, len(x), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
