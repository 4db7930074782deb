"""cnnkit serve: a model over HTTP, a JSON API and a page."""
from __future__ import annotations

import os
import sys

from ..errors import CnnkitError
from .common import RUNTIMES


def add(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: a JSON API and a page to drop or draw images on",
                        description="An ASGI app (FastAPI on uvicorn). POST /predict takes one image (multipart or "
                                    "raw body) or several (multipart); GET / is a page for people; GET /model, "
                                    "/health, /openapi.json. Concurrent requests are batched.")
    p.add_argument("model", help="model file or run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                        "0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="auto: the runtime measured fastest for this model on this machine (int8 ones where the "
                         "model's int8 export lost at most 1 point of test accuracy)")
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most (1: no batching)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                    help="how long the first waiting image waits for others to join its batch, in milliseconds "
                         "(default 0: a batch is whatever arrived while the previous one ran)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body, in MiB (413 beyond)")
    p.add_argument("--max-images", type=int, default=64, help="images per request at most")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                    help="largest width x height an image may claim (413 beyond, checked before decoding)")
    p.add_argument("--timeout", type=float, default=10.0,
                    help="seconds a request may take (504 beyond), and to send it (408 and closed beyond)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections at most (503 beyond)")
    p.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN' on every route but /health (the page: /?token=TOKEN); "
                         "$CNNKIT_SERVE_TOKEN sets it without showing it in the process list")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.serve import serve
    from ..serve import Limits

    if not 0 < args.port < 65536:
        raise CnnkitError("--port must be between 1 and 65535")
    limits = Limits(max_body_bytes=int(args.max_upload_mb * 2**20), max_images=args.max_images,
                    max_pixels=args.max_pixels, timeout_seconds=args.timeout, max_connections=args.max_connections)
    token = args.token if args.token is not None else os.environ.get("CNNKIT_SERVE_TOKEN") or None

    def ready(model) -> None:
        kind = "labels, multi-label" if model.info.task == "multi-label" else "classes"
        print(f"serving {model.path} ({model.info.name}, {model.info.num_classes} {kind}, "
              f"runtime {model.runtime.name}: {model.runtime_why}) on http://{args.host}:{args.port}/ "
              f"(API: /predict, /model, /health, /openapi.json){'; a token is required' if token else ''}; "
              "Ctrl-C stops", file=sys.stderr, flush=True)

    serve(args.model, host=args.host, port=args.port, runtime=args.runtime, max_batch=args.max_batch,
          window_ms=args.batch_window_ms, limits=limits, on_ready=ready, token=token)
    return 0
