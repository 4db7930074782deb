"""evaluate and predict: metrics against scikit-learn, files written, bad files reported per row."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

import cnnkit
from cnnkit import evaluate as ev
from cnnkit.inference import tta_views
from conftest import run_main, shared


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A quick MNIST model (softmax regression, 1 epoch: about 92% test accuracy)."""
    out = tmp_path_factory.mktemp("runs") / "mnist-linear"
    cfg = cnnkit.TrainConfig(data="mnist", model="linear", epochs=1, data_dir=str(shared()), out=str(out),
                             report=False)
    return cnnkit.train(cfg, quiet=True)


def test_metrics_equal_scikit_learn_on_mnist(mnist_run, tmp_path):
    model, meta = cnnkit.load_model(mnist_run.run_dir)
    split, names = ev.load_split_for(meta, "mnist", "test", str(shared()))
    metrics, probs = ev.evaluate(model, meta, split, names)
    labels, preds = split.labels.numpy(), probs.argmax(1)
    cm = np.array(metrics["confusion_matrix"])
    assert np.array_equal(cm, confusion_matrix(labels, preds, labels=range(10)))
    assert cm.sum() == len(split) == 10_000
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=range(10), zero_division=0)
    ours = metrics["per_class"]
    np.testing.assert_allclose([c["precision"] for c in ours], p, atol=1e-12)
    np.testing.assert_allclose([c["recall"] for c in ours], r, atol=1e-12)
    np.testing.assert_allclose([c["f1"] for c in ours], f, atol=1e-12)
    assert [c["support"] for c in ours] == s.tolist()
    for avg in ("macro", "weighted"):
        sp, sr, sf, _ = precision_recall_fscore_support(labels, preds, average=avg, zero_division=0)
        assert metrics["averages"][avg] == pytest.approx({"precision": sp, "recall": sr, "f1": sf}, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(mnist_run.metrics["test_accuracy"], abs=1e-6)
    assert 0 <= metrics["ece"] < 0.1 and sum(b["count"] for b in metrics["reliability"]) == 10_000
    worst = metrics["misclassified"]
    assert all(w["true"] != w["predicted"] for w in worst)
    assert [w["loss"] for w in worst] == sorted((w["loss"] for w in worst), reverse=True)


def test_evaluate_cli_writes_files(mnist_run, tmp_path):
    out = tmp_path / "ev"
    r = run_main("evaluate", str(mnist_run.run_dir), "--data", "mnist", "--data-dir", str(shared()),
                "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "misclassified.png", "reliability.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    rows = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert rows[0][1:] == [str(i) for i in range(10)]
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 10_000
    mis = list(csv.DictReader((out / "misclassified.csv").open()))
    assert len(mis) == len(result["misclassified"]) and mis[0]["true"] != mis[0]["predicted"]


def test_predict_folder_with_bad_files(tmp_path):
    digits = cnnkit.load_dataset("digits")
    run = cnnkit.train(cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=8, out=str(tmp_path / "run"),
                                          report=False),
                       quiet=True)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    expected = {}
    for i in range(6):  # test digits the model classifies correctly, saved as PNG files
        img = digits.test.images[i, 0].numpy()
        name = folder / ("sub" if i % 2 else "") / f"digit{i}.png"
        Image.fromarray(img).save(name)
        expected[str(name)] = str(int(digits.test.labels[i]))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    r = run_main("predict", str(run.run_dir), str(folder), "--top-k", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = {row["path"]: row for row in csv.DictReader(out.open())}
    assert len(rows) == 8
    assert rows[str(folder / "corrupt.png")]["error"] and rows[str(folder / "notes.txt")]["error"]
    right = sum(rows[p]["label_1"] == label for p, label in expected.items())
    assert right >= 5 and all(rows[p]["error"] == "" for p in expected)
    r = run_main("predict", str(run.run_dir), str(folder / "digit0.png"), "--min-confidence", "1.0", "--json")
    assert json.loads(r.stdout)[0]["labels"][0] == "unknown"
    # Issue 10: a batch that could read none of its inputs has failed (exit 2), with its error rows.
    for bad in ([str(tmp_path / "nonexistent")], [str(folder / "corrupt.png"), str(folder / "notes.txt")]):
        r = run_main("predict", str(run.run_dir), *bad, "--json")
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert all("error" in row for row in json.loads(r.stdout)) and "could not be read" in r.stderr


def test_fit_temperature_recovers_known_overconfidence():
    """Labels drawn from softmax(z); the model reports 3z. The fitted temperature undoes the 3."""
    import torch
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 5, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    assert ev.fit_temperature(3 * z, labels) == pytest.approx(3.0, rel=0.05)
    assert ev.fit_temperature(z, labels) == pytest.approx(1.0, rel=0.05)


def test_tta_views_follow_the_data():
    import torch
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    digits, photos = tta_views(x, hflip=False), tta_views(x, hflip=True)
    assert len(digits) == 5 and len(photos) == 6  # no mirror image for digits
    assert torch.equal(photos[1], x.flip(3)) and all(v.shape == x.shape for v in photos)
    assert torch.equal(digits[1][:, :, 2:, :], x[:, :, :2, :])  # shifted down by 2 rows


def test_svm_baseline_model_file_predicts_what_scikit_learn_predicts(tmp_path):
    from sklearn.svm import LinearSVC

    result = cnnkit.train(cnnkit.TrainConfig(data="digits", model="svm", out=str(tmp_path / "svm"), report=False),
                          quiet=True)
    model, meta = cnnkit.load_model(tmp_path / "svm")
    ds = result.dataset
    norm = cnnkit.Preprocess.fit(ds.train.images)
    reference = LinearSVC(C=0.01, dual=False, max_iter=200, random_state=0).fit(
        norm(ds.train.images).flatten(1).numpy(), ds.train.labels.numpy())
    ours = ev.probabilities(model, meta, ds.test.images).argmax(1)
    theirs = reference.predict(norm(ds.test.images).flatten(1).numpy())
    assert (ours == theirs).mean() == 1.0
    assert 0.85 < result.metrics["test_accuracy"] < 0.99
