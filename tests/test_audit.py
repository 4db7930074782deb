"""cnnkit audit: planted duplicates of every kind found across splits, no false pairs among distinct
MNIST digits; leakage and balance figures; the files written."""
from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

import cnnkit
from conftest import run_main, shared

KINDS = ("exact", "resized", "jpeg", "crop")


def planted_folder(root):
    """train/ and test/ of distinct MNIST test digits as PNG, then copies of some train digits planted
    in test/ (an exact copy, resized to 56x56, re-encoded as JPEG, its 1-pixel border cropped) and
    two exact copies inside train/. Returns the set of planted pairs as frozensets of paths."""
    digits = cnnkit.load_dataset("mnist", data_dir=str(shared()), quiet=True).test
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(digits), 500, replace=False)
    paths = []
    for n, i in enumerate(chosen):
        split = "train" if n < 400 else "test"
        label = int(digits.labels[i])
        path = root / split / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i, 0].numpy()).save(path)
        paths.append(path)
    planted = set()
    for k in range(4):  # four originals per kind
        for kind in KINDS:
            source = paths[(KINDS.index(kind) * 4 + k) * 9]  # distinct train digits
            img = Image.open(source)
            target = root / "test" / source.parent.name / f"{kind}-{source.stem}.{'jpg' if kind == 'jpeg' else 'png'}"
            if kind == "exact":
                shutil.copy(source, target)
            elif kind == "resized":
                img.resize((56, 56), Image.Resampling.BICUBIC).save(target)
            elif kind == "jpeg":
                img.save(target, quality=75)
            else:
                img.crop((1, 1, 27, 27)).save(target)
            planted.add(frozenset((str(source), str(target))))
    for k in range(2):  # duplicates inside one split
        source = paths[200 + k]
        target = source.parent / f"copy-{source.name}"
        shutil.copy(source, target)
        planted.add(frozenset((str(source), str(target))))
    return planted


def test_every_planted_pair_found_and_no_other(tmp_path):
    planted = planted_folder(tmp_path / "data")
    r = run_main("audit", str(tmp_path / "data"), "--json", "--out", str(tmp_path / "audit"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    found = {frozenset((p["path_a"], p["path_b"])): p for p in report["pairs"]}
    missed = planted - set(found)
    false = set(found) - planted
    assert not missed, f"planted pairs not found: {sorted(map(sorted, missed))}"
    assert not false, f"pairs of distinct digits reported: {[found[f] for f in false]}"
    exact = {f for f in found if found[f]["kind"] == "exact"}
    assert len(exact) == 6  # 4 exact copies across splits + 2 inside train
    # Leakage: every planted copy in test has its original in train or val (val is carved from train).
    leaked = result["leakage"]["test in train"]["images"] + result["leakage"]["test in val"]["images"]
    assert leaked == 16 and result["label_conflicts"] == 0
    assert result["images"] == 518 and sum(result["class_balance"]["test"].values()) == 116
    assert result["file_facts"]["formats"] == {"PNG": 514, "JPEG": 4} and "28x28" in result["file_facts"]["sizes"]
    for name in ("audit.html", "duplicates.csv", "duplicates.png"):
        assert (tmp_path / "audit" / name).stat().st_size > 0
    assert "data:image/png;base64" in (tmp_path / "audit" / "audit.html").read_text()


def test_audit_reports_unreadable_files(tmp_path):
    folder = tmp_path / "f"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * i + (100 if label == "b" else 0),
                                    np.uint8)).save(folder / label / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    result = json.loads(run_main("audit", str(folder), "--json", "--out", str(tmp_path / "out")).stdout)
    assert [u["path"].endswith("broken.png") for u in result["unreadable"]] == [True]
