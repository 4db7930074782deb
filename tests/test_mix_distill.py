"""MixUp / CutMix (training/mix.py) and knowledge distillation (training/distill.py): the draws, the
label weights, the losses against PyTorch's soft-target losses, and training runs on `digits`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cnnkit.modelfile import load_model, read_info, save_model
from cnnkit.training.distill import soft_loss, to_input
from cnnkit.training.epoch import EpochSettings, training_loss
from cnnkit.training.mix import Mix, Mixed, beta, cutmix

from conftest import run_main


def settings(task="single-label", **kw) -> EpochSettings:
    return EpochSettings(batch_size=8, lr_fn=lambda i: 0.1, preprocess=None, task=task, **kw)


def test_beta_draws_follow_the_beta_distribution():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.2, 1.0):
        draws = [beta(alpha, g) for _ in range(4000)]
        assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 0.01


def test_mixup_with_alpha_to_zero_is_the_identity():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    mixed, draw = Mix(mixup=1e-6)(x, torch.Generator().manual_seed(1))
    assert draw.lam == 1.0 and draw.kind == "mixup"
    assert torch.equal(mixed, x.float())
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    plain = training_loss(logits, y, settings(label_smoothing=0.1), None, None)
    assert torch.equal(training_loss(logits, y, settings(label_smoothing=0.1), draw, None), plain)


def test_mixup_blends_pixels_by_its_weight():
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    mixed, draw = Mix(mixup=0.4)(x, torch.Generator().manual_seed(3))
    assert 0.5 <= draw.lam < 1
    torch.testing.assert_close(mixed, draw.lam * x.float() + (1 - draw.lam) * x[draw.partner].float())


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_label_weight_is_the_pasted_area_exactly(seed):
    n, h, w = 12, 13, 10  # odd sizes: the box is clipped and rounded
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, h, w).contiguous()  # image i is all i
    g = torch.Generator().manual_seed(seed)
    partner = torch.randperm(n, generator=g)
    out, draw = cutmix(x, partner, beta(1.0, g), g)
    moved = partner != torch.arange(n)
    assert moved.any()
    pasted = (out[moved] != x[moved]).double().mean().item()  # the share of pixels that came from the partner
    assert pasted == pytest.approx(1 - draw.lam, abs=1e-12)
    assert torch.equal(out[moved][out[moved] != x[moved]], x[partner][moved][out[moved] != x[moved]])


def test_mix_switch_and_prob():
    x = torch.zeros(8, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    kinds = [Mix(mixup=1.0, cutmix=1.0, switch_prob=0.3)(x, g)[1].kind for _ in range(600)]
    assert kinds.count("cutmix") / 600 == pytest.approx(0.3, abs=0.06)
    draws = [Mix(mixup=1.0, prob=0.25)(x, g)[1] for _ in range(600)]
    assert sum(d is not None for d in draws) / 600 == pytest.approx(0.25, abs=0.06)
    assert not Mix().active and not Mix(mixup=1.0, prob=0).active


@pytest.mark.parametrize("task", ["single-label", "binary", "multi-label"])
def test_mixed_loss_equals_the_loss_on_blended_targets(task):
    """Label-aware mixing: lam * loss(y) + (1 - lam) * loss(y[partner]) against PyTorch's own losses
    on the blended (and smoothed) targets."""
    torch.manual_seed(0)
    n, k, e = 8, 5, 0.1
    partner, lam = torch.randperm(n), 0.7
    draw = Mixed(partner, lam, "cutmix")
    if task == "single-label":
        logits, y = torch.randn(n, k), torch.randint(0, k, (n,))
        target = lam * F.one_hot(y, k).float() + (1 - lam) * F.one_hot(y[partner], k).float()
        want = F.cross_entropy(logits, target, label_smoothing=e)
    elif task == "binary":
        logits, y = torch.randn(n, 1), torch.randint(0, 2, (n,))
        target = lam * y.float() + (1 - lam) * y[partner].float()
        want = F.binary_cross_entropy_with_logits(logits[:, 0], target * (1 - e) + e / 2)
    else:
        logits, y = torch.randn(n, k), torch.randint(0, 2, (n, k)).float()
        e = 0.0
        want = F.binary_cross_entropy_with_logits(logits, lam * y + (1 - lam) * y[partner])
    got = training_loss(logits, y, settings(task, label_smoothing=e), draw, None)
    torch.testing.assert_close(got, want)


def test_mixed_loss_with_class_weights():
    """--balance weights: cross_entropy's weighted mean divides by the sum of w[y], which mixing
    leaves unchanged (the partners are a permutation), so the mixed loss is PyTorch's weighted
    soft-target loss times N / sum(w[y])."""
    torch.manual_seed(1)
    n, k = 8, 4
    logits, y, w = torch.randn(n, k), torch.randint(0, k, (n,)), torch.rand(k) + 0.5
    partner, lam = torch.randperm(n), 0.6
    target = lam * F.one_hot(y, k).float() + (1 - lam) * F.one_hot(y[partner], k).float()
    want = F.cross_entropy(logits, target, weight=w) * n / w[y].sum()
    got = training_loss(logits, y, settings(class_weight=w), Mixed(partner, lam, "mixup"), None)
    torch.testing.assert_close(got, want)


def test_soft_loss_is_t_squared_kl_to_the_softened_teacher():
    torch.manual_seed(0)
    s, t, temp = torch.randn(6, 4), torch.randn(6, 4) * 3, 2.5
    p, q = (t / temp).softmax(1).double().numpy(), (s / temp).softmax(1).double().numpy()
    want = temp ** 2 * np.mean([stats.entropy(p[i], q[i]) for i in range(6)])  # scipy's KL(p || q)
    assert soft_loss(s, t, temp, "single-label").item() == pytest.approx(want, rel=1e-5)
    assert soft_loss(t, t, temp, "single-label").item() == pytest.approx(0, abs=1e-6)
    pm = torch.sigmoid(t / temp).double().numpy()
    qm = torch.sigmoid(s / temp).double().numpy()
    kl = pm * np.log(pm / qm) + (1 - pm) * np.log((1 - pm) / (1 - qm))
    assert soft_loss(s, t, temp, "multi-label").item() == pytest.approx(temp ** 2 * kl.mean(), rel=1e-4)


def test_teacher_input_conversion():
    grey = torch.rand(2, 1, 8, 8) * 255
    rgb = to_input(grey, (3, 8, 8))
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], grey[:, 0]) and torch.equal(rgb[:, 2], grey[:, 0])
    torch.testing.assert_close(to_input(rgb, (1, 8, 8)), grey)  # luma of three equal channels
    flat = torch.full((1, 3, 8, 8), 77.0)
    assert to_input(flat, (3, 20, 20)).shape == (1, 3, 20, 20)
    torch.testing.assert_close(to_input(flat, (3, 20, 20)), torch.full((1, 3, 20, 20), 77.0))
    torch.testing.assert_close(to_input(flat, (3, 4, 4)), torch.full((1, 3, 4, 4), 77.0))


@pytest.mark.slow  # seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_mix_and_distillation_options_refused_where_they_cannot_work(tmp_path):
    r = run_main("train", "--data", "digits", "--model", "svm", "--mixup", "0.2", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--mixup" in r.stderr and "Traceback" not in r.stderr
    r = run_main("train", "--data", "digits", "--mix-from-epoch", "3", "--mix-off-epoch", "2", "--cutmix", "1",
                 "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "--mix-off-epoch" in r.stderr
    r = run_main("train", "--data", "digits", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "no model file" in r.stderr
    assert not (tmp_path / "b").exists()  # refused before the run folder is made
    r = run_main("train", "--data", "digits", "--teacher", "fast", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "--teacher fast: no recipe" in r.stderr and "Traceback" not in r.stderr
    r = run_main("label-issues", "--data", "digits", "--lr", "auto", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "--lr NUMBER" in r.stderr


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    r = run_main("train", "--data", "digits", "--epochs", "2", "--no-report", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def train_digits(out, *flags) -> dict:
    r = run_main("train", "--data", "digits", "--epochs", "2", "--no-report", "--quiet", "--precision", "fp32",
                 "--augment", "light", "--out", str(out), *flags)
    assert r.returncode == 0, r.stderr
    return dict(load_model(out)[0].state_dict())


@pytest.mark.slow  # trains on digits: seconds each, beyond the fast subset's budget
def test_distillation_with_alpha_zero_is_plain_training(tmp_path, digits_teacher):
    plain = train_digits(tmp_path / "plain")
    taught = train_digits(tmp_path / "kd0", "--teacher", str(digits_teacher), "--kd-alpha", "0")
    assert all(torch.equal(plain[k], taught[k]) for k in plain)
    moved = train_digits(tmp_path / "kd", "--teacher", str(digits_teacher), "--kd-alpha", "0.7")
    assert not all(torch.equal(plain[k], moved[k]) for k in plain)  # the teacher's term is really trained on
    record = read_info(tmp_path / "kd").distillation
    teacher_info = read_info(digits_teacher)
    assert record["alpha"] == 0.7 and record["architecture"] == teacher_info.name
    assert record["test_accuracy"] == teacher_info.metrics["test_accuracy"]
    assert "distillation from" in (tmp_path / "kd" / "train.log").read_text()


@pytest.mark.slow  # trains on digits: seconds each, beyond the fast subset's budget
def test_teacher_of_another_size_and_cached_logits(tmp_path, digits_teacher, monkeypatch):
    """A 16x16 teacher teaches an 8x8 student; without augmentation its logits are computed once."""
    from cnnkit.training import distill
    big = tmp_path / "big"
    r = run_main("train", "--data", "digits", "--image-size", "16", "--epochs", "3", "--no-report", "--quiet",
                 "--out", str(big))
    assert r.returncode == 0, r.stderr
    calls = []
    real = distill.Teacher.__call__
    monkeypatch.setattr(distill.Teacher, "__call__", lambda self, b, p: calls.append(len(b)) or real(self, b, p))
    r = run_main("train", "--data", "digits", "--epochs", "3", "--no-report", "--quiet", "--teacher", str(big),
                 "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    train_images = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert read_info(tmp_path / "s").distillation["input"] == [1, 16, 16]
    sizes, record = read_info(tmp_path / "s").data.sizes, read_info(tmp_path / "s").distillation
    assert sum(calls) == sizes["train"] + sizes["val"]  # the training images once, not once per epoch; and validation
    assert 0.5 < record["val_accuracy_here"] <= 1  # the teacher on the 8x8 images, upsampled to its 16x16
    assert train_images["test_accuracy"] > 0.5


@pytest.mark.slow  # trains on digits: seconds each, beyond the fast subset's budget
def test_teacher_of_other_classes_refused(tmp_path, digits_teacher):
    model, info = load_model(digits_teacher)
    info.class_names = [f"c{i}" for i in range(10)]
    save_model(tmp_path / "other.safetensors", model, info)
    r = run_main("train", "--data", "digits", "--teacher", str(tmp_path / "other.safetensors"),
                 "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "same classes" in r.stderr


@pytest.mark.slow  # trains on digits: seconds each, beyond the fast subset's budget
def test_mixing_epoch_range(tmp_path, monkeypatch):
    """--mix-from-epoch 2 --mix-off-epoch 3 of 3 epochs: only epoch 2's steps are mixed."""
    from cnnkit.training import mix
    calls = []
    real = mix.Mix.__call__
    monkeypatch.setattr(mix.Mix, "__call__", lambda self, x, g: calls.append(len(x)) or real(self, x, g))
    r = run_main("train", "--data", "digits", "--epochs", "3", "--no-report", "--quiet", "--cutmix", "1",
                 "--mix-from-epoch", "2", "--mix-off-epoch", "3", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert sum(calls) == read_info(tmp_path / "r").data.sizes["train"]  # one epoch's images
    assert "until epoch 2" in (tmp_path / "r" / "train.log").read_text()


@pytest.mark.slow  # trains on digits: seconds each, beyond the fast subset's budget
def test_teacher_fast_trains_the_fast_recipe_first_on_the_same_splits(tmp_path, monkeypatch):
    """--teacher fast: the fast recipe (here a one-epoch stand-in, digits having none) trains into
    RUN/teacher on the student's splits, and the config names that folder for --resume."""
    import cnnkit.config
    recipe = tmp_path / "fast-digits.yaml"
    recipe.write_text("model: seed-digits\nepochs: 1\nval_split: 0.3\n")
    monkeypatch.setattr(cnnkit.config, "recipe_choice", lambda name, data, files=None: (recipe, None))
    out = tmp_path / "student"
    r = run_main("train", "--data", "digits", "--teacher", "fast", "--epochs", "1", "--val-split", "0.2",
                 "--no-report", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    teacher = read_info(out / "teacher")
    assert teacher.training["val_split"] == 0.2  # the student's split
    assert teacher.training["epochs"] == 1  # the recipe's epochs
    assert teacher.data.sizes == read_info(out).data.sizes
    assert json.loads((out / "config.json").read_text())["teacher"] == str(out / "teacher")
    assert read_info(out).distillation["teacher"] == str((out / "teacher" / "model.safetensors").resolve())
    # a teacher left in RUN/teacher by a run on other splits is refused, not reused
    import shutil
    shutil.copytree(out / "teacher", tmp_path / "again" / "teacher")
    r = run_main("train", "--data", "digits", "--teacher", "fast", "--epochs", "1", "--val-split", "0.2",
                 "--seed", "1", "--no-report", "--quiet", "--out", str(tmp_path / "again"))
    assert r.returncode == 2 and "--seed" in r.stderr and "other" in r.stderr


@pytest.mark.slow  # trains on digits
def test_a_typed_lr_wins_over_a_config_files_lr_auto(tmp_path):
    config = tmp_path / "auto.yaml"
    config.write_text("data: digits\nlr: auto\nepochs: 1\n")
    r = run_main("train", "--config", str(config), "--lr", "0.005", "--no-report", "--quiet",
                 "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["lr"] == 0.005 and saved["lr_find"] is False
    assert "lr_find_sweep" not in read_info(tmp_path / "r").training
