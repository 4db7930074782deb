"""The training loop: data -> model -> optimizer -> epochs (train, validate, checkpoint) -> test.

Batches are sliced from the dataset's uint8 tensors by a shuffled index and normalized on the whole
batch; bf16 autocast and channels-last activations are on by default where the hardware supports
them (see benchmarks/NOTES.md for the measurements behind that). A checkpoint is written atomically
after every epoch, so Ctrl-C or a kill loses at most the epoch in progress, and `resume` continues
to the same end: shuffling and dropout are seeded per epoch, so a resumed CPU run equals an
uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import __version__
from .config import TrainConfig
from .data import Dataset, load_dataset
from .data.folder import RESIZE_METHOD
from .errors import CnnkitError, TrainingInterrupted
from .modelfile import MODEL_FILE, load_model, save_model
from .models.registry import architecture_record, build_model, default_input, get_spec
from .models.summary import format_summary, summary
from .utils import atomic_path, write_text_atomic

CHECKPOINT_FILE = "checkpoint.safetensors"
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


# ----------------------------------------------------------------------------- device and precision
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CnnkitError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """'bf16' or 'fp32'. auto: bf16 where the hardware runs it natively (AVX512-BF16/AMX CPUs,
    Ampere+ GPUs); on other CPUs bf16 is emulated and slower than fp32."""
    if name not in ("auto", "bf16", "fp32"):
        raise CnnkitError(f"precision must be auto, bf16 or fp32, not {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


@dataclass
class Normalizer:
    """Per-channel (x / 255 - mean) / std, fused as x * scale + shift on whole batches."""
    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, images: torch.Tensor) -> "Normalizer":
        x = images.double() / 255  # (N, C, H, W); float64 keeps the sums exact enough
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return cls(mean.tolist(), std.tolist())

    def __call__(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        out = x.float().mul_(1 / (255 * std)).sub_(mean / std)  # (N, C, H, W) float32
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, norm: Normalizer, device: torch.device,
                   precision: str = "fp32", batch_size: int = 512, channels_last: bool = False) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU for uint8 images (N, C, H, W)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = norm(images[i:i + batch_size].to(device, non_blocking=True), channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """loss, accuracy and (with at least 5 classes) top-5 accuracy."""
    n, k = logits.shape
    result = {"loss": F.cross_entropy(logits, labels).item(), "accuracy": (logits.argmax(1) == labels).float().mean().item(),
              "n": n}
    if k >= 5:
        top5 = logits.topk(5, dim=1).indices
        result["top5_accuracy"] = (top5 == labels[:, None]).any(1).float().mean().item()
    return result


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Model and optimizer tensors as safetensors; everything else as JSON in its header."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict = {}
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    header = {**state, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"cnnkit_checkpoint": json.dumps(header)})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["cnnkit_checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in header["optimizer"]["scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": header["optimizer"]["param_groups"]})
    # Give each state tensor its parameter's memory layout. safetensors stores tensors contiguous
    # (NCHW) while channels-last conv weights are NHWC, and torch 2.13's fused CPU Adam silently
    # computes wrong updates when state and parameter strides differ (foreach Adam does not);
    # without this, a resumed run drifts from an uninterrupted one.
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    return header


# ----------------------------------------------------------------------------- one epoch
def run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              perm: torch.Tensor, norm: Normalizer, *, batch_size: int, lr_fn: Callable[[int], float],
              precision: str, channels_last: bool, label_smoothing: float = 0.0,
              bar: tqdm | None = None, frozen_bn: bool = False) -> tuple[float, int, int, float]:
    """One pass over images[perm] in batches; returns (summed loss, correct, seen, last lr).

    images: (N, C, H, W) uint8 on the training device; batches are gathered by index and normalized
    as whole batches, so no per-sample Python runs here."""
    model.train()
    if frozen_bn:  # transfer learning: keep the pretrained BatchNorm statistics (see set_phase)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr = 0, 0.0
    steps = math.ceil(len(perm) / batch_size)
    for i in range(steps):
        lr = lr_fn(i)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # fine-tuning: backbone slower than the head
        idx = perm[i * batch_size:(i + 1) * batch_size]
        x = norm(images[idx], channels_last)  # (B, C, H, W) float32
        y = labels[idx]  # (B,)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(1)
            if i % 20 == 0 or i == steps - 1:  # .item() syncs a GPU: not every step
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    return loss_sum.item(), int(correct.item()), seen, lr


# ----------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    dataset: Dataset
    history: list[dict]
    metrics: dict  # test metrics of the best model, plus best_epoch / best_val_acc
    config: TrainConfig
    meta: dict = field(default_factory=dict)


def set_phase(model: nn.Module, phase: str) -> None:
    """'frozen': only the classifier head trains; 'all': everything trains.

    BatchNorm layers stay in inference mode in both transfer phases (run_epoch's frozen_bn): their
    ImageNet statistics describe the backbone's features better than a few small batches of a new
    dataset would, and updating them while fine-tuning is a known way to wreck pretrained features."""
    head = {id(p) for p in model.head.parameters()}
    for p in model.parameters():
        p.requires_grad_(phase == "all" or id(p) in head)


def param_groups(cfg: TrainConfig, model: nn.Module, phase: str) -> list[dict]:
    """One group normally; in the fine-tuning phase the head at lr x factor and the backbone 10x slower."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if phase != "fine-tune":
        return [{"params": trainable}]
    head = {id(p) for p in model.head.parameters()}
    return [{"params": [p for p in trainable if id(p) in head], "lr_scale": cfg.fine_tune_lr_factor},
            {"params": [p for p in trainable if id(p) not in head], "lr_scale": cfg.fine_tune_lr_factor * 0.1}]


def make_optimizer(cfg: TrainConfig, model: nn.Module, phase: str = "train") -> torch.optim.Optimizer:
    """Adam or Nesterov SGD, fused into one kernel where torch supports it: on 2 CPU cores the
    per-tensor Adam took 10% of a seed-mnist-torch step, and fused Adam made the step 1.3x faster
    (benchmarks/NOTES.md)."""
    params = param_groups(cfg, model, phase)
    if cfg.optimizer == "adam":
        make = lambda **kw: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)  # noqa: E731
    elif cfg.optimizer == "sgd":
        make = lambda **kw: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,  # noqa: E731
                                            nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay, **kw)
    else:
        raise CnnkitError(f"optimizer must be adam or sgd, not {cfg.optimizer!r}")
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return make()


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """Linear warmup from 0 to peak, then linear decay to 0 (or constant)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def model_meta(model: nn.Module, ds: Dataset, norm: Normalizer, cfg: TrainConfig) -> dict:
    """What a model file records about a run besides weights and metrics: enough to rebuild the
    model and preprocess new images exactly as in training."""
    return {
        "architecture": architecture_record(model),
        "class_names": ds.class_names,
        "input": dict(zip(("channels", "height", "width"), ds.input_shape)),
        "preprocessing": {"resize": RESIZE_METHOD, "scale": 255, "mean": norm.mean, "std": norm.std},
        "training": cfg.to_dict(),
        # Test-time augmentation mirrors images unless that changes the class (digits), and shifts
        # them by 1/14 of their side: the notes' 2 pixels on 28x28, 1 on 8x8 digits, 16 on 224x224.
        "tta": {"hflip": ds.name not in ("mnist", "digits"), "shift_pixels": max(1, round(min(ds.input_shape[1:]) / 14))},
        "data": {"name": ds.name, "source": ds.source, "sizes": ds.sizes(), "test_source": ds.test_source,
                 "skipped": [list(x) for x in ds.skipped]},
    }


def fitted_calibration(model: nn.Module, ds: Dataset, norm: Normalizer, device: torch.device) -> dict:
    """Temperature scaling on the validation split: calibrated probabilities, the same predictions."""
    from .evaluate import fit_temperature
    logits = predict_logits(model, ds.val.images, norm, device, "fp32", channels_last=True)
    return {"temperature": fit_temperature(logits, ds.val.labels), "fitted_on": "val"}


def default_run_dir(cfg: TrainConfig) -> Path:
    data = Path(cfg.data).name if Path(cfg.data).is_dir() else cfg.data
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{data}-{Path(cfg.model).stem}-{stamp}"


def prepare(cfg: TrainConfig, quiet: bool) -> tuple[Dataset, nn.Module, dict]:
    """Load the data and build the model fitted to it."""
    spec = get_spec(cfg.model)
    hint = default_input(spec)
    image_size, channels = cfg.image_size, cfg.channels
    is_folder = cfg.data.lower() not in ("mnist", "fashion-mnist", "cifar10", "digits")
    if is_folder and hint is not None:  # folders are decoded straight to what the model expects
        image_size = image_size or hint[1]
        channels = channels or hint[0]
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=image_size,
                      channels=channels, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, quiet=quiet)
    c, h, w = ds.input_shape
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights
    model = build_model(spec, ds.num_classes, in_channels=c, image_size=(h, w))
    return ds, model, spec


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, quiet: bool = False,
          echo: Callable[[str], None] | None = print) -> RunResult:
    """Train a model, writing a run folder; see TrainConfig for the options.

    resume: a run folder of an interrupted run; its config.json is used and training continues
    from its last checkpoint to the same final epoch."""
    if resume is not None:
        run_dir = Path(resume)
        try:
            cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CnnkitError(f"cannot resume {run_dir}: no readable config.json ({e})") from None
        if not (run_dir / CHECKPOINT_FILE).is_file():
            if (run_dir / "metrics.json").is_file():
                raise CnnkitError(f"{run_dir} is already complete (metrics.json exists); start a new run instead")
            raise CnnkitError(f"cannot resume {run_dir}: it has no {CHECKPOINT_FILE} (it stopped before its first epoch ended)")
    else:
        cfg = cfg or TrainConfig()
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / CHECKPOINT_FILE).exists() or (run_dir / "metrics.json").exists():
            raise CnnkitError(f"{run_dir} already holds a run; choose another --out or continue it with --resume {run_dir}")
        cfg.out = str(run_dir)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise CnnkitError("--epochs, --batch-size and --lr must be positive")
    def log(msg: str) -> None:
        if echo is not None and not quiet:
            echo(msg)
        with open(run_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    if cfg.model == "svm":
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        return train_svm(cfg, run_dir, log, quiet)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    ds, model, spec = prepare(cfg, quiet)  # before the run folder exists: a bad --data or --model leaves nothing
    run_dir.mkdir(parents=True, exist_ok=True)

    write_text_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    info = summary(model)
    log(f"data {ds.name}: {ds.sizes()} images of {'x'.join(map(str, ds.input_shape))}, {ds.num_classes} classes "
        f"(from {ds.source})")
    if ds.skipped:
        log(f"skipped {len(ds.skipped)} file(s) that could not be decoded:")
        for path, reason in ds.skipped:
            log(f"  {path}: {reason}")
    if ds.test_source == "val":
        log("note: the data has no test split, so test metrics are measured on the validation split")
    log(format_summary(info, title=f"model {spec.get('name')}"))
    log(f"device {device.type}, precision {precision}, {cfg.epochs} epochs of batch {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr}")

    pretrained = None
    if cfg.pretrained:
        from .models.pretrained import load_pretrained
        pretrained = load_pretrained(model, cfg.pretrained)
        log(f"pretrained weights from {pretrained['source']} ({pretrained['loaded_tensors']} tensors"
            f"{', new classifier head' if pretrained['new_head'] else ''})")
    # Pretrained weights expect the normalization they were trained with; otherwise fit it to the data.
    norm = Normalizer(pretrained["mean"], pretrained["std"]) if pretrained else Normalizer.fit(ds.train.images)
    transfer = cfg.freeze_backbone or cfg.fine_tune
    fine_tune_epochs = (cfg.fine_tune_epochs or cfg.epochs) if cfg.fine_tune else 0
    total_epochs = cfg.epochs + fine_tune_epochs

    def phase_of(epoch: int) -> str:
        return "fine-tune" if epoch > cfg.epochs else ("frozen" if transfer else "train")

    if transfer:
        set_phase(model, "frozen")
    model = model.to(device)
    channels_last = cfg.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    history: list[dict] = []
    best_val, best_epoch, first_epoch = -1.0, 0, 1
    if resume is not None:
        with safe_open(run_dir / CHECKPOINT_FILE, framework="pt") as f:
            done_epoch = json.loads(f.metadata()["cnnkit_checkpoint"])["epoch"]
        if phase_of(done_epoch) == "fine-tune":  # the checkpoint holds the fine-tuning optimizer
            set_phase(model, "all")
            optimizer = make_optimizer(cfg, model, "fine-tune")
        start_state = load_checkpoint(run_dir / CHECKPOINT_FILE, model, optimizer)
        history, best_val, best_epoch = start_state["history"], start_state["best_val_acc"], start_state["best_epoch"]
        first_epoch = start_state["epoch"] + 1
        log(f"resuming {run_dir} after epoch {start_state['epoch']}")

    meta = {**model_meta(model, ds, norm, cfg), "pretrained": pretrained}
    train_images = ds.train.images.to(device)
    train_labels = ds.train.labels.to(device)
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    epoch = first_epoch
    try:
        for epoch in range(first_epoch, total_epochs + 1):
            t0 = time.perf_counter()
            phase = phase_of(epoch)
            if phase == "fine-tune" and epoch == cfg.epochs + 1:
                set_phase(model, "all")  # phase 2: unfreeze everything, per-group learning rates
                optimizer = make_optimizer(cfg, model, "fine-tune")
                log(f"fine-tuning everything for {fine_tune_epochs} epochs: head lr {cfg.lr * cfg.fine_tune_lr_factor:g}, "
                    f"backbone lr {cfg.lr * cfg.fine_tune_lr_factor * 0.1:g}")
            # each phase has its own warmup and decay
            phase_first, phase_epochs = (cfg.epochs + 1, fine_tune_epochs) if phase == "fine-tune" else (1, cfg.epochs)
            phase_steps = steps_per_epoch * phase_epochs
            # Per-epoch seeds make shuffling and dropout independent of whether the run was resumed.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen).to(device)
            torch.manual_seed(cfg.seed * 1_000_003 + epoch + 500_000)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{total_epochs}", unit="step", leave=False,
                       disable=quiet, dynamic_ncols=True)
            first_step = (epoch - phase_first) * steps_per_epoch
            loss_sum, correct, seen, lr = run_epoch(
                model, optimizer, train_images, train_labels, perm, norm, batch_size=cfg.batch_size,
                lr_fn=lambda i: lr_at(first_step + i, phase_steps, warmup_steps, cfg.lr, cfg.schedule),
                precision=precision, channels_last=channels_last, label_smoothing=cfg.label_smoothing, bar=bar,
                frozen_bn=transfer)
            bar.close()
            val = metrics_from_logits(predict_logits(model, ds.val.images, norm, device, precision,
                                                     channels_last=channels_last), ds.val.labels)
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": lr,
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            log(f"epoch {epoch}/{total_epochs}{' (' + phase + ')' if transfer else ''}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.1f} s")
            if row["val_acc"] > best_val:  # keep the best model by validation accuracy
                best_val, best_epoch = row["val_acc"], epoch
                save_model(run_dir / MODEL_FILE, model, {**meta, "metrics": {"best_epoch": epoch, "val_accuracy": best_val}})
            write_history(run_dir / "history.csv", history)
            save_checkpoint(run_dir / CHECKPOINT_FILE, model, optimizer,
                            {"epoch": epoch, "history": history, "best_val_acc": best_val, "best_epoch": best_epoch})
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else 0
        kept = f"the checkpoint after epoch {done} is kept" if done else "no epoch had finished"
        raise TrainingInterrupted(f"interrupted during epoch {epoch}; {kept} in {run_dir}; continue with: "
                                  f"cnnkit train --resume {run_dir}") from None

    # The best model, tested on the held-out split (in fp32: the figure users will quote).
    best, _ = load_model(run_dir / MODEL_FILE, device)
    best = best.to(memory_format=torch.channels_last)  # faster fp32 inference too (evaluate.probabilities)
    test_logits = predict_logits(best, ds.test.images, norm, device, "fp32", channels_last=True)  # (N, K)
    test = metrics_from_logits(test_logits, ds.test.labels)
    metrics = {"test_" + k: v for k, v in test.items()}
    meta["calibration"] = fitted_calibration(best, ds, norm, device)
    metrics.update({"test_split": ds.test_source, "best_epoch": best_epoch, "val_accuracy": best_val,
                    "train_seconds": sum(r["seconds"] for r in history), "device": device.type, "precision": precision,
                    "torch": torch.__version__, "cnnkit": __version__, "python": platform.python_version()})
    meta["metrics"], meta["history"] = metrics, history
    save_model(run_dir / MODEL_FILE, best, meta)
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    report_files = write_run_report(run_dir, best, meta, ds, device, test_logits)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # the run is complete: model.safetensors is the result
    top5 = f", top-5 {metrics['test_top5_accuracy']:.4f}" if "test_top5_accuracy" in metrics else ""
    log(f"test accuracy {metrics['test_accuracy']:.4f}{top5} on {metrics['test_n']} {ds.test_source} images "
        f"(best epoch {best_epoch}); report {report_files['report']}")
    return RunResult(run_dir, best, ds, history, metrics, cfg, meta)


def write_run_report(run_dir: Path, model: nn.Module, meta: dict, ds: Dataset, device: torch.device,
                     test_logits: torch.Tensor | None = None) -> dict:
    """The end of every run: the test split evaluated (with and without TTA) into the run folder,
    with report.html. matplotlib is imported only here: faster start-up."""
    from .report import evaluate_and_report
    _, files = evaluate_and_report(model, meta, ds.test, run_dir, data_name=ds.name, split_name=ds.test_source,
                                   tta=True, device=device, logits=test_logits)
    return files


def train_svm(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None], quiet: bool) -> RunResult:
    """The notes' pre-deep-learning baseline: scikit-learn's linear SVM on normalized, flattened pixels.

    A linear SVM is a linear model, so its weights go into the `linear` spec network
    (flatten -> dense): the model file, evaluate, predict and calibration all work unchanged."""
    from sklearn.svm import LinearSVC

    spec = get_spec("linear")
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                      channels=cfg.channels, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, quiet=quiet)
    norm = Normalizer.fit(ds.train.images)
    flat = lambda images: norm(images).flatten(1).numpy()  # noqa: E731  (N, C*H*W) float32
    c, h, w = ds.input_shape
    log(f"data {ds.name}: {ds.sizes()} images of {c}x{h}x{w}, {ds.num_classes} classes; "
        f"fitting a linear SVM (one-vs-rest, squared hinge, C=0.01) on {c * h * w} pixels")
    t0 = time.perf_counter()
    # dual=False: the primal solver is the fast one when samples outnumber pixels
    svm = LinearSVC(C=0.01, dual=False, max_iter=200, random_state=cfg.seed).fit(flat(ds.train.images),
                                                                                 ds.train.labels.numpy())
    seconds = time.perf_counter() - t0
    model = build_model(spec, ds.num_classes, in_channels=c, image_size=(h, w))
    weight, bias = torch.from_numpy(svm.coef_).float(), torch.from_numpy(svm.intercept_).float()
    if ds.num_classes == 2:  # one decision function f: logits (-f/2, f/2) give the same argmax
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    device = torch.device("cpu")
    val = metrics_from_logits(predict_logits(model, ds.val.images, norm, device), ds.val.labels)
    test_logits = predict_logits(model, ds.test.images, norm, device)  # (N, K) fp32
    test = metrics_from_logits(test_logits, ds.test.labels)
    history = [{"epoch": 1, "train_loss": float("nan"), "train_acc": float(svm.score(flat(ds.train.images),
                ds.train.labels.numpy())), "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": 0.0, "seconds": seconds}]
    metrics = {"test_" + k: v for k, v in test.items()}
    metrics.update({"test_split": ds.test_source, "best_epoch": 1, "val_accuracy": val["accuracy"],
                    "train_seconds": seconds, "device": "cpu", "precision": "fp64 (scikit-learn)",
                    "torch": torch.__version__, "cnnkit": __version__, "python": platform.python_version()})
    meta = {**model_meta(model, ds, norm, cfg), "metrics": metrics, "history": history,
            "calibration": fitted_calibration(model, ds, norm, device)}
    meta["architecture"]["name"] = "linear SVM"
    save_model(run_dir / MODEL_FILE, model, meta)
    write_history(run_dir / "history.csv", history)
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    report_files = write_run_report(run_dir, model, meta, ds, device, test_logits)
    log(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_n']} {ds.test_source} images "
        f"(linear SVM, {seconds:.1f} s); report {report_files['report']}")
    return RunResult(run_dir, model, ds, history, metrics, cfg, meta)


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())
