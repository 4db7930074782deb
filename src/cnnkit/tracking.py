"""`--track tensorboard` and `--track mlflow`: a training run logged, as it goes, to the tracker a user already
watches. Each tracker is a training Callback (training/callbacks.py), built by trackers_for in rank 0 alone
(jobs/train.py), so a torchrun job logs once.

    tensorboard   RUN/tensorboard/ event files (torch's SummaryWriter): train/{loss,accuracy,lr} per step,
                  epoch/<history.csv column> per epoch, test/<metric> and the report's pictures at the end
    mlflow        one MLflow run (MlflowClient, explicit run ids: no global state, so runs in one process never
                  clash): the config as params, history.csv's columns per epoch, the test metrics, and the model
                  file, report.html, config.json, metrics.json, history.csv as artifacts; its id in
                  RUN/mlflow-run.json, so --resume continues the same MLflow run

An epoch's figures are read back from history.csv, just written, so a tracker holds exactly what the file holds
(6 significant digits), and an epoch a tracker was not told of is logged from the file later: a kill can fall
between the checkpoint and the hooks, and a caller's callback given before the trackers may stop the run first
(jobs/train.py puts the trackers first, so tune's pruner stops a trial after they have logged its epoch).
On --resume each tracker first reads what it already holds (TensorBoard its event files, MLflow the
run's metric history) and logs only what is new: every epoch and every step appears once.
"""
from __future__ import annotations

import contextlib
import csv
import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, ContextManager, Iterator

from .errors import CnnkitError, TrainingInterrupted
from .runfolder import HISTORY_COLUMNS, RunFolder
from .training.callbacks import Callback
from .utils import redact, write_text_atomic

EXTRA = "pip install 'cnnkit[track]'"
TENSORBOARD_FOLDER = "tensorboard"  # inside the run folder: `tensorboard --logdir runs/` shows every run
MLFLOW_RUN_FILE = "mlflow-run.json"  # {"run_id", "experiment_id", "tracking_uri" (password removed)}
EXPERIMENT = "cnnkit"  # the MLflow experiment, unless $MLFLOW_EXPERIMENT_NAME names another
EPOCH_COLUMNS = [c for c in HISTORY_COLUMNS if c != "epoch"]  # the epoch is the step
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on a param value (500 in MLflow 2)
BATCH = 1000  # MLflow's limit on metrics in one log_batch (100 for params)


def trackers_for(cfg: Any, run: RunFolder, parent_run_id: str | None = None) -> list[Callback]:
    """The trackers cfg.track names, each checked before any training: its package imports and, for
    MLflow, the tracking URI opens. parent_run_id: the MLflow run (a tune study) this run is nested in."""
    wanted = [] if cfg.track == "none" else cfg.track.split(",")
    trackers: list[Callback] = []
    if "tensorboard" in wanted:
        require("tensorboard", "tensorboard", "tensorboard")
        require("tensorboard", "tensorboard", "torch.utils.tensorboard")
        trackers.append(TensorBoardTracker(run.path / TENSORBOARD_FOLDER))
    if "mlflow" in wanted:
        recorded = read_json(run.path / MLFLOW_RUN_FILE)
        uri = tracking_uri(cfg, recorded.get("tracking_uri"))
        trackers.append(MlflowTracker(open_client(uri, quiet=run.quiet), uri, parent_run_id))
    return trackers


def require(flag: str, package: str, module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise CnnkitError(f"--track {flag} needs the {package} package: {EXTRA}") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's top-level numbers (nested figures stay in the file, which is logged whole)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)}


def end_status() -> tuple[str, str]:
    """(MLflow status, why) of a run closed without on_train_end, from the exception now propagating
    (close() runs in jobs/train.py's finally): KILLED when stopped on purpose, FAILED otherwise."""
    e = sys.exc_info()[1]
    if isinstance(e, (KeyboardInterrupt, TrainingInterrupted)):
        return "KILLED", "interrupted"
    if e is not None and any(c.__name__ == "TrialPruned" for c in type(e).__mro__):  # optuna's, not imported here
        return "KILLED", "pruned"
    return "FAILED", (str(e).splitlines() or [type(e).__name__])[0][:500] if e is not None else "failed"


# ----------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker(Callback):
    """Event files in RUN/tensorboard: scalars per step (global step) and per epoch (step = epoch), then
    the test metrics, the confusion matrix (the report's picture and a text table), the misclassified test
    images (the report's gallery and the images themselves) and every other picture the report drew."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.writer = None
        self.run: RunFolder | None = None
        self.logged: set[int] = set()  # epochs in the event files
        self.last_step = 0  # the last step in them: a resumed run re-trains its interrupted epoch from its start

    def on_train_start(self, cfg: Any, run: RunFolder, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.run = run
        if self.folder.is_dir():  # --resume: what the interrupted process logged
            self.logged, self.last_step = logged_in_events(self.folder)
        fresh = not self.logged and not self.last_step
        self.writer = SummaryWriter(str(self.folder))  # makes the folder; one more event file per process
        if fresh:
            self.writer.add_text("config", "```json\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)
        self.sync()  # epochs before first_epoch a kill kept from the event files

    def on_step(self, step: int, values: dict[str, float]) -> None:
        if step <= self.last_step:  # logged before the interruption
            return
        self.writer.add_scalar("train/loss", values["loss"], step)
        self.writer.add_scalar("train/accuracy", values["accuracy"], step)
        self.writer.add_scalar("train/lr", values["lr"], step)
        self.last_step = step

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        self.sync()
        self.writer.flush()  # a TensorBoard watching the folder shows each epoch as it ends

    def sync(self) -> int:
        """Log history.csv's epochs not yet in the event files; returns the last epoch."""
        last = 0
        for row in self.run.read_history():
            last = row["epoch"]
            if last in self.logged:
                continue
            for name in EPOCH_COLUMNS:
                if not math.isnan(row[name]):  # the SVM's and kNN's train loss: none
                    self.writer.add_scalar(f"epoch/{name}", row[name], last)
            self.logged.add(last)
        return last

    def on_train_end(self, result: Any) -> None:
        step = self.sync() or 1
        for name, v in numeric_metrics(result.metrics).items():
            self.writer.add_scalar(name.replace("test_", "test/", 1) if name.startswith("test_") else f"run/{name}",
                                   v, step)
        add_report(self.writer, Path(result.run_dir), result.dataset, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.sync()  # the epoch a pruner stopped at
            self.writer.close()


def logged_in_events(folder: Path) -> tuple[set[int], int]:
    """(epochs with any epoch/ scalar, the last train/ step) in a folder's event files, read by
    TensorBoard's own reader (every event kept: size_guidance 0)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    epochs = {e.step for tag in tags if tag.startswith("epoch/") for e in acc.Scalars(tag)}
    steps = [e.step for e in acc.Scalars("train/loss")] if "train/loss" in tags else []
    return epochs, max(steps, default=0)


def add_report(writer: Any, run_dir: Path, dataset: Any, step: int) -> None:
    """What the run folder already holds, none of it computed again: every picture of the report
    (report/<name>), the confusion matrix as a table, and the misclassified test images in the order of
    misclassified.csv with that table beside them. A run without a report (--no-report), a multi-label
    run (its pictures, no confusion matrix of classes) log what exists."""
    import numpy as np
    from PIL import Image
    for png in sorted(run_dir.glob("*.png")):
        with Image.open(png) as im:
            writer.add_image(f"report/{png.stem}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
    cm = read_csv(run_dir / "confusion_matrix.csv")
    if cm:
        writer.add_text("test/confusion_matrix", markdown_table(cm), step)
    mis = read_csv(run_dir / "misclassified.csv")
    if len(mis) > 1 and getattr(dataset, "test", None) is not None:
        import torch
        index = torch.tensor([int(r[mis[0].index("index")]) for r in mis[1:]])
        writer.add_images("test/misclassified", dataset.test.images[index], step, dataformats="NCHW")
        writer.add_text("test/misclassified", markdown_table(mis), step)


def read_csv(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.reader(f))
    except OSError:
        return []


def markdown_table(rows: list[list[str]]) -> str:
    """A CSV's rows as the Markdown table TensorBoard's text tab draws (header first)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(rows[0]), line(["---"] * len(rows[0])), *(line(r) for r in rows[1:])])


# ----------------------------------------------------------------------------- MLflow
def tracking_uri(cfg: Any, recorded: str | None = None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else (on --resume) where the run was logged, else MLflow's own
    default made absolute: mlflow.db in the working folder, artifacts in ./mlruns beside it (MLflow 3 refuses the
    ./mlruns folder store unless MLFLOW_ALLOW_FILE_STORE=true; `mlflow ui` started there shows the runs)."""
    if cfg.mlflow_uri:
        return cfg.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if recorded and "***" not in recorded:
        return recorded
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def open_client(uri: str, quiet: bool = False) -> Any:
    """An MlflowClient on uri, its store opened now (a local database is created and migrated: about 2.5 s
    the first time), so that a URI MLflow refuses fails before any training. quiet: without MLflow's
    "Creating initial MLflow database tables..." lines."""
    require("mlflow", "mlflow-skinny", "mlflow")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    log = logging.getLogger("mlflow.store.db.utils")
    level = log.level
    if quiet:
        log.setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
    except ImportError as e:  # a database URI without SQLAlchemy / alembic
        raise CnnkitError(f"--mlflow-uri {redact(uri)} needs {e.name or 'a database driver'}: {EXTRA}") from None
    except MlflowException as e:
        if "MLFLOW_ALLOW_FILE_STORE" in str(e):  # MLflow 3's refusal of a folder, 600 characters long
            raise CnnkitError(f"--mlflow-uri {redact(uri)}: MLflow refuses a folder store; give a database "
                              "(--mlflow-uri sqlite:///PATH/mlflow.db) or set MLFLOW_ALLOW_FILE_STORE=true") from None
        raise CnnkitError(f"--mlflow-uri {redact(uri)}: {first_line(e)}") from None
    finally:
        log.setLevel(level)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:400]


def experiment_id(client: Any, uri: str) -> str:
    """The experiment's id, creating it (two tune workers may race to: the loser reads the winner's). In a
    local SQLite database its artifacts go to mlruns/ beside the database file, not to MLflow's default
    ./mlruns in whatever folder the first run started from."""
    from mlflow.exceptions import MlflowException
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    where = None
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        where = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=where)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """{"a.b": "value"}: nested dicts flattened, every value as text (None as "None"), the tracking URI
    without its password, each cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            text = redact(v) if k == "mlflow_uri" and isinstance(v, str) else str(v)
            out[f"{prefix}{k}"] = text[:MAX_PARAM_CHARS]
    return out


def log_batch(client: Any, run_id: str, metrics: list | None = None, params: dict[str, str] | None = None) -> None:
    """Metrics [(name, value, step)] and params in as few calls as MLflow's limits allow."""
    import time

    from mlflow.entities import Metric, Param
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, int(s)) for k, v, s in metrics or []]
    ps = [Param(k, v) for k, v in (params or {}).items()]
    for i in range(0, len(ms), BATCH):
        client.log_batch(run_id, metrics=ms[i:i + BATCH])
    for i in range(0, len(ps), 100):
        client.log_batch(run_id, params=ps[i:i + 100])


class MlflowTracker(Callback):
    """One MLflow run per run folder. Per epoch (step = epoch): history.csv's columns under their own names;
    per step (the global step): step_loss, step_accuracy, step_lr, sent at the epoch's end, so the steps of an
    interrupted epoch (trained again on --resume) are never sent twice. At the end: metrics.json's numbers,
    the artifacts, status FINISHED; a run that fails ends FAILED, one interrupted or pruned KILLED."""

    def __init__(self, client: Any, uri: str, parent_run_id: str | None = None):
        self.client, self.uri, self.parent_run_id = client, uri, parent_run_id
        self.run: RunFolder | None = None
        self.run_id: str | None = None
        self.logged: set[int] = set()  # epochs the MLflow run holds
        self.steps: list[tuple[int, dict[str, float]]] = []  # this epoch's, until it ends
        self.ended = False

    def on_train_start(self, cfg: Any, run: RunFolder, first_epoch: int) -> None:
        self.run = run
        with self.errors():
            self.run_id = self.resumed(run)
            if self.run_id is None:
                self.run_id = self.new_run(cfg, run)
            self.sync()  # epochs before first_epoch a kill kept from the MLflow run

    def resumed(self, run: RunFolder) -> str | None:
        """The recorded MLflow run, reopened, with the epochs it holds; None when there is none (a new run, or
        a recorded one this URI does not know: then a new MLflow run, said in train.log)."""
        from mlflow.exceptions import MlflowException
        run_id = read_json(run.path / MLFLOW_RUN_FILE).get("run_id")
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:
            run.log(f"MLflow run {run_id} ({MLFLOW_RUN_FILE}) is not in {redact(self.uri)}: logging to a new one")
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "seconds")}
        return run_id

    def new_run(self, cfg: Any, run: RunFolder) -> str:
        tags = {"cnnkit.run_dir": str(run.path.resolve()), "cnnkit.data": str(cfg.data),
                "cnnkit.model": str(cfg.model), "mlflow.source.name": "cnnkit train"}
        experiment = experiment_id(self.client, self.uri)
        if self.parent_run_id:  # a tune trial: nested under its study, in the study's experiment
            tags["mlflow.parentRunId"] = self.parent_run_id
            experiment = self.client.get_run(self.parent_run_id).info.experiment_id
        run_id = self.client.create_run(experiment, run_name=run.path.name, tags=tags).info.run_id
        write_text_atomic(run.path / MLFLOW_RUN_FILE, json.dumps(
            {"run_id": run_id, "experiment_id": experiment, "tracking_uri": redact(self.uri)}, indent=2))
        log_batch(self.client, run_id, params=flat_params(cfg.to_dict()))
        if run.config_file.is_file():  # a failed run keeps its config too
            self.client.log_artifact(run_id, str(run.config_file))
        return run_id

    def on_step(self, step: int, values: dict[str, float]) -> None:
        self.steps.append((step, values))

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        with self.errors():
            self.sync(with_steps=True)

    def sync(self, with_steps: bool = False) -> int:
        """Send history.csv's epochs the MLflow run lacks (and, with_steps, the steps of the epoch that just
        ended); returns the last epoch."""
        rows = self.run.read_history()
        new = [r for r in rows if r["epoch"] not in self.logged]
        metrics = [(name, r[name], r["epoch"]) for r in new for name in EPOCH_COLUMNS
                   if not math.isnan(r[name])]  # the SVM's and kNN's train loss: none
        if with_steps:
            metrics += [(f"step_{k}", v, s) for s, values in self.steps for k, v in values.items()]
            self.steps = []
        log_batch(self.client, self.run_id, metrics)
        self.logged.update(r["epoch"] for r in new)
        return rows[-1]["epoch"] if rows else 0

    def on_train_end(self, result: Any) -> None:
        run_dir = Path(result.run_dir)
        with mlflow_errors(self.uri, None, f"; the run is complete in {run_dir}, only its MLflow record is not"):
            self.sync(with_steps=True)
            log_batch(self.client, self.run_id, [(k, v, 0) for k, v in numeric_metrics(result.metrics).items()])
            for name in ("model.safetensors", "report.html", "config.json", "metrics.json", "history.csv"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
            self.client.set_terminated(self.run_id, "FINISHED")
        self.ended = True

    def close(self) -> None:
        """A run that did not reach on_train_end: its finished epochs sent (a pruned trial's last one too),
        the partial epoch's steps dropped, then FAILED or KILLED. Best effort: the error that stopped the run
        is the one to report, not a second one from an unreachable tracking server."""
        if self.ended or self.run_id is None:
            return
        status, why = end_status()
        try:
            # the buffered steps belong to an epoch that did end when history.csv has a row not yet sent;
            # otherwise to the partial epoch, trained again on --resume: never sent
            ended = any(r["epoch"] not in self.logged for r in self.run.read_history())
            self.sync(with_steps=ended)
            self.client.set_tag(self.run_id, "cnnkit.stopped", why)
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - see the docstring
            pass

    def errors(self) -> ContextManager[None]:
        return mlflow_errors(self.uri, self.run)


@contextlib.contextmanager
def mlflow_errors(uri: str, run: RunFolder | None, where: str = "") -> Iterator[None]:
    """MLflow's exceptions as one CnnkitError line, saying that the run folder is intact and how to continue
    (where: what to say instead, e.g. that the run is complete)."""
    from mlflow.exceptions import MlflowException
    try:
        yield
    except MlflowException as e:
        if not where and run is not None:
            where = f"; the run folder is intact: continue with cnnkit train --resume {run.path}"
        raise CnnkitError(f"MLflow ({redact(uri)}): {first_line(e)}{where}") from None


# ----------------------------------------------------------------------------- tune's parent run
def start_parent_run(cfg: Any, name: str, params: dict) -> str | None:
    """`cnnkit tune`: the study's MLflow run, each trial's run nested in it (trackers_for's parent_run_id),
    when cfg.track includes mlflow; its id, else None."""
    if "mlflow" not in cfg.track.split(","):
        return None
    uri = tracking_uri(cfg)
    client = open_client(uri)
    with mlflow_errors(uri, None):
        run_id = client.create_run(experiment_id(client, uri), run_name=name,
                                   tags={"mlflow.source.name": "cnnkit tune"}).info.run_id
        log_batch(client, run_id, params=flat_params(params))
    return run_id


def end_parent_run(cfg: Any, run_id: str | None, metrics: dict, status: str = "FINISHED") -> None:
    """The study's run ended: its numeric metrics (the best trial's figures, the count of trials) and status."""
    if run_id is None:
        return
    uri = tracking_uri(cfg)
    client = open_client(uri)
    with mlflow_errors(uri, None):
        log_batch(client, run_id, [(k, v, 0) for k, v in numeric_metrics(metrics).items()])
        client.set_terminated(run_id, status)
