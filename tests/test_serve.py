"""cnnkit serve: the API, its limits under a load with malformed requests, and the page in Chromium.

One server (a subprocess, as a user starts it) serves a fast-mnist model trained here for one epoch;
every request goes over 127.0.0.1."""
from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit
from conftest import ARTIFACTS, ROOT, shared
from test_report import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, require_browser

sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import load, start_server  # noqa: E402  (the benchmark's client and server start-up)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(port, model file, MNIST test split) of a running server; stopped after the module."""
    tmp = tmp_path_factory.mktemp("serve")
    env = pytest.MonkeyPatch()
    env.setenv("CNNKIT_DATA", str(tmp / "cache"))  # this module's own cache (decoded MNIST, exports, runtime record)
    try:
        from cnnkit.config import recipe_file
        recipe = cnnkit.TrainConfig.from_file(recipe_file("fast", "mnist")).to_dict()
        run = cnnkit.train(cnnkit.TrainConfig.from_dict({**recipe, "data_dir": str(shared()), "epochs": 1,
                                                         "out": str(tmp / "run"), "report": False}), quiet=True)
        proc, port = start_server(str(run.run_dir), 32)
        yield port, run.run_dir / "model.safetensors", run.dataset.test
        proc.terminate()
        proc.wait(10)
    finally:
        env.undo()


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def call(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    return r.status, (json.loads(data) if r.getheader("content-type", "").startswith("application/json") else data)


def expected_probabilities(model_path: Path, images: np.ndarray) -> np.ndarray:
    model, meta = cnnkit.load_model(model_path)
    import torch
    return cnnkit.probabilities(model, meta, torch.from_numpy(images))


def test_api_answers_with_calibrated_top_k_and_heatmaps(server):
    port, model_path, test = server
    status, health = call(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, info = call(port, "GET", "/model")
    assert info["class_names"] == [str(i) for i in range(10)] and info["input"] == {"channels": 1, "height": 28, "width": 28}
    assert info["metrics"]["test_accuracy"] > 0.97 and info["runtime"] in ("onnx", "torch")
    status, schema = call(port, "GET", "/openapi.json")
    assert status == 200 and "/predict" in schema["paths"] and "/model" in schema["paths"]
    assert call(port, "GET", "/docs")[0] == 404  # Swagger UI needs a CDN: not offered
    # Raw body, one image.
    pixels = test.images[:3, 0].numpy()
    expected = expected_probabilities(model_path, test.images[:3].numpy())
    status, body = call(port, "POST", "/predict?top_k=3", png_bytes(pixels[0]), {"Content-Type": "image/png"})
    assert status == 200 and len(body["results"]) == 1
    top = body["results"][0]["top"]
    assert [t["label"] for t in top] == [str(i) for i in np.argsort(-expected[0])[:3]]
    assert top[0]["probability"] == pytest.approx(expected[0].max(), abs=1e-4)
    # Multipart, several images, with Grad-CAM heatmaps.
    boundary = "cnnkit-test-boundary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d{i}.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + png_bytes(pixels[i]) + b"\r\n" for i in range(3))
    status, body = call(port, "POST", "/predict?explain=true&top_k=1", parts + f"--{boundary}--\r\n".encode(),
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and [r["filename"] for r in body["results"]] == ["d0.png", "d1.png", "d2.png"]
    for r, p in zip(body["results"], expected):
        assert r["top"][0]["label"] == str(p.argmax())
        heat = Image.open(io.BytesIO(base64.b64decode(r["heatmap"].split(",", 1)[1])))
        assert heat.format == "PNG" and heat.size[0] >= 28
    status, body = call(port, "POST", "/predict?top_k=11", png_bytes(pixels[0]))
    assert status == 422 and "top_k" in body["detail"]


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header that claims side x side pixels, with a few bytes of data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def server_pid(port: int) -> int:
    import subprocess
    out = subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


def test_two_thousand_requests_a_fifth_malformed(server):
    port, model_path, test = server
    images = test.images[:400].numpy()
    expected = expected_probabilities(model_path, images).argmax(1)
    good = [png_bytes(images[i, 0]) for i in range(400)]
    jpeg = io.BytesIO()
    Image.fromarray(images[0, 0]).resize((200, 200)).save(jpeg, format="JPEG", quality=90)
    malformed = {  # what each must get
        "empty": (b"", "image/png", 422),
        "truncated JPEG": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "image/jpeg", 422),
        "text": (b"this is not an image, it is a sentence\n" * 5, "text/plain", 415),
        "oversized body": (b"\xff" * (11 * 2**20), "application/octet-stream", 413),
        "30000x30000 PNG": (bomb_png(), "image/png", 413),
    }
    jobs, kinds = [], []
    for i in range(2000):  # every fifth request malformed, the five kinds in turn
        if i % 5 == 4:
            name = list(malformed)[(i // 5) % 5]
            jobs.append(("/predict?top_k=1", malformed[name][0], malformed[name][1]))
            kinds.append(name)
        else:
            jobs.append(("/predict?top_k=1", good[i % 400], "image/png"))
            kinds.append(i % 400)
    pid = server_pid(port)
    asyncio.run(load("127.0.0.1", port, jobs[:200], 8))  # warm-up, then the memory baseline
    before = rss_mb(pid)
    results = asyncio.run(load("127.0.0.1", port, jobs, 32, timeout=60))
    after = rss_mb(pid)
    statuses = [r[0] for r in results]
    assert not [s for s in statuses if s >= 500 or s == 0], "5xx or dropped connections"
    for kind, (status, _, body) in zip(kinds, results):
        if isinstance(kind, str):
            assert status == malformed[kind][2], (kind, status, body[:200])
            assert json.loads(body)["detail"]  # a message, not an empty error
        else:
            assert status == 200, body[:200]
            assert json.loads(body)["results"][0]["top"][0]["label"] == str(expected[kind])
    assert sum(isinstance(k, str) for k in kinds) == 400
    assert after < before + 64, f"server memory grew from {before:.0f} to {after:.0f} MB"
    # A body sent without Content-Length (chunked) is counted as it arrives: 413 all the same.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/predict", body=iter([b"\x00" * 2**20] * 12), encode_chunked=True,
                 headers={"Content-Type": "image/png"})
    assert conn.getresponse().status == 413
    conn.close()
    status, health = call(port, "GET", "/health")
    assert status == 200 and health["images_served"] >= 1600


def test_page_classifies_an_uploaded_digit_and_a_drawing(server, tmp_path):
    from playwright.sync_api import sync_playwright
    require_browser()
    port, model_path, test = server
    label = int(test.labels[0])
    digit = tmp_path / f"digit-{label}.png"
    Image.fromarray(test.images[0, 0].numpy()).save(digit)
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
                page = browser.new_page(viewport=viewport)
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
                page.wait_for_function("document.getElementById('about').innerText.includes('10 classes')")
                page.set_input_files("#file", str(digit))
                page.wait_for_selector("#top-label", timeout=20_000)
                assert page.inner_text("#top-label") == str(label)
                page.wait_for_function("document.getElementById('heat').naturalWidth > 0", timeout=20_000)
                width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
                assert width[0] <= width[1], f"the page scrolls sideways at {name} width"
                page.screenshot(path=str(ARTIFACTS / f"serve-upload-{name}.png"), full_page=True)
                if name == "desktop":  # draw a '1': one vertical stroke down the middle of the pad
                    box = page.locator("#canvas").bounding_box()
                    x = box["x"] + box["width"] / 2
                    page.mouse.move(x, box["y"] + box["height"] * 0.15)
                    page.mouse.down()
                    for step in range(1, 21):
                        page.mouse.move(x, box["y"] + box["height"] * (0.15 + 0.7 * step / 20))
                    page.mouse.up()
                    page.click("#classify")
                    page.wait_for_function("document.querySelector('#result').innerText.includes('drawing')", timeout=20_000)
                    assert page.inner_text("#top-label") == "1"
                    page.screenshot(path=str(ARTIFACTS / "serve-drawing-desktop.png"), full_page=True)
                page.close()
        finally:
            browser.close()
    assert not errors, errors


def test_serve_refuses_bad_arguments_in_one_line(tmp_path):
    from conftest import run_main
    r = run_main("serve", str(tmp_path / "missing"), "--port", "8999")
    assert r.returncode == 2 and "no model file" in r.stderr and "Traceback" not in r.stderr


def test_serve_flags_default_to_the_documented_limits():
    from cnnkit.cli import build_parser
    from cnnkit.serve import Limits
    args = build_parser().parse_args(["serve", "m.safetensors"])
    limits = Limits()
    assert args.host == "127.0.0.1"  # this machine only, unless told otherwise
    assert (int(args.max_upload_mb * 2**20), args.max_images, args.max_pixels, args.timeout) == (
        limits.max_body_bytes, limits.max_images, limits.max_pixels, limits.timeout_seconds)
