"""Pictures. matplotlib lives here only, with the non-interactive Agg backend."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .utils import atomic_path  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG under a temporary name, rename, and free the figure."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train against validation, like the notes' plots."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"model {label}")
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def draw_conv_steps(result: dict, path: str | Path, max_panels: int = 16) -> Path:
    """The sliding window: one panel per output value (up to max_panels), the padded input with the
    window outlined and the value it produces in the title. `result` is teach.conv_steps's dict."""
    import numpy as np
    from matplotlib.patches import Rectangle

    xp = np.asarray(result["padded_input"])
    kh, kw = np.asarray(result["kernel_used"]).shape
    steps = result["steps"][:max_panels]
    cols = min(4, len(steps))
    rows = (len(steps) + cols - 1) // cols
    cell = max(0.35, 2.4 / max(xp.shape))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * xp.shape[1] * cell + 0.5, rows * (xp.shape[0] * cell + 0.6)),
                             squeeze=False, dpi=100)
    for ax, step in zip(axes.ravel(), steps):
        ax.imshow(xp, cmap="Greys", alpha=0.35)
        for (r, c), v in np.ndenumerate(xp):
            ax.text(c, r, f"{v:g}", ha="center", va="center", fontsize=8)
        ax.add_patch(Rectangle((step["col"] - 0.5, step["row"] - 0.5), kw, kh, fill=False, lw=2.5, ec="tab:red"))
        ax.set_title(f"out[{step['i']},{step['j']}] = {step['value']:g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(steps):]:
        ax.axis("off")
    fig.suptitle(f"{result['mode'].replace('_', '-')}, stride {result['stride']}, padding {result['padding']}", fontsize=10)
    return save_figure(fig, path)


def plot_confusion_matrix(cm, class_names: list[str], path: str | Path, normalized: bool = False) -> Path:
    """Counts (or row-normalized rates) with the true class on rows, as the notes draw it."""
    import numpy as np
    cm = np.asarray(cm, dtype=float)
    k = len(class_names)
    size = min(max(4.0, 0.55 * k + 2), 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        top = cm.max() if cm.size else 1
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, f"{v:.2f}" if normalized else f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if v > 0.6 * top else "black")
    ax.set_title("confusion matrix" + (" (row-normalized)" if normalized else ""))
    return save_figure(fig, path)


def plot_misclassified(images, rows: list[dict], path: str | Path, columns: int = 6) -> Path:
    """The worst mistakes: each image titled true -> predicted (probability)."""
    n = max(1, len(rows))
    r = (n + columns - 1) // columns
    fig, axes = plt.subplots(r, columns, figsize=(columns * 1.9, r * 2.2), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows):
        img = images[row["index"]]  # (C, H, W) uint8
        ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(f"{row['true']} → {row['predicted']}\n{row['probability']:.2f}", fontsize=8)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center")
    return save_figure(fig, path)


def plot_reliability(rows: list[dict], ece: float, path: str | Path) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    ax.bar(centers, [r["accuracy"] for r in rows], width=1 / 15, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="tab:red", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)
