"""The ASGI layer in front of the FastAPI app: the token, the body's bound, the raw-body fast path
for /predict, and one log line per request."""
import hmac
import json
import logging
import time
from urllib.parse import parse_qs

from .limits import RequestError
from .model import Model

log = logging.getLogger("cnnkit.serve")  # the server's own logger: one name for all its lines

NEEDS_TOKEN = ("this server needs a token: send the header 'Authorization: Bearer <token>' "
               "(open the page as /?token=<token>)")


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
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), *extra]})
            await send({"type": "http.response.body", "body": body})

        too_big = f"the body is larger than {self.max_bytes:,} bytes"
        try:
            if not self.authorized(scope, headers):
                return await reply(401, {"detail": NEEDS_TOKEN}, close=declared not in (None, b"0"))
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
                return await self.answer_raw_body(scope, counted_receive, reply)

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

    async def answer_raw_body(self, scope, receive, reply) -> None:
        """The fast path: POST /predict with the image as the whole body, answered here with what
        FastAPI's route would answer (receive counts the body; reply sends the JSON)."""
        try:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            top_k, explain, label, coverage = query_options(query)
            payload = await self.model.answer([("body", b"".join(chunks))], top_k, explain, label, coverage)
        except RequestError as e:
            return await reply(e.status, {"detail": e.message}, close=e.status == 413)
        return await reply(200, payload)


def query_options(query: dict[str, list[str]]) -> tuple[int, bool, str | None, float | None]:
    """top_k, explain, label and coverage (None when absent) from a parsed query string, as FastAPI
    would read them for /predict (coverage's bounds are checked by Model.answer, for both paths)."""
    try:
        top_k = int(query.get("top_k", ["3"])[-1])
    except ValueError:
        raise RequestError(422, "top_k must be a whole number") from None
    flag = query.get("explain", ["false"])[-1].lower()
    if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise RequestError(422, "explain must be true or false")
    given = query.get("coverage", [""])[-1]
    try:
        coverage = float(given) if given else None  # `coverage=` (empty) is no coverage, as for label
    except ValueError:
        raise RequestError(422, "coverage must be a number between 0 and 1 (e.g. 0.95)") from None
    return top_k, flag in ("true", "1", "yes", "on"), query.get("label", [None])[-1], coverage
