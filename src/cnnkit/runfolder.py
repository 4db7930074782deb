"""The run folder: every file a training run writes, by name, and whether this process writes at all.

    RUN/config.json             the resolved TrainConfig (re-runs with `--config`, resumes with `--resume`)
    RUN/train.log               everything printed, skipped files included
    RUN/history.csv             one row per epoch
    RUN/checkpoint.safetensors  model + optimizer after the last finished epoch (removed when the run ends)
    RUN/checkpoint-previous.safetensors  the one before it, kept until a newer one is complete: a
                                damaged checkpoint costs an epoch, never the run
    RUN/model.safetensors       the best model so far; at the end, the result
    RUN/metrics.json            test metrics: written last, so its presence means the run is complete

`primary` is whether this process writes: always true in one process; with data-parallel training
only one process may write, and the others keep the same calls as no-ops.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .config import TrainConfig
from .errors import CnnkitError, os_error_message
from .modelfile import MODEL_FILE, ModelInfo, save_model
from .models.base import unwrap
from .utils import save_safetensors, write_text_atomic

CHECKPOINT_FILE = "checkpoint.safetensors"
PREVIOUS_CHECKPOINT_FILE = "checkpoint-previous.safetensors"
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


class RunFolder:
    def __init__(self, path: str | Path, *, primary: bool = True, echo: Callable[[str], None] | None = print,
                 quiet: bool = False):
        self.path = Path(path)
        self.primary = primary  # whether this process writes files and prints
        self.echo = echo if (primary and not quiet) else None
        self.quiet = quiet

    # names
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def previous_checkpoint_file(self) -> Path:
        return self.path / PREVIOUS_CHECKPOINT_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def history_file(self) -> Path:
        return self.path / "history.csv"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    # state
    def is_complete(self) -> bool:
        return self.metrics_file.is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_file.is_file() or self.previous_checkpoint_file.is_file()

    def history_epochs(self) -> int:
        try:
            return max(0, len(self.history_file.read_text().strip().splitlines()) - 1)
        except OSError:
            return 0

    def set_aside(self, damaged: Path) -> Path:
        """Move a damaged checkpoint out of the way (checkpoint-damaged.safetensors), so the next
        save cannot make it the previous one in place of the intact one."""
        aside = damaged.with_name(damaged.stem + "-damaged" + damaged.suffix)
        os.replace(damaged, aside)
        return aside

    def resume_checkpoint(self) -> tuple[Path, int, str]:
        """(the newest intact checkpoint, the epoch it ends, a note if an older one had to be used)."""
        damaged = []
        for f in (self.checkpoint_file, self.previous_checkpoint_file):
            if not f.is_file():
                continue
            try:
                epoch = checkpoint_epoch(f)
            except CnnkitError as e:
                damaged.append(f"{f.name} is damaged ({e})")
                continue
            note = (f"{'; '.join(damaged)}: resuming from {f.name}, after epoch {epoch}" if damaged else
                    "" if f == self.checkpoint_file else f"resuming from {f.name}, after epoch {epoch}")
            return f, epoch, note
        if damaged:
            raise CnnkitError(f"cannot resume {self.path}: {'; '.join(damaged)}, and no earlier checkpoint is intact; "
                              f"start the run again: cnnkit train --config {self.config_file} --out NEW_FOLDER")
        done = self.history_epochs()
        if done:
            raise CnnkitError(f"cannot resume {self.path}: its {CHECKPOINT_FILE} is missing although its history has "
                              f"{done} epoch(s) (deleted or moved?); put it back, or start again: "
                              f"cnnkit train --config {self.config_file} --out NEW_FOLDER")
        raise CnnkitError(f"cannot resume {self.path}: it has no {CHECKPOINT_FILE} "
                          "(it stopped before its first epoch ended)")

    def read_config(self) -> TrainConfig:
        try:
            return TrainConfig.from_dict(json.loads(self.config_file.read_text()), source=str(self.config_file))
        except (OSError, json.JSONDecodeError) as e:
            raise CnnkitError(f"cannot resume {self.path}: no readable config.json ({e})") from None

    def check_writable(self) -> None:
        """Refuse, before any work, an --out that cannot become a run folder: a file, a path below a
        file, a read-only or forbidden place."""
        if not self.primary:
            return
        if self.path.exists() and not self.path.is_dir():
            raise CnnkitError(f"--out {self.path} is a file, not a folder: choose another --out")
        existing = next((q for q in (self.path, *self.path.parents) if q.exists()), None)
        if existing is None:
            return
        if not existing.is_dir():
            raise CnnkitError(f"--out {self.path}: {existing} is a file, so no folder can be made below it; "
                              "choose another --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            why = "is on a read-only file system" if _read_only(existing) else "is not writable by this user"
            raise CnnkitError(f"--out {self.path}: {existing} {why}; choose an --out on a writable disk")

    # writes (no-ops where this process is not the primary one)
    def create(self) -> None:
        if self.primary:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CnnkitError(f"--out {self.path}: {os_error_message(e, 'create') or e}") from None

    def log(self, msg: str, echo: bool = True) -> None:
        """Print (unless quiet) and append to train.log; echo=False: the log only (the CLI prints it)."""
        if echo and self.echo is not None:
            self.echo(msg)
        if self.primary:
            try:
                with open(self.log_file, "a", encoding="utf-8") as f:
                    f.write(msg + "\n")
            except OSError as e:  # a full disk: name the file
                e.filename = e.filename or str(self.log_file)
                raise

    def write_config(self, cfg: TrainConfig) -> None:
        if self.primary:
            write_text_atomic(self.config_file, json.dumps(cfg.to_dict(), indent=2))

    def read_history(self) -> list[dict[str, float]]:
        """history.csv's rows as numbers (epoch an int), as written; [] without a readable file."""
        try:
            with open(self.history_file, newline="") as f:
                return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        except (OSError, ValueError):
            return []

    def write_history(self, history: list[dict]) -> None:
        if not self.primary:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text_atomic(self.history_file, buf.getvalue())

    def save_model(self, model: nn.Module, info: ModelInfo) -> None:
        if self.primary:
            save_model(self.model_file, model, info)

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                        extra: dict[str, nn.Module] | None = None) -> None:
        if self.primary:
            save_checkpoint(self.checkpoint_file, model, optimizer, state, extra, self.previous_checkpoint_file)

    def write_metrics(self, metrics: dict) -> None:
        if self.primary:
            write_text_atomic(self.metrics_file, json.dumps(metrics, indent=2))

    def remove_checkpoint(self) -> None:
        """The run is complete: model.safetensors is the result."""
        if self.primary:
            self.checkpoint_file.unlink(missing_ok=True)
            self.previous_checkpoint_file.unlink(missing_ok=True)


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint ends, reading its header; a CnnkitError if the file is damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            return int(json.loads(f.metadata()["cnnkit_checkpoint"])["epoch"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise CnnkitError(str(e).splitlines()[0][:160] or type(e).__name__) from None


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    extra: dict[str, nn.Module] | None = None, previous: Path | None = None) -> None:
    """Model and optimizer tensors as safetensors; everything else as JSON in its header. extra:
    other modules to keep (the weight average), each under its name. previous: where the checkpoint
    being replaced goes once the new one is complete (a kill at any moment leaves an intact one)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    for name, module in (extra or {}).items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in unwrap(module).state_dict().items()})
    opt = optimizer.state_dict()
    scalars: dict = {}
    for pid, pstate in opt["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    header = {**state, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}

    def keep_previous() -> None:
        """The current checkpoint becomes the previous one by a second name (a hard link, renamed
        into place), so checkpoint.safetensors exists at every moment, old until the new one lands."""
        if previous is None or not path.exists():
            return
        link = previous.with_name(f".{previous.name}.{os.getpid()}.link")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copy2(path, link)
        os.replace(link, previous)
    save_safetensors(tensors, path, {"cnnkit_checkpoint": json.dumps(header)}, before_replace=keep_previous)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, nn.Module] | None = None) -> dict:
    try:
        return _load_checkpoint(path, model, optimizer, extra)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CnnkitError(f"cannot resume from {path}: it is damaged or from another model "
                          f"({str(e).splitlines()[0][:160]})") from None


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     extra: dict[str, nn.Module] | None = None) -> dict:
    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["cnnkit_checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, module in (extra or {}).items():
        unwrap(module).load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
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
