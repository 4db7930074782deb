"""Accuracy on the real MNIST, the issue's figures: slow (about a minute each on 2 cores)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, shared


def train_mnist(run, model: str) -> dict:
    """Two epochs of `model` on MNIST into `run`: the metrics of `cnnkit train --json`."""
    r = run_cli("train", "--data", "mnist", "--data-dir", str(shared()), "--model", model, "--epochs", "2",
                "--out", str(run), "--quiet", "--json", "--no-report")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    print(f"{model}: test accuracy {metrics['test_accuracy']:.4f} in {metrics['train_seconds']:.0f} s")
    assert metrics["test_split"] == "test" and metrics["test_n"] == 10000
    return metrics


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    """The notes' Keras network, two epochs: its run folder and metrics (shared by two tests)."""
    run = tmp_path_factory.mktemp("keras") / "run"
    return run, train_mnist(run, "seed-mnist-keras")


@pytest.mark.slow
@pytest.mark.heavy  # with its neighbour, ~80 s on the shared Keras run: CI runs it after the suite
def test_mnist_two_epochs_reaches_the_notes_accuracy(tmp_path, keras_run):
    assert train_mnist(tmp_path / "run", "seed-mnist-torch")["test_accuracy"] >= 0.990
    assert keras_run[1]["test_accuracy"] >= 0.988


@pytest.mark.slow
def test_mnist_fast_recipe_reaches_the_notes_accuracy(fast_mnist_run):
    """`--recipe fast` reaches the notes' 99.14% in its 3 epochs (bf16: seeds 0-4 gave 99.17-99.28%; fp32, as
    on a CPU without native bf16, seed 0 gave 99.12%): allowed one standard error (0.1 point) below it."""
    _, metrics = fast_mnist_run
    print(f"fast-mnist: test accuracy {metrics['test_accuracy']:.4f} in {metrics['train_seconds']:.0f} s")
    assert metrics["test_n"] == 10000 and metrics["test_accuracy"] >= 0.9914 - 0.001


@pytest.mark.slow
@pytest.mark.heavy  # with its neighbour, ~80 s on the shared Keras run: CI runs it after the suite
def test_tta_and_temperature_on_mnist(keras_run):
    """TTA never lowers MNIST test accuracy by more than noise; both figures are reported."""
    run, _ = keras_run
    r = run_cli("evaluate", str(run), "--data", "mnist", "--data-dir", str(shared()), "--tta", "--json")
    m = json.loads(r.stdout)
    print(f"MNIST seed-mnist-keras: accuracy {m['accuracy']:.4f}, with TTA {m['tta_accuracy']:.4f}; "
          f"ECE {m['ece_uncalibrated']:.4f} -> {m['ece']:.4f} at T={m['temperature']:.3f}")
    # one standard error of a 99% accuracy on 10,000 images is 0.1 point: allow two
    assert m["tta_accuracy"] >= m["accuracy"] - 0.002
    assert sum(map(sum, m["confusion_matrix"])) == 10_000


@pytest.mark.slow
@pytest.mark.heavy
def test_temperature_scaling_lowers_ece_on_cifar10(tmp_path):
    run = tmp_path / "run"
    data = ["--data", "cifar10", "--data-dir", str(shared("cifar10-subset-bin"))]
    # 7 epochs: T 1.31, ECE 0.109 -> 0.039 (EPYC, bf16); 5 gave T 1.10, too near the bound; 10 cost 15 s more
    r = run_cli("train", *data, "--model", "seed-cifar10", "--epochs", "7", "--out", str(run), "--quiet",
                "--no-report")
    assert r.returncode == 0, r.stderr
    m = json.loads(run_cli("evaluate", str(run), *data, "--json").stdout)
    print(f"CIFAR-10 subset seed-cifar10: ECE {m['ece_uncalibrated']:.4f} -> {m['ece']:.4f} "
          f"at T={m['temperature']:.3f}")
    assert m["temperature"] > 1  # the network is over-confident after training
    assert m["ece"] < m["ece_uncalibrated"]


@pytest.mark.slow
@pytest.mark.heavy
def test_pixel_svm_baseline_on_mnist_loses_to_the_cnn(tmp_path):
    """The notes' point: the pre-deep-learning linear SVM on pixels against the CNN (>= 99.0%). On 14x14
    pixels: a quarter of the features, a quarter of the fitting time, the same point."""
    r = run_cli("train", "--data", "mnist", "--data-dir", str(shared()), "--model", "svm", "--image-size", "14",
                "--out", str(tmp_path / "svm"), "--quiet", "--json", "--no-report")
    assert r.returncode == 0, r.stderr
    svm = json.loads(r.stdout)["metrics"]["test_accuracy"]
    print(f"MNIST linear SVM on pixels: {svm:.4f} (the CNNs above: >= 0.99)")
    assert 0.88 < svm < 0.985
