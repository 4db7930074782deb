"""The contract every registered model keeps, from construction:

    model(x)            logits (N, num_classes) for float input (N, *input_shape)
    model.head          the final classifier layer (replaced and trained alone in transfer learning)
    model.embed(x)      the penultimate features (N, D): the input the head receives in model(x)
    model.classify(f)   logits from those features: model.classify(model.embed(x)) is model(x)
    model.num_classes   int
    model.input_shape   (channels, height, width) it was built for
    model.architecture  the JSON record from which registry.build_from_record rebuilds it

and `unwrap` takes off the wrappers training may add (torch.compile, DataParallel,
DistributedDataParallel), so no `_orig_mod.` or `module.` prefix reaches a model file.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Classifier(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], architecture: dict | None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(v) for v in input_shape)
        # None: built directly from Python, not through the registry; such a model can be used and
        # trained but not written to a model file (registry.architecture_record refuses it).
        self.architecture = architecture

    @property
    def head(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define its classifier head")

    # An explicit split rather than a forward hook on the head: forward is written as
    # classify(embed(x)) (a spec network's one Sequential and NiN, which takes any input size, keep
    # their own pass; tests/test_knn.py compares), so the two cannot drift apart; embed is a plain
    # function that torch.export and ONNX trace (the kNN model calls it inside its own forward), and
    # it stops before the head instead of computing the logits to throw them away.
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define embed (its penultimate features)")

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) from embed's features (N, D): the head, unless the network scales after it."""
        return self.head(features)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's OptimizedModule and (Distributed)DataParallel."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model
