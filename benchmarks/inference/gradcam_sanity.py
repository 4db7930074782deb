"""Grad-CAM sanity on MNIST, for the registered MNIST networks: the share of heatmap mass inside the
bounding box of each digit's non-zero pixels, mean over the first 200 correctly classified test
digits, for the network trained 2 epochs and for the same network with random weights (seed 0).
The protocol of tests/test_explain.py::test_gradcam_points_at_the_digit_on_mnist. The column
'stretched' places the map by a plain resize over the whole image instead of by the layer's
geometry (what cnnkit does), to show what the geometry is worth.

    python -m benchmarks.inference.gradcam_sanity [--models mnist-examples seed-mnist-torch seed-mnist-keras]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import cnnkit
from benchmarks.common import SHARED_DATA, machine_header
from cnnkit import explain as ex
from cnnkit.models import build_model, get_spec

def mean_mass(model, x, labels, masks, geometry=None) -> float:
    heat, logits = ex.gradcam(model.eval(), x, geometry=geometry)
    correct = (logits.argmax(1) == labels).nonzero()[:, 0][:200]
    return ex.mass_inside_box(heat[correct], masks[correct]).mean().item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["mnist-examples", "seed-mnist-torch", "seed-mnist-keras"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    args = p.parse_args()
    print(f"{'network':<18} {'Grad-CAM layer':<16} {'map':>9} {'trained':>8} {'stretched':>9} {'random':>8} "
          f"{'uniform':>8}")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            run = cnnkit.train(cnnkit.TrainConfig(data="mnist", model=name, epochs=args.epochs, data_dir=args.data_dir,
                                                  out=str(Path(tmp) / "run")), quiet=True)
            model, meta = cnnkit.load_model(run.run_dir)
        test = run.dataset.test
        x = cnnkit.Preprocess.from_meta(meta)(test.images[:400])
        labels, masks = test.labels[:400], test.images[:400, 0] > 0
        site = ex.gradcam_site(ex.trace(model, (1, 28, 28)))
        trained = mean_mass(model, x, labels, masks)
        # F.interpolate(align_corners=False)'s placement: cells tile the whole image
        stretch = [((28 / n - 1) / 2, 28 / n) for n in site.shape[1:]]
        stretched = mean_mass(model, x, labels, masks, geometry=stretch)
        torch.manual_seed(0)
        random = mean_mass(build_model(get_spec(name), 10, in_channels=1, image_size=(28, 28)), x, labels, masks)
        uniform = ex.mass_inside_box(torch.ones(200, 28, 28), masks[:200]).mean().item()
        shape = "x".join(map(str, site.shape[1:]))
        print(f"{name:<18} {site.name:<16} {shape:>9} {trained:8.3f} {stretched:9.3f} {random:8.3f} {uniform:8.3f}",
              flush=True)


if __name__ == "__main__":
    machine_header()
    main()
