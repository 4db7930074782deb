"""Grad-CAM against trusted references (CAM on a global-average-pooling network, PyTorch's own
interpolation), and the issue's sanity check on real MNIST digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnkit
from cnnkit import explain as ex
from cnnkit.models import build_model, get_spec
from conftest import shared


def test_grid_for_same_padding_and_pooling_equals_torch_interpolate():
    """conv 'same' then 2x2 pooling: cell i covers pixels 2i and 2i+1, which is exactly what
    F.interpolate(align_corners=False) assumes; the two resamplings must agree."""
    model = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    site = [s for s in ex.trace(model, (1, 28, 28)) if s.is_conv][-1]
    geometry = ex.grid_geometry(model, (1, 28, 28), site)
    assert geometry == [(0.5, 2.0), (0.5, 2.0)]
    cam = torch.rand(3, 1, 14, 14)
    ours = ex.to_input_grid(cam, geometry, (28, 28))
    torch.testing.assert_close(ours, F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[:, 0])


def test_grid_for_valid_convolutions_is_the_central_part():
    """Two valid 3x3 convs map 28 pixels to 24 cells centred on pixels 2..25: a map stretched over
    the whole image would put every stroke up to 2 pixels off."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 24 * 24, 3))
    site = [s for s in ex.trace(model, (1, 28, 28)) if s.is_conv][-1]
    assert ex.grid_geometry(model, (1, 28, 28), site) == [(2.0, 1.0), (2.0, 1.0)]
    cam = torch.zeros(1, 1, 24, 24)
    cam[0, 0, 5, 7] = 1
    heat = ex.to_input_grid(cam, [(2.0, 1.0), (2.0, 1.0)], (28, 28))
    assert heat[0].argmax().item() == (5 + 2) * 28 + (7 + 2)


def test_gradcam_equals_cam_on_a_global_average_pooling_network():
    """Selvaraju et al. show Grad-CAM reduces to CAM (Zhou et al. 2016) when the features go through
    global average pooling into a linear classifier: alpha_k = w_ck / (h w)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
    classifier = nn.Linear(6, 5)
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier).eval()
    x = torch.randn(4, 3, 16, 16)
    classes = torch.tensor([0, 1, 2, 4])
    heat, logits = ex.gradcam(model, x, classes)
    with torch.no_grad():
        maps = features(x)  # (4, 6, 16, 16)
        cam = F.relu(torch.einsum("nk,nkhw->nhw", classifier.weight[classes], maps))
        cam = ((cam - cam.flatten(1).amin(1).view(-1, 1, 1))
               / (cam.flatten(1).amax(1) - cam.flatten(1).amin(1)).view(-1, 1, 1))
    torch.testing.assert_close(heat, cam, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, model(x))


def test_gradcam_of_a_batch_equals_one_image_at_a_time():
    torch.manual_seed(1)
    model = build_model(get_spec("seed-cifar10"), 10, in_channels=3, image_size=(32, 32)).eval()  # with BatchNorm
    x = torch.randn(5, 3, 32, 32)
    batch, _ = ex.gradcam(model, x)
    single = torch.cat([ex.gradcam(model, x[i:i + 1])[0] for i in range(5)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch, size", [("vgg11", 32), ("resnet18", 32), ("alexnet", 63), ("mobilenet_v2", 32)])
def test_gradcam_runs_on_the_classic_networks(arch, size):
    """In-place ReLUs (AlexNet, VGG) and residual blocks must not break the hooks."""
    torch.manual_seed(0)
    model = build_model(get_spec(arch), 4, in_channels=3, image_size=(size, size)).eval()
    heat, logits = ex.gradcam(model, torch.randn(2, 3, size, size))
    assert heat.shape == (2, size, size) and logits.shape == (2, 4)
    assert heat.min() >= 0 and heat.max() <= 1 and torch.isfinite(heat).all()
    site = ex.gradcam_site(ex.trace(model, (3, size, size)))
    assert site.shape[1] > 1  # a map with spatial extent, before global pooling


@pytest.mark.slow
@pytest.mark.heavy  # about 60 s: run by CI after the suite (pyproject markers), so the suite stays under 15 min
def test_gradcam_points_at_the_digit_on_mnist(tmp_path):
    """The issue's sanity check: for correctly classified MNIST test digits, at least 70% of the
    heatmap mass lies inside the bounding box of the digit's non-zero pixels (mean over 200 images);
    the same network with random weights does not manage it."""
    run = cnnkit.train(cnnkit.TrainConfig(data="mnist", model="mnist-examples", epochs=2, data_dir=str(shared()),
                                          report=False, out=str(tmp_path / "run")), quiet=True)
    model, meta = cnnkit.load_model(run.run_dir)
    test = run.dataset.test
    x = cnnkit.Preprocess.from_info(meta)(test.images[:400])
    masks = test.images[:400, 0] > 0

    def mean_mass(net) -> float:
        heat, logits = ex.gradcam(net.eval(), x)
        correct = (logits.argmax(1) == test.labels[:400]).nonzero()[:, 0][:200]
        assert len(correct) == 200 or net is not model
        return ex.mass_inside_box(heat[correct], masks[correct]).mean().item()

    trained = mean_mass(model)
    torch.manual_seed(0)
    random = mean_mass(build_model(get_spec("mnist-examples"), 10, in_channels=1, image_size=(28, 28)))
    uniform = ex.mass_inside_box(torch.ones(200, 28, 28), masks[:200]).mean().item()
    print(f"Grad-CAM mass inside the digit's box: trained {trained:.3f}, random {random:.3f}, uniform {uniform:.3f}")
    assert trained >= 0.70
    assert random < 0.70
