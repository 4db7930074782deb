"""--track tensorboard and --track mlflow (tracking.py): what a run logs, read back by TensorBoard's own event
reader and by MlflowClient, against what the run folder holds (history.csv and misclassified.csv read by csv,
config.json and metrics.json by json, the test split's pixels) and against the values the training loop handed
its callbacks; a missing package or a refused URI; a run interrupted and resumed logs each epoch and step once."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.config import TrainConfig
from cnnkit.errors import TrainingInterrupted
from cnnkit.jobs.train import train
from cnnkit.training.callbacks import Callback
from conftest import run_main

pytest.importorskip("tensorboard")  # the [track] extra, part of [test]
pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

FLOAT32 = dict(rel=1e-6, abs=1e-7)  # TensorBoard stores scalars as float32
SMALL = dict(data="digits", model="seed-digits", epochs=2, batch_size=128)  # ~11 steps an epoch, 0.2 s each


class Recorder(Callback):
    """What the training loop told its callbacks: the reference for the per-step figures."""

    def __init__(self):
        self.steps: dict[int, dict[str, float]] = {}

    def on_step(self, step, values):
        self.steps[step] = dict(values)


class StopDuring(Callback):
    """Ctrl-C a few steps into an epoch (the KeyboardInterrupt the loop turns into TrainingInterrupted)."""

    def __init__(self, epoch: int, steps: int):
        self.epoch, self.steps, self.seen = epoch, steps, 0
        self.done = 0

    def on_epoch_end(self, epoch, row):
        self.done = epoch

    def on_step(self, step, values):
        if self.done == self.epoch - 1:
            self.seen += 1
            if self.seen > self.steps:
                raise KeyboardInterrupt


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_of(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def table_rows(markdown: str) -> list[list[str]]:
    """A Markdown table back to rows (the separator line dropped, escaped pipes restored)."""
    lines = [line for i, line in enumerate(markdown.splitlines()) if i != 1]
    return [[c.strip().replace("\\|", "|") for c in line.strip()[1:-1].split(" | ")] for line in lines]


def mlflow_run(run: Path, uri: str):
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(json.loads((run / "mlflow-run.json").read_text())["run_id"])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run tracked by both, with its report: (run folder, MLflow URI, RunResult, Recorder). ~6 s
    (the MLflow database's creation 2.5 s of it)."""
    base = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as mp:  # the per-test cache fixture does not reach a module fixture
        mp.setenv("CNNKIT_DATA", str(base / "cache"))
        cfg = TrainConfig(**SMALL, out=str(base / "run"), track="tensorboard,mlflow", mlflow_uri=uri)
        result = train(cfg, quiet=True, echo=None, callbacks=[recorder])
    return base / "run", uri, result, recorder


@pytest.mark.slow  # the shared run: ~6 s
def test_tensorboard_holds_history_csv_each_step_and_the_test_metrics(tracked):
    run, _, result, recorder = tracked
    acc = events(run)
    rows = history(run)
    for name in ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]:
        logged = acc.Scalars(f"epoch/{name}")
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows]
        assert [e.value for e in logged] == pytest.approx([float(r[name]) for r in rows], **FLOAT32)
    for tag, key in [("train/loss", "loss"), ("train/accuracy", "accuracy"), ("train/lr", "lr")]:
        logged = acc.Scalars(tag)
        assert [e.step for e in logged] == sorted(recorder.steps) == list(range(1, len(recorder.steps) + 1))
        assert [e.value for e in logged] == pytest.approx([recorder.steps[s][key] for s in sorted(recorder.steps)],
                                                          **FLOAT32)
    metrics = json.loads((run / "metrics.json").read_text())
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(metrics["test_accuracy"], **FLOAT32)
    assert acc.Scalars("test/loss")[-1].value == pytest.approx(metrics["test_loss"], **FLOAT32)
    assert acc.Scalars("run/best_epoch")[-1].value == metrics["best_epoch"]
    assert json.loads(text_of(acc, "config").strip("`").removeprefix("json")) == \
        json.loads((run / "config.json").read_text())


@pytest.mark.slow  # the shared run
def test_tensorboard_holds_the_reports_pictures_confusion_matrix_and_mistakes(tracked):
    run, _, result, _ = tracked
    acc = events(run)
    pictures = sorted(run.glob("*.png"))
    assert {p.stem for p in pictures} >= {"confusion_matrix", "misclassified", "curves"}
    for png in pictures:  # each picture as drawn: the same pixels
        logged = Image.open(io.BytesIO(acc.Images(f"report/{png.stem}")[-1].encoded_image_string)).convert("RGB")
        assert np.array_equal(np.asarray(logged), np.asarray(Image.open(png).convert("RGB"))), png.name
    with open(run / "confusion_matrix.csv", newline="") as f:
        assert table_rows(text_of(acc, "test/confusion_matrix")) == list(csv.reader(f))
    with open(run / "misclassified.csv", newline="") as f:
        mistakes = list(csv.reader(f))
    assert len(mistakes) > 2 and table_rows(text_of(acc, "test/misclassified")) == mistakes
    # the images: the test split's pixels at misclassified.csv's indices, in its order, in TensorBoard's grid
    # of 8 columns (torch.utils.tensorboard's make_grid: no padding; a grey image repeated in R, G and B)
    grid = np.asarray(Image.open(io.BytesIO(acc.Images("test/misclassified")[-1].encoded_image_string)))
    test = result.dataset.test.images
    h, w = test.shape[2:]
    for k, row in enumerate(mistakes[1:]):
        cell = grid[(k // 8) * h:(k // 8 + 1) * h, (k % 8) * w:(k % 8 + 1) * w, 0]
        assert np.array_equal(cell, test[int(row[1])][0].numpy()), k


@pytest.mark.slow  # the shared run
def test_mlflow_holds_params_history_steps_metrics_and_artifacts(tracked, tmp_path):
    run, uri, result, recorder = tracked
    client, logged = mlflow_run(run, uri)
    run_id = logged.info.run_id
    assert logged.info.status == "FINISHED" and logged.info.run_name == run.name
    assert logged.data.tags["cnnkit.run_dir"] == str(run.resolve())
    assert logged.info.artifact_uri.startswith((run.parent / "mlruns").resolve().as_uri())  # beside mlflow.db
    assert logged.data.params == {k: str(v) for k, v in json.loads((run / "config.json").read_text()).items()}
    rows = history(run)
    for name in ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]:
        series = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert series == [(int(r["epoch"]), float(r[name])) for r in rows], name  # exact: both float64
    for key in ["loss", "accuracy", "lr"]:
        series = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"step_{key}"))
        assert series == [(s, recorder.steps[s][key]) for s in sorted(recorder.steps)], key
    metrics = json.loads((run / "metrics.json").read_text())
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {k: logged.data.metrics[k] for k in numbers} == numbers
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"model.safetensors", "report.html", "config.json", "metrics.json", "history.csv"}
    copy = Path(client.download_artifacts(run_id, "model.safetensors", str(tmp_path)))
    assert copy.read_bytes() == (run / "model.safetensors").read_bytes()


def test_a_missing_package_is_named_with_its_extra_before_anything_is_written(tmp_path, monkeypatch):
    for flag, module in [("tensorboard", "tensorboard"), ("mlflow", "mlflow")]:
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, module, None)  # `import module` now raises ImportError
            out = tmp_path / flag
            r = run_main("train", "--data", "digits", "--model", "seed-digits", "--track", flag, "--out", str(out))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"--track {flag} needs the" in r.stderr and "pip install 'cnnkit[track]'" in r.stderr
        assert not out.exists()


@pytest.mark.parametrize("uri", ["nosuchscheme://x", "folder"])
def test_a_tracking_uri_mlflow_refuses_is_one_line_before_training(tmp_path, monkeypatch, uri):
    if uri == "folder":  # MLflow 3 refuses the ./mlruns folder store unless told otherwise; MLflow 2 used it
        import mlflow
        if int(mlflow.__version__.split(".")[0]) < 3:
            pytest.skip("MLflow 2 accepts a folder store")
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        uri = str(tmp_path / "mlruns")
    out = tmp_path / "run"
    r = run_main("train", "--data", "digits", "--model", "seed-digits", "--track", "mlflow",
                 "--mlflow-uri", uri, "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--mlflow-uri {uri}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow  # two runs, one interrupted: ~5 s
def test_a_run_interrupted_mid_epoch_and_resumed_logs_each_epoch_and_step_once(tmp_path):
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, out=str(run), track="tensorboard,mlflow", mlflow_uri=uri,
                      report=False)
    with pytest.raises(TrainingInterrupted):
        train(cfg, quiet=True, echo=None, callbacks=[StopDuring(epoch=2, steps=3)])
    client, stopped = mlflow_run(run, uri)
    assert stopped.info.status == "KILLED" and stopped.data.tags["cnnkit.stopped"] == "interrupted"
    assert [m.step for m in client.get_metric_history(stopped.info.run_id, "val_acc")] == [1]
    before = [e.step for e in events(run).Scalars("train/loss")]
    steps_per_epoch = len(client.get_metric_history(stopped.info.run_id, "step_loss"))  # epoch 1's, sent
    # epoch 1, the 3 steps of epoch 2 before the interrupt, and the step it came at: the trackers hear of a step
    # before the callbacks a caller gives (jobs/train.py)
    assert before == list(range(1, steps_per_epoch + 5))

    recorder = Recorder()
    train(resume=run, quiet=True, echo=None, callbacks=[recorder])
    assert min(recorder.steps) == steps_per_epoch + 1  # epoch 2 was trained again from its first step
    client, resumed = mlflow_run(run, uri)
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    acc = events(run)
    total = 3 * steps_per_epoch
    for name in ["val_acc", "seconds"]:
        assert sorted(e.step for e in acc.Scalars(f"epoch/{name}")) == [1, 2, 3]
        series = sorted((m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, name))
        assert series == [(int(r["epoch"]), float(r[name])) for r in rows]
    assert sorted(e.step for e in acc.Scalars("train/loss")) == list(range(1, total + 1))
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "step_loss")) == \
        list(range(1, total + 1))
    resumed_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    for s in range(steps_per_epoch + 4, total + 1):  # what the resumed process trained, as it told its callbacks
        assert resumed_loss[s] == pytest.approx(recorder.steps[s]["loss"], **FLOAT32)


class PruneAfter(Callback):
    """tune's pruner: raises optuna.TrialPruned in on_epoch_end, before the trackers hear of that epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch, row):
        if epoch == self.epoch:
            import optuna
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


@pytest.mark.slow  # ~1.6 s in the file, 6 s alone (its imports and the MLflow database)
def test_a_pruned_trial_logs_the_epoch_it_was_pruned_at_and_ends_killed(tmp_path):
    pytest.importorskip("optuna")
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    recorder = Recorder()
    cfg = TrainConfig(**{**SMALL, "epochs": 3}, out=str(run), track="tensorboard,mlflow", mlflow_uri=uri, report=False)
    with pytest.raises(Exception, match="pruned at epoch 1"):
        train(cfg, quiet=True, echo=None, callbacks=[recorder, PruneAfter(1)])
    client, pruned = mlflow_run(run, uri)
    assert pruned.info.status == "KILLED" and pruned.data.tags["cnnkit.stopped"] == "pruned"
    row = history(run)[0]
    assert [(m.step, m.value) for m in client.get_metric_history(pruned.info.run_id, "val_acc")] == \
        [(1, float(row["val_acc"]))]
    assert sorted((m.step, m.value) for m in client.get_metric_history(pruned.info.run_id, "step_loss")) == \
        [(s, v["loss"]) for s, v in sorted(recorder.steps.items())]  # the pruned epoch's steps sent too
    assert [(e.step, e.value) for e in events(run).Scalars("epoch/val_acc")] == \
        [(1, pytest.approx(float(row["val_acc"]), **FLOAT32))]


@pytest.mark.slow  # 2-4 s each
@pytest.mark.parametrize("kind", ["svm", "multi-label"])
def test_an_svm_and_a_multi_label_run_log_what_their_folders_hold(tmp_path, kind):
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the SVM: no steps, no training loss, one row (no report: its pictures are a single-label run's);
    # multi-label: a report of other pictures, no confusion matrix of classes nor misclassified.csv
    extra = {"model": "svm", "report": False} if kind == "svm" else {"task": "multi-label", "epochs": 1}
    train(TrainConfig(**{**SMALL, **extra}, out=str(run), track="tensorboard,mlflow", mlflow_uri=uri),
          quiet=True, echo=None)
    rows = history(run)
    client, logged = mlflow_run(run, uri)
    assert logged.info.status == "FINISHED"
    acc = events(run)
    for name in ["train_loss", "val_acc"]:  # the SVM has no training loss: nothing logged for it
        expected = [(int(r["epoch"]), float(r[name])) for r in rows if not math.isnan(float(r[name]))]
        assert sorted((m.step, m.value) for m in client.get_metric_history(logged.info.run_id, name)) == expected
        board = acc.Scalars(f"epoch/{name}") if f"epoch/{name}" in acc.Tags()["scalars"] else []
        assert [(e.step, e.value) for e in board] == [(s, pytest.approx(v, **FLOAT32)) for s, v in expected]
    assert {f"report/{p.stem}" for p in run.glob("*.png")} == set(acc.Tags()["images"]) - {"test/misclassified"}
    assert ("test/misclassified" in acc.Tags()["images"]) == (run / "misclassified.csv").is_file()
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert artifacts == {"model.safetensors", "config.json", "metrics.json", "history.csv"} | \
        ({"report.html"} if (run / "report.html").is_file() else set())
