"""What the benchmarks share: where things are, the machine header every script prints first,
interleaved repeats with medians, `cnnkit` run as a subprocess, the notes' reference training loop
(and cnnkit's own, timed alike), a training step, the random images and model files the speed
benchmarks run on.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import cnnkit
from cnnkit.config import TrainConfig
from cnnkit.hardware import machine_line
from cnnkit.inference import pick_precision
from cnnkit.models.registry import architecture_record, build_model, get_spec
from cnnkit.preprocess import Preprocess
from cnnkit.training import EpochSettings, make_optimizer, run_epoch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent  # the checkout
SHARED_DATA = ROOT.parent / "shared" / "data"  # the real data beside the checkout, as the tests read it
SPECS = BENCHMARKS / "specs"  # model specs of networks tried and set aside
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

K = TypeVar("K")
T = TypeVar("T")


# ----------------------------------------------------------------------------- the machine header
def machine_header() -> None:
    """Print machine_line(): the first line every benchmark prints, the machine every figure below it was
    measured on."""
    print(machine_line(), flush=True)


# ----------------------------------------------------------------------------- repeats and medians
def interleaved(variants: Mapping[K, Callable[[], T]], repeats: int, *, seed: bool = False) -> dict[K, list[T]]:
    """Call every variant once a repeat, in turn, `repeats` times, so that a drift in the machine's speed
    hits every variant alike: {variant: [what it returned in each repeat]}. seed: torch.manual_seed(repeat)
    before each call."""
    results: dict[K, list[T]] = {k: [] for k in variants}
    for r in range(repeats):
        for k, fn in variants.items():
            if seed:
                torch.manual_seed(r)
            results[k].append(fn())
    return results


def medians(results: Mapping[K, Iterable[float]]) -> dict[K, float]:
    return {k: statistics.median(v) for k, v in results.items()}


def timed_call(fn: Callable[[], T]) -> tuple[T, float]:
    """(what fn returns, the wall seconds of the call)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of fn."""
    return timed_call(fn)[1]


def per_second(fn: Callable[[], object], items: int, calls: int = 1) -> float:
    """Items per second of `calls` calls of fn that handle `items` each (images, for a training step)."""
    return items * calls / seconds(lambda: [fn() for _ in range(calls)])


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of one call of fn over `repeats` calls, after one untimed warm-up call."""
    fn()
    return statistics.median(seconds(fn) for _ in range(repeats))


# ----------------------------------------------------------------------------- cnnkit as a subprocess
def cnnkit_command(*args: str) -> list[str]:
    """`cnnkit ARGS` as this interpreter runs it in a fresh process."""
    return [sys.executable, "-m", "cnnkit", *args]


def run_cnnkit(*args: str, env: dict | None = None) -> float:
    """Run `cnnkit ARGS` to its end in a fresh process, its output read and dropped; the whole command's wall
    seconds. Exits with the end of its stderr where it fails."""
    r, wall = timed_call(lambda: subprocess.run(cnnkit_command(*args), capture_output=True, env=env))
    if r.returncode != 0:
        raise SystemExit(r.stderr.decode(errors="replace")[-3000:])
    return wall


def cnnkit_train(args: list[str], out: Path, env: dict | None = None, report: bool = False) -> tuple[dict, float]:
    """`cnnkit train ARGS --no-report --quiet --out OUT` (--report with report) as a whole command: (the run's
    metrics.json, the command's wall seconds)."""
    wall = run_cnnkit("train", *args, "--report" if report else "--no-report", "--quiet", "--out", str(out), env=env)
    return json.loads((out / "metrics.json").read_text()), wall


# ----------------------------------------------------------------------------- the notes' reference loop
class NotesNet(nn.Module):
    """seed-mnist-torch as the notes write it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 1024)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def notes_normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """MNIST's uint8 images as the notes feed them: ToTensor + Normalize((0.1307,), (0.3081,))."""
    return (images_u8.float() / 255 - 0.1307) / 0.3081


def notes_loader(x: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> DataLoader:
    """The notes' data: a shuffled DataLoader over float tensors."""
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size, shuffle=True)


def notes_steps(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader) -> Iterator[int]:
    """The notes' training loop, one epoch over loader (fp32, cross-entropy, zero_grad / backward / step);
    yields the images of each step just before taking it."""
    model.train()
    for xb, yb in loader:
        yield len(yb)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def notes_loop(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
               warmup_steps: int = 5) -> float:
    """Images per second of the notes' loop (after a few warm-up steps): a DataLoader over normalized
    float tensors (as ToTensor + Normalize give), fp32, per-tensor Adam 1e-3."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, start = 0, None
    for step, n in enumerate(notes_steps(model, opt, notes_loader(x, labels, batch_size))):
        if step == warmup_steps:
            start, seen = time.perf_counter(), 0
        seen += n
    return seen / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- cnnkit's loop, timed alike
def cnnkit_loop(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 128,
                precision: str = "auto", channels_last: bool = True, fused: bool = True,
                warmup_steps: int = 5) -> float:
    """Images per second of cnnkit's loop (training.run_epoch) over uint8 images."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(TrainConfig(optimizer="adam", lr=1e-3), model) if fused else \
        torch.optim.Adam(model.parameters(), lr=1e-3)
    norm = Preprocess.fit(images_u8[:5000], channels_last=channels_last)
    precision = pick_precision(precision, torch.device("cpu"))
    settings = EpochSettings(batch_size=batch_size, lr_fn=lambda i: 1e-3, preprocess=norm, precision=precision)
    run_epoch(model, opt, images_u8, labels, torch.randperm(len(labels))[: warmup_steps * batch_size], settings)
    start = time.perf_counter()
    _, _, seen, _ = run_epoch(model, opt, images_u8, labels, torch.randperm(len(labels)), settings)
    return seen / (time.perf_counter() - start)


# network -> (input shape, the notes' batch size)
ALL_NETS = {"seed-mnist-torch": ((1, 28, 28), 64), "seed-mnist-keras": ((1, 28, 28), 128),
            "seed-cifar10": ((3, 32, 32), 32), "seed-patch64": ((3, 64, 64), 32),
            "fast-mnist": ((1, 28, 28), 64), "mnist-stride2": ((1, 28, 28), 64)}


def random_images(images: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels of 10 classes), seeded: `images` of them, a quarter as many at 64 px or more
    (dense kernels take the same time whatever the pixels)."""
    n = images if shape[1] <= 32 else images // 4
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return u8, torch.randint(0, 10, (n,), generator=g)


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, bf16: bool = True, label_smoothing: float = 0.0) -> Callable[[], None]:
    """One training step on the batch (x, y) as cnnkit's loop takes it (bf16 autocast on the CPU where bf16),
    as a function of no arguments."""
    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x).float(), y, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


# ----------------------------------------------------------------------------- model files
def model_file(path: Path, name: str, channels: int, size: int, mean: list[float], std: list[float],
               class_names: list[str] | None = None, seed: int = 0, batchnorm_pass: bool = False, **meta) -> Path:
    """A model file of `name` with seeded random weights (speed and parity do not depend on them): 10 classes,
    the given normalisation (a value a channel), shorter-side centre-crop resizing. batchnorm_pass: BatchNorm
    statistics made non-trivial by one training-mode pass, as a trained run would leave them; meta: further
    entries of the file's metadata."""
    torch.manual_seed(seed)
    model = build_model(get_spec(name), 10, in_channels=channels, image_size=(size, size))
    if batchnorm_pass:
        with torch.no_grad():
            model.train()(torch.randn(16, channels, size, size) * 0.5)
    return cnnkit.save_model(path, model, {
        "class_names": class_names or [str(i) for i in range(10)],
        "input": {"channels": channels, "height": size, "width": size},
        "preprocessing": {"mean": mean, "std": std, "scale": 255,
                          "resize": "shorter-side-center-crop"},
        "architecture": architecture_record(model), **meta})
