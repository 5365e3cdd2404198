"""Export a pruned model for sparse inference: which layers become sparse.

`export_sparse(model)` replaces each Conv2d/Linear (plain or STR) whose weight is sparse enough *and*
for which the sparse kernel is faster by `SparseConv2d`/`SparseLinear`; everything else stays dense
(STR layers kept dense are finalized to plain layers first, exactly as `adapmtl.finalize`). How
"faster" is decided (`policy`):
  "time"       (default when `example_input` is given) run the model once on `example_input` to see
               each layer's real input, then time dense vs sparse once per layer (median of `repeats`);
               keep whichever is faster. Layers whose two times are within NEAR_CROSSOVER of each other
               are then decided together, inside the model: the whole model timed with all of them dense
               and all of them sparse, in alternation. A layer's isolated time says little there (its
               weights can stay in cache between repeats): three exports of one MobileNetV2 on a 2-core EPYC
               made 64, 68 and 44 of its 71 convs sparse when each was decided alone.
  "crossover"  (default otherwise) sparse iff the layer's sparsity >= CROSSOVER[device][kind], the
               crossover sparsity measured by benchmarks/bench_sparse_conv.py (results JSON under
               benchmarks/results/) for that kind of layer: "1x1", "kxk" (3x3 and larger), "linear".
Layers below `min_sparsity`, grouped/depthwise convs and non-zero padding modes always stay dense.
Around the decisions, graph passes: BatchNorm folded into the convs before them (adapmtl.export_passes), and after
them the ReLU / residual add that follow a sparse conv fused into its epilogue (same module) and, with "time",
sparse convs that read one tensor stacked into one conv where that measures faster (adapmtl.export_stacking).

Saving and loading the result: `adapmtl.export_format` (`save_exported` / `load_exported`).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from adapmtl.export_format import default_concrete_args
from adapmtl.export_passes import fold_batchnorm, fuse_epilogues
from adapmtl.export_stacking import stack_where_faster
from adapmtl.nn.sparse_layers import SPARSE_LAYER_TYPES, SparseConv2d, SparseLinear, first_inputs
from adapmtl.ops.sparse_conv import SPARSE_BACKENDS, available_sparse_backends
from adapmtl.timing import interleaved_median_ms

POLICIES = ("time", "crossover")
# policy="time": layers whose dense and sparse times differ by at most this fraction of the faster one are
# decided together by timing the whole model (module docstring).
NEAR_CROSSOVER = 0.25

# Crossover sparsity per device type and layer kind: sparse is used at or above it (see module docstring).
# CPU: benchmarks/results/sparse_conv_all_b1_cpu-AMD-EPYC-2c.json (2-core AVX-512 machine, batch 1, every
# conv shape of both models at 321x321 input, random masks): 3x3/7x7 convs cross over at 0.50-0.72 (the
# strongly dilated ASPP convs lowest, 0.50-0.60: the kernel skips taps that read only padding), 1x1 convs
# at 0.50-0.73 (one small 11x11 conv of 1.3 ms at 0.83). The values below are about the upper quartiles,
# i.e. conservative; linear layers were not measured and use the 1x1 value. policy="time" decides per
# layer on the machine at hand.
# CUDA: no measurement yet -> conservative (sparse only for very sparse layers).
CROSSOVER = {
    "cpu": {"1x1": 0.65, "kxk": 0.7, "linear": 0.65},
    "cuda": {"1x1": 0.95, "kxk": 0.9, "linear": 0.9},
}


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    return "1x1" if tuple(layer.kernel_size) == (1, 1) else "kxk"


def _candidate(layer: nn.Module) -> bool:
    if isinstance(layer, SPARSE_LAYER_TYPES):
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return isinstance(layer, nn.Linear)


def _weight_sparsity(layer: nn.Module) -> float:
    w = layer.weight.detach()
    return 1.0 - torch.count_nonzero(w).item() / w.numel() if w.numel() else 1.0


def _to_sparse(layer: nn.Module, backend: str) -> nn.Module:
    cls = SparseLinear if isinstance(layer, nn.Linear) else SparseConv2d
    return cls.from_dense(layer, backend=backend).to(layer.weight.device)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _decide_in_model(model: nn.Module, near: dict, report: list, args: tuple, repeats: int) -> dict:
    """Sets the `near` layers all dense or all sparse, whichever runs the whole model faster on `args` (timed in
    alternation, `repeats` rounds); marks their report entries. Returns what was measured."""

    def use(sparse: bool):
        for name, (dense_layer, sparse_layer) in near.items():
            _set_submodule(model, name, sparse_layer if sparse else dense_layer)

    def run(sparse: bool):
        use(sparse)
        return model(*args)

    device = args[0].device if isinstance(args[0], Tensor) else torch.device("cpu")
    with torch.no_grad():
        dense_ms, sparse_ms = interleaved_median_ms([lambda: run(False), lambda: run(True)], device,
                                                    reps=max(repeats, 3))
    sparse = sparse_ms < dense_ms
    use(sparse)
    for entry in report:
        if entry["layer"] in near:
            entry["sparse"], entry["decided_in_model"] = sparse, True
    return {"layers": list(near), "all_dense_s": dense_ms / 1e3, "all_sparse_s": sparse_ms / 1e3, "sparse": sparse}


def export_sparse(
    model: nn.Module,
    min_sparsity: float = 0.5,
    backend: str = "auto",
    *,
    policy: Optional[str] = None,
    example_input: Any = None,
    repeats: int = 5,
    inplace: bool = False,
    fold_bn: bool = True,
    fuse: bool = True,
    stack: bool = True,
) -> nn.Module:
    """Replace layers by sparse modules where that is faster (module docstring). Returns the model
    (a deep copy unless `inplace`) in eval mode with every parameter frozen (requires_grad False);
    `model.sparse_export_report` lists every decision, `model.sparse_export_near` the layers decided together
    inside the model ("time"; None where there were none).

    Args:
        min_sparsity: layers with a smaller fraction of zero weights always stay dense.
        backend: backend of the sparse modules (adapmtl.ops.sparse_conv.SPARSE_BACKENDS).
        policy: "time" or "crossover"; default "time" if `example_input` is given, else "crossover".
        example_input: a tensor (or tuple of positional arguments) for one forward pass ("time").
        repeats: timed runs per layer and variant ("time").
        fold_bn: fold every BatchNorm2d that follows a Conv2d into it first (adapmtl.export_passes; the folded
            convs keep their zeros). `model.folded_batchnorm` lists the (conv, batchnorm) pairs, None where the
            forward could not be traced by torch.fx (nothing folded).
        fuse: take the residual add and ReLU / ReLU6 / clamp after each sparse conv into its epilogue
            (adapmtl.export_passes.fuse_epilogues; the same result, bit for bit); where anything was fused the
            model runs the traced, fused forward. `model.fused_epilogues` lists what was fused (residual adds only
            with `example_input`, which gives the shapes), None where the forward could not be traced.
        stack: with policy "time", stack the sparse convs that read one tensor with one geometry into one conv
            where that is faster on `example_input` (adapmtl.export_stacking: each group timed both ways; float32
            outputs within rounding). `model.stacked_convs` lists every group found and what was measured, None
            where nothing was looked for or the forward could not be traced.
    """
    from adapmtl.sparsify import finalize  # late: sparsify imports the training-side layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_sparse: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"export_sparse: argument 'min_sparsity' must be a number in [0, 1], got {min_sparsity!r}")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"export_sparse: argument 'backend' must be one of {SPARSE_BACKENDS}, got {backend!r}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    if backend != "auto" and backend not in available_sparse_backends(device):
        raise ValueError(f"export_sparse: backend {backend!r} cannot run on {device} here (available: "
                         f"{available_sparse_backends(device)}); export with backend='auto' (it picks the best backend "
                         "of whatever device runs the model) or export on a machine where it runs")
    if policy is None:
        policy = "time" if example_input is not None else "crossover"
    if policy not in POLICIES:
        raise ValueError(f"export_sparse: argument 'policy' must be one of {POLICIES}, got {policy!r}")
    if policy == "time" and example_input is None:
        raise ValueError("export_sparse: policy='time' needs argument 'example_input' (one batch of model input)")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"export_sparse: argument 'repeats' must be a positive int, got {repeats!r}")

    for name, flag in (("fold_bn", fold_bn), ("fuse", fuse), ("stack", stack)):
        if not isinstance(flag, bool):
            raise TypeError(f"export_sparse: argument '{name}' must be a bool, got {type(flag).__name__}")

    if not inplace:
        model = copy.deepcopy(model)
    finalize(model)
    model.eval()
    folded = fold_batchnorm(model, default_concrete_args(model)) if fold_bn else []
    # An inference model: the sparse ops refuse inputs that require grad, and activations would if any
    # dense layer's parameters still did.
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = {name: m for name, m in model.named_modules() if name and _candidate(m)}

    inputs: dict[str, Tensor] = {}
    if policy == "time":
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        inputs = first_inputs(model, args, candidates)

    report = []
    near: dict[str, tuple[nn.Module, nn.Module]] = {}  # name -> (dense, sparse): too close to call alone
    for name, layer in candidates.items():
        sparsity = _weight_sparsity(layer)
        kind = _layer_kind(layer)
        entry = {"layer": name, "kind": kind, "sparsity": sparsity, "sparse": False}
        if sparsity >= min_sparsity:
            if policy == "crossover":
                device = layer.weight.device.type
                threshold = CROSSOVER.get(device, CROSSOVER["cuda"])[kind]
                entry["crossover"] = threshold
                use = sparsity >= threshold
                sparse_layer = _to_sparse(layer, backend) if use else None
            elif name in inputs:  # layers the example forward never reached stay dense
                x = inputs[name]
                sparse_layer = _to_sparse(layer, backend)
                with torch.no_grad():
                    dense_ms, sparse_ms = interleaved_median_ms([lambda: layer(x), lambda: sparse_layer(x)], x.device,
                                                                reps=repeats)
                entry["dense_s"], entry["sparse_s"] = dense_ms / 1e3, sparse_ms / 1e3
                use = entry["sparse_s"] < entry["dense_s"]
                if abs(dense_ms - sparse_ms) <= NEAR_CROSSOVER * min(dense_ms, sparse_ms):
                    near[name] = (layer, sparse_layer)
            else:
                use, sparse_layer = False, None
            if use:
                _set_submodule(model, name, sparse_layer)
                entry["sparse"] = True
        report.append(entry)
    model.sparse_export_near = _decide_in_model(model, near, report, args, repeats) if near else None
    fused = []
    if fuse and any(e["sparse"] for e in report):
        example = None if example_input is None else (
            example_input if isinstance(example_input, tuple) else (example_input,))
        fused = fuse_epilogues(model, default_concrete_args(model), example)
    stacked = None
    if stack and policy == "time" and any(e["sparse"] for e in report):
        stacked = stack_where_faster(model, args, repeats, inputs)
        into = {name: e["module"] for e in stacked or () if e["stacked"] for name in e["convs"]}
        for entry in report:
            if entry["layer"] in into:
                entry["stacked_into"] = into[entry["layer"]]
    model.sparse_export_report = report
    model.folded_batchnorm = folded
    model.fused_epilogues = fused
    model.stacked_convs = stacked
    return model
