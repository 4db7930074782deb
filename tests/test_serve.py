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
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit
from benchmarks.serving.serve_load import load, start_server  # the benchmark's client and server start-up
from conftest import ARTIFACTS, shared
from test_report import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, require_browser


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
        # onnx, not auto: auto may pick int8, whose answers differ from PyTorch's (the probabilities below are
        # compared at 1e-4); auto's choice is tested in tests/test_int8.py and test_export.py
        proc, port = start_server(str(run.run_dir), 32, ["--runtime", "onnx"])
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
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["input"] == {"channels": 1, "height": 28, "width": 28}
    assert info["metrics"]["test_accuracy"] > 0.97 and info["runtime"] == "onnx"
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
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + chunk(b"IEND", b""))


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def server_pid(port: int) -> int:
    import subprocess
    out = subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0])


@pytest.mark.slow  # over 7 s: the fast subset (-m 'not slow') stays under 3 minutes
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

    async def everything():
        """The load, 50 slow clients trickling their headers or bodies, and /health polled throughout."""
        slow = [asyncio.create_task(slow_client(port, headers=i % 2 == 0)) for i in range(50)]
        health, done = [], asyncio.Event()

        async def poll():
            while not done.is_set():
                start = asyncio.get_running_loop().time()
                status, _ = await asyncio.to_thread(call, port, "GET", "/health")
                health.append((status, asyncio.get_running_loop().time() - start))
                await asyncio.sleep(0.5)
        poller = asyncio.create_task(poll())
        results = await load("127.0.0.1", port, jobs, 32, timeout=60)
        ended = await asyncio.gather(*slow)
        done.set()
        await poller
        return results, ended, health

    results, slow_ended, health = asyncio.run(everything())
    after = rss_mb(pid)
    failed = [(kind, status, seconds, body[:120]) for kind, (status, seconds, body) in zip(kinds, results)
              if status >= 500 or status == 0]
    assert not failed, f"5xx or dropped connections: {failed[:10]}"
    timeout = 10.0  # the server's --timeout (the default)
    for what, seconds, status in slow_ended:  # each answered 408 or closed within --timeout + 2 s
        assert seconds <= timeout + 2 and status in (408, None), (what, seconds, status)
    assert sum(status == 408 for _, _, status in slow_ended) >= 25
    assert len(health) >= 10 and all(status == 200 and seconds < 10 for status, seconds in health), health
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


async def slow_client(port: int, headers: bool, every: float = 3.0) -> tuple[str, float, int | None]:
    """A client sending its request a byte every `every` seconds (its headers, or after whole headers
    its body): (what, seconds until the server answered or closed, the status answered or None)."""
    start = asyncio.get_running_loop().time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    if not headers:
        writer.write(head)
    trickle = head if headers else b"\x89" * 1000

    async def send():
        try:
            for byte in trickle:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(every)
        except (ConnectionError, RuntimeError):
            pass
    sender = asyncio.create_task(send())
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
    except (ConnectionError, asyncio.TimeoutError):
        line = b""
    seconds = asyncio.get_running_loop().time() - start
    sender.cancel()
    writer.close()
    return ("headers" if headers else "body"), seconds, (int(line.split()[1]) if line else None)


def test_an_oversized_upload_sent_without_waiting_still_reads_its_413(server):
    """A client that sends all 11 MB at once (as requests and http.client do; no Expect: 100-continue)
    is answered 413 after the headers, while its body is still arriving. The server's lingering close
    reads and drops the rest, so the client reads the 413 rather than a connection reset."""
    port, _, _ = server
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/predict", body=b"\xff" * (11 * 2**20), headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        assert response.status == 413 and b"larger than" in response.read()
        conn.close()
    assert call(port, "GET", "/health")[0] == 200


def test_too_many_images_get_413_naming_the_limit(server):
    port, _, test = server
    boundary = "b"
    one = png_bytes(test.images[0, 0].numpy())
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"; filename=\"<img src=x "
                     f"onerror=alert({i})>.png\"\r\nContent-Type: image/png\r\n\r\n".encode() + one + b"\r\n"
                     for i in range(70))
    status, body = call(port, "POST", "/predict", parts + b"--b--\r\n",
                        {"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 413 and "--max-images" in body["detail"] and "64" in body["detail"], body
    status, body = call(port, "POST", "/predict", parts[:len(parts) // 70 * 2] + b"--b--\r\n",
                        {"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 200 and body["results"][0]["filename"] == "<img src=x onerror=alert(0)>.png"  # data, not markup


@pytest.mark.slow  # a second server and a browser (11 s)
def test_a_token_guards_every_route_but_health(server, tmp_path):
    from conftest import run_main
    port, model_path, test = server
    token = "s3cret-token-for-the-test"
    proc, guarded = start_server(str(model_path.parent), 8,
                                 ["--token", token, "--timeout", "3", "--max-connections", "4",
                                  "--runtime", "torch"])  # no runtime measurement: this test is about the token
    try:
        digit = png_bytes(test.images[0, 0].numpy())
        assert call(guarded, "GET", "/health")[0] == 200  # liveness probes carry no secrets
        for path, method in (("/model", "GET"), ("/predict", "POST"), ("/", "GET"), ("/openapi.json", "GET")):
            status, body = call(guarded, method, path, digit, {"Content-Type": "image/png"})
            assert status == 401 and "Authorization: Bearer" in body["detail"], (path, status)
            wrong = call(guarded, method, path, digit, {"Content-Type": "image/png", "Authorization": "Bearer nope"})
            assert wrong[0] == 401
        good = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
        status, body = call(guarded, "POST", "/predict", digit, good)
        assert status == 200 and body["results"][0]["top"][0]["label"] == str(int(test.labels[0]))
        assert call(guarded, "GET", "/model", headers=good)[0] == 200
        assert call(guarded, "GET", f"/?token={token}")[0] == 200  # the page, opened once with the token
        assert call(guarded, "GET", "/?token=wrong")[0] == 401
        # Slow headers against --timeout 3: answered 408 within 3 + 2 s.
        what, seconds, status = asyncio.run(slow_client(guarded, headers=True, every=1.0))
        assert status == 408 and seconds <= 5, (what, seconds, status)
        asyncio.run(connection_limits(guarded, f"Bearer {token}", digit))
        page_with_token(guarded, token, test)
    finally:
        proc.terminate()
        proc.wait(10)
    r = run_main("serve", str(model_path), "--token", "short")
    assert r.returncode == 2 and "at least 16 characters" in r.stderr


async def connection_limits(port: int, auth: str, digit: bytes) -> None:
    """Against a server with --timeout 3 and --max-connections 4: a kept-alive connection serves a
    second request; a stray CRLF after a request does not hold the connection past the deadline;
    headers past 64 KB get 431; a fifth open connection gets 503."""
    def request(extra: str = "") -> bytes:
        return (f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: image/png\r\n{extra}"
                f"Content-Length: {len(digit)}\r\n\r\n").encode() + digit

    async def status_of(reader) -> int:
        line = await asyncio.wait_for(reader.readline(), 30)
        length = 0
        while (header := await reader.readline()) not in (b"\r\n", b""):
            if header.lower().startswith(b"content-length:"):
                length = int(header.split(b":")[1])
        await reader.readexactly(length)
        return int(line.split()[1])

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request())
    assert await status_of(reader) == 200
    await asyncio.sleep(1)
    writer.write(request())  # the same connection, kept alive
    assert await status_of(reader) == 200
    start = asyncio.get_running_loop().time()
    writer.write(b"\r\n")  # then a stray CRLF and silence
    await asyncio.wait_for(reader.read(), 10)  # closed (with or without a 408), not held
    assert asyncio.get_running_loop().time() - start <= 3 + 2
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("X-Padding: " + "a" * 70_000 + "\r\n"))
    assert await status_of(reader) == 431
    writer.close()

    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request())
    assert await status_of(reader) == 503
    for _, w in [*held, (reader, writer)]:
        w.close()


def page_with_token(port: int, token: str, test) -> None:
    """The page, opened as /?token=..., classifies an upload: it sends the token with its calls."""
    from playwright.sync_api import sync_playwright
    require_browser()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        digit = Path(tmp) / "digit.png"
        Image.fromarray(test.images[0, 0].numpy()).save(digit)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=DESKTOP)
            page.goto(f"http://127.0.0.1:{port}/?token={token}", wait_until="networkidle")
            page.wait_for_function("document.getElementById('about').innerText.includes('10 classes')")
            page.set_input_files("#file", str(digit))
            page.wait_for_selector("#top-label", timeout=20_000)
            assert page.inner_text("#top-label") == str(int(test.labels[0]))
        finally:
            browser.close()


def test_a_server_on_the_network_without_a_token_is_warned_about(server, monkeypatch, caplog):
    import logging

    import uvicorn

    from cnnkit.jobs.serve import is_loopback, serve
    _, model_path, _ = server
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))  # no socket is opened
    with caplog.at_level(logging.WARNING, logger="cnnkit.serve"):
        serve(model_path, host="0.0.0.0")
        serve(model_path, host="0.0.0.0", token="a-long-enough-token")
        serve(model_path, host="127.0.0.1")
    warnings = [r.getMessage() for r in caplog.records if "without a token" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "CNNKIT_SERVE_TOKEN" in warnings[0]
    assert len(started) == 3 and started[0]["limit_concurrency"] == 513  # 512 open connections, the 513th refused
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("192.168.1.7")


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
                    page.wait_for_function("document.querySelector('#result').innerText.includes('drawing')",
                                           timeout=20_000)
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
    assert (int(args.max_upload_mb * 2**20), args.max_images, args.max_pixels, args.timeout, args.max_connections) == (
        limits.max_body_bytes, limits.max_images, limits.max_pixels, limits.timeout_seconds, limits.max_connections)
    assert args.token is None
