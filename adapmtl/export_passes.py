"""Graph passes of the sparse export (`adapmtl.export_sparse`): the rewrites an inference engine makes before it
runs a model, done once on the model itself so that every runtime that runs our export gets them.

fold_batchnorm: a BatchNorm2d (eval: a per-channel affine map with its running statistics) that reads only a
Conv2d's output is folded into that conv's weight and bias and replaced by nn.Identity. A per-output-channel
scale keeps every zero weight zero, so the folded conv is exactly as sparse as before. The data flow comes from a
torch.fx trace; the model keeps its class, modules and forward (only the folded BatchNorms become Identity).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from adapmtl.export_format import ExportTracer


def conv_bn_pairs(model: nn.Module, concrete_args: dict | None = None) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm2d's only input is the output of a plain Conv2d that
    nothing else reads, each module called once in the forward (so folding changes no other path)."""
    graph = ExportTracer().trace(model, concrete_args=concrete_args)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 and calls[src.target] == 1):
            continue
        if type(model.get_submodule(src.target)) is nn.Conv2d:
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, concrete_args: dict | None = None) -> list[tuple[str, str]] | None:
    """Fold, in place, every BatchNorm2d that follows a Conv2d into it (module docstring). The model must be in
    eval mode (BatchNorm with its running statistics). Returns the folded (conv, batchnorm) pairs, or None when
    the forward cannot be traced by torch.fx (then nothing is changed)."""
    if model.training:
        raise ValueError("fold_batchnorm: the model must be in eval mode (BatchNorm folds with its running statistics)")
    try:
        pairs = conv_bn_pairs(model, concrete_args)
    except Exception:  # noqa: BLE001 - fx raises many kinds on untraceable code: then no folding
        return None
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:  # batch statistics even in eval: not an affine map
            continue
        # in float64, rounded once to the conv's dtype
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        dtype = conv.weight.dtype
        conv.weight = nn.Parameter((conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(dtype),
                                   requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        folded.append((conv_name, bn_name))
    return folded
