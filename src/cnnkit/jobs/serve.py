"""`cnnkit serve`: the server (the serve package) on uvicorn, after its options are checked."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from ..errors import CnnkitError
from ..serve import Limits, Model, create_app, deadline_protocol

log = logging.getLogger("cnnkit.serve")  # the server's own logger: one name for all its lines


TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,}")  # what secrets.token_urlsafe() writes


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, runtime: str = "auto", max_batch: int = 32,
          window_ms: float = 0.0, limits: Limits | None = None, on_ready=None, token: str | None = None) -> None:
    """Run the server until interrupted. Binds 127.0.0.1 unless told otherwise. token: required
    as `Authorization: Bearer <token>` on every route but /health."""
    try:
        import httptools  # noqa: F401  (the read deadline is built on uvicorn's httptools protocol)
        import uvicorn
    except ImportError:
        raise CnnkitError("serving needs FastAPI, uvicorn and httptools: pip install 'cnnkit[serve]'") from None
    limits = limits or Limits()
    if limits.max_connections < 1:
        raise CnnkitError("--max-connections must be at least 1")
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise CnnkitError("the token must be at least 16 characters of A-Z, a-z, 0-9, '-', '_', '.' or '~' (safe in a "
                          "header and a URL): make one with python -c 'import secrets; print(secrets.token_urlsafe())'")
    if not (0 < limits.timeout_seconds < float("inf")):  # nan fails the comparison too
        raise CnnkitError("--timeout must be a positive number of seconds")
    model = Model(model_path, runtime, max_batch, window_ms, limits)
    app = create_app(model, token)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not token and not is_loopback(host):
        log.warning("warning: serving on %s without a token: anyone who can reach port %d of this machine can use "
                    "the model; set --token or CNNKIT_SERVE_TOKEN", host, port)
    if on_ready:
        on_ready(model)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=5,
                # uvicorn refuses when the open connections, the new one included, reach the limit
                limit_concurrency=limits.max_connections + 1, h11_max_incomplete_event_size=64 * 1024,
                http=deadline_protocol(limits.timeout_seconds))
