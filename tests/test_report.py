"""report.html in a real browser (Debian's headless Chromium, driven by Playwright), and explain.

The report must open offline with no console error, every picture decoded, and no sideways page
scroll on a phone. Screenshots are kept in test-artifacts/ for a person to look at."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import cnnkit
from conftest import ARTIFACTS, run_main, shared

CHROMIUM = os.environ.get("CNNKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Flags from this machine's notes: no sandbox as root, and no background connections to Google
# (the network is closed; Chromium would otherwise log failed lookups).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 900}


def require_browser():
    if CHROMIUM is None:
        if os.environ.get("CNNKIT_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed; `bash scripts/setup.sh --test` installs it")
        pytest.skip("chromium is not installed; `bash scripts/setup.sh --test` installs it")


def open_in_browser(html: Path, screenshot_name: str) -> dict:
    """Load a file:// page at phone and desktop widths; return what the page did and contains."""
    from playwright.sync_api import sync_playwright
    require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    result = {"errors": [], "failed_requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
                page = browser.new_page(viewport=viewport)
                page.on("console", lambda m: result["errors"].append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: result["errors"].append(str(e)))
                page.on("requestfailed", lambda r: result["failed_requests"].append(r.url))
                page.goto(html.as_uri(), wait_until="load")
                result[label] = page.evaluate("""() => ({
                    images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                                   width: i.naturalWidth, shown: i.clientWidth})),
                    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
                    text: document.body.innerText})""")
                page.screenshot(path=str(ARTIFACTS / f"{screenshot_name}-{label}.png"), full_page=True)
                page.close()
        finally:
            browser.close()
    return result


def check_page(result: dict, min_images: int) -> None:
    assert result["errors"] == [] and result["failed_requests"] == []
    for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        images = result[label]["images"]
        assert len(images) >= min_images
        bad = [i["alt"] for i in images if not i["complete"] or i["width"] == 0]
        assert bad == [], f"images not decoded: {bad}"
        # Readable on a phone: pictures shrink to the screen and the page never scrolls sideways.
        assert result[label]["scrollWidth"] <= viewport["width"]
        assert all(i["shown"] <= viewport["width"] for i in images)


def self_contained(html: str) -> bool:
    """Nothing fetched from elsewhere: every src is a data: URI, no stylesheet or script links."""
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    return all(s.startswith("data:") for s in sources) and "<script" not in html


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A folder dataset of real ant and bee photos plus one corrupt file, trained briefly."""
    root = tmp_path_factory.mktemp("bugs")
    for cls in ("ants", "bees"):
        (root / cls).mkdir()
        for f in sorted((shared("hymenoptera", "train", cls)).glob("*.jpg"))[:30]:
            shutil.copy(f, root / cls / f.name)
    (root / "bees" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    out = tmp_path_factory.mktemp("runs") / "bugs"
    cfg = cnnkit.TrainConfig(data=str(root), model="seed-patch64", epochs=2, image_size=32, out=str(out),
                             report_tta=True)
    return cnnkit.train(cfg, quiet=True)


def test_train_writes_a_report_that_opens_in_chromium(folder_run):
    run = folder_run.run_dir
    html = (run / "report.html").read_text()
    assert self_contained(html)
    result = open_in_browser(run / "report.html", "report-train")
    check_page(result, min_images=5)  # curves, two confusion matrices, mistakes, reliability
    text = result["desktop"]["text"]
    metrics = json.loads((run / "metrics.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert f"{100 * metrics['test_accuracy']:.2f}%" in text  # the report quotes the run's own figure
    assert evaluation["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert "tta_accuracy" in evaluation and "accuracy with TTA" in text
    assert "broken.jpg" in text  # the skipped file is named
    for section in ("Per-class metrics", "Confusion matrix", "Misclassified", "Calibration", "Training", "Model",
                    "Data", "Timing", "Environment"):
        assert section in text
    assert f"torch\t{__import__('torch').__version__}" in text
    # Misclassified rows name their files (a folder dataset), and the gallery has Grad-CAM heatmaps.
    if evaluation["misclassified"]:
        path = Path(evaluation["misclassified"][0]["path"])
        assert path.suffix == ".jpg" and str(path.relative_to(folder_run.config.data)) in text


def test_evaluate_writes_a_report_for_any_split(folder_run, tmp_path):
    out = tmp_path / "ev"
    r = run_main("evaluate", str(folder_run.run_dir), "--data", folder_run.config.data, "--split", "val",
                "--out", str(out), "--tta", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["split"] == "val" and result["n"] == folder_run.dataset.sizes()["val"]
    assert Path(result["files"]["report"]) == out / "report.html"
    page = open_in_browser(out / "report.html", "report-evaluate")
    check_page(page, min_images=5)
    assert "val split" in page["desktop"]["text"]


def test_explain_draws_kernels_feature_maps_and_gradcam(folder_run, tmp_path):
    image = sorted(shared("hymenoptera", "val", "bees").glob("*.jpg"))[0]
    out = tmp_path / "explain"
    r = run_main("explain", str(folder_run.run_dir), str(image), "--out", str(out), "--class", "ants", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["predicted"] in ("ants", "bees")
    assert sum(t["probability"] for t in info["top"]) == pytest.approx(1, abs=1e-5)
    assert set(info["gradcam_classes"]) == {"ants", info["predicted"]}
    assert info["kernels_shape"] == [8, 3, 3, 3]  # seed-patch64's first conv: 8 filters of 3x3x3
    assert len(info["feature_maps"]) == 5  # its five conv layers
    for f in [info["files"]["kernels"], info["files"]["gradcam"], *(m["file"] for m in info["feature_maps"])]:
        with Image.open(f) as img:
            assert img.format == "PNG" and img.width > 100


@pytest.mark.parametrize("args, message", [
    (["missing.png"], "no such image file"),
    (["NOTIMAGE"], "cannot read"),
    (["IMAGE", "--class", "wasps"], "not one of the model's classes"),
])
def test_explain_bad_input_is_one_line(folder_run, tmp_path, args, message):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    image = sorted(shared("hymenoptera", "val", "ants").glob("*.jpg"))[0]
    args = [str(text_file) if a == "NOTIMAGE" else str(image) if a == "IMAGE" else a for a in args]
    r = run_main("explain", str(folder_run.run_dir), *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_explain_refuses_a_model_without_convolutions(tmp_path):
    run = cnnkit.train(cnnkit.TrainConfig(model="linear", epochs=1, out=str(tmp_path / "lin")), quiet=True)
    img = tmp_path / "digit.png"
    Image.fromarray(run.dataset.test.images[0, 0].numpy()).save(img)
    r = run_main("explain", str(run.run_dir), str(img), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no convolution layers" in r.stderr
    assert (run.run_dir / "report.html").is_file()  # its report simply has no heatmaps
