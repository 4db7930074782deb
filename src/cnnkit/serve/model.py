"""The model behind the server: its runtime, the batcher, the /predict answer, and Grad-CAM heatmaps.

A single-label model answers each image with its top-k classes; a multi-label model with its label
set, as `cnnkit predict --json` writes it (multilabel.label_set): the labels whose probability (one sigmoid
each) reaches the model file's threshold for it, most probable first, and every label's probability.

Uploads are queued; one batcher task takes everything waiting (up to max_batch images) and, in a
single inference thread, decodes them and runs the model once for all of them. While a batch runs
the next one gathers, so a lone request waits for nothing and under load batches grow by themselves:
throughput grows with load instead of each request paying for its own forward pass
(benchmarks/serving/serve_load.py measures both in one run).
"""
import asyncio
import base64
import dataclasses
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .. import conformal
from ..errors import CnnkitError
from ..modelfile import read_info, resolve_model_path
from ..multilabel import label_set
from ..runtimes import choose_runtime
from ..version import __version__
from .limits import Limits, RequestError, decode_upload, too_many_images

SERVED_TASKS = ("single-label", "multi-label", "binary")
log = logging.getLogger("cnnkit.serve")


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
        if self.info.task not in SERVED_TASKS:
            raise CnnkitError(f"this is a {self.info.task} model: cnnkit serve handles "
                              f"{', '.join(SERVED_TASKS)} models only so far")
        # multi-label: label k is present when its probability reaches thresholds[k] (K,); None: top-k classes
        self.thresholds = (np.array(self.info.decision_thresholds)
                           if self.info.task == "multi-label" else None)
        # binary: answered as two classes, the decided one first (the second where p >= this threshold)
        self.binary_threshold = (self.info.decision_thresholds[0] if self.info.task == "binary"
                                 else None)
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
        # coverage requests: the model file's conformal record; a file written before cnnkit stored one gets it
        # computed from its validation split on the first such request (or the reason it cannot be, kept)
        self.conformal, self.conformal_source = self.info.conformal, "stored in the model file"
        self.conformal_error: str | None = None

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

    async def answer(self, files: list[tuple[str, bytes]], top_k: int, explain: bool, label: str | None = None,
                     coverage: float | None = None) -> dict:
        """The /predict response for [(name, bytes)], within the time limit; RequestError otherwise.
        top_k: a single-label model's classes per image (a multi-label model answers its label set).
        label: explain this label's evidence (explain implied) rather than the default ones (result_row).
        coverage: each row also gets `set`, its conformal prediction set (class names, most probable
        first), and the response `coverage`; absent, the response is as without it."""
        start = time.perf_counter()
        threshold = None if coverage is None else await self.set_threshold(coverage)
        names = self.info.class_names
        label = label or None  # `label=` (empty) is no label, as Front's query parsing reads it
        if self.thresholds is None and not 1 <= top_k <= len(names):
            raise RequestError(422, f"top_k must be between 1 and {len(names)}")
        if label is not None and label not in names:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise RequestError(422, f"label {label[:100]!r} is not one of the model's labels ({shown})")
        if len(files) > self.limits.max_images:
            raise RequestError(413, too_many_images(self.limits.max_images))

        async def handle() -> list[dict]:
            classified = await self.classify([data for _, data in files])
            results = []
            for (name, _), (image, p) in zip(files, classified):
                row, targets = self.result_row(name, p, top_k, label)
                if threshold is not None:
                    members = conformal.prediction_sets(p[None], threshold, self.conformal["score"])[0]
                    row["set"] = [names[i] for i in members]
                if explain or label is not None:  # in the default thread pool: the event loop keeps serving
                    maps = await asyncio.get_running_loop().run_in_executor(None, self.explain, image, targets)
                    if self.thresholds is None:
                        row["heatmap"] = maps[0]
                    else:
                        row["heatmaps"] = {names[i]: m for i, m in zip(targets, maps)}
                results.append(row)
            return results

        try:
            results = await asyncio.wait_for(handle(), self.limits.timeout_seconds)
        except asyncio.TimeoutError:
            raise RequestError(504, f"the request took longer than {self.limits.timeout_seconds:g} s") from None
        return {"results": results, "task": self.info.task, "runtime": self.runtime.name,
                **({"coverage": float(coverage)} if coverage is not None else {}),
                "milliseconds": (time.perf_counter() - start) * 1000}

    async def set_threshold(self, coverage: float) -> float:
        """The conformal threshold for a request's coverage; RequestError 422 for a multi-label model, a
        coverage outside (0, 1) or beyond what the calibration allows, or a record that cannot be had."""
        if self.thresholds is not None:
            raise RequestError(422, "coverage is for single-label and binary models; a multi-label model's label "
                                    "set is decided by its per-label thresholds")
        if "int8" in self.runtime.name:  # auto may have picked it: its probabilities are not the calibrated ones
            raise RequestError(422, f"this server runs the int8 export ({self.runtime.name}), whose probabilities "
                                    "the prediction sets were not calibrated on: start it with --runtime onnx "
                                    "(or torch, openvino) to answer coverage")
        try:
            coverage = conformal.check_coverage(coverage, "coverage")
            if self.conformal is None and self.conformal_error is None:  # once, in the inference thread
                await asyncio.get_running_loop().run_in_executor(self.inference, self.compute_conformal)
            if self.conformal is None:
                raise CnnkitError(self.conformal_error)
            return conformal.record_threshold(self.conformal, coverage)
        except CnnkitError as e:
            raise RequestError(422, str(e)) from None

    def compute_conformal(self) -> None:
        """A model file without a conformal record: compute one from its validation split through the
        runtime, and log that it was; or keep why it cannot be, for every later request."""
        from ..evaluate import conformal_from_validation
        if self.conformal is not None or self.conformal_error is not None:  # a request queued behind the first
            return
        try:
            self.conformal, self.conformal_source = conformal_from_validation(self.info, self.runtime)
            log.info("%s", self.conformal_source)
        except CnnkitError as e:
            self.conformal_error = str(e)

    def result_row(self, name: str, p: np.ndarray, top_k: int, label: str | None) -> tuple[dict, list[int]]:
        """One image's answer from its probabilities p (K,), and the classes Grad-CAM explains for it.
        Single-label: the top-k, explained for the top class. Multi-label: the label set, explained for
        each label present (the set is the answer: each member's evidence, not only the first's, and
        no map for labels found absent), or for the most probable label when none is present (what the
        model saw most of). `label` replaces either default."""
        names = self.info.class_names
        if self.binary_threshold is not None:
            order = np.array([1, 0] if p[1] >= self.binary_threshold else [0, 1])[:top_k]
            row = {"filename": name, "top": [{"label": names[i], "probability": float(p[i])} for i in order]}
            default = [int(order[0])]
        elif self.thresholds is None:
            order = np.argsort(-p, kind="stable")[:top_k]
            row = {"filename": name, "top": [{"label": names[i], "probability": float(p[i])} for i in order]}
            default = [int(order[0])]
        else:
            row = {"filename": name, **label_set(p, self.thresholds, names)}
            default = [names.index(n) for n in row["labels"]] or [int(np.argmax(p))]
        return row, ([names.index(label)] if label is not None else default)

    def explain(self, image: np.ndarray, classes: list[int]) -> list[str]:
        """Grad-CAM for one image (C, H, W) uint8, one heatmap per class index, as PNG data URLs
        (PyTorch, fp32). One backward pass for all: the image repeated once per class (eval mode, so
        the copies do not interact), each copy's score its own class's logit."""
        import torch

        from ..explain import gradcam
        from ..modelfile import load_model
        from ..preprocess import Preprocess
        with self.explain_lock:  # one backward pass at a time; the model's hooks are not thread-safe
            if self.torch_model is None:  # the PyTorch runtime's model if it runs one, else loaded now
                self.torch_model = getattr(self.runtime, "model", None) or load_model(self.path, info=self.info)[0]
                self.preprocess = Preprocess.from_info(self.info)
            x = self.preprocess(torch.from_numpy(np.ascontiguousarray(image))[None])  # (1, C, H, W)
            heat, _ = gradcam(self.torch_model, x.repeat(len(classes), 1, 1, 1), torch.tensor(classes),
                              binary=self.binary_threshold is not None)
        return [heatmap_png(image, h.numpy()) for h in heat]

    def description(self) -> dict:
        """What /model answers. thresholds: a multi-label model's, one per label (None: single-label)."""
        m = self.info
        thresholds = (None if self.thresholds is None else [float(t) for t in self.thresholds]) or (
            None if self.binary_threshold is None else [float(self.binary_threshold)])
        return {"cnnkit_version": __version__, "model_file": str(self.path), "class_names": m.class_names,
                "task": m.task, "thresholds": thresholds, "input": dataclasses.asdict(m.input),
                "architecture": m.name, "metrics": m.numeric_metrics(),
                "calibration": self.calibration(), "runtime": self.runtime.name,
                "runtime_choice": self.runtime_why, "max_batch": self.max_batch,
                "limits": self.limits.__dict__, "data": m.data.name or None}

    def calibration(self) -> dict:
        """/model's calibration: the temperature, and the conformal record summed up (its score, the
        validation images it holds, where it came from) rather than its scores."""
        record = {k: v for k, v in self.info.calibration().items() if k != "conformal"}
        if self.thresholds is None:
            c = self.conformal
            record["conformal"] = ({"score": c["score"], "calibration_images": len(c["scores"]),
                                    "source": self.conformal_source} if c is not None else
                                   {"source": self.conformal_error or "computed on the first request with coverage"})
        return record
