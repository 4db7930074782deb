"""The jobs behind the commands, each from its inputs to its files:

    train(cfg)                   resolve the run folder -> train (training.py) -> finish: calibrate on
                                 validation, test, write the model file and metrics -> report
    evaluate_and_report(...)     a model on a split: metrics (evaluate.py), pictures (report.py), report.html
    explain_to_folder(...)       one image: kernels, feature maps, Grad-CAM (explain.py), pictures

This is the one module that combines training, evaluation, explanation and reporting; those four do
not import each other (the import-linter contract in pyproject.toml checks it). matplotlib is
imported only when a picture is drawn, so `--no-report` runs never load it.
"""
from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .config import TrainConfig
from .distributed import World, broadcast_text
from .data import Dataset, Split
from .errors import CnnkitError
from .evaluate import evaluate, fit_temperature
from .inference import metrics_from_logits, pick_device, predict_logits, probabilities, temperature_of
from .models.summary import summary
from .preprocess import Preprocess
from .runfolder import RunFolder
from .training import TrainResult, augmentation_and_balance, fit, load_data_and_model, train_svm
from .utils import write_csv, write_text_atomic
from .version import __version__


@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    dataset: Dataset
    history: list[dict]
    metrics: dict  # test metrics of the best model, plus best_epoch / val_accuracy / timing / versions
    config: TrainConfig
    meta: dict = field(default_factory=dict)
    primary: bool = True  # False in the other processes of a torchrun job: they train, rank 0 tests and writes


# ----------------------------------------------------------------------------- the training job
def default_run_dir(cfg: TrainConfig) -> Path:
    data = Path(cfg.data).name if Path(cfg.data).is_dir() else cfg.data
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
          echo: Callable[[str], None] | None = print) -> RunResult:
    """Train a model, writing a run folder; see TrainConfig for the options (cfg.report: whether
    to write report.html at the end).

    resume: a run folder of an interrupted run; its config.json is used and training continues
    from its last checkpoint to the same final epoch.

    Started by torchrun (WORLD_SIZE > 1), every process trains a shard of each epoch
    (distributed.py); rank 0 alone writes, tests and reports, and the others return a RunResult
    with primary False and no metrics."""
    world = World.from_env()
    if world.active:
        device_choice = cfg.device if resume is None and cfg is not None else RunFolder(resume).read_config().device
        distributed.start(world, pick_device(device_choice).type)
        distributed.stop_on_sigterm()  # torchrun stops the others with SIGTERM when one process fails
    try:
        return train_in(world, cfg, resume, quiet=quiet, echo=echo)
    finally:
        distributed.stop()


def train_in(world: World, cfg: TrainConfig | None, resume: str | Path | None, *, quiet: bool,
             echo: Callable[[str], None] | None) -> RunResult:
    cfg, run = resolve_run(cfg, resume, echo=echo, quiet=quiet, world=world)
    if cfg.model == "svm":
        if world.active:
            raise CnnkitError("the SVM baseline trains in one process: start it without torchrun")
        run.create()
        run.write_config(cfg)
        ds, result = train_svm(cfg, run, quiet)
    else:
        ds, model = load_data_and_model(cfg, quiet or not world.primary)  # before the run folder exists: a bad --data or --model leaves nothing
        run.create()
        run.write_config(cfg)
        result = fit(cfg, ds, model, run, resume=resume is not None, quiet=quiet, world=world)
    if not world.primary:
        return RunResult(run.path, result.model, ds, result.history, {}, cfg, result.meta, primary=False)
    return finish(cfg, run, ds, result)


def finish(cfg: TrainConfig, run: RunFolder, ds: Dataset, result: TrainResult) -> RunResult:
    """The end of every run, CNN or SVM: calibrate on validation, test the best model on the held-out
    split in fp32 (the figure users will quote), write the model file and metrics.json, then the
    report, and remove the checkpoint."""
    t0 = time.perf_counter()
    best, device = result.model, result.device
    best = best.to(memory_format=torch.channels_last)  # faster fp32 inference too (inference.probabilities)
    preprocess = Preprocess.from_meta(result.meta, channels_last=True).to(device)
    test_logits = predict_logits(best, ds.test.images, preprocess, device, "fp32")  # (N, K)
    val_logits = predict_logits(best, ds.val.images, preprocess, device, "fp32")
    meta = {**result.meta, "calibration": {"temperature": fit_temperature(val_logits, ds.val.labels), "fitted_on": "val"}}
    metrics = {"test_" + k: v for k, v in metrics_from_logits(test_logits, ds.test.labels).items()}
    metrics.update({"test_split": ds.test_source, "best_epoch": result.best_epoch, "val_accuracy": result.best_val_acc,
                    "train_seconds": result.train_seconds, "device": device.type, "precision": result.precision,
                    "precision_reason": result.meta.get("precision", {}).get("reason", ""),
                    "torch": torch.__version__, "cnnkit": __version__, "python": platform.python_version()})
    tta_probs = None
    if cfg.report_tta:  # mirror and shifts, averaged: in metrics.json, and the report reuses them
        tta_probs = probabilities(best, meta, ds.test.images, tta=True, device=device, logits=test_logits)
        metrics["test_tta_accuracy"] = float((tta_probs.argmax(1) == ds.test.labels.numpy()).mean())
    meta["metrics"], meta["history"] = metrics, result.history
    run.save_model(best, meta)
    run.write_history(result.history)
    run.write_metrics(metrics)
    report = ""
    if cfg.report and run.primary:
        _, files = evaluate_and_report(best, meta, ds.test, run.path, data_name=ds.name, split_name=ds.test_source,
                                       tta=cfg.report_tta, device=device, logits=test_logits, tta_probs=tta_probs)
        report = f"; report {files['report']}"
    run.remove_checkpoint()
    top5 = f", top-5 {metrics['test_top5_accuracy']:.4f}" if "test_top5_accuracy" in metrics else ""
    tta = f", {metrics['test_tta_accuracy']:.4f} with TTA" if "test_tta_accuracy" in metrics else ""
    run.log(f"test accuracy {metrics['test_accuracy']:.4f}{top5}{tta} on {metrics['test_n']} {ds.test_source} images "
            f"(best epoch {result.best_epoch}){report}")
    run.log(f"after the last epoch: {time.perf_counter() - t0:.1f} s to test, calibrate, save"
            + (" and report" if report else ""))
    return RunResult(run.path, best, ds, result.history, metrics, cfg, meta)


# ----------------------------------------------------------------------------- the evaluation job
GALLERY_SIZE = 24  # mistakes drawn in misclassified.png (misclassified.csv lists up to 50)


def gallery_heatmaps(model: nn.Module, meta: dict, images: torch.Tensor, rows: list[dict]) -> torch.Tensor | None:
    """Grad-CAM (N, H, W) for the predicted class of each gallery image, or None for a model without convolutions."""
    from .explain import gradcam
    if not rows:
        return None
    device = next(model.parameters()).device
    x = Preprocess.from_meta(meta).to(device)(images[torch.tensor([r["index"] for r in rows])].to(device))
    names = meta["class_names"]
    try:
        heat, _ = gradcam(model.eval(), x, torch.tensor([names.index(r["predicted"]) for r in rows], device=device))
    except CnnkitError:  # linear, MLP and SVM models: nothing spatial to explain
        return None
    return heat.cpu()


def write_evaluation(out: Path, model: nn.Module, meta: dict, split: Split, metrics: dict) -> dict[str, Path]:
    """The files of an evaluation: confusion matrix (PNG, row-normalized PNG, CSV), the misclassified
    gallery with Grad-CAM heatmaps (PNG) and list (CSV), the reliability diagram. {name: path}."""
    from . import report
    names = meta["class_names"]
    cm = metrics["confusion_matrix"]
    files = {"confusion_matrix_csv": out / "confusion_matrix.csv", "misclassified_csv": out / "misclassified.csv"}
    write_csv(files["confusion_matrix_csv"], ["true \\ predicted", *names], [[n, *row] for n, row in zip(names, cm)])
    mis = metrics["misclassified"]
    write_csv(files["misclassified_csv"], ["path", "index", "true", "predicted", "probability", "loss"],
              [[m["path"], m["index"], m["true"], m["predicted"], f"{m['probability']:.6f}", f"{m['loss']:.6f}"]
               for m in mis])
    files["confusion_matrix"] = report.plot_confusion_matrix(cm, names, out / "confusion_matrix.png")
    files["confusion_matrix_normalized"] = report.plot_confusion_matrix(
        metrics["confusion_matrix_normalized"], names, out / "confusion_matrix_normalized.png", normalized=True)
    gallery = mis[:GALLERY_SIZE]
    files["misclassified"] = report.plot_misclassified(split.images, gallery, out / "misclassified.png", columns=6,
                                                       heatmaps=gallery_heatmaps(model, meta, split.images, gallery))
    files["reliability"] = report.plot_reliability(metrics["reliability"], metrics["ece"], out / "reliability.png")
    return files


def evaluate_and_report(model: nn.Module, meta: dict, split: Split, out: str | Path, *, data_name: str,
                        split_name: str = "test", tta: bool = False, device: torch.device | str | None = None,
                        title: str | None = None, logits: torch.Tensor | None = None,
                        tta_probs: np.ndarray | None = None) -> tuple[dict, dict[str, Path]]:
    """Evaluate `model` on `split` and write everything into `out`: the files of write_evaluation,
    curves.png (when the model file holds a training history), evaluation.json and report.html.
    logits: the split's fp32 logits if already computed. Returns (metrics, {name: path})."""
    from .report import plot_curves
    from .report_html import environment, write_report
    device = torch.device(device or next(model.parameters()).device)
    out = Path(out)
    t0 = time.perf_counter()
    metrics, _ = evaluate(model, meta, split, meta["class_names"], device=device, tta=tta, logits=logits,
                          tta_probs=tta_probs)
    evaluate_seconds = time.perf_counter() - t0
    files = write_evaluation(out, model, meta, split, metrics)
    arch = meta["architecture"].get("name") or meta["architecture"].get("kind", "model")
    if meta.get("history"):
        files["curves"] = plot_curves(meta["history"], out / "curves.png", title=f"{arch} on {data_name}")
    metrics.update({"split": split_name, "data": data_name, "out": str(out), "evaluate_seconds": evaluate_seconds})
    files["evaluation_json"] = out / "evaluation.json"
    write_text_atomic(files["evaluation_json"], json.dumps(metrics, indent=2))
    training = meta.get("metrics", {})
    files["report"] = write_report(
        out / "report.html", title=title or f"{arch} on {data_name}: {split_name} split",
        model_info=summary(model), meta=meta, evaluation=metrics, files=files,
        timing={"train_seconds": training.get("train_seconds"), "evaluate_seconds": evaluate_seconds},
        env={**environment(str(device)), **({"precision (training)": training["precision"]} if "precision" in training else {})})
    return metrics, files


# ----------------------------------------------------------------------------- the explain job
def explain_to_folder(model: nn.Module, meta: dict, image_path: str | Path, out: str | Path,
                      class_name: str | None = None, top_k: int = 5) -> dict:
    """`cnnkit explain`: kernels.png, one feature-map figure per conv layer (or stage), gradcam.png
    and explain.json in `out`, for one image file. Returns explain.json's dict."""
    from .decode import decode_image
    from .explain import explain_image
    from .report import plot_feature_maps, plot_gradcam, plot_kernels
    inp, names = meta["input"], meta["class_names"]
    if inp["height"] != inp["width"]:
        raise CnnkitError("explain supports square model inputs only")
    class_index = None
    if class_name is not None:
        if class_name not in names:
            raise CnnkitError(f"--class {class_name!r} is not one of the model's classes: {', '.join(names[:20])}"
                              + (" ..." if len(names) > 20 else ""))
        class_index = names.index(class_name)
    try:
        image = torch.from_numpy(decode_image(str(image_path), inp["height"], inp["channels"]).copy())  # (C, H, W) uint8
    except FileNotFoundError:
        raise CnnkitError(f"no such image file: {image_path}") from None
    except Exception as e:  # any decoder failure: the user's file, not our bug
        raise CnnkitError(f"cannot read {image_path} as an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    result = explain_image(model.eval(), Preprocess.from_meta(meta), image, class_index, temperature_of(meta))
    out = Path(out)
    probs = result["probabilities"]
    top = probs.topk(min(top_k, len(names)))
    predicted = names[result["predicted"]]
    files = {"kernels": plot_kernels(result["kernels"], out / "kernels.png")}
    layers = []
    for i, (site, maps) in enumerate(result["layers"], 1):
        title = f"layer {site.name}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} (most active shown)"
        file = plot_feature_maps(maps, title, out / f"feature_maps_{i}_{re.sub(r'[^A-Za-z0-9]+', '_', site.name)}.png")
        layers.append({"name": site.name, "shape": list(site.shape), "file": str(file)})
    heat = {f"{names[c]} ({probs[c]:.2f})": h for c, h in result["heatmaps"].items()}
    files["gradcam"] = plot_gradcam(image, heat, out / "gradcam.png")
    site = result["gradcam_site"]
    info = {"image": str(image_path), "predicted": predicted, "probability": float(probs[result["predicted"]]),
            "top": [{"label": names[i], "probability": float(p)} for p, i in zip(top.values.tolist(), top.indices.tolist())],
            "gradcam_classes": [names[c] for c in result["heatmaps"]],
            "gradcam_layer": {"name": site.name, "shape": list(site.shape)},
            "kernels_shape": list(result["kernels"].shape), "feature_maps": layers,
            "files": {"kernels": str(files["kernels"]), "gradcam": str(files["gradcam"]),
                      "json": str(out / "explain.json")}}
    write_text_atomic(out / "explain.json", json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- the augmentation preview
def augment_preview(cfg: TrainConfig, picture: Path, samples: int = 8, versions: int = 6) -> dict:
    """`cnnkit augment-preview`: `samples` training images (chosen by cfg.seed), each beside
    `versions` augmented copies, as training would augment them, drawn into `picture`."""
    from .report import plot_augment_grid
    if not 1 <= samples <= 64 or not 1 <= versions <= 16:
        raise CnnkitError("--samples must be 1..64 and --versions 1..16")
    ds, _ = load_data_and_model(cfg, quiet=True)
    augment, _, _ = augmentation_and_balance(cfg, ds, torch.device("cpu"))
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(ds.train), generator=g)[:samples]
    images, labels = ds.train.images[idx], ds.train.labels[idx]  # (S, C, H, W) uint8, (S,)
    columns = [images.float()] + [augment(images, labels, g) for _ in range(versions)]  # each (S, C, H, W)
    grid = torch.stack(columns, dim=1)  # (S, 1 + V, C, H, W) float 0..255
    names = [ds.class_names[i] for i in labels.tolist()]
    described = augment.default.describe() + "".join(f"; {ds.class_names[c]}: {a.describe()}" for c, a in augment.per_class)
    plot_augment_grid(grid, names, picture, title=f"{ds.name}: original, then augmented ({described})")
    return {"picture": str(picture), "data": ds.name, "samples": len(idx), "versions": versions,
            "augmentation": described}


# ----------------------------------------------------------------------------- the compare job
def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path | None = None, data: str | None = None,
                 data_dir: str | None = None) -> tuple[dict, dict[str, Path]]:
    """Both models on the same test images: paired statistics (compare.py), recall per class, the
    curves of both runs; writes compare.json, compare.html and curves.png into `out`."""
    from .compare import paired_comparison, verdict
    from .evaluate import load_split_for
    from .modelfile import load_model
    from .report import plot_compare_curves
    from .report_html import write_compare_page

    (model_a, meta_a), (model_b, meta_b) = load_model(run_a), load_model(run_b)
    name_a, name_b = Path(run_a).name or "A", Path(run_b).name or "B"
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    if meta_a["class_names"] != meta_b["class_names"]:
        raise CnnkitError("the two models have different classes: compare models trained on the same data")
    data = data or meta_a.get("data", {}).get("name") or meta_a.get("training", {}).get("data")
    if not data:
        raise CnnkitError("the model files do not name their dataset: give it with --data")
    split_a, _ = load_split_for(meta_a, data, "test", data_dir)
    split_b, _ = load_split_for(meta_b, data, "test", data_dir)
    # Pairing needs the same images in the same order. Data without its own test split is carved
    # by each run's seed and fractions: two seeds hold out different images (and train on the other's).
    same = len(split_a) == len(split_b) and torch.equal(split_a.labels, split_b.labels)
    if same and split_a.paths and split_b.paths:  # folders: the same files
        same = split_a.paths == split_b.paths
    elif same and isinstance(split_a.images, torch.Tensor) and split_a.images.shape == split_b.images.shape:
        same = torch.equal(split_a.images, split_b.images)  # built-in data at one input size: the same pixels
    if not same:
        raise CnnkitError(f"the two runs hold out different test images of {data} (their --seed, --val-split or "
                          "--test-split differ and the data has no test split of its own): compare runs made with "
                          "the same split settings, or on data with a test split")
    labels = split_a.labels.numpy()
    pred_a = probabilities(model_a, meta_a, split_a.images).argmax(1)
    pred_b = probabilities(model_b, meta_b, split_b.images).argmax(1)
    result = paired_comparison(pred_a == labels, pred_b == labels)
    sentence = verdict(result, name_a, name_b)
    per_class = []
    for k, cls in enumerate(meta_a["class_names"]):
        mask = labels == k
        if mask.any():
            ra, rb = float((pred_a[mask] == k).mean()), float((pred_b[mask] == k).mean())
            per_class.append([cls, f"{ra:.4f}", f"{rb:.4f}", f"{ra - rb:+.4f}"])
    out = Path(out or f"compare-{Path(run_a).name}-{Path(run_b).name}")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if meta_a.get("history") and meta_b.get("history"):
        files["curves"] = plot_compare_curves({name_a: meta_a["history"], name_b: meta_b["history"]}, out / "curves.png")
    result.update({"a": str(run_a), "b": str(run_b), "data": data, "verdict": sentence, "out": str(out)})
    files["compare_json"] = out / "compare.json"
    write_text_atomic(files["compare_json"], json.dumps(result, indent=2))
    files["report"] = write_compare_page(out / "compare.html", names=(name_a, name_b), result=result, verdict=sentence,
                                         per_class=per_class, files=files, data=data)
    return result, files


# ----------------------------------------------------------------------------- the audit job
PAIRS_DRAWN = 40


def audit_to_folder(data: str, out: str | Path | None = None, data_dir: str | None = None, image_size: int | None = None,
                    channels: int | None = None, threshold: float | None = None) -> tuple[dict, dict[str, Path]]:
    """`cnnkit audit`: audit.json, duplicates.csv and audit.html (with the pairs drawn) in `out`."""
    from .audit import NEAR_THRESHOLD, audit
    from .data import load_dataset
    from .report import plot_pairs
    from .report_html import write_audit_page

    ds = load_dataset(data, data_dir=data_dir, image_size=image_size, channels=channels, quiet=True)
    result = audit(ds, NEAR_THRESHOLD if threshold is None else threshold)
    out = Path(out or f"audit-{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    pairs = result["pairs"]
    files = {"csv": out / "duplicates.csv", "json": out / "audit.json"}
    keys = ["kind", "similarity", "split_a", "index_a", "path_a", "label_a", "split_b", "index_b", "path_b", "label_b"]
    write_csv(files["csv"], keys, [[p[k] for k in keys] for p in pairs])
    shown = sorted(pairs, key=lambda p: (p["split_a"] == p["split_b"], -p["similarity"]))[:PAIRS_DRAWN]  # leaks first
    if shown:
        splits = {name: getattr(ds, name) for name in ("train", "val", "test") if getattr(ds, name) is not None}
        first = torch.stack([splits[p["split_a"]].images[p["index_a"]] for p in shown])
        second = torch.stack([splits[p["split_b"]].images[p["index_b"]] for p in shown])
        captions = [f"{p['split_a']}:{p['index_a']} ~ {p['split_b']}:{p['index_b']}\n{p['kind']} {p['similarity']:.3f}"
                    + ("" if p["label_a"] == p["label_b"] else f" ({p['label_a']}/{p['label_b']})") for p in shown]
        files["pairs"] = plot_pairs(first, second, captions, out / "duplicates.png")
    summary = {k: v for k, v in result.items() if k != "pairs"}
    write_text_atomic(files["json"], json.dumps({**summary, "pairs": [{k: p[k] for k in keys} for p in pairs]}, indent=2))
    files["report"] = write_audit_page(out / "audit.html", result, files)
    return {**summary, "out": str(out)}, files


# ----------------------------------------------------------------------------- the export job
def export_with_proof(model_path: str | Path, fmt: str, out: str | Path | None = None,
                      image_paths: list[str] | None = None) -> dict:
    """`cnnkit export`: write the export, then run the same images through PyTorch and the export.
    The images: the files named, else up to PARITY_IMAGES of the model's own validation split.
    Returns {out, format, bytes, checked_on, n, agreement, max_abs_diff, passed, max_allowed_diff}."""
    from .decode import decode_files, expand_paths
    from .evaluate import load_split_for
    from .export import FORMATS, PARITY_IMAGES, PARITY_MAX_DIFF, export, parity
    from .modelfile import load_model, resolve_model_path

    src = resolve_model_path(model_path)
    model, meta = load_model(src)
    out = Path(out) if out else src.with_suffix(FORMATS.get(fmt, ""))
    inp = meta["input"]
    if image_paths:
        decoded = decode_files((expand_paths(image_paths), inp["height"], inp["channels"]))
        arrays = [a for a, _ in decoded if a is not None][:PARITY_IMAGES]
        if not arrays:
            raise CnnkitError("none of the --images files could be decoded")
        images, source = torch.from_numpy(np.stack(arrays)), f"{len(arrays)} of the files named"
    else:
        data = meta.get("data", {}).get("name") or meta.get("training", {}).get("data")
        if not data:
            raise CnnkitError("the model file does not name its dataset: give image files with --images to check the export")
        try:
            split, _ = load_split_for(meta, data, "val")
        except CnnkitError as e:
            raise CnnkitError(f"cannot load {data} to check the export ({e}); give image files with --images") from None
        images, source = split.images[:PARITY_IMAGES], f"{min(len(split), PARITY_IMAGES)} validation images of {data}"
    export(model, meta, fmt, out)
    check = parity(model, meta, out, fmt, images)
    return {"out": str(out), "format": fmt, "bytes": out.stat().st_size, "checked_on": source, **check,
            "max_allowed_diff": PARITY_MAX_DIFF}
