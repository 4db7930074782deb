"""`cnnkit export` parity for the networks the issue names, in both formats: top-1 agreement and the
largest probability difference between PyTorch and the export on 256 images each (MNIST's
validation split for the 1-channel nets, CIFAR-10 test JPEGs of cats for the others).

    python -m benchmarks.inference.export_parity

The model files hold seeded random weights with BatchNorm statistics made non-trivial and a
calibration temperature of 1.7, as tests/test_export.py builds them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.common import CIFAR_CLASSES, SHARED_DATA, machine_header, model_file
from cnnkit.jobs.export import export_with_proof

NETS = [("seed-mnist-torch", 1, 28, "mnist"), ("seed-mnist-keras", 1, 28, "mnist"), ("seed-cifar10", 3, 32, None),
        ("seed-patch64", 3, 64, None), ("resnet18", 3, 32, None), ("efficientnet_lite0", 3, 64, None)]


def parity_model_file(folder: Path, name: str, channels: int, size: int, data: str | None) -> Path:
    """folder/<name>.safetensors: seeded random weights, BatchNorm statistics made non-trivial, calibration
    temperature 1.7 and, with data, the dataset it would have been trained on (its validation split is checked)."""
    extra = {"data": {"name": data}, "training": {"data_dir": str(SHARED_DATA.resolve())}} if data else {}
    return model_file(folder / f"{name}.safetensors", name, channels, size, [0.13] * channels, [0.31] * channels,
                      None if channels == 1 else CIFAR_CLASSES, batchnorm_pass=True,
                      calibration={"temperature": 1.7}, **extra)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cnnkit-export-parity-"))
    os.environ.setdefault("CNNKIT_DATA", str(tmp / "cache"))
    cats = [str(SHARED_DATA / "cifar10-jpeg" / "test" / "cat")]
    print(f"{'network':<20} {'format':<13} {'images':>6} {'agreement':>10} {'max |diff|':>11}")
    for name, channels, size, data in NETS:
        path = parity_model_file(tmp, name, channels, size, data)
        for fmt in ("onnx", "torch-export"):
            r = export_with_proof(path, fmt, image_paths=None if data else cats)
            print(f"{name:<20} {fmt:<13} {r['n']:>6} {r['agreement']:>10.2%} {r['max_abs_diff']:>11.2e}")


if __name__ == "__main__":
    machine_header()
    main()
