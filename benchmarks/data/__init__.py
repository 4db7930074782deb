"""Data: augmentation speed against kornia, duplicate signatures, label noise, lossless images against
their JPEG copies. `python -m benchmarks.data.<name> --help`."""
