"""What `--track` costs: the fast MNIST recipe (fast-mnist, 1 epoch, no report) trained by cnnkit's own train job
in this process, without a tracker, with TensorBoard and with MLflow (a SQLite store made before the first timed
run, so its one-off creation is left out), interleaved, medians of --repeats runs. Two figures each: the epoch's
seconds (history.csv: training and validation, where the per-step hooks run) and the whole call's (set-up, test,
the model file, and each tracker's own start and end: MLflow's run, params and artifacts).

Count first: an epoch is 211 steps of 256 images; TensorBoard writes 3 scalars a step (~630 events, tens of
microseconds each: ~20 ms against a ~4 s epoch, under 1%); MLflow buffers the steps and sends them in one batch
at the epoch's end, then at the end ~100 params, the metrics and 4-5 artifacts (a few hundred ms of SQLite
writes and file copies), a cost per run, not per step.

    python -m benchmarks.training.tracking_cost [--repeats 3] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from benchmarks.common import interleaved, machine_header, medians
from cnnkit.config import RECIPE_DIR, TrainConfig
from cnnkit.jobs.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None, help="folder with the MNIST files (default: cnnkit's cache)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cnnkit-tracking-cost-"))
    base = dataclasses.replace(TrainConfig.from_file(RECIPE_DIR / "fast-mnist.yaml"), epochs=1, report=False,
                               data_dir=args.data_dir, mlflow_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = iter(range(10_000))

    def run(track: str):
        def call() -> tuple[float, float]:
            start = time.perf_counter()
            result = train(dataclasses.replace(base, track=track, out=str(tmp / f"run{next(runs)}")), quiet=True,
                           echo=None)
            return sum(r["seconds"] for r in result.history), time.perf_counter() - start
        return call

    run("mlflow")()  # the MLflow database's creation and migration (about 2.5 s), and the data's first decode
    variants = {"none": run("none"), "tensorboard": run("tensorboard"), "mlflow": run("mlflow")}
    results = interleaved(variants, args.repeats)
    epoch = medians({k: [e for e, _ in v] for k, v in results.items()})
    whole = medians({k: [w for _, w in v] for k, v in results.items()})
    print(f"fast-mnist, 1 epoch of MNIST, no report; medians of {args.repeats} interleaved runs")
    print(f"{'tracker':<12} {'epoch s':>8} {'x none':>7} {'whole call s':>13} {'x none':>7}")
    for k in variants:
        print(f"{k:<12} {epoch[k]:8.2f} {epoch[k] / epoch['none']:7.3f} "
              f"{whole[k]:13.2f} {whole[k] / whole['none']:7.3f}")


if __name__ == "__main__":
    machine_header()
    main()
