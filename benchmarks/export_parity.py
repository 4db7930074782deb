"""`cnnkit export` parity for the networks the issue names, in both formats: top-1 agreement and the
largest probability difference between PyTorch and the export on 256 images each (MNIST's
validation split for the 1-channel nets, CIFAR-10 test JPEGs of cats for the others).

    python benchmarks/export_parity.py

The model files hold seeded random weights with BatchNorm statistics made non-trivial and a
calibration temperature of 1.7, as tests/test_export.py builds them.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_export import model_file  # noqa: E402  (the tests' model files)

from cnnkit.jobs.export import export_with_proof  # noqa: E402

NETS = [("seed-mnist-torch", 1, 28, "mnist"), ("seed-mnist-keras", 1, 28, "mnist"), ("seed-cifar10", 3, 32, None),
        ("seed-patch64", 3, 64, None), ("resnet18", 3, 32, None), ("efficientnet_lite0", 3, 64, None)]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cnnkit-export-parity-"))
    os.environ.setdefault("CNNKIT_DATA", str(tmp / "cache"))
    cats = [str(ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test" / "cat")]
    print(f"{'network':<20} {'format':<13} {'images':>6} {'agreement':>10} {'max |diff|':>11}")
    for name, channels, size, data in NETS:
        path = model_file(tmp, name, channels, size, data)
        for fmt in ("onnx", "torch-export"):
            r = export_with_proof(path, fmt, image_paths=None if data else cats)
            print(f"{name:<20} {fmt:<13} {r['n']:>6} {r['agreement']:>10.2%} {r['max_abs_diff']:>11.2e}")


if __name__ == "__main__":
    from cnnkit.hardware import machine_line
    print(machine_line(), flush=True)  # the machine every figure below was measured on
    main()
