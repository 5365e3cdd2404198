"""Model-level pruning API: soft-threshold a model's weights, measure its sparsity, bake it for export.

Sparsity accounting follows SPEC §6: prunable weights are the weights of conv and linear layers (never
biases, never norm layers), and here also of embeddings and attention projections, which the paper's
models do not have; sparsity is reported per weight, per component and overall, weighted by the number
of weights. Parameters of two or more dimensions that are none of these are reported as left dense.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapmtl.nn.str_layers import (
    STR_LAYER_TYPES,
    SoftThreshold,
    STRConv2d,
    STRLinear,
    ThresholdGroup,
    _threshold_dtype,
)
from adapmtl.ops import BACKENDS, GRAD_MODES, resolve_backend
from adapmtl.ops.block_soft_threshold import block_of

MODES = ("component", "global", "layer")
# Shared thresholds are parameters of the model itself, named REGISTRY + "_" + the group's name: parameters,
# not a child module, so that a model whose forward calls its children in turn (nn.Sequential) is unchanged.
REGISTRY = "adapmtl_threshold"
GLOBAL_GROUP = "global"
UNASSIGNED = "other"  # component of prunable layers outside every component

# Modules whose forward reads a child's weight directly instead of calling the child: MultiheadAttention reads
# out_proj.weight, the transformer layers' fast path reads linear1/linear2.weight. Their children's weights are
# parametrized (every read gives w_hat), never replaced by an STR layer (whose raw .weight would be read).
WEIGHT_READING_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _prunable_params(module: nn.Module) -> list[str]:
    """The names of the weights of `module` that adapmtl prunes (SPEC §6: conv and linear weights; here also
    embeddings and attention projections; never biases or norm layers)."""
    if isinstance(module, (*STR_LAYER_TYPES, SoftThreshold, ThresholdGroup)):
        return []
    if isinstance(module, nn.MultiheadAttention):  # out_proj is a Linear child of its own
        return ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, (*_CONVS, nn.Linear, nn.Embedding, nn.EmbeddingBag)):
        return ["weight"]
    return []


def _kind(module: nn.Module) -> str:
    if isinstance(module, _CONVS):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return "embedding"


def _weight_name(module_name: str, param: str) -> str:
    """A pruned weight's name: its module's for a `weight` (as the STR layers are named), else module.param."""
    if param == "weight" and module_name:
        return module_name
    return f"{module_name}.{param}" if module_name else param


@dataclass(frozen=True)
class PrunedWeight:
    """One soft-thresholded weight of a model: an STR layer's, or one parametrized by `SoftThreshold`."""

    name: str
    module: nn.Module  # the STR layer, or the module whose `param` is parametrized
    param: str
    unit: STRConv2d | STRLinear | SoftThreshold  # its threshold, component, backend and last non-zero count

    @property
    def numel(self) -> int:
        return self.unit.weight_numel

    def originals(self) -> list[nn.Parameter]:
        """The Parameters the optimizer updates for this weight: the STR layer's weight, or what the
        parametrization chain starts from (one, or several under e.g. a weight_norm parametrization before ours)."""
        if isinstance(self.unit, STR_LAYER_TYPES):
            return [self.module.weight]
        return list(self.module.parametrizations[self.param]._parameters.values())

    @torch.no_grad()
    def effective(self) -> Tensor:
        """w_hat, as the model's forward sees it (detached)."""
        if isinstance(self.unit, STR_LAYER_TYPES):
            return self.unit.effective_weight()
        return getattr(self.module, self.param).detach()


def pruned_weights(model: nn.Module) -> list[PrunedWeight]:
    """Every soft-thresholded weight of the model (STR layers and parametrized weights), in module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, STR_LAYER_TYPES):
            out.append(PrunedWeight(name, m, "weight", m))
        elif parametrize.is_parametrized(m):
            for param, chain in m.parametrizations.items():
                for p in chain:
                    if isinstance(p, SoftThreshold):
                        out.append(PrunedWeight(_weight_name(name, param), m, param, p))
    return out


def _default_groups(model: nn.Module) -> dict[str, nn.Module]:
    components = getattr(model, "components", None)
    if callable(components):
        return dict(components())
    return {"model": model}


def _module_owners(model: nn.Module, groups) -> dict[int, str]:
    """Validate `groups`; return id(module) -> the component it belongs to, for every module in a group."""
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
            if _prunable_params(m):
                if id(m) in owner and owner[id(m)] != name:
                    raise ValueError(f"sparsify: groups {owner[id(m)]!r} and {name!r} overlap (a layer is in both)")
            owner.setdefault(id(m), name)
    return owner


@dataclass
class _Step:
    component: str
    name: str  # the pruned weight's name
    parent: nn.Module | None  # set when the module is replaced by an STR layer
    child_name: str
    module: nn.Module
    param: str


def _plan(model: nn.Module, owner: dict[int, str]) -> tuple[list[_Step], list[tuple[str, int, str]]]:
    """What sparsify does to each prunable weight of the groups, and the weights it leaves dense (name, numel,
    why). Reads only: a problem is reported before anything changes."""
    steps, dense = [], []
    for name, m in model.named_modules():
        if id(m) not in owner:
            continue
        for param in _prunable_params(m):
            qualified = _weight_name(name, param)
            if f"{param}_orig" in m._parameters and f"{param}_mask" in m._buffers:
                raise ValueError(f"sparsify: layer {qualified!r} was pruned with torch.nn.utils.prune (it has "
                                 f"{param}_orig); call torch.nn.utils.prune.remove(layer, {param!r}) first; nothing "
                                 "was changed")
            weight = m._parameters.get(param)
            if weight is None and not parametrize.is_parametrized(m, param):
                if param in m._parameters or getattr(m, param, None) is None:
                    continue  # an optional weight that is absent (e.g. MHA's in_proj_weight when kdim != embed_dim)
                dense.append((qualified, getattr(m, param).numel(), "computed by a forward hook (e.g. the old "
                              "torch.nn.utils.weight_norm); use torch.nn.utils.parametrizations instead"))
                continue
            if isinstance(weight, nn.parameter.UninitializedParameter):
                raise ValueError(f"sparsify: layer {qualified!r} is lazy and not initialised yet; run one forward first")
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if name else None
            as_layer = (param == "weight" and type(m) in (nn.Conv2d, nn.Linear) and parent is not None
                        and not isinstance(parent, WEIGHT_READING_PARENTS) and not parametrize.is_parametrized(m))
            steps.append(_Step(owner[id(m)], qualified, parent if as_layer else None, child_name, m, param))
    return steps, dense


def _other_weights(model: nn.Module, covered: set[int]) -> list[tuple[str, int, str]]:
    """Parameters of two or more dimensions that are no prunable weight of any layer: left dense."""
    return [(name, p.numel(), "not a conv, linear, embedding or attention weight")
            for name, p in model.named_parameters() if p.dim() >= 2 and id(p) not in covered]


def _registry_name(group: str) -> str:
    return f"{REGISTRY}_{re.sub(r'[^0-9A-Za-z_]', '_', group)}"


def sparsify(
    model: nn.Module,
    groups: dict[str, nn.Module] | None = None,
    init: float = -15.0,
    mode: str = "component",
    grad: str = "exact",
    backend: str = "auto",
    block=1,
) -> dict[str, ThresholdGroup]:
    """Soft-threshold, in place, every prunable weight under the given submodules.

    Exact `nn.Conv2d` / `nn.Linear` layers become STR layers (`STRConv2d` / `STRLinear`, which
    `export_sparse` turns into sparse kernels). Every other prunable weight gets the same soft threshold as a
    `torch.nn.utils.parametrize` parametrization (`adapmtl.nn.SoftThreshold`), so that whoever reads it sees
    the thresholded value: subclasses of Conv2d/Linear with their own forward, Conv1d/Conv3d, transposed
    convs, Embedding/EmbeddingBag, MultiheadAttention's projections, and the Linear layers inside
    MultiheadAttention and the transformer layers (whose fast path reads their weights directly). Other weights
    of two or more dimensions (RNN weights, bare Parameters) stay dense, with a warning naming them;
    `sparsity_report(model).left_dense` lists them.

    Weights and biases are kept (the same Parameter objects); with `init=-1000` the model's outputs
    are unchanged exactly. A model with parametrized weights is saved through its `state_dict` (PyTorch does
    not pickle parametrized modules).

    Args:
        model: the model to convert.
        groups: component name -> submodule. Default: `model.components()` when the model has it
            (adapmtl's MultiTaskModel: the backbone and each head), else the whole model as "model".
        init: the initial threshold parameter `s0` (finite). g(s0) = sigmoid(s0) prunes every weight with
            |w| below it at once: e.g. -4.0 prunes |w| < 0.018.
        mode: "component" (AdapMTL: one `s` per group), "global" (one `s` for everything) or "layer"
            (original STR: one `s` per weight).
        grad, backend: passed to every layer (see `adapmtl.ops.soft_threshold`).
        block: (bo, 1) or bo: every weight thresholded in blocks of bo consecutive rows of dim 0 (output
            channels of convs and linears, input channels of transposed convs, rows of embeddings) by their
            norm; 1 (default) is the element-wise threshold. Weights are still counted one by one.

    Returns:
        The thresholds created: component name -> group ("component"), {"global": group}, or
        weight name -> its own group ("layer"). Shared groups are parameters of the model
        (`model.adapmtl_threshold_<name>`), so they are in `model.parameters()` and the state_dict.
    """
    if mode not in MODES:
        raise ValueError(f"sparsify: argument 'mode' must be one of {MODES}, got {mode!r}")
    if grad not in GRAD_MODES:
        raise ValueError(f"sparsify: argument 'grad' must be one of {GRAD_MODES}, got {grad!r}")
    if backend not in BACKENDS:
        raise ValueError(f"sparsify: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
        raise ValueError(f"sparsify: argument 'init' must be a finite number (e.g. -15.0), got {init!r}")
    try:
        block = block_of(block)
    except ValueError as exc:
        raise ValueError(f"sparsify: {exc}") from None
    if pruned_weights(model) or any(n.startswith(REGISTRY + "_") for n, _ in model.named_parameters(recurse=False)):
        raise ValueError("sparsify: the model is already sparsified (it has soft-thresholded weights); call it once "
                         "per model")
    steps, dense = _plan(model, _module_owners(model, _default_groups(model) if groups is None else groups))
    if not steps:
        raise ValueError("sparsify: the given groups contain no conv, linear, embedding or attention weight to prune")
    checked = set()
    for step in steps:  # a backend that cannot run these weights: an error now, not at the first forward
        weight = getattr(step.module, step.param)
        if (weight.device, weight.dtype) not in checked:
            checked.add((weight.device, weight.dtype))
            try:
                resolve_backend(backend, weight)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise type(exc)(f"sparsify: argument 'backend': {exc}") from None
    names = {}
    if mode != "layer":
        # in module order, the same in every process (DDP matches parameters by position)
        for group in (dict.fromkeys(s.component for s in steps) if mode == "component" else [GLOBAL_GROUP]):
            attr = _registry_name(group)
            if attr in names.values() or hasattr(model, attr):
                raise ValueError(f"sparsify: component {group!r} would be stored as model.{attr}, which is taken; "
                                 "rename the component")
            names[group] = attr

    created: dict[str, ThresholdGroup] = {}

    def group_for(name: str, like: Tensor) -> ThresholdGroup:
        if name not in created:
            created[name] = ThresholdGroup(init, name=name, device=like.device, dtype=_threshold_dtype(like))
        return created[name]

    for step in steps:
        weight = getattr(step.module, step.param)
        shared = None if mode == "layer" else group_for(step.component if mode == "component" else GLOBAL_GROUP, weight)
        options = dict(threshold=shared, init=init, grad=grad, backend=backend, component=step.component, block=block)
        if step.parent is not None:
            cls = STRConv2d if isinstance(step.module, nn.Conv2d) else STRLinear
            unit = cls.from_dense(step.module, **options)
            setattr(step.parent, step.child_name, unit)
        else:
            unit = SoftThreshold(weight, **options)
            parametrize.register_parametrization(step.module, step.param, unit)
        if shared is None:
            unit.threshold.name = step.name
            created[step.name] = unit.threshold

    for group, attr in names.items():
        model.register_parameter(attr, created[group].s)
    dense += _other_weights(model, {id(q) for p in pruned_weights(model) for q in p.originals()})
    if dense:
        total = sum(p.numel() for p in model.parameters())
        left = sum(n for _, n, _ in dense)
        shown = ", ".join(name for name, _, _ in dense[:5]) + (f" (+{len(dense) - 5} more)" if len(dense) > 5 else "")
        warnings.warn(f"sparsify: left dense: {shown}, {left:,} weights ({100 * left / max(total, 1):.1f}% of the "
                      "model's parameters); adapmtl.sparsity_report(model).left_dense says why", UserWarning,
                      stacklevel=2)
    return created


def str_layers(model: nn.Module) -> list[tuple[str, STRConv2d | STRLinear]]:
    """(qualified name, layer) of every STR layer in the model, in module order (`pruned_weights` also has the
    parametrized weights)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, STR_LAYER_TYPES)]


def threshold_groups(model: nn.Module) -> dict[str, ThresholdGroup]:
    """name -> ThresholdGroup of every threshold of the model (shared ones once), in module order."""
    out = {}
    for p in pruned_weights(model):
        group = p.unit.threshold_group
        out.setdefault(group.name or p.name, group)
    return out


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every threshold parameter `s` of the model, each once."""
    return [g.s for g in threshold_groups(model).values()]


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
    """Sparsity of the soft-thresholded weights at their last forward, without reading weights or
    synchronising with the device: cheap enough for every training step (the target-sparsity cap)."""
    units = pruned_weights(model)
    if not units:
        raise ValueError("live_sparsity: the model has no soft-thresholded weights (call adapmtl.sparsify first)")
    nnz = torch.stack([p.unit.last_nnz for p in units]).to(torch.float64)
    numel = torch.tensor([p.numel for p in units], dtype=torch.float64, device=nnz.device)
    per_layer = 1.0 - nnz / numel.clamp(min=1)
    components: dict[str, list[int]] = {}
    for i, p in enumerate(units):
        components.setdefault(p.unit.component, []).append(i)
    per_component = {}
    for name, idx in components.items():
        index = torch.tensor(idx, device=nnz.device)
        per_component[name] = 1.0 - nnz[index].sum() / numel[index].sum().clamp(min=1)
    total = sum(p.numel for p in units)
    return LiveSparsity(
        overall=1.0 - nnz.sum() / max(total, 1),
        components=per_component,
        layers={p.name: per_layer[i] for i, p in enumerate(units)},
        nnz=nnz.sum(),
        numel=total,
    )


@dataclass
class LayerSparsity:
    name: str
    component: str
    kind: str  # "conv", "linear", "embedding" or "attention"
    numel: int
    nnz: int
    sparsity: float
    threshold: float | None  # g(s), or None for a weight without a soft threshold


@dataclass
class ComponentSparsity:
    numel: int
    nnz: int
    sparsity: float
    threshold: float | None  # g(s) when the whole component shares one threshold


@dataclass
class DenseWeight:
    """A parameter of two or more dimensions that no report row covers (adapmtl does not prune it)."""

    name: str
    numel: int
    reason: str


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]
    components: dict[str, ComponentSparsity]
    overall: float  # over the rows (prunable weights); `left_dense` is outside it
    numel: int
    nnz: int
    left_dense: list[DenseWeight]

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
        if self.left_dense:
            lines.append("")
            lines.append(f"left dense, outside 'overall' ({sum(d.numel for d in self.left_dense):,} weights):")
            lines.extend(f"  {d.name:<46} {d.numel:>11,}  {d.reason}" for d in self.left_dense)
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
    """Exact per-weight, per-component and overall sparsity of every prunable weight of the model (conv,
    linear, embedding and attention weights: soft-thresholded ones through their effective weight, plain ones
    as they are), and the parameters left dense. Reads every weight once."""
    owner = _component_of_modules(model)
    units = {(id(p.module), p.param): p for p in pruned_weights(model)}
    rows: list[LayerSparsity] = []
    covered: set[int] = set()
    for name, m in model.named_modules():
        params = ["weight"] if isinstance(m, STR_LAYER_TYPES) else _prunable_params(m)
        for param in params:
            unit = units.get((id(m), param))
            if unit is not None:
                weight = unit.effective()
                component = unit.unit.component or owner.get(id(m), UNASSIGNED)
                threshold = float(torch.sigmoid(unit.unit.s.detach().double()))
                covered.update(id(q) for q in unit.originals())
            else:
                weight = getattr(m, param, None)
                if weight is None:
                    continue
                covered.add(id(weight))
                if parametrize.is_parametrized(m, param):
                    covered.update(id(q) for q in m.parametrizations[param]._parameters.values())
                component = owner.get(id(m), UNASSIGNED if owner else "model")
                threshold = None
            numel = weight.numel()
            nnz = int(torch.count_nonzero(weight))
            rows.append(LayerSparsity(_weight_name(name, param), component, _kind(m), numel, nnz,
                                      1.0 - nnz / max(numel, 1), threshold))
    if not rows:
        raise ValueError("sparsity_report: the model has no conv, linear, embedding or attention weight")

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
    dense = [DenseWeight(*d) for d in _other_weights(model, covered)]
    return SparsityReport(rows, components, 1.0 - nnz / max(numel, 1), numel, nnz, dense)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own. PyTorch makes one class per parametrized module, but its
    deepcopy shares it with the copy, and remove_parametrizations deletes the weight's property from that class:
    finalizing a copy (as export_sparse and export_onnx do) would break the original."""
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake every soft threshold into its weight and drop the thresholds, in place: STR layers become plain
    `nn.Conv2d` / `nn.Linear` holding their effective weight, and a parametrized weight becomes a plain
    Parameter holding what the parametrization gave (the whole chain, where another parametrization, e.g.
    weight_norm, came before ours). A dense model for export. Returns the model."""
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
    for p in pruned_weights(model):  # the parametrized ones are left
        _own_class(p.module)
        parametrize.remove_parametrizations(p.module, p.param, leave_parametrized=True)
    for name in [n for n, _ in model.named_parameters(recurse=False) if n.startswith(REGISTRY + "_")]:
        delattr(model, name)
    return model
