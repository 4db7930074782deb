"""Export a model file to ONNX or torch.export, with the pixels-to-probabilities path inside the
graph, and prove the export agrees with PyTorch before anyone relies on it.

The exported graph takes what a decoder gives, uint8 images (N, H, W, C), and returns calibrated
probabilities (N, K): channel order, scaling, normalisation, the model, the calibration temperature
and the softmax are all in it, so a client needs only the pixels. A multi-label model's graph
returns two outputs: `probabilities` (N, K) float32, one sigmoid per label, and `labels` (N, K)
bool, probabilities >= the model file's thresholds (a constant in the graph), so a client needs
no threshold either. A binary model's graph returns the same two: `probabilities` (N, 2), the
calibrated (1 - p, p), and `labels` (N, 2) bool, the decided class (p >= its threshold) marked.
Class names, input size and preprocessing (a multi-label or binary model's task and thresholds too)
go into the export's metadata (ONNX `metadata_props["cnnkit"]`, torch.export's
extra file `cnnkit.json`), as JSON. Both exporters are PyTorch's current ones: `torch.export`, and the
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
from .onnxrun import EXPORT_TASKS, OnnxRunner
from .preprocess import Preprocess
from .utils import atomic_path

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
ONNX_OPSET = 18  # the dynamo exporter's default; onnxruntime >= 1.14 runs it
PARITY_MAX_DIFF = 1e-4  # the largest probability difference (fp32) an export may show
PARITY_IMAGES = 256  # validation images run through both sides
MAX_BATCH = 65536  # the dynamic batch dimension's upper bound (torch.export wants one)
MULTI_LABEL_OUTPUT = ("two outputs in class_names order: probabilities (N, num_classes) float32, one sigmoid per "
                      "label; labels (N, num_classes) bool, probabilities >= thresholds")
BINARY_OUTPUT = ("two outputs in class_names order: probabilities (N, 2) float32, calibrated (1 - p, p); labels (N, 2) "
                 "bool, the decided class: the second where p >= thresholds[0], else the first")


def exportable(info: ModelInfo) -> None:
    """A one-line error for a model whose task the export does not write yet."""
    if info.task not in EXPORT_TASKS:
        raise CnnkitError(f"this is a {info.task} model: cnnkit export handles {' and '.join(EXPORT_TASKS)} models "
                          "only so far")


def decision_thresholds(info: ModelInfo) -> np.ndarray:
    """The thresholds (K,) as float32 values that decide exactly as the model file's float64 ones:
    each is rounded up to the next float32 where the nearest one lies below, so for any float32
    probability p, p >= t32 exactly when p >= t64 (what predict computes in NumPy)."""
    t64 = np.asarray(info.decision_thresholds, np.float64)
    t32 = t64.astype(np.float32)
    return np.where(t32.astype(np.float64) < t64, np.nextafter(t32, np.float32(np.inf)), t32)


class Deployable(nn.Module):
    """uint8 images (N, H, W, C) -> calibrated probabilities (N, K): everything a client needs.
    A multi-label model's: (sigmoid probabilities (N, K) float32, labels (N, K) bool)."""

    def __init__(self, model: nn.Module, info: ModelInfo):
        super().__init__()
        exportable(info)
        self.model = model.eval()
        self.preprocess = Preprocess.from_info(info)
        self.temperature = float(info.temperature)
        self.multi_label, self.binary = info.task == "multi-label", info.task == "binary"
        if self.multi_label or self.binary:  # (K,) or (1,) float32: a constant of the graph
            self.register_buffer("thresholds", torch.from_numpy(decision_thresholds(info)), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images.permute(0, 3, 1, 2))  # (N, C, H, W) float32, normalized
        if self.multi_label:  # one sigmoid per label, no temperature; the thresholds decide
            probs = torch.sigmoid(self.model(x))  # (N, K)
            return probs, probs >= self.thresholds
        if self.binary:  # one logit z as the classes' (-z/2, z/2): softmax gives (1 - p, p), p = sigmoid(z / T)
            z = self.model(x)  # (N, 1)
            probs = F.softmax(torch.cat([-z / 2, z / 2], dim=1) / self.temperature, dim=1)  # (N, 2)
            second = probs[:, 1:] >= self.thresholds  # (N, 1)
            return probs, torch.cat([~second, second], dim=1)
        return F.softmax(self.model(x) / self.temperature, dim=1)  # (N, K)


def export_metadata(info: ModelInfo) -> dict:
    """What an export records beside its graph: enough for a client to feed it and read it
    (ModelInfo.from_export reads it back). A single-label record has no task key (as before)."""
    record = {"format": "cnnkit-export", "cnnkit_version": info.cnnkit_version,
              "input": {"layout": "NHWC", "dtype": "uint8", **dataclasses.asdict(info.input)},
              "output": "calibrated probabilities (N, num_classes), float32, in class_names order",
              "class_names": info.class_names, "preprocessing": dataclasses.asdict(info.preprocessing),
              "calibration": info.calibration(), "architecture": info.name, "metrics": info.numeric_metrics()}
    if info.task in ("multi-label", "binary"):
        record.update(task=info.task, thresholds=info.decision_thresholds,
                      output=MULTI_LABEL_OUTPUT if info.task == "multi-label" else BINARY_OUTPUT,
                      outputs={"probabilities": "float32", "labels": "bool"})
    return record


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
    wrapped = Deployable(model, info).eval()  # refuses a task it has no graph for
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
                                            input_names=["images"], output_names=output_names(info),
                                            dynamic_shapes=({0: batch},), verbose=False)
                program.model.metadata_props["cnnkit"] = record
                program.model.doc_string = onnx_doc_string(info)
                with atomic_path(out) as tmp:
                    program.save(str(tmp))
    except CnnkitError:
        raise
    except Exception as e:  # the exporter's own failure: one line, the op it could not export
        raise CnnkitError(f"{fmt} export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return out


def output_names(info: ModelInfo) -> list[str]:
    return ["probabilities", "labels"] if info.task in ("multi-label", "binary") else ["probabilities"]


def onnx_doc_string(info: ModelInfo) -> str:
    if info.task == "binary":
        return ("cnnkit binary classifier: uint8 images (N, H, W, C) in; out: probabilities (N, 2) float32 "
                "(calibrated) and labels (N, 2) bool (the decided class, at the threshold in metadata_props['cnnkit'])")
    if info.task == "multi-label":
        return ("cnnkit multi-label classifier: uint8 images (N, H, W, C) in; out: probabilities (N, K) float32 "
                "(one sigmoid per label) and labels (N, K) bool (probabilities >= thresholds, constants of the graph); "
                "class names, thresholds and preprocessing in metadata_props['cnnkit']")
    return ("cnnkit classifier: uint8 images (N, H, W, C) in, calibrated probabilities "
            "(N, K) out; class names and preprocessing in metadata_props['cnnkit']")


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
    the export; {n, agreement, agreement_on, max_abs_diff (probabilities), passed}. agreement: the
    share of images with the same top-1 class, or for a multi-label model the same whole label set
    (PyTorch's decisions against the export's `labels` output; see label_set_agreement)."""
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): what the export takes
    reference = Deployable(model, info).eval()
    with torch.no_grad():
        expected = batched_outputs(reference, nhwc)
        if fmt == "onnx":
            got = OnnxRunner(path).outputs(nhwc.numpy(), layout="NHWC")  # it runs its own batches
        else:
            got = batched_outputs(load_torch_export(path)[0], nhwc)
    if len(got) != len(expected):
        raise CnnkitError(f"{path} has {len(got)} output(s) where a {info.task} export has {len(expected)}")
    diff = float(np.abs(expected[0] - got[0]).max()) if len(images) else 0.0
    if info.task == "multi-label":
        agreement, edge = label_set_agreement(expected[0], expected[1], got[1].astype(bool), decision_thresholds(info))
        extra = {"agreement_on": "label set", "edge_decisions": edge}
    elif info.task == "binary":  # the decided class: the second class's column decides
        agreement, edge = label_set_agreement(expected[0][:, 1:], expected[1][:, 1:], got[1][:, 1:].astype(bool),
                                              decision_thresholds(info))
        extra = {"agreement_on": "decided class", "edge_decisions": edge}
    else:
        agreement, extra = float((expected[0].argmax(1) == got[0].argmax(1)).mean()), {"agreement_on": "top-1"}
    return {"n": len(images), "agreement": agreement, **extra, "max_abs_diff": diff,
            "passed": agreement == 1.0 and diff <= PARITY_MAX_DIFF}


def label_set_agreement(probs: np.ndarray, labels: np.ndarray, got: np.ndarray, thresholds: np.ndarray
                        ) -> tuple[float, int]:
    """(share of images whose label sets agree, decisions that differ on a threshold's edge).

    probs, labels: PyTorch's (N, K); got: the export's labels (N, K) bool. A label whose PyTorch
    probability lies within PARITY_MAX_DIFF of its threshold may fall on either side in the export
    (its probabilities may differ by that much), and does on the validation split: the thresholds
    were chosen there, at validation images' own probabilities. Such a decision counts as agreeing;
    the number is reported. Any other differing label (wrong thresholds in the graph, a broken
    comparison) makes its image disagree."""
    differ = labels != got
    edge = np.abs(probs.astype(np.float64) - thresholds) <= PARITY_MAX_DIFF
    return float((~differ | edge).all(1).mean()) if len(probs) else 1.0, int((differ & edge).sum())


def batched_outputs(module: nn.Module, nhwc: torch.Tensor) -> list[np.ndarray]:
    """Every output of `module` (a tensor, or a tuple of them) on uint8 (N, H, W, C), run in
    batches and concatenated: [probabilities (N, K)] or [probabilities, labels]."""
    parts = []
    for i in range(0, len(nhwc), INFERENCE_BATCH):
        out = module(nhwc[i:i + INFERENCE_BATCH])
        parts.append(out if isinstance(out, (tuple, list)) else (out,))
    return [torch.cat(column).numpy() for column in zip(*parts)]
