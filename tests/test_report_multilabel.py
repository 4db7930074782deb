"""report.html of a multi-label model: its figures against scikit-learn's and NumPy's on the model's
own predictions, its worst images against the label's probabilities, and the page in Chromium."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from cnnkit import load_dataset, load_model
from cnnkit.inference import predict_logits
from cnnkit.preprocess import Preprocess
from conftest import run_main
from test_report import check_page, open_in_browser, self_contained

pytestmark = pytest.mark.slow  # trains or serves the shared fixtures' models: out of the fast subset


@pytest.fixture(scope="module")
def evaluated(multi_label_run, tmp_path_factory):
    """(report folder, evaluate's JSON, probs (N, K), truth (N, K), thresholds (K,)) of `cnnkit evaluate`
    on the fixture's test split; probs computed here, from the model file, not by the report."""
    run, labels = multi_label_run
    out = tmp_path_factory.mktemp("ml-report") / "ev"
    r = run_main("evaluate", str(run), "--data", str(labels), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    model, info = load_model(run)
    ds = load_dataset(str(labels), image_size=56, channels=1, seed=info.train_config().seed, quiet=True)
    probs = torch.sigmoid(predict_logits(model, ds.test.images, Preprocess.from_info(info))).numpy()
    return out, json.loads(r.stdout), probs, ds.test.labels.numpy().astype(int), np.array(info.thresholds)


def html_table(html: str, heading: str) -> list[list[str]]:
    """The cells of the first table after <h2>heading</h2>, row by row (the body only)."""
    body = html.split(f"<h2>{heading}</h2>", 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_the_per_label_table_is_scikit_learns_on_the_models_predictions(evaluated):
    out, result, probs, truth, thresholds = evaluated
    rows = html_table((out / "report.html").read_text(), "Per-label metrics")
    k = truth.shape[1]
    names = [r["label"] for r in result["per_label"]]
    assert [r[0] for r in rows[:k]] == names and [r[0] for r in rows[k:]] == ["micro avg", "macro avg"]
    pred = probs >= thresholds
    for j, row in enumerate(rows[:k]):
        label, threshold, precision, recall, f1, ap, support, ece = row
        assert float(threshold) == pytest.approx(thresholds[j], abs=5e-4)
        assert float(ap) == pytest.approx(average_precision_score(truth[:, j], probs[:, j]), abs=5e-5), label
        assert float(f1) == pytest.approx(f1_score(truth[:, j], pred[:, j]), abs=5e-5), label
        assert int(support) == truth[:, j].sum()
        assert float(ece) == pytest.approx(result["per_label"][j]["ece"], abs=5e-5)
    assert float(rows[k + 1][5]) == pytest.approx(np.mean([average_precision_score(truth[:, j], probs[:, j])
                                                           for j in range(k)]), abs=5e-5)  # the mAP
    assert float(rows[k][4]) == pytest.approx(f1_score(truth, pred, average="micro"), abs=5e-5)
    metrics = json.loads((out / "metrics.json").read_text())  # the file, the JSON and the page agree
    assert metrics["per_label"] == result["per_label"]
    assert metrics["mean_average_precision"] == pytest.approx(float(rows[k + 1][5]), abs=5e-5)


def test_the_cooccurrence_csvs_are_counts_of_the_models_label_sets(evaluated):
    out, result, probs, truth, thresholds = evaluated
    pred = (probs >= thresholds).astype(int)
    names = [r["label"] for r in result["per_label"]]
    for name, expected, corner in (("cooccurrence.csv", truth.T @ pred, "true \\ predicted"),
                                   ("cooccurrence_true.csv", truth.T @ truth, "true \\ true")):
        rows = read_csv(out / name)
        assert rows[0] == [corner, *names] and [r[0] for r in rows[1:]] == names
        assert np.array([r[1:] for r in rows[1:]], dtype=int).tolist() == expected.tolist(), name
    assert np.diag(truth.T @ pred).tolist() == [round(r["recall"] * r["support"]) for r in result["per_label"]]


def test_the_worst_images_are_each_labels_most_confident_mistakes(evaluated):
    out, result, probs, truth, thresholds = evaluated
    pred, truth = probs >= thresholds, truth.astype(bool)
    names = [r["label"] for r in result["per_label"]]
    worst = result["worst_per_label"]
    listed = read_csv(out / "worst_per_label.csv")
    assert [(r[0], int(r[2]), r[1]) for r in listed[1:]] == [(w["label"], w["index"], w["kind"]) for w in worst]
    assert len(worst) <= 40
    for k, name in enumerate(names):
        rows = [w for w in worst if w["label"] == name]
        missed, false_pos = np.flatnonzero(truth[:, k] & ~pred[:, k]), np.flatnonzero(~truth[:, k] & pred[:, k])
        assert len(rows) == min(4, len(missed) + len(false_pos)), name
        for w in rows:
            i = w["index"]
            assert w["probability"] == pytest.approx(probs[i, k], abs=1e-5)
            assert w["kind"] == ("missed" if i in missed else "false positive") and (i in missed or i in false_pos)
            assert w["true"] == [n for j, n in enumerate(names) if truth[i, j]]
            assert w["predicted"] == [n for j, n in enumerate(names) if pred[i, j]]
        got_missed = [w["index"] for w in rows if w["kind"] == "missed"]
        got_fp = [w["index"] for w in rows if w["kind"] == "false positive"]
        if got_missed:  # the lowest-probability misses, lowest first; the highest false positives, highest first
            assert got_missed[0] == missed[np.argmin(probs[missed, k])], name
            assert probs[got_missed, k] == pytest.approx(np.sort(probs[missed, k])[:len(got_missed)], abs=1e-6)
        if got_fp:
            assert got_fp[0] == false_pos[np.argmax(probs[false_pos, k])], name
            assert probs[got_fp, k] == pytest.approx(np.sort(probs[false_pos, k])[::-1][:len(got_fp)], abs=1e-6)
        errors = np.r_[1 - probs[missed, k], probs[false_pos, k]]  # nothing left out is worse than what is shown
        shown = [1 - w["probability"] if w["kind"] == "missed" else w["probability"] for w in rows]
        assert not shown or np.sort(errors)[::-1][len(shown) - 1] == pytest.approx(min(shown), abs=1e-6)


def test_the_multi_label_report_opens_in_chromium(evaluated):
    out, result, *_ = evaluated
    html = (out / "report.html").read_text()
    assert self_contained(html)
    page = open_in_browser(out / "report.html", "report-multi-label")
    check_page(page, min_images=5)  # PR curves, two co-occurrence matrices, worst images, training curves
    alts = {i["alt"] for i in page["desktop"]["images"]}
    assert {"precision-recall curves per label", "co-occurrence of true and predicted labels",
            "co-occurrence of true labels", "worst-scored images per label", "training curves"} <= alts
    text = page["desktop"]["text"]
    for section in ("Per-label metrics", "Precision-recall curves", "Co-occurrence", "Worst-scored images per label",
                    "Training", "Model", "Data", "Timing", "Environment"):
        assert section in text
    assert "Rows: true label; columns: predicted label" in text
    assert f'{result["mean_average_precision"]:.4f}' in text and f'{result["hamming_loss"]:.4f}' in text


def test_train_writes_the_multi_label_report_with_its_own_figures(multi_label_run, tmp_path):
    """One epoch on 300 of the fixture's training images (absolute paths in a label file of its own)."""
    _, labels = multi_label_run
    rows = read_csv(labels)
    small = tmp_path / "small.csv"
    with open(small, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *([str(labels.parent / r[0]), *r[1:]] for r in
                                            [r for r in rows[1:] if r[2] == "train"][:300] +
                                            [r for r in rows[1:] if r[2] == "test"][:100])])
    out = tmp_path / "run"
    r = run_main("train", "--data", str(small), "--recipe", "multi-mnist", "--epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"report {out / 'report.html'}" in (out / "train.log").read_text()
    html = (out / "report.html").read_text()
    rows = html_table(html, "Per-label metrics")
    for row, expected in zip(rows, metrics["test_per_label"]):
        assert row[0] == expected["label"] and float(row[5]) == pytest.approx(expected["average_precision"], abs=5e-5)
        assert float(row[4]) == pytest.approx(expected["f1"], abs=5e-5)
    assert f'<b>{metrics["test_mean_average_precision"]:.4f}</b>' in html
    for name in ("pr_curves.png", "cooccurrence.csv", "worst_per_label.png", "curves.png"):
        assert (out / name).is_file(), name
