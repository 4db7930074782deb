"""Accuracy on the real MNIST, the issue's figures: slow (about a minute each on 2 cores)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, shared


@pytest.mark.slow
@pytest.mark.parametrize("model,target", [("seed-mnist-torch", 0.990), ("seed-mnist-keras", 0.988)])
def test_mnist_two_epochs_reaches_the_notes_accuracy(tmp_path, model, target):
    r = run_cli("train", "--data", "mnist", "--data-dir", str(shared()), "--model", model, "--epochs", "2",
                "--out", str(tmp_path / "run"), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    print(f"{model}: test accuracy {metrics['test_accuracy']:.4f} in {metrics['train_seconds']:.0f} s")
    assert metrics["test_split"] == "test" and metrics["test_n"] == 10000
    assert metrics["test_accuracy"] >= target
