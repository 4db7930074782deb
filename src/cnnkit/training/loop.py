"""The epoch loop: train one epoch, validate, keep the best model by validation accuracy, write
history and checkpoint; repeat. A checkpoint is written atomically after every epoch, so Ctrl-C or a
kill loses at most the epoch in progress, and every epoch's shuffling, augmentation and dropout are
seeded by (seed, epoch), so a resumed CPU run equals an uninterrupted one.

    epoch_loop(session)     from session.first_epoch to session.total_epochs (or an early stop)
    fit(cfg, ds, model, run) set up, run the epochs, and return the best model: a TrainResult
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .. import distributed
from ..config import TrainConfig
from ..data import Dataset
from ..distributed import World
from ..errors import TrainingDiverged, TrainingInterrupted
from ..inference import metrics_from_logits, predict_logits
from ..modelfile import load_model
from ..runfolder import RunFolder
from ..utils import progress
from .callbacks import Callback
from .epoch import EpochSettings, NonFinite, non_finite_tensors, run_epoch
from .optim import lookahead_step, lr_at, make_optimizer, set_phase, update_ema
from .session import Session, TrainResult, setup


def epoch_loop(s: Session, quiet: bool = False) -> None:
    """Train from s.first_epoch to s.total_epochs: each epoch trains, validates, keeps the model if
    its validation accuracy is the best so far, and writes history and checkpoint."""
    cfg, run = s.cfg, s.run
    train_images, train_labels = s.ds.train.images.to(s.device), s.ds.train.labels.to(s.device)
    steps_per_epoch = math.ceil(len(train_labels) / cfg.batch_size)
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
            if s.phase_of(epoch) == "fine-tune" and epoch == cfg.epochs + 1:
                start_fine_tuning(s)
            record_dir = os.environ.get("CNNKIT_RECORD_SHARDS")
            settings = epoch_settings(s, epoch, steps_per_epoch, [] if record_dir else None)
            bar = progress(steps_per_epoch, f"epoch {epoch}/{s.total_epochs}", unit="step",
                           disable=quiet or not run.primary)
            loss_sum, correct, seen, lr = run_epoch(s.trained, s.optimizer, train_images, train_labels,
                                                    epoch_order(s, epoch, len(train_labels)), settings, bar)
            bar.close()
            # The loss can stay finite while the last step overflowed the weights: check them too,
            # before anything of this epoch is validated or saved.
            if bad := non_finite_tensors(s.model, s.ema):
                raise NonFinite(steps_per_epoch, steps_per_epoch, f"{len(bad)} weight tensors became non-finite "
                                f"(first: {bad[0]})")
            if settings.seen_indices is not None:
                record_shard(Path(record_dir), epoch, s.world, settings.seen_indices)
            end_epoch(s, epoch, loss_sum / seen, correct / seen, lr, t0)
        distributed.barrier(s.world)  # rank 0 has written the last model file before anyone reads it
    except NonFinite as e:
        raise diverged(s, epoch, e) from None
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted during epoch {epoch}; {kept_checkpoint(s)}; continue with: "
                                  f"{resume_command(s)}") from None
    except RuntimeError as e:
        if not s.world.active:
            raise
        raise process_died(s, epoch, e) from None


def start_fine_tuning(s: Session) -> None:
    """Phase 2 of transfer learning: unfreeze everything, with per-group learning rates."""
    set_phase(s.model, "all")
    s.optimizer = make_optimizer(s.cfg, s.model, "fine-tune")
    s.trained = distributed.wrap(s.model, s.world, s.device)  # DDP syncs what trained when wrapped
    lr = s.cfg.lr * s.cfg.fine_tune_lr_factor
    s.run.log(f"fine-tuning everything for {s.total_epochs - s.cfg.epochs} epochs: head lr {lr:g}, "
              f"backbone lr {lr * 0.1:g}")


def epoch_settings(s: Session, epoch: int, steps_per_epoch: int, seen_indices: list | None) -> EpochSettings:
    """How this epoch trains. Each phase (training, fine-tuning) has its own warmup and decay; the
    augmentation's generator and torch's global RNG (dropout) are seeded by (seed, epoch), so they do
    not depend on whether the run was resumed."""
    cfg = s.cfg
    fine_tune_epochs = s.total_epochs - cfg.epochs
    fine_tuning = s.phase_of(epoch) == "fine-tune"
    phase_first, phase_epochs = (cfg.epochs + 1, fine_tune_epochs) if fine_tuning else (1, cfg.epochs)
    phase_steps, first_step = steps_per_epoch * phase_epochs, (epoch - phase_first) * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    augment = s.augment if s.augment.active and epoch >= cfg.augment_from_epoch else None
    augment_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 250_000)
    mixing = s.mix.active and epoch >= cfg.mix_from_epoch and not (cfg.mix_off_epoch and epoch >= cfg.mix_off_epoch)
    # The teacher's logits of each training image are fixed while nothing changes the images: computed once
    teacher_logits = (s.teacher.cache(s.ds.train.images, s.precision)
                      if s.teacher is not None and augment is None and not mixing else None)
    torch.manual_seed(cfg.seed * 1_000_003 + epoch + 500_000)
    return EpochSettings(
        batch_size=cfg.batch_size, preprocess=s.preprocess, precision=s.precision,
        lr_fn=lambda i: lr_at(first_step + i, phase_steps, warmup_steps, cfg.lr, cfg.schedule),
        label_smoothing=cfg.label_smoothing, task=s.ds.task, frozen_bn=s.transfer,
        augment=augment, generator=augment_gen, class_weight=s.class_weight, pos_weight=s.pos_weight,
        mix=s.mix if mixing else None,
        mix_generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch + 750_000),
        teacher=s.teacher, teacher_logits=teacher_logits, kd_alpha=cfg.kd_alpha, kd_temperature=cfg.kd_temperature,
        grad_clip=cfg.grad_clip,
        after_step=ema_step(s) if s.ema is not None else None,
        on_step=step_hook(s, epoch, steps_per_epoch),
        world=s.world, seen_indices=seen_indices)


def step_hook(s: Session, epoch: int, steps_per_epoch: int) -> Callable[[int, dict], None] | None:
    """The callbacks' on_step, numbering steps over the whole run (from 1); None without callbacks."""
    if not s.callbacks:
        return None
    first = (epoch - 1) * steps_per_epoch + 1

    def hook(i: int, values: dict) -> None:
        for cb in s.callbacks:
            cb.on_step(first + i, values)
    return hook


def epoch_order(s: Session, epoch: int, n: int) -> torch.Tensor:
    """The epoch's order of training images, (N,) on the device, the same in every process (which
    trains its shard of each batch): a seeded permutation, or (balance: sampler) N weighted draws."""
    gen = torch.Generator().manual_seed(s.cfg.seed * 1_000_003 + epoch)
    if s.sample_weight is not None:  # with replacement, as many draws as images
        perm = torch.multinomial(s.sample_weight, n, replacement=True, generator=gen).to(s.device)
    else:
        perm = torch.randperm(n, generator=gen).to(s.device)
    return distributed.trim(perm, s.world)


def end_epoch(s: Session, epoch: int, train_loss: float, train_acc: float, lr: float, t0: float) -> None:
    """Validate, log, keep the model if it is the best so far, write history and checkpoint.
    t0: when the epoch started (perf_counter), so its seconds include validation."""
    val = metrics_from_logits(predict_logits(s.evaluated, s.ds.val.images, s.preprocess, s.device, s.precision),
                              s.ds.val.labels)
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val["loss"],
           "val_acc": val["accuracy"], "lr": lr, "seconds": time.perf_counter() - t0}
    s.history.append(row)
    s.run.log(f"epoch {epoch}/{s.total_epochs}{' (' + s.phase_of(epoch) + ')' if s.transfer else ''}: "
              f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | {row['seconds']:.1f} s")
    if row["val_acc"] > s.best_val:  # keep the best model by validation accuracy
        s.best_val, s.best_epoch = row["val_acc"], epoch
        s.run.save_model(s.evaluated, dataclasses.replace(s.info, metrics={"best_epoch": epoch,
                                                                           "val_accuracy": s.best_val}))
    s.run.write_history(s.history)
    s.run.save_checkpoint(s.model, s.optimizer, {"epoch": epoch, "history": s.history, "best_val_acc": s.best_val,
                                                 "best_epoch": s.best_epoch, "ema_steps": s.ema_steps},
                          {"ema": s.ema} if s.ema is not None else None)
    for cb in s.callbacks:  # after the checkpoint: a callback that stops the run (tune's pruner) loses nothing
        cb.on_epoch_end(epoch, row)


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


def process_died(s: Session, epoch: int, e: RuntimeError) -> TrainingInterrupted:
    """gloo / nccl report a process that died (killed, out of memory) as a broken connection:
    "[.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:47516: Connection reset by peer. ..."."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0][:120]
    return TrainingInterrupted(f"another process of the job stopped during epoch {epoch} ({reason}); "
                               f"{kept_checkpoint(s)}; continue with any number of processes: {resume_command(s)}")


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
    from ..utils import write_text_atomic
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
        quiet: bool = False, world: World = World(), callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Set up, run the epochs, and return the best model (reloaded from its model file).
    callbacks: watchers of the run (callbacks.py); their close() is the caller's."""
    s = setup(cfg, ds, model, run, resume, world)
    s.callbacks = tuple(callbacks)
    for cb in s.callbacks:
        cb.on_train_start(cfg, run, s.first_epoch)
    epoch_loop(s, quiet)
    best, _ = load_model(run.model_file, s.device)
    return TrainResult(best, s.preprocess, s.history, s.best_epoch, s.best_val, s.device, s.precision,
                       sum(r["seconds"] for r in s.history), s.info)
