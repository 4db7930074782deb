"""`cnnkit predict` over a folder, whole process: this checkout against an earlier commit's, in one
run, interleaved, medians of --repeats.

    python -m benchmarks.inference.predict_speed [--baseline 09ed378] [--repeats 3]

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
import tempfile
from pathlib import Path

from benchmarks.common import CIFAR_CLASSES, ROOT, SHARED_DATA, interleaved, machine_header, model_file, run_cnnkit

FOLDER = SHARED_DATA / "cifar10-jpeg" / "test"
MODELS = {"seed-patch64 at 64x64": ("seed-patch64", 64), "seed-cifar10 at 32x32": ("seed-cifar10", 32)}


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
            model_file(model, name, 3, size, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], CIFAR_CLASSES)
            env = {**os.environ, "CNNKIT_DATA": str(tmp / f"cache-{name}")}
            old_env = {**env, "PYTHONPATH": str(worktree / "src")}
            new_env = {**env, "PYTHONPATH": str(ROOT / "src")}
            cmd = ["predict", str(model), str(FOLDER), "--out", str(tmp / "preds.csv")]
            cold = run_cnnkit(*cmd, env=new_env)
            runs = interleaved({"old": lambda: run_cnnkit(*cmd, env=old_env),
                                "new": lambda: run_cnnkit(*cmd, env=new_env)}, args.repeats)
            old, new = runs["old"], runs["new"]
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
    machine_header()
    main()
