"""One config object per job. Every field says what it means and its unit; the resolved config is
saved with each run as config.json, and `--resume` reads it back."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    data: str = "digits"  # dataset name (mnist, fashion-mnist, cifar10, digits) or folder path
    model: str = "seed-digits"  # registry name or YAML spec path
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 2e-3  # peak learning rate (reached after warmup, then decayed linearly to 0)
    optimizer: str = "adam"  # adam | sgd (SGD uses Nesterov momentum)
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: float = 0.0  # L2 penalty per step, as the optimizer applies it
    warmup_epochs: float = 0.3  # epochs of linear learning-rate warmup from 0; 0 disables it
    schedule: str = "linear"  # learning rate after warmup: linear (decay to 0) | constant
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0..1
    val_split: float = 0.1  # fraction of training images held out for validation, when the data has no val split
    test_split: float = 0.2  # fraction held out for testing, when the data has no test split nor val split
    seed: int = 0  # seeds splits, initialisation, shuffling and dropout: same seed, same run (on CPU)
    image_size: int | None = None  # square side in pixels; None: the dataset's own (folders: the model's, else 64)
    channels: int | None = None  # 1 or 3; None: the dataset's own (folders: the model's, else 3)
    precision: str = "auto"  # auto (bf16 autocast where the CPU or GPU supports it) | bf16 | fp32
    channels_last: bool = True  # NHWC activations: faster convolutions with oneDNN and cuDNN
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda
    data_dir: str | None = None  # folder with dataset files already on disk (else $CNNKIT_DATA, the cache, download)
    download: bool = True  # download missing dataset files from the official URLs
    out: str | None = None  # run folder; None: runs/<data>-<model>-<timestamp>
    pretrained: str | None = None  # ImageNet weights: a state-dict file (.pth/.pt/.safetensors) or a package name
    freeze_backbone: bool = False  # train only a new classifier head on the frozen feature extractor
    fine_tune: bool = False  # after the frozen phase (--epochs), unfreeze everything for fine_tune_epochs more
    fine_tune_epochs: int | None = None  # epochs of the unfrozen phase; None: the same as epochs
    fine_tune_lr_factor: float = 0.1  # unfrozen phase: head at lr x factor, backbone at lr x factor x 0.1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
