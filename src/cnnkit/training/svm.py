"""The notes' pre-deep-learning baseline (`--model svm`): scikit-learn's linear SVM on pixels,
returned as the same TrainResult a CNN's training returns."""
from __future__ import annotations

import time

import torch

from ..config import TrainConfig
from ..data import Columns, Dataset, load_dataset
from ..data.core import DiskImages
from ..errors import CnnkitError
from ..inference import metrics_from_logits, predict_logits
from ..models.registry import build_model, get_spec
from ..preprocess import Preprocess
from ..runfolder import RunFolder
from .session import TrainResult, model_info


def check_svm_options(cfg: TrainConfig) -> None:
    """Before the run folder exists: the options an SVM cannot honour, refused in one line."""
    if cfg.task not in ("auto", "single-label") or cfg.pos_weight or cfg.target_precision:
        raise CnnkitError("the SVM baseline is single-label (one class per image, softmax over its scores): leave "
                          "--task, --pos-weight and --target-precision out, or train a CNN")


def train_svm(cfg: TrainConfig, run: RunFolder, quiet: bool = False) -> tuple[Dataset, TrainResult]:
    """The notes' pre-deep-learning baseline: scikit-learn's linear SVM on normalized, flattened pixels.

    A linear SVM is a linear model, so its weights go into the `linear` spec network
    (flatten -> dense): the model file, evaluate, predict and calibration all work unchanged."""
    from sklearn.svm import LinearSVC

    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                      channels=cfg.channels, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed,
                      quiet=quiet, columns=Columns.of(cfg))
    if ds.task != "single-label":
        raise CnnkitError(f"the SVM baseline is single-label (one class per image); {cfg.data} is {ds.task}: "
                          "train a CNN")
    if isinstance(ds.train.images, DiskImages):
        raise CnnkitError(f"the SVM fits all {len(ds.train)} training images at once, and this dataset is larger than "
                          "the in-memory limit: train a CNN, or raise CNNKIT_MAX_IN_MEMORY_MB")
    preprocess = Preprocess.fit(ds.train.images)
    flat = lambda images: preprocess(images).flatten(1).numpy()  # noqa: E731  (N, C*H*W) float32
    c, h, w = ds.input_shape
    run.log(f"data {ds.name}: {ds.sizes()} images of {c}x{h}x{w}, {ds.num_classes} classes; "
            f"fitting a linear SVM (one-vs-rest, squared hinge, C=0.01) on {c * h * w} pixels")
    t0 = time.perf_counter()
    # dual=False: the primal solver is the fast one when samples outnumber pixels
    svm = LinearSVC(C=0.01, dual=False, max_iter=200, random_state=cfg.seed).fit(flat(ds.train.images),
                                                                                 ds.train.labels.numpy())
    seconds = time.perf_counter() - t0
    model = build_model(get_spec("linear"), ds.num_classes, in_channels=c, image_size=(h, w))
    weight, bias = torch.from_numpy(svm.coef_).float(), torch.from_numpy(svm.intercept_).float()
    if ds.num_classes == 2:  # one decision function f: logits (-f/2, f/2) give the same argmax
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    model.eval()
    val = metrics_from_logits(predict_logits(model, ds.val.images, preprocess), ds.val.labels)
    train_acc = float(svm.score(flat(ds.train.images), ds.train.labels.numpy()))
    history = [{"epoch": 1, "train_loss": float("nan"), "train_acc": train_acc, "val_loss": val["loss"],
                "val_acc": val["accuracy"], "lr": 0.0, "seconds": seconds}]
    info = model_info(model, ds, preprocess, cfg)
    info.architecture["name"] = "linear SVM"
    return ds, TrainResult(model, preprocess, history, 1, val["accuracy"], torch.device("cpu"),
                           "fp64 (scikit-learn)", seconds, info)
