"""The runtimes a model file runs on (PyTorch, or its ONNX export in onnxruntime), and the choice
between them: the one measured fastest for this model on this machine. `cnnkit predict`
(jobs/predict.py) and `cnnkit serve` use it.

- The first large job exports the model to ONNX in the cache (parity-checked), times onnxruntime
  against PyTorch on the same batch and records the winner; later jobs read the record. On 2 CPU
  cores in fp32, onnxruntime ran seed-cifar10 1.9x and seed-mnist-torch 1.7x faster than PyTorch,
  seed-patch64 about as fast (`python -m benchmarks.inference.runtimes`, batches of 64).
- With the ONNX runtime PyTorch is never imported (about 1 s of a short job): this module, the
  decoder and the model file's metadata reader import numpy, Pillow and safetensors only.

Probabilities are fp32 and calibrated on every runtime (the export includes the temperature), equal
to 1e-4 between runtimes (the export's parity check). A multi-label model's are its sigmoids (N, K)
on every runtime; the caller decides with info.thresholds (the ONNX file's metadata carries them).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CnnkitError
from .modelfile import ModelInfo
from .onnxrun import EXPORT_TASKS
from .utils import cache_dir, hash_file, write_text_atomic

RUNTIMES = ("auto", "torch", "onnx")
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

    def __init__(self, model_path: Path, tta: bool = False, info: ModelInfo | None = None):
        from .modelfile import load_model
        self.model, self.info = load_model(model_path, info=info)
        self.tta = tta

    def __call__(self, images: np.ndarray) -> np.ndarray:  # uint8 (N, C, H, W) -> (N, K)
        import torch

        from .inference import probabilities
        return probabilities(self.model, self.info, torch.from_numpy(images), tta=self.tta)


class OnnxRuntime:
    name = "onnx"

    def __init__(self, onnx_path: Path):
        from .onnxrun import OnnxRunner
        self.runner = OnnxRunner(onnx_path)
        self.info = ModelInfo.from_export(self.runner.meta, where=str(onnx_path))

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


def cached_onnx(model_path: Path, key: str, loaded: TorchRuntime | None = None) -> Path:
    """The model's ONNX export in the cache (key: the model file's sha256), written and
    parity-checked on first use (from `loaded`'s model when the caller has the file loaded already)."""
    onnx_path = exports_dir() / f"{key}.onnx"
    if not onnx_path.exists():
        import torch

        from .export import export, parity
        from .modelfile import load_model
        model, info = (loaded.model, loaded.info) if loaded else load_model(model_path)
        export(model, info, "onnx", onnx_path)
        probe = torch.randint(0, 256, (64, *info.input.chw), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8)
        check = parity(model, info, onnx_path, "onnx", probe)
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


def choose_runtime(model_path: Path, info: ModelInfo | None, runtime: str, tta: bool, measure: bool):
    """(runtime object, how it was chosen). measure: with `auto` and no record yet, export and
    time both runtimes now (a large job, or a server) rather than use PyTorch for this job."""
    if runtime not in RUNTIMES:
        raise CnnkitError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if model_path.suffix == ".onnx":
        if tta:
            raise CnnkitError("--tta needs the model file (PyTorch); an ONNX export has one view built in")
        return OnnxRuntime(model_path), "an ONNX file"
    if info is not None and info.task not in EXPORT_TASKS:  # a task the export writes no graph for, so far
        if runtime == "onnx":
            raise CnnkitError(f"a {info.task} model has no ONNX export yet: use --runtime torch (or auto)")
        return TorchRuntime(model_path, tta, info), f"a {info.task} model runs in PyTorch (no ONNX export yet)"
    if runtime == "torch" or tta:
        return TorchRuntime(model_path, tta, info), "asked" if runtime == "torch" else "--tta runs in PyTorch"
    if not onnxruntime_available():
        if runtime == "onnx":
            raise CnnkitError("--runtime onnx needs onnxruntime: pip install 'cnnkit[export]'")
        return TorchRuntime(model_path, info=info), "onnxruntime is not installed"
    key = hash_file(model_path, "sha256")  # the cache's key: the model file's bytes
    if runtime == "onnx":
        return OnnxRuntime(cached_onnx(model_path, key)), "asked"
    # auto: the runtime measured fastest for this model file on this machine, measured once
    record_path = exports_dir() / f"{key}.runtime.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None:
        if not measure:
            return TorchRuntime(model_path, info=info), f"fewer than {MEASURE_FROM_FILES} files: not worth measuring"
        torch_rt = TorchRuntime(model_path, info=info)
        try:
            onnx_rt = OnnxRuntime(cached_onnx(model_path, key, torch_rt))  # the weights are read once
        except CnnkitError as e:  # an op the exporter cannot write, or a failed parity check: PyTorch it is
            record = {"runtime": "torch", "images_per_second": {}, "why": f"no ONNX export: {e}"}
            write_text_atomic(record_path, json.dumps(record, indent=2))
            return torch_rt, record["why"]
        probe = np.random.default_rng(0).integers(0, 256, (MEASURE_BATCH, *torch_rt.info.input.chw), dtype=np.uint8)
        speeds = {"torch": time_runtime(torch_rt, probe), "onnx": time_runtime(onnx_rt, probe)}
        record = {"runtime": max(speeds, key=speeds.get), "images_per_second": speeds, "cpus": cpu_count()}
        write_text_atomic(record_path, json.dumps(record, indent=2))
        chosen = onnx_rt if record["runtime"] == "onnx" else torch_rt
        return chosen, "measured now: " + ", ".join(f"{k} {v:,.0f} images/s" for k, v in speeds.items())
    how = record.get("why") or "measured before: " + ", ".join(f"{k} {v:,.0f} images/s"
                                                             for k, v in record["images_per_second"].items())
    if record["runtime"] == "onnx":
        return OnnxRuntime(cached_onnx(model_path, key)), how
    return TorchRuntime(model_path, info=info), how
