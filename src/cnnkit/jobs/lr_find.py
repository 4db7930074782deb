"""`cnnkit lr-find`: the learning-rate sweep on the run a config describes, its curve drawn as a PNG
and as text, and the suggested lr (training/lr_find.py)."""
from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..errors import CnnkitError
from ..training import Sweep, find_lr, load_data_and_model
from ..training.lr_find import END_LR, START_LR, STEPS, check_model, check_range, text_plot


def lr_find(cfg: TrainConfig, picture: Path, *, steps: int = STEPS, start_lr: float = START_LR,
            end_lr: float = END_LR, quiet: bool = False) -> dict:
    """Sweep the lr for `cfg` (its data, model, optimizer, batch size, augmentation: as `cnnkit train`
    would train it, its own lr replaced by the sweep's), draw the curve into `picture`, and return
    the suggestion with the curve. Nothing else is written; the model is not kept."""
    check_range(steps, start_lr, end_lr)  # before the data is loaded
    check_model(cfg)
    if cfg.teacher == "fast":  # train's own teacher run (jobs/train.py): lr-find writes no run folder to hold it
        raise CnnkitError(f"--teacher fast trains a teacher inside a run; lr-find takes a finished one: train it "
                          f"(cnnkit train --recipe fast --data {cfg.data} --out T) and give --teacher T")
    ds, model = load_data_and_model(cfg, quiet=quiet)
    found = find_lr(cfg, ds, model, steps=steps, start_lr=start_lr, end_lr=end_lr)
    plot_sweep(found, picture, title=f"{ds.name}, {cfg.model}: {cfg.optimizer}, batch {cfg.batch_size}")
    return {**found.record(), "picture": str(picture), "data": ds.name, "model": cfg.model,
            "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "seconds": found.seconds,
            "lrs": found.lrs, "losses": found.losses, "raw_losses": found.raw_losses, "text_plot": text_plot(found)}


def plot_sweep(found: Sweep, path: Path, title: str = "") -> Path:
    """The smoothed loss (and each batch's, faintly) against the lr on a log axis, both suggestions
    marked, the one suggested filled; the y axis cut at 1.5x the first loss so the blow-up does not
    flatten the curve."""
    from ..report import save_figure  # sets matplotlib's Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(found.lrs, found.raw_losses, color="0.8", lw=0.8, label="batch loss")
    ax.plot(found.lrs, found.losses, color="C0", label="smoothed loss (beta 0.98)")
    marks = (("minimum / 3", found.minimum, "C3"), ("valley", found.valley, "C1"), ("steep", found.steep, "C2"))
    for name, lr, color in marks:
        loss = found.losses[min(range(len(found.lrs)), key=lambda i: abs(found.lrs[i] - lr))]
        chosen = name.startswith(found.method)
        ax.plot([lr], [loss], "o", color=color, mfc=color if chosen else "none", ms=8,
                label=f"{name} {lr:.3g}{' (suggested)' if chosen else ''}")
    ax.set_xscale("log")
    low, high = min(found.losses + found.raw_losses), min(max(found.losses + found.raw_losses), 1.5 * found.losses[0])
    if high > low:
        ax.set_ylim(low - 0.05 * (high - low), high)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr-find: {title} ({len(found.lrs)} of {found.steps} steps, stopped: {found.stopped})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
