"""Shared fixtures: the real data in ../shared/data, an isolated cache per test, a local HTTP
server on 127.0.0.1 standing in for the official download sites."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from postgres import postgres_url  # noqa: F401  (the fixture of a throw-away PostgreSQL server)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CNNKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
ARTIFACTS = ROOT / "test-artifacts"


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"real test data missing: {p} (tests read ../shared/data beside the checkout)")
    return p


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own download/decode cache, and no mirror unless it sets one."""
    cache = tmp_path / "cnnkit-cache"
    monkeypatch.setenv("CNNKIT_DATA", str(cache))
    monkeypatch.delenv("CNNKIT_DATA_URL", raising=False)
    return cache


@pytest.fixture(autouse=True, scope="session")
def machine_cache(tmp_path_factory):
    """One machine cache for the whole session: the precision probe (hardware.py) runs at most once,
    and never writes to the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CNNKIT_MACHINE_CACHE", str(tmp_path_factory.mktemp("machine")))
    yield
    patch.undo()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_server():
    """serve(directory) -> base URL of a server on 127.0.0.1 serving that folder."""
    servers = []

    def serve(directory: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """`python -m cnnkit ARGS` in a subprocess, as a user would run it. The timeout is a safety net
    against a hung process, not a budget: a slow or busy machine must not fail a test."""
    return subprocess.run([sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`cnnkit ARGS` in this process: the same code path as the command (cli.main, its exit codes and
    output) without a new interpreter's start-up (about 1.5 s of importing torch per call). For
    tests that read output and exit codes; process boundaries (kill, Ctrl-C, import time) need run_cli."""
    import contextlib
    import io

    from cnnkit.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own usage errors and --help
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["cnnkit", *args], code, out.getvalue(), err.getvalue())


class CodePayload:
    """A pickle that, if ever unpickled, runs `touch marker`: loading code must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same test metrics and, bit for bit, the same weights."""
    import json

    import torch

    from cnnkit import load_model
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("test_accuracy", "test_loss", "test_mean_average_precision", "val_accuracy", "best_epoch"):
        assert ma.get(key) == mb.get(key), key  # test_loss: single-label; mAP: multi-label
    wa, wb = load_model(a)[0], load_model(b)[0]
    for (k, va), vb in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.fixture(scope="session")
def multi_label_run(tmp_path_factory):
    """(run folder, labels.csv) of a small multi-label model: multi-MNIST (1-3 digits on a 56x56
    canvas; benchmarks/data/multi_mnist.py) with 2,000 training and 200 test images, the multi-mnist
    recipe for 6 epochs. Learnt, not good: for tests of what comes after training."""
    from benchmarks.data.multi_mnist import write_multi_mnist
    base = tmp_path_factory.mktemp("multi-label")
    labels = write_multi_mnist(base / "data", train=2000, test=200, seed=0, data_dir=shared("mnist").parent)
    out = base / "run"
    r = run_main("train", "--data", str(labels), "--recipe", "multi-mnist", "--epochs", "6", "--out", str(out),
                 "--no-report", "--quiet")
    assert r.returncode == 0, r.stderr
    return out, labels


def write_mnist_pair(out: Path, classes=(4, 9), train: int = 1500, test: int = 400) -> Path:
    """MNIST images of two digits as PNG files plus labels.csv (path,label,split; labels digit4 and
    digit9): a two-class label file of real pixels, from the first `train` matching images of MNIST's
    training set and the first `test` of its test set."""
    import csv

    import numpy as np
    from PIL import Image

    import cnnkit
    mnist = cnnkit.load_dataset("mnist", data_dir=shared("mnist").parent, download=False, quiet=True)
    rows = []
    for split, source, count in (("train", mnist.train, train), ("test", mnist.test, test)):
        (out / split).mkdir(parents=True)
        keep = np.flatnonzero(np.isin(source.labels.numpy(), classes))[:count]
        for i in keep:
            name = f"{split}/{i:05d}.png"
            Image.fromarray(source.images[i, 0].numpy(), mode="L").save(out / name)
            rows.append((name, f"digit{int(source.labels[i])}", split))
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return out / "labels.csv"


# The binary fixture's training, and the softmax model tests train beside it: MNIST's fast network on
# 28x28, one-cycle at 0.01 for 5 epochs of 64-image batches (the last two, --task binary, dropped for softmax).
BINARY_ARGS = ["--model", "fast-mnist", "--image-size", "28", "--channels", "1", "--epochs", "5", "--batch-size",
               "64", "--lr", "0.01", "--schedule", "onecycle", "--no-report", "--quiet", "--task", "binary"]


@pytest.fixture(scope="session")
def binary_run(tmp_path_factory):
    """(run folder, labels.csv) of a binary model (--task binary: one logit, a threshold chosen on
    validation): MNIST 4 against 9 (write_mnist_pair: 1,500 training and 400 test images), about 10 s.
    Session-scoped: treat the folder as read-only."""
    base = tmp_path_factory.mktemp("binary")
    labels = write_mnist_pair(base / "data")
    out = base / "run"
    r = run_main("train", *BINARY_ARGS, "--data", str(labels), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, labels


@pytest.fixture(scope="session")
def fast_mnist_run(tmp_path_factory):
    """(run folder, metrics) of `cnnkit train --recipe fast --data mnist --seed 0 --no-report`, run as a
    user runs it (a subprocess), once a session: the fast recipe's accuracy test and compare share it."""
    import json
    out = tmp_path_factory.mktemp("fast-mnist") / "run"
    r = run_cli("train", "--recipe", "fast", "--data", "mnist", "--data-dir", str(shared()), "--seed", "0",
                "--out", str(out), "--quiet", "--json", "--no-report")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)["metrics"]
