"""Model-level pruning API: convert a model to STR layers, measure its sparsity, bake it for export.

Sparsity accounting follows SPEC §6: prunable weights are the weights of conv and linear layers (never
biases, never norm layers); sparsity is reported per layer, per component and overall, weighted by
the number of weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from adapmtl.nn.str_layers import STR_LAYER_TYPES, STRConv2d, STRLinear, ThresholdGroup, _threshold_dtype
from adapmtl.ops import BACKENDS, GRAD_MODES, soft_threshold

MODES = ("component", "global", "layer")
REGISTRY = "adapmtl_thresholds"  # attribute of the model that owns the shared ThresholdGroups
GLOBAL_GROUP = "global"
UNASSIGNED = "other"  # component of prunable layers outside every component


def _prunable_children(root: nn.Module):
    """(parent, child name, qualified name, layer) for each convertible Conv2d/Linear under root."""
    for parent_name, parent in root.named_modules():
        if isinstance(parent, (nn.MultiheadAttention, *STR_LAYER_TYPES)):
            # MultiheadAttention reads out_proj.weight directly (no forward call): converting it would
            # silently skip the threshold. STR layers are already converted.
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, (nn.Conv2d, nn.Linear)) and not isinstance(child, STR_LAYER_TYPES):
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                yield parent, child_name, qualified, child


def _default_groups(model: nn.Module) -> dict[str, nn.Module]:
    components = getattr(model, "components", None)
    if callable(components):
        return dict(components())
    return {"model": model}


def _layer_owners(model: nn.Module, groups) -> dict[int, str]:
    """Validate `groups`; return id(conv/linear layer) -> the component it belongs to."""
    if not isinstance(groups, dict) or not groups:
        raise TypeError(f"sparsify: argument 'groups' must be a non-empty dict of name -> nn.Module, got {groups!r}")
    in_model = {id(m) for m in model.modules()}
    owner: dict[int, str] = {}
    for name, module in groups.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"sparsify: argument 'groups' must have non-empty str keys, got {name!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"sparsify: groups[{name!r}] must be an nn.Module, got {type(module).__name__}")
        if id(module) not in in_model:
            raise ValueError(f"sparsify: groups[{name!r}] is not a submodule of the model")
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if id(m) in owner and owner[id(m)] != name:
                    raise ValueError(f"sparsify: groups {owner[id(m)]!r} and {name!r} overlap (a layer is in both)")
                owner[id(m)] = name
    return owner


def sparsify(
    model: nn.Module,
    groups: dict[str, nn.Module] | None = None,
    init: float = -15.0,
    mode: str = "component",
    grad: str = "exact",
    backend: str = "auto",
) -> dict[str, ThresholdGroup]:
    """Convert, in place, every `nn.Conv2d` / `nn.Linear` under the given submodules to STR layers.

    Weights and biases are kept (the same Parameter objects); with `init=-1000` the model's outputs
    are unchanged exactly.

    Args:
        model: the model to convert.
        groups: component name -> submodule. Default: `model.components()` when the model has it
            (adapmtl's MultiTaskModel: the backbone and each head), else the whole model as "model".
        init: the initial threshold parameter `s0`.
        mode: "component" (AdapMTL: one `s` per group), "global" (one `s` for everything) or "layer"
            (original STR: one `s` per layer).
        grad, backend: passed to every layer (see `adapmtl.ops.soft_threshold`).

    Returns:
        The thresholds created: component name -> group ("component"), {"global": group}, or
        qualified layer name -> the layer's own group ("layer"). Shared groups are registered on the
        model as `model.adapmtl_thresholds`, so they are in `model.parameters()` and the state_dict.
    """
    if mode not in MODES:
        raise ValueError(f"sparsify: argument 'mode' must be one of {MODES}, got {mode!r}")
    if grad not in GRAD_MODES:
        raise ValueError(f"sparsify: argument 'grad' must be one of {GRAD_MODES}, got {grad!r}")
    if backend not in BACKENDS:
        raise ValueError(f"sparsify: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    if hasattr(model, REGISTRY) or any(isinstance(m, STR_LAYER_TYPES) for m in model.modules()):
        raise ValueError("sparsify: the model is already sparsified (it has STR layers); call it once per model")
    owner = _layer_owners(model, _default_groups(model) if groups is None else groups)
    plan = [
        (owner[id(layer)], parent, child_name, qualified, layer)
        for parent, child_name, qualified, layer in _prunable_children(model)
        if id(layer) in owner
    ]
    if not plan:
        raise ValueError("sparsify: the given groups contain no nn.Conv2d or nn.Linear layer to prune")
    for _, _, _, qualified, layer in plan:
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"sparsify: layer {qualified!r} is lazy and not initialised yet; run one forward first")

    created: dict[str, ThresholdGroup] = {}

    def group_for(name: str, like: Tensor) -> ThresholdGroup:
        if name not in created:
            created[name] = ThresholdGroup(init, name=name, device=like.device, dtype=_threshold_dtype(like))
        return created[name]

    for component, parent, child_name, qualified, layer in plan:
        if mode == "component":
            shared = group_for(component, layer.weight)
        elif mode == "global":
            shared = group_for(GLOBAL_GROUP, layer.weight)
        else:
            shared = None
        cls = STRConv2d if isinstance(layer, nn.Conv2d) else STRLinear
        new = cls.from_dense(layer, threshold=shared, init=init, grad=grad, backend=backend, component=component)
        if shared is None:
            new.threshold.name = qualified
            created[qualified] = new.threshold
        setattr(parent, child_name, new)

    if mode != "layer":
        setattr(model, REGISTRY, nn.ModuleDict(created))
    return created


def str_layers(model: nn.Module) -> list[tuple[str, STRConv2d | STRLinear]]:
    """(qualified name, layer) of every STR layer in the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, STR_LAYER_TYPES)]


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every threshold parameter `s` of the model, each once."""
    seen, params = set(), []
    for _, layer in str_layers(model):
        if id(layer.s) not in seen:
            seen.add(id(layer.s))
            params.append(layer.s)
    return params


@torch.no_grad()
def reset_thresholds(model: nn.Module, init: float) -> None:
    """Set every threshold to `init` (start AdapMTL from a dense checkpoint, SPEC §3)."""
    for s in threshold_parameters(model):
        s.fill_(float(init))


@dataclass
class LiveSparsity:
    """Sparsity at the last forward, from the kernels' non-zero counts (tensors on the model's device)."""

    overall: Tensor
    components: dict[str, Tensor]
    layers: dict[str, Tensor]
    nnz: Tensor
    numel: int

    def fractions(self) -> dict:
        """As SparsityReport.fractions(), in floats (one host sync)."""
        values = torch.stack([self.overall, *self.components.values(), *self.layers.values()]).tolist()
        n = len(self.components)
        return {"overall": values[0], "components": dict(zip(self.components, values[1:1 + n])),
                "layers": dict(zip(self.layers, values[1 + n:]))}


def live_sparsity(model: nn.Module) -> LiveSparsity:
    """Sparsity of the STR layers' effective weights at their last forward, without reading weights or
    synchronising with the device: cheap enough for every training step (the target-sparsity cap)."""
    layers = str_layers(model)
    if not layers:
        raise ValueError("live_sparsity: the model has no STR layers (call adapmtl.sparsify first)")
    nnz = torch.stack([layer.last_nnz for _, layer in layers]).to(torch.float64)
    numel = torch.tensor([layer.weight.numel() for _, layer in layers], dtype=torch.float64, device=nnz.device)
    per_layer = 1.0 - nnz / numel
    components: dict[str, list[int]] = {}
    for i, (_, layer) in enumerate(layers):
        components.setdefault(layer.component, []).append(i)
    per_component = {}
    for name, idx in components.items():
        index = torch.tensor(idx, device=nnz.device)
        per_component[name] = 1.0 - nnz[index].sum() / numel[index].sum()
    total = sum(layer.weight.numel() for _, layer in layers)
    return LiveSparsity(
        overall=1.0 - nnz.sum() / total,
        components=per_component,
        layers={name: per_layer[i] for i, (name, _) in enumerate(layers)},
        nnz=nnz.sum(),
        numel=total,
    )


@dataclass
class LayerSparsity:
    name: str
    component: str
    kind: str
    numel: int
    nnz: int
    sparsity: float
    threshold: float | None  # g(s), or None for a plain (not converted) layer


@dataclass
class ComponentSparsity:
    numel: int
    nnz: int
    sparsity: float
    threshold: float | None  # g(s) when the whole component shares one threshold


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]
    components: dict[str, ComponentSparsity]
    overall: float
    numel: int
    nnz: int

    def to_dict(self) -> dict:
        return asdict(self)

    def fractions(self) -> dict:
        """{"overall": float, "components": {name: sparsity}, "layers": {name: sparsity}}: the summary that
        results files and logs hold."""
        return {"overall": self.overall, "components": {k: c.sparsity for k, c in self.components.items()},
                "layers": {r.name: r.sparsity for r in self.layers}}

    def table(self, per_layer: bool = True) -> str:
        lines = []
        if per_layer:
            lines.append(f"{'layer':<48} {'component':<18} {'weights':>11} {'nonzero':>11} {'sparsity':>9} {'g(s)':>10}")
            for row in self.layers:
                thr = "-" if row.threshold is None else f"{row.threshold:.3e}"
                lines.append(
                    f"{row.name:<48} {row.component:<18} {row.numel:>11,} {row.nnz:>11,} {100 * row.sparsity:>8.2f}% {thr:>10}"
                )
            lines.append("")
        lines.append(f"{'component':<48} {'':<18} {'weights':>11} {'nonzero':>11} {'sparsity':>9} {'g(s)':>10}")
        for name, comp in self.components.items():
            thr = "-" if comp.threshold is None else f"{comp.threshold:.3e}"
            lines.append(f"{name:<48} {'':<18} {comp.numel:>11,} {comp.nnz:>11,} {100 * comp.sparsity:>8.2f}% {thr:>10}")
        lines.append(f"{'overall':<48} {'':<18} {self.numel:>11,} {self.nnz:>11,} {100 * self.overall:>8.2f}%")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _component_of_modules(model: nn.Module) -> dict[int, str]:
    """id(module) -> component name, from model.components() when the model has it."""
    owner = {}
    components = getattr(model, "components", None)
    if callable(components):
        for name, root in components().items():
            for m in root.modules():
                owner[id(m)] = name
    return owner


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Exact per-layer, per-component and overall sparsity of every conv/linear weight of the model
    (STR layers through their effective weight, plain layers as they are). Reads every weight once."""
    owner = _component_of_modules(model)
    rows: list[LayerSparsity] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        if isinstance(m, STR_LAYER_TYPES):
            _, nnz = soft_threshold(m.weight, m.s, backend=m.backend, return_nnz=True)
            component = m.component or owner.get(id(m), UNASSIGNED)
            threshold = float(torch.sigmoid(m.s.detach().double()))
        else:
            nnz = torch.count_nonzero(m.weight)
            component = owner.get(id(m), UNASSIGNED if owner else "model")
            threshold = None
        numel = m.weight.numel()
        nnz = int(nnz)
        rows.append(LayerSparsity(name, component, kind, numel, nnz, 1.0 - nnz / max(numel, 1), threshold))
    if not rows:
        raise ValueError("sparsity_report: the model has no nn.Conv2d or nn.Linear layer")

    components: dict[str, ComponentSparsity] = {}
    for comp in dict.fromkeys(r.component for r in rows):
        members = [r for r in rows if r.component == comp]
        numel = sum(r.numel for r in members)
        nnz = sum(r.nnz for r in members)
        thresholds = {r.threshold for r in members}
        shared = thresholds.pop() if len(thresholds) == 1 else None
        components[comp] = ComponentSparsity(numel, nnz, 1.0 - nnz / max(numel, 1), shared)
    numel = sum(r.numel for r in rows)
    nnz = sum(r.nnz for r in rows)
    return SparsityReport(rows, components, 1.0 - nnz / max(numel, 1), numel, nnz)


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Replace, in place, every STR layer by a plain `nn.Conv2d` / `nn.Linear` holding its effective
    (soft-thresholded) weight, and drop the thresholds: a dense model for export. Returns the model."""
    for name, layer in str_layers(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(layer, STRConv2d):
            plain = nn.Conv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta",
            )
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.effective_weight(), requires_grad=layer.weight.requires_grad)
        plain.bias = layer.bias
        plain.train(layer.training)
        setattr(parent, child_name, plain)
    if hasattr(model, REGISTRY):
        delattr(model, REGISTRY)
    return model
