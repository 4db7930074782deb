"""One config, one source of truth: `cnnkit train` flags come from TrainConfig's fields and
comments, --config sets any field and flags override it, the saved config.json re-runs a run
identically, and bad values are refused up front with one line and exit 2."""
from __future__ import annotations

import dataclasses
import json

import pytest

import cnnkit
from cnnkit.config import TrainConfig, field_help
from cnnkit.errors import CnnkitError
from conftest import assert_same_run, run_cli, run_main

SMALL = ["--data", "digits", "--model", "seed-digits", "--image-size", "16", "--batch-size", "64", "--quiet"]


def test_every_config_field_is_a_flag_with_its_comment_as_help():
    r = run_main("train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    helps = field_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f.name in helps and " ".join(helps[f.name].split()[:4]) in text, f.name
    assert "--no-report" in text and "--no-download" in text and "--config" in text


def test_a_help_comment_continued_below_its_field_is_read_whole_and_nothing_else_is():
    helps = field_help()
    # lookahead's comment spans three lines of config.py; the block comment above the aug_<op> fields
    # and the comments inside methods belong to no field
    assert helps["lookahead"].startswith("with ema:") and helps["lookahead"].endswith("the end (airbench)")
    assert "aug_<op>" not in helps["augment_class"] and helps["augment_class"].endswith("augmented harder)")
    assert helps["report_tta"].endswith("MNIST for seed-mnist-torch)")


def test_the_aug_fields_are_the_augmentation_ops():
    from cnnkit.augment import Augment
    ops = [f.name for f in dataclasses.fields(Augment)]
    assert [f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("aug_")] == [f"aug_{op}" for op in ops]
    assert TrainConfig(aug_rotate=15, aug_hflip=0).augment_overrides() == {"hflip": 0, "rotate": 15}
    with pytest.raises(CnnkitError, match=r"--aug-hflip must be in \[0, 1\]"):
        TrainConfig(aug_hflip=1.5).validate()


def test_config_file_sets_fields_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# a recipe\ndata: digits\nmodel: seed-digits\nepochs: 2\nlr: 0.004\nimage_size: 16\n"
                      "optimizer: sgd\nreport: false\n")
    run = tmp_path / "run"
    r = run_main("train", "--config", str(recipe), "--epochs", "1", "--out", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    saved = json.loads((run / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["optimizer"], saved["image_size"]) == (1, 0.004, "sgd", 16)
    assert not (run / "report.html").exists() and (run / "metrics.json").exists()  # report: false


@pytest.mark.slow  # seconds: the fast subset (-m 'not slow') stays under 3 minutes
def test_a_run_re_runs_identically_from_its_own_config_json(tmp_path):
    first = tmp_path / "first"
    assert run_main("train", *SMALL, "--epochs", "3", "--lr", "0.003", "--no-report",
                    "--out", str(first)).returncode == 0
    again = tmp_path / "again"
    r = run_main("train", "--config", str(first / "config.json"), "--out", str(again), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_run(first, again)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert {k: v for k, v in ca.items() if k != "out"} == {k: v for k, v in cb.items() if k != "out"}


def test_a_config_file_with_an_unknown_field_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    r = run_main("train", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "learning_rate" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,words", [
    ("--lr", "nan", "--lr must be a finite number"), ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "0", "--lr must be in"), ("--lr", "-0.1", "--lr must be in"),
    ("--epochs", "0", "--epochs must be in"), ("--epochs", "-3", "--epochs must be in"),
    ("--batch-size", "0", "--batch-size must be in"), ("--momentum", "1.5", "--momentum must be in"),
    ("--val-split", "1", "--val-split must be in"), ("--test-split", "-0.2", "--test-split must be in"),
    ("--label-smoothing", "nan", "--label-smoothing must be a finite number"),
    ("--weight-decay", "-1", "--weight-decay must be in"),
    ("--warmup-epochs", "inf", "--warmup-epochs must be a finite"),
    ("--image-size", "0", "--image-size must be in"), ("--fine-tune-epochs", "0", "--fine-tune-epochs must be in"),
    ("--fine-tune-lr-factor", "0", "--fine-tune-lr-factor must be in"), ("--seed", "-1", "--seed must be in"),
])
def test_numeric_flags_are_validated_up_front(tmp_path, flag, value, words):
    r = run_main("train", *SMALL, flag, value, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_bad_value_is_one_line_and_exit_2_from_the_real_command(tmp_path):
    r = run_cli("train", *SMALL, "--lr", "nan", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.strip() == "cnnkit: error: --lr must be a finite number, not nan"


def test_python_api_validates_too(tmp_path):
    with pytest.raises(cnnkit.CnnkitError, match="--lr must be a finite number"):
        cnnkit.train(TrainConfig(lr=float("nan"), out=str(tmp_path / "run")), quiet=True)


def test_every_shipped_recipe_is_a_valid_config_and_fast_picks_the_dataset():
    from cnnkit.config import recipe_file, recipe_names
    for name in recipe_names():
        TrainConfig.from_file(recipe_file(name, "mnist")).validate()  # unknown keys or bad values fail here
    assert recipe_file("fast", "mnist").name == "fast-mnist.yaml"
    assert recipe_file("best", "mnist").name == "best-mnist.yaml"
    assert recipe_file("fast", "cifar10").name == "fast-cifar10.yaml"
    assert recipe_file("fast", "fashion-mnist").name == "fast-fashion-mnist.yaml"
    assert recipe_file("best", "fashion-mnist").name == "best-fashion-mnist.yaml"
    with pytest.raises(cnnkit.CnnkitError, match="fast exists for --data cifar10, fashion-mnist, mnist"):
        recipe_file("fast", "digits")
    r = run_main("train", "--recipe", "nonsense")
    assert r.returncode == 2 and "notes-cifar10" in r.stderr


def test_fast_recipe_adapts_to_a_folder(tmp_path, monkeypatch):
    import importlib.util

    import numpy as np
    from PIL import Image

    import cnnkit.config as config
    from conftest import shared
    tiny = tmp_path / "tiny"
    for label in ("a", "b"):
        (tiny / label).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(tiny / label / f"{i}.png")
    path, why = config.choose_folder_recipe(tiny)  # few small images: from scratch at 64 px
    assert path.name == "fast-folder.yaml" and "30 images, median shorter side 32 px" in why
    photos = shared("hymenoptera")  # 398 photos: frozen ImageNet features when the weights are installed
    assert config.choose_folder_recipe(photos)[0].name == "fast-folder-photos.yaml"
    monkeypatch.setattr(config, "MANY_IMAGES", 20)  # as if the folder were large: the CIFAR-like recipe
    assert config.choose_folder_recipe(tiny)[0].name == "fast-folder-small.yaml"
    assert config.recipe_file("fast", str(tiny)).name == "fast-folder-small.yaml"
    monkeypatch.setattr(config, "MANY_IMAGES", 10_000)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    path, why = config.choose_folder_recipe(photos)
    assert path.name == "fast-folder.yaml" and "pip install" in why
    for name in ("fast-folder", "fast-folder-small", "fast-folder-photos"):  # every file is a valid config
        config.TrainConfig.from_file(config.RECIPE_DIR / f"{name}.yaml").validate()
