"""cnnkit serve for a multi-label model: /predict answers label sets equal to `cnnkit predict --json`
and to the thresholds applied to the model's sigmoids, Grad-CAM per label present, and the page
shows the set as chips (or says plainly that no label reaches its threshold) in Chromium.

One server (a subprocess, as a user starts it, --runtime torch) serves the session's multi-MNIST
model (conftest's multi_label_run); every request goes over 127.0.0.1. test_serve.py covers the
limits and a single-label model."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from benchmarks.serving.serve_load import start_server
from conftest import ARTIFACTS, run_main
from test_report import CHROMIUM, CHROMIUM_ARGS, DESKTOP, require_browser
from test_serve import call, png_bytes

FILES = 24  # test images sent: enough for sets of one, two and three digits

pytestmark = pytest.mark.slow  # trains or serves the shared fixtures' models: out of the fast subset


@pytest.fixture(scope="module")
def multi_server(multi_label_run):
    """(port, run folder, the test split's first FILES paths, the model's sigmoids for them (N, K),
    thresholds (K,), class names); the server is stopped after the module."""
    run, labels_csv = multi_label_run
    model, info = cnnkit.load_model(run)
    test = cnnkit.load_dataset(str(labels_csv), image_size=56, channels=1, seed=info.train_config().seed,
                               quiet=True).test
    from cnnkit.inference import predict_logits
    from cnnkit.preprocess import Preprocess
    # The reference: PyTorch eager logits of the same images, one sigmoid each (no calibration).
    probs = torch.sigmoid(predict_logits(model, test.images[:FILES], Preprocess.from_info(info))).numpy()
    proc, port = start_server(str(run), 8, ["--runtime", "torch"])
    yield port, run, test.paths[:FILES], probs, np.array(info.thresholds), info.class_names
    proc.terminate()
    proc.wait(10)


def multipart(files: dict[str, bytes]) -> tuple[bytes, dict]:
    boundary = "cnnkit-multi-label"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items())
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def decoded(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(int)


def test_predict_answers_label_sets_equal_to_cnnkit_predict_and_the_sigmoids(multi_server):
    port, run, paths, probs, thresholds, names = multi_server
    status, info = call(port, "GET", "/model")
    assert status == 200 and info["task"] == "multi-label" and info["class_names"] == names
    assert info["thresholds"] == pytest.approx(thresholds.tolist()) and info["runtime"] == "torch"
    body, headers = multipart({p.rsplit("/", 1)[-1]: open(p, "rb").read() for p in paths})
    status, answer = call(port, "POST", "/predict?top_k=50", body, headers)  # top_k: single-label models only
    assert status == 200 and answer["task"] == "multi-label", answer
    r = run_main("predict", str(run), *paths, "--json", "--runtime", "torch")
    assert r.returncode == 0, r.stderr
    cli = {row["path"]: row for row in json.loads(r.stdout)}
    on_edge = 0
    for path, row, p in zip(paths, answer["results"], probs):
        assert row["filename"] == path.rsplit("/", 1)[-1] and "heatmaps" not in row
        assert set(row) == {"filename", "labels", "probabilities", "label_probabilities"}
        assert [row["label_probabilities"][n] for n in names] == pytest.approx(p.tolist(), abs=1e-5)
        assert row["probabilities"] == pytest.approx([row["label_probabilities"][n] for n in row["labels"]])
        assert row["labels"] == cli[path]["labels"]  # the same decision as cnnkit predict, the same runtime
        assert row["label_probabilities"] == pytest.approx(cli[path]["label_probabilities"], abs=1e-6)
        if np.abs(p - thresholds).min() < 1e-4:  # a label on the edge of its threshold: fp32 may tip it
            on_edge += 1
            continue
        assert row["labels"] == [names[k] for k in np.argsort(-p, kind="stable") if p[k] >= thresholds[k]]
    assert on_edge <= 1
    sizes = [len(row["labels"]) for row in answer["results"]]
    assert {1, 2} <= set(sizes), sizes  # sets of several labels, not a disguised top-1

    # The raw-body fast path (Front) answers the same, and explains each label present by default.
    two = next(i for i, n in enumerate(sizes) if n >= 2)
    image = open(paths[two], "rb").read()
    status, one = call(port, "POST", "/predict?explain=true", image, {"Content-Type": "image/png"})
    assert status == 200
    row = one["results"][0]
    assert row["labels"] == answer["results"][two]["labels"] and list(row["heatmaps"]) == row["labels"]
    maps = [decoded(u) for u in row["heatmaps"].values()]
    assert maps[0].shape[0] >= 56 and np.abs(maps[0] - maps[1]).max() > 64  # two digits, two places
    # label=: that label's map alone, equal to explain.gradcam's for it on the eager model
    absent = next(n for n in names if n not in row["labels"])
    status, asked = call(port, "POST", f"/predict?label={absent}", image, {"Content-Type": "image/png"})
    assert status == 200 and list(asked["results"][0]["heatmaps"]) == [absent]
    assert np.abs(decoded(asked["results"][0]["heatmaps"][absent]) - reference_heatmap(run, image, absent)).max() <= 2
    status, bad = call(port, "POST", "/predict?label=cat", image, {"Content-Type": "image/png"})
    assert status == 422 and "'cat' is not one of the model's labels" in bad["detail"]


def reference_heatmap(run, image: bytes, label: str) -> np.ndarray:
    """Grad-CAM for `label` on the model file in PyTorch eager, drawn as the server draws it."""
    from cnnkit.decode import decode_image
    from cnnkit.explain import gradcam
    from cnnkit.preprocess import Preprocess
    from cnnkit.serve import heatmap_png
    model, info = cnnkit.load_model(run)
    pixels = decode_image(io.BytesIO(image), 56, 1).copy()  # writable, for torch
    x = Preprocess.from_info(info)(torch.from_numpy(pixels)[None])
    heat, _ = gradcam(model.eval(), x, torch.tensor([info.class_names.index(label)]))
    return decoded(heatmap_png(pixels, heat[0].numpy()))


def test_serve_answers_a_binary_model_with_the_class_its_threshold_decides(binary_run):
    """A binary model served: its two classes, the decided one first (the second where its calibrated
    probability reaches the model file's threshold), as `cnnkit predict` orders them, with Grad-CAM."""
    import asyncio

    import cnnkit.serve.model as served
    run, labels = binary_run
    paths = cnnkit.load_dataset(str(labels), image_size=28, channels=1, seed=0, quiet=True).test.paths[::25]  # both
    r = run_main("predict", str(run), *paths, "--json", "--runtime", "torch")
    assert r.returncode == 0, r.stderr
    expected = json.loads(r.stdout)
    model = served.Model(run, runtime="torch")
    files = [(p, open(p, "rb").read()) for p in paths]

    async def ask():
        await model.start()
        try:
            return await model.answer(files, top_k=2, explain=True)
        finally:
            await model.stop()
    answer = asyncio.run(ask())
    assert answer["task"] == "binary" and model.description()["thresholds"] == cnnkit.read_info(run).thresholds
    for row, want in zip(answer["results"], expected):
        assert [t["label"] for t in row["top"]] == want["labels"]
        assert [t["probability"] for t in row["top"]] == pytest.approx(want["probabilities"], abs=1e-6)
        assert row["heatmap"].startswith("data:image/png;base64,")
    assert {row["top"][0]["label"] for row in answer["results"]} == {"digit4", "digit9"}


def test_the_page_shows_a_label_set_as_chips_and_an_empty_one_plainly(multi_server, tmp_path):
    from playwright.sync_api import sync_playwright
    require_browser()
    port, _, paths, probs, thresholds, names = multi_server
    several = next(i for i, p in enumerate(probs)
                   if (p >= thresholds).sum() >= 2 and np.abs(p - thresholds).min() > 1e-3)
    expected = [names[k] for k in np.argsort(-probs[several], kind="stable") if probs[several][k] >= thresholds[k]]
    blank = tmp_path / "blank.png"  # no digit at all: no label should reach its threshold
    blank.write_bytes(png_bytes(np.zeros((56, 56), np.uint8)))
    status, answer = call(port, "POST", "/predict", blank.read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and answer["results"][0]["labels"] == [], answer
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=DESKTOP)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.wait_for_function("document.getElementById('about').innerText.includes('multi-label')")
            page.set_input_files("#file", paths[several])
            page.wait_for_selector("#label-set", timeout=20_000)
            assert page.locator("#label-set .chip .label").all_inner_texts() == expected
            chips = page.locator("#label-set .chip").all_inner_texts()
            for chip, label in zip(chips, expected):
                k = names.index(label)
                assert f"{100 * probs[several][k]:.1f}%" in chip and f"threshold {100 * thresholds[k]:.1f}%" in chip
            page.wait_for_function(f"document.querySelectorAll('#heats img').length === {len(expected)}")
            page.screenshot(path=str(ARTIFACTS / "serve-multi-label-desktop.png"), full_page=True)
            page.set_input_files("#file", str(blank))
            page.wait_for_selector("#no-label", timeout=20_000)
            assert page.inner_text("#no-label") == "No label reaches its threshold."
            assert page.locator("#label-set").count() == 0 and page.locator("#top-label").count() == 0
        finally:
            browser.close()
    assert not errors, errors
