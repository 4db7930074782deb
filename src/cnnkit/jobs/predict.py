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

from .. import runtimes
from ..decode import decoded_chunks, expand_paths
from ..errors import CnnkitError
from ..modelfile import read_info, resolve_model_path
from ..multilabel import label_set
from ..runtimes import choose_runtime, cpu_count

def predict_files(model: str | Path, paths: list[str], top_k: int = 3, min_confidence: float | None = None,
                  tta: bool = False, runtime: str = "auto", workers: int | None = None,
                  on_progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """(rows, info). One row per file: {path, labels, probabilities} or {path, error}; a bad file
    never stops the batch. A multi-label model's row holds the labels present (at the model file's
    thresholds), most probable first, and label_probabilities: every label's.
    info: {runtime, why, files, classified, errors, seconds}.

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
    names, side = info.class_names, info.square_side("predict")
    k = min(top_k, len(names))
    # multi-label: every label whose probability reaches its threshold, and each label's probability
    thresholds = (np.array(info.decision_thresholds) if info.task == "multi-label" else None)
    if thresholds is not None and (tta or min_confidence is not None):
        raise CnnkitError(f"{'--tta' if tta else '--min-confidence'} is for single-label models; this one is "
                          "multi-label, its thresholds are in the model file")
    for chunk, decoded in decoded_chunks(files, side, info.input.channels, workers):
        if rt is None:  # after the pool has forked: the runtime's threads are the parent's alone
            rt, why = choose_runtime(model_path, info, runtime, tta, measure=len(files) >= runtimes.MEASURE_FROM_FILES)
        good = [a for a, _ in decoded if a is not None]
        probs = rt(np.stack(good)) if good else np.zeros((0, len(names)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (B, k)
        if info.task == "binary":  # the decided class first: the second where its probability reaches the threshold
            second = probs[:, 1] >= info.decision_thresholds[0]
            order = np.where(second[:, None], [[1, 0]], [[0, 1]])[:, :k]
        j = 0
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
            rows.append({"path": path, "labels": labels, "probabilities": values})
            j += 1
        if on_progress:
            on_progress(len(chunk))
    errors = sum("error" in r for r in rows)
    return rows, {"runtime": rt.name, "why": why, "files": len(rows), "classified": len(rows) - errors,
                  "errors": errors, "seconds": time.perf_counter() - start}
