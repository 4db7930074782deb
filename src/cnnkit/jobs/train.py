"""`cnnkit train`: resolve the run folder -> train (the training package) -> finish: calibrate on validation,
test, write the model file and metrics -> report (report_folder.py)."""
from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import conformal, distributed
from ..config import TrainConfig
from ..modelfile import ModelInfo
from ..data import Dataset
from ..distributed import World, broadcast_text
from ..errors import CnnkitError, TrainingInterrupted
from ..evaluate import fit_temperature
from ..inference import class_logits, decide, metrics_from_logits, pick_device, predict_logits, probabilities
from ..preprocess import Preprocess
from ..report_folder import evaluate_and_report
from ..runfolder import RunFolder
from ..training.callbacks import Callback
from ..training import TrainResult, fit, load_data_and_model, resolve_auto_lr, train_svm
from ..training.svm import check_svm_options
from ..version import __version__


@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    dataset: Dataset
    history: list[dict]
    metrics: dict  # test metrics of the best model, plus best_epoch / val_accuracy / timing / versions
    config: TrainConfig
    info: ModelInfo | None = None  # the model file's metadata
    primary: bool = True  # False in the other processes of a torchrun job: they train, rank 0 tests and writes


def default_run_dir(cfg: TrainConfig) -> Path:
    path = Path(cfg.data)
    data = path.name if path.is_dir() else path.stem if path.is_file() else cfg.data  # a label file: its stem
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{data}-{Path(cfg.model).stem}-{stamp}"


def resolve_run(cfg: TrainConfig | None, resume: str | Path | None, *, echo: Callable[[str], None] | None,
                quiet: bool, world: World = World()) -> tuple[TrainConfig, RunFolder]:
    """The config and run folder: a new run's (refusing a folder that already holds one), or, with
    resume, the interrupted run's own config.json (refusing a complete or never-started run)."""
    if resume is not None:
        run = RunFolder(resume, primary=world.primary, echo=echo, quiet=quiet)
        cfg = run.read_config()
        if run.is_complete():
            raise CnnkitError(f"{run.path} is already complete (metrics.json exists); start a new run instead")
        run.resume_checkpoint()  # an intact checkpoint, or the reason there is none, before any work
    else:
        cfg = cfg or TrainConfig()
        path = broadcast_text(str(Path(cfg.out) if cfg.out else default_run_dir(cfg)), world)  # rank 0's time stamp
        run = RunFolder(path, primary=world.primary, echo=echo, quiet=quiet)
        run.check_writable()
        if run.has_checkpoint() or run.is_complete():
            raise CnnkitError(f"{run.path} already holds a run; choose another --out or continue it with "
                              f"--resume {run.path}")
        cfg.out = str(run.path)
    return cfg.validate(), run


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, quiet: bool = False,
          echo: Callable[[str], None] | None = print, callbacks: Sequence[Callback] = (),
          track_parent: str | None = None) -> RunResult:
    """Train a model, writing a run folder; see TrainConfig for the options (cfg.report: whether
    to write report.html at the end).

    resume: a run folder of an interrupted run; its config.json is used and training continues
    from its last checkpoint to the same final epoch.

    Started by torchrun (WORLD_SIZE > 1), every process trains a shard of each epoch
    (distributed.py); rank 0 alone writes, tests and reports, and the others return a RunResult
    with primary False and no metrics.

    callbacks: watchers told of each step, epoch and the end (training/callbacks.py; `cnnkit tune`'s
    pruner), besides the trackers cfg.track names, which rank 0 alone builds (tracking.py); track_parent: the
    MLflow run this one is nested in (a tune study's)."""
    world = World.from_env()
    if world.active:
        device_choice = cfg.device if resume is None and cfg is not None else RunFolder(resume).read_config().device
        distributed.start(world, pick_device(device_choice).type)
        distributed.stop_on_sigterm()  # torchrun stops the others with SIGTERM when one process fails
    try:
        return train_in(world, cfg, resume, quiet=quiet, echo=echo, callbacks=callbacks, track_parent=track_parent)
    finally:
        distributed.stop()


def train_in(world: World, cfg: TrainConfig | None, resume: str | Path | None, *, quiet: bool,
             echo: Callable[[str], None] | None, images: int | None = None,
             callbacks: Sequence[Callback] = (), track_parent: str | None = None) -> RunResult:
    """images: cut every split to its first `images` images (a dry run)."""
    cfg, run = resolve_run(cfg, resume, echo=echo, quiet=quiet, world=world)
    watchers: list[Callback] = []
    if cfg.track != "none" and world.primary and images is None:  # DDP: rank 0 alone logs
        from ..tracking import trackers_for
        watchers += trackers_for(cfg, run, parent_run_id=track_parent)
    watchers += callbacks  # after the trackers: they hear of an epoch before tune's pruner may stop the run
    try:
        result = train_watched(world, cfg, resume, run, quiet=quiet, echo=echo, images=images, watchers=watchers)
        for cb in watchers:
            cb.on_train_end(result)
        return result
    finally:
        for cb in watchers:
            cb.close()


def train_watched(world: World, cfg: TrainConfig, resume: str | Path | None, run: RunFolder, *, quiet: bool,
                  echo: Callable[[str], None] | None, images: int | None, watchers: list[Callback]) -> RunResult:
    """train_in's run, once its folder is resolved and its watchers built."""
    if cfg.model == "svm":
        if world.active:
            raise CnnkitError("the SVM baseline trains in one process: start it without torchrun")
        check_svm_options(cfg)
        run.create()
        run.write_config(cfg)
        for cb in watchers:
            cb.on_train_start(cfg, run, 1)
        ds, result = train_svm(cfg, run, quiet)
    elif cfg.model.startswith("knn:"):
        from ..knn import load_knn_data, train_knn
        if world.active:
            raise CnnkitError("a kNN model is built in one process: start it without torchrun")
        backbone, ds, notes = load_knn_data(cfg, quiet)  # before the run folder exists, as for a CNN
        run.create()
        run.write_config(cfg)
        for cb in watchers:
            cb.on_train_start(cfg, run, 1)
        result = train_knn(cfg, run, backbone, ds, notes)
    else:
        # before the run folder exists: a bad --data or --model leaves nothing
        ds, model = load_data_and_model(cfg, quiet or not world.primary)
        if images is not None:
            ds = first_images(ds, images)
        cfg = train_teacher_first(cfg, ds, run, world, quiet=quiet, echo=echo, dry=images is not None)
        run.create()
        cfg, sweep = resolve_auto_lr(cfg, ds, model, run, world)  # --lr auto: the lr-find sweep sets cfg.lr first
        run.write_config(cfg)
        result = fit(cfg, ds, model, run, resume=resume is not None, quiet=quiet, world=world,
                     callbacks=watchers)
        if sweep is not None:  # --lr auto: the model file's training record says how its lr was found
            result.info.training["lr_find_sweep"] = sweep
    if not world.primary:
        return RunResult(run.path, result.model, ds, result.history, {}, cfg, result.info, primary=False)
    return finish(cfg, run, ds, result)


TEACHER_FOLDER = "teacher"  # --teacher fast: the teacher's run folder, inside the student's
# What the teacher shares with its student: the data and its splits (so it never trained on the
# student's validation or test images), and where it runs
TEACHER_SHARES = ("data", "data_dir", "download", "path_column", "label_column", "split_column", "label_sep", "task",
                  "val_split", "test_split", "seed", "device", "precision")
# What a recipe's one-class-per-image options become for multi-label data (`--recipe`, --teacher fast)
ONE_CLASS_FIELDS = {"label_smoothing": 0.0, "balance": "none", "augment_class": None}


def train_teacher_first(cfg: TrainConfig, ds: Dataset, run: RunFolder, world: World, *, quiet: bool,
                        echo: Callable[[str], None] | None, dry: bool) -> TrainConfig:
    """--teacher fast (the small recipes' default): the fast recipe for the same data and splits,
    trained first into RUN/teacher, resumed there if interrupted and reused if finished (refused if
    it was trained on other splits). The config then names that folder, so --resume does not train
    it again. Any other teacher is checked here, before the run folder exists."""
    from ..training.distill import check_teacher
    if cfg.teacher != "fast":
        if cfg.teacher:
            check_teacher(cfg.teacher, ds)
        return cfg
    if world.active or dry:
        raise CnnkitError(f"--teacher fast trains the teacher first{', which a dry run does not' if dry else ''}: "
                          f"train it on its own (cnnkit train --recipe fast --data {cfg.data} --out T) and give "
                          "--teacher T")
    folder = run.path.resolve() / TEACHER_FOLDER
    teacher = RunFolder(folder, echo=None, quiet=True)
    try:
        if teacher.is_complete() or teacher.has_checkpoint():
            theirs = teacher.read_config()
            differ = [k for k in TEACHER_SHARES if getattr(theirs, k) != getattr(cfg, k)]
            if differ:
                raise CnnkitError(f"--teacher fast: {folder} holds a teacher trained with other "
                                  f"{', '.join('--' + k.replace('_', '-') for k in differ)}: remove it, or use "
                                  "another --out")
            if not teacher.is_complete():
                train(resume=folder, quiet=quiet, echo=echo)
        else:
            train(fast_teacher_config(cfg, ds, folder, echo), quiet=quiet, echo=echo)
    except TrainingInterrupted:
        raise TrainingInterrupted(f"interrupted while training the teacher in {folder}; run the same command again "
                                  "to continue it, then the student") from None
    return dataclasses.replace(cfg, teacher=str(folder))


def fast_teacher_config(cfg: TrainConfig, ds: Dataset, folder: Path, echo: Callable[[str], None] | None
                        ) -> TrainConfig:
    """The fast recipe for cfg's data (a label file's images looked at, as `--recipe fast` does), on
    cfg's data and splits, without the one-class options for multi-label data."""
    from ..config import recipe_choice
    from ..data import Columns, is_label_file, read_label_file
    files = None
    if Path(cfg.data).is_file() and is_label_file(cfg.data):
        listed = read_label_file(cfg.data, Columns.of(cfg))
        files = [path for entries in listed.files.values() for path, _ in entries]
    try:
        path, why = recipe_choice("fast", cfg.data, files)
    except CnnkitError as e:
        raise CnnkitError(f"--teacher fast: {e}; train a teacher yourself and give --teacher RUN") from None
    fast = dataclasses.replace(TrainConfig.from_file(path), **{k: getattr(cfg, k) for k in TEACHER_SHARES},
                               out=str(folder), report=False)
    if ds.task == "multi-label":
        fast = dataclasses.replace(fast, **ONE_CLASS_FIELDS)
    if echo:
        echo(f"teacher: --recipe fast ({path.stem}{f': {why}' if why else ''}) into {folder}, first")
    return fast


def first_images(ds: Dataset, n: int) -> Dataset:
    """The dataset with each split cut to its first n images (the model is already built for all the classes)."""
    def cut(split):
        return split.subset(np.arange(min(n, len(split)))) if split is not None else None
    return dataclasses.replace(ds, train=cut(ds.train), val=cut(ds.val), test=cut(ds.test))


def dry_run(cfg: TrainConfig, *, quiet: bool = False, echo: Callable[[str], None] | None = print) -> dict:
    """`cnnkit train --dry-run`: the whole pipeline on one batch, in a temporary run folder removed
    afterwards. The data is loaded and the model built as for the real run; then one optimizer step
    (augmented, if the config augments at all: from the first step here), validation, calibration,
    the test, the model file and, unless report is off, the report, each on at most batch_size images
    of its split (two steps with --fine-tune: one per phase). A config that would fail after an hour
    of training fails here in seconds, and nothing is written where --out points."""
    if cfg.model == "svm" or cfg.model.startswith("knn:"):
        which = "the SVM baseline" if cfg.model == "svm" else "a kNN model"
        raise CnnkitError(f"--dry-run runs one batch of a CNN; {which} has no batches (it trains in one pass)")
    if World.from_env().active:
        raise CnnkitError("--dry-run runs in one process: start it without torchrun")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnnkit-dry-run-") as tmp:
        trial = dataclasses.replace(cfg, epochs=1, fine_tune_epochs=1, augment_from_epoch=1, early_stop=0,
                                    out=str(Path(tmp) / "run"))
        result = train_in(World(), trial, None, quiet=quiet, echo=echo, images=cfg.batch_size)
        files = sorted(p.name for p in result.run_dir.iterdir())
    return {"dry_run": True, "data": result.dataset.name, "model": cfg.model, "images": result.dataset.sizes(),
            "steps": len(result.history), "train_loss": [h["train_loss"] for h in result.history],
            "precision": result.metrics.get("precision"), "would_write": files,
            "seconds": time.perf_counter() - start}


def finish(cfg: TrainConfig, run: RunFolder, ds: Dataset, result: TrainResult) -> RunResult:
    """The end of every run, CNN or SVM: calibrate on validation, test the best model on the held-out
    split in fp32 (the figure users will quote), write the model file and metrics.json, then the
    report, and remove the checkpoint."""
    if ds.task == "multi-label":
        return finish_multi_label(cfg, run, ds, result)
    t0 = time.perf_counter()
    best, device = result.model, result.device
    best = best.to(memory_format=torch.channels_last)  # faster fp32 inference too (inference.probabilities)
    preprocess = Preprocess.from_info(result.info, channels_last=True).to(device)
    test_logits = predict_logits(best, ds.test.images, preprocess, device, "fp32")  # (N, K); binary (N, 1)
    val_logits = class_logits(predict_logits(best, ds.val.images, preprocess, device, "fp32"), ds.task)  # (N, K)
    info = dataclasses.replace(result.info, temperature=fit_temperature(val_logits, ds.val.labels), calibrated_on="val")
    # Conformal scores on the images the temperature was fitted on: one parameter, fitted there, moved test coverage
    # by under 0.001 against one fitted on disjoint images (benchmarks/inference/conformal_scores.py, last table)
    info.conformal = conformal.fit(softmax_np(val_logits, info.temperature), ds.val.labels.numpy())
    metrics = {"test_" + k: v for k, v in metrics_from_logits(test_logits, ds.test.labels).items()}
    metrics["test_conformal"] = conformal.held_out_figures(  # coverage and mean set size on test at 0.90 / 0.95 / 0.99
        info.conformal, softmax_np(class_logits(test_logits, ds.task), info.temperature), ds.test.labels.numpy())
    if ds.task == "binary":
        info = binary_threshold(cfg, info, val_logits, ds.val.labels.numpy())
        metrics.update(binary_figures(info, test_logits, ds.test.labels.numpy()))
    metrics.update(run_facts(ds, result))
    tta_probs = None
    if cfg.report_tta:  # mirror and shifts, averaged: in metrics.json, and the report reuses them
        tta_probs = probabilities(best, info, ds.test.images, tta=True, device=device, logits=test_logits)
        metrics["test_tta_accuracy"] = float((decide(tta_probs, info) == ds.test.labels.numpy()).mean())
    info.metrics, info.history = metrics, result.history
    run.save_model(best, info)
    run.write_history(result.history)
    run.write_metrics(metrics)
    report = ""
    if cfg.report and run.primary:
        _, files = evaluate_and_report(best, info, ds.test, run.path, data_name=ds.name, split_name=ds.test_source,
                                       tta=cfg.report_tta, device=device, logits=test_logits, tta_probs=tta_probs)
        report = f"; report {files['report']}"
    run.remove_checkpoint()
    run.log(f"test accuracy {test_line(metrics)} on {metrics['test_n']} {ds.test_source} images "
            f"(best epoch {result.best_epoch}){report}")
    run.log(f"after the last epoch: {time.perf_counter() - t0:.1f} s to test, calibrate, save"
            + (" and report" if report else ""))
    return RunResult(run.path, best, ds, result.history, metrics, cfg, info)


def softmax_np(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """Calibrated probabilities (N, K) in float64 from class logits (N, K), as inference.probabilities gives them."""
    return torch.softmax(logits / temperature, dim=1).numpy().astype(np.float64)


def test_line(m: dict) -> str:
    """train.log's test figures after "test accuracy": top-5 and TTA where measured; a binary
    model's threshold, accuracy at 0.5, ROC AUC and average precision."""
    def figure(v: float | None) -> str:
        return "n/a (one class in the split)" if v is None else f"{v:.4f}"
    line = f"{m['test_accuracy']:.4f}"
    if "test_threshold" in m:
        line += (f" at threshold {m['test_threshold']:.3f} ({m['test_accuracy_at_half']:.4f} at 0.5), "
                 f"ROC AUC {figure(m['test_roc_auc'])}, average precision {figure(m['test_average_precision'])}")
    if "test_top5_accuracy" in m:
        line += f", top-5 {m['test_top5_accuracy']:.4f}"
    if "test_tta_accuracy" in m:
        line += f", {m['test_tta_accuracy']:.4f} with TTA"
    return line


def binary_threshold(cfg: TrainConfig, info: ModelInfo, val_logits: torch.Tensor, val_labels: np.ndarray
                     ) -> ModelInfo:
    """The binary model's threshold on the calibrated probability of the second class, chosen on
    validation as a multi-label model's are (the best F1, or --target-precision)."""
    from ..multilabel import choose_thresholds
    p = torch.softmax(val_logits / info.temperature, dim=1)[:, 1].numpy()
    target = cfg.target_precision or None
    chosen = choose_thresholds(p[:, None], val_labels[:, None] == 1, target)
    return dataclasses.replace(info, thresholds=chosen.tolist())


def binary_figures(info: ModelInfo, test_logits: torch.Tensor, labels: np.ndarray) -> dict:
    """metrics.json's binary figures: accuracy at the threshold (test_accuracy) and at 0.5, the
    positive class's precision / recall / F1, ROC AUC, average precision, the confusion matrix."""
    from ..multilabel import binary_metrics
    p = torch.softmax(class_logits(test_logits, "binary") / info.temperature, dim=1)[:, 1].numpy()
    m = binary_metrics(p, labels, info.thresholds[0])
    return {"test_accuracy": m["accuracy"], "test_accuracy_at_half": m["accuracy_at_half"],
            "test_threshold": m["threshold"], "test_precision": m["precision"], "test_recall": m["recall"],
            "test_f1": m["f1"], "test_roc_auc": m["roc_auc"], "test_average_precision": m["average_precision"],
            "test_confusion_matrix": m["confusion_matrix"], "positive_class": info.class_names[1]}


def run_facts(ds: Dataset, result: TrainResult) -> dict:
    """metrics.json's figures about the run rather than the test: best epoch, time, device, versions."""
    return {"test_split": ds.test_source, "best_epoch": result.best_epoch, "val_accuracy": result.best_val_acc,
            "train_seconds": result.train_seconds, "device": result.device.type, "precision": result.precision,
            "precision_reason": result.info.precision.get("reason", ""),
            "torch": torch.__version__, "cnnkit": __version__, "python": platform.python_version()}


def finish_multi_label(cfg: TrainConfig, run: RunFolder, ds: Dataset, result: TrainResult) -> RunResult:
    """The end of a multi-label run: one threshold per label chosen on validation (the best F1, or
    --target-precision), the test figures at those thresholds (evaluate.evaluate_multi_label; macro
    F1 at 0.5 beside, to show what tuning gave), the model file with its thresholds, metrics.json,
    then report.html (report_multilabel.py). No temperature: each label's calibration is its ECE."""
    from ..evaluate import evaluate_multi_label
    from ..multilabel import choose_thresholds
    t0 = time.perf_counter()
    best, device = result.model.to(memory_format=torch.channels_last), result.device
    preprocess = Preprocess.from_info(result.info, channels_last=True).to(device)
    val_probs = torch.sigmoid(predict_logits(best, ds.val.images, preprocess, device, "fp32")).numpy()  # (N, K)
    info = dataclasses.replace(result.info, thresholds=choose_thresholds(
        val_probs, ds.val.labels.numpy(), cfg.target_precision or None).tolist())
    m, test_probs = evaluate_multi_label(best, info, ds.test, ds.class_names, device)
    metrics = {"test_accuracy": m["subset_accuracy"], "test_subset_accuracy": m["subset_accuracy"],
               "test_mean_average_precision": m["mean_average_precision"], "test_hamming_loss": m["hamming_loss"],
               "test_micro_f1": m["micro"]["f1"], "test_macro_f1": m["macro"]["f1"],
               "test_macro_f1_at_half": m["at_half"]["macro_f1"],
               "test_subset_accuracy_at_half": m["at_half"]["subset_accuracy"],
               "test_n": m["n"], "test_per_label": m["per_label"], **run_facts(ds, result)}
    info = dataclasses.replace(info, metrics=metrics, history=result.history)
    run.save_model(best, info)
    run.write_history(result.history)
    run.write_metrics(metrics)
    run.log(f"test mAP {metrics['test_mean_average_precision']:.4f}, subset accuracy {m['subset_accuracy']:.4f}, "
            f"macro F1 {m['macro']['f1']:.4f} at the validation thresholds ({m['at_half']['macro_f1']:.4f} at 0.5) "
            f"on {m['n']} {ds.test_source} images (best epoch {result.best_epoch})")
    if cfg.report and run.primary:  # the test split's report.html and pictures, as `cnnkit evaluate` writes them
        from ..report_multilabel import evaluate_and_report_multi_label
        _, files = evaluate_and_report_multi_label(best, info, ds.test, run.path, data_name=ds.name,
                                                   split_name=ds.test_source, device=device, probs=test_probs)
        run.log(f"report {files['report']}")
    run.remove_checkpoint()  # last, as for one class per image: a run stopped before here resumes
    run.log(f"after the last epoch: {time.perf_counter() - t0:.1f} s to choose thresholds, test, save"
            + (" and report" if cfg.report and run.primary else ""))
    return RunResult(run.path, best, ds, result.history, metrics, cfg, info)
