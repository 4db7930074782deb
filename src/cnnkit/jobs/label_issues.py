"""`cnnkit label-issues`: rank the training images whose labels are probably wrong.

    out-of-fold probabilities   k models, each trained (with the chosen recipe) on all folds but one
                                and asked about the fold it never saw: (N, K)
    confident learning          cleanlab: each image's label quality (self-confidence, the
                                probability the held-out model gives the given label) ranks the
                                images; cleanlab.filter.find_label_issues flags the likely errors
    retrain (optional)          the same recipe on the training split with and without the flagged
                                images, both tested on the untouched test split

Multi-label data goes through cleanlab's multi-label mode: each image's label quality ranks it,
and each label is judged on its own (find_multilabel_issues_per_class): a given label the held-out
model doubts is likely extra, a label it sees but the file lacks is likely missing. Binary data is
two classes to cleanlab, (1 - p, p).

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
    outputs = 1 if ds.task == "binary" else ds.num_classes
    model = build_model(get_spec(cfg.model), outputs, in_channels=c, image_size=(h, w))
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
    if labels.ndim == 2:  # multi-label: folds stratified by each image's rarest label, as data.carve splits
        if labels.sum(0).min() < folds:
            raise CnnkitError(f"every label needs at least {folds} training images for {folds}-fold cross-validation")
        counts = labels.sum(0)
        rarest = np.where(labels > 0, counts[None, :], np.inf).argmin(1)
        labels = np.where(labels.any(1), rarest, ds.num_classes)  # images without a label: a group of their own
        groups = np.bincount(labels)
        if groups[groups > 0].min() < folds:
            raise CnnkitError(f"too few training images share a rarest label for {folds}-fold cross-validation: "
                              "use fewer --folds")
    elif np.bincount(labels, minlength=ds.num_classes).min() < folds:
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


def rank_multi_label_issues(truth: np.ndarray, probs: np.ndarray) -> dict:
    """cleanlab's multi-label mode on truth (N, K) 0/1 and out-of-fold probabilities (N, K): each
    image's label quality and ranking, its flag, and per label whether it is likely extra (given,
    doubted) or missing (not given, seen): (N, K) masks."""
    try:
        from cleanlab.multilabel_classification.filter import find_label_issues, find_multilabel_issues_per_class
        from cleanlab.multilabel_classification.rank import get_label_quality_scores
    except ImportError:
        raise CnnkitError("label-issues needs cleanlab: pip install 'cnnkit[labels]'") from None
    given = [np.flatnonzero(row).tolist() for row in truth]  # cleanlab takes each image's list of labels
    # An image is as doubtful as its most doubted label: the minimum of the per-label self-confidences.
    # cleanlab's default aggregation (an exponential moving average of them) ranked 28% of corrupted
    # multi-MNIST sets among the most doubtful 2x their number, the minimum 78% (8,000 images, 2 folds;
    # tests/test_labelissues.py, AMD EPYC).
    quality = get_label_quality_scores(given, probs, aggregator_kwargs={"method": np.min})
    per_label = np.asarray(find_multilabel_issues_per_class(given, probs), bool)  # (N, K): label k's state is wrong
    has = truth > 0.5
    return {"quality": quality, "ranking": np.argsort(quality, kind="stable"),
            "flagged": find_label_issues(given, probs), "extra": per_label & has, "missing": per_label & ~has}


def label_issues(cfg: TrainConfig, folds: int = 3, retrain: bool = False, out: str | Path | None = None,
                 ds: Dataset | None = None, echo=None) -> tuple[dict, dict[str, Path]]:
    """The job: rank, write label_issues.csv, label_issues.png and label_issues.json into `out`.
    ds: the data, when the caller has it (tests flip labels in it); else loaded from cfg."""
    say = echo or (lambda msg: None)
    if cfg.lr_find or cfg.teacher == "fast":  # both are steps of `cnnkit train` before fitting
        flag, fix = ("--lr auto", "--lr NUMBER") if cfg.lr_find else ("--teacher fast", "--teacher RUN or none")
        raise CnnkitError(f"label-issues trains its folds without `cnnkit train`'s first steps: give {fix} "
                          f"instead of {flag}")
    if ds is None:
        ds, _ = load_data_and_model(cfg, quiet=True)
    out = Path(out or f"label-issues-{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    labels = ds.train.labels.numpy()
    say(f"{folds}-fold cross-validation of {cfg.model} on {len(labels):,} training images of {ds.name} "
        f"({cfg.epochs} epochs a fold)")
    with tempfile.TemporaryDirectory(prefix="cnnkit-folds-") as work:
        probs = out_of_fold_probabilities(cfg, ds, folds, Path(work),
                                          on_fold=lambda f, k: say(f"fold {f} of {k} done"))
    if ds.task == "multi-label":
        found = rank_multi_label_issues(labels, probs)
        files = write_multi_label_issues(ds, probs, found, out)
        agreement = float(((probs >= 0.5) == (labels > 0.5)).all(1).mean())  # out-of-fold subset accuracy
    else:
        found = rank_label_issues(labels, probs)
        files = write_issues(ds, probs, found, out)
        agreement = float((found["suggested"] == labels).mean())
    summary = {"data": ds.name, "task": ds.task, "model": cfg.model, "folds": folds, "train_images": len(labels),
               "flagged": int(found["flagged"].sum()), "out": str(out), "out_of_fold_accuracy": agreement,
               "method": "cleanlab: self-confidence ranking, find_label_issues(prune_by_noise_rate) flags"
               + (" (multi-label mode; per label: find_multilabel_issues_per_class)" if "extra" in found else "")}
    if ds.task == "multi-label":
        summary.update(likely_extra=int(found["extra"].sum()), likely_missing=int(found["missing"].sum()))
    if retrain:
        say(f"training again on all {len(labels):,} images, then without the {summary['flagged']:,} flagged")
        summary["retrain"] = retrain_without(cfg, ds, found["flagged"])
    files["json"] = out / "label_issues.json"
    write_text_atomic(files["json"], json.dumps(summary, indent=2))
    return {**summary, "ranking": found["ranking"], "flagged_mask": found["flagged"], "probabilities": probs}, files


def write_issues(ds: Dataset, probs: np.ndarray, found: dict, out: Path) -> dict[str, Path]:
    """label_issues.csv (every training image, most likely wrong first) and label_issues.png."""
    from ..report import plot_misclassified
    names, paths, labels = ds.class_names, ds.train.paths, ds.train.labels.numpy()
    rows = []
    for rank, i in enumerate(found["ranking"], 1):
        rows.append([rank, int(i), paths[i] if paths else "", names[labels[i]], names[found["suggested"][i]],
                     f"{found['quality'][i]:.6f}", f"{probs[i].max():.6f}", int(found["flagged"][i])])
    files = {"csv": out / "label_issues.csv"}
    write_csv(files["csv"], ["rank", "index", "path", "given_label", "suggested_label", "given_label_probability",
                             "suggested_probability", "flagged"], rows)
    top = [i for i in found["ranking"][:GALLERY_IMAGES] if found["flagged"][i]]
    gallery = [{"index": k, "true": f"given {names[labels[i]]}", "predicted": names[found["suggested"][i]],
                "probability": float(probs[i].max())} for k, i in enumerate(top)]
    images = ds.train.images[torch.as_tensor(top, dtype=torch.long)] if top else ds.train.images[:0]
    files["gallery"] = plot_misclassified(images, gallery, out / "label_issues.png")
    return files


def write_multi_label_issues(ds: Dataset, probs: np.ndarray, found: dict, out: Path) -> dict[str, Path]:
    """The multi-label label_issues.csv: per image its given set, the set the held-out model sees
    (p >= 0.5), the labels likely extra and likely missing, its quality and flag; and the gallery."""
    from ..report import plot_misclassified
    names, paths, truth = ds.class_names, ds.train.paths, ds.train.labels.numpy() > 0.5

    def named(mask: np.ndarray) -> str:
        return ";".join(names[k] for k in np.flatnonzero(mask))
    rows = []
    for rank, i in enumerate(found["ranking"], 1):
        rows.append([rank, int(i), paths[i] if paths else "", named(truth[i]), named(probs[i] >= 0.5),
                     named(found["extra"][i]), named(found["missing"][i]), f"{found['quality'][i]:.6f}",
                     int(found["flagged"][i])])
    files = {"csv": out / "label_issues.csv"}
    write_csv(files["csv"], ["rank", "index", "path", "given_labels", "suggested_labels", "likely_extra",
                             "likely_missing", "label_quality", "flagged"], rows)
    top = [i for i in found["ranking"][:GALLERY_IMAGES] if found["flagged"][i]]
    gallery = [{"index": k, "true": f"given {named(truth[i]) or '-'}", "predicted": named(probs[i] >= 0.5) or "-",
                "probability": float(found["quality"][i])} for k, i in enumerate(top)]
    images = ds.train.images[torch.as_tensor(top, dtype=torch.long)] if top else ds.train.images[:0]
    files["gallery"] = plot_misclassified(images, gallery, out / "label_issues.png")
    return files


def retrain_without(cfg: TrainConfig, ds: Dataset, flagged: np.ndarray) -> dict:
    """The recipe trained on all training images and without the flagged ones, both tested on the
    test split: accuracy (multi-label: mAP, the threshold-free figure)."""
    from ..multilabel import multilabel_metrics
    keep = np.flatnonzero(~flagged)
    figure = "mean_average_precision" if ds.task == "multi-label" else "accuracy"
    with tempfile.TemporaryDirectory(prefix="cnnkit-retrain-") as work:
        result = {}
        for name, index in (("with_flagged", None), ("without_flagged", keep)):
            model, info = train_on(cfg, ds, index, Path(work) / name, cfg.seed)
            probs, truth = probabilities(model, info, ds.test.images), ds.test.labels.numpy()
            if ds.task == "multi-label":
                value = multilabel_metrics(probs, truth, np.full(ds.num_classes, 0.5), ds.class_names)[figure]
            else:
                value = float((probs.argmax(1) == truth).mean())
            result[f"test_{figure}_{name}"] = value
    return {**result, "test_images": len(ds.test), "test_split": ds.test_source}
