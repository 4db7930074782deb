"""`cnnkit predict` over a folder, whole process: this checkout against an earlier commit's, in one
run, interleaved, medians of --repeats.

    python benchmarks/predict_speed.py [--baseline 09ed378] [--repeats 3]

Both classify the 10,000 JPEGs of ../shared/data/cifar10-jpeg/test with the same model file
(seeded random weights: speed does not depend on them) and write --out preds.csv; the baseline's
stdout (it printed every row even with --out) goes to a pipe that is read and dropped, as `> file`
would. The baseline runs from a `git worktree` of its commit with this checkout's virtual
environment. "cold" is this checkout's first run with an empty cache: it exports the model to ONNX
and measures both runtimes once; the other runs read that record.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODELS = {"seed-patch64 at 64x64": ("seed-patch64", 64), "seed-cifar10 at 32x32": ("seed-cifar10", 32)}


def make_model(name: str, size: int, path: Path) -> None:
    import torch

    import cnnkit
    from cnnkit.models.registry import architecture_record, build_model, get_spec
    torch.manual_seed(0)
    model = build_model(get_spec(name), 10, in_channels=3, image_size=(size, size))
    cnnkit.save_model(path, model, {"class_names": CLASSES, "input": {"channels": 3, "height": size, "width": size},
                                    "preprocessing": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "scale": 255,
                                                      "resize": "shorter-side-center-crop"},
                                    "architecture": architecture_record(model)})


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="09ed378", help="the commit to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cnnkit-predict-bench-"))
    worktree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline], check=True,
                   capture_output=True)
    files = sum(1 for _ in FOLDER.rglob("*.jpg"))
    results = {}
    try:
        for label, (name, size) in MODELS.items():
            model = tmp / f"{name}.safetensors"
            make_model(name, size, model)
            env = {**os.environ, "CNNKIT_DATA": str(tmp / f"cache-{name}")}
            old_env = {**env, "PYTHONPATH": str(worktree / "src")}
            new_env = {**env, "PYTHONPATH": str(ROOT / "src")}
            cmd = [sys.executable, "-m", "cnnkit", "predict", str(model), str(FOLDER), "--out", str(tmp / "preds.csv")]
            cold = timed(cmd, new_env)
            old, new = [], []
            for _ in range(args.repeats):
                old.append(timed(cmd, old_env))
                new.append(timed(cmd, new_env))
            record = next((tmp / f"cache-{name}" / "exports").glob("*.runtime.json"))
            results[label] = {"files": files, "baseline_seconds": statistics.median(old),
                              "seconds": statistics.median(new), "cold_seconds": cold,
                              "runtime": json.loads(record.read_text())}
            r = results[label]
            r["speedup"] = r["baseline_seconds"] / r["seconds"]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"cnnkit predict over {files:,} CIFAR-10 JPEGs, whole process, medians of {args.repeats}; "
          f"baseline {args.baseline}; {os.cpu_count()} CPUs")
    for label, r in results.items():
        speeds = ", ".join(f"{k} {v:,.0f}/s" for k, v in r["runtime"]["images_per_second"].items())
        print(f"{label:22} baseline {r['baseline_seconds']:5.2f} s ({files / r['baseline_seconds']:6,.0f} images/s) | "
              f"now {r['seconds']:5.2f} s ({files / r['seconds']:6,.0f} images/s) | {r['speedup']:.2f}x | "
              f"cold first run {r['cold_seconds']:.2f} s | runtime {r['runtime']['runtime']} ({speeds})")


if __name__ == "__main__":
    from cnnkit.hardware import machine_line
    print(machine_line(), flush=True)  # the machine every figure below was measured on
    main()
