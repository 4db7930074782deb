"""cnnkit's benchmarks: scripts that measure cnnkit on this machine, grouped by what they measure.

  training/   training speed, time to accuracy, recipes, precision and kernel choices
  inference/  prediction speed, runtimes, export parity, Grad-CAM
  serving/    `cnnkit serve` under load
  data/       augmentation speed, duplicate signatures, label noise, lossless against JPEG

Run one as a module from the repository root, e.g.

    python -m benchmarks.training.time_to_accuracy --seeds 0 1 2

Every script prints the machine line first (benchmarks.common.machine_header), then its figures;
benchmarks/NOTES.md holds what they measured. What two scripts share lives in benchmarks/common.py.
"""
