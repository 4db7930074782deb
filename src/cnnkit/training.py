"""Training, and only training: data and model in, the best model by validation accuracy out.

    load_data_and_model(cfg)        the dataset and the model fitted to it
    setup(cfg, ds, model, run)      preprocessing, pretrained weights, transfer phases, optimizer, resume state
    epoch_loop(session, ...)        train one epoch, validate, keep the best model, checkpoint; repeat
    fit(...)                        the three above: a TrainResult (model, history, best epoch)
    train_svm(...)                  the notes' linear-SVM baseline, returning the same TrainResult

Batches are sliced from the dataset's uint8 tensors by a shuffled index and preprocessed on the whole
batch; bf16 autocast (where this machine measures it faster: hardware.py) and channels-last
activations are on by default (benchmarks/NOTES.md). A checkpoint is written atomically after every epoch, so Ctrl-C or a kill
loses at most the epoch in progress, and a resumed run continues to the same end: shuffling and
dropout are seeded per epoch, so a resumed CPU run equals an uninterrupted one.

Testing, calibration and the report are the run's next steps (jobs/train.py); this module imports none of
them. Every file goes through the RunFolder, which knows whether this process writes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .augment import Augment, BatchAugment, parse_class_presets
from .config import TrainConfig
from .data import Dataset, hflip_keeps_class, is_builtin, load_dataset
from .data.core import DiskImages
from .decode import RESIZE_METHOD
from .distributed import World
from .errors import CnnkitError, TrainingDiverged, TrainingInterrupted
from .hardware import precision_choice
from .inference import metrics_from_logits, pick_device, predict_logits
from .modelfile import DataRecord, InputShape, ModelInfo, Preprocessing, TTA, load_model, non_finite
from .models.base import unwrap
from .models.registry import architecture_record, build_model, default_input, get_spec
from .models.summary import format_summary, summary
from .preprocess import Preprocess
from .runfolder import RunFolder, load_checkpoint
from .utils import progress


# ----------------------------------------------------------------------------- data and model
def load_data_and_model(cfg: TrainConfig, quiet: bool = False) -> tuple[Dataset, nn.Module]:
    """Load the data and build the model fitted to it (input shape and class count from the data)."""
    spec = get_spec(cfg.model)
    hint = default_input(spec)
    image_size, channels = cfg.image_size, cfg.channels
    if not is_builtin(cfg.data) and hint is not None:  # folders are decoded straight to what the model expects
        image_size = image_size or hint[1]
        channels = channels or hint[0]
    if image_size is not None:  # before the data is resized to it
        check_training_memory(spec, channels or BUILTIN_CHANNELS.get(str(cfg.data).lower(), 3), image_size,
                              cfg.batch_size, BUILTIN_IMAGES.get(str(cfg.data).lower(), 0), pick_device(cfg.device))
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=image_size,
                      channels=channels, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, quiet=quiet)
    c, h, w = ds.input_shape
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights
    return ds, build_model(spec, ds.num_classes, in_channels=c, image_size=(h, w))


BUILTIN_IMAGES = {"mnist": 70_000, "fashion-mnist": 70_000, "cifar10": 60_000, "digits": 1797}  # held in memory
BUILTIN_CHANNELS = {"mnist": 1, "fashion-mnist": 1, "cifar10": 3, "digits": 1}


def training_bytes_at(spec: dict, channels: int, side: int, batch: int) -> int | None:
    """The estimated memory of training `spec` on side x side images (models/memory.py); None where
    the model cannot take that size (its own error says why)."""
    from .models.memory import training_bytes
    try:
        with torch.device("meta"):  # nothing is allocated
            model = build_model(spec, 10, in_channels=channels, image_size=(side, side))
            return training_bytes(model, (channels, side, side), batch)
    except (CnnkitError, RuntimeError, ValueError):
        return None


def check_training_memory(spec: dict, channels: int, side: int, batch: int, images: int, device: torch.device) -> None:
    """Refuse an --image-size whose training cannot fit in memory, naming the largest that can.
    images: how many the dataset holds in host memory at that size (0 for folders, which a disk
    cache serves). The model's share is compared with the device's free memory (a GPU's own)."""
    from .utils import available_memory_bytes, format_bytes
    host = available_memory_bytes()
    on_gpu = device.type == "cuda"
    gpu = torch.cuda.mem_get_info(device)[0] if on_gpu else 0

    def fits(n: int) -> tuple[bool, int | None]:
        model, data = training_bytes_at(spec, channels, n, batch), images * channels * n * n
        if model is None:
            return False, None
        return ((model <= gpu and data <= host) if on_gpu else model + data <= host), (model if on_gpu else model + data)

    ok, need = fits(side)
    if ok or need is None:
        return
    lo, hi = 1, side  # the largest side that fits, by bisection on the estimate (each a meta forward)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid - 1)
    where = f"the GPU has {format_bytes(gpu)} free" if on_gpu else f"this machine has {format_bytes(host)} available"
    advice = f"use --image-size {lo} or less, or a smaller --batch-size" if fits(lo)[0] else "use a smaller --batch-size"
    raise CnnkitError(f"--image-size {side} needs about {format_bytes(need)} of memory to train batches of {batch}"
                      f"{' with the dataset resized in memory' if images and not on_gpu else ''}; {where}: {advice}")


def model_info(model: nn.Module, ds: Dataset, preprocess: Preprocess, cfg: TrainConfig, **more) -> ModelInfo:
    """What a model file records about a run besides weights and metrics: enough to rebuild the
    model and preprocess new images exactly as in training (`more`: other ModelInfo fields)."""
    return ModelInfo(
        architecture=architecture_record(model), class_names=ds.class_names, input=InputShape(*ds.input_shape),
        preprocessing=Preprocessing(resize=RESIZE_METHOD, **preprocess.record()), training=cfg.to_dict(),
        # Test-time augmentation mirrors images unless that changes the class (digits), and shifts
        # them by 1/14 of their side: the notes' 2 pixels on 28x28, 1 on 8x8 digits, 16 on 224x224.
        tta=TTA(hflip=hflip_keeps_class(ds.name), shift_pixels=max(1, round(min(ds.input_shape[1:]) / 14))),
        data=DataRecord(name=ds.name, source=ds.source, sizes=ds.sizes(), test_source=ds.test_source,
                        skipped=[list(x) for x in ds.skipped]), **more)


# ----------------------------------------------------------------------------- optimizer and schedule
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
        if cfg.bias_lr_factor == 1:
            return [{"params": trainable}]
        # airbench's bias scaler: BatchNorm shifts learn faster, decaying by the same amount per step
        return [{"params": [p for p in trainable if p.ndim > 1]},
                {"params": [p for p in trainable if p.ndim <= 1], "lr_scale": cfg.bias_lr_factor,
                 "weight_decay": cfg.weight_decay / cfg.bias_lr_factor}]
    head = {id(p) for p in model.head.parameters()}
    return [{"params": [p for p in trainable if id(p) in head], "lr_scale": cfg.fine_tune_lr_factor},
            {"params": [p for p in trainable if id(p) not in head], "lr_scale": cfg.fine_tune_lr_factor * 0.1}]


def make_optimizer(cfg: TrainConfig, model: nn.Module, phase: str = "train") -> torch.optim.Optimizer:
    """Adam, AdamW or Nesterov SGD, fused into one kernel where torch supports it: on 2 CPU cores
    the per-tensor Adam took 10% of a seed-mnist-torch step, and fused Adam made the step 1.3x
    faster (benchmarks/NOTES.md)."""
    params = param_groups(cfg, model, phase)
    if cfg.optimizer in ("adam", "adamw"):
        kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        make = lambda **kw: kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)  # noqa: E731
    else:  # sgd (TrainConfig.validate admits no other)
        make = lambda **kw: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,  # noqa: E731
                                            nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay, **kw)
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return make()


ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 25e4  # PyTorch OneCycleLR's div_factor and final_div_factor


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """The learning rate at `step` (0-based) of `total_steps`: warmup to peak, then
    linear: linear decay to 0; cosine: cosine decay to 0; constant: peak; onecycle (Smith 2018, as
    PyTorch's OneCycleLR): a cosine rise from peak/25 over the warmup and a cosine fall to peak/25e4."""
    if schedule == "onecycle":
        if step < warmup_steps:
            t = (step + 1) / warmup_steps
            return peak * (ONECYCLE_START + (1 - ONECYCLE_START) * (1 - math.cos(math.pi * t)) / 2)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return peak * (ONECYCLE_END + (1 - ONECYCLE_END) * (1 + math.cos(math.pi * t)) / 2)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 after warmup .. 1 at the end
    if schedule == "cosine":
        return peak * (1 + math.cos(math.pi * min(t, 1.0))) / 2
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def lookahead_step(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Lookahead (Zhang et al. 2019) as airbench uses it: ema <- decay * ema + (1 - decay) * model,
    then model <- ema, for every float tensor."""
    floats = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values()) if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - decay)
    torch._foreach_copy_([m for _, m in floats], [e for e, _ in floats])


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model for every float tensor (parameters and BatchNorm
    statistics), with TensorFlow's warm-up (decay at most (1 + step) / (10 + step)), so the first
    steps are not averaged with the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values())]
    floats = [(e, m) for e, m in pairs if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
    for e, m in pairs:
        if not e.is_floating_point():
            e.copy_(m)


# ----------------------------------------------------------------------------- one epoch
def run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              perm: torch.Tensor, preprocess: Preprocess, *, batch_size: int, lr_fn: Callable[[int], float],
              precision: str, label_smoothing: float = 0.0, bar=None, frozen_bn: bool = False,
              augment: BatchAugment | None = None, generator: torch.Generator | None = None,
              class_weight: torch.Tensor | None = None, grad_clip: float = 0.0,
              after_step: Callable[[], None] | None = None, world: World = World(),
              seen_indices: list[torch.Tensor] | None = None) -> tuple[float, int, int, float]:
    """One pass over images[perm] in batches; returns (summed loss, correct, seen, last lr).

    images: (N, C, H, W) uint8 on the training device; batches are gathered by index, augmented
    (training batches only, with `generator`), and preprocessed as whole batches, so no
    per-sample Python runs here. class_weight (K,): the loss weight of each class (balancing).
    after_step: called after every optimizer step (the weight average).
    world: in a torchrun job, this process trains its slice of each global batch of batch_size
    images (distributed.shard) and the returned sums are over all processes.
    seen_indices: if a list, each batch's image indices are appended to it (CNNKIT_RECORD_SHARDS)."""
    model.train()
    if frozen_bn:  # transfer learning: keep the pretrained BatchNorm statistics (see set_phase)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    device = labels.device  # images may stay on the CPU or on disk (data.DiskImages): batches move
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr = 0, 0.0
    first_bad: NonFinite | None = None
    steps = math.ceil(len(perm) / batch_size)
    for i in range(steps):
        lr = lr_fn(i)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # fine-tuning: backbone slower than the head
        idx = distributed.shard(perm[i * batch_size:(i + 1) * batch_size], world)
        y = labels[idx]  # (B,), or this process's B / world.size
        if seen_indices is not None:
            seen_indices.append(idx)
        batch = images[idx].to(device, non_blocking=True)  # (B, C, H, W) uint8
        if augment is not None:
            batch = augment(batch, y, generator)  # (B, C, H, W) float32 in 0..255
        x = preprocess(batch)  # (B, C, H, W) float32, normalized
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=label_smoothing)
        # A diverging run (too high a learning rate, an overflow) stops at its first non-finite loss.
        # .item() syncs a GPU, so there it is checked at the progress bar's pace (every 20 steps).
        # In a torchrun job each process sees its own shard's loss: the one that sees it first takes
        # one more step, whose all-reduced gradients make every process's weights (and next loss)
        # non-finite, so all of them stop at the same step instead of one waiting for the others.
        if (device.type == "cpu" or i % 20 == 0 or i == steps - 1) and not math.isfinite(loss.item()):
            if not world.active or first_bad is not None:
                raise first_bad or NonFinite(i + 1, steps, f"the loss became {loss.item()}")
            first_bad = NonFinite(i + 1, steps, f"the loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(1)
            if i % 20 == 0 or i == steps - 1:  # .item() syncs a GPU: not every step
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    if world.active:
        loss, right, count = distributed.sum_over_ranks(loss_sum.item(), correct.item(), seen)
        return loss, int(right), int(count), lr
    return loss_sum.item(), int(correct.item()), seen, lr


class NonFinite(Exception):
    """Raised inside an epoch at the first non-finite loss; epoch_loop turns it into TrainingDiverged."""

    def __init__(self, step: int, steps: int, what: str):
        super().__init__(what)
        self.step, self.steps, self.what = step, steps, what


def non_finite_tensors(*modules: nn.Module | None) -> list[str]:
    """Names of the floating-point tensors (parameters and buffers) holding a nan or an inf."""
    return [k for m in modules if m is not None for k in non_finite(unwrap(m).state_dict())]


# ----------------------------------------------------------------------------- set-up
DATA_INIT_IMAGES = 5000  # training images a model's init_from_data sees (airbench's patch whitening: 5,000)

@dataclass
class Session:
    """Everything the epoch loop carries from one epoch to the next."""
    cfg: TrainConfig
    ds: Dataset
    run: RunFolder
    model: nn.Module
    optimizer: torch.optim.Optimizer
    preprocess: Preprocess  # on the training device
    device: torch.device
    precision: str  # 'bf16' or 'fp32'
    transfer: bool  # a frozen-backbone phase first (and maybe a fine-tuning phase)
    total_epochs: int
    info: ModelInfo  # the model file's metadata, less metrics
    augment: BatchAugment  # from cfg.augment_from_epoch on
    class_weight: torch.Tensor | None  # (K,) loss weights (balance: weights)
    sample_weight: torch.Tensor | None  # (N,) drawing weights of the training images (balance: sampler)
    ema: nn.Module | None  # the moving average of the weights (cfg.ema > 0): what is validated and kept
    ema_steps: int = 0  # optimizer steps averaged so far
    history: list[dict] = field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = 0
    first_epoch: int = 1
    world: World = World()  # this process in a torchrun job (a world of one without torchrun)
    trained: nn.Module | None = None  # what the training steps call: the model, or DistributedDataParallel around it

    def phase_of(self, epoch: int) -> str:
        return "fine-tune" if epoch > self.cfg.epochs else ("frozen" if self.transfer else "train")

    @property
    def evaluated(self) -> nn.Module:
        """The model that is validated, kept and tested: the weight average if there is one."""
        return self.ema if self.ema is not None else self.model


@dataclass
class TrainResult:
    model: nn.Module  # the best model by validation accuracy, in eval mode, on `device`
    preprocess: Preprocess
    history: list[dict]  # one row per epoch (history.csv)
    best_epoch: int
    best_val_acc: float
    device: torch.device
    precision: str  # what trained: 'bf16', 'fp32', or the SVM's 'fp64 (scikit-learn)'
    train_seconds: float
    info: ModelInfo  # the model file's metadata, less metrics and calibration


def augmentation_and_balance(cfg: TrainConfig, ds: Dataset, device: torch.device
                             ) -> tuple[BatchAugment, torch.Tensor | None, torch.Tensor | None]:
    """The run's augmentation (preset, fine overrides, per-class presets; flips only where the
    dataset allows them) and class balancing: loss weights (K,) or drawing weights (N,)."""
    flips = hflip_keeps_class(ds.name)
    overrides = {f.name[4:]: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("aug_")}
    try:
        default = Augment.preset(cfg.augment, flips, **overrides)
        per_class = parse_class_presets(cfg.augment_class, ds.class_names, flips)
    except ValueError as e:
        raise CnnkitError(str(e)) from None
    counts = torch.bincount(ds.train.labels, minlength=ds.num_classes).double()  # (K,)
    class_weight = sample_weight = None
    if cfg.balance == "weights":  # inverse frequency, mean weight 1 over the images
        class_weight = (counts.sum() / (ds.num_classes * counts.clamp_min(1))).float().to(device)
    elif cfg.balance == "sampler":  # each class drawn equally often
        sample_weight = (1 / counts.clamp_min(1))[ds.train.labels]
    return BatchAugment(default, per_class), class_weight, sample_weight


def setup(cfg: TrainConfig, ds: Dataset, model: nn.Module, run: RunFolder, resume: bool = False,
          world: World = World()) -> Session:
    """Preprocessing, pretrained weights, transfer phases, the optimizer, and (resume) the state
    after the last finished epoch."""
    device = distributed.device_for(world, pick_device(cfg.device))
    if world.active and cfg.batch_size % world.size:
        raise CnnkitError(f"--batch-size {cfg.batch_size} is the global batch: it must be a multiple of the "
                          f"{world.size} processes")
    # Rank 0 chooses for all: probes in several processes at once would measure each other.
    precision, precision_why = precision_choice(cfg.precision, device) if world.primary else ("", "")
    if world.active:
        precision, precision_why = distributed.broadcast_text(f"{precision}|{precision_why}", world).split("|", 1)
    info = summary(model)
    run.log(f"data {ds.name}: {ds.sizes()} images of {'x'.join(map(str, ds.input_shape))}, {ds.num_classes} classes "
            f"(from {ds.source})")
    if ds.skipped:
        run.log(f"skipped {len(ds.skipped)} file(s) that could not be read or decoded:")
        for path, reason in ds.skipped:
            run.log(f"  {path}: {reason}")
    if ds.test_source == "val":
        run.log("note: the data has no test split, so test metrics are measured on the validation split")
    run.log(format_summary(info, title=f"model {model.architecture.get('name')}"))
    run.log(f"device {device.type}, precision {precision} ({precision_why}), {cfg.epochs} epochs of batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr}")
    if world.active:
        run.log(f"data-parallel: {world.size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), "
                f"{cfg.batch_size // world.size} images of each batch per process")

    pretrained = None
    if cfg.pretrained:
        from .models.pretrained import load_pretrained
        pretrained = load_pretrained(model, cfg.pretrained)
        run.log(f"pretrained weights from {pretrained['source']} ({pretrained['loaded_tensors']} tensors"
                f"{', new classifier head' if pretrained['new_head'] else ''})")
    # Pretrained weights expect the normalization they were trained with; otherwise fit it to the data.
    preprocess = (Preprocess(pretrained["mean"], pretrained["std"], cfg.channels_last) if pretrained
                  else Preprocess.fit(ds.train.images, cfg.channels_last))
    init_from_data = getattr(model, "init_from_data", None)
    if init_from_data is not None and not pretrained and not resume:  # e.g. the speedrun net's patch whitening
        init_from_data(preprocess(ds.train.images[:DATA_INIT_IMAGES]))
        run.log(f"data-dependent initialisation from the first {min(DATA_INIT_IMAGES, len(ds.train))} training images")
    transfer = cfg.freeze_backbone or cfg.fine_tune
    fine_tune_epochs = (cfg.fine_tune_epochs or cfg.epochs) if cfg.fine_tune else 0
    if transfer:
        set_phase(model, "frozen")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = model_info(model, ds, preprocess, cfg, pretrained=pretrained,
                      precision={"training": precision, "reason": precision_why})
    augment, class_weight, sample_weight = augmentation_and_balance(cfg, ds, device)
    if augment.active:
        run.log(f"augmentation from epoch {cfg.augment_from_epoch}: {augment.default.describe()}"
                + "".join(f"; {ds.class_names[c]}: {a.describe()}" for c, a in augment.per_class))
    ema = None
    if cfg.ema > 0:
        import copy
        ema = copy.deepcopy(model).eval().requires_grad_(False)
    s = Session(cfg, ds, run, model, make_optimizer(cfg, model), preprocess.to(device), device, precision, transfer,
                cfg.epochs + fine_tune_epochs, info, augment, class_weight, sample_weight, ema, world=world)
    if resume:
        state = resume_state(s, model, ema)
        s.history, s.best_val, s.best_epoch = state["history"], state["best_val_acc"], state["best_epoch"]
        s.first_epoch, s.ema_steps = state["epoch"] + 1, state.get("ema_steps", 0)
        run.log(f"resuming {run.path} after epoch {state['epoch']}")
    s.trained = distributed.wrap(model, world, device)
    return s


def resume_state(s: Session, model: nn.Module, ema: nn.Module | None) -> dict:
    """Load the newest intact checkpoint into model, optimizer and weight average; one that cannot
    be read is set aside (checkpoint-damaged.safetensors) and the previous one is tried."""
    run = s.run
    while True:
        checkpoint, done, note = run.resume_checkpoint()
        if note:
            run.log(f"note: {note}")
            if checkpoint != run.checkpoint_file and run.checkpoint_file.exists() and run.primary:
                run.set_aside(run.checkpoint_file)
        if s.phase_of(done) == "fine-tune":  # the checkpoint holds the fine-tuning optimizer
            set_phase(model, "all")
            s.optimizer = make_optimizer(s.cfg, model, "fine-tune")
        try:
            return load_checkpoint(checkpoint, model, s.optimizer, {"ema": ema} if ema is not None else None)
        except CnnkitError as e:
            if checkpoint != run.checkpoint_file or not run.previous_checkpoint_file.exists() or not run.primary:
                raise CnnkitError(f"{e}; no earlier checkpoint is intact: start the run again: cnnkit train "
                                  f"--config {run.config_file} --out NEW_FOLDER") from None
            run.log(f"note: {e}; trying the previous checkpoint")
            run.set_aside(checkpoint)


# ----------------------------------------------------------------------------- the epoch loop
def epoch_loop(s: Session, quiet: bool = False) -> None:
    """Train from s.first_epoch to s.total_epochs: each epoch trains, validates, keeps the model if
    its validation accuracy is the best so far, and writes history and checkpoint."""
    cfg, ds, run = s.cfg, s.ds, s.run
    train_images = ds.train.images.to(s.device)
    train_labels = ds.train.labels.to(s.device)
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    fine_tune_epochs = s.total_epochs - cfg.epochs
    epoch = s.first_epoch
    try:
        for epoch in range(s.first_epoch, s.total_epochs + 1):
            # Checked before an epoch rather than after one, so a run resumed after the decision
            # (killed while finishing) stops too, instead of training on.
            if cfg.early_stop and s.best_epoch and epoch - 1 - s.best_epoch >= cfg.early_stop:
                run.log(f"early stop: no better validation accuracy for {cfg.early_stop} epochs "
                        f"(best {s.best_val:.4f} at epoch {s.best_epoch})")
                break
            t0 = time.perf_counter()
            phase = s.phase_of(epoch)
            if phase == "fine-tune" and epoch == cfg.epochs + 1:
                set_phase(s.model, "all")  # phase 2: unfreeze everything, per-group learning rates
                s.optimizer = make_optimizer(cfg, s.model, "fine-tune")
                s.trained = distributed.wrap(s.model, s.world, s.device)  # DDP syncs what trained when wrapped
                run.log(f"fine-tuning everything for {fine_tune_epochs} epochs: head lr {cfg.lr * cfg.fine_tune_lr_factor:g}, "
                        f"backbone lr {cfg.lr * cfg.fine_tune_lr_factor * 0.1:g}")
            # each phase has its own warmup and decay
            phase_first, phase_epochs = (cfg.epochs + 1, fine_tune_epochs) if phase == "fine-tune" else (1, cfg.epochs)
            phase_steps = steps_per_epoch * phase_epochs
            # Per-epoch seeds make shuffling, augmentation and dropout independent of whether the run
            # was resumed.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            if s.sample_weight is not None:  # balance: sampler (with replacement, as many draws as images)
                perm = torch.multinomial(s.sample_weight, n, replacement=True, generator=gen).to(s.device)
            else:
                perm = torch.randperm(n, generator=gen).to(s.device)
            perm = distributed.trim(perm, s.world)  # every process draws the same permutation
            augment_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 250_000)
            augment = s.augment if s.augment.active and epoch >= cfg.augment_from_epoch else None
            torch.manual_seed(cfg.seed * 1_000_003 + epoch + 500_000)
            bar = progress(steps_per_epoch, f"epoch {epoch}/{s.total_epochs}", unit="step",
                           disable=quiet or not run.primary)
            record_dir = os.environ.get("CNNKIT_RECORD_SHARDS")
            seen_indices = [] if record_dir else None
            first_step = (epoch - phase_first) * steps_per_epoch
            loss_sum, correct, seen, lr = run_epoch(
                s.trained, s.optimizer, train_images, train_labels, perm, s.preprocess, batch_size=cfg.batch_size,
                lr_fn=lambda i: lr_at(first_step + i, phase_steps, warmup_steps, cfg.lr, cfg.schedule),
                precision=s.precision, label_smoothing=cfg.label_smoothing, bar=bar, frozen_bn=s.transfer,
                augment=augment, generator=augment_gen, class_weight=s.class_weight, grad_clip=cfg.grad_clip,
                after_step=ema_step(s) if s.ema is not None else None, world=s.world, seen_indices=seen_indices)
            bar.close()
            # The loss can stay finite while the last step overflowed the weights: check them too,
            # before anything of this epoch is validated or saved.
            if bad := non_finite_tensors(s.model, s.ema):
                raise NonFinite(steps_per_epoch, steps_per_epoch, f"{len(bad)} weight tensors became non-finite "
                                f"(first: {bad[0]})")
            if seen_indices is not None:
                record_shard(Path(record_dir), epoch, s.world, seen_indices)
            val = metrics_from_logits(predict_logits(s.evaluated, ds.val.images, s.preprocess, s.device, s.precision),
                                      ds.val.labels)
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": lr,
                   "seconds": time.perf_counter() - t0}
            s.history.append(row)
            run.log(f"epoch {epoch}/{s.total_epochs}{' (' + phase + ')' if s.transfer else ''}: "
                    f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                    f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.1f} s")
            if row["val_acc"] > s.best_val:  # keep the best model by validation accuracy
                s.best_val, s.best_epoch = row["val_acc"], epoch
                run.save_model(s.evaluated, dataclasses.replace(s.info, metrics={"best_epoch": epoch,
                                                                                   "val_accuracy": s.best_val}))
            run.write_history(s.history)
            run.save_checkpoint(s.model, s.optimizer, {"epoch": epoch, "history": s.history, "best_val_acc": s.best_val,
                                                       "best_epoch": s.best_epoch, "ema_steps": s.ema_steps},
                                {"ema": s.ema} if s.ema is not None else None)
        distributed.barrier(s.world)  # rank 0 has written the last model file before anyone reads it
    except NonFinite as e:
        raise diverged(s, epoch, e) from None
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted during epoch {epoch}; {kept_checkpoint(s)}; continue with: "
                                  f"{resume_command(s)}") from None
    except RuntimeError as e:
        if not s.world.active:
            raise
        # gloo / nccl report a process that died (killed, out of memory) as a broken connection
        # "[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:47516: Connection reset by peer. ..."
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0][:120]
        raise TrainingInterrupted(f"another process of the job stopped during epoch {epoch} ({reason}); "
                                  f"{kept_checkpoint(s)}; continue with any number of processes: "
                                  f"{resume_command(s)}") from None


def diverged(s: Session, epoch: int, e: NonFinite) -> TrainingDiverged:
    """The one line a diverging run ends with: when, what is kept, and what to try."""
    cfg = s.cfg
    kept = (f"the best model so far (epoch {s.best_epoch}, val acc {s.best_val:.4f}) is in {s.run.model_file}"
            if s.best_epoch else "no model file was written")
    tries = [f"a lower --lr (this run: {cfg.lr:g})"]
    if s.precision != "fp32":
        tries.append("--precision fp32")
    if not cfg.grad_clip:
        tries.append("--grad-clip 1")
    msg = (f"training diverged at step {e.step}/{e.steps} of epoch {epoch}: {e.what}; {kept}, and "
           f"{kept_checkpoint(s)}; start a new run with {' or '.join(tries)}")
    s.run.log(msg, echo=False)
    return TrainingDiverged(msg)


def kept_checkpoint(s: Session) -> str:
    done = s.history[-1]["epoch"] if s.history else 0
    return f"the checkpoint after epoch {done} is kept in {s.run.path}" if done else "no epoch had finished"


def resume_command(s: Session) -> str:
    launcher = f"torchrun --nproc-per-node {s.world.size} -m cnnkit" if s.world.active else "cnnkit"
    return f"{launcher} train --resume {s.run.path}"


# Set CNNKIT_RECORD_SHARDS=DIR to have each process write the training-image indices it trained on,
# per epoch, to DIR/rank<R>-epoch<E>.txt (one index per line): an audit of data-parallel sharding,
# which the torchrun test reads.
def record_shard(folder: Path, epoch: int, world: World, seen_indices: list[torch.Tensor]) -> None:
    from .utils import write_text_atomic
    folder.mkdir(parents=True, exist_ok=True)
    indices = torch.cat(seen_indices).cpu().tolist() if seen_indices else []
    write_text_atomic(folder / f"rank{world.rank}-epoch{epoch}.txt", "".join(f"{i}\n" for i in indices))


LOOKAHEAD_EVERY = 5  # steps between Lookahead resets (airbench's)


def ema_step(s: Session) -> Callable[[], None]:
    """After each optimizer step: the moving average of the weights, or (lookahead) every 5 steps
    the average and a reset of the weights to it."""
    total_steps = math.ceil(len(s.ds.train) / s.cfg.batch_size) * s.total_epochs

    def step() -> None:
        if not s.cfg.lookahead:
            update_ema(s.ema, s.model, s.cfg.ema, s.ema_steps)
        elif (s.ema_steps + 1) % LOOKAHEAD_EVERY == 0:
            progress = (s.ema_steps + 1) / total_steps
            lookahead_step(s.ema, s.model, s.cfg.ema ** LOOKAHEAD_EVERY * min(1.0, progress) ** 3)
        s.ema_steps += 1
    return step


def fit(cfg: TrainConfig, ds: Dataset, model: nn.Module, run: RunFolder, *, resume: bool = False,
        quiet: bool = False, world: World = World()) -> TrainResult:
    """Set up, run the epochs, and return the best model (reloaded from its model file)."""
    s = setup(cfg, ds, model, run, resume, world)
    epoch_loop(s, quiet)
    best, _ = load_model(run.model_file, s.device)
    return TrainResult(best, s.preprocess, s.history, s.best_epoch, s.best_val, s.device, s.precision,
                       sum(r["seconds"] for r in s.history), s.info)


# ----------------------------------------------------------------------------- the SVM baseline
def train_svm(cfg: TrainConfig, run: RunFolder, quiet: bool = False) -> tuple[Dataset, TrainResult]:
    """The notes' pre-deep-learning baseline: scikit-learn's linear SVM on normalized, flattened pixels.

    A linear SVM is a linear model, so its weights go into the `linear` spec network
    (flatten -> dense): the model file, evaluate, predict and calibration all work unchanged."""
    from sklearn.svm import LinearSVC

    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=cfg.image_size,
                      channels=cfg.channels, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, quiet=quiet)
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
    history = [{"epoch": 1, "train_loss": float("nan"), "train_acc": float(svm.score(flat(ds.train.images),
                ds.train.labels.numpy())), "val_loss": val["loss"], "val_acc": val["accuracy"], "lr": 0.0, "seconds": seconds}]
    info = model_info(model, ds, preprocess, cfg)
    info.architecture["name"] = "linear SVM"
    return ds, TrainResult(model, preprocess, history, 1, val["accuracy"], torch.device("cpu"),
                           "fp64 (scikit-learn)", seconds, info)
