"""fp32 against int8 ONNX on this CPU, side by side in one run: images/s of each file in onnxruntime
(and in OpenVINO where it is installed), medians of --repeats interleaved passes, with what int8 did
to test accuracy (quantize.export_int8's proof: the same numbers `cnnkit export --int8` records).

    python -m benchmarks.inference.int8 --runs RUN_FOLDER... [--repeats 5] [--keep-float first]

Trained runs give the accuracy change; the architectures named by --untrained (default resnet18 at
32x32 and efficientnet_lite0 at 224x224, with seeded random weights; EfficientNet-Lite0 with its
ImageNet weights where installed) give speed only, calibrated on random pixels. The NOTES figures:

    cnnkit train --data mnist --model seed-mnist-torch --epochs 2 --out /tmp/q8runs/seed-mnist-torch
    cnnkit train --recipe fast --data mnist --out /tmp/q8runs/fast-mnist
    cnnkit train --data ../shared/data/cifar10-jpeg --model seed-cifar10 --epochs 2 --out /tmp/q8runs/seed-cifar10
    python -m benchmarks.inference.int8 --runs /tmp/q8runs/*
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_header
from cnnkit.export import export
from cnnkit.modelfile import ModelInfo, load_model
from cnnkit.models.registry import architecture_record, build_model
from cnnkit.onnxrun import OnnxRunner
from cnnkit.quantize import export_int8, quantize_onnx

UNTRAINED = {"resnet18": (3, 32), "efficientnet_lite0": (3, 224)}
BATCH = 64  # images per call, as predict and serve hand them over (onnxrun.BATCH)


def openvino_runner(path: Path):
    """A callable uint8 (N, H, W, C) -> first output in OpenVINO, or None where it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # not bf16
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[compiled.output(0)]


def images_per_second(runners: dict, x: np.ndarray, repeats: int) -> dict:
    """Median images/s of each runner over `repeats` rounds, the runners interleaved within a round
    (so a busy moment of the machine falls on all of them alike)."""
    times = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        run(x[:BATCH])
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for i in range(0, len(x), BATCH):
                run(x[i:i + BATCH])
            times[name].append(time.perf_counter() - start)
    return {name: len(x) / float(np.median(t)) for name, t in times.items()}


def untrained(name: str, c: int, h: int) -> tuple[torch.nn.Module, ModelInfo]:
    from cnnkit.models.pretrained import load_pretrained, package_available

    torch.manual_seed(0)
    model, pretrained = build_model(name, 10, in_channels=c, image_size=(h, h)), None
    if package_available(name):  # ImageNet weights installed (ranges as a real backbone's)
        load_pretrained(model, name)
        pretrained = "ImageNet"
    info = ModelInfo.from_dict({"class_names": [str(i) for i in range(10)],
                                "input": {"channels": c, "height": h, "width": h},
                                "preprocessing": {"mean": [0.5] * c, "std": [0.25] * c},
                                "architecture": architecture_record(model.eval()),
                                "pretrained": pretrained and {"weights": pretrained}})
    return model.eval(), info


def measure(label: str, fp32: Path, int8: Path, c: int, h: int, args, change: str) -> None:
    runners = {"ort fp32": OnnxRunner(fp32), "ort int8": OnnxRunner(int8)}
    runners = {k: (lambda r: lambda b: r(b, layout="NHWC"))(r) for k, r in runners.items()}
    # images per timed pass: about --seconds of fp32 work, in whole batches
    x = np.random.default_rng(0).integers(0, 256, (BATCH, h, h, c), dtype=np.uint8)
    runners["ort fp32"](x)
    start = time.perf_counter()
    runners["ort fp32"](x)
    n = int(np.clip(BATCH * args.seconds / (time.perf_counter() - start), BATCH, 8192)) // BATCH * BATCH
    x = np.random.default_rng(0).integers(0, 256, (n, h, h, c), dtype=np.uint8)
    for kind, path in (("ov fp32", fp32), ("ov int8", int8)):
        ov = openvino_runner(path)
        if ov is not None:
            runners[kind] = ov
    speed = images_per_second(runners, x, args.repeats)
    ratio = speed["ort int8"] / speed["ort fp32"]
    cells = "  ".join(f"{k} {v:>9,.0f}" for k, v in speed.items())
    print(f"{label:<34} {cells}  int8/fp32 (ort) {ratio:.2f}x  [{n} images a pass]  {change}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="*", default=[], help="trained run folders (the accuracy change needs them)")
    ap.add_argument("--untrained", nargs="*", default=list(UNTRAINED), help="architectures timed with random weights")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="fp32 seconds per timed pass (sets the image count)")
    ap.add_argument("--keep-float", nargs="*", default=None, choices=["first", "last"],
                    help="as cnnkit export's (default: chosen as it chooses; nothing after the flag: none)")
    args = ap.parse_args()
    keep = None if args.keep_float is None else tuple(args.keep_float)
    tmp = Path(tempfile.mkdtemp(prefix="cnnkit-int8-"))
    print(f"images/s, batches of {BATCH}, median of {args.repeats}; int8 keeps "
          f"{'what export chooses' if keep is None else keep or 'nothing'} in fp32")
    for run in args.runs:
        model, info = load_model(run)
        c, h, _ = info.input.chw
        probe = torch.randint(0, 256, (64, c, h, h), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        int8 = tmp / f"{Path(run).name}.int8.onnx"
        result = export_int8(model, info, int8, probe, "random", max_drop=100, keep_float=keep)
        proof = result["proof"]
        fp32 = export(model, info, "onnx", tmp / f"{Path(run).name}.onnx")
        change = (f"test {proof['measure']} {100 * proof['accuracy_fp32']:.2f}% -> {100 * proof['accuracy_int8']:.2f}% "
                  f"({0.0 - proof['drop_points']:+.2f} points, n={proof['n']}, "
                  f"McNemar p={proof['mcnemar_p_value']:.2g}; "
                  f"fp32 kept: {result['int8']['kept_float'] or 'none'})")
        measure(f"{info.name} ({info.data_name})", fp32, int8, c, h, args, change)
    for name in args.untrained:
        c, h = UNTRAINED[name]
        model, info = untrained(name, c, h)
        fp32 = export(model, info, "onnx", tmp / f"{name}.onnx")
        calibration = np.random.default_rng(1).integers(0, 256, (64, h, h, c), dtype=np.uint8)
        int8 = tmp / f"{name}.int8.onnx"
        quantize_onnx(fp32, int8, calibration, keep or ())
        weights = "ImageNet weights" if info.pretrained else "random weights"
        measure(f"{name} {h}x{h} ({weights})", fp32, int8, c, h, args, "accuracy: not measured (untrained)")


if __name__ == "__main__":
    machine_header()
    main()
