"""`cnnkit predict`: classify files and folders at the speed of the decoder.

Three things make it fast, each measured (benchmarks/predict_speed.py, benchmarks/NOTES.md):
- decoding runs in a process pool on every core while the model runs on the batches already
  decoded (Pillow holds the GIL for its Python-side work, so threads would not overlap);
- the runtime is the one measured fastest for this model on this machine: the first large job
  exports the model to ONNX in the cache (parity-checked), times onnxruntime against PyTorch on
  the same batch and records the winner; later jobs read the record. On 2 CPU cores in fp32,
  onnxruntime ran seed-cifar10 1.9x and seed-mnist-torch 1.7x faster than PyTorch, seed-patch64
  about as fast (`python benchmarks/runtimes.py`, batches of 64);
- with the ONNX runtime PyTorch is never imported (about 1 s of a short job): this module, the
  decoder and the model file's metadata reader import numpy, Pillow and safetensors only.

Probabilities are fp32 and calibrated on every runtime (the export includes the temperature), equal
to 1e-4 between runtimes (the export's parity check).
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np

from .decode import decode_files, die_with_parent, expand_paths
from .errors import CnnkitError
from .modelfile import read_metadata, resolve_model_path
from .utils import cache_dir, hash_file, write_text_atomic

RUNTIMES = ("auto", "torch", "onnx")
CHUNK_FILES = 256  # files per decoding task: large enough that a task's overhead (pickling ~3 MB back) is small
PARALLEL_FROM_FILES = 512  # below this a process pool's start-up costs more than it saves
MEASURE_FROM_FILES = 2000  # auto runtime: smaller jobs use PyTorch rather than pay an export (1-4 s) to choose
MEASURE_BATCH = 128  # images per timed batch when choosing a runtime


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- runtimes
class TorchRuntime:
    """The model file in PyTorch (fp32, channels-last), optionally with test-time augmentation."""
    name = "torch"

    def __init__(self, model_path: Path, tta: bool = False):
        from .modelfile import load_model
        self.model, self.meta = load_model(model_path)
        self.tta = tta

    def __call__(self, images: np.ndarray) -> np.ndarray:  # uint8 (N, C, H, W) -> (N, K)
        import torch

        from .inference import probabilities
        return probabilities(self.model, self.meta, torch.from_numpy(images), tta=self.tta)


class OnnxRuntime:
    name = "onnx"

    def __init__(self, onnx_path: Path):
        from .onnxrun import OnnxRunner
        self.runner = OnnxRunner(onnx_path)
        self.meta = self.runner.meta

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.runner(images, layout="NCHW").astype(np.float64)


def exports_dir() -> Path:
    """Cached ONNX exports and runtime measurements, keyed by the model file's sha256."""
    return cache_dir() / "exports"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401  (only whether it imports)
        return True
    except ImportError:
        return False


def cached_onnx(model_path: Path, key: str) -> Path:
    """The model's ONNX export in the cache (key: the model file's sha256), written and
    parity-checked on first use."""
    onnx_path = exports_dir() / f"{key}.onnx"
    if not onnx_path.exists():
        import torch

        from .export import export, parity
        from .modelfile import load_model
        model, meta = load_model(model_path)
        export(model, meta, "onnx", onnx_path)
        inp = meta["input"]
        probe = torch.randint(0, 256, (64, inp["channels"], inp["height"], inp["width"]),
                              generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        check = parity(model, meta, onnx_path, "onnx", probe)
        if not check["passed"]:
            onnx_path.unlink()
            raise CnnkitError(f"the ONNX export of {model_path} disagrees with PyTorch (max difference "
                              f"{check['max_abs_diff']:.2g}); use --runtime torch")
    return onnx_path


def time_runtime(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, repeats: int = 3) -> float:
    """Images per second, the best of `repeats` passes after one warm-up."""
    run(images)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def choose_runtime(model_path: Path, meta: dict, runtime: str, tta: bool, measure: bool):
    """(runtime object, how it was chosen). measure: with `auto` and no record yet, export and
    time both runtimes now (a large job, or a server) rather than use PyTorch for this job."""
    if runtime not in RUNTIMES:
        raise CnnkitError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if model_path.suffix == ".onnx":
        if tta:
            raise CnnkitError("--tta needs the model file (PyTorch); an ONNX export has one view built in")
        return OnnxRuntime(model_path), "an ONNX file"
    if runtime == "torch" or tta:
        return TorchRuntime(model_path, tta), "asked" if runtime == "torch" else "--tta runs in PyTorch"
    if not onnxruntime_available():
        if runtime == "onnx":
            raise CnnkitError("--runtime onnx needs onnxruntime: pip install 'cnnkit[export]'")
        return TorchRuntime(model_path), "onnxruntime is not installed"
    key = hash_file(model_path, "sha256")  # the cache's key: the model file's bytes
    if runtime == "onnx":
        return OnnxRuntime(cached_onnx(model_path, key)), "asked"
    # auto: the runtime measured fastest for this model file on this machine, measured once
    record_path = exports_dir() / f"{key}.runtime.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None:
        if not measure:
            return TorchRuntime(model_path), f"fewer than {MEASURE_FROM_FILES} files: not worth measuring"
        torch_rt = TorchRuntime(model_path)
        try:
            onnx_rt = OnnxRuntime(cached_onnx(model_path, key))
        except CnnkitError as e:  # an op the exporter cannot write, or a failed parity check: PyTorch it is
            record = {"runtime": "torch", "images_per_second": {}, "why": f"no ONNX export: {e}"}
            write_text_atomic(record_path, json.dumps(record, indent=2))
            return torch_rt, record["why"]
        inp = meta["input"]
        probe = np.random.default_rng(0).integers(0, 256, (MEASURE_BATCH, inp["channels"], inp["height"], inp["width"]),
                                                  dtype=np.uint8)
        speeds = {"torch": time_runtime(torch_rt, probe), "onnx": time_runtime(onnx_rt, probe)}
        record = {"runtime": max(speeds, key=speeds.get), "images_per_second": speeds, "cpus": cpu_count()}
        write_text_atomic(record_path, json.dumps(record, indent=2))
        chosen = onnx_rt if record["runtime"] == "onnx" else torch_rt
        return chosen, "measured now: " + ", ".join(f"{k} {v:,.0f} images/s" for k, v in speeds.items())
    how = record.get("why") or "measured before: " + ", ".join(f"{k} {v:,.0f} images/s"
                                                             for k, v in record["images_per_second"].items())
    if record["runtime"] == "onnx":
        return OnnxRuntime(cached_onnx(model_path, key)), how
    return TorchRuntime(model_path), how


# ----------------------------------------------------------------------------- the pipeline
def decoded_chunks(files: list[str], size: int, channels: int, workers: int):
    """Yield (paths, [(array or None, error)]) in order; decoding runs ahead in a process pool,
    at most 2 chunks per worker in flight, so memory stays bounded for any number of files."""
    chunks = [files[i:i + CHUNK_FILES] for i in range(0, len(files), CHUNK_FILES)]
    if workers <= 1 or len(files) < PARALLEL_FROM_FILES:
        for chunk in chunks:
            yield chunk, decode_files((chunk, size, channels))
        return
    # fork: workers start in milliseconds and need nothing the parent has not imported (no torch)
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=die_with_parent) as pool:
        pending: deque = deque()
        todo = iter(chunks)
        for chunk in todo:
            pending.append((chunk, pool.submit(decode_files, (chunk, size, channels))))
            if len(pending) >= 2 * workers:
                break
        while pending:
            chunk, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(decode_files, (nxt, size, channels))))
            yield chunk, future.result()


def predict_files(model: str | Path, paths: list[str], top_k: int = 3, min_confidence: float | None = None,
                  tta: bool = False, runtime: str = "auto", workers: int | None = None,
                  on_progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """(rows, info). One row per file: {path, labels, probabilities} or {path, error}; a bad file
    never stops the batch. info: {runtime, why, files, classified, errors, seconds}.

    model: a model file, a run folder, or an ONNX file written by `cnnkit export`."""
    start = time.perf_counter()
    model_path = Path(model)
    if model_path.suffix == ".onnx":
        if not model_path.is_file():
            raise CnnkitError(f"no ONNX file at {model}")
        meta = None
    else:
        model_path = resolve_model_path(model)
        meta = read_metadata(model_path)
    files = expand_paths(paths)
    if not files:
        return [], {"files": 0}
    workers = cpu_count() if workers is None else workers
    # The pool forks before the runtime loads, so the workers carry no PyTorch or onnxruntime threads.
    rt, why = None, ""
    rows: list[dict] = []
    if meta is None:
        rt, why = choose_runtime(model_path, {}, runtime, tta, measure=False)
        meta = rt.meta
        if not meta or "class_names" not in meta:
            raise CnnkitError(f"{model} is an ONNX file without cnnkit metadata; export it with `cnnkit export`")
    inp, names = meta["input"], meta["class_names"]
    if inp["height"] != inp["width"]:
        raise CnnkitError("predict supports square model inputs only")
    k = min(top_k, len(names))
    for chunk, decoded in decoded_chunks(files, inp["height"], inp["channels"], workers):
        if rt is None:  # after the pool has forked: the runtime's threads are the parent's alone
            rt, why = choose_runtime(model_path, meta, runtime, tta, measure=len(files) >= MEASURE_FROM_FILES)
        good = [a for a, _ in decoded if a is not None]
        probs = rt(np.stack(good)) if good else np.zeros((0, len(names)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (B, k)
        j = 0
        for path, (array, error) in zip(chunk, decoded):
            if array is None:
                rows.append({"path": path, "error": error})
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
