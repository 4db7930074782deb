"""Embeddings and few-shot nearest-neighbour models on a network's penultimate features.

    load_backbone(source)          a run folder or model file, or a pretrained name (efficientnet_lite0)
    embed_images(backbone, images) (N, D) float32 L2-normalised features of uint8 images
    load_knn_data(cfg)             `--model knn:SOURCE`: the backbone and the data decoded to its input,
                                   the training split cut to --shots per class
    train_knn(cfg, run, ...)       the training split's features as the support set of a KnnClassifier
                                   (models/knn.py): a TrainResult like the SVM's, which jobs/train.py
                                   finishes as any run

The vote's k is a fixed rule, not a choice on validation: with a few images per class the
validation split is a handful of images, and with DIR/{train,val} folders it is the very split the
test figures are measured on (no test folder). The temperature fitted there afterwards (every
run's calibration) does not change a single decision.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .data import Columns, Dataset, load_dataset
from .errors import CnnkitError
from .inference import INFERENCE_BATCH, metrics_from_logits, pick_device, predict_logits
from .modelfile import ModelInfo, is_model_file, load_model, read_info
from .models.knn import KnnClassifier, knn_record
from .models.pretrained import PACKAGES
from .models.registry import architecture_record, build_model
from .preprocess import Preprocess
from .runfolder import RunFolder
from .training.session import TrainResult, log_data, model_info

PRETRAINED_SIDE = 224  # the ImageNet networks' input side, in pixels
MAX_K = 20  # the vote's k at most: the k-NN evaluation of Wu et al. 2018 and DINO use 20


@dataclass
class Backbone:
    """A network whose features are embedded, with what it needs to take images."""
    model: nn.Module  # in eval mode, on the CPU
    preprocess: Preprocess
    input: tuple[int, int, int]  # (C, H, W) it takes
    name: str  # for people: the run's architecture or the pretrained network's name
    origin: dict  # where it came from: ModelInfo.pretrained of a kNN run ({source, name, ...})
    info: ModelInfo | None = None  # a model file's metadata; None for pretrained weights


def not_a_source(source: str) -> CnnkitError:
    return CnnkitError(f"no model file or run folder at {source}: give a run folder, a .safetensors model file or "
                       f"a pretrained network ({', '.join(PACKAGES)})")


def load_backbone(source: str) -> Backbone:
    """A run folder or model file (a kNN model's own backbone), or a pretrained name: `efficientnet_lite0`
    is the ImageNet network from its installed weights package, at 224x224 with the weights' normalisation."""
    if source in PACKAGES:
        from .models.pretrained import load_pretrained
        model = build_model(source, 1000, in_channels=3, image_size=PRETRAINED_SIDE)  # ImageNet's 1000 classes
        record = load_pretrained(model, source)
        return Backbone(model.eval(), Preprocess(record["mean"], record["std"]), (3, PRETRAINED_SIDE, PRETRAINED_SIDE),
                        source, record)
    if not is_model_file(source):
        raise not_a_source(source)
    model, info = load_model(source)
    name = info.name
    if isinstance(model, KnnClassifier):  # a kNN model's features are its backbone's
        model, name = model.backbone, info.architecture["backbone"].get("name") or "network"
    return Backbone(model, Preprocess.from_info(info), info.input.chw, name,
                    {"source": str(source), "name": name, "loaded_tensors": len(model.state_dict()),
                     "mean": info.preprocessing.mean, "std": info.preprocessing.std}, info)


def backbone_input(source: str) -> tuple[int, int, int]:
    """The (C, H, W) load_backbone(source) will take, from the metadata alone (no weights read)."""
    if source in PACKAGES:
        return 3, PRETRAINED_SIDE, PRETRAINED_SIDE
    if not is_model_file(source):
        raise not_a_source(source)
    return read_info(source).input.chw


@torch.no_grad()
def embed_images(backbone: Backbone, images: torch.Tensor, device: torch.device = torch.device("cpu"),
                 batch_size: int = INFERENCE_BATCH) -> torch.Tensor:
    """(N, D) float32 L2-normalised penultimate features (model.embed) of uint8 images (N, C, H, W),
    in fp32 and eval mode, in batches, returned on the CPU. Channels-last activations, as
    inference.probabilities runs them: 20.5 s against 29.7 s for EfficientNet-Lite0 on hymenoptera's
    153 val images (2-core AMD EPYC, busy)."""
    model = backbone.model.eval().to(device, memory_format=torch.channels_last)
    preprocess = Preprocess(backbone.preprocess.mean, backbone.preprocess.std, channels_last=True).to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size].to(device))  # (B, C, H, W) float32
        out.append(F.normalize(model.embed(x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


# ----------------------------------------------------------------------------- kNN training
def vote_k(support: int) -> int:
    """The vote's k: MAX_K, at most the support count less one (the vote weighs each neighbour
    against the (k+1)-th). The similarity weights let the nearest dominate, so a k beyond the shots
    per class costs little, where a plain majority of 20 drowns 1 or 5 images a class: on MNIST
    digits 5-9 and hymenoptera (benchmarks/data/few_shot.py, small runs), k = 20 came within half a
    point of the best of k = 1, 5, 10, 20, and a majority of 20 up to 40 points below it."""
    return max(1, min(MAX_K, support - 1))


def check_knn_options(cfg: TrainConfig) -> None:
    """Before the run folder exists: the options a kNN model cannot honour, refused in one line."""
    if cfg.task not in ("auto", "single-label") or cfg.pos_weight or cfg.target_precision:
        raise CnnkitError("a kNN model is single-label (one class per image, a vote over the classes): leave --task, "
                          "--pos-weight and --target-precision out")
    if cfg.pretrained or cfg.freeze_backbone or cfg.fine_tune:
        raise CnnkitError("a kNN model trains no weights: its network is the one after knn: (a run, a model file or "
                          f"{', '.join(PACKAGES)}); leave --pretrained, --freeze-backbone and --fine-tune out")


def few_shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(sorted indices of `shots` images of each class of labels (N,), drawn by a seeded shuffle,
    the classes that have fewer: all of theirs are taken)."""
    rng = np.random.default_rng(seed)
    keep, short = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            short.append(c)
        keep.append(rng.permutation(idx)[:shots])
    return np.sort(np.concatenate(keep)), short


def load_knn_data(cfg: TrainConfig, quiet: bool = False) -> tuple[Backbone, Dataset, list[str]]:
    """(backbone, the dataset decoded to its input, notes for train.log), before the run folder
    exists: a bad knn:SOURCE or --data leaves nothing. Single-label only; with --shots the training
    split is cut to that many images per class."""
    check_knn_options(cfg)
    backbone = load_backbone(cfg.model.removeprefix("knn:"))
    c, h, w = backbone.input
    if h != w:
        raise CnnkitError(f"a kNN model decodes images to its network's square input; {backbone.name} takes "
                          f"{c}x{h}x{w}")
    for flag, value, want in (("--image-size", cfg.image_size, h), ("--channels", cfg.channels, c)):
        if value is not None and value != want:
            raise CnnkitError(f"{flag} {value}: a kNN model takes its network's input ({c}x{h}x{w}); leave {flag} out")
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=h, channels=c,
                      val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, quiet=quiet,
                      columns=Columns.of(cfg))
    if ds.task != "single-label":
        raise CnnkitError(f"a kNN model is single-label (one class per image); {cfg.data} is {ds.task}: train a CNN")
    notes = []
    if cfg.shots:
        keep, short = few_shot_indices(ds.train.labels.numpy(), ds.num_classes, cfg.shots, cfg.seed)
        if short:
            notes.append(f"note: {', '.join(ds.class_names[i] for i in short)} ha{'s' if len(short) == 1 else 've'} "
                         f"fewer than {cfg.shots} training images: all of them are in the support set")
        ds = dataclasses.replace(ds, train=ds.train.subset(keep))
    return backbone, ds, notes


def train_knn(cfg: TrainConfig, run: RunFolder, backbone: Backbone, ds: Dataset, notes: list[str] | None = None
              ) -> TrainResult:
    """`--model knn:SOURCE` on load_knn_data's backbone and dataset: the training split's features as
    the support set of a KnnClassifier, its validation figures, and the model file's metadata
    (jobs/train.py finishes it as any run: calibration, test, model file, report)."""
    log_data(run, ds)
    for note in notes or []:
        run.log(note)
    device = pick_device(cfg.device)
    t0 = time.perf_counter()
    if len(ds.train) < 2:  # the vote compares the k nearest with the (k+1)-th: two images at least
        raise CnnkitError(f"a nearest-neighbour model needs at least 2 training images; {cfg.data} gives "
                          f"{len(ds.train)}: add images (or --shots 1 with two classes or more)")
    support = embed_images(backbone, ds.train.images, device)  # (M, D)
    k = vote_k(len(support))
    record = knn_record(architecture_record(backbone.model), f"knn:{backbone.name}", len(support),
                        support.shape[1], ds.num_classes, k)
    model = KnnClassifier(backbone.model, len(support), support.shape[1], ds.num_classes, k, record)
    model.vote.support.copy_(support)
    model.vote.labels.copy_(ds.train.labels)
    model = model.to(device).eval()
    seconds = time.perf_counter() - t0
    run.log(f"{len(support)} support images{f' ({cfg.shots} per class)' if cfg.shots else ''} embedded by "
            f"{backbone.name} ({support.shape[1]} features) in {seconds:.1f} s; a vote of the {k} nearest "
            "by cosine similarity")
    val = metrics_from_logits(predict_logits(model, ds.val.images, backbone.preprocess.to(device), device),
                              ds.val.labels)
    # no training pass, so no training loss or accuracy (each support image's nearest is itself)
    history = [{"epoch": 1, "train_loss": float("nan"), "train_acc": float("nan"), "val_loss": val["loss"],
                "val_acc": val["accuracy"], "lr": 0.0, "seconds": seconds}]
    info = model_info(model, ds, backbone.preprocess, cfg, pretrained=backbone.origin,
                      precision={"training": "fp32", "reason": "a kNN model embeds in fp32"})
    return TrainResult(model, backbone.preprocess, history, 1, val["accuracy"], device, "fp32", seconds, info)
