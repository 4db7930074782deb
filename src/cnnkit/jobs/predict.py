"""`cnnkit predict`: classify files and folders at the speed of the decoder.

Two things make it fast, each measured (benchmarks/inference/predict_speed.py, benchmarks/NOTES.md):
- decoding runs in a process pool on every core while the model runs on the batches already
  decoded (Pillow holds the GIL for its Python-side work, so threads would not overlap);
- the runtime is the one measured fastest for this model on this machine (runtimes.py); with the
  ONNX runtime PyTorch is never imported: this module imports numpy, Pillow and safetensors only.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import conformal, runtimes
from ..decode import decoded_chunks, expand_paths
from ..errors import CnnkitError
from ..modelfile import ModelInfo, read_info, resolve_model_path
from ..multilabel import label_set
from ..runtimes import choose_runtime, cpu_count


def predict_files(model: str | Path, paths: list[str], top_k: int = 3, min_confidence: float | None = None,
                  tta: bool = False, runtime: str = "auto", workers: int | None = None,
                  on_progress: Callable[[int], None] | None = None, coverage: float | None = None
                  ) -> tuple[list[dict], dict]:
    """(rows, info). One row per file: {path, labels, probabilities} or {path, error}; a bad file
    never stops the batch. A multi-label model's row holds the labels present (at the model file's
    thresholds), most probable first, and label_probabilities: every label's.
    coverage: each row also gets `set`, its conformal prediction set at that coverage (PredictionSets).
    info: {runtime, why, files, classified, errors, seconds} (with coverage: and `conformal`).

    model: a model file, a run folder, or an ONNX file written by `cnnkit export`."""
    start = time.perf_counter()
    model_path = Path(model)
    if model_path.suffix == ".onnx":
        if not model_path.is_file():
            raise CnnkitError(f"no ONNX file at {model}")
        info = None
    else:
        model_path = resolve_model_path(model)
        info = read_info(model_path)  # once: the runtime is handed it
    files = expand_paths(paths)
    if not files:
        return [], {"files": 0}
    workers = cpu_count() if workers is None else workers
    # The pool forks before the runtime loads, so the workers carry no PyTorch or onnxruntime threads.
    rt, why = None, ""
    rows: list[dict] = []
    if info is None:
        rt, why = choose_runtime(model_path, None, runtime, tta, measure=False)
        info = rt.info
    sets = PredictionSets(info, coverage, tta) if coverage is not None else None  # refused before any decoding
    side = info.square_side("predict")
    # multi-label: every label whose probability reaches its threshold, and each label's probability
    if info.task == "multi-label" and (tta or min_confidence is not None):
        raise CnnkitError(f"{'--tta' if tta else '--min-confidence'} is for single-label models; this one is "
                          "multi-label, its thresholds are in the model file")
    for chunk, decoded in decoded_chunks(files, side, info.input.channels, workers):
        if rt is None:  # after the pool has forked: the runtime's threads are the parent's alone
            rt, why = choose_runtime(model_path, info, runtime, tta, measure=len(files) >= runtimes.MEASURE_FROM_FILES,
                                     float_only=sets is not None)  # sets: calibrated on float probabilities
        if sets is not None:
            if "int8" in rt.name:  # an int8 ONNX file given as the model
                raise CnnkitError("--coverage sets are calibrated on the float model's probabilities, which int8 "
                                  "changes: predict with the model file or its fp32 export")
            sets.ready(rt)
        good = [a for a, _ in decoded if a is not None]
        probs = rt(np.stack(good)) if good else np.zeros((0, len(info.class_names)))
        rows += chunk_rows(info, chunk, decoded, probs, top_k, min_confidence, sets)
        if on_progress:
            on_progress(len(chunk))
    errors = sum("error" in r for r in rows)
    return rows, {"runtime": rt.name, "why": why, "files": len(rows), "classified": len(rows) - errors,
                  "errors": errors, "seconds": time.perf_counter() - start,
                  **({"conformal": sets.description()} if sets is not None else {})}


def chunk_rows(info: ModelInfo, chunk: list[str], decoded: list, probs: np.ndarray, top_k: int,
               min_confidence: float | None, sets: PredictionSets | None) -> list[dict]:
    """The rows of one chunk of files: decoded [(array or None, error)], probs (B, K) for those decoded."""
    names = info.class_names
    k = min(top_k, len(names))
    thresholds = np.array(info.decision_thresholds) if info.task == "multi-label" else None
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (B, k)
    if info.task == "binary":  # the decided class first: the second where its probability reaches the threshold
        second = probs[:, 1] >= info.decision_thresholds[0]
        order = np.where(second[:, None], [[1, 0]], [[0, 1]])[:, :k]
    members = sets.names(probs) if sets is not None else None
    rows, j = [], 0
    for path, (array, error) in zip(chunk, decoded):
        if array is None:
            rows.append({"path": path, "error": error})
            continue
        if thresholds is not None:
            rows.append({"path": path, **label_set(probs[j], thresholds, names)})
            j += 1
            continue
        labels = [names[i] for i in order[j]]
        values = [float(probs[j, i]) for i in order[j]]
        if min_confidence is not None and values[0] < min_confidence:
            labels[0] = "unknown"
        rows.append({"path": path, "labels": labels, "probabilities": values,
                     **({"set": members[j]} if members is not None else {})})
        j += 1
    return rows


class PredictionSets:
    """--coverage: each image's conformal prediction set (class names, most probable first) from the
    model file's record (conformal.py); for a file written before cnnkit stored one, the record is
    computed from the model's validation split through the runtime, and `note` says so."""

    def __init__(self, info: ModelInfo, coverage: float, tta: bool):
        self.coverage = conformal.check_coverage(coverage)
        if info.task == "multi-label":
            raise CnnkitError("--coverage is for single-label and binary models; a multi-label model's label set is "
                              "decided by its per-label thresholds (in the model file)")
        if tta:
            raise CnnkitError("--coverage sets are calibrated on single-view probabilities; leave --tta out")
        self.info, self.record, self.note = info, info.conformal, "stored in the model file"
        # with a stored record, a coverage the validation split is too small for is refused before any work
        self.threshold = conformal.record_threshold(self.record, self.coverage) if self.record else None

    def ready(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        """Compute the record now if the file holds none (`run`: uint8 images -> probabilities)."""
        if self.threshold is None:
            from ..evaluate import conformal_from_validation  # PyTorch and the data loaders: this case only
            self.record, self.note = conformal_from_validation(self.info, run)
            self.threshold = conformal.record_threshold(self.record, self.coverage)

    def names(self, probs: np.ndarray) -> list[list[str]]:
        names = self.info.class_names
        return [[names[i] for i in s] for s in conformal.prediction_sets(probs, self.threshold, self.record["score"])]

    def description(self) -> dict:
        return {"coverage": self.coverage, "score": self.record["score"] if self.record else None,
                "calibration_images": len(self.record["scores"]) if self.record else None,
                "threshold": self.threshold, "source": self.note}
