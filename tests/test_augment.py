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


@pytest.mark.slow  # seconds: the fast subset (-m 'not slow') stays under 3 minutes
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


@pytest.mark.slow  # seconds: the fast subset (-m 'not slow') stays under 3 minutes
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


# ----------------------------------------------------------------------------- RandAugment, TrivialAugment, erasing
import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from cnnkit import augment_policy as policy  # noqa: E402
from cnnkit.augment import random_erasing  # noqa: E402

WITH_MAGNITUDE = [op for op in policy.OPS if op not in ("identity", "autocontrast", "equalize")]


def cifar(n: int = 32) -> torch.Tensor:
    """The first n lossless CIFAR-10 training images, (n, 3, 32, 32) uint8: real photographs."""
    raw = np.fromfile(shared("cifar10-subset-bin", "data_batch_1.bin"), np.uint8, count=3073 * n).reshape(n, 3073)
    return torch.from_numpy(raw[:, 1:].reshape(n, 3, 32, 32).copy())


def pil_each(x: torch.Tensor, fn) -> torch.Tensor:
    """fn(PIL image) on each image of a uint8 batch, back as a float batch."""
    out = [np.asarray(fn(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in x]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("wide", [False, True], ids=["randaugment", "trivialaugment"])
@pytest.mark.parametrize("op", WITH_MAGNITUDE)
def test_every_op_with_a_magnitude_is_exactly_the_identity_at_magnitude_0(op, wide):
    """Exactly, resampling ops included: an image at magnitude 0 is not resampled at all. Input off the
    integer levels (as after a warp) too. At the top level each op does change the batch."""
    x = cifar().float()
    for images in (x, x * 0.9 + 0.25):
        assert torch.equal(policy.apply_op(op, images, torch.zeros(len(x)), wide), images)
    assert not torch.equal(policy.apply_op(op, x, torch.ones(len(x)), wide), x)


def test_ops_match_pil_imageops_on_real_photos():
    """PIL.ImageOps and ImageEnhance are the references torchvision's ops reproduce: equalize, posterize
    and solarize exactly; autocontrast within 1 level (PIL truncates to integers, cnnkit stays in float);
    brightness, color, contrast and sharpness within 1.5."""
    x = cifar()
    xf, n = x.float(), len(x)
    assert torch.equal(policy.equalize(xf), pil_each(x, ImageOps.equalize))
    for bits in (4, 6):
        assert torch.equal(policy.posterize(xf, torch.full((n,), bits)),
                           pil_each(x, lambda i: ImageOps.posterize(i, bits)))
    for threshold in (128, 200):
        assert torch.equal(policy.solarize(xf, torch.full((n,), float(threshold))),
                           pil_each(x, lambda i: ImageOps.solarize(i, threshold)))
    assert (policy.autocontrast(xf) - pil_each(x, ImageOps.autocontrast)).abs().max() <= 1.0 + 1e-3
    from PIL import ImageEnhance
    for op, enhancer in (("brightness", ImageEnhance.Brightness), ("color", ImageEnhance.Color),
                         ("contrast", ImageEnhance.Contrast), ("sharpness", ImageEnhance.Sharpness)):
        for factor in (0.3, 1.7):  # PIL rounds its blend partner (grey image, smoothed image) and its result
            mine = policy.blend(xf, policy.degenerate(xf, op), torch.full((n,), factor))
            assert (mine - pil_each(x, lambda i: enhancer(i).enhance(factor))).abs().max() <= 1.5, (op, factor)
    grey = x[:, :1].float()
    assert torch.equal(policy.apply_op("color", grey, torch.ones(n)), grey)  # no colour to change


@pytest.mark.parametrize("op,value,pil", [
    ("rotate", 20.0, lambda i: i.rotate(20.0, resample=Image.BILINEAR)),
    ("shear_x", 0.3, lambda i: i.transform((32, 32), Image.AFFINE, (1, 0.3, -0.3 * 16, 0, 1, 0), Image.BILINEAR)),
    ("shear_y", -0.25, lambda i: i.transform((32, 32), Image.AFFINE, (1, 0, 0, -0.25, 1, 4.0), Image.BILINEAR))])
def test_rotate_and_shear_match_pil_about_the_centre(op, value, pil):
    """Against PIL's bilinear warps, where no fill comes in (PIL's result and cnnkit's of an all-white
    image still white): within 1 level, PIL rounding to integers."""
    x, key = cifar(8), {"rotate": "angle"}.get(op, op)
    mine = policy.geometric(x.float(), **{key: torch.full((8,), value)})
    inside = (policy.geometric(torch.full((1, 1, 32, 32), 255.0), **{key: torch.full((1,), value)}) == 255) & (
        pil_each(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8), pil)[:, :1] == 255)
    assert inside.float().mean() > 0.5
    assert ((mine - pil_each(x, pil)).abs() * inside).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("kind", policy.POLICIES)
def test_a_policy_is_reproducible_from_its_seed_and_draws_per_image(kind, monkeypatch):
    x = cifar(1).expand(256, 3, 32, 32).contiguous()  # one photo 256 times: any difference is the draws'
    p = policy.Policy(Augment(), kind, ops=2, magnitude=30)
    out = p(x, gen(1))
    assert torch.equal(out, p(x, gen(1))) and not torch.equal(out, p(x, gen(2)))
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 255
    assert len(torch.unique(out.flatten(1), dim=0)) > 40  # images drew their own ops, signs (and levels)
    calls: list[tuple[tuple, int]] = []
    real = policy.run_group
    monkeypatch.setattr(policy, "run_group", lambda group, images, *a: calls.append((group, len(images))) or real(
        group, images, *a))
    p(x, gen(1))
    steps = 2 if kind == "randaugment" else 1
    # each step runs each group of ops (the warps together, the translations together, each other op) once,
    # on the images that drew it; identity is not run
    assert [g for g, _ in calls] == list(policy.GROUPS) * steps
    drawn = sum(k for _, k in calls)  # images through a non-identity op: 13 in 14 of 256 x steps, binomially
    assert abs(drawn - 256 * steps * 13 / 14) < 4 * math.sqrt(256 * steps * 13 / 14 / 14)


def test_random_erasing_rate_area_aspect_and_fill():
    h = w = 40
    x = torch.full((2000, 3, h, w), 77.5)  # off the noise's reach: a changed pixel is an erased one
    out = random_erasing(x, 0.25, gen(5))
    changed = (out != x).any(1)  # (N, H, W)
    erased = changed.flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 2000)
    for mask in changed[erased][:200]:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        rh, rw = len(rows), len(cols)
        assert mask.sum() == rh * rw and rows[-1] - rows[0] + 1 == rh  # one solid rectangle
        # the drawn area A and aspect r before rounding each side to whole pixels: A within 2-33%, r 0.3-3.3
        assert (rh - 0.5) * (rw - 0.5) <= h * w / 3 and (rh + 0.5) * (rw + 0.5) >= 0.02 * h * w
        assert (rh - 0.5) / (rw + 0.5) <= 1 / 0.3 and (rh + 0.5) / (rw - 0.5) >= 0.3
    noise = out.permute(0, 2, 3, 1)[changed]
    assert abs(noise.mean() - 128) < 2 and 55 < noise.std() < 64  # N(128, 64^2) clamped to 0..255
    assert torch.equal(random_erasing(x[:50], 0.0, gen()), x[:50])
    assert torch.equal(BatchAugment(Augment(), erasing=0.0)(cifar(), torch.zeros(32), gen()), cifar().float())
    assert not BatchAugment(Augment()).active and BatchAugment(Augment(), erasing=0.25).active


@pytest.mark.slow  # a few seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_randaugment_and_random_erasing_train_and_preview(tmp_path, monkeypatch):
    seen = count_augmented(monkeypatch)
    cfg = cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=1, augment="randaugment", random_erasing=0.25,
                             image_size=16, report=False, out=str(tmp_path / "run"))
    result = cnnkit.train(cfg, quiet=True)
    assert sum(seen) == len(result.dataset.train) and 0 <= result.metrics["test_accuracy"] <= 1
    assert ("augmentation from epoch 1: shift 0.1, then randaugment 2 ops at magnitude 9/30; random erasing 0.25"
            in (result.run_dir / "train.log").read_text())  # digits: never mirrored
    picture = tmp_path / "preview.png"
    r = run_main("augment-preview", "--data", "digits", "--augment", "trivialaugment", "--random-erasing", "0.5",
                 "--picture", str(picture), "--samples", "3", "--versions", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["augmentation"] == ("shift 0.1, then trivialaugment (one op at a random magnitude); "
                                                    "random erasing 0.5")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
