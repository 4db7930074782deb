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
