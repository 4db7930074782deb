"""How much memory a model needs, counted on the meta device before anything is allocated.

Model files and flags can ask for any size (a file claiming 10^12 filters, `--image-size 100000`);
torch would try to allocate it and fail with an allocator error, or the kernel would kill the
process. These estimates let the loader and the trainer refuse first, saying what would fit:

    activation_numel(model, (C, H, W))      values every layer outputs for one image (meta forward)
    inference_bytes / training_bytes(...)   fp32 estimates, upper bounds rather than exact peaks

The model must live on the meta device (built under `with torch.device("meta")`): shapes propagate,
nothing is computed or allocated.
"""
from __future__ import annotations

import torch
import torch.nn as nn

FLOAT_BYTES = 4  # fp32 weights and activations; bf16 autocast halves some of them, so this bounds both
OPTIMIZER_COPIES = 4  # weights, gradients and Adam's two moments (SGD with momentum needs one fewer)
BACKWARD_FACTOR = 2  # activations kept for backward, and their gradients


def param_numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def activation_numel(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Sum over every leaf module of its output's values, for one image of input_shape (C, H, W).
    Raises what the forward pass raises if the input does not fit the model."""
    total = [0]

    def hook(module, inputs, output):
        for out in (output if isinstance(output, (tuple, list)) else (output,)):
            if torch.is_tensor(out):
                total[0] += out[0].numel() if out.ndim else 1

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(1, *input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def inference_bytes(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 1) -> int:
    c, h, w = input_shape
    return FLOAT_BYTES * (param_numel(model) + batch * (activation_numel(model, input_shape) + c * h * w))


def training_bytes(model: nn.Module, input_shape: tuple[int, int, int], batch: int) -> int:
    c, h, w = input_shape
    return FLOAT_BYTES * (OPTIMIZER_COPIES * param_numel(model)
                          + batch * (BACKWARD_FACTOR * activation_numel(model, input_shape) + 2 * c * h * w))
