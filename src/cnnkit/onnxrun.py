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
# The tasks `cnnkit export` writes a graph for (export.py; here, without PyTorch, for runtimes.py too):
# single-label -> probabilities; multi-label -> probabilities and labels (probabilities >= thresholds);
# binary -> probabilities (N, 2) and labels (N, 2), the decided class.
EXPORT_TASKS = ("single-label", "multi-label", "binary")


class OnnxRunner:
    """An ONNX export in onnxruntime: uint8 (N, C, H, W) or (N, H, W, C) -> probabilities (N, K)
    (its first output; a multi-label export's second, `labels`, is read by `outputs`)."""

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
        self.output_names = [o.name for o in self.session.get_outputs()]
        raw = self.session.get_modelmeta().custom_metadata_map.get("cnnkit")
        self.meta = json.loads(raw) if raw else None

    def __call__(self, images: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        return self.outputs(images, layout, self.output_names[:1])[0]

    def outputs(self, images: np.ndarray, layout: str = "NCHW", names: list[str] | None = None) -> list[np.ndarray]:
        """The graph's outputs `names` (default: all, in the graph's order), each concatenated over batches."""
        names = names or self.output_names
        x = images.transpose(0, 2, 3, 1) if layout == "NCHW" else images
        runs = [self.session.run(names, {self.input_name: np.ascontiguousarray(x[i:i + BATCH])})
                for i in range(0, len(x), BATCH)]
        if not runs:
            return [np.zeros((0, 0), np.float32) for _ in names]
        return [np.concatenate(column) for column in zip(*runs)]
