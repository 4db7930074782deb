"""`cnnkit serve`: a model file behind HTTP (FastAPI on uvicorn), with a page for people.

Uploads are queued; one batcher task takes everything waiting (up to max_batch images) and, in a
single inference thread, decodes them and runs the model once for all of them. While a batch runs
the next one gathers, so a lone request waits for nothing and under load batches grow by themselves:
throughput grows with load instead of each request paying for its own forward pass
(benchmarks/serving/serve_load.py measures both in one run).

Every input is bounded: the body's bytes (413, counted as it arrives, not trusted from headers), the
images per request (413), the pixels an image header claims (413, before decoding: decompression
bombs), the time to send a request (408 and the connection closed: slow headers or a body trickled a
byte at a time cannot hold a connection), the time a request may take (504), the open connections
(503) and the requests waiting (503). A body that is not an image gets 415, a damaged image 422.
Nothing a client sends reaches a traceback: any error is that request's.

With a token (--token or $CNNKIT_SERVE_TOKEN), every route but /health needs `Authorization: Bearer
<token>` (compared in constant time; the page takes it once as `/?token=...`); a server bound to an
address other than loopback without one is warned about.
"""
# No __future__ annotations here: FastAPI reads the handlers' annotations (Request) at run time.

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
from PIL import Image, UnidentifiedImageError

from .decode import ImageTooLarge, decode_image
from .errors import CnnkitError
from .modelfile import read_info, resolve_model_path
from .runtimes import choose_runtime
from .version import __version__

log = logging.getLogger("cnnkit.serve")


@dataclass
class Limits:
    max_body_bytes: int = 10 * 2**20  # a request's body, all images together
    max_images: int = 64  # images in one request
    max_pixels: int = 40_000_000  # width x height an image header may claim (a 40-megapixel photo)
    timeout_seconds: float = 10.0  # from the body's arrival to the answer
    max_waiting: int = 1024  # images queued for the model; past it, 503 and Retry-After
    max_connections: int = 512  # open connections; past it, uvicorn answers 503


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def too_many_images(limit: int) -> str:
    return f"at most {limit} images per request (the server's --max-images); send them in several requests"


# ----------------------------------------------------------------------------- decoding one upload
def decode_upload(data: bytes, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """uint8 (C, size, size) from an uploaded file's bytes, or a RequestError saying what is wrong."""
    if not data:
        raise RequestError(422, "the image is empty (0 bytes)")
    try:
        return decode_image(io.BytesIO(data), size, channels, max_pixels=max_pixels)
    except (ImageTooLarge, Image.DecompressionBombError) as e:
        raise RequestError(413, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise RequestError(415, "not an image this server can read (send JPEG, PNG, GIF, BMP, WebP or TIFF)") from None
    except Exception as e:  # truncated or damaged data: the decoder's own reason
        raise RequestError(422, f"the image could not be decoded: {str(e).splitlines()[0][:200]}") from None


def heatmap_png(image: np.ndarray, heat: np.ndarray) -> str:
    """A PNG data URL: the image (C, H, W) uint8 under a Grad-CAM heatmap (H, W) in [0, 1], red = evidence."""
    rgb = np.repeat(image, 3, 0) if image.shape[0] == 1 else image
    rgb = rgb.transpose(1, 2, 0).astype(np.float32)  # (H, W, 3)
    colour = np.stack([heat, np.zeros_like(heat), 1 - heat], -1) * 255  # blue (none) .. red (most)
    alpha = 0.35 + 0.4 * heat[..., None]
    out = (rgb * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
    side = max(out.shape[0], 224)  # small inputs (28x28) enlarged so a person can see them
    img = Image.fromarray(out).resize((side, side), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- the model and its batcher
class Model:
    """The runtime (measured fastest, or the one asked for), the batcher, and Grad-CAM on demand."""

    def __init__(self, model_path: str | Path, runtime: str = "auto", max_batch: int = 32, window_ms: float = 0.0,
                 limits: Limits | None = None):
        path = Path(model_path)
        if path.suffix == ".onnx":
            raise CnnkitError("serve takes the model file or run folder (it also explains with Grad-CAM); "
                              "--runtime onnx runs its ONNX export")
        self.path = resolve_model_path(path)
        self.info = read_info(self.path)  # the file is parsed once: the runtime and /model use this
        self.side = self.info.square_side("serve")
        if max_batch < 1:
            raise CnnkitError("--max-batch must be at least 1")
        # A server runs for long: with `auto` it measures both runtimes at start (once per model file).
        self.runtime, self.runtime_why = choose_runtime(self.path, self.info, runtime, False, measure=True)
        self.max_batch, self.window_seconds = max_batch, window_ms / 1000
        self.limits = limits or Limits()
        # One thread runs the model: batches follow one another, each using all intra-op threads.
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="cnnkit-inference")
        self.queue: asyncio.Queue | None = None
        self.waiting = 0
        self.torch_model = None  # loaded on the first explain request
        self.explain_lock = threading.Lock()
        self.batches = self.images = 0

    # The batcher: it waits for one image, takes every other image already waiting (up to max_batch;
    # with --batch-window-ms, after that long a pause), and runs them as one batch.
    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self.batcher())

    async def stop(self) -> None:
        self.task.cancel()
        self.inference.shutdown(wait=False, cancel_futures=True)

    async def batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            if self.window_seconds > 0:  # optional: hold the first image a moment for others to join
                await asyncio.sleep(self.window_seconds)
            # Everything that arrived while the last batch ran joins this one: no waiting at low load,
            # large batches at high load.
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            live = [(data, fut) for data, fut in items if not fut.done()]  # timed-out requests are gone
            if not live:
                continue
            try:
                outcome = await loop.run_in_executor(self.inference, self.decode_and_run, [d for d, _ in live])
                self.batches, self.images = self.batches + 1, self.images + len(live)
                for (_, fut), result in zip(live, outcome):
                    if not fut.done():
                        if isinstance(result, RequestError):
                            fut.set_exception(result)
                        else:
                            fut.set_result(result)
            except Exception as e:  # a failure of ours: every request of the batch hears of it
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)

    def decode_and_run(self, uploads: list[bytes]) -> list:
        """In the inference thread: decode each upload (an error is that image's alone), then one
        forward pass for all that decoded. Per image: (pixels (C, H, W), probabilities (K,)) or a RequestError.
        Decoding here rather than in a thread of its own saves a thread hand-off per request
        (measured: benchmarks/NOTES.md, serving)."""
        decoded: list = []
        for data in uploads:
            try:
                decoded.append(decode_upload(data, self.side, self.info.input.channels, self.limits.max_pixels))
            except RequestError as e:
                decoded.append(e)
        good = [d for d in decoded if not isinstance(d, RequestError)]
        probs = iter(self.runtime(np.stack(good)) if good else [])
        return [d if isinstance(d, RequestError) else (d, next(probs)) for d in decoded]

    async def classify(self, uploads: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(pixels, probabilities)] for each upload's bytes, through the batcher; the first bad image
        raises its RequestError."""
        if self.waiting + len(uploads) > self.limits.max_waiting:
            raise RequestError(503, "the server is busy (too many images waiting); retry in a moment")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in uploads]
        self.waiting += len(uploads)
        try:
            for data, fut in zip(uploads, futures):
                self.queue.put_nowait((data, fut))
            return list(await asyncio.gather(*futures))
        finally:
            self.waiting -= len(uploads)

    async def answer(self, files: list[tuple[str, bytes]], top_k: int, explain: bool) -> dict:
        """The /predict response for [(name, bytes)], within the time limit; RequestError otherwise."""
        start = time.perf_counter()
        names = self.info.class_names
        if not 1 <= top_k <= len(names):
            raise RequestError(422, f"top_k must be between 1 and {len(names)}")
        if len(files) > self.limits.max_images:
            raise RequestError(413, too_many_images(self.limits.max_images))

        async def handle() -> list[dict]:
            classified = await self.classify([data for _, data in files])
            results = []
            for (name, _), (image, p) in zip(files, classified):
                order = np.argsort(-p, kind="stable")[:top_k]
                row = {"filename": name, "top": [{"label": names[i], "probability": float(p[i])} for i in order]}
                if explain:  # in the default thread pool: the event loop keeps serving meanwhile
                    row["heatmap"] = await asyncio.get_running_loop().run_in_executor(None, self.explain, image,
                                                                                      int(order[0]))
                results.append(row)
            return results

        try:
            results = await asyncio.wait_for(handle(), self.limits.timeout_seconds)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than {self.limits.timeout_seconds:g} s") from None
        return {"results": results, "runtime": self.runtime.name, "milliseconds": (time.perf_counter() - start) * 1000}

    def explain(self, image: np.ndarray, class_index: int) -> str:
        """Grad-CAM for one image (C, H, W) uint8 and class, as a PNG data URL (PyTorch, fp32)."""
        import torch

        from .explain import gradcam
        from .modelfile import load_model
        from .preprocess import Preprocess
        with self.explain_lock:  # one backward pass at a time; the model's hooks are not thread-safe
            if self.torch_model is None:  # the PyTorch runtime's model if it runs one, else loaded now
                self.torch_model = getattr(self.runtime, "model", None) or load_model(self.path, info=self.info)[0]
                self.preprocess = Preprocess.from_info(self.info)
            x = self.preprocess(torch.from_numpy(np.ascontiguousarray(image))[None])
            heat, _ = gradcam(self.torch_model, x, torch.tensor([class_index]))
        return heatmap_png(image, heat[0].numpy())

    def description(self) -> dict:
        """What /model answers."""
        m = self.info
        return {"cnnkit_version": __version__, "model_file": str(self.path), "class_names": m.class_names,
                "input": dataclasses.asdict(m.input), "architecture": m.name, "metrics": m.numeric_metrics(),
                "calibration": m.calibration(), "runtime": self.runtime.name,
                "runtime_choice": self.runtime_why, "max_batch": self.max_batch,
                "limits": self.limits.__dict__, "data": m.data.name or None}


# ----------------------------------------------------------------------------- the app
class Front:
    """The ASGI layer in front of the FastAPI app.

    - Bounds every body: at most max_body_bytes, counted as it arrives (a client may send no
      Content-Length, or a false one); past it the request is answered 413 and not read further.
    - Answers POST /predict with a raw image body itself, without FastAPI's routing, validation and
      response layers: the same Model.answer, so the same JSON. Measured: that halves the server's
      work per request for a small model (benchmarks/NOTES.md, serving), which is most of the work
      when batching makes the model's share small. Multipart uploads and every other route go to
      FastAPI, which also documents /predict in the OpenAPI schema.
    - Logs one line per request: method, path, status, milliseconds, body bytes."""

    def __init__(self, app, model: Model, token: str | None = None):
        self.app, self.model, self.max_bytes = app, model, model.limits.max_body_bytes
        self.token = token.encode() if token else None

    def authorized(self, scope, headers: dict) -> bool:
        """No token set, /health, or the right token: as `Authorization: Bearer ...`, or for the page
        (GET /) as ?token=..., which the page then sends as the header. Constant-time comparisons."""
        if self.token is None or scope["path"] == "/health":
            return True
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            return True
        if scope["path"] == "/" and scope["method"] == "GET":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return hmac.compare_digest(query.get("token", [""])[-1].encode(), self.token)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, received, status = time.perf_counter(), 0, [0]
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")

        async def reply(code: int, payload: dict, close: bool = False) -> None:
            body = json.dumps(payload).encode()
            extra = [(b"connection", b"close")] if close else []
            if code == 503:
                extra.append((b"retry-after", b"1"))
            if code == 401:
                extra.append((b"www-authenticate", b'Bearer realm="cnnkit"'))
            status[0] = code
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    *extra]})
            await send({"type": "http.response.body", "body": body})

        too_big = f"the body is larger than {self.max_bytes:,} bytes"
        try:
            if not self.authorized(scope, headers):
                return await reply(401, {"detail": "this server needs a token: send the header "
                                                   "'Authorization: Bearer <token>' (open the page as /?token=<token>)"},
                                   close=declared not in (None, b"0"))
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                return await reply(413, {"detail": too_big}, close=True)  # unread body: the connection ends

            async def counted_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_bytes:
                        raise RequestError(413, too_big)
                return message

            if (scope["method"] == "POST" and scope["path"] == "/predict"
                    and not headers.get(b"content-type", b"").startswith(b"multipart/")):
                try:
                    chunks, more = [], True
                    while more:
                        message = await counted_receive()
                        if message["type"] == "http.disconnect":
                            return
                        chunks.append(message.get("body", b""))
                        more = message.get("more_body", False)
                    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                    top_k, explain = query_options(query)
                    payload = await self.model.answer([("body", b"".join(chunks))], top_k, explain)
                except RequestError as e:
                    return await reply(e.status, {"detail": e.message}, close=e.status == 413)
                return await reply(200, payload)

            async def watched_send(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.app(scope, counted_receive, watched_send)
            except RequestError as e:
                if status[0]:
                    raise
                await reply(e.status, {"detail": e.message}, close=True)
        finally:
            log.info("%s %s %d %.1f ms %d bytes", scope.get("method"), scope.get("path"), status[0],
                     (time.perf_counter() - start) * 1000, received)


def query_options(query: dict[str, list[str]]) -> tuple[int, bool]:
    """top_k and explain from a parsed query string, as FastAPI would read them for /predict."""
    try:
        top_k = int(query.get("top_k", ["3"])[-1])
    except ValueError:
        raise RequestError(422, "top_k must be a whole number") from None
    flag = query.get("explain", ["false"])[-1].lower()
    if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise RequestError(422, "explain must be true or false")
    return top_k, flag in ("true", "1", "yes", "on")


def create_app(model: Model, token: str | None = None):
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise CnnkitError("serving needs FastAPI and uvicorn: pip install 'cnnkit[serve]'") from None
    from contextlib import asynccontextmanager

    limits, info = model.limits, model.info
    names = info.class_names

    @asynccontextmanager
    async def lifespan(app):
        await model.start()
        yield
        await model.stop()

    # No /docs or /redoc: their pages load scripts from a CDN, blank on an offline machine; the
    # schema itself is at /openapi.json for any OpenAPI viewer or client generator.
    app = FastAPI(title="cnnkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"A cnnkit image classifier: {len(names)} classes, input {info.input}.")

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the model is loaded and the batcher runs."""
        return {"status": "ok", "images_served": model.images, "batches": model.batches}

    @app.get("/model")
    async def model_info() -> dict:
        """Class names, input size, test metrics, calibration, runtime, limits and version."""
        return model.description()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        """The page: pick, drop or (for 1-channel models) draw an image; top-k as bars beside the heatmap."""
        return resources.files("cnnkit").joinpath("static/index.html").read_text(encoding="utf-8")

    async def uploads(request: Request) -> list[tuple[str, bytes]]:
        """[(name, bytes)]: the multipart files (any field name), or the raw body as one image."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=limits.max_images, max_fields=limits.max_images + 16)
            except RequestError:
                raise
            except Exception as e:
                reason = str(e).splitlines()[0][:200]
                if "Too many files" in reason:  # Starlette's MultiPartException past max_files
                    raise RequestError(413, too_many_images(limits.max_images)) from None
                raise RequestError(422, f"malformed multipart body: {reason}") from None
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
            await form.close()
            if not files:
                raise RequestError(422, "the multipart body holds no file: send the image in a file field")
            return files
        return [("body", await request.body())]

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 3, explain: bool = False) -> dict:
        """One image (multipart file, or the raw body with an image content type) or several (multipart):
        top-k labels with calibrated probabilities; with explain=true, a Grad-CAM heatmap per image (PNG data URL).
        (A raw body is answered by the front layer's fast path, with the same result; see Front.)"""
        return await model.answer(await uploads(request), top_k, explain)

    return Front(app, model, token)


# ----------------------------------------------------------------------------- the connection
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together; past it, 431 (a photo upload needs a few hundred)
LINGER_SECONDS = 3.0  # after answering and closing, how long the rest of a client's request is read and dropped


class LingeringTransport:
    """A connection's transport whose close() is a lingering close, as nginx and Apache do it.

    A server that answers before reading the whole request (a 413 for an 11 MB upload, a 408, a 401)
    and then closes with the client's bytes still arriving makes the kernel send a reset, and a reset
    discards the answer in the client's receive buffer: the client sees "connection reset", not the
    413 (seen in CI under load, when the answer lost the race with the body). So close() sends the
    answer and a FIN (shutdown of our side only), then reads and drops what the client still sends
    until it closes its side or LINGER_SECONDS pass; only then is the socket closed. The connection
    still counts against --max-connections meanwhile, so lingering is bounded like any other."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False
        self._timer = None

    def __getattr__(self, name):  # everything else is the real transport's
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return self.abort_linger()
        self.lingering = True
        try:
            self._transport.write_eof()  # after the buffered answer: FIN, our side only
        except (OSError, RuntimeError):  # already shut, or a transport that cannot half-close
            return self.abort_linger()
        self._transport.resume_reading()  # flow control may have paused it mid-body
        self._timer = self._protocol.loop.call_later(LINGER_SECONDS, self.abort_linger)

    def abort_linger(self) -> None:
        """The real close (the client closed its side, or its time is up)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()


def deadline_protocol(seconds: float):
    """uvicorn's httptools protocol with a read deadline: a request whose headers and body have not
    all arrived `seconds` after its first byte (or after the connection opened) is answered 408 and
    its connection closed, and one whose request line and headers pass MAX_HEAD_BYTES gets 431.
    uvicorn itself bounds only idle keep-alive connections, so a client sending a byte every few
    seconds would otherwise hold a connection, and a task, for ever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DeadlineProtocol(HttpToolsProtocol):
        deadline = None
        head_bytes = 0

        def arm(self, restart: bool = False) -> None:
            if restart:
                self.disarm()
            if self.deadline is None:
                self.deadline = self.loop.call_later(seconds, self.too_slow)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def busy(self) -> bool:
            """An earlier request of this connection is read and being answered (or queued behind one)."""
            cycle = self.cycle
            return bool(self.pipeline) or (cycle is not None and not cycle.more_body and not cycle.response_complete)

        def connection_made(self, transport) -> None:
            super().connection_made(LingeringTransport(transport, self))
            self.arm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            if self.transport.lingering:  # a reset ends it early: cancel the timer too
                self.transport.abort_linger()
            super().connection_lost(exc)

        def eof_received(self):
            if self.transport.lingering:  # the client has sent all it will: close now
                self.transport.abort_linger()
            return super().eof_received()

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:  # the rest of a request already answered: dropped
                return
            # Bytes between requests (a stray CRLF) start no message: the clock starts with them too,
            # or such a client would hold the connection with no timer at all.
            if not self.busy():
                self.arm()
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_bytes = 0
            self.arm(restart=not self.busy())  # each request gets the whole window from its first byte

        def on_url(self, url: bytes) -> None:
            self.count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.count_head(len(name) + len(value))
            super().on_header(name, value)

        def count_head(self, n: int) -> None:
            self.head_bytes += n
            if self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.refuse(431, "Request Header Fields Too Large", f"the request line and headers pass {MAX_HEAD_BYTES:,} bytes")

        def on_message_complete(self) -> None:
            self.disarm()  # all of it arrived: from here the request's own --timeout (504) applies
            super().on_message_complete()

        def too_slow(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            if self.busy():  # reading waits for an earlier answer (pipelining): not the client's delay
                self.arm()
                return
            self.refuse(408, "Request Timeout", f"the request was not sent within {seconds:g} s")

        def refuse(self, status: int, reason: str, detail: str) -> None:
            """Answer `status` (unless a response has begun) and close the connection."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                body = json.dumps({"detail": detail}).encode()
                self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
                                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
                log.info("client %s: %d (%s)", self.client, status, detail)
            if cycle is not None and not cycle.response_complete:  # the app's receive() sees a disconnect
                cycle.disconnected = True
                cycle.message_event.set()
            self.disarm()
            self.transport.close()

    return DeadlineProtocol
