"""The binary task (--task binary): one logit for two classes, its loss equal to the two-class
softmax's, a threshold chosen on validation and kept in the model file, ROC and PR figures equal to
scikit-learn's, and accuracy as good as the two-class softmax model's on the same data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from cnnkit.multilabel import binary_metrics
from cnnkit.multilabel import roc_curve as our_roc_curve
from conftest import BINARY_ARGS, run_main


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_binary_figures_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, 500)
    p = np.round(np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0, 1), 2)  # rounded: many ties
    fpr, tpr, thresholds = our_roc_curve(p, truth)
    want_fpr, want_tpr, want_thresholds = roc_curve(truth, p, drop_intermediate=False)
    assert np.allclose(fpr, want_fpr) and np.allclose(tpr, want_tpr)
    assert np.allclose(thresholds[1:], want_thresholds[1:])  # scikit-learn's first is max + 1 or inf, by version
    t = float(rng.uniform(0.3, 0.7))
    m = binary_metrics(p, truth, t)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(truth, p), abs=1e-12)
    assert m["average_precision"] == pytest.approx(average_precision_score(truth, p), abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(truth, p >= t).tolist()
    assert m["accuracy"] == pytest.approx(np.mean((p >= t) == truth))
    assert binary_metrics(p, np.zeros_like(truth), t)["roc_auc"] is None  # one class: no curve to measure


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_binary_loss_is_the_two_class_cross_entropy(smoothing, weighted):
    """One logit z is the two-class model with logits (0, z): the same loss, label smoothing and class weights."""
    from cnnkit.training.epoch import EpochSettings, batch_loss
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 1, generator=g) * 3, torch.randint(0, 2, (64,), generator=g)
    weight = torch.tensor([0.7, 1.9]) if weighted else None
    s = EpochSettings(batch_size=64, lr_fn=lambda i: 0.0, preprocess=None, task="binary", label_smoothing=smoothing,
                      class_weight=weight)
    two = torch.cat([torch.zeros_like(z), z], 1)
    want = F.cross_entropy(two, y, weight=weight, label_smoothing=smoothing)
    assert batch_loss(z, y, s).item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.slow
def test_a_binary_run_matches_softmax_and_reports_scikit_learns_figures(tmp_path, binary_run):
    """4 against 9, MNIST's most confused pair: the binary model's one logit, its threshold from
    validation in the model file, its test figures equal to scikit-learn's on the saved model, and
    accuracy within a point of the two-class softmax model trained alike."""
    from cnnkit import load_dataset, load_model
    from cnnkit.inference import predict_logits
    from cnnkit.preprocess import Preprocess
    run, labels = binary_run
    r = run_main("train", *BINARY_ARGS[:-2], "--data", str(labels), "--out", str(tmp_path / "softmax"))
    assert r.returncode == 0, r.stderr
    softmax = json.loads((tmp_path / "softmax" / "metrics.json").read_text())
    binary = json.loads((run / "metrics.json").read_text())
    print({k: binary[k] for k in ("test_accuracy", "test_accuracy_at_half", "test_threshold", "test_roc_auc")},
          softmax["test_accuracy"])
    assert binary["test_n"] == softmax["test_n"] == 400 and binary["positive_class"] == "digit9"
    assert abs(binary["test_accuracy_at_half"] - softmax["test_accuracy"]) <= 0.01, (binary, softmax)
    assert binary["test_accuracy"] > 0.95 and binary["test_roc_auc"] > 0.99

    model, info = load_model(run)
    assert info.task == "binary" and info.outputs == 1 and len(info.thresholds) == 1
    ds = load_dataset(str(labels), image_size=28, channels=1, seed=0, quiet=True)
    z = predict_logits(model, ds.test.images, Preprocess.from_info(info))  # (N, 1): one logit
    assert z.shape == (400, 1)
    p = torch.sigmoid(z[:, 0] / info.temperature).numpy()
    truth = ds.test.labels.numpy()
    # Not to 1e-6: near 1 the float32 probabilities tie, and which ones tie moves with the inference path
    # (train tests channels-last); the exact agreement is test_roc_and_binary_figures_are_scikit_learns'.
    assert binary["test_roc_auc"] == pytest.approx(roc_auc_score(truth, p), abs=5e-4)
    assert binary["test_average_precision"] == pytest.approx(average_precision_score(truth, p), abs=5e-4)
    assert binary["test_confusion_matrix"] == confusion_matrix(truth, p >= info.thresholds[0]).tolist()

    r = run_main("compare", str(run), str(tmp_path / "softmax"), "--json", "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr  # a binary model against the two-class softmax one: each decides a class
    compared = json.loads(r.stdout)
    assert compared["task"] == "binary / single-label" and compared["n"] == 400
    assert compared["accuracy_a"] == pytest.approx(binary["test_accuracy"])  # at the binary model's threshold
    assert compared["accuracy_b"] == pytest.approx(softmax["test_accuracy"])
    r = run_main("evaluate", str(run), "--data", str(labels), "--json", "--tta", "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr
    evaluated = json.loads(r.stdout)
    assert 0.95 < evaluated["tta_accuracy"] <= 1  # test-time augmentation of the one logit, decided at the threshold
    assert evaluated["binary"]["roc_auc"] == pytest.approx(binary["test_roc_auc"], abs=1e-9)
    assert evaluated["accuracy"] == binary["test_accuracy"]  # decided at the model file's threshold
    paths = ds.test.paths[::20]  # both classes: the split is in class order
    r = run_main("predict", str(run), *paths, "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["path"]: row for row in json.loads(r.stdout)}
    for i, path in zip(range(0, len(ds.test), 20), paths):
        decided = "digit9" if p[i] >= info.thresholds[0] else "digit4"
        assert rows[path]["labels"][0] == decided
        assert rows[path]["probabilities"][rows[path]["labels"].index("digit9")] == pytest.approx(p[i], abs=1e-5)


@pytest.mark.slow
def test_the_task_is_refused_where_the_data_cannot_have_it(tmp_path, multi_label_run):
    _, multi = multi_label_run
    for args, message in ((["--data", "digits", "--task", "binary"], "--task binary needs two classes"),
                          (["--data", str(multi), "--task", "single-label"], "gives several labels per image"),
                          (["--data", "digits", "--pos-weight"], "--pos-weight weights each label's positives"),
                          (["--data", "digits", "--target-precision", "0.9"], "--target-precision sets the threshold"),
                          (["--data", "digits", "--model", "svm", "--task", "multi-label"], "the SVM baseline is")):
        r = run_main("train", *args, "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()


def test_one_class_per_image_can_train_as_multi_label(tmp_path):
    """--task multi-label on digits: every label set is the image's one class (one-hot rows), the
    same splits; the model file is multi-label with a threshold per class."""
    from cnnkit import load_dataset, load_model
    from cnnkit.data import with_task
    ds = load_dataset("digits", quiet=True)
    multi = with_task(ds, "multi-label")
    assert multi.task == "multi-label" and torch.equal(multi.test.labels.argmax(1), ds.test.labels)
    assert torch.equal(multi.train.labels.sum(1), torch.ones(len(ds.train)))
    r = run_main("train", "--data", "digits", "--task", "multi-label", "--epochs", "2", "--out", str(tmp_path / "r"),
                 "--no-report", "--quiet")
    assert r.returncode == 0, r.stderr
    _, info = load_model(tmp_path / "r")
    assert info.task == "multi-label" and len(info.thresholds) == 10


@pytest.mark.slow
def test_the_binary_report_shows_roc_and_pr_in_chromium(binary_run, tmp_path):
    """`cnnkit evaluate` of a binary model: report.html with its ROC and precision-recall curves,
    the threshold and the areas evaluate measured, the confusion matrix at the threshold."""
    from test_report import check_page, open_in_browser, self_contained
    run, labels = binary_run
    out = tmp_path / "ev"
    r = run_main("evaluate", str(run), "--data", str(labels), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    b = result["binary"]
    assert result["confusion_matrix"] == b["confusion_matrix"]  # the page's matrix is the threshold's
    html = (out / "report.html").read_text()
    assert self_contained(html)
    page = open_in_browser(out / "report.html", "report-binary")
    check_page(page, min_images=5)
    assert "ROC and precision-recall curves" in {i["alt"] for i in page["desktop"]["images"]}
    text = page["desktop"]["text"]
    assert "ROC and precision-recall" in text and f"ROC AUC {b['roc_auc']:.4f}" in text
    assert f"threshold {b['threshold']:.3f}" in text and "average precision (area under" in text


@pytest.mark.slow
def test_the_fast_recipe_drops_its_one_class_choices_for_multi_label_data(binary_run):
    """`--recipe fast` on few small images picks fast-folder, whose label smoothing means one class per
    image: for multi-label data it is dropped, and said, rather than refused as if the user had typed it."""
    _, labels = binary_run
    r = run_main("train", "--recipe", "fast", "--data", str(labels), "--task", "multi-label", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "fast-folder.yaml" in r.stderr and "without its label smoothing" in r.stderr
