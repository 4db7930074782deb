"""Datasets: official formats parsed exactly, downloads verified, folders decoded robustly."""
from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit import CnnkitError, load_dataset
from cnnkit.data import stratified_split
from cnnkit.data.builtin import parse_cifar_bin, parse_idx
from conftest import run_main, shared


# ----------------------------------------------------------------------------- MNIST and downloads
def test_mnist_from_shared_data():
    ds = load_dataset("mnist", data_dir=shared(), val_split=0.1)
    assert abs(len(ds.val) - 6000) <= 10  # 10% of every class, rounded per class
    assert ds.train.images.dtype == torch.uint8 and ds.input_shape == (1, 28, 28)
    assert len(ds.train) + len(ds.val) == 60000 and len(ds.test) == 10000
    # The test labels file's first labels (official t10k): 7 2 1 0 4 1 4 9 5 9
    assert ds.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(ds.test.labels).sum() == 10000


def test_idx_parser_refuses_truncated_and_bad_magic(tmp_path):
    raw = gzip.decompress(shared("mnist", "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert parse_idx(raw, tmp_path).shape == (10000,)
    with pytest.raises(CnnkitError, match="truncated"):
        parse_idx(raw[:-10], tmp_path)
    with pytest.raises(CnnkitError, match="magic"):
        parse_idx(b"\x00\x00\x09\x01" + raw[4:], tmp_path)


def test_download_from_local_server_verifies_decompressed_content(http_server, isolated_cache, monkeypatch):
    # ../shared/data/mnist's train-images .gz is re-compressed: only a check of the decompressed
    # content accepts it, as it must.
    from cnnkit.data import builtin
    monkeypatch.setenv("CNNKIT_DATA_URL", http_server(shared("mnist")))
    verified = []
    real = builtin.read_verified
    monkeypatch.setattr(builtin, "read_verified", lambda path, *md5: verified.append(path.name) or real(path, *md5))
    ds = load_dataset("mnist")
    assert len(ds.train) + len(ds.val) == 60000
    assert len(verified) == 4  # each downloaded file read and decompressed once, checksum and parser alike
    files = sorted(p.name for p in (isolated_cache / "mnist").iterdir())
    assert files == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                     "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_corrupt_download_is_refused_and_never_kept(http_server, isolated_cache, monkeypatch, tmp_path):
    bad = tmp_path / "mirror"
    shutil.copytree(shared("mnist"), bad)
    data = gzip.decompress((bad / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(data[:-1] + bytes([(data[-1] + 1) % 256])))
    monkeypatch.setenv("CNNKIT_DATA_URL", http_server(bad))
    with pytest.raises(CnnkitError, match="checksum"):
        load_dataset("mnist")
    left = {p.name for p in (isolated_cache / "mnist").iterdir()}
    assert "t10k-labels-idx1-ubyte.gz" not in left and not any(n.endswith(".part") for n in left)


def test_corrupt_file_on_disk_is_refused(tmp_path):
    d = tmp_path / "mnist"
    shutil.copytree(shared("mnist"), d)
    blob = (d / "train-labels-idx1-ubyte.gz").read_bytes()
    (d / "train-labels-idx1-ubyte.gz").write_bytes(blob[: len(blob) // 2])  # truncated gzip
    with pytest.raises(CnnkitError, match="corrupt|checksum"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_missing_data_without_network_says_where_it_looked(tmp_path, http_server, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CNNKIT_DATA_URL", http_server(empty))  # a server with nothing: like no network
    r = run_main("train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()
    assert len(msg) == 1 and "nowhere" in msg[0] and "--data-dir" in msg[0]


# ----------------------------------------------------------------------------- CIFAR-10 binary
def test_cifar10_binary_subset_pixels_and_labels():
    folder = shared("cifar10-subset-bin")
    train = parse_cifar_bin((folder / "data_batch_1.bin").read_bytes(), folder)
    test = parse_cifar_bin((folder / "test_batch.bin").read_bytes(), folder)
    assert train.images.shape == (4000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert train.images[0, 0, 0, :6].tolist() == [59, 43, 50, 68, 98, 119]  # red row 0
    assert test.images[0, 0, 0, :6].tolist() == [158, 159, 165, 166, 160, 156]
    ds = load_dataset("cifar10", data_dir=folder)
    assert ds.class_names[3] == "cat" and len(ds.test) == 1000 and len(ds.train) + len(ds.val) == 4000


def test_cifar10_any_whole_number_of_records(tmp_path):
    blob = (shared("cifar10-subset-bin") / "test_batch.bin").read_bytes()
    assert len(parse_cifar_bin(blob[: 3 * 3073], tmp_path)) == 3
    with pytest.raises(CnnkitError, match="3,073|3073"):
        parse_cifar_bin(blob[: 3 * 3073 + 100], tmp_path)


# ----------------------------------------------------------------------------- folders
def test_hymenoptera_loads_every_file_including_the_gif():
    ds = load_dataset(shared("hymenoptera"), image_size=64)
    assert ds.skipped == []
    assert len(ds.train) == 245 and len(ds.val) == 153 and ds.class_names == ["ants", "bees"]
    assert ds.test_source == "val"  # no test/ folder: said, not hidden
    gif = [i for i, p in enumerate(ds.train.paths) if p.endswith("imageNotFound.gif")]
    assert len(gif) == 1 and ds.train.images[gif[0]].shape == (3, 64, 64)


def test_folder_cache_skips_decoding_second_time(tmp_path, monkeypatch):
    make_plain_folder(tmp_path / "f", per_class=4)
    first = load_dataset(tmp_path / "f", image_size=16)
    import cnnkit.decode as decode  # the folder's files are decoded by decode.decode_files

    def boom(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(decode, "decode_image", boom)
    second = load_dataset(tmp_path / "f", image_size=16)
    assert torch.equal(first.train.images, second.train.images)
    # touching a file changes the key: decoding happens again (and here fails loudly for every file)
    (tmp_path / "f" / "a" / "0.png").write_bytes((tmp_path / "f" / "a" / "1.png").read_bytes())
    with pytest.raises(CnnkitError, match="none of the"):
        load_dataset(tmp_path / "f", image_size=16)


def make_plain_folder(root, per_class=6, size=24):
    rng = np.random.default_rng(0)
    for c, colour in (("a", (220, 30, 30)), ("b", (30, 30, 220))):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def make_bad_folder(root):
    """Valid images plus every awkward file the issue lists."""
    make_plain_folder(root)
    a = root / "a"
    (a / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    (a / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (a / "notes.jpg").write_text("this is text, not a picture\n")
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(a / "sixteen-bit.png")  # mid grey, 16-bit
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(a / "cmyk.jpg", "JPEG")  # pure red in CMYK
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(a / "rgba.png")
    upright = np.zeros((40, 20, 3), np.uint8)  # 20 wide, 40 tall: top red, bottom blue
    upright[:20] = (255, 0, 0)
    upright[20:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(a / "exif-rotated.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (20, 20), (200, 30, 30)).save(a / "Bild mit Ümläut ß 1.png")


def test_bad_and_odd_files_are_skipped_or_converted(tmp_path):
    make_bad_folder(tmp_path / "bad")
    ds = load_dataset(tmp_path / "bad", image_size=20, channels=3, test_split=0.0001, val_split=0.0001)
    skipped = sorted(p.split("/")[-1] for p, _ in ds.skipped)
    assert skipped == ["notes.jpg", "truncated.jpg", "zero.jpg"]
    split_of = {}
    for split in (ds.train, ds.val, ds.test):
        for i, p in enumerate(split.paths):
            split_of[p.split("/")[-1]] = split.images[i].int()
    assert abs(split_of["sixteen-bit.png"].float().mean().item() - 128) < 2  # rescaled, not clipped to 255
    r, g, b = split_of["cmyk.jpg"].float().mean(dim=(1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60
    rgba = split_of["rgba.png"]
    assert rgba[:, :, :8].float().mean(dim=(1, 2)).tolist() == pytest.approx([255, 0, 0], abs=2)
    assert rgba[:, :, 12:].float().mean(dim=(1, 2)).tolist() == pytest.approx([255, 255, 255], abs=2)  # white
    rot = split_of["exif-rotated.jpg"].float()
    assert rot[0, 0, :].mean() > 200 and rot[2, 0, :].mean() < 60  # top row red: upright
    assert rot[2, -1, :].mean() > 200 and rot[0, -1, :].mean() < 60  # bottom row blue
    assert "Bild mit Ümläut ß 1.png" in split_of


def test_bad_folder_trains_and_lists_skipped_files(tmp_path):
    make_bad_folder(tmp_path / "bad")
    r = run_main("train", "--data", str(tmp_path / "bad"), "--model", "linear", "--image-size", "16",
                "--epochs", "2", "--out", str(tmp_path / "run"), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    import json
    result = json.loads(r.stdout)
    assert sorted(p.split("/")[-1] for p, _ in result["skipped"]) == ["notes.jpg", "truncated.jpg", "zero.jpg"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "skipped 3 file(s)" in log and "truncated.jpg" in log


def test_empty_folder_and_single_class_are_refused(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    with pytest.raises(CnnkitError, match="no images"):
        load_dataset(tmp_path / "empty")
    make_plain_folder(tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "b")
    r = run_main("train", "--data", str(tmp_path / "one"), "--model", "linear")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "one class" in r.stderr


def test_stratified_split_is_seeded_and_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    keep, hold = stratified_split(labels, 0.2, seed=3)
    keep2, hold2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(hold, hold2) and len(np.intersect1d(keep, hold)) == 0
    assert np.bincount(labels[hold]).tolist() == [20, 10, 6, 4]
    assert not np.array_equal(hold, stratified_split(labels, 0.2, seed=4)[1])


def test_unknown_dataset_and_model_list_the_known_ones():
    r = run_main("train", "--data", "imagenet-22k")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "mnist, fashion-mnist, cifar10, digits" in r.stderr
    r = run_main("train", "--model", "resnet9000")
    assert r.returncode == 2 and "seed-mnist-keras" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Fashion-MNIST verification
def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00000800 + ndim, big-endian dims, data."""
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def test_fashion_mnist_accepts_the_archive_a_recompressed_and_an_uncompressed_copy(tmp_path, monkeypatch):
    """Issue 10: a copy is accepted by the published archive md5 OR the md5 of its content, so a
    re-compressed (`gzip -n`) or uncompressed copy of the same bytes loads, and one flipped byte is
    refused by name of the content check. The IDX files are built here, their md5s put in place of
    the real ones."""
    import hashlib

    from cnnkit.data import builtin
    rng = np.random.default_rng(0)
    contents = {"train_images": idx_bytes(rng.integers(0, 256, (40, 28, 28))),
                "train_labels": idx_bytes(np.arange(40) % 10),
                "test_images": idx_bytes(rng.integers(0, 256, (20, 28, 28))),
                "test_labels": idx_bytes(np.arange(20) % 10)}
    archives = {k: gzip.compress(v, mtime=1_000_000) for k, v in contents.items()}  # "the official .gz"
    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    monkeypatch.setattr(builtin, "FASHION_FILES", {
        k: builtin.Remote(r.name, md5(archives[k]), md5(contents[k])) for k, r in builtin.FASHION_FILES.items()})
    names = {k: r.name for k, r in builtin.FASHION_FILES.items()}

    def folder(name: str, files: dict[str, tuple[str, bytes]]) -> Path:
        d = tmp_path / name / "fashion-mnist"
        d.mkdir(parents=True)
        for file_name, blob in files.values():
            (d / file_name).write_bytes(blob)
        return d.parent

    original = folder("original", {k: (names[k], archives[k]) for k in names})
    recompressed = folder("recompressed", {k: (names[k], gzip.compress(v, mtime=0)) for k, v in contents.items()})
    assert all(md5((recompressed / "fashion-mnist" / names[k]).read_bytes()) != md5(archives[k]) for k in names)
    plain = folder("plain", {k: (names[k][:-3], v) for k, v in contents.items()})  # train-images-idx3-ubyte
    for d in (original, recompressed, plain):
        ds = load_dataset("fashion-mnist", data_dir=d, download=False)
        assert len(ds.train) + len(ds.val) == 40 and ds.test.labels.tolist() == list(np.arange(20) % 10)
        assert ds.class_names[0] == "T-shirt/top"

    flipped = bytearray(contents["test_images"])
    flipped[500] ^= 0xFF
    bad = folder("bad", {**{k: (names[k], archives[k]) for k in names},
                         "test_images": (names["test_images"], gzip.compress(bytes(flipped)))})
    with pytest.raises(CnnkitError) as err:
        load_dataset("fashion-mnist", data_dir=bad, download=False)
    msg = str(err.value)
    assert "decompressed content md5" in msg and md5(contents["test_images"]) in msg and "archive md5" in msg
    assert "truncated" not in msg  # it is not truncated: the message must not say so
    (plain / "fashion-mnist" / names["test_images"][:-3]).write_bytes(bytes(flipped))
    with pytest.raises(CnnkitError, match="content md5"):
        load_dataset("fashion-mnist", data_dir=plain, download=False)


def test_decoded_idx_cache_is_used_and_follows_the_files(tmp_path, isolated_cache, monkeypatch):
    """The second load reads the decoded tensors without verifying or gunzipping again; a changed
    file (new size or mtime) is verified and decoded afresh, and a damaged copy is refused."""
    from cnnkit.data import builtin
    d = tmp_path / "mnist"
    shutil.copytree(shared("mnist"), d)
    first = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert len(list((isolated_cache / "decoded").glob("mnist-*.safetensors"))) == 1
    calls = []
    real = builtin.read_verified
    monkeypatch.setattr(builtin, "read_verified", lambda *a: calls.append(a) or real(*a))
    second = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert calls == [] and torch.equal(first.test.images, second.test.images)
    blob = bytearray(gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    blob[-1] = (blob[-1] + 1) % 10
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(blob)))
    with pytest.raises(CnnkitError, match="checksum"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert len(calls) >= 1
