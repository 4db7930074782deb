"""Per-layer output shapes, parameter counts and multiply-adds, as in the notes' cheat sheet:
conv F*(kh*kw*d_in + 1), dense d_out*(d_in + 1), batchnorm 4*d_in (2*d_in trainable: gamma and beta;
the running mean and variance are the other two), pooling, flatten and dropout 0."""
from __future__ import annotations

import torch
import torch.nn as nn

from .spec import SpecNet


def count_params(module: nn.Module) -> tuple[int, int]:
    """(all, trainable), counting float buffers such as BatchNorm's running statistics as
    non-trainable parameters, as Keras and the notes do."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return trainable + frozen + buffers, trainable


def layer_formula(module: nn.Module) -> str:
    """The cheat-sheet formula behind a layer's parameter count, with its numbers."""
    parts = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            d_in = m.in_channels // m.groups
            n = m.out_channels * (kh * kw * d_in + (1 if m.bias is not None else 0))
            parts.append(f"F·(kh·kw·d_in + 1) = {m.out_channels}·({kh}·{kw}·{d_in} + 1) = {n:,}")
        elif isinstance(m, nn.Linear):
            n = m.out_features * (m.in_features + (1 if m.bias is not None else 0))
            parts.append(f"d_out·(d_in + 1) = {m.out_features}·({m.in_features} + 1) = {n:,}")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            parts.append(f"4·d_in = 4·{m.num_features} = {4 * m.num_features:,} ({2 * m.num_features:,} trainable)")
    return "; ".join(parts) if parts else "0 (no parameters)"


def summary_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(description, module)] of the rows: a spec's layers; a kNN model's network's rows (less its
    head, which never runs: the rows that never run are dropped) and its vote; else the top-level
    children, with a ModuleList's members (it is never called itself)."""
    from .knn import KnnClassifier
    if isinstance(model, SpecNet):
        return list(zip(model.descriptions, model.layers))
    if isinstance(model, KnnClassifier):
        return [(f"backbone {d}", m) for d, m in summary_blocks(model.backbone)] + [("vote (KnnVote)", model.vote)]
    blocks = []
    for name, m in model.named_children():
        if isinstance(m, nn.ModuleList):
            blocks += [(f"{name}.{i} ({type(sub).__name__})", sub) for i, sub in enumerate(m)]
        else:
            blocks.append((f"{name} ({type(m).__name__})", m))
    return blocks


def summary(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> dict:
    """{'input', 'layers': [{index, layer, output_shape, params, trainable_params, macs}], totals}.

    macs counts multiply-adds of conv and dense layers for one image (the bias adds are not counted)."""
    if input_shape is None:
        input_shape = model.input_shape
    blocks = summary_blocks(model)
    shapes: dict[int, tuple] = {}
    macs_of: dict[int, int] = {}

    def leaf_hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs_of[id(module)] = output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            macs_of[id(module)] = module.in_features * module.out_features

    def block_hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        shapes.setdefault(id(module), (len(shapes), tuple(out.shape[1:])))  # (call order, shape)

    handles = [m.register_forward_hook(leaf_hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles += [m.register_forward_hook(block_hook) for _, m in blocks]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = []
    # in the order they ran; blocks that never ran (inactive auxiliary heads) are left out
    blocks = sorted(((desc, m) for desc, m in blocks if id(m) in shapes), key=lambda b: shapes[id(b[1])][0])
    for i, (desc, m) in enumerate(blocks):
        shape = shapes[id(m)][1]
        total, trainable = count_params(m)
        macs = sum(macs_of.get(id(sub), 0) for sub in m.modules())
        layers.append({"index": i + 1, "layer": desc, "output_shape": list(shape),
                       "params": total, "trainable_params": trainable, "macs": macs, "formula": layer_formula(m)})
    total, trainable = count_params(model)
    # total_params follows the notes' cheat sheet (BatchNorm's running statistics count, 4 per
    # channel); parameters is PyTorch's count, the convention of published figures (ResNet-18: 11,689,512).
    return {"input": list(input_shape), "layers": layers, "total_params": total,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_params": trainable, "non_trainable_params": total - trainable,
            "macs_per_image": sum(l["macs"] for l in layers)}


def format_summary(info: dict, title: str = "", formulas: bool = False) -> str:
    rows = [("#", "layer", "output shape", "params", "mult-adds")]
    rows.append(("", "input", "x".join(map(str, info["input"])), "", ""))
    for l in info["layers"]:
        rows.append((str(l["index"]), l["layer"], "x".join(map(str, l["output_shape"])),
                     f"{l['params']:,}", f"{l['macs']:,}" if l["macs"] else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [title] if title else []
    for j, r in enumerate(rows):
        lines.append("  ".join(r[i].rjust(widths[i]) if i in (0, 3, 4) else r[i].ljust(widths[i]) for i in range(5)))
        if j == 0:
            lines.append("-" * (sum(widths) + 8))
    lines.append("-" * (sum(widths) + 8))
    if formulas:
        lines.append("parameter counts, the cheat sheet's formulas:")
        lines += [f"{l['index']:>3}  {l['layer']}: {l['formula']}" for l in info["layers"]]
    lines.append(f"total params {info['total_params']:,} (trainable {info['trainable_params']:,}, "
                 f"non-trainable {info['non_trainable_params']:,}; PyTorch parameters {info['parameters']:,}); "
                 f"multiply-adds per image {info['macs_per_image']:,}")
    return "\n".join(lines)
