"""Export a pruned model for sparse inference, and save/load the result as one file.

`export_sparse(model)` replaces each Conv2d/Linear (plain or STR) whose weight is sparse enough *and*
for which the sparse kernel is faster by `SparseConv2d`/`SparseLinear`; everything else stays dense
(STR layers kept dense are finalized to plain layers first, exactly as `adapmtl.finalize`). How
"faster" is decided (`policy`):
  "time"       (default when `example_input` is given) run the model once on `example_input` to see
               each layer's real input, then time dense vs sparse once per layer (median of `repeats`);
               keep whichever is faster. Exact for the machine it runs on.
  "crossover"  (default otherwise) sparse iff the layer's sparsity >= CROSSOVER[device][kind], the
               crossover sparsity measured by benchmarks/bench_sparse_conv.py (results JSON under
               benchmarks/results/) for that kind of layer: "1x1", "kxk" (3x3 and larger), "linear".
Layers below `min_sparsity`, grouped/depthwise convs and non-zero padding modes always stay dense.

`save_exported(model, path)` / `load_exported(path)`: one safetensors file. The tensors are the
state of every leaf module; the JSON config in the file's metadata (key "adapmtl.export") holds
 - the model's forward as a torch.fx graph (symbolically traced; SparseConv2d/SparseLinear and
   torch.nn built-in layers are leaves), nodes serialised with tagged JSON arguments;
 - each leaf module's class (only torch.nn built-ins and adapmtl's sparse layers are accepted on
   load) and its plain attributes (ints, floats, tuples, strings...).
Loading rebuilds a `torch.fx.GraphModule` with the same forward signature and outputs, so it needs
neither the model's source code nor adapmtl's training code. Models whose forward cannot be traced
symbolically (data-dependent Python control flow) make `save_exported` raise ValueError; arguments
that select a branch can be fixed with `concrete_args` (e.g. MultiTaskModel's `tasks=None`).
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, fx, nn

from adapmtl.nn.sparse_layers import SPARSE_LAYER_TYPES, SparseConv2d, SparseLinear
from adapmtl.ops.sparse_conv import SPARSE_BACKENDS

FORMAT = "adapmtl-sparse-export"
VERSION = 1
METADATA_KEY = "adapmtl.export"
POLICIES = ("time", "crossover")

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


def _median_times(fns: Sequence[Callable[[], Any]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each function, timed in alternation (one call of each per round) so that
    drifting machine speed hits all of them alike; synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        fn()  # warm-up: first-call allocations and lazy initialisation
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def export_sparse(
    model: nn.Module,
    min_sparsity: float = 0.5,
    backend: str = "auto",
    *,
    policy: Optional[str] = None,
    example_input: Any = None,
    repeats: int = 5,
    inplace: bool = False,
) -> nn.Module:
    """Replace layers by sparse modules where that is faster (module docstring). Returns the model
    (a deep copy unless `inplace`) in eval mode with every parameter frozen (requires_grad False);
    `model.sparse_export_report` lists every decision.

    Args:
        min_sparsity: layers with a smaller fraction of zero weights always stay dense.
        backend: backend of the sparse modules (adapmtl.ops.sparse_conv.SPARSE_BACKENDS).
        policy: "time" or "crossover"; default "time" if `example_input` is given, else "crossover".
        example_input: a tensor (or tuple of positional arguments) for one forward pass ("time").
        repeats: timed runs per layer and variant ("time").
    """
    from adapmtl.sparsify import finalize  # late: sparsify imports the training-side layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_sparse: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"export_sparse: argument 'min_sparsity' must be a number in [0, 1], got {min_sparsity!r}")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"export_sparse: argument 'backend' must be one of {SPARSE_BACKENDS}, got {backend!r}")
    if policy is None:
        policy = "time" if example_input is not None else "crossover"
    if policy not in POLICIES:
        raise ValueError(f"export_sparse: argument 'policy' must be one of {POLICIES}, got {policy!r}")
    if policy == "time" and example_input is None:
        raise ValueError("export_sparse: policy='time' needs argument 'example_input' (one batch of model input)")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"export_sparse: argument 'repeats' must be a positive int, got {repeats!r}")

    if not inplace:
        model = copy.deepcopy(model)
    finalize(model)
    model.eval()
    # An inference model: the sparse ops refuse inputs that require grad, and activations would if any
    # dense layer's parameters still did.
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = {name: m for name, m in model.named_modules() if name and _candidate(m)}

    inputs: dict[str, Tensor] = {}
    if policy == "time":
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: inputs.setdefault(name, inp[0].detach()))
                 for name, m in candidates.items()]
        try:
            with torch.no_grad():
                model(*args)
        finally:
            for h in hooks:
                h.remove()

    report = []
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
                    entry["dense_s"], entry["sparse_s"] = _median_times(
                        [lambda: layer(x), lambda: sparse_layer(x)], repeats, x.device)
                use = entry["sparse_s"] < entry["dense_s"]
            else:
                use, sparse_layer = False, None
            if use:
                _set_submodule(model, name, sparse_layer)
                entry["sparse"] = True
        report.append(entry)
    model.sparse_export_report = report
    return model


# ----------------------------------------------------------------------------------------------
# Save / load.


class _Tracer(fx.Tracer):
    """torch.nn built-ins and the sparse layers are leaves; user modules are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SPARSE_LAYER_TYPES) or super().is_leaf_module(m, qualname)


_ALLOWED_FUNCTION_MODULES = ("operator", "_operator", "builtins", "math")
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"}


def _allowed_function_module(mod: str) -> bool:
    return mod in _ALLOWED_FUNCTION_MODULES or mod == "torch" or mod.startswith("torch.")


def _allowed_module_class(path: str) -> bool:
    return path.startswith("torch.nn.modules.") or path == "adapmtl.nn.sparse_layers"


def _resolve(module_name: str, qualname: str):
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _encode_function(fn) -> str:
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    candidates = [(mod, qual)] if mod and qual else []
    # Some torch builtins report a private module; fall back to the public namespaces.
    candidates += [("torch", getattr(fn, "__name__", "")), ("torch.nn.functional", getattr(fn, "__name__", "")),
                   ("operator", getattr(fn, "__name__", "")), ("builtins", getattr(fn, "__name__", ""))]
    for m, q in candidates:
        if not m or not q or not _allowed_function_module(m):
            continue
        try:
            if _resolve(m, q) is fn:
                return f"{m}:{q}"
        except (ImportError, AttributeError):
            continue
    raise ValueError(f"save_exported: the model calls {fn!r}, which is not a torch/operator/builtins/math function; "
                     "only those can be saved without the model's code")


def _decode_function(text: str):
    mod, _, qual = text.partition(":")
    if not _allowed_function_module(mod):
        raise ValueError(f"load_exported: refusing to call {text!r} (only torch/operator/builtins/math functions)")
    return _resolve(mod, qual)


def _encode_value(v, where: str):
    if isinstance(v, fx.Node):
        return {"__node__": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode_value(i, where) for i in v]}
    if isinstance(v, list):
        return [_encode_value(i, where) for i in v]
    if isinstance(v, dict):
        return {"__dict__": [[_encode_value(k, where), _encode_value(i, where)] for k, i in v.items()]}
    if isinstance(v, slice):
        return {"__slice__": [_encode_value(v.start, where), _encode_value(v.stop, where), _encode_value(v.step, where)]}
    if v is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"__device__": str(v)}
    if isinstance(v, torch.memory_format):
        return {"__memory_format__": str(v).replace("torch.", "")}
    raise ValueError(f"save_exported: cannot serialise {type(v).__name__} value {v!r} in {where}")


def _decode_value(v, nodes: dict):
    if isinstance(v, list):
        return [_decode_value(i, nodes) for i in v]
    if not isinstance(v, dict):
        return v
    (tag, body), = v.items()
    if tag == "__node__":
        return nodes[body]
    if tag == "__tuple__":
        return tuple(_decode_value(i, nodes) for i in body)
    if tag == "__dict__":
        return {_decode_value(k, nodes): _decode_value(i, nodes) for k, i in body}
    if tag == "__slice__":
        return slice(*(_decode_value(i, nodes) for i in body))
    if tag == "__ellipsis__":
        return Ellipsis
    if tag == "__float__":
        return float(body)
    if tag == "__dtype__":
        return getattr(torch, body)
    if tag == "__device__":
        return torch.device(body)
    if tag == "__memory_format__":
        return getattr(torch, body)
    raise ValueError(f"load_exported: unknown tag {tag!r} in the saved graph")


def _module_record(path: str, m: nn.Module) -> dict:
    cls = type(m)
    if not _allowed_module_class(cls.__module__):
        raise ValueError(f"save_exported: leaf module {path!r} is a {cls.__module__}.{cls.__qualname__}; only torch.nn "
                         "built-in layers and adapmtl sparse layers can be saved")
    attrs = {}
    for key, value in vars(m).items():
        if key in _SKIP_ATTRS or (key.startswith("_") and "hook" in key) or key.startswith("_state_dict") or \
                key.startswith("_load_state_dict") or key == "_is_full_backward_hook":
            continue
        try:
            attrs[key] = _encode_value(value, f"attribute {key!r} of module {path!r}")
        except ValueError:
            if key.startswith("_"):
                continue  # private torch bookkeeping re-created by nn.Module.__init__
            raise
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "attrs": attrs,
        "parameters": [n for n, p in m._parameters.items() if p is not None],
        "buffers": [n for n, b in m._buffers.items() if b is not None],
        "none_parameters": [n for n, p in m._parameters.items() if p is None],
        "none_buffers": [n for n, b in m._buffers.items() if b is None],
        "training": m.training,
    }


def save_exported(model: nn.Module, path, concrete_args: Optional[dict] = None) -> None:
    """Save `model` (typically from `export_sparse`) to one safetensors file (module docstring).

    `concrete_args` fixes forward arguments during tracing (e.g. {"tasks": None} for MultiTaskModel)."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_exported: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if concrete_args is None and "tasks" in _forward_params(model):
        concrete_args = {"tasks": None}
    try:
        graph = _Tracer().trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; report them as one clear error
        raise ValueError(f"save_exported: the model's forward cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                         "pass concrete_args for branch-selecting arguments") from exc

    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict] = {}
    attrs: list[str] = []
    nodes = []
    for node in graph.nodes:
        where = f"node {node.name!r}"
        record = {"name": node.name, "op": node.op, "args": _encode_value(node.args, where),
                  "kwargs": _encode_value(node.kwargs, where)}
        if node.op == "call_function":
            record["target"] = _encode_function(node.target)
        else:
            record["target"] = node.target
        if node.op == "call_module" and node.target not in modules:
            m = model.get_submodule(node.target)
            modules[node.target] = _module_record(node.target, m)
            for n, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None:
                    tensors[f"{node.target}.{n}"] = t.detach()
        if node.op == "get_attr" and node.target not in attrs:
            value = _resolve_attr(model, node.target)
            if not isinstance(value, Tensor):
                raise ValueError(f"save_exported: attribute {node.target!r} used by the forward is not a tensor")
            tensors[node.target] = value.detach()
            attrs.append(node.target)
        nodes.append(record)
    config = {"format": FORMAT, "version": VERSION, "nodes": nodes, "modules": modules, "attrs": attrs}
    # safetensors stores each tensor once, contiguous, on the CPU.
    flat = {k: v.contiguous().cpu().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata={METADATA_KEY: json.dumps(config)})


def _forward_params(model: nn.Module):
    import inspect

    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _resolve_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _build_module(path: str, record: dict, tensors: dict[str, Tensor]) -> nn.Module:
    mod_name, _, qual = record["class"].partition(":")
    if not _allowed_module_class(mod_name):
        raise ValueError(f"load_exported: refusing to build {record['class']!r} for {path!r} "
                         "(only torch.nn built-ins and adapmtl sparse layers)")
    cls = _resolve(mod_name, qual)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"load_exported: {record['class']!r} is not an nn.Module class")
    m = cls.__new__(cls)
    nn.Module.__init__(m)  # empty state; the saved attributes and tensors fill it in
    for key, value in record["attrs"].items():
        object.__setattr__(m, key, _decode_value(value, {}))
    for name in record["parameters"]:
        m.register_parameter(name, nn.Parameter(tensors[f"{path}.{name}"], requires_grad=False))
    for name in record["buffers"]:
        m.register_buffer(name, tensors[f"{path}.{name}"])
    for name in record["none_parameters"]:
        m.register_parameter(name, None)
    for name in record["none_buffers"]:
        m.register_buffer(name, None)
    m.train(record["training"])
    return m


def load_exported(path, map_location="cpu") -> fx.GraphModule:
    """Load a model saved by `save_exported` as a `torch.fx.GraphModule` on `map_location`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"load_exported: {path!s} is not an adapmtl export (no {METADATA_KEY!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta[METADATA_KEY])
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"load_exported: unsupported export format {config.get('format')!r} "
                         f"version {config.get('version')!r} (expected {FORMAT!r} {VERSION})")

    root = nn.Module()

    def install(target: str, value, as_module: bool):
        parent = root
        *parents, leaf = target.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if as_module:
            parent.add_module(leaf, value)
        else:
            parent.register_buffer(leaf, value)

    for target, record in config["modules"].items():
        install(target, _build_module(target, record, tensors), True)
    for target in config["attrs"]:
        install(target, tensors[target], False)

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for rec in config["nodes"]:
        args = _decode_value(rec["args"], env)
        kwargs = _decode_value(rec["kwargs"], env)
        op = rec["op"]
        target = _decode_function(rec["target"]) if op == "call_function" else rec["target"]
        if op == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), kwargs, name=rec["name"])
        env[rec["name"]] = node
    gm = fx.GraphModule(root, graph)
    gm.eval()
    return gm.to(map_location)
