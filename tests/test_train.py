"""Training: the run folder, resuming after a kill, Ctrl-C, and the Python API."""
from __future__ import annotations

import csv
import math
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import cnnkit
from conftest import ROOT, assert_same_run, run_cli, run_main

# A small CPU run whose epochs take a fraction of a second: digits upscaled to 16 px.
SMALL = ["--data", "digits", "--model", "seed-digits", "--image-size", "16", "--batch-size", "64", "--quiet"]


def test_cli_train_writes_a_complete_run_folder(tmp_path):
    run = tmp_path / "run"
    r = run_main("train", *SMALL, "--epochs", "3", "--out", str(run), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout holds only the JSON
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "history.csv", "curves.png", "config.json",
                                               "metrics.json", "train.log"}
    assert not (run / "checkpoint.safetensors").exists()  # removed once the run is complete
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] == result["metrics"]["test_accuracy"]
    assert metrics["test_accuracy"] > 0.8 and 0 < metrics["test_top5_accuracy"] <= 1
    # The best epoch by validation accuracy is the one kept.
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert metrics["best_epoch"] == int(best["epoch"])
    model, meta = cnnkit.load_model(run)  # a run folder works wherever a model file does
    assert meta.metrics["test_accuracy"] == metrics["test_accuracy"]
    assert meta.input.chw == (1, 16, 16)
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    s = run_main("summary", str(run), "--json")
    assert json.loads(s.stdout)["total_params"] == cnnkit.summary(model)["total_params"]


def start_training(out, epochs: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *SMALL, *extra, "--no-report", "--epochs",
                             str(epochs), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=default_sigint)


def default_sigint() -> None:
    """Ctrl-C as a user's terminal delivers it: a suite started in the background (`cmd &` in a
    non-interactive shell) ignores SIGINT, children inherit that, and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_checkpoint(proc, out, min_epoch: int = 1, timeout: float = 120) -> None:
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ckpt.exists() and (out / "history.csv").exists():
            rows = (out / "history.csv").read_text().strip().splitlines()
            if len(rows) - 1 >= min_epoch:
                return
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.stderr.read()}"
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


# Augmentation and the weight average carry random and running state across epochs: resuming must
# restore both (the per-epoch augmentation seed, the average's weights and step count).
AUGMENTED = ["--augment", "standard", "--ema", "0.9", "--schedule", "onecycle"]


@pytest.mark.slow  # a killed process and two runs (13 s): in the full suite, out of the fast subset
@pytest.mark.parametrize("task", ["single-label", "multi-label", "binary"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, task, request):
    """Bit for bit, for every task: digits, digits' classes as one-label sets (multi-label), and the
    binary fixture's two MNIST digits (one logit)."""
    epochs = 6  # killed after epoch 2 or 3: room on either side
    extra = [*AUGMENTED, "--task", task]
    if task == "binary":
        extra += ["--data", str(request.getfixturevalue("binary_run")[1]), "--channels", "1"]
    whole = tmp_path / "whole"
    r = run_cli("train", *SMALL, *extra, "--no-report", "--epochs", str(epochs), "--out", str(whole))
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    proc = start_training(killed, epochs, *extra)
    wait_for_checkpoint(proc, killed, min_epoch=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    done = len((killed / "history.csv").read_text().strip().splitlines()) - 1
    assert 2 <= done < epochs

    r = run_cli("train", "--resume", str(killed), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_run(whole, killed)


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start_training(out, 40)
    wait_for_checkpoint(proc, out, min_epoch=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and f"--resume {out}" in err
    assert (out / "checkpoint.safetensors").exists() and (out / "model.safetensors").exists()
    cnnkit.load_model(out)  # the best model so far is a valid model file


def test_resume_of_a_finished_or_missing_run_is_refused(tmp_path):
    r = run_main("train", "--resume", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "config.json" in r.stderr
    run = tmp_path / "run"
    assert run_main("train", *SMALL, "--no-report", "--epochs", "1", "--out", str(run)).returncode == 0
    r = run_main("train", "--resume", str(run))
    assert r.returncode != 0 and "already complete" in r.stderr
    r = run_main("train", *SMALL, "--epochs", "1", "--out", str(run))
    assert r.returncode != 0 and "already holds a run" in r.stderr


def test_python_api_mirrors_the_cli(tmp_path):
    ds = cnnkit.load_dataset("digits")
    assert ds.train.images.dtype == torch.uint8 and ds.num_classes == 10
    cfg = cnnkit.TrainConfig(data="digits", model="linear", epochs=15, out=str(tmp_path / "run"), report=False)
    result = cnnkit.train(cfg, quiet=True)
    assert isinstance(result.model, torch.nn.Module) and result.metrics["test_accuracy"] > 0.8
    model, meta = cnnkit.load_model(result.run_dir / "model.safetensors")
    logits = cnnkit.predict_logits(model, result.dataset.test.images, cnnkit.Preprocess.from_info(meta))
    acc = (logits.argmax(1) == result.dataset.test.labels).float().mean().item()
    assert acc == pytest.approx(result.metrics["test_accuracy"])


def test_bf16_and_fp32_both_learn(tmp_path):
    accs = {}
    for precision in ("fp32", "bf16"):
        r = cnnkit.train(cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=4, precision=precision,
                                            out=str(tmp_path / precision), report=False), quiet=True)
        accs[precision] = r.metrics["test_accuracy"]
    assert min(accs.values()) > 0.9 and abs(accs["fp32"] - accs["bf16"]) < 0.03


def test_checkpoint_round_trip_continues_bit_exactly(tmp_path):
    """Weights and optimizer state restored from a checkpoint give the very same next steps, also for
    channels-last conv weights under fused Adam (whose CPU kernel needs state and parameter strides
    to agree)."""
    from cnnkit.runfolder import load_checkpoint, save_checkpoint
    from cnnkit.training import make_optimizer

    def fresh():
        torch.manual_seed(0)
        m = cnnkit.build_model("seed-digits", 10).to(memory_format=torch.channels_last)
        return m, make_optimizer(cnnkit.TrainConfig(optimizer="adam"), m)

    x, y = torch.randn(16, 1, 8, 8).contiguous(memory_format=torch.channels_last), torch.arange(16) % 10

    def step(m, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    a, opt_a = fresh()
    for _ in range(3):
        step(a, opt_a)
    save_checkpoint(tmp_path / "ck.safetensors", a, opt_a, {"epoch": 1})
    b, opt_b = fresh()
    assert load_checkpoint(tmp_path / "ck.safetensors", b, opt_b)["epoch"] == 1
    for i in range(3):
        torch.manual_seed(i)  # the same dropout masks for both
        step(a, opt_a)
        torch.manual_seed(i)
        step(b, opt_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.slow  # a killed process and two transfer runs (10 s)
def test_fine_tune_run_resumed_after_kill_equals_uninterrupted(tmp_path):
    """Two phases (frozen head, then everything at per-group rates) survive a kill between or within them."""
    args = [*SMALL, "--no-report", "--freeze-backbone", "--fine-tune", "--epochs", "3", "--fine-tune-epochs", "3"]
    whole = tmp_path / "whole"
    assert run_cli("train", *args, "--out", str(whole)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *args, "--out", str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for_checkpoint(proc, killed, min_epoch=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_cli("train", "--resume", str(killed), "--quiet")
    assert r.returncode == 0, r.stderr
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert (a["test_loss"], a["best_epoch"]) == (b["test_loss"], b["best_epoch"])


def test_progress_off_a_terminal_is_a_few_plain_lines(tmp_path):
    """Issue 10: with stderr a pipe (CI logs, `2> file`), no carriage-return bar updates: the epoch
    lines, and at most one progress line per PROGRESS_LINE_SECONDS of a long epoch."""
    args = [a for a in SMALL if a != "--quiet"]
    r = run_main("train", *args, "--epochs", "3", "--no-report", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "\r" not in out and "\x1b[" not in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and len(out.splitlines()) < 60


def test_line_progress_prints_whole_lines_at_its_interval(monkeypatch):
    import io

    from cnnkit import utils
    buf = io.StringIO()
    bar = utils.LineProgress(100, "epoch 1/2", "step", buf)
    for _ in range(50):
        bar.update(1)
    assert buf.getvalue() == ""  # less than PROGRESS_LINE_SECONDS: nothing
    monkeypatch.setattr(utils, "PROGRESS_LINE_SECONDS", 0.0)
    bar.set_postfix(loss="0.1234")
    bar.update(1)
    assert buf.getvalue() == "epoch 1/2: 51/100 step loss 0.1234\n"


def test_dry_run_goes_through_the_whole_pipeline_on_one_batch_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = run_main("train", *SMALL, "--augment", "light", "--dry-run", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["images"] == {"train": 64, "val": 64, "test": 64} and result["steps"] == 1
    assert all(math.isfinite(v) for v in result["train_loss"])
    assert {"model.safetensors", "metrics.json", "report.html", "config.json"} <= set(result["would_write"])
    assert not out.exists()  # nothing where --out points, and the temporary folder is gone
    assert not list(Path(tempfile.gettempdir()).glob("cnnkit-dry-run-*"))
    # a config that fails at the first forward pass fails the dry run the same way, in one line
    bad = run_main("train", "--data", "digits", "--model", "alexnet", "--image-size", "8", "--dry-run")
    assert (bad.returncode == 2 and "Traceback" not in bad.stderr
            and len(bad.stderr.strip().splitlines()) == 1), bad.stderr
    r = run_main("train", "--resume", str(tmp_path), "--dry-run")
    assert r.returncode == 2 and "--dry-run" in r.stderr
