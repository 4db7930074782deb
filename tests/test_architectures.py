"""The classic architectures: shapes, gradients, published parameter counts, pretrained weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cnnkit
from cnnkit import CnnkitError, build_model, summary
from cnnkit.models.pretrained import load_pretrained, read_state_dict
from cnnkit.models.zoo import ARCHS
from conftest import CodePayload, run_main, shared

PUBLISHED = {name: a.published_params for name, a in ARCHS.items() if a.published_params}


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_backward_at_smallest_size(name, channels):
    size = ARCHS[name].min_size
    torch.manual_seed(0)
    model = build_model(name, 7, in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:  # the speedrun net's whitening filters and BatchNorm scales are frozen
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    with pytest.raises(CnnkitError, match="at least"):
        build_model(name, 7, in_channels=channels, image_size=size - 1)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_imagenet_parameter_counts_equal_published(name):
    with torch.device("meta"):  # no memory for VGG's 138 M parameters
        model = build_model(name, 1000, in_channels=3, image_size=224)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "mobilenet_v2"])
def test_summary_cli_totals_at_imagenet_setting(name):
    r = run_main("summary", name, "--input", "3x224x224", "--num-classes", "1000", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["parameters"] == info["trainable_params"] == PUBLISHED[name]


def test_small_input_variant_is_chosen_for_32px():
    small = build_model("resnet18", 10, in_channels=3, image_size=32)
    big = build_model("resnet18", 10, in_channels=3, image_size=224)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert big.conv1.kernel_size == (7, 7)
    layers = summary(small)["layers"]
    assert [l for l in layers if l["layer"].startswith("layer1")][0]["output_shape"] == [64, 32, 32]


def test_googlenet_aux_heads_optional():
    model = build_model("googlenet", 5, in_channels=3, image_size=96, aux_logits=True)
    out = model.train()(torch.randn(2, 3, 96, 96))
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 5)] * 3
    assert model.eval()(torch.randn(2, 3, 96, 96)).shape == (2, 5)


def lite0_state():
    state, origin, norm = read_state_dict("efficientnet_lite0")
    return state


@pytest.mark.slow  # real photos through the ImageNet network (10 s)
def test_efficientnet_lite0_package_weights_load_strictly_and_know_ants_from_bees():
    model = build_model("efficientnet_lite0", 1000, in_channels=3, image_size=224)
    model.load_state_dict(lite0_state(), strict=True)
    info = load_pretrained(model, "efficientnet_lite0")
    ds = cnnkit.load_dataset(shared("hymenoptera"), image_size=224)
    top = cnnkit.predict_logits(model, ds.val.images, cnnkit.Preprocess(info["mean"], info["std"])).argmax(1)
    ants, bees = top[ds.val.labels == 0], top[ds.val.labels == 1]
    assert (ants == 310).float().mean() > 0.5  # ImageNet class 310: ant
    assert (bees == 309).float().mean() > 0.5  # ImageNet class 309: bee


def test_torchvision_style_file_loads_and_head_is_replaced(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet18", 1000, in_channels=3, image_size=224)
    torch.save(source.state_dict(), tmp_path / "resnet18-f37072fd.pth")  # the layout torchvision ships
    target = build_model("resnet18", 2, in_channels=3, image_size=224)
    info = load_pretrained(target, str(tmp_path / "resnet18-f37072fd.pth"))
    assert info["new_head"] and torch.equal(target.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    grey = build_model("resnet18", 2, in_channels=1, image_size=224)
    load_pretrained(grey, str(tmp_path / "resnet18-f37072fd.pth"))
    assert torch.allclose(grey.conv1.weight, source.conv1.weight.sum(1, keepdim=True))


def test_wrong_shapes_or_missing_keys_are_named(tmp_path):
    state = build_model("resnet18", 1000, in_channels=3, image_size=224).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(5, 5, 3, 3)
    del state["layer4.1.bn2.running_var"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CnnkitError,
                       match=r"missing: layer4\.1\.bn2\.running_var.*wrong shape: layer2\.0\.conv1\.weight"):
        load_pretrained(build_model("resnet18", 10, in_channels=3, image_size=224), str(tmp_path / "bad.pth"))




def test_pickle_with_code_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": CodePayload(marker)}, tmp_path / "evil.pth")
    r = run_main("train", "--data", "digits", "--model", "resnet18", "--image-size", "32",
                "--pretrained", str(tmp_path / "evil.pth"))
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_models_command_lists_counts_and_weights():
    r = run_main("models", "--json")
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert models["resnet50"]["params"] == 25_557_032 and models["seed-mnist-keras"]["params"] == 93_322
    assert models["efficientnet_lite0"]["pretrained"] == "installed"


# ----------------------------------------------------------------------------- the speedrun net
def cifar_subset_images(n: int) -> torch.Tensor:
    """The first n lossless CIFAR-10 training images, (n, 3, 32, 32) float in 0..1."""
    raw = (shared("cifar10-subset-bin") / "data_batch_1.bin").read_bytes()
    records = torch.frombuffer(bytearray(raw[:n * 3073]), dtype=torch.uint8).view(n, 3073)
    return records[:, 1:].reshape(n, 3, 32, 32).float() / 255


def test_speedrun_whitening_decorrelates_real_patches():
    """The whitening filters turn the 2x2 patches of real images into uncorrelated channels of
    variance lambda / (lambda + eps) (1 but for the smallest eigenvalues lambda), checked against
    NumPy's eigenvalues of the same patch covariance; the second half are the negatives of the first."""
    images = cifar_subset_images(1000)
    images = (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)
    model = build_model("speedrun", 10)
    model.init_from_data(images)
    with torch.no_grad():
        out = F.conv2d(images, model.whiten.weight).double()  # (N, 24, 31, 31), no bias
    first = out[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    covariance = (first @ first.T / first.shape[1]).numpy()
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double().numpy()
    eigenvalues = np.sort(np.linalg.eigvalsh(patches.T @ patches / len(patches)))[::-1]
    np.testing.assert_allclose(covariance, np.diag(eigenvalues / (eigenvalues + 5e-4)), atol=2e-3)
    assert np.diag(covariance)[:6].min() > 0.99  # the main directions: unit variance
    assert torch.equal(out[:, 12:], -out[:, :12])
    assert not model.whiten.weight.requires_grad


def test_speedrun_takes_grey_28px_images():
    """The Fashion-MNIST best recipe runs speedrun-small on 1x28x28 images: 8 whitening filters (the
    4 eigenvectors of grey 2x2 patches and their negatives) that decorrelate real patches (MNIST's
    here), and maps of 27 -> 13 -> 6 -> 3 -> 1 pixels before the logits."""
    images = cnnkit.load_dataset("mnist", data_dir=str(shared()), quiet=True).test.images[:1000].float() / 255
    images = (images - images.mean()) / images.std()
    model = build_model("speedrun-small", 10, in_channels=1, image_size=(28, 28))
    model.init_from_data(images)
    assert tuple(model.whiten.weight.shape) == (8, 1, 2, 2)
    with torch.no_grad():
        white = F.conv2d(images, model.whiten.weight[:4]).double()  # (N, 4, 27, 27)
        logits = model.eval()(images)
    flat = white.permute(1, 0, 2, 3).reshape(4, -1)
    covariance = (flat @ flat.T / flat.shape[1]).numpy()
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0, atol=2e-3)
    assert np.diag(covariance).min() > 0.9
    assert logits.shape == (1000, 10) and torch.isfinite(logits).all()


def test_speedrun_convolutions_start_as_identities():
    model = build_model("speedrun", 10)
    conv = model.features[1][0]  # the first 3x3 conv: 24 -> 64 channels
    x = torch.randn(2, conv.in_channels, 9, 9)
    with torch.no_grad():
        assert torch.equal(conv(x)[:, :conv.in_channels], x)
