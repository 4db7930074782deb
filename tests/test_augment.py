"""Augmentations are correct, not just fast: each op against its definition or torch's own."""
from __future__ import annotations

import pytest
import torch

from cnnkit.augment import PRESETS, Augment, affine_grid, perspective_grid, translate, warp


def batch(n: int = 8, c: int = 3, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_flip_of_a_flip_is_the_identity():
    x = batch()
    flip = Augment(hflip=1.0, vflip=1.0)
    once = flip(x, gen())
    assert torch.equal(once, x.flip(2).flip(3).float())
    assert torch.equal(flip(once, gen()), x.float())


def test_a_shift_moves_content_by_the_stated_pixels_and_replicates_edges():
    x = batch(n=2, h=10, w=10)
    moved = translate(x, torch.tensor([2, -3]), torch.tensor([-1, 4]))
    # image 0: content 2 rows down and 1 column left
    assert torch.equal(moved[0, :, 2:, :9], x[0, :, :8, 1:])
    assert torch.equal(moved[0, :, 0], moved[0, :, 2]) and torch.equal(moved[0, :, :, 9], moved[0, :, :, 8])
    # image 1: 3 rows up and 4 columns right
    assert torch.equal(moved[1, :, :7, 4:], x[1, :, 3:, :6])
    # the random shift stays within its bound: every output row is some input row moved by at most 2
    out = Augment(shift=0.2)(x, gen())  # 0.2 of 10 px: up to 2 px
    for i in range(2):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(out[i], translate(x[i:i + 1], torch.tensor([dy]), torch.tensor([dx]))[0].float())]
        assert found, i


@pytest.mark.parametrize("k,angle", [(1, 90.0), (2, 180.0), (-1, -90.0)])
def test_rotation_by_right_angles_matches_torch_rot90(k, angle):
    x = batch(h=9, w=9).float()
    rotated = warp(x, affine_grid(torch.full((8,), angle), torch.ones(8), torch.zeros(8), (9, 9)))
    assert torch.allclose(rotated, torch.rot90(x, k, dims=(2, 3)), atol=1e-3)


def test_identity_warps_are_exact():
    x = batch().float()
    assert torch.allclose(warp(x, affine_grid(torch.zeros(8), torch.ones(8), torch.zeros(8), (12, 12))), x, atol=1e-3)
    assert torch.allclose(warp(x, perspective_grid(torch.zeros(8, 4, 2), (12, 12))), x, atol=1e-3)


def test_a_fixed_seed_augments_the_same_batch_the_same_way():
    x = batch()
    strong = Augment.preset("strong")
    assert torch.equal(strong(x, gen(3)), strong(x, gen(3)))
    assert not torch.equal(strong(x, gen(3)), strong(x, gen(4)))
    out = strong(x, gen(3))
    assert out.dtype == torch.float32 and out.shape == x.shape and 0 <= out.min() and out.max() <= 255


def test_presets_and_dataset_facts():
    assert Augment.preset("light") == Augment(shift=0.1, hflip=0.5)  # the notes' CIFAR-10 augmentation
    assert Augment.preset("light", flips_allowed=False).hflip == 0  # digits are never mirrored
    assert Augment.preset("none").active is False and all(Augment.preset(p).active for p in PRESETS if p != "none")
    assert Augment.preset("standard", rotate=30).rotate == 30
    with pytest.raises(ValueError):
        Augment.preset("extreme")


def test_photometric_ops_keep_the_geometry():
    x = batch().float() * 0.6 + 1  # 1..154: no pixel reaches 255 even at x1.5
    bright = Augment(brightness=0.5)(x, gen())
    ratio = bright / x.clamp_min(1)
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=0.02)  # one factor per image
    grey = batch(c=1).float()
    assert torch.equal(Augment(saturation=0.5)(grey, gen()), grey)  # no colour, nothing to saturate
    blurred = Augment(blur=2.0)(x, gen())
    assert blurred.std() < x.std() and abs(blurred.mean() - x.mean()) < 3


# ----------------------------------------------------------------------------- in training
import json  # noqa: E402
import math  # noqa: E402

import cnnkit  # noqa: E402
from cnnkit.augment import BatchAugment  # noqa: E402
from cnnkit.models import build_model  # noqa: E402
from cnnkit.training import lr_at, make_optimizer, update_ema  # noqa: E402
from cnnkit.config import TrainConfig  # noqa: E402
from conftest import run_main, shared  # noqa: E402


def count_augmented(monkeypatch) -> list[int]:
    """Record the size of every batch augmentation sees."""
    seen: list[int] = []
    real = BatchAugment.__call__

    def spy(self, x, labels, generator):
        seen.append(len(x))
        assert torch.equal(labels, labels.clone())  # labels pass through untouched
        return real(self, x, labels, generator)
    monkeypatch.setattr(BatchAugment, "__call__", spy)
    return seen


def test_only_training_batches_are_augmented_from_the_chosen_epoch(tmp_path, monkeypatch):
    seen = count_augmented(monkeypatch)
    cfg = cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=3, augment="standard", augment_from_epoch=2,
                             image_size=16, report=False, out=str(tmp_path / "run"))
    result = cnnkit.train(cfg, quiet=True)
    n_train = len(result.dataset.train)
    assert sum(seen) == 2 * n_train  # epochs 2 and 3, every training image once; never val or test
    model, meta = cnnkit.load_model(result.run_dir)
    logits = cnnkit.predict_logits(model, result.dataset.test.images, cnnkit.Preprocess.from_info(meta))
    assert (logits.argmax(1) == result.dataset.test.labels).float().mean().item() == pytest.approx(
        result.metrics["test_accuracy"])  # the reported test figure is of unaugmented images
    assert "augmentation from epoch 2" in (result.run_dir / "train.log").read_text()


def test_per_class_presets_augment_only_their_class():
    x = batch(n=6)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    aug = BatchAugment(Augment(), ((1, Augment(brightness=0.5)),))
    out = aug(x, labels, gen())
    assert torch.equal(out[labels == 0], x[labels == 0].float())  # class 0: no augmentation
    assert not torch.equal(out[labels == 1], x[labels == 1].float())
    from cnnkit.augment import parse_class_presets
    with pytest.raises(ValueError, match="not a class"):
        parse_class_presets("wasps=strong", ["ants", "bees"], True)


def write_imbalanced_folder(root) -> None:
    """MNIST 4s against 9s, ten times fewer 9s in training; a balanced test split."""
    from PIL import Image
    ds = cnnkit.load_dataset("mnist", data_dir=shared(), quiet=True)
    for split, cls, digit, n, offset in (("train", "four", 4, 600, 0), ("train", "nine", 9, 60, 0),
                                         ("test", "four", 4, 300, 1000), ("test", "nine", 9, 300, 1000)):
        d = root / split / cls
        d.mkdir(parents=True)
        for i in (ds.train.labels == digit).nonzero()[:, 0][offset:offset + n].tolist():
            Image.fromarray(ds.train.images[i, 0].numpy()).save(d / f"{i}.png")


def test_class_balancing_raises_the_rare_class_recall(tmp_path):
    write_imbalanced_folder(tmp_path / "data")
    recall = {}
    for balance in ("none", "weights", "sampler"):
        r = cnnkit.train(cnnkit.TrainConfig(data=str(tmp_path / "data"), model="linear", image_size=28, channels=1,
                                            epochs=10, balance=balance, report=False, out=str(tmp_path / balance)),
                         quiet=True)
        model, meta = cnnkit.load_model(r.run_dir)
        predicted = cnnkit.probabilities(model, meta, r.dataset.test.images).argmax(1)
        labels, rare = r.dataset.test.labels.numpy(), r.dataset.class_names.index("nine")
        recall[balance] = float((predicted[labels == rare] == rare).mean())
    assert recall["weights"] > recall["none"] + 0.05 and recall["sampler"] > recall["none"] + 0.05, recall


def test_schedules_have_their_shapes():
    total, warm, peak = 1000, 100, 0.1
    for schedule in ("linear", "cosine", "onecycle"):
        lrs = [lr_at(i, total, warm, peak, schedule) for i in range(total)]
        assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == warm - 1
        assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never rises after the warmup
        assert lrs[-1] < peak * 0.01
    assert lr_at(0, total, warm, peak, "onecycle") == pytest.approx(peak / 25, rel=0.01)  # OneCycleLR's start
    assert (lr_at(total - 1, total, warm, peak, "cosine")
            == pytest.approx(peak * (1 + math.cos(math.pi * 899 / 900)) / 2))
    assert lr_at(500, total, warm, peak, "constant") == peak


def test_weight_average_follows_its_formula():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    update_ema(ema, model, decay=0.99, step=1000)  # past the warm-up: decay 0.99
    assert torch.allclose(ema.weight, 0.99 * before + 0.01 * model.weight.detach())
    update_ema(ema, model, decay=0.99, step=0)  # warm-up: decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.weight,
                          model.weight.detach() * 0.9 + 0.1 * (0.99 * before + 0.01 * model.weight.detach()))


def test_augment_preview_draws_what_training_would_see(tmp_path):
    picture = tmp_path / "preview.png"
    r = run_main("augment-preview", "--data", "digits", "--augment", "strong", "--picture", str(picture),
                 "--samples", "3", "--versions", "4", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["samples"] == 3 and "hflip" not in info["augmentation"]  # digits are never mirrored
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_main("augment-preview", "--data", "digits", "--augment", "wild", "--picture", str(picture))
    assert r.returncode == 2


@pytest.mark.slow  # over 7 s: the fast subset (-m 'not slow') stays under 3 minutes
def test_the_notes_cifar10_recipe_runs_its_two_phases(tmp_path, monkeypatch):
    """The notes' recipe file, shortened to 2 epochs with augmentation from the second, on the
    lossless CIFAR-10 subset: plain first, shifted and mirrored after, with the notes' settings."""
    from cnnkit.config import TrainConfig, recipe_file
    seen = count_augmented(monkeypatch)
    recipe = TrainConfig.from_file(recipe_file("notes-cifar10", "cifar10")).to_dict()
    assert (recipe["epochs"], recipe["augment_from_epoch"], recipe["batch_size"], recipe["lr"]) == (100, 51, 32, 0.001)
    cfg = TrainConfig.from_dict({**recipe, "epochs": 2, "augment_from_epoch": 2, "report": False,
                                 "data_dir": str(shared("cifar10-subset-bin")), "out": str(tmp_path / "run")})
    result = cnnkit.train(cfg, quiet=True)
    assert sum(seen) == len(result.dataset.train)  # the second epoch only
    assert result.metrics["test_accuracy"] > 0.3  # it learns (10 classes: chance is 0.1)
    log = (result.run_dir / "train.log").read_text()
    assert "augmentation from epoch 2: shift 0.1, hflip 0.5" in log and "batch 32" in log


def test_early_stopping_ends_a_run_that_stops_improving(tmp_path):
    """A learning rate far too small to move the weights: validation accuracy never beats epoch 1, so
    with early_stop=2 the run ends after epoch 3 of 10 and keeps epoch 1's model."""
    cfg = cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=10, lr=1e-12, warmup_epochs=0,
                             optimizer="adamw", schedule="cosine", early_stop=2, report=False,
                             out=str(tmp_path / "run"))
    result = cnnkit.train(cfg, quiet=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.metrics["best_epoch"] == 1
    assert "early stop: no better validation accuracy for 2 epochs" in (result.run_dir / "train.log").read_text()


def test_bias_lr_factor_gives_biases_their_own_rate_and_the_same_decay_per_step():
    """airbench's bias scaler: 1-D parameters (biases, BatchNorm shifts) at lr x factor with weight
    decay / factor, so lr x weight decay, the decay per step, is unchanged; the frozen whitening
    filters and BatchNorm scales of the speedrun net are in no group."""
    model = build_model("speedrun", 10)
    cfg = TrainConfig(optimizer="sgd", lr=0.5, weight_decay=1e-3, bias_lr_factor=64)
    opt = make_optimizer(cfg, model)
    weights, biases = opt.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert biases["lr_scale"] == 64 and biases["weight_decay"] == pytest.approx(1e-3 / 64)
    assert weights["weight_decay"] == 1e-3 and weights.get("lr_scale", 1.0) == 1.0
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.whiten.weight) not in grouped
    assert len(make_optimizer(TrainConfig(optimizer="sgd"), model).param_groups) == 1  # factor 1: one group
