"""Embeddings and nearest-neighbour models: every architecture's embed is the input its head
receives (a forward hook, the reference) and classify(embed(x)) is its logits; `cnnkit embed` writes
those features L2-normalised, row for row with a reference computed by hand; a kNN model built by
`cnnkit train --model knn:RUN` is a model file like any other (load_model, predict, export parity);
with k = 1 it returns its own support images' labels; and a network trained on MNIST digits 0-4
gives digits 5-9, five images a digit, well above chance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnnkit.models.registry import build_model
from conftest import run_main, shared, write_mnist_pair

# One network of each family (models/base.py's contract), at a small input: the specs (a plain
# Sequential), LeNet-5 and AlexNet (a dense classifier stack; VGG's is AlexNet's), NiN (a conv
# head on the whole map), GoogLeNet (aux heads), ResNet, MobileNetV2 and EfficientNet-Lite0, speedrun.
FAMILIES = [("fast-mnist", 1, 28), ("mlp", 1, 28), ("lenet5", 1, 28), ("alexnet", 3, 63), ("nin", 3, 67),
            ("googlenet", 3, 32), ("resnet18", 3, 16), ("mobilenet_v2", 3, 16), ("efficientnet_lite0", 3, 16),
            ("speedrun-small", 3, 32)]


@pytest.mark.parametrize("name,channels,side", FAMILIES)
def test_embed_is_what_the_head_receives_and_classify_gives_the_logits(name, channels, side):
    torch.manual_seed(0)
    model = build_model(name, 3, in_channels=channels, image_size=side)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        model.train()(torch.randn(4, channels, side, side))
    model.eval()
    x = torch.randn(2, channels, side, side)
    received = []
    hook = model.head.register_forward_pre_hook(lambda module, inputs: received.append(inputs[0]))
    with torch.no_grad():
        logits = model(x)
        features = model.embed(x)
    hook.remove()
    assert features.ndim == 2 and features.shape[0] == 2
    assert torch.equal(received[0].flatten(1), features)  # NiN's head takes the map: flattened, it is embed's
    with torch.no_grad():
        assert torch.equal(model.classify(features), logits)


def test_the_vote_is_continuous_where_neighbours_swap_places():
    """Two support images of two classes, a query moving across the line between them: with k = 1
    the plain nearest-neighbour rule jumps from one class to the other; cnnkit's vote passes through
    (0.5, 0.5), so float rounding near a tie (an export, another runtime) moves it by little."""
    from cnnkit.models.knn import KnnVote
    vote = KnnVote(2, 2, 2, 1)
    theta = 0.3
    vote.support.copy_(torch.tensor([[np.cos(theta), np.sin(theta)], [np.cos(theta), -np.sin(theta)]]))
    vote.labels.copy_(torch.tensor([0, 1]))
    def probs(angle):
        return torch.softmax(vote(torch.tensor([[np.cos(angle), np.sin(angle)]], dtype=torch.float32)), 1)[0]
    above, below = probs(1e-6), probs(-1e-6)  # similarities 1.2e-6 apart: the plain rule's probabilities differ by 1
    assert float((above - below).abs().max()) < 0.01 and abs(float(above[0]) - 0.5) < 0.01
    assert probs(theta)[0] > 0.99 and probs(-theta)[1] > 0.99  # on a support image: its class


def test_shots_are_drawn_per_class_by_the_seed():
    from cnnkit.knn import few_shot_indices
    labels = np.repeat([0, 1, 2], [10, 3, 7])
    keep, short = few_shot_indices(labels, 3, 5, seed=0)
    assert sorted(np.bincount(labels[keep]).tolist()) == [3, 5, 5] and short == [1]
    assert np.array_equal(keep, few_shot_indices(labels, 3, 5, seed=0)[0])
    assert not np.array_equal(keep, few_shot_indices(labels, 3, 5, seed=1)[0])


# ----------------------------------------------------------------------------- a 0-4 network, kNN runs on 5-9
OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """{old_run, new_labels, knn_run}: fast-mnist trained on MNIST digits 0-4 (600 images, 2 epochs),
    and `cnnkit train --model knn:old_run --shots 5` on digits 5-9 (400 test images)."""
    base = tmp_path_factory.mktemp("digits")
    old_labels = write_mnist_pair(base / "old", classes=OLD, train=600, test=100)
    new_labels = write_mnist_pair(base / "new", classes=NEW, train=500, test=400)
    old_run, knn_run = base / "old-run", base / "knn-run"
    r = run_main("train", "--data", str(old_labels), "--model", "fast-mnist", "--image-size", "28", "--channels", "1",
                 "--epochs", "2", "--batch-size", "64", "--lr", "0.01", "--schedule", "onecycle", "--no-report",
                 "--quiet", "--out", str(old_run))
    assert r.returncode == 0, r.stderr
    r = run_main("train", "--data", str(new_labels), "--model", f"knn:{old_run}", "--shots", "5", "--seed", "0",
                 "--no-report", "--quiet", "--out", str(knn_run))
    assert r.returncode == 0, r.stderr
    return {"old_run": old_run, "new_labels": new_labels, "knn_run": knn_run}


def test_few_shot_digits_from_a_network_that_never_saw_them(digits):
    """5 images a digit of 5-9, on the features of a network trained on 0-4: far above chance (0.2)."""
    from cnnkit import read_info
    metrics = json.loads((digits["knn_run"] / "metrics.json").read_text())
    assert metrics["test_n"] == 400 and metrics["test_split"] == "test"
    assert metrics["test_accuracy"] >= 0.5, metrics["test_accuracy"]
    info = read_info(digits["knn_run"])
    record = info.architecture
    assert record["kind"] == "knn" and record["backbone"]["name"] == "fast-mnist"
    assert (record["support"], record["k"], record["num_classes"]) == (25, 20, 5)
    assert info.class_names == [f"digit{d}" for d in NEW] and info.calibrated_on == "val"
    assert "25 support images (5 per class)" in (digits["knn_run"] / "train.log").read_text()


def support_set(digits):
    """(backbone, the 25 support images and labels) exactly as the kNN run drew them."""
    from cnnkit import read_info
    from cnnkit.knn import load_knn_data
    cfg = read_info(digits["knn_run"]).train_config()
    backbone, ds, _ = load_knn_data(cfg, quiet=True)
    return backbone, ds.train.images, ds.train.labels


def test_the_model_file_holds_the_support_set_and_round_trips(digits, tmp_path):
    """The run's file: its support tensors are the backbone's normalised features of the drawn images;
    a kNN model saved and loaded gives the same logits bit for bit."""
    from cnnkit import load_model, save_model
    from cnnkit.knn import embed_images
    from cnnkit.models.knn import KnnClassifier, knn_record
    from cnnkit.models.registry import architecture_record
    model, info = load_model(digits["knn_run"])
    backbone, images, labels = support_set(digits)
    assert torch.equal(model.vote.labels, labels)
    assert torch.allclose(model.vote.support, embed_images(backbone, images), atol=1e-6)
    assert torch.allclose(model.vote.support.norm(dim=1), torch.ones(len(labels)), atol=1e-6)
    # a kNN model of k = 3 built here, saved and loaded
    support = embed_images(backbone, images)
    record = knn_record(architecture_record(backbone.model), "knn:test", len(support), support.shape[1], 5, 3)
    built = KnnClassifier(backbone.model, len(support), support.shape[1], 5, 3, record).eval()
    built.vote.support.copy_(support)
    built.vote.labels.copy_(labels)
    path = save_model(tmp_path / "knn.safetensors", built, info.to_dict() | {"architecture": record})
    loaded, loaded_info = load_model(path)
    assert loaded_info.architecture == record and loaded.vote.k == 3
    loaded = loaded.to(memory_format=torch.channels_last)  # as embed_images left the backbone
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), built(x))


def test_with_k_1_the_support_images_get_their_own_labels(digits):
    from cnnkit.inference import predict_logits
    from cnnkit.knn import embed_images
    from cnnkit.models.knn import KnnClassifier, knn_record
    from cnnkit.models.registry import architecture_record
    backbone, images, labels = support_set(digits)
    support = embed_images(backbone, images)
    record = knn_record(architecture_record(backbone.model), "knn:test", len(support), support.shape[1], 5, 1)
    model = KnnClassifier(backbone.model, len(support), support.shape[1], 5, 1, record).eval()
    model.vote.support.copy_(support)
    model.vote.labels.copy_(labels)
    assert torch.equal(predict_logits(model, images, backbone.preprocess).argmax(1), labels)


def test_predict_and_export_take_a_knn_model(digits, tmp_path):
    """predict labels digit files as the model file's own forward does; the ONNX export (TopK and
    MatMul in the graph) passes its parity proof on the validation split."""
    from cnnkit import load_model
    from cnnkit.inference import probabilities
    from cnnkit.decode import decode_image
    files = sorted((digits["new_labels"].parent / "test").glob("*.png"))[:6]
    r = run_main("predict", str(digits["knn_run"]), *map(str, files), "--json", "--runtime", "torch")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    model, info = load_model(digits["knn_run"])
    images = torch.from_numpy(np.stack([decode_image(f, 28, 1) for f in files]))
    want = probabilities(model, info, images)
    for row, p in zip(rows, want):
        assert row["labels"][0] == info.class_names[int(p.argmax())]
        assert row["probabilities"][0] == pytest.approx(float(p.max()), abs=1e-5)
    r = run_main("export", str(digits["knn_run"]), "--format", "onnx", "--out", str(tmp_path / "knn.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["passed"] and result["agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4, result
    assert result["n"] > 0 and "validation images" in result["checked_on"]


def reference_features(model, mean, std, side: int, channels: int, files) -> np.ndarray:
    """Features of image files computed directly: decode, (x / 255 - mean) / std, embed, / norm."""
    from cnnkit.decode import decode_image
    x = torch.from_numpy(np.stack([decode_image(f, side, channels) for f in files])).float() / 255
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    with torch.no_grad():
        f = model.eval().embed((x - mean) / std)
    return (f / f.norm(dim=1, keepdim=True)).numpy()


def test_embed_writes_normalised_features_in_the_sidecars_order(digits, tmp_path):
    """A folder of digits and a broken file: the broken one is reported and skipped, each row is the
    reference's features of the file its sidecar names, of unit length; a kNN model's file embeds as
    its network does."""
    from cnnkit import load_model
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted((digits["new_labels"].parent / "test").glob("*.png"))[:7]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "emb.npy"
    r = run_main("embed", str(digits["old_run"]), str(folder), "--out", str(out), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert "broken.png: skipped:" in r.stderr
    summary, side = json.loads(r.stdout), json.loads((tmp_path / "emb.json").read_text())
    assert (summary["embedded"], summary["errors"], summary["dim"]) == (7, 1, 256)
    features = np.load(out)
    assert features.dtype == np.float32 and features.shape == (7, 256)
    assert side["paths"] == sorted(str(p) for p in folder.glob("0*.png"))
    assert side["skipped"][0][0].endswith("broken.png")
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-6)
    model, info = load_model(digits["old_run"])
    reference = reference_features(model, info.preprocessing.mean, info.preprocessing.std, 28, 1, side["paths"])
    assert np.allclose(features, reference, atol=1e-5)
    r = run_main("embed", str(digits["knn_run"]), *side["paths"], "--out", str(tmp_path / "knn.npy"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert np.allclose(np.load(tmp_path / "knn.npy"), features, atol=1e-6)  # the same network, the same features


def test_embed_takes_the_pretrained_network(tmp_path):
    """`embed efficientnet_lite0`: ImageNet features (1280) of two photos without any training."""
    from cnnkit.knn import load_backbone
    files = sorted(shared("hymenoptera", "val", "bees").glob("*.jpg"))[:2]
    out = tmp_path / "bees.npy"
    r = run_main("embed", "efficientnet_lite0", *map(str, files), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2 of 2 file(s) embedded by efficientnet_lite0 (1280 features" in r.stdout
    backbone = load_backbone("efficientnet_lite0")
    mean, std = backbone.preprocess.mean, backbone.preprocess.std
    assert mean == [127 / 255] * 3 and std == [128 / 255] * 3  # the TensorFlow-Lite convention of these weights
    assert np.allclose(np.load(out), reference_features(backbone.model, mean, std, 224, 3, files), atol=1e-5)


def test_refusals_are_one_line(tmp_path, digits):
    from PIL import Image
    multi = tmp_path / "multi"
    multi.mkdir()
    rows = ["path,label"]
    for i, labels in enumerate(["a;b", "a", "b", "a;b", "a", "b"] * 2):
        Image.new("L", (28, 28), 40 * (i % 6)).save(multi / f"{i}.png")
        rows.append(f"{i}.png,{labels}")
    (multi / "labels.csv").write_text("\n".join(rows) + "\n")
    cases = [
        (["train", "--data", str(multi / "labels.csv"), "--model", f"knn:{digits['old_run']}", "--out",
          str(tmp_path / "r1")], "a kNN model is single-label"),
        (["train", "--data", str(digits["new_labels"]), "--model", "fast-mnist", "--shots", "5"],
         "--shots takes N training images per class"),
        (["train", "--data", str(digits["new_labels"]), "--model", f"knn:{tmp_path / 'none'}"], "no model file"),
        (["train", "--data", str(digits["new_labels"]), "--model", f"knn:{digits['old_run']}", "--image-size", "32"],
         "a kNN model takes its network's input (1x28x28)"),
        (["embed", str(digits["old_run"]), str(tmp_path), "--out", str(tmp_path / "e.csv")], "give a .npy file"),
    ]
    for args, message in cases:
        r = run_main(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "r1").exists()  # refused before the run folder exists
