"""`cnnkit lr-find` and `--lr auto` (training/lr_find.py): the sweep puts the model back bit for bit, its
lrs rise exponentially and it stops when the loss diverges, its suggestions are fastai's (checked against
fastai 2.7's own functions, written out below), and the commands around it. On digits with seed-digits
(BatchNorm and dropout): a sweep of 10-30 steps takes 1-5 s on 2 CPU cores."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from cnnkit.config import TrainConfig
from cnnkit.training import load_data_and_model, setup
from cnnkit.training import lr_find as L
from cnnkit.runfolder import RunFolder
from conftest import run_main


# ----------------------------------------------------------------------------- fastai 2.7, as it reads
# fastai/callback/schedule.py (valley, steep, and lr_find's slicing), with its tensors: the reference.
def fastai_valley(lrs, losses, num_it):
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def fastai_steep(lrs, losses, num_it):
    grads = (losses[1:] - losses[:-1]) / (lrs[1:].log() - lrs[:-1].log())
    return lrs[grads.argmin()].item()


def fastai_suggestions(lrs, losses, num_it):
    lrs, losses = torch.tensor(lrs[num_it // 10:-5]), torch.tensor(losses[num_it // 10:-5])
    return fastai_valley(lrs, losses, num_it), fastai_steep(lrs, losses, num_it)


def session(tmp_path, **fields):
    cfg = TrainConfig(data="digits", precision="fp32", **fields).validate()
    ds, model = load_data_and_model(cfg, quiet=True)
    return setup(cfg, ds, model, RunFolder(tmp_path / "run", primary=False, quiet=True))


# ----------------------------------------------------------------------------- the sweep
@pytest.mark.slow  # a few seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_the_sweep_restores_weights_buffers_optimizer_state_and_rng_bit_for_bit(tmp_path):
    s = session(tmp_path, batch_size=64)
    # a step first, so that Adam has state (moments, step counts) to put back, and BatchNorm statistics moved
    settings = L.dataclasses.replace(L.epoch_settings(s, 1, 21, None), after_step=None)
    L.train_step(s.model, s.optimizer, s.ds.train.images, s.ds.train.labels, torch.arange(64), 1e-3, settings)
    s.model.eval()  # a mode the sweep changes, to be put back too
    torch.manual_seed(123)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    opt_before = L.copy.deepcopy(s.optimizer.state_dict())
    rng_before = torch.get_rng_state()
    params = list(s.model.parameters())

    sw = L.sweep(s, steps=12, start_lr=1e-6, end_lr=1e-2)  # too low to diverge: every step

    after = s.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # weights and BatchNorm buffers
    assert any("num_batches_tracked" in k for k in before)
    opt_after = s.optimizer.state_dict()
    assert opt_after["param_groups"] == opt_before["param_groups"]  # lr and every hyperparameter
    assert opt_after["state"].keys() == opt_before["state"].keys() and opt_before["state"]
    for i, state in opt_before["state"].items():
        assert state.keys() == opt_after["state"][i].keys()
        assert all(torch.equal(v, opt_after["state"][i][k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not s.model.training and all(p.grad is None for p in s.model.parameters())
    assert all(a is b for a, b in zip(params, s.model.parameters()))  # the optimizer still holds the model's

    # the lrs: exponential from start to end; the smoothed loss: fastai's bias-corrected moving average
    assert sw.stopped == "end" and len(sw.lrs) == 12
    assert sw.lrs[0] == 1e-6 and sw.lrs[-1] == pytest.approx(1e-2, rel=1e-12)
    assert all(b / a == pytest.approx(1e4 ** (1 / 11), rel=1e-9) for a, b in zip(sw.lrs, sw.lrs[1:]))
    avg = 0.0
    for i, (raw, smooth) in enumerate(zip(sw.raw_losses, sw.losses)):
        avg = 0.98 * avg + 0.02 * raw
        assert smooth == pytest.approx(avg / (1 - 0.98 ** (i + 1)), rel=1e-12)
    # the same sweep again, from what was put back (weights, Adam's state, dropout's RNG), repeats every loss;
    # without the restore the steps do move the weights
    assert L.sweep(s, steps=12, start_lr=1e-6, end_lr=1e-2).raw_losses == sw.raw_losses
    L.run_sweep(s, 12, 1e-6, 1e-2)
    assert not all(torch.equal(s.model.state_dict()[k], before[k]) for k in before)


def test_a_diverging_loss_stops_the_sweep(tmp_path):
    s = session(tmp_path, batch_size=64)
    wild = L.sweep(s, steps=40, start_lr=1e-2, end_lr=1e6)  # Adam far past any lr that trains
    assert len(wild.lrs) < 40 and wild.stopped in ("diverged", "non-finite")
    assert all(math.isfinite(v) for v in wild.losses)
    if wild.stopped == "diverged":  # fastai's stop_div: the last point is the first over 4x the best so far
        assert wild.losses[-1] > 4 * min(wild.losses)
        assert all(v <= 4 * min(wild.losses[:i + 1]) for i, v in enumerate(wild.losses[:-1]))


def test_groups_with_an_lr_scale_step_at_their_multiple_of_the_sweeps_lr(tmp_path):
    s = session(tmp_path, optimizer="sgd", bias_lr_factor=64.0, batch_size=32)  # fast-cifar10's bias scaler
    settings = L.dataclasses.replace(L.epoch_settings(s, 1, 41, None), after_step=None)
    L.train_step(s.model, s.optimizer, s.ds.train.images, s.ds.train.labels, torch.arange(32), 0.01, settings)
    assert sorted(g["lr"] for g in s.optimizer.param_groups) == [0.01, 0.64]


def test_a_mixed_batch_sweep_runs_and_is_restored(tmp_path):
    s = session(tmp_path, batch_size=64, mixup=0.4, cutmix=1.0)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    sw = L.sweep(s, steps=10, start_lr=1e-5, end_lr=1e-2)
    assert len(sw.lrs) == 10 and all(math.isfinite(v) for v in sw.losses)
    assert all(torch.equal(s.model.state_dict()[k], before[k]) for k in before)


# ----------------------------------------------------------------------------- the suggestion functions
def test_valley_and_steep_by_hand():
    losses = [3, 5, 4, 3, 2, 1, 0.5, 2, 6]
    # the longest decreasing run is 3 (or 5), 4, 3, 2, 1, 0.5: 6 points ending at 6, so fastai's start is 0,
    # a third of 6 is 2 and a sixth 1: index 3
    assert L.valley_index(losses) == 3
    lrs = [10.0 ** k for k in range(len(losses))]  # even steps in log lr: the steepest fall is the first -1
    assert L.steep_index(lrs, losses) == 1


@pytest.mark.slow  # seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_the_suggestions_are_fastais_on_made_up_curves():
    rng = random.Random(0)
    checked = 0
    for trial in range(40):
        n = rng.choice([50, 100, 200])
        lrs = [1e-7 * (1e8) ** (i / (n - 1)) for i in range(n)]
        bottom = rng.uniform(0.4, 0.8)
        # flat, then a fall, then the blow-up past the bottom, with noise
        losses = [2.3 - 1.5 / (1 + math.exp(-(i / n - bottom + 0.2) * 20)) + 8 * max(0.0, i / n - bottom) ** 2
                  + rng.gauss(0, 0.02) for i in range(n)]
        reference = fastai_suggestions(lrs, losses, n)
        assert L.suggest(lrs, losses, n)[:2] == pytest.approx(reference, rel=1e-6), trial
        checked += 1
    assert checked == 40


def test_a_sweep_that_stopped_at_once_has_no_suggestion():
    with pytest.raises(L.CnnkitError, match="--start-lr"):
        L.suggest([1e-7, 1e-6], [2.3, 50.0], 100)


# ----------------------------------------------------------------------------- the commands
@pytest.mark.slow  # a few seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_the_command_prints_the_suggestion_and_draws_the_curve(tmp_path):
    from PIL import Image
    picture = tmp_path / "sweep.png"
    r = run_main("lr-find", "--data", "digits", "--steps", "30", "--precision", "fp32", "--picture", str(picture))
    assert r.returncode == 0, r.stderr
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.size[0] > 300
    line = next(x for x in r.stdout.splitlines() if x.startswith("suggested lr "))
    assert "minimum" in line and "valley" in line and "steep" in line and str(picture) in line
    lines = r.stdout.splitlines()
    top = next(i for i, x in enumerate(lines) if x.endswith("|") or "|" in x)
    plot = lines[top:top + 15]  # 12 rows of 60 columns, the axis, its labels, the suggestion's mark
    assert all(len(x) == 10 + 60 for x in plot[:13]) and "*" in "".join(plot[:12])
    assert "lr (log scale)" in plot[13] and plot[14].strip().startswith("^ minimum")


@pytest.mark.slow  # 12-26 s on 2 shared cores: two 30-step sweeps and a 1-epoch run
def test_train_lr_auto_trains_at_lr_finds_suggestion_and_saves_it(tmp_path, monkeypatch):
    from cnnkit.modelfile import load_model
    monkeypatch.setattr(L, "STEPS", 30)  # train's sweep, shortened for the test
    r = run_main("lr-find", "--data", "digits", "--steps", "30", "--precision", "fp32", "--picture",
                 str(tmp_path / "p.png"), "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert found["method"] == "minimum" and found["suggestion"] == found["minimum"]
    assert len(found["lrs"]) == len(found["losses"]) == found["steps_run"] and found["steps"] == 30
    losses, lrs = found["losses"], found["lrs"]
    lowest = min(range(len(losses[3:-5])), key=losses[3:-5].__getitem__) + 3  # suggest's slice: steps // 10, last 5
    assert found["minimum"] == pytest.approx(lrs[lowest] / 3)  # the lowest smoothed loss's lr, over 3
    at = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / found["minimum"])))
    assert losses[at] < losses[0]  # the suggestion lies where the loss has fallen from the start ...
    assert min(losses[at:]) < losses[at]  # ... and is still falling: short of the bottom

    run = tmp_path / "run"
    r = run_main("train", "--data", "digits", "--epochs", "1", "--lr", "auto", "--precision", "fp32", "--out", str(run),
                 "--no-report")
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == found["suggestion"] and config["lr_find"] is False  # the same sweep, on CPU
    _, info = load_model(run / "model.safetensors")
    assert info.training["lr"] == found["suggestion"]
    assert info.training["lr_find_sweep"]["suggestion"] == found["suggestion"]
    assert f"lr-find: adam lr {found['suggestion']:.3g} (minimum" in (run / "train.log").read_text()
    # the saved config trains again without a sweep
    assert TrainConfig.from_file(run / "config.json").lr_find is False


@pytest.mark.slow  # seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_lr_auto_in_a_config_file_and_its_refusals(tmp_path):
    (tmp_path / "auto.yaml").write_text("data: digits\nlr: auto\n")
    cfg = TrainConfig.from_file(tmp_path / "auto.yaml")
    assert cfg.lr_find and cfg.lr == TrainConfig().lr
    for args, says in ((("lr-find", "--steps", "0"), "--steps must be"),
                       (("lr-find", "--start-lr", "1", "--end-lr", "0.1"), "--start-lr (1) must be below --end-lr"),
                       (("lr-find", "--end-lr", "nan"), "--end-lr must be a positive finite number"),
                       (("lr-find", "--model", "svm"), "has no learning rate"),
                       (("lr-find", "--teacher", "fast"), "lr-find takes a finished one"),
                       (("train", "--lr", "auto", "--resume", str(tmp_path / "run")), "drop --lr"),
                       (("train", "--lr", "auto", "--model", "svm"), "--lr auto sweeps a CNN's learning rate"),
                       (("train", "--lr", "fast"), "must be a number or auto")):
        r = run_main(*args, "--picture", str(tmp_path / "p.png")) if args[0] == "lr-find" else run_main(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert says in r.stderr.strip().splitlines()[-1], (args, r.stderr)  # one line (argparse's: after its usage)
    assert not (tmp_path / "p.png").exists()


def test_the_cli_defaults_are_the_librarys():
    from cnnkit.cli import lr_find as cli
    assert (cli.START_LR, cli.END_LR, cli.STEPS) == (L.START_LR, L.END_LR, L.STEPS)
