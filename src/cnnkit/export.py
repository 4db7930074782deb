"""Export a model file to ONNX or torch.export, with the pixels-to-probabilities path inside the
graph, and prove the export agrees with PyTorch before anyone relies on it.

The exported graph takes what a decoder gives, uint8 images (N, H, W, C), and returns calibrated
probabilities (N, K): channel order, scaling, normalisation, the model, the calibration temperature
and the softmax are all in it, so a client needs only the pixels. Class names, input size and
preprocessing go into the export's metadata (ONNX `metadata_props["cnnkit"]`, torch.export's extra
file `cnnkit.json`), as JSON. Both exporters are PyTorch's current ones: `torch.export`, and the
dynamo-based ONNX exporter built on it (TorchScript is deprecated).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CnnkitError
from .inference import INFERENCE_BATCH
from .modelfile import ModelInfo
from .onnxrun import OnnxRunner
from .preprocess import Preprocess
from .utils import atomic_path

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
ONNX_OPSET = 18  # the dynamo exporter's default; onnxruntime >= 1.14 runs it
PARITY_MAX_DIFF = 1e-4  # the largest probability difference (fp32) an export may show
PARITY_IMAGES = 256  # validation images run through both sides
MAX_BATCH = 65536  # the dynamic batch dimension's upper bound (torch.export wants one)


class Deployable(nn.Module):
    """uint8 images (N, H, W, C) -> calibrated probabilities (N, K): everything a client needs."""

    def __init__(self, model: nn.Module, info: ModelInfo):
        super().__init__()
        self.model = model.eval()
        self.preprocess = Preprocess.from_info(info)
        self.temperature = float(info.temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.permute(0, 3, 1, 2))  # (N, C, H, W) float32, normalized
        return F.softmax(self.model(x) / self.temperature, dim=1)  # (N, K)


def export_metadata(info: ModelInfo) -> dict:
    """What an export records beside its graph: enough for a client to feed it and read it
    (ModelInfo.from_export reads it back)."""
    return {"format": "cnnkit-export", "cnnkit_version": info.cnnkit_version,
            "input": {"layout": "NHWC", "dtype": "uint8", **dataclasses.asdict(info.input)},
            "output": "calibrated probabilities (N, num_classes), float32, in class_names order",
            "class_names": info.class_names, "preprocessing": dataclasses.asdict(info.preprocessing),
            "calibration": info.calibration(), "architecture": info.name, "metrics": info.numeric_metrics()}


@contextlib.contextmanager
def quiet_exporter():
    """The exporters print progress lines and warn about torchvision ops they skip; keep that off
    the user's terminal unless something fails (the exception carries the reason)."""
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


def example_input(info: ModelInfo, n: int = 2) -> torch.Tensor:
    c, h, w = info.input.chw
    return torch.zeros(n, h, w, c, dtype=torch.uint8)


def export(model: nn.Module, info: ModelInfo, fmt: str, out: str | Path) -> Path:
    """Write the export to `out` (via a temporary name) and return its path."""
    if fmt not in FORMATS:
        raise CnnkitError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = Path(out)
    wrapped = Deployable(model, info).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    record = json.dumps(export_metadata(info))
    try:
        with quiet_exporter():
            if fmt == "torch-export":
                program = torch.export.export(wrapped, (example_input(info),), dynamic_shapes=({0: batch},))
                with atomic_path(out) as tmp:
                    torch.export.save(program, tmp, extra_files={"cnnkit.json": record})
            else:
                try:
                    import onnxscript  # noqa: F401  (the dynamo exporter needs it)
                except ImportError:
                    raise CnnkitError("ONNX export needs the onnx extras: pip install 'cnnkit[export]'") from None
                program = torch.onnx.export(wrapped, (example_input(info),), dynamo=True, opset_version=ONNX_OPSET,
                                            input_names=["images"], output_names=["probabilities"],
                                            dynamic_shapes=({0: batch},), verbose=False)
                program.model.metadata_props["cnnkit"] = record
                program.model.doc_string = ("cnnkit classifier: uint8 images (N, H, W, C) in, calibrated probabilities "
                                            "(N, K) out; class names and preprocessing in metadata_props['cnnkit']")
                with atomic_path(out) as tmp:
                    program.save(str(tmp))
    except CnnkitError:
        raise
    except Exception as e:  # the exporter's own failure: one line, the op it could not export
        raise CnnkitError(f"{fmt} export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return out


# ----------------------------------------------------------------------------- checking an export
def load_torch_export(path: str | Path) -> tuple[nn.Module, dict]:
    """(callable module, cnnkit metadata) of a .pt2 file written by `export`."""
    extra = {"cnnkit.json": ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise CnnkitError(f"{path} is not a torch.export file: {str(e).splitlines()[0][:200]}") from None
    return program.module(), json.loads(extra["cnnkit.json"] or "{}")


def parity(model: nn.Module, info: ModelInfo, path: str | Path, fmt: str, images: torch.Tensor) -> dict:
    """Run uint8 images (N, C, H, W) through PyTorch (the model file's weights, fp32) and through
    the export; {n, agreement (top-1 share), max_abs_diff (probabilities), passed}."""
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): what the export takes
    reference = Deployable(model, info).eval()
    batches = range(0, len(nhwc), INFERENCE_BATCH)
    with torch.no_grad():
        expected = torch.cat([reference(nhwc[i:i + INFERENCE_BATCH]) for i in batches]).numpy()
        if fmt == "onnx":
            got = OnnxRunner(path)(nhwc.numpy(), layout="NHWC")  # it runs its own batches
        else:
            module, _ = load_torch_export(path)
            got = torch.cat([module(nhwc[i:i + INFERENCE_BATCH]) for i in batches]).numpy()
    agreement = float((expected.argmax(1) == got.argmax(1)).mean())
    diff = float(np.abs(expected - got).max())
    return {"n": len(images), "agreement": agreement, "max_abs_diff": diff,
            "passed": agreement == 1.0 and diff <= PARITY_MAX_DIFF}
