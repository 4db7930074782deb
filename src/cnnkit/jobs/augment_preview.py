"""`cnnkit augment-preview`: training images beside their augmented versions, as training augments them."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import CnnkitError
from ..training import augmentation_and_balance, load_data_and_model


def augment_preview(cfg: TrainConfig, picture: Path, samples: int = 8, versions: int = 6) -> dict:
    """`cnnkit augment-preview`: `samples` training images (chosen by cfg.seed), each beside
    `versions` augmented copies, as training would augment them, drawn into `picture`."""
    from ..report import plot_augment_grid
    if not 1 <= samples <= 64 or not 1 <= versions <= 16:
        raise CnnkitError("--samples must be 1..64 and --versions 1..16")
    ds, _ = load_data_and_model(cfg, quiet=True)
    augment, _, _ = augmentation_and_balance(cfg, ds, torch.device("cpu"))
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(ds.train), generator=g)[:samples]
    images, labels = ds.train.images[idx], ds.train.labels[idx]  # (S, C, H, W) uint8, (S,)
    columns = [images.float()] + [augment(images, labels, g) for _ in range(versions)]  # each (S, C, H, W)
    grid = torch.stack(columns, dim=1)  # (S, 1 + V, C, H, W) float 0..255
    names = [ds.class_names[i] for i in labels.tolist()]
    described = augment.describe(ds.class_names)
    plot_augment_grid(grid, names, picture, title=f"{ds.name}: original, then augmented ({described})")
    return {"picture": str(picture), "data": ds.name, "samples": len(idx), "versions": versions,
            "augmentation": described}
