"""Graph pass of the sparse export: sparse convs that read one tensor, stacked into one conv.

A multitask model's heads all read the backbone's features, and each ASPP head's branches read them too: twelve
convs on one tensor in the paper's models, in four geometries (one per dilation). Convs of one geometry on one
tensor are one conv with their weights stacked along the output channels (`SparseWeight.cat_rows`), whose output
`torch.split` cuts back into each conv's: the input is packed once instead of once per conv, the call's fixed
costs are paid once, and the threads share out more work. Every output channel is the same sum of the same
products, but the kernel may tile the stacked weight differently, so float32 results agree within rounding, not
bit for bit. The dead-tap trimming of `SparseConv2d` stays exact at every input size (one geometry trims alike).

Stacked together: SparseConv2d layers with the same kernel size, stride, padding, dilation, backend, bias or
none, epilogue clamp, dtype and device, `groups=1`, each called once with the shared tensor as its only argument
(a fused residual add is per conv: not stacked). `decide(names, stacked)` says which groups pay: `export_sparse`
times each group's convs against the stacked one on the example input (on a 2-core EPYC: 1.2-1.5x on
MobileNetV2's 11x11 head maps, 1.06-1.41x on ResNet-34's 41x41 ones in 16 x 1 blocks, within +-7% there on
unstructured weights; docs/cpu_sparse_kernel.md, "The heads' first convs stacked"). The
stacked conv is a new module of the model's (`stacked_conv_<i>`), the convs it replaces become nn.Identity (as
folded BatchNorms do), and the model runs the rewritten forward (`adopt_forward`), which `save_exported` and
`export_pt2` trace like any other.
"""
from __future__ import annotations

import operator
from collections import Counter, defaultdict
from typing import Callable, Optional

import torch
from torch import fx, nn

from adapmtl.export_format import default_concrete_args
from adapmtl.export_passes import adopt_forward, traced_without_identities
from adapmtl.nn.sparse_layers import SparseConv2d, first_inputs
from adapmtl.ops.sparse_weight import SparseWeight
from adapmtl.timing import interleaved_median_ms


def _geometry(m: SparseConv2d) -> tuple:
    sw = m.sparse_weight
    return (sw.shape[1:], m.stride, m.padding, m.dilation, m.backend, m.bias is None, m.clamp, sw.dtype, sw.device)


def stacked_conv(convs: list[SparseConv2d]) -> SparseConv2d:
    """One SparseConv2d computing every conv of `convs` (one geometry) at once, their outputs one after another."""
    first = convs[0]
    sw = SparseWeight.cat_rows([m.sparse_weight for m in convs])
    bias = None if first.bias is None else torch.cat([m.bias for m in convs])
    return SparseConv2d(sw, bias, first.stride, first.padding, first.dilation, 1, first.backend, first.clamp)


def _free_name(model: nn.Module, prefix: str) -> str:
    i = 0
    while hasattr(model, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


@torch.no_grad()
def stack_parallel_convs(model: nn.Module, concrete_args: Optional[dict] = None,
                         decide: Optional[Callable[[list[str], SparseConv2d], tuple[bool, dict]]] = None
                         ) -> Optional[list[dict]]:
    """Stack, in place, the sparse convs that read one tensor with one geometry (module docstring) where
    `decide(names, stacked)` returns (True, record) (every group when `decide` is None). Returns one
    {"convs", "stacked", "module", **record} per group of two or more found, or None when the forward cannot be
    traced by torch.fx (nothing is changed)."""
    try:
        gm = traced_without_identities(model, concrete_args)
    except Exception:  # noqa: BLE001 - fx raises many kinds on untraceable code: then no stacking
        return None
    graph, modules = gm.graph, dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, SparseConv2d) and m.groups == 1 and calls[node.target] == 1 and len(node.args) == 1 \
                and isinstance(node.args[0], fx.Node) and not node.kwargs:
            groups[(node.args[0], _geometry(m))].append(node)
    report = []
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        names = [n.target for n in nodes]
        convs = [modules[t] for t in names]
        conv = stacked_conv(convs)
        stack, record = decide(names, conv) if decide is not None else (True, {})
        entry = {"convs": names, "stacked": bool(stack), "module": None, **record}
        report.append(entry)
        if not stack:
            continue
        entry["module"] = name = _free_name(model, "stacked_conv")
        model.add_module(name, conv)
        gm.add_submodule(name, conv)  # the graph's owner must hold every module it calls (lint)
        with graph.inserting_before(nodes[0]):  # the earliest of them: the shared input is defined before it
            out = graph.call_module(name, (nodes[0].args[0],))
            parts = graph.call_function(torch.split, (out, [m.out_channels for m in convs]), {"dim": 1})
            for i, node in enumerate(nodes):
                piece = graph.call_function(operator.getitem, (parts, i))
                node.replace_all_uses_with(piece)
        for node, target in zip(nodes, names):
            graph.erase_node(node)
            parent, _, child = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    if any(e["stacked"] for e in report):
        graph.lint()
        gm.recompile()
        adopt_forward(model, gm, "stacked convs")
    return report


def stack_where_faster(model: nn.Module, args: tuple, repeats: int, inputs: Optional[dict] = None) -> Optional[list]:
    """`stack_parallel_convs` on `model`, each group stacked iff the stacked conv beats its convs run one after
    another on the input they see in a forward on `args` (timed in alternation, `repeats` rounds). `inputs`: those
    inputs by layer name where the caller has them already (export_sparse's, taken before its layer choices: the
    same values to rounding), else one forward takes them."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, SparseConv2d)}
    if inputs is None:
        inputs = first_inputs(model, args, convs)

    def decide(names, stacked):
        x = inputs.get(names[0])
        if x is None:
            return False, {}
        members = [convs[n] for n in names]
        with torch.no_grad():
            separate_ms, stacked_ms = interleaved_median_ms(
                [lambda: [m(x) for m in members], lambda: stacked(x).split([m.out_channels for m in members], 1)],
                x.device, reps=max(repeats, 3))
        return stacked_ms < separate_ms, {"separate_s": separate_ms / 1e3, "stacked_s": stacked_ms / 1e3}

    return stack_parallel_convs(model, default_concrete_args(model), decide)
