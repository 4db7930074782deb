"""The notes' Keras MNIST network trained by TensorFlow's Keras and by cnnkit, side by side on this CPU.

  keras : the notes' code as written: Sequential Conv(32,3)-Pool-Conv(64,3)-Pool-Conv(64,3)-Dense(64)-
          Dense(10, softmax), Adam, batch 100, 3 epochs, validation_split=0.1, pixels / 255, in
          tensorflow-cpu (a virtualenv this script creates in benchmarks/.venv-tf, never a dependency
          of cnnkit). Epoch seconds from a Keras callback (validation included).
  cnnkit: `cnnkit train --data mnist --model seed-mnist-keras --batch-size 100 --optimizer adam --lr 0.001
          --schedule constant --warmup-epochs 0 --epochs 3 --no-report` as a whole command, with the
          default precision and with --precision fp32; epoch seconds from its history.csv (validation
          included).
Both train on the same 60,000 MNIST training images (54,000 after the 10% validation split), read from
../shared/data by cnnkit's loader. The figure compared is the median epoch time after the first
(Keras' first epoch also traces its graph; cnnkit's also warms its kernels), over interleaved repeats.

    python -m benchmarks.training.keras_vs_cnnkit [--repeats 2] [--epochs 3] [--data-dir ../shared/data]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import BENCHMARKS, SHARED_DATA, cnnkit_train, machine_header

TF_VENV = BENCHMARKS / ".venv-tf"
TF_PIN = "tensorflow-cpu==2.21.0"

KERAS_SCRIPT = r'''
import json, sys, time
import numpy as np
import tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers

data = np.load(sys.argv[1])
epochs = int(sys.argv[2])
x_train, y_train = data["x_train"][..., None] / 255.0, data["y_train"]   # (60000, 28, 28, 1) float64 as the notes
x_test, y_test = data["x_test"][..., None] / 255.0, data["y_test"]
model = keras.Sequential([
    keras.Input(shape=(28, 28, 1)),
    layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
    layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
    layers.Conv2D(64, (3, 3), activation="relu"),
    layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

class Timer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []
    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.t0)

timer = Timer()
t0 = time.perf_counter()
model.fit(x_train, y_train, epochs=epochs, batch_size=100, validation_split=0.1, verbose=0, callbacks=[timer])
fit_seconds = time.perf_counter() - t0
_, acc = model.evaluate(x_test, y_test, verbose=0)
print(json.dumps({"epoch_seconds": timer.seconds, "fit_seconds": fit_seconds, "test_accuracy": float(acc),
                  "tensorflow": tf.__version__, "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                                                             tf.config.threading.get_inter_op_parallelism_threads()]}))
'''


def tf_python() -> Path:
    """benchmarks/.venv-tf/bin/python with tensorflow-cpu installed (created on first use)."""
    py = TF_VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import tensorflow"], capture_output=True).returncode == 0:
        return py
    print(f"creating {TF_VENV} with {TF_PIN} (once; about 600 MB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TF_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", TF_PIN], check=True)
    return py


def run_keras(py: Path, npz: Path, epochs: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(KERAS_SCRIPT)
    r = subprocess.run([str(py), f.name, str(npz), str(epochs)], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cnnkit(data_dir: str, out: Path, epochs: int, precision: str) -> dict:
    args = ["--data", "mnist", "--data-dir", data_dir, "--model", "seed-mnist-keras", "--batch-size", "100",
            "--optimizer", "adam", "--lr", "0.001", "--schedule", "constant", "--warmup-epochs", "0",
            "--epochs", str(epochs), "--precision", precision]
    metrics, wall = cnnkit_train(args, out)
    with open(out / "history.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    return {"epoch_seconds": seconds, "fit_seconds": metrics["train_seconds"], "wall": wall,
            "test_accuracy": metrics["test_accuracy"], "precision": metrics["precision"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(SHARED_DATA))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    from cnnkit import load_dataset
    py = tf_python()
    ds = load_dataset("mnist", data_dir=args.data_dir, quiet=True)
    results: dict[str, list[dict]] = {"keras": [], "cnnkit auto": [], "cnnkit fp32": []}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "mnist.npz"
        train_x = torch_to_np(ds.train.images, ds.val.images)
        train_y = np.concatenate([ds.train.labels.numpy(), ds.val.labels.numpy()])
        np.savez(npz, x_train=train_x, y_train=train_y, x_test=ds.test.images[:, 0].numpy(),
                 y_test=ds.test.labels.numpy())
        for r in range(args.repeats):  # interleaved, so a drift in machine speed hits all three
            results["keras"].append(run_keras(py, npz, args.epochs))
            for precision in ("auto", "fp32"):
                results[f"cnnkit {precision}"].append(run_cnnkit(args.data_dir, Path(tmp) / f"{precision}-{r}",
                                                                 args.epochs, precision))
            for name, rs in results.items():
                print(f"  repeat {r}: {name:<12} epochs {' '.join(f'{s:.1f}' for s in rs[-1]['epoch_seconds'])} s, "
                      f"test {rs[-1]['test_accuracy']:.4f}", flush=True)
    print(f"tensorflow {results['keras'][0]['tensorflow']} (threads intra/inter {results['keras'][0]['threads']}), "
          f"cnnkit auto trained in {results['cnnkit auto'][0]['precision']}; {args.repeats} repeats, medians")
    print(f"{'trainer':<12} {'epoch s (after 1st)':>20} {'first epoch s':>14} {'fit s':>7} {'test acc':>9} "
          f"{'keras/this':>11}")
    later = lambda rs: statistics.median(s for x in rs  # noqa: E731
                                         for s in (x["epoch_seconds"][1:] or x["epoch_seconds"]))
    keras_epoch = later(results["keras"])
    for name, rs in results.items():
        e = later(rs)
        print(f"{name:<12} {e:>20.2f} {statistics.median(x['epoch_seconds'][0] for x in rs):>14.2f} "
              f"{statistics.median(x['fit_seconds'] for x in rs):>7.1f} "
              f"{statistics.median(x['test_accuracy'] for x in rs):>9.4f} "
              f"{keras_epoch / e:>10.2f}x")


def torch_to_np(*parts) -> np.ndarray:
    """uint8 (N, 1, 28, 28) tensors -> one (N, 28, 28) array."""
    return np.concatenate([p[:, 0].numpy() for p in parts])


if __name__ == "__main__":
    machine_header()
    main()
