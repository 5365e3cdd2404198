"""Graph passes of the sparse export (`adapmtl.export_sparse`): the rewrites an inference engine makes before it
runs a model, done once on the model itself so that every runtime that runs our export gets them.

fold_batchnorm: a BatchNorm2d (eval: a per-channel affine map with its running statistics) that reads only a
Conv2d's output is folded into that conv's weight and bias and replaced by nn.Identity. A per-output-channel
scale keeps every zero weight zero, so the folded conv is exactly as sparse as before. The data flow comes from a
torch.fx trace; the model keeps its class, modules and forward (only the folded BatchNorms become Identity).

fuse_epilogues: a SparseConv2d whose output only feeds a residual add (of a tensor of its own shape), a ReLU /
ReLU6 / hardtanh / constant clamp, or the add then one of those, takes them into its epilogue
(`SparseConv2d.clamp`, `forward(x, residual)`: the CPU kernel adds and clamps in its store, the same operations
in the same order, so the same bits). That rewrites the forward: the model gets the traced graph's code as its
forward, through a subclass of its class made for it (so it keeps its modules, containers and attributes, and
is still an instance of its class; torch.fx traces it, `save_exported` writes it; it does not pickle by name,
which would silently bring back the unfused forward). Residual adds are fused only where the shapes are known
(an example input was given); Identity modules (folded BatchNorms) are skipped.
"""
from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from adapmtl.export_format import ExportTracer
from adapmtl.nn.sparse_layers import SparseConv2d


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


_ADDS = (operator.add, torch.add)
_RELUS = (F.relu, torch.relu)


def _clamp_of(node: fx.Node, modules: dict, src: fx.Node) -> Optional[tuple]:
    """(lo, hi) when `node` is an activation of `src` alone that is a clamp (None bounds: none), else None."""
    def num(v):
        return v is None or (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v))

    args, kwargs = node.args, dict(node.kwargs)
    if not args or args[0] is not src or src in args[1:] or src in kwargs.values():
        return None
    kwargs.pop("inplace", None)
    if node.op == "call_module":
        m = modules[node.target]
        if len(args) != 1 or kwargs:
            return None
        if type(m) is nn.ReLU:
            return (0.0, None)
        if type(m) is nn.ReLU6:
            return (0.0, 6.0)
        if type(m) is nn.Hardtanh and m.min_val <= m.max_val:
            return (float(m.min_val), float(m.max_val))
        return None
    if node.op == "call_function" and node.target in _RELUS and len(args) <= 2 and not kwargs:
        return (0.0, None)
    if node.op == "call_function" and node.target is F.relu6 and len(args) <= 2 and not kwargs:
        return (0.0, 6.0)
    if node.op == "call_method" and node.target == "relu" and len(args) == 1 and not kwargs:
        return (0.0, None)
    is_clamp = (node.op == "call_function" and node.target in (torch.clamp, torch.clip)) or (
        node.op == "call_method" and node.target in ("clamp", "clip"))
    if is_clamp:
        lo = args[1] if len(args) > 1 else kwargs.pop("min", None)
        hi = args[2] if len(args) > 2 else kwargs.pop("max", None)
        if kwargs or len(args) > 3 or not (num(lo) and num(hi)) or (lo is None and hi is None) or (
                lo is not None and hi is not None and lo > hi):
            return None
        return (None if lo is None else float(lo), None if hi is None else float(hi))
    return None


def _residual_of(node: fx.Node, src: fx.Node) -> Optional[fx.Node]:
    """The other operand when `node` is `src + other` (either order, no alpha) of tensors of one shape and dtype."""
    add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")
    if not add or node.kwargs or len(node.args) != 2 or src not in node.args:
        return None
    other = node.args[1] if node.args[0] is src else node.args[0]
    if not isinstance(other, fx.Node) or other is src:
        return None
    a, b = src.meta.get("tensor_meta"), other.meta.get("tensor_meta")
    if a is None or b is None or not hasattr(a, "shape") or not hasattr(b, "shape"):
        return None
    return other if (tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype) else None


@torch.no_grad()
def fuse_epilogues(model: nn.Module, concrete_args: Optional[dict] = None,
                   example_args: Optional[tuple] = None) -> Optional[list[dict]]:
    """Fold, in place, residual adds and clamp-like activations after SparseConv2d layers into their epilogue
    (module docstring). Returns [{"conv", "residual": bool, "clamp"}] of what was fused (then the model runs the
    fused forward), or None when the forward cannot be traced by torch.fx (nothing is changed). `example_args`:
    the forward's positional arguments, for the shapes that residual fusion needs."""
    try:
        gm = traced_without_identities(model, concrete_args)
    except Exception:  # noqa: BLE001 - fx raises many kinds on untraceable code: then no fusion
        return None
    graph, modules = gm.graph, dict(model.named_modules())
    if example_args is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        try:
            ShapeProp(gm).propagate(*example_args)
        except Exception:  # noqa: BLE001 - no shapes: residual adds stay unfused
            pass
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    fused, swaps = [], []
    for node in list(graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, SparseConv2d) or m.clamp is not None or calls[node.target] != 1 \
                or len(node.args) != 1 or node.kwargs:
            continue
        chain, residual, clamp = [node], None, None
        if len(node.users) == 1:
            user = next(iter(node.users))
            residual = _residual_of(user, node)
            if residual is not None:
                chain.append(user)
        last = chain[-1]
        if len(last.users) == 1:
            clamp = _clamp_of(next(iter(last.users)), modules, last)
            if clamp is not None:
                chain.append(next(iter(last.users)))
        if len(chain) == 1:
            continue
        with graph.inserting_before(chain[-1]):  # where the pattern's result is defined: residual exists there
            new = graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        new.meta = dict(chain[-1].meta)
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        swaps.append((node.target, m, clamp))
        fused.append({"conv": node.target, "residual": residual is not None, "clamp": clamp})
    if not fused:
        return []
    graph.lint()
    gm.recompile()
    for target, m, clamp in swaps:  # a copy: a model shared with the caller (inplace=False) is not touched
        fused_m = copy.copy(m)
        fused_m.clamp = clamp
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fused_m)
    adopt_forward(model, gm, "fused epilogues")
    return fused


def traced_without_identities(model: nn.Module, concrete_args: Optional[dict]) -> fx.GraphModule:
    """`model`'s forward traced (ExportTracer: sparse and torch.nn layers are leaves) as a GraphModule, without its
    nn.Identity calls (folded BatchNorms, stacked convs' old places), so that what runs around them is seen as
    adjacent. Raises whatever torch.fx raises on an untraceable forward.

    A forward that is itself a rewritten graph (a model through one pass, then another) calls fx's
    `_assert_is_none` for arguments an earlier trace fixed; tracing it again marks that call as an fx-wrapped
    function, and the code fx generates from it would then register the function by its dotted name, on which
    every later trace in the process fails (KeyError in torch.fx). It stays a plain call instead."""
    graph = ExportTracer().trace(model, concrete_args=concrete_args)
    modules = dict(model.named_modules())
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _assert_is_none:
            node.meta.pop("is_wrapped", None)
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(model, graph)


def adopt_forward(model: nn.Module, gm: fx.GraphModule, what: str) -> None:
    """Gives `model` the rewritten graph's code as its forward, through a subclass of its class made for it (it keeps
    its modules and attributes and is still an instance of its class). The subclass has a distinct qualified name
    (`what` in it), so pickling by name fails loudly instead of reviving the forward from before the rewrite."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": type(gm).forward, "__module__": cls.__module__,
                                                  "__qualname__": f"{cls.__qualname__}.<{what}>"})
