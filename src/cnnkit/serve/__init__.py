"""`cnnkit serve`: a model file behind HTTP (FastAPI on uvicorn), with a page for people.

    limits.py      Limits (the bounds below), RequestError (a request's status and message), an upload decoded
    model.py       Model: the runtime, the batcher (dynamic batching), the /predict answer, Grad-CAM heatmaps
    front.py       Front: the ASGI layer before FastAPI: the token, the body's bound, the raw-body fast path, the log
    app.py         create_app(model, token): FastAPI's routes behind Front
    connection.py  deadline_protocol(seconds): uvicorn's protocol with the read deadline (408), the head bound
                   (431) and a lingering close

Every input is bounded: the body's bytes (413, counted as it arrives, not trusted from headers), the
images per request (413), the pixels an image header claims (413, before decoding: decompression
bombs), the time to send a request (408 and the connection closed: slow headers or a body trickled a
byte at a time cannot hold a connection), the time a request may take (504), the open connections
(503) and the requests waiting (503). A body that is not an image gets 415, a damaged image 422.
Nothing a client sends reaches a traceback: any error is that request's.
Where: Front counts the body; Model the images, the time and the waiting; decode_upload the pixels;
deadline_protocol the time to send; uvicorn's limit_concurrency (jobs/serve.py sets it) the connections.

With a token (--token or $CNNKIT_SERVE_TOKEN), every route but /health needs `Authorization: Bearer
<token>` (compared in constant time; the page takes it once as `/?token=...`); a server bound to an
address other than loopback without one is warned about.
"""
from .app import create_app
from .connection import LINGER_SECONDS, MAX_HEAD_BYTES, LingeringTransport, deadline_protocol
from .front import Front, query_options
from .limits import Limits, RequestError, decode_upload, too_many_images
from .model import Model, heatmap_png

__all__ = ["LINGER_SECONDS", "MAX_HEAD_BYTES", "Front", "Limits", "LingeringTransport", "Model", "RequestError",
           "create_app", "deadline_protocol", "decode_upload", "heatmap_png", "query_options", "too_many_images"]
