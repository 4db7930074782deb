"""`cnnkit explain` of a binary and a multi-label model, against references computed here from the
model file in PyTorch eager: the calibrated sigmoid, the thresholds, and explain.gradcam itself."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import cnnkit
import cnnkit.report
from cnnkit import explain as ex
from cnnkit.preprocess import Preprocess
from conftest import run_main

pytestmark = pytest.mark.slow  # trains or serves the shared fixtures' models: out of the fast subset


@pytest.fixture
def drawn(monkeypatch):
    """The heatmaps `cnnkit explain` draws into gradcam.png, {panel title: (H, W)}, still drawn."""
    maps: dict[str, torch.Tensor] = {}
    original = cnnkit.report.plot_gradcam

    def keep(image, heatmaps, path):
        maps.update(heatmaps)
        return original(image, heatmaps, path)
    monkeypatch.setattr(cnnkit.report, "plot_gradcam", keep)
    return maps


def test_explain_of_a_binary_model_shows_its_calibrated_probability_and_the_decided_class(binary_run, tmp_path,
                                                                                          drawn):
    run, labels = binary_run
    model, info = cnnkit.load_model(run)
    test = cnnkit.load_dataset(str(labels), image_size=28, channels=1, seed=0, quiet=True).test
    x = Preprocess.from_info(info)(test.images)
    with torch.no_grad():
        z = model.eval()(x)[:, 0]  # (N,) the one logit
    p = torch.sigmoid(z / info.temperature)  # in a batch of 400: equal to one image at a time within 1e-5
    (t,) = info.thresholds
    i = int((p - t).abs().argmin())  # the image nearest the threshold: the decision is the threshold's
    decided = int(p[i] >= t)
    r = run_main("explain", str(run), test.paths[i], "--out", str(tmp_path / "x"), "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["task"] == "binary" and record["threshold"] == pytest.approx(t)
    assert record["predicted"] == info.class_names[decided] == record["top"][0]["label"]
    assert [e["label"] for e in record["top"]] == [info.class_names[decided], info.class_names[1 - decided]]
    second = float(p[i])
    assert record["probability"] == pytest.approx(second if decided else 1 - second, abs=1e-5)
    assert {e["label"]: e["probability"] for e in record["top"]} == pytest.approx(
        {info.class_names[0]: 1 - second, info.class_names[1]: second}, abs=1e-5)
    assert record["gradcam_classes"] == [info.class_names[decided]] and len(drawn) == 1
    reference, _ = ex.gradcam(model, x[i:i + 1], torch.tensor([decided]), binary=True)
    torch.testing.assert_close(next(iter(drawn.values())), reference[0], atol=1e-5, rtol=1e-4)
    # --class: the other class's map as well, against gradcam's for it
    drawn.clear()
    r = run_main("explain", str(run), test.paths[i], "--out", str(tmp_path / "y"), "--class",
                 info.class_names[1 - decided], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gradcam_classes"] == [info.class_names[decided], info.class_names[1 - decided]]
    other, _ = ex.gradcam(model, x[i:i + 1], torch.tensor([1 - decided]), binary=True)
    torch.testing.assert_close(list(drawn.values())[1], other[0], atol=1e-5, rtol=1e-4)


def test_explain_of_a_multi_label_model_draws_each_label_present(multi_label_run, tmp_path, drawn):
    run, labels = multi_label_run
    model, info = cnnkit.load_model(run)
    names, thresholds = info.class_names, np.array(info.thresholds)
    test = cnnkit.load_dataset(str(labels), image_size=56, channels=1, seed=0, quiet=True).test
    x = Preprocess.from_info(info)(test.images)
    with torch.no_grad():
        probs = torch.sigmoid(model.eval()(x)).numpy()  # (N, K)
    present = probs >= thresholds
    i = int(np.flatnonzero(present.sum(1) >= 2)[0])  # an image with several labels found
    expected = sorted(np.flatnonzero(present[i]), key=lambda k: -probs[i, k])
    r = run_main("explain", str(run), test.paths[i], "--out", str(tmp_path / "x"), "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["task"] == "multi-label" and "predicted" not in record
    assert record["labels"] == [names[k] for k in expected] == record["gradcam_classes"]
    assert record["probabilities"] == pytest.approx(probs[i, expected].tolist(), abs=1e-5)
    assert record["label_probabilities"] == pytest.approx(dict(zip(names, probs[i].tolist())), abs=1e-5)
    assert record["thresholds"] == pytest.approx(dict(zip(names, thresholds.tolist())))
    assert len(drawn) == len(expected)  # one panel per label present
    for k, heat in zip(expected, drawn.values()):
        reference, _ = ex.gradcam(model, x[i:i + 1], torch.tensor([int(k)]))
        torch.testing.assert_close(heat, reference[0], atol=1e-5, rtol=1e-4)
    maps = list(drawn.values())
    assert (maps[0] - maps[1]).abs().max() > 0.25  # two digits in two places, not one map twice
    # --class NAME: that label's map instead, present or not
    absent = int(np.flatnonzero(~present[i])[0])
    drawn.clear()
    r = run_main("explain", str(run), test.paths[i], "--out", str(tmp_path / "y"), "--class", names[absent])
    assert r.returncode == 0, r.stderr
    shown = re.search(r"labels present: (.*)", r.stdout).group(1).split(", ")  # "3 0.981, 7 0.874"
    assert [s.split()[0] for s in shown] == [names[k] for k in expected]
    assert [float(s.split()[1]) for s in shown] == pytest.approx(probs[i, expected].tolist(), abs=1e-3)
    assert json.loads((tmp_path / "y" / "explain.json").read_text())["gradcam_classes"] == [names[absent]]
    reference, _ = ex.gradcam(model, x[i:i + 1], torch.tensor([absent]))
    torch.testing.assert_close(next(iter(drawn.values())), reference[0], atol=1e-5, rtol=1e-4)
