"""The learning-rate finder (Smith 2015, "Cyclical learning rates"; fastai's lr_find): a few hundred
optimizer steps with the learning rate rising exponentially, the loss recorded at each, and the
model put back exactly as it was.

    find_lr(cfg, ds, model)       set up as training would (session.setup), then sweep: a Sweep
    sweep(session)                the sweep on a set-up session; weights, buffers, optimizer state,
                                  modes and RNG states restored afterwards, bit for bit
    suggest(lrs, losses, steps)   fastai's two suggestions, valley and steep: a pure function
    text_plot(sweep)              the loss against the lr in a few rows of text
    resolve_auto_lr(cfg, ...)     `--lr auto`: sweep, then train at the suggestion

The sweep trains as the first epoch would (its batch order, augmentation, MixUp / CutMix,
distillation, precision, loss, gradient clipping, per-group lr_scale) with a constant lr per step
instead of the warmup and schedule, and no weight average. The loss is fastai's smoothed one (an
exponential moving average, beta 0.98, with its bias corrected), and the sweep stops early once it
exceeds 4x the best (fastai's stop_div) or is not finite, so a diverging lr ends the sweep rather
than poisoning anything.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..data import Dataset
from ..distributed import World
from ..errors import CnnkitError
from ..runfolder import RunFolder
from .epoch import EpochSettings, batch_forward, optimizer_step, train_mode
from .loop import epoch_order, epoch_settings
from .session import Session, setup

START_LR, END_LR, STEPS = 1e-7, 10.0, 100  # fastai's defaults (lr_find's start_lr, end_lr, num_it)
MIN_STEPS = 10  # the suggestion skips the first tenth of the curve and its last 5 points (as fastai does)
SMOOTHING = 0.98  # fastai's AvgSmoothLoss beta: the smoothed loss is a moving average over ~50 steps
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of the best so far (fastai's stop_div)
SKIP_END = 5  # points left off the end of the curve for the suggestion (fastai's lr_find)
# The suggestion: the lr of the lowest smoothed loss, over 3. fastai's valley and steep came out 13-75x
# below the best of a grid of peak lrs for cnnkit's warm-up-and-decay schedules (fast-mnist on MNIST,
# seed-cifar10 on 4,000 CIFAR-10 images); the minimum over 3 was within 2x of it on both. On a third
# pair held out from the choice (a frozen-feature head) it was 357x the grid's best at the same accuracy
# within one image (benchmarks/training/lr_find_vs_grid.py, benchmarks/NOTES.md).
# fastai's own `minimum` divides by 10, for a constant lr.
MINIMUM_DIVISOR = 3.0


@dataclass
class Sweep:
    """One sweep's curve and its suggestions. lrs[i] is the base lr of step i (a parameter group
    with lr_scale trained at lr x lr_scale), losses[i] the smoothed loss after it, raw_losses[i]
    its batch's own loss."""
    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    steps: int  # planned; len(lrs) when the sweep ran to the end
    start_lr: float
    end_lr: float
    stopped: str  # 'end' | 'diverged' (smoothed loss over 4x the best) | 'non-finite' (that step is not recorded)
    valley: float  # fastai's default: 2/3 of the way down the longest valley of the curve
    steep: float  # where the smoothed loss falls fastest against log lr
    minimum: float  # the lr of the lowest smoothed loss, over MINIMUM_DIVISOR: the suggestion
    seconds: float
    method: str = "minimum"  # which of the three is suggested

    @property
    def suggestion(self) -> float:
        return {"valley": self.valley, "steep": self.steep}.get(self.method, self.minimum)

    def record(self) -> dict:
        """What a model file and config-less JSON keep of the sweep: the suggestions and how they were found."""
        return {"suggestion": self.suggestion, "method": self.method, "minimum": self.minimum, "valley": self.valley,
                "steep": self.steep,
                "start_lr": self.start_lr, "end_lr": self.end_lr, "steps": self.steps, "steps_run": len(self.lrs),
                "stopped": self.stopped}


def check_range(steps: int, start_lr: float, end_lr: float) -> None:
    """Refuse a sweep that cannot give a suggestion, naming the flag."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS:
        raise CnnkitError(f"--steps must be a whole number of at least {MIN_STEPS}, not {steps!r} "
                          "(fastai's default is 100)")
    for flag, v in (("--start-lr", start_lr), ("--end-lr", end_lr)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise CnnkitError(f"{flag} must be a positive finite number, not {v!r}")
    if start_lr >= end_lr:
        raise CnnkitError(f"--start-lr ({start_lr:g}) must be below --end-lr ({end_lr:g}): the sweep rises from one "
                          "to the other")


def check_model(cfg: TrainConfig) -> None:
    if cfg.model == "svm" or cfg.model.startswith("knn:"):
        raise CnnkitError(f"the lr finder sweeps a CNN's optimizer; --model {cfg.model} has no learning rate")


def sweep_lr(i: int, steps: int, start_lr: float, end_lr: float) -> float:
    """Step i's lr (0-based) of an exponential sweep: start_lr at the first step, end_lr at the last."""
    return start_lr * (end_lr / start_lr) ** (i / (steps - 1))


# ----------------------------------------------------------------------------- the sweep
def find_lr(cfg: TrainConfig, ds: Dataset, model: nn.Module, *, steps: int = STEPS, start_lr: float = START_LR,
            end_lr: float = END_LR) -> Sweep:
    """Set the model up as `cnnkit train` would with this config (precision, preprocessing,
    pretrained weights, transfer phase, augmentation, balancing, the optimizer) and sweep. The
    model is left as setup leaves it (on its device, in its memory format), its weights unchanged."""
    check_range(steps, start_lr, end_lr)
    check_model(cfg)
    sink = RunFolder(cfg.out or ".", primary=False, quiet=True)  # setup's log lines go nowhere: nothing is written
    session = setup(cfg, ds, model, sink)
    return sweep(session, steps=steps, start_lr=start_lr, end_lr=end_lr)


def sweep(s: Session, *, steps: int = STEPS, start_lr: float = START_LR, end_lr: float = END_LR) -> Sweep:
    """The exponential sweep on a set-up session, everything it changes put back afterwards
    (even when it fails)."""
    check_range(steps, start_lr, end_lr)
    t0 = time.perf_counter()
    saved = snapshot(s.model, s.optimizer)
    try:
        lrs, losses, raw, stopped = run_sweep(s, steps, start_lr, end_lr)
    finally:
        restore(s.model, s.optimizer, saved)
    valley, steep, minimum = suggest(lrs, losses, steps)
    return Sweep(lrs=lrs, losses=losses, raw_losses=raw, steps=steps, start_lr=start_lr, end_lr=end_lr,
                 stopped=stopped, valley=valley, steep=steep, minimum=minimum, seconds=time.perf_counter() - t0)


def run_sweep(s: Session, steps: int, start_lr: float, end_lr: float
              ) -> tuple[list[float], list[float], list[float], str]:
    """(lrs, smoothed losses, batch losses, why it stopped): steps over the first epoch's batch
    order (then the second's, ...), as epoch 1 of training would take them."""
    images, labels = s.ds.train.images.to(s.device), s.ds.train.labels.to(s.device)
    n, batch = len(labels), s.cfg.batch_size
    per_epoch = math.ceil(n / batch)
    settings = dataclasses.replace(epoch_settings(s, 1, per_epoch, None), after_step=None)  # no weight average
    train_mode(s.trained, settings.frozen_bn)
    lrs, losses, raw = [], [], []
    average, best, order = 0.0, math.inf, None
    for i in range(steps):
        epoch, j = divmod(i, per_epoch)
        if j == 0:
            order = epoch_order(s, epoch + 1, n)  # (N,) on the device
        lr = sweep_lr(i, steps, start_lr, end_lr)
        loss = train_step(s.trained, s.optimizer, images, labels, order[j * batch:(j + 1) * batch], lr, settings)
        if not math.isfinite(loss):
            return lrs, losses, raw, "non-finite"
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (i + 1))  # the bias correction: the average starts at 0
        lrs.append(lr)
        losses.append(smoothed)
        raw.append(loss)
        best = min(best, smoothed)
        if smoothed > DIVERGED * best:
            return lrs, losses, raw, "diverged"
    return lrs, losses, raw, "end"


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               idx: torch.Tensor, lr: float, s: EpochSettings) -> float:
    """One step of training.epoch.run_epoch at a given lr: the batch images[idx] (B, C, H, W) uint8,
    augmented, mixed and preprocessed, its loss (with the teacher's term when distilling), and (when
    that loss is finite) the optimizer's step. Returns the batch's loss before the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # fine-tuning's and the bias scaler's groups
    y = labels[idx]  # (B,)
    _, loss = batch_forward(model, images[idx].to(labels.device, non_blocking=True), y, idx, s)
    value = loss.item()
    if not math.isfinite(value):  # no step on it: the sweep ends here
        return value
    optimizer_step(optimizer, loss, s)
    return value


# ----------------------------------------------------------------------------- putting everything back
def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of what a sweep changes: the weights and buffers (BatchNorm statistics and its batch
    count), the optimizer's state and hyperparameters, each module's training mode, the RNG states."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "modes": [m.training for m in model.modules()], "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None}


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put back what snapshot copied, in place: the optimizer keeps pointing at the same parameters."""
    with torch.no_grad():
        model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    optimizer.zero_grad(set_to_none=True)  # the sweep's last gradients mean nothing to training
    for m, mode in zip(model.modules(), saved["modes"]):
        m.training = mode
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


# ----------------------------------------------------------------------------- the suggestion
def suggest(lrs: list[float], losses: list[float], steps: int) -> tuple[float, float, float]:
    """(valley, steep, minimum) from a sweep's lrs and smoothed losses, the first two as fastai 2.7
    computes them, the third the lowest loss's lr over MINIMUM_DIVISOR; all on the
    curve less its first steps // 10 points (the smoothing's start) and its last 5 (the blow-up),
    cut at a non-finite loss.

    valley (fastai's default, by ESRI): the longest run of indices along which the loss keeps
    falling (a longest decreasing subsequence), and the point 2/3 of the way along it: far enough
    down to learn fast, short of the bottom where the loss turns. steep: the lr where the loss falls
    fastest against log lr (its most negative slope)."""
    pairs = list(zip(lrs, losses))[steps // 10:len(lrs) - SKIP_END]
    if len(pairs) < 2:  # a sweep that stopped early: what there is, less its last (diverged) point
        pairs = list(zip(lrs, losses))[:-1]
    cut = next((k for k, (_, v) in enumerate(pairs) if not math.isfinite(v)), len(pairs))
    pairs = pairs[:cut]
    if len(pairs) < 2:
        raise CnnkitError(f"the loss diverged after {len(lrs)} of {steps} steps, at lr {lrs[-1] if lrs else 0:.3g}: "
                          "too few points to suggest an lr; start lower (--start-lr) or sweep longer (--steps)")
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    return x[valley_index(y)], x[steep_index(x, y)], x[min(range(len(y)), key=y.__getitem__)] / MINIMUM_DIVISOR


def valley_index(losses: list[float]) -> int:
    """fastai's valley: run[i] is the length of the longest decreasing run of losses ending at i;
    the longest run ends at `end`, and the index 1/3 + 1/6 of its length past its start is taken.
    fastai's start is end - length (one before the run's first point); kept, and clamped at 0."""
    n = len(losses)
    run = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[end] < run[i]:
                end = i
                start = end - run[end]
    sections = (end - start) / 3
    return max(0, start + int(sections) + int(sections / 2))


def steep_index(lrs: list[float], losses: list[float]) -> int:
    """The left end of the steepest fall: argmin over i of (losses[i+1] - losses[i]) / log(lrs[i+1] / lrs[i])."""
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(len(lrs) - 1)]
    return min(range(len(slopes)), key=slopes.__getitem__)


# ----------------------------------------------------------------------------- the text plot
def text_plot(sw: Sweep, rows: int = 12, cols: int = 60) -> str:
    """The smoothed loss against log lr as `rows` lines of `cols` characters, the suggestion marked
    below the axis; losses above 1.5x the first are drawn on the top row (the blow-up)."""
    lo_x, hi_x = math.log10(sw.start_lr), math.log10(sw.end_lr)
    bottom, top = min(sw.losses), min(max(sw.losses), 1.5 * sw.losses[0])
    top = top if top > bottom else bottom + 1.0
    grid = [[" "] * cols for _ in range(rows)]

    def column(lr: float) -> int:
        return min(cols - 1, max(0, round((math.log10(lr) - lo_x) / (hi_x - lo_x) * (cols - 1))))

    for lr, loss in zip(sw.lrs, sw.losses):
        row = round((min(loss, top) - bottom) / (top - bottom) * (rows - 1))
        grid[rows - 1 - row][column(lr)] = "*"
    labels = [f"{top:8.3g}"] + [" " * 8] * (rows - 2) + [f"{bottom:8.3g}"]  # the loss at the top and bottom rows
    lines = [f"{label} |{''.join(cells)}" for label, cells in zip(labels, grid)]
    lines.append(f"{'':>8} +" + "-" * cols)
    left, right = f"{sw.start_lr:.0e}", f"{sw.end_lr:.0e}"
    lines.append(f"{'':>10}{left}{'lr (log scale)':^{cols - len(left) - len(right)}}{right}")
    mark = column(sw.suggestion)
    lines.append(f"{'':>10}{' ' * mark}^ {sw.method} {sw.suggestion:.3g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- `--lr auto`
def resolve_auto_lr(cfg: TrainConfig, ds: Dataset, model: nn.Module, run: RunFolder, world: World = World()
                    ) -> tuple[TrainConfig, dict | None]:
    """`--lr auto` (cfg.lr_find): sweep with the run's own config, log the curve in train.log, and
    return the config to train and save: lr the suggestion, lr_find false (so --resume and
    `--config config.json` repeat the run without sweeping), with the sweep's record for the model
    file. Without lr_find: (cfg, None)."""
    if not cfg.lr_find:
        return cfg, None
    if world.active:
        raise CnnkitError("--lr auto sweeps in one process: run `cnnkit lr-find` with the same options first "
                          "(without torchrun), then start the job with its --lr")
    found = find_lr(cfg, ds, model, steps=STEPS, start_lr=START_LR, end_lr=END_LR)  # read now: a test shortens it
    run.log(f"lr-find: {cfg.optimizer} lr {found.suggestion:.3g} ({found.method}; fastai's valley {found.valley:.3g}, "
            f"steep {found.steep:.3g}), from "
            f"{len(found.lrs)} of {found.steps} steps from {found.start_lr:g} to {found.end_lr:g} "
            f"(stopped: {found.stopped}) in {found.seconds:.1f} s")
    run.log(text_plot(found), echo=False)
    return dataclasses.replace(cfg, lr=found.suggestion, lr_find=False), found.record()
