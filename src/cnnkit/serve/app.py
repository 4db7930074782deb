"""The HTTP app: FastAPI's routes (/health, /model, the page, /predict) over a Model, behind Front."""
# No __future__ annotations here: FastAPI reads the handlers' annotations (Request) at run time.

from contextlib import asynccontextmanager
from importlib import resources

from ..errors import CnnkitError
from ..version import __version__
from .front import Front
from .limits import Limits, RequestError, too_many_images
from .model import Model


def create_app(model: Model, token: str | None = None):
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise CnnkitError("serving needs FastAPI and uvicorn: pip install 'cnnkit[serve]'") from None

    limits, info = model.limits, model.info
    names = info.class_names
    what = f"{len(names)} labels, any set of them per image" if info.task == "multi-label" else f"{len(names)} classes"

    @asynccontextmanager
    async def lifespan(app):
        await model.start()
        yield
        await model.stop()

    # No /docs or /redoc: their pages load scripts from a CDN, blank on an offline machine; the
    # schema itself is at /openapi.json for any OpenAPI viewer or client generator.
    app = FastAPI(title="cnnkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"A cnnkit image classifier: {what}, input {info.input}.")

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
        """Class names, task (and a multi-label model's thresholds), input size, test metrics, calibration,
        runtime, limits and version."""
        return model.description()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        """The page: pick, drop or (for 1-channel models) draw an image; top-k as bars (a multi-label
        model: its label set) beside the heatmap."""
        return resources.files("cnnkit").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/predict")
    async def predict(request: Request, top_k: int = 3, explain: bool = False, label: str | None = None,
                      coverage: float | None = None) -> dict:
        """One image (multipart file, or the raw body with an image content type) or several (multipart).
        A single-label model: the top-k labels with calibrated probabilities ("top"); with explain=true, a
        Grad-CAM heatmap per image (PNG data URL, "heatmap") for the top label.
        A multi-label model (top_k unused): the label set, as `cnnkit predict --json` writes it ("labels"
        present, most probable first, their "probabilities", every label's in "label_probabilities");
        with explain=true, "heatmaps": {label: PNG data URL} for each label present (the most probable
        if none is).
        label: explain that label instead (explain=true implied).
        coverage (e.g. 0.95): also each image's conformal prediction set ("set"; single-label, binary).
        (A raw body is answered by the front layer's fast path, with the same result; see Front.)"""
        return await model.answer(await uploads(request, limits), top_k, explain, label, coverage)

    return Front(app, model, token)


async def uploads(request, limits: Limits) -> list[tuple[str, bytes]]:
    """[(name, bytes)] of a request (Starlette's): the multipart files (any field name), or the raw
    body as one image."""
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
