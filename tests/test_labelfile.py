"""Label files (--data labels.csv / .tsv / .jsonl): the same images as a folder give the same
dataset and, seeded, the same trained weights; every malformed file is refused in one line naming
its row, with exit 2 and nothing written."""
from __future__ import annotations

import csv
import json
import os
import random

import pytest
import numpy as np
import torch

from cnnkit.data import load_dataset
from cnnkit.data.labelfile import Columns, read_label_file
from cnnkit.errors import CnnkitError
from conftest import assert_same_run, run_main, shared


def folder_rows(root) -> list[tuple[str, str, str]]:
    """(path, class, split) of every file in a DIR/{train,val}/<class>/* folder."""
    rows = []
    for split in ("train", "val"):
        for cls in sorted(os.listdir(root / split)):
            for name in sorted(os.listdir(root / split / cls)):
                rows.append((str(root / split / cls / name), cls, split))
    return rows


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def hymenoptera_csv(tmp_path):
    """hymenoptera as a CSV beside nothing of it: paths relative to the CSV's folder, rows shuffled."""
    root = shared("hymenoptera")
    rows = [(os.path.relpath(p, tmp_path), c, s) for p, c, s in folder_rows(root)]
    random.Random(0).shuffle(rows)
    return root, write_csv(tmp_path / "hymenoptera.csv", ["image", "label", "split"], rows)


@pytest.mark.slow  # decodes 60,000 JPEGs once: the label file's listing finds the folder's decoded cache
def test_cifar10_jpeg_folder_and_its_csv_give_the_same_60000_images(tmp_path):
    root = shared("cifar10-jpeg")
    a = load_dataset(str(root), image_size=32, quiet=True)
    assert a.skipped == [] and a.num_classes == 10
    assert len(a.train) + len(a.val) == 50_000 and len(a.test) == 10_000
    assert torch.bincount(a.test.labels).tolist() == [1000] * 10 and a.train.images.shape[1:] == (3, 32, 32)
    rows = []
    for split in ("train", "test"):
        for cls in sorted(os.listdir(root / split)):
            rows += [(os.path.relpath(root / split / cls / name, tmp_path), cls, split)
                     for name in sorted(os.listdir(root / split / cls))]
    random.Random(1).shuffle(rows)
    b = load_dataset(str(write_csv(tmp_path / "cifar10.csv", ["path", "label", "split"], rows)), image_size=32,
                     quiet=True)
    assert b.class_names == a.class_names and b.sizes() == a.sizes() and b.skipped == []
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sb.paths == sa.paths and torch.equal(sb.labels, sa.labels), split
        assert torch.equal(sb.images, sa.images), split


def test_a_csv_of_a_folder_gives_the_folders_dataset(hymenoptera_csv):
    root, labels = hymenoptera_csv
    a = load_dataset(str(root), image_size=32, quiet=True)
    b = load_dataset(str(labels), image_size=32, quiet=True)
    assert b.class_names == a.class_names == ["ants", "bees"]
    assert b.sizes() == a.sizes() and b.sizes()["val"] > 100
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert sb.paths == sa.paths, split
        assert torch.equal(sb.labels, sa.labels) and torch.equal(sb.images, sa.images), split
    assert [p for p, _ in b.skipped] == [p for p, _ in a.skipped]  # the stray GIF, or whatever a folder skips
    assert b.name == "hymenoptera" and b.source == str(labels)


def test_tsv_and_jsonl_read_as_the_csv_and_without_a_split_column_the_splits_are_drawn(tmp_path):
    root = shared("hymenoptera")
    rows = [(p, c) for p, c, _ in folder_rows(root)]
    csv_file = write_csv(tmp_path / "l.csv", ["filename", "class"], rows)
    tsv_file = write_csv(tmp_path / "l.tsv", ["filename", "class"], rows[::-1], delimiter="\t")
    jsonl_file = tmp_path / "l.jsonl"
    jsonl_file.write_text("".join(json.dumps({"filename": p, "class": c, "note": None}) + "\n" for p, c in rows))
    listings = [read_label_file(f) for f in (csv_file, tsv_file, jsonl_file)]
    assert listings[0].files == listings[1].files == listings[2].files  # row order does not matter
    assert set(listings[0].files) == {"all"} and listings[0].columns == Columns("filename", "class", None)
    ds = load_dataset(str(csv_file), image_size=16, test_split=0.25, seed=3, quiet=True)
    sizes = ds.sizes()
    assert sizes["test"] == pytest.approx(0.25 * len(rows), abs=3) and sizes["train"] + sizes["val"] + sizes["test"] \
        == len(rows) - len(ds.skipped)


@pytest.mark.slow
def test_training_on_the_csv_gives_the_folders_weights_and_evaluate_reads_the_csv(hymenoptera_csv, tmp_path):
    root, labels = hymenoptera_csv
    common = ["--model", "seed-patch64", "--image-size", "32", "--epochs", "1", "--batch-size", "64", "--no-report",
              "--quiet"]
    r = run_main("train", "--data", str(root), "--out", str(tmp_path / "folder"), *common)
    assert r.returncode == 0, r.stderr
    r = run_main("train", "--data", str(labels), "--out", str(tmp_path / "csv"), *common)
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "folder", tmp_path / "csv")
    r = run_main("evaluate", str(tmp_path / "csv"), "--data", str(labels), "--json")
    assert r.returncode == 0, r.stderr
    tested = json.loads((tmp_path / "csv" / "metrics.json").read_text())["test_accuracy"]
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(tested, abs=1e-6)


def bad_files(tmp_path):
    """name -> (label file text, what the one-line message must say)."""
    root = shared("hymenoptera", "train")
    ant, bee = (str(root / c / sorted(os.listdir(root / c))[0]) for c in ("ants", "bees"))
    head = "path,label,split\n"
    ok = f"{ant},ants,train\n{bee},bees,train\n"
    return {
        "missing file": (head + ok + f"{tmp_path}/nope.jpg,ants,train\n", "row 4: no such file"),
        "duplicate row": (head + ok + f"{ant},bees,val\n", "row 4: " + ant + " is listed again (first on row 2)"),
        "unknown split": (head + ok + f"{ant}x,ants,tain\n", "row 4: split 'tain' is not one of train, val, test"),
        "empty label": (head + ok + f"{ant}y, ,train\n", "row 4: " + ant + "y has an empty label"),
        "empty path": (head + ok + ",ants,train\n", "row 4: no image path"),
        "wrong field count": (head + ok + f"{ant},ants\n", "row 4: 2 fields where the header has 3"),
        "ambiguous columns": ("file,path,label\n" + f"{ant},{ant},ants\n", "could both be the image path column: "
                              "choose one with --path-column"),
        "no label column": ("path,kind\n" + f"{ant},ants\n", "has no label column"),
        "empty": ("", "is empty"),
        "no training rows": (head + f"{ant},ants,val\n", "no row has split 'train'"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "duplicate row", "unknown split", "empty label", "empty path", "wrong field count",
    "ambiguous columns", "no label column", "empty", "no training rows"])
def test_a_malformed_label_file_gets_one_line_naming_the_row_and_nothing_is_written(case, tmp_path):
    text, says = bad_files(tmp_path)[case]
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    out = tmp_path / "run"
    r = run_main("train", "--data", str(labels), "--out", str(out), "--epochs", "1", "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and str(labels) in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_several_problems_are_counted_in_the_one_line(tmp_path):
    many = r"row 2: no such file .*\(and 5 more: row 3: .*row 5: no such file .* \.\.\.\)"
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{tmp_path}/missing{i}.png,a\n" for i in range(6)))
    with pytest.raises(CnnkitError, match=many):
        read_label_file(labels)


def test_columns_named_by_flags_win_over_detection(tmp_path):
    root = shared("hymenoptera", "train")
    rows = [(str(root / c / n), c, c.upper()) for c in ("ants", "bees") for n in sorted(os.listdir(root / c))[:3]]
    labels = write_csv(tmp_path / "labels.csv", ["path", "label", "kind"], rows)
    listing = read_label_file(labels, Columns(label="kind"))
    assert listing.class_names == ["ANTS", "BEES"]
    with pytest.raises(CnnkitError, match=r"no column 'species' \(--label-column\); its columns: path, label, kind"):
        read_label_file(labels, Columns(label="species"))
    r = run_main("train", "--data", str(labels), "--label-column", "kind", "--dry-run")
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- several labels per image
@pytest.fixture
def multi_mnist(tmp_path):
    from benchmarks.data.multi_mnist import write_multi_mnist
    return write_multi_mnist(tmp_path / "multi", train=300, test=100, seed=0, data_dir=shared("mnist").parent)


@pytest.mark.slow
def test_multi_mnist_reads_as_a_multi_label_dataset_of_its_label_sets(multi_mnist):
    from PIL import Image
    rows = {os.path.normpath(multi_mnist.parent / r["path"]): r for r in csv.DictReader(open(multi_mnist))}
    ds = load_dataset(str(multi_mnist), image_size=56, channels=1, seed=0, quiet=True)
    assert ds.task == "multi-label" and ds.class_names == [str(d) for d in range(10)]
    assert ds.sizes()["test"] == 100 and ds.sizes()["train"] + ds.sizes()["val"] == 300
    for split in (ds.train, ds.val, ds.test):
        assert split.labels.shape == (len(split), 10) and set(split.labels.sum(1).tolist()) <= {1.0, 2.0, 3.0}
        for i in range(0, len(split), 37):
            row = rows[split.paths[i]]
            present = torch.nonzero(split.labels[i]).flatten().tolist()
            assert [ds.class_names[k] for k in present] == row["labels"].split(";")
            assert torch.equal(split.images[i, 0], torch.from_numpy(np.array(Image.open(split.paths[i]))))
    assert (ds.val.labels.sum(0) > 0).all()  # stratified by the rarest label: every digit is validated


@pytest.mark.slow
def test_one_column_per_label_gives_the_same_dataset_as_a_separator(multi_mnist, tmp_path):
    rows = list(csv.DictReader(open(multi_mnist)))
    wide = write_csv(tmp_path / "wide.csv", ["file", *[str(d) for d in range(10)], "split"],
                     [(str(multi_mnist.parent / r["path"]), *[int(str(d) in r["labels"].split(";")) for d in range(10)],
                       r["split"]) for r in rows])
    a = read_label_file(multi_mnist)
    b = read_label_file(wide)
    assert a.multi_label and b.multi_label and a.class_names == b.class_names
    assert a.files == b.files and b.columns.label is None
    da = load_dataset(str(multi_mnist), image_size=28, quiet=True)
    db = load_dataset(str(wide), image_size=28, quiet=True)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(da, split).labels, getattr(db, split).labels), split


def test_a_separator_cell_may_end_in_one_but_not_be_empty_and_training_says_what_is_missing(tmp_path):
    root = shared("hymenoptera", "train")
    ants = [str(root / "ants" / n) for n in sorted(os.listdir(root / "ants"))[:4]]
    labels = tmp_path / "l.csv"
    labels.write_text("path,labels\n" + f"{ants[0]},ant;insect;\n{ants[1]},insect\n{ants[2]},ant\n")
    listing = read_label_file(labels)
    assert listing.multi_label and listing.class_names == ["ant", "insect"]
    assert sorted(c for _, c in listing.files["all"]) == ["ant", "ant\x1finsect", "insect"]
    labels.write_text("path,labels\n" + f"{ants[0]},ant;insect\n{ants[1]}, ; \n")
    with pytest.raises(CnnkitError, match="row 3: .* has an empty label"):
        read_label_file(labels)
    labels.write_text("path,labels\n" + "".join(f"{a},ant;insect\n{a}x,insect\n" for a in ants[:1])
                      + "".join(f"{a},{'ant;insect' if i % 2 else 'insect'}\n" for i, a in enumerate(ants[1:])))
    r = run_main("train", "--data", str(labels), "--image-size", "16", "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no such file" in r.stderr or "single-label models only" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_audit_counts_each_label_of_a_multi_label_file(multi_mnist, tmp_path):
    r = run_main("audit", str(multi_mnist), "--image-size", "28", "--channels", "1", "--out", str(tmp_path / "a"),
                 "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    ds = load_dataset(str(multi_mnist), image_size=28, channels=1, quiet=True)
    for split in ("train", "val", "test"):
        assert list(result["class_balance"][split].values()) == getattr(ds, split).labels.sum(0).int().tolist()


def test_a_label_files_run_folder_is_named_after_its_stem(tmp_path):
    from cnnkit.config import TrainConfig
    from cnnkit.jobs.train import default_run_dir
    labels = tmp_path / "sub" / "pets.csv"
    labels.parent.mkdir()
    labels.write_text("path,label\n")
    assert default_run_dir(TrainConfig(data=str(labels), model="seed-patch64")).name.startswith("pets-seed-patch64-")


def test_the_fast_recipe_adapts_to_a_label_file_as_to_its_folder(hymenoptera_csv, tmp_path):
    from cnnkit.cli.common import listed_files
    from cnnkit.config import recipe_choice
    root, labels = hymenoptera_csv
    folder_path, folder_why = recipe_choice("fast", str(root))
    file_path, file_why = recipe_choice("fast", str(labels), listed_files({"data": str(labels)}))
    assert file_path == folder_path and file_why.split(":")[0] == folder_why.split(":")[0]  # the same images counted
    renamed = write_csv(tmp_path / "renamed.csv", ["picture", "kind"],
                        [row.split(",")[:2] for row in labels.read_text().splitlines()[1:]])
    files = listed_files({"data": str(renamed), "path_column": "picture", "label_column": "kind"})
    assert recipe_choice("fast", str(renamed), files)[0] == folder_path
    r = run_main("train", "--recipe", "fast", "--data", str(renamed), "--dry-run")  # columns it cannot find: asked for
    assert r.returncode == 2 and "--path-column" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
