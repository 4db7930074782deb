"""cnnkit: train, evaluate and use convolutional image classifiers.

    import cnnkit
    ds = cnnkit.load_dataset("digits")
    result = cnnkit.train(cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=5))
    model, info = cnnkit.load_model(result.run_dir)
    print(cnnkit.summary(model)["total_params"])

The names below are loaded on first use (PEP 562), so `import cnnkit.inference` (or the future
server) does not pull in training, reporting or matplotlib through this facade.
"""
from __future__ import annotations

import importlib

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "TrainConfig": "config", "Dataset": "data", "Split": "data", "load_dataset": "data",
    "CnnkitError": "errors",
    "load_model": "modelfile", "read_info": "modelfile", "ModelInfo": "modelfile", "save_model": "modelfile",
    "build_model": "models", "list_models": "models", "summary": "models", "Preprocess": "preprocess",
    "predict_logits": "inference", "probabilities": "inference", "train": "jobs.train", "RunResult": "jobs.train",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later look-ups skip this function
        return value
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
