"""Hardening: a diverging run, everyday filesystem faults, model files that lie, and the small
messages, each as a user meets them (the command's exit code and its one line)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cnnkit import CnnkitError, build_model, load_model, read_info, save_model
from cnnkit.models.registry import architecture_record
from conftest import run_main
from test_train import SMALL, start_training, wait_for_checkpoint

META = {"class_names": [str(i) for i in range(10)], "input": {"channels": 1, "height": 16, "width": 16},
        "preprocessing": {"mean": [0.5], "std": [0.25], "scale": 255, "resize": "shorter-side-center-crop"}}


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit 2 and one 'cnnkit: error:' line holding every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cnnkit:")]
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error:"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def killed_run(out, epochs_done: int, also: str | None = None):
    """A 40-epoch run killed (SIGKILL) once at least epochs_done epochs are in its history, and the
    file `also` (if given) exists."""
    proc = start_training(out, 40)
    wait_for_checkpoint(proc, out, min_epoch=epochs_done)
    deadline = time.time() + 120
    while also and not (out / also).exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return out


def digit_png(path) -> str:
    from sklearn.datasets import load_digits
    img = (load_digits().images[0] * (255 / 16)).astype(np.uint8)
    Image.fromarray(img).resize((16, 16)).save(path)
    return str(path)


def model_file(path, meta_changes: dict | None = None, tensors_change=None, spec: str = "seed-digits"):
    """A seed-digits model file on 16x16 digits, its metadata and tensors changed as asked, written
    with safetensors directly (save_model would refuse some of these)."""
    torch.manual_seed(0)
    model = build_model(spec, 10, in_channels=1, image_size=16)
    meta = {"format": "cnnkit-model", "format_version": 1, "cnnkit_version": "0", **META,
            "architecture": architecture_record(model)}
    for key, value in (meta_changes or {}).items():
        meta[key] = value
    tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if tensors_change:
        tensors_change(tensors)
    save_file(tensors, path, metadata={"cnnkit": json.dumps(meta)})
    return path


# ----------------------------------------------------------------------------- 1. divergence
def test_a_diverging_run_stops_in_one_line_and_writes_no_nan_model(tmp_path):
    out = tmp_path / "nan"
    r = run_main("train", *SMALL, "--epochs", "2", "--no-report", "--lr", "1e308", "--out", str(out))
    line = one_line_error(r, "training diverged at step", "of epoch 1", "the loss became nan", "--lr",
                          "no model file was written")
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    assert line.removeprefix("cnnkit: error: ") in (out / "train.log").read_text()  # the log says it too


@pytest.mark.slow  # a killed run and a resumed one (8 s)
def test_divergence_after_a_good_epoch_keeps_the_best_model_and_its_checkpoint(tmp_path):
    out = killed_run(tmp_path / "run", epochs_done=1)
    done = len((out / "history.csv").read_text().strip().splitlines()) - 1
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    config = json.loads((out / "config.json").read_text())
    config["lr"] = 1e308  # the rest of the run diverges at once
    (out / "config.json").write_text(json.dumps(config))
    r = run_main("train", "--resume", str(out))
    one_line_error(r, f"of epoch {done + 1}", "the best model so far (epoch", f"checkpoint after epoch {done} is kept")
    model, _ = load_model(out)  # the best model so far: finite, loadable
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before  # nothing overwritten


def test_non_finite_weights_are_never_written_nor_loaded(tmp_path):
    def poison(tensors):  # one nan in the first layer's weights, as a diverged step leaves them
        next(v for v in tensors.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    path = model_file(tmp_path / "nan.safetensors", tensors_change=poison)
    with pytest.raises(CnnkitError, match="non-finite weights"):
        load_model(path)
    one_line_error(run_main("predict", str(path), digit_png(tmp_path / "d.png")), "non-finite weights", "diverged")
    model = build_model("seed-digits", 10, in_channels=1, image_size=16)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CnnkitError, match="refusing to write"):
        save_model(tmp_path / "inf.safetensors", model, {**META, "architecture": architecture_record(model)})
    assert not (tmp_path / "inf.safetensors").exists()


# ----------------------------------------------------------------------------- 2. filesystem faults
def test_out_naming_a_file_or_a_path_below_one_is_refused_before_any_work(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(run_main("train", *SMALL, "--epochs", "1", "--out", str(a_file)), str(a_file), "is a file")
    one_line_error(run_main("train", *SMALL, "--epochs", "1", "--out", str(a_file / "run")),
                   "is a file, so no folder can be made below it")


def unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.slow  # three runs in a mount namespace (9 s)
@pytest.mark.skipif(not unshare_works(),
                    reason="needs `unshare -rm` to mount a tmpfs as a user (root ignores permissions)")
def test_read_only_and_full_disks_are_one_line_errors(tmp_path):
    """A read-only tmpfs and a 48 KB one, mounted in a private mount namespace (root ignores
    permissions, so a chmod would prove nothing)."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    images = tmp_path / "images"  # a folder dataset: decoding it writes cnnkit's cache
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(images / c / f"{i}.png")
    train = f"{sys.executable} -m cnnkit train {' '.join(SMALL)} --epochs 1 --no-report"
    script = (f"mount -t tmpfs -o ro none {ro} && mount -t tmpfs -o size=48k none {full} && "
              f"{{ {train} --out {ro}/run; echo rc=$?; {train} --out {full}/run; echo rc=$?; "
              f"CNNKIT_DATA={ro}/cache {sys.executable} -m cnnkit train --data {images} --model seed-digits --epochs 1 "
              f"--no-report --out {tmp_path}/folder-run; echo rc=$?; }}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.stdout.count("rc=2") == 3, (r.stdout, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("cnnkit:")]
    assert len(errors) == 3 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert "read-only file system" in errors[0] and str(ro) in errors[0]
    assert "the disk is full" in errors[1] and str(full) in errors[1]
    assert "read-only" in errors[2] and f"{ro}/cache" in errors[2] and "CNNKIT_DATA" in errors[2]


@pytest.mark.slow  # over 7 s: the fast subset (-m 'not slow') stays under 3 minutes
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_says_how_to_start_again(tmp_path):
    out = killed_run(tmp_path / "run", epochs_done=2, also="checkpoint-previous.safetensors")
    ckpt, prev = out / "checkpoint.safetensors", out / "checkpoint-previous.safetensors"
    assert prev.exists()  # the one before is kept until a newer one is complete
    if not ckpt.exists():  # killed between the two renames of a checkpoint write: rare, and also resumable
        shutil.copy(prev, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as by a full disk or a bad copy
    damaged_prev = prev.read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    done = len((out / "history.csv").read_text().strip().splitlines()) - 1
    cfg["epochs"] = done + 1  # finish soon: the resumed run continues to the config's end
    (out / "config.json").write_text(json.dumps(cfg))
    old_umask = os.umask(0o022)
    try:
        r = run_main("train", "--resume", str(out))
    finally:
        os.umask(old_umask)
    assert r.returncode == 0, r.stderr
    # Model files get the mode the umask gives (safetensors alone writes 0600): a server under
    # another account can read them.
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert ("checkpoint.safetensors is damaged" in r.stdout
            and "resuming from checkpoint-previous.safetensors" in r.stdout)
    assert (out / "metrics.json").exists() and not ckpt.exists() and not prev.exists()

    # Both damaged: one line that says so and how to start again.
    out2 = tmp_path / "run2"
    shutil.copytree(out, out2)
    (out2 / "metrics.json").unlink()
    (out2 / "checkpoint.safetensors").write_bytes(damaged_prev[:500])
    (out2 / "checkpoint-previous.safetensors").write_bytes(b"\0" * 64)
    one_line_error(run_main("train", "--resume", str(out2)), "damaged", "no earlier checkpoint is intact",
                   f"--config {out2}/config.json")
    # No checkpoint at all while the history has epochs: not "stopped before its first epoch ended".
    for f in out2.glob("checkpoint*"):
        f.unlink()
    one_line_error(run_main("train", "--resume", str(out2)), f"missing although its history has {done + 1} epoch(s)")


# ----------------------------------------------------------------------------- 3. metadata that lies
def test_model_files_whose_metadata_lies_are_refused_before_anything_is_allocated(tmp_path):
    image = digit_png(tmp_path / "d.png")
    arch = architecture_record(build_model("seed-digits", 10, in_channels=1, image_size=16))
    huge = json.loads(json.dumps(arch))
    huge["spec"]["layers"][0]["conv"]["filters"] = 10**12
    three = dict(arch, in_channels=3)
    cases = {
        "five names for ten outputs": ({"class_names": list("abcde")},
                                       "lists 5 class names for a model with 10 outputs"),
        "three channels for a one-channel net": ({"input": {"channels": 3, "height": 16, "width": 16}},
                                                 "declares 3-channel input, but its first layer takes 1"),
        "10^12 filters": ({"architecture": huge}, "declares layers.0"),
        "a record with three channels": ({"architecture": three}, "of shape"),
        "an input too large for memory": ({"input": {"channels": 1, "height": 16384, "width": 16384}},
                                          "of memory to run one image"),
        "an absurd input": ({"input": {"channels": 1, "height": 10**9, "width": 10**9}}, "larger than cnnkit reads"),
    }
    for name, (change, message) in cases.items():
        path = model_file(tmp_path / f"{len(name)}.safetensors", change)
        with pytest.raises(CnnkitError) as e:
            load_model(path)
        assert message in str(e.value), (name, str(e.value))
        one_line_error(run_main("predict", str(path), image), message)
    read_info(model_file(tmp_path / "fine.safetensors"))
    load_model(tmp_path / "fine.safetensors")  # the unchanged file loads


def test_an_image_size_that_cannot_fit_in_memory_is_refused_naming_one_that_can(tmp_path):
    r = run_main("train", *[a for a in SMALL if a not in ("--image-size", "16")], "--image-size", "100000",
                 "--epochs", "1", "--out", str(tmp_path / "big"))
    line = one_line_error(r, "--image-size 100000 needs about", "of memory", "use --image-size")
    fits = int(line.split("use --image-size ")[1].split()[0])
    assert 16 <= fits < 100000
    assert not (tmp_path / "big").exists()


# ----------------------------------------------------------------------------- 6. smaller messages
def test_folder_data_messages(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("ants", "bees"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "wasps").mkdir()  # an empty class folder
    os.symlink("loop-b.png", root / "ants" / "loop-a.png")  # a symbolic link loop
    os.symlink("loop-a.png", root / "ants" / "loop-b.png")
    r = run_main("train", "--data", str(root), "--model", "seed-digits", "--epochs", "1", "--no-report",
                 "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "1 class folder(s) hold no images" in r.stdout and "wasps" in r.stdout
    assert "loop-a.png: a symbolic link loop" in r.stdout
    one_line_error(run_main("train", "--data", str(tmp_path / "missing" / "path"), "--epochs", "1"),
                   "no such folder:", "missing/path")
    assert "%%" not in run_main("export", "--help").stdout
