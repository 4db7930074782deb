"""`cnnkit label-issues`: rank the training images whose labels are probably wrong.

    out-of-fold probabilities   k models, each trained (with the chosen recipe) on all folds but one
                                and asked about the fold it never saw: (N, K)
    confident learning          cleanlab: each image's label quality (self-confidence, the
                                probability the held-out model gives the given label) ranks the
                                images; cleanlab.filter.find_label_issues flags the likely errors
    retrain (optional)          the same recipe on the training split with and without the flagged
                                images, both tested on the untouched test split

Why out-of-fold: a model asked about its own training images has memorised their labels, right or
wrong; only held-out predictions can disagree with a wrong label (Northcutt et al. 2021).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..data import Dataset
from ..errors import CnnkitError
from ..inference import probabilities
from ..models.registry import build_model, get_spec
from ..runfolder import RunFolder
from ..training import fit, load_data_and_model
from ..utils import write_csv, write_text_atomic

GALLERY_IMAGES = 48  # the most likely label errors drawn in label_issues.png


def train_on(cfg: TrainConfig, ds: Dataset, train_index: np.ndarray | None, folder: Path, seed: int):
    """A model trained by `cfg` on ds.train (or the rows train_index of it); ds.val picks its best epoch."""
    subset = ds if train_index is None else dataclasses.replace(ds, train=ds.train.subset(train_index))
    c, h, w = ds.input_shape
    torch.manual_seed(seed)
    model = build_model(get_spec(cfg.model), ds.num_classes, in_channels=c, image_size=(h, w))
    run = RunFolder(folder, echo=None, quiet=True)
    run.create()
    result = fit(dataclasses.replace(cfg, seed=seed, report=False), subset, model, run, quiet=True)
    return result.model.cpu(), result.info


def out_of_fold_probabilities(cfg: TrainConfig, ds: Dataset, folds: int, workdir: Path,
                              on_fold=None) -> np.ndarray:
    """(N_train, K) probabilities, each row from the model that did not train on that image."""
    from sklearn.model_selection import StratifiedKFold

    labels = ds.train.labels.numpy()
    if folds < 2:
        raise CnnkitError("--folds must be at least 2")
    if np.bincount(labels, minlength=ds.num_classes).min() < folds:
        raise CnnkitError(f"every class needs at least {folds} training images for {folds}-fold cross-validation")
    probs = np.zeros((len(labels), ds.num_classes))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed)
    for f, (train_index, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        model, info = train_on(cfg, ds, train_index, workdir / f"fold{f + 1}", cfg.seed + f)
        probs[held_out] = probabilities(model, info, ds.train.images[torch.as_tensor(held_out)], calibrated=False)
        if on_fold:
            on_fold(f + 1, folds)
    return probs


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> dict:
    """cleanlab's label quality per image (lower: more likely wrong), the ranking, and its flags."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise CnnkitError("label-issues needs cleanlab: pip install 'cnnkit[labels]'") from None

    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    ranking = np.argsort(quality, kind="stable")  # most likely wrong first
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    return {"quality": quality, "ranking": ranking, "flagged": flagged, "suggested": probs.argmax(1)}


def label_issues(cfg: TrainConfig, folds: int = 3, retrain: bool = False, out: str | Path | None = None,
                 ds: Dataset | None = None, echo=None) -> tuple[dict, dict[str, Path]]:
    """The job: rank, write label_issues.csv, label_issues.png and label_issues.json into `out`.
    ds: the data, when the caller has it (tests flip labels in it); else loaded from cfg."""
    from ..report import plot_misclassified

    say = echo or (lambda msg: None)
    if ds is None:
        ds, _ = load_data_and_model(cfg, quiet=True)
    if ds.task != "single-label":
        raise CnnkitError(f"{cfg.data} is {ds.task}: label-issues ranks single-label data only so far")
    out = Path(out or f"label-issues-{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    labels = ds.train.labels.numpy()
    say(f"{folds}-fold cross-validation of {cfg.model} on {len(labels):,} training images of {ds.name} "
        f"({cfg.epochs} epochs a fold)")
    with tempfile.TemporaryDirectory(prefix="cnnkit-folds-") as work:
        probs = out_of_fold_probabilities(cfg, ds, folds, Path(work),
                                          on_fold=lambda f, k: say(f"fold {f} of {k} done"))
    found = rank_label_issues(labels, probs)
    names, paths = ds.class_names, ds.train.paths
    rows = []
    for rank, i in enumerate(found["ranking"], 1):
        rows.append([rank, int(i), paths[i] if paths else "", names[labels[i]], names[found["suggested"][i]],
                     f"{found['quality'][i]:.6f}", f"{probs[i].max():.6f}", int(found["flagged"][i])])
    files = {"csv": out / "label_issues.csv"}
    write_csv(files["csv"], ["rank", "index", "path", "given_label", "suggested_label", "given_label_probability",
                             "suggested_probability", "flagged"], rows)
    top = [i for i in found["ranking"][:GALLERY_IMAGES] if found["flagged"][i]]
    gallery = [{"index": int(i), "true": f"given {names[labels[i]]}", "predicted": names[found["suggested"][i]],
                "probability": float(probs[i].max())} for i in top]
    images = ds.train.images[torch.as_tensor(top, dtype=torch.long)] if top else ds.train.images[:0]
    files["gallery"] = plot_misclassified(images, [{**g, "index": k} for k, g in enumerate(gallery)],
                                          out / "label_issues.png")
    summary = {"data": ds.name, "model": cfg.model, "folds": folds, "train_images": len(labels),
               "flagged": int(found["flagged"].sum()), "out": str(out),
               "out_of_fold_accuracy": float((found["suggested"] == labels).mean()),
               "method": "cleanlab: self-confidence ranking, find_label_issues(prune_by_noise_rate) flags"}
    if retrain:
        keep = np.flatnonzero(~found["flagged"])
        say(f"training again on all {len(labels):,} images, then without the {summary['flagged']:,} flagged")
        with tempfile.TemporaryDirectory(prefix="cnnkit-retrain-") as work:
            accuracy = {}
            for name, index in (("with_flagged", None), ("without_flagged", keep)):
                model, info = train_on(cfg, ds, index, Path(work) / name, cfg.seed)
                accuracy[name] = float((probabilities(model, info, ds.test.images).argmax(1)
                                        == ds.test.labels.numpy()).mean())
        summary["retrain"] = {"test_accuracy_with_flagged": accuracy["with_flagged"],
                              "test_accuracy_without_flagged": accuracy["without_flagged"],
                              "test_images": len(ds.test), "test_split": ds.test_source}
    files["json"] = out / "label_issues.json"
    write_text_atomic(files["json"], json.dumps(summary, indent=2))
    return {**summary, "ranking": found["ranking"], "flagged_mask": found["flagged"]}, files
