"""`cnnkit compare` of binary and multi-label models: each model decided as `cnnkit predict`
decides (its own threshold, its own per-label thresholds), the figures against NumPy and
scikit-learn on decisions computed here from the model files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

import cnnkit
from cnnkit.preprocess import Preprocess
from conftest import run_main

pytestmark = pytest.mark.slow  # trains or serves the shared fixtures' models: out of the fast subset


def test_a_binary_model_against_itself_differs_by_nothing(binary_run, tmp_path):
    run, labels = binary_run
    model, info = cnnkit.load_model(run)
    test = cnnkit.load_dataset(str(labels), image_size=28, channels=1, seed=0, quiet=True).test
    with torch.no_grad():
        z = model.eval()(Preprocess.from_info(info)(test.images))[:, 0]  # (N,) the one logit
    decided = (torch.sigmoid(z / info.temperature) >= info.thresholds[0]).long().numpy()  # its threshold's class
    truth = test.labels.numpy()
    r = run_main("compare", str(run), str(run), "--json", "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["task"] == "binary" and result["n"] == len(truth)
    assert result["accuracy_a"] == result["accuracy_b"] == pytest.approx((decided == truth).mean())
    assert result["difference"] == 0 and result["difference_ci95"] == [0, 0]
    assert (result["only_a_right"], result["only_b_right"]) == (0, 0)
    assert (result["both_right"], result["both_wrong"]) == ((decided == truth).sum(), (decided != truth).sum())
    assert result["mcnemar_p_value"] == 1 and not result["significant"]
    recall = [(decided[truth == k] == k).mean() for k in (0, 1)]
    assert [c["recall_a"] for c in result["per_class"]] == pytest.approx(recall)
    assert [c["recall_b"] for c in result["per_class"]] == pytest.approx(recall)
    assert "not significantly different" in result["verdict"]


def label_sets(run, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), label sets at the model file's thresholds (N, K) bool) in PyTorch eager."""
    model, info = cnnkit.load_model(run)
    with torch.no_grad():
        probs = torch.sigmoid(model.eval()(Preprocess.from_info(info)(images))).numpy()
    return probs, probs >= np.array(info.thresholds)


def test_two_multi_label_models_are_paired_on_exact_label_sets(multi_label_run, tmp_path):
    run_a, labels = multi_label_run
    run_b = tmp_path / "b"  # a second, weaker model: 1 epoch instead of 6
    r = run_main("train", "--data", str(labels), "--recipe", "multi-mnist", "--epochs", "1", "--out", str(run_b),
                 "--no-report", "--quiet")
    assert r.returncode == 0, r.stderr
    test = cnnkit.load_dataset(str(labels), image_size=56, channels=1, seed=0, quiet=True).test
    truth = test.labels.numpy() > 0.5  # (N, K)
    (probs_a, set_a), (probs_b, set_b) = label_sets(run_a, test.images), label_sets(run_b, test.images)
    right_a, right_b = (set_a == truth).all(1), (set_b == truth).all(1)
    r = run_main("compare", str(run_a), str(run_b), "--json", "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["task"] == "multi-label" and result["measure"] == "subset accuracy" and result["n"] == len(truth)
    assert [result["accuracy_a"], result["accuracy_b"]] == pytest.approx([right_a.mean(), right_b.mean()])
    assert result["difference"] == pytest.approx(right_a.mean() - right_b.mean())
    assert (result["only_a_right"], result["only_b_right"], result["both_right"], result["both_wrong"]) == (
        (right_a & ~right_b).sum(), (~right_a & right_b).sum(), (right_a & right_b).sum(), (~right_a & ~right_b).sum())
    assert result["only_a_right"] + result["only_b_right"] > 0  # two different models, disagreeing somewhere
    assert [row["f1_a"] for row in result["per_class"]] == pytest.approx(f1_score(truth, set_a, average=None))
    assert [row["f1_b"] for row in result["per_class"]] == pytest.approx(f1_score(truth, set_b, average=None))
    for key, probs in (("mean_average_precision_a", probs_a), ("mean_average_precision_b", probs_b)):
        assert result[key] == pytest.approx(average_precision_score(truth, probs, average="macro"), abs=1e-6)
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "F1 per label" in html and "subset accuracy" in html and "mAP" in html


def test_models_of_different_tasks_are_refused_in_one_line(binary_run, multi_label_run, tmp_path):
    r = run_main("compare", str(binary_run[0]), str(multi_label_run[0]), "--out", str(tmp_path / "cmp"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "binary model" in r.stderr and "multi-label" in r.stderr and "same task" in r.stderr
    assert not (tmp_path / "cmp").exists()
