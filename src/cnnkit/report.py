"""Pictures, drawn from numbers: matplotlib lives here only, with the non-interactive Agg backend.

Nothing here evaluates or explains a model: the jobs compute the numbers (evaluate.py, explain.py)
and hands them over, so this module imports no other cnnkit layer but utils."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

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


def plot_compare_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """Validation loss and accuracy per epoch of several runs on shared axes (train dashed)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for i, (name, history) in enumerate(histories.items()):
        epochs = [r["epoch"] for r in history]
        colour = f"C{i}"
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", color=colour, label=f"{name} validation")
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "--", color=colour, alpha=0.6, label=f"{name} train")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_pairs(images_a, images_b, captions: list[str], path: str | Path, columns: int = 4) -> Path:
    """Duplicate pairs side by side: images_a[i] beside images_b[i] (uint8 (N, C, H, W)), captioned."""
    import numpy as np
    n = len(captions)
    c, h, w = images_a.shape[1:] if n else (1, 8, 8)
    scale = max(1, 64 // max(h, w))
    ch, cw = h * scale, w * scale
    gap, pad_top = max(2, cw // 8), max(12, ch // 3)
    rows = max(1, (n + columns - 1) // columns)
    pair_w = 2 * cw + gap
    mosaic = np.ones((rows * (ch + pad_top) + 2, columns * (pair_w + 3 * gap) + 2, 3))
    fig, ax = plt.subplots(figsize=(columns * 3.2, rows * 2.0), dpi=100)
    for i in range(n):
        y0 = (i // columns) * (ch + pad_top) + pad_top
        x0 = (i % columns) * (pair_w + 3 * gap) + 1
        for k, img in enumerate((images_a[i], images_b[i])):
            rgb = img.float().numpy() / 255
            rgb = (np.repeat(rgb, 3, 0) if c == 1 else rgb[:3]).transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
            mosaic[y0:y0 + ch, x0 + k * (cw + gap):x0 + k * (cw + gap) + cw] = rgb
        ax.text(x0 + pair_w / 2, y0 - 1, captions[i], ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic.clip(0, 1), interpolation="nearest")
    ax.axis("off")
    if not n:
        ax.text(mosaic.shape[1] / 2, mosaic.shape[0] / 2, "no duplicates", ha="center")
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
    fig.suptitle(f"{result['mode'].replace('_', '-')}, stride {result['stride']}, padding {result['padding']}",
                 fontsize=10)
    return save_figure(fig, path)


def plot_confusion_matrix(cm, class_names: list[str], path: str | Path, normalized: bool = False,
                          title: str | None = None, axes: tuple[str, str] = ("predicted", "true")) -> Path:
    """Counts (or row-normalized rates) with the true class on rows, as the notes draw it. title and
    axes (x label, y label) rename it for other K x K counts (multi-label co-occurrence)."""
    import numpy as np
    cm = np.asarray(cm, dtype=float)
    k = len(class_names)
    size = min(max(4.0, 0.55 * k + 2), 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    if k <= 20:
        top = cm.max() if cm.size else 1
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, f"{v:.2f}" if normalized else f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if v > 0.6 * top else "black")
    ax.set_title(title or "confusion matrix" + (" (row-normalized)" if normalized else ""))
    return save_figure(fig, path)


def show_image(ax, img, heatmap=None) -> None:
    """A uint8 image (C, H, W) on an axis, with a Grad-CAM heatmap (H, W) in [0, 1] over it if given."""
    img = img.numpy()  # matplotlib wants NumPy arrays, not tensors
    ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None,
              vmin=0, vmax=255)
    if heatmap is not None:
        ax.imshow(heatmap.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_misclassified(images, rows: list[dict], path: str | Path, columns: int = 6, heatmaps=None) -> Path:
    """The worst mistakes: each image titled true -> predicted (probability); with `heatmaps` (one
    (H, W) map per row), each image is followed by its Grad-CAM for the predicted class.

    Composed as one picture (one imshow, text on top) rather than an axis per image: with 48 axes
    the figure took 1.2 s to lay out and save (cProfile of one MNIST run), most of a report's
    drawing time."""
    import numpy as np
    n = len(rows)
    per_item = 1 if heatmaps is None else 2
    columns -= columns % per_item
    items_per_row = columns // per_item
    r = max(1, (n + items_per_row - 1) // items_per_row)
    c, h, w = images.shape[1:] if n else (1, 8, 8)
    scale = max(1, 64 // max(h, w))  # small images enlarged by whole pixels, so digits stay sharp
    ch, cw = h * scale, w * scale
    pad_x, pad_top = max(2, cw // 10), max(10, ch // 3)  # room between cells and for two lines of title
    mosaic = np.ones((r * (ch + pad_top) + 2, columns * (cw + pad_x) + 2, 3))  # white, RGB in [0, 1]
    jet = plt.get_cmap("jet")
    fig, ax = plt.subplots(figsize=(columns * 1.9, r * 2.2), dpi=100)
    for i, row in enumerate(rows):
        img = images[row["index"]].float().numpy() / 255  # (C, H, W)
        rgb = np.repeat(img, 3, 0) if c == 1 else img[:3]
        rgb = rgb.transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)  # (ch, cw, 3)
        cells = [(rgb, f"{row['true']} → {row['predicted']}\n{row['probability']:.2f}")]
        if heatmaps is not None:
            heat = jet(heatmaps[i].numpy())[..., :3].repeat(scale, 0).repeat(scale, 1)
            cells.append((0.55 * rgb + 0.45 * heat, f"Grad-CAM\n{row['predicted']}"))
        for j, (cell, title) in enumerate(cells):
            col = (i % items_per_row) * per_item + j
            y0, x0 = (i // items_per_row) * (ch + pad_top) + pad_top, col * (cw + pad_x) + 1
            mosaic[y0:y0 + ch, x0:x0 + cw] = cell
            ax.text(x0 + cw / 2, y0 - 1, title, ha="center", va="bottom", fontsize=8)
    ax.imshow(mosaic.clip(0, 1), interpolation="nearest")  # float rounding can pass 1 by 1e-8
    ax.axis("off")
    if not rows:
        ax.text(mosaic.shape[1] / 2, mosaic.shape[0] / 2, "no mistakes", ha="center")
    return save_figure(fig, path)


def plot_kernels(weights, path: str | Path, max_kernels: int = 64) -> Path:
    """First-layer kernels (F, C, kh, kw): in colour for RGB input, else grey (averaged over input
    channels), each scaled to its own range, as the notes show AlexNet's edge and colour detectors."""
    w = weights[:max_kernels].float()
    n = len(w)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.2 + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (ax, k) in enumerate(zip(axes.ravel(), w)):
        k = (k - k.min()) / (k.max() - k.min()).clamp_min(1e-12)
        ax.imshow((k.permute(1, 2, 0) if k.shape[0] == 3 else k.mean(0)).numpy(),
                  cmap=None if k.shape[0] == 3 else "gray", interpolation="nearest")
        ax.set_title(str(i), fontsize=7)
    fig.suptitle(f"first-layer kernels: {weights.shape[0]} of {weights.shape[1]}x{weights.shape[2]}x{weights.shape[3]}",
                 fontsize=10)
    return save_figure(fig, path)


def plot_feature_maps(maps, title: str, path: str | Path, max_channels: int = 16) -> Path:
    """One layer's output (C, H, W) for one image: the channels with the highest mean activation."""
    order = maps.flatten(1).mean(1).argsort(descending=True)[:max_channels]
    cols = min(8, len(order))
    rows = (len(order) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45 + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), order.tolist()):
        ax.imshow(maps[c].numpy(), cmap="viridis")
        ax.set_title(f"ch {c}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_gradcam(image, heatmaps: dict[str, object], path: str | Path) -> Path:
    """The input, then the Grad-CAM heatmap over it for each named class."""
    n = 1 + len(heatmaps)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3), dpi=100, squeeze=False)
    show_image(axes[0, 0], image)
    axes[0, 0].set_title("input", fontsize=9)
    for ax, (label, heat) in zip(axes[0, 1:], heatmaps.items()):
        show_image(ax, image, heat)
        ax.set_title(f"Grad-CAM: {label}", fontsize=9)
    return save_figure(fig, path)


def plot_roc_pr(binary: dict, positive: str, path: str | Path) -> Path:
    """A binary model's ROC curve and precision-recall curve side by side, each with its area and
    the model file's threshold marked (evaluate's metrics["binary"])."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4.2), dpi=100)
    t = binary["threshold"]
    fpr, tpr, roc_t = (np.array(binary["roc"][k]) for k in ("fpr", "tpr", "thresholds"))
    roc.plot(fpr, tpr, color="tab:blue", label=f"AUC {binary['roc_auc']:.4f}" if binary["roc_auc"] is not None else "")
    roc.plot([0, 1], [0, 1], "--", color="gray", label="chance")
    if len(roc_t):  # the threshold's point: the lowest curve threshold still >= t
        i = int(np.flatnonzero(roc_t >= t)[-1]) + 1 if (roc_t >= t).any() else 0
        roc.plot(fpr[i], tpr[i], "o", color="tab:red", label=f"threshold {t:.3f}")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {positive} positive",
            xlim=(0, 1), ylim=(0, 1.01))
    roc.legend(loc="lower right", fontsize=8)
    precision, recall, pr_t = (np.array(binary["pr"][k]) for k in ("precision", "recall", "thresholds"))
    ap = binary["average_precision"]
    pr.step(recall, precision, where="post", color="tab:blue", label=f"AP {ap:.4f}" if ap is not None else "")
    if (pr_t >= t).any():
        i = int(np.flatnonzero(pr_t >= t)[-1])
        pr.plot(recall[i], precision[i], "o", color="tab:red", label=f"threshold {t:.3f}")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    pr.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def plot_reliability(rows: list[dict], ece: float, path: str | Path) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    ax.bar(centers, [r["accuracy"] for r in rows], width=1 / 15, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="tab:red",
            label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {ece:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_augment_grid(grid, class_names: list[str], path: str | Path, title: str = "") -> Path:
    """One row per image: the original, then its augmented versions. grid: (S, 1 + V, C, H, W) in 0..255."""
    import numpy as np
    rows, cols = grid.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 0.6, 1.3 * rows + 0.6), squeeze=False, dpi=100)
    for r in range(rows):
        for c in range(cols):
            img = np.clip(grid[r, c].permute(1, 2, 0).numpy() / 255, 0, 1)
            ax = axes[r, c]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
        axes[r, 0].set_ylabel(class_names[r], fontsize=8)
    if title:
        import textwrap
        fig.suptitle(textwrap.fill(title, width=int(16 * cols)), fontsize=9)
    return save_figure(fig, path)


def plot_pr_curves(curves: list[dict], path: str | Path, columns: int = 5) -> Path:
    """Multi-label precision-recall curves, one small panel per label: each curve dict holds label,
    recall and precision (the steps, recall ascending), ap (or None), and the (recall, precision)
    and threshold of the label's decision, marked on its curve."""
    import numpy as np
    n = len(curves)
    cols = max(1, min(columns, n))
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.3, rows * 2.3 + 0.3), dpi=100, squeeze=False,
                             sharex=True, sharey=True)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, c in zip(axes.ravel(), curves):
        # AP sums (recall gained) x precision: a step up to each point's recall at its precision
        recall, precision = np.r_[0.0, c["recall"]], np.r_[c["precision"][:1], c["precision"]]
        ax.plot(recall, precision, drawstyle="steps-pre", lw=1.2)
        ax.plot(*c["point"], "o", color="tab:red", ms=5)
        ax.annotate(f'{c["threshold"]:.2f}', c["point"], textcoords="offset points", xytext=(-4, -10), fontsize=7,
                    ha="right", color="tab:red")
        ap = "–" if c["ap"] is None else f'{c["ap"]:.3f}'
        ax.set_title(f'{c["label"]} (AP {ap})', fontsize=8)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xticks([0, 0.5, 1])  # fixed ticks: the automatic ones were half the drawing time (cProfile)
        ax.set_yticks([0, 0.5, 1])
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    fig.suptitle("precision against recall per label (red: the label's threshold)", fontsize=9)
    return save_figure(fig, path)


def plot_label_gallery(images, rows: list[tuple[str, list[dict]]], path: str | Path, per_row: int,
                       heatmaps=None) -> Path:
    """One row per label: (label, items), each item an image index into `images` (uint8 (N, C, H, W))
    and a two-line caption, followed by its Grad-CAM heatmap for that label when `heatmaps` holds one
    (H, W) map per item (in row order). Composed as one picture, as plot_misclassified is, for speed."""
    import numpy as np
    per_item = 1 if heatmaps is None else 2
    columns = max(1, per_row) * per_item
    n_rows = max(1, len(rows))
    c, h, w = images.shape[1:]
    scale = max(1, 64 // max(h, w))
    ch, cw = h * scale, w * scale
    pad_x, pad_top, left = max(2, cw // 10), max(12, ch // 3), cw  # left: room for the label's name
    mosaic = np.ones((n_rows * (ch + pad_top) + 2, left + columns * (cw + pad_x) + 2, 3))
    jet = plt.get_cmap("jet")
    fig, ax = plt.subplots(figsize=((columns + 1) * 1.2, n_rows * 1.45), dpi=100)
    k = 0  # the item's position in heatmaps
    for r, (label, items) in enumerate(rows):
        y0 = r * (ch + pad_top) + pad_top
        ax.text(left / 2, y0 + ch / 2, label, ha="center", va="center", fontsize=10, fontweight="bold")
        if not items:
            ax.text(left + 2, y0 + ch / 2, "no mistakes on this label", ha="left", va="center", fontsize=8)
        for i, item in enumerate(items):
            img = images[item["index"]].float().numpy() / 255  # (C, H, W)
            rgb = (np.repeat(img, 3, 0) if c == 1 else img[:3]).transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
            cells = [(rgb, item["caption"])]
            if heatmaps is not None:
                heat = jet(heatmaps[k].numpy())[..., :3].repeat(scale, 0).repeat(scale, 1)
                cells.append((0.55 * rgb + 0.45 * heat, f"Grad-CAM\n{label}"))
            k += 1
            for j, (cell, title) in enumerate(cells):
                x0 = left + (i * per_item + j) * (cw + pad_x) + 1
                mosaic[y0:y0 + ch, x0:x0 + cw] = cell
                ax.text(x0 + cw / 2, y0 - 1, title, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic.clip(0, 1), interpolation="nearest")
    ax.axis("off")
    return save_figure(fig, path)
