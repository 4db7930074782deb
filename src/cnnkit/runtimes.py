"""The runtimes a model file runs on (PyTorch, its ONNX export in onnxruntime, or its int8 ONNX
export), and the choice between them: the one measured fastest for this model on this machine.
`cnnkit predict` (jobs/predict.py) and `cnnkit serve` use it.

- The first large job exports the model to ONNX in the cache (parity-checked), times onnxruntime
  against PyTorch on the same batch and records the winner; later jobs read the record. On 2 CPU
  cores in fp32, onnxruntime ran seed-cifar10 1.9x and seed-mnist-torch 1.7x faster than PyTorch,
  seed-patch64 about as fast (`python -m benchmarks.inference.runtimes`, batches of 64).
- int8 takes part when it is allowed: the model's int8 export (quantize.py, cached like the fp32
  one) must have lost at most quantize.MAX_ACCURACY_DROP points of test accuracy, which needs the
  model's own data on this machine (calibration images and the test split). Where it cannot be
  built or lost too much, the record says why and the float runtimes compete alone.
- With the ONNX runtime PyTorch is never imported (about 1 s of a short job): this module, the
  decoder and the model file's metadata reader import numpy, Pillow and safetensors only.

Probabilities are fp32 and calibrated on every runtime (the export includes the temperature), equal
to 1e-4 between runtimes (the export's parity check). A multi-label model's are its sigmoids (N, K)
on every runtime; the caller decides with info.thresholds (the ONNX file's metadata carries them).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CnnkitError
from .modelfile import ModelInfo, read_info
from .onnxrun import EXPORT_TASKS
from .utils import cache_dir, hash_file, write_text_atomic

RUNTIMES = ("auto", "torch", "onnx", "int8", "openvino", "openvino-int8")
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
    """An ONNX export in onnxruntime; named int8 when the file is an int8 export (its record says so)."""

    def __init__(self, onnx_path: Path):
        from .onnxrun import OnnxRunner
        self.runner = OnnxRunner(onnx_path)
        self.info = ModelInfo.from_export(self.runner.meta, where=str(onnx_path))
        self.name = "int8" if "int8" in (self.runner.meta or {}) else "onnx"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.runner(images, layout="NCHW").astype(np.float64)


class OpenVinoRuntime:
    """An ONNX export (fp32, or the int8 one) compiled by OpenVINO for this CPU: the optional extra
    `cnnkit[openvino]`, which takes part in `auto` where it is installed."""

    def __init__(self, onnx_path: Path, name: str, info: ModelInfo):
        try:
            import openvino
        except ImportError:
            raise CnnkitError(f"--runtime {name} needs OpenVINO: pip install 'cnnkit[openvino]'") from None
        self.name, self.info = name, info  # the caller's: the model file's, or the ONNX file's record
        try:
            # f32 asked for: on a CPU with native bf16 OpenVINO's default runs fp32 graphs in bf16 (probabilities
            # 1e-3 off); the int8 graph's integer kernels are unaffected
            self.compiled = openvino.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:  # an op OpenVINO cannot run: one line, and `auto` goes on without it
            raise CnnkitError(f"OpenVINO cannot compile {onnx_path.name}: {str(e).splitlines()[0][:200]}") from None
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> np.ndarray:  # uint8 (N, C, H, W) -> (N, K), the first output
        from .onnxrun import BATCH
        x = images.transpose(0, 2, 3, 1)
        parts = [self.request.infer({0: np.ascontiguousarray(x[i:i + BATCH])})[self.compiled.output(0)]
                 for i in range(0, len(x), BATCH)]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, self.info.num_classes))


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401  (only whether it imports)
        return True
    except ImportError:
        return False


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


def int8_name(key: str) -> str:
    """The cached int8 export's file stem: the model's sha256 and the quantizer's version (a new
    onnxruntime quantizes, and is tested, afresh)."""
    from .quantize import q_version

    return f"{key}.int8-ort{q_version()}"


def cached_int8(model_path: Path, key: str, loaded: TorchRuntime | None = None) -> Path:
    """The model's int8 ONNX export in the cache, written on first use where its accuracy proof passes
    (quantize.export_int8). An accuracy refusal is remembered beside it, so later jobs do not quantize
    and test again; other failures (the data not on this machine: it is never downloaded for this) are
    raised and tried again next time."""
    from .quantize import Int8Refused

    stem = int8_name(key)
    int8_path, refused = exports_dir() / f"{stem}.onnx", exports_dir() / f"{stem}-refused.txt"
    if refused.exists():
        raise Int8Refused(refused.read_text())
    if not int8_path.exists():
        import torch

        from .modelfile import load_model
        from .quantize import export_int8
        model, info = (loaded.model, loaded.info) if loaded else load_model(model_path)
        probe = torch.randint(0, 256, (64, *info.input.chw), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8)
        try:
            export_int8(model, info, int8_path, probe, "64 random images", download=False)
        except Int8Refused as e:
            message = f"its int8 export was refused ({e}); `cnnkit export --int8 --max-accuracy-drop P` writes one"
            write_text_atomic(refused, message)
            raise Int8Refused(message) from None
    return int8_path


def time_runtime(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, repeats: int = 3) -> float:
    """Images per second, the best of `repeats` passes after one warm-up."""
    run(images)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def choose_runtime(model_path: Path, info: ModelInfo | None, runtime: str, tta: bool, measure: bool,
                   float_only: bool = False):
    """(runtime object, how it was chosen). measure: with `auto` and no record yet, export and
    time every runtime now (a large job, or a server) rather than use PyTorch for this job.
    float_only: leave the int8 runtimes out (conformal sets are calibrated on float probabilities)."""
    if runtime not in RUNTIMES:
        raise CnnkitError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if float_only and "int8" in runtime:
        raise CnnkitError(f"--runtime {runtime} changes the probabilities the prediction sets were calibrated on: "
                          "use a float runtime (auto, torch, onnx, openvino) with --coverage")
    if model_path.suffix == ".onnx":
        return onnx_file_runtime(model_path, runtime, tta)
    if info is not None and info.task not in EXPORT_TASKS:  # a task the export writes no graph for, so far
        if runtime == "onnx":
            raise CnnkitError(f"a {info.task} model has no ONNX export yet: use --runtime torch (or auto)")
        return TorchRuntime(model_path, tta, info), f"a {info.task} model runs in PyTorch (no ONNX export yet)"
    if runtime == "torch" or tta:
        return TorchRuntime(model_path, tta, info), "asked" if runtime == "torch" else "--tta runs in PyTorch"
    if not onnxruntime_available():
        if runtime != "auto":
            raise CnnkitError(f"--runtime {runtime} runs an ONNX export, which needs onnxruntime: "
                              "pip install 'cnnkit[export]'")
        return TorchRuntime(model_path, info=info), "onnxruntime is not installed"
    key = hash_file(model_path, "sha256")  # the cache's key: the model file's bytes
    if runtime != "auto":
        return named_runtime(runtime, model_path, key, info), "asked"
    # auto: the runtime measured fastest for this model file on this machine, measured once
    record_path = exports_dir() / f"{key}.runtime.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and "int8" not in record and measure:
        record = None  # measured before int8 took part: measure again
    candidates = {}
    if record is None:
        if not measure:
            return TorchRuntime(model_path, info=info), f"fewer than {MEASURE_FROM_FILES} files: not worth measuring"
        record, candidates = measure_runtimes(model_path, info, key, record_path)
        how = "measured now"
    else:
        how = "measured before"
    speeds = {k: v for k, v in record["images_per_second"].items() if not (float_only and "int8" in k)}
    name = max(speeds, key=speeds.get) if speeds else "torch"
    how = record.get("why") or f"{how}: " + ", ".join(f"{k} {v:,.0f} images/s" for k, v in speeds.items())
    if name in candidates:
        return candidates[name], how
    try:
        return named_runtime(name, model_path, key, info), how
    except CnnkitError as e:  # e.g. the cached int8 file deleted and the data gone since: the float export
        if "int8" not in name:
            raise
        return OnnxRuntime(cached_onnx(model_path, key)), f"{how}; {name} unavailable now ({e})"


def onnx_file_runtime(path: Path, runtime: str, tta: bool):
    """An .onnx file from `cnnkit export` (fp32 or int8) runs as it is, in onnxruntime or OpenVINO."""
    if tta:
        raise CnnkitError("--tta needs the model file (PyTorch); an ONNX export has one view built in")
    if runtime == "torch":
        raise CnnkitError("an ONNX file runs in onnxruntime or OpenVINO: --runtime auto, onnx or openvino")
    if runtime.startswith("openvino"):
        rt = OnnxRuntime(path)  # reads the record: whether the file is int8, and the ModelInfo
        return OpenVinoRuntime(path, "openvino-int8" if rt.name == "int8" else "openvino", rt.info), \
            "an ONNX file, asked"
    return OnnxRuntime(path), "an ONNX file"


def named_runtime(name: str, model_path: Path, key: str, info: ModelInfo | None):
    if name == "torch":
        return TorchRuntime(model_path, info=info)
    if name == "onnx":
        return OnnxRuntime(cached_onnx(model_path, key))
    if name == "int8":
        return OnnxRuntime(cached_int8(model_path, key))
    info = info or read_info(model_path)
    if name == "openvino":
        return OpenVinoRuntime(cached_onnx(model_path, key), name, info)
    return OpenVinoRuntime(cached_int8(model_path, key), name, info)  # openvino-int8


def measure_runtimes(model_path: Path, info: ModelInfo | None, key: str, record_path: Path) -> tuple[dict, dict]:
    """Export, time every runtime allowed on the same batch, and record the speeds: (record, runtimes)."""
    torch_rt = TorchRuntime(model_path, info=info)
    try:
        candidates = {"torch": torch_rt, "onnx": OnnxRuntime(cached_onnx(model_path, key, torch_rt))}
    except CnnkitError as e:  # an op the exporter cannot write, or a failed parity check: PyTorch it is
        record = {"runtime": "torch", "images_per_second": {}, "why": f"no ONNX export: {e}", "int8": "no export"}
        write_text_atomic(record_path, json.dumps(record, indent=2))
        return record, {"torch": torch_rt}
    try:
        candidates["int8"] = OnnxRuntime(cached_int8(model_path, key, torch_rt))
        int8_note = None
    except CnnkitError as e:  # no data to calibrate and test on, or too much accuracy lost
        int8_note = f"int8 not used: {e}"
    if openvino_available():  # the optional extra: each export it can compile takes part
        paths = {"openvino": cached_onnx(model_path, key)}
        if "int8" in candidates:
            paths["openvino-int8"] = cached_int8(model_path, key)
        for name, path in paths.items():
            with contextlib.suppress(CnnkitError):
                candidates[name] = OpenVinoRuntime(path, name, torch_rt.info)
    probe = np.random.default_rng(0).integers(0, 256, (MEASURE_BATCH, *torch_rt.info.input.chw), dtype=np.uint8)
    speeds = {name: time_runtime(rt, probe) for name, rt in candidates.items()}
    record = {"runtime": max(speeds, key=speeds.get), "images_per_second": speeds, "cpus": cpu_count(),
              "int8": int8_note or "measured"}
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return record, candidates
