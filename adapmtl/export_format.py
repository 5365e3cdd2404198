"""The exported-model file: one safetensors file that loads without the model's code and without
running any code from the file.

`save_exported(model, path)` / `load_exported(path)`. The tensors are the state of every leaf module
(plus tensors the forward reads with `get_attr`); the JSON in the file's metadata (key
"adapmtl.export") holds
 - the forward as a torch.fx graph (symbolically traced; SparseConv2d/SparseLinear and torch.nn
   built-in layers are leaves), node arguments as tagged JSON;
 - each leaf module as a class name from `MODULE_CLASSES` plus its constructor arguments.

A file is untrusted input, so loading accepts a closed vocabulary and nothing else:
 - call_function targets are names in `FUNCTIONS` (an explicit table, looked up by name; there is no
   walk through modules), `getattr` only for the attributes in `GETATTR_NAMES`;
 - call_method targets are names in `TENSOR_METHODS`;
 - node names, placeholder targets and keyword-argument names are plain identifiers (torch.fx pastes
   them into the Python it generates); call_module / get_attr targets are dotted paths of identifiers
   and indices naming a module / tensor of the file;
 - module classes come from `MODULE_CLASSES`; their constructor arguments are plain values checked by
   the constructor itself (built on the meta device: nothing is allocated), and every saved tensor must
   match the shape the constructor implies (a conv whose kernel_size disagrees with its weight is
   refused, not run). Sparse layers are rebuilt through `SparseWeight`, which validates the CSR arrays.
Anything else — a random, truncated or malformed file, an unknown tag, a missing output node — is a
ValueError naming the file and the node or module.
"""
from __future__ import annotations

import builtins
import inspect
import json
import keyword
import math
import operator
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from adapmtl.checkpoint_io import output_mode
from adapmtl.nn.sparse_layers import SPARSE_LAYER_TYPES, SparseConv2d, SparseLinear
from adapmtl.ops.sparse_conv import SPARSE_BACKENDS, available_sparse_backends
from adapmtl.ops.sparse_weight import SparseWeight

FORMAT = "adapmtl-sparse-export"
VERSION = 2
METADATA_KEY = "adapmtl.export"
_MAX_DEPTH = 32  # nesting of saved argument values (tuples of tuples...): far more than any real graph

# ----------------------------------------------------------------------------------------------
# The closed vocabulary.

_OPERATOR_NAMES = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul",
                   "getitem", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_",
                   "iadd", "isub", "imul", "itruediv")
_TORCH_NAMES = ("cat", "concat", "stack", "flatten", "reshape", "transpose", "permute", "squeeze", "unsqueeze",
                "chunk", "split", "relu", "sigmoid", "tanh", "softmax", "log_softmax", "add", "sub", "mul", "div",
                "matmul", "mm", "bmm", "einsum", "mean", "sum", "amax", "amin", "max", "min", "clamp", "sqrt",
                "rsqrt", "exp", "log", "abs", "neg", "pow", "where", "zeros_like", "ones_like", "full_like",
                "argmax", "argmin", "narrow", "unbind", "addmm", "baddbmm", "erf", "square", "clip", "tensor_split",
                "movedim", "roll", "flip", "cumsum", "norm")
_FUNCTIONAL_NAMES = ("relu", "relu6", "gelu", "silu", "mish", "elu", "selu", "leaky_relu", "hardswish",
                     "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softmax", "log_softmax", "softplus",
                     "interpolate", "upsample", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                     "avg_pool2d", "max_pool2d", "dropout", "dropout2d", "normalize", "pad", "linear", "conv2d",
                     "batch_norm", "layer_norm", "group_norm", "pixel_shuffle", "pixel_unshuffle")
_MATH_NAMES = ("sqrt", "floor", "ceil", "prod")
_BUILTIN_NAMES = ("getattr", "len", "int", "float", "max", "min", "abs")


def _function_table() -> dict[str, Any]:
    table: dict[str, Any] = {}
    for prefix, module, names in (("operator", operator, _OPERATOR_NAMES), ("torch", torch, _TORCH_NAMES),
                                  ("torch.nn.functional", F, _FUNCTIONAL_NAMES), ("math", math, _MATH_NAMES),
                                  ("builtins", builtins, _BUILTIN_NAMES)):
        for name in names:
            fn = getattr(module, name, None)  # a name this torch version lacks is simply not offered
            if callable(fn):
                table[f"{prefix}.{name}"] = fn
    # tracing with concrete_args={"tasks": None} inserts this check of the fixed argument
    from torch.fx._symbolic_trace import _assert_is_none
    table["torch.fx._assert_is_none"] = _assert_is_none
    return table


FUNCTIONS: dict[str, Any] = _function_table()
_FUNCTION_NAMES = {}
for _name, _fn in FUNCTIONS.items():
    _FUNCTION_NAMES.setdefault(id(_fn), _name)
del _name, _fn

# `x.shape` traces to getattr(x, "shape"): only these attribute names (never dunders) may be read.
GETATTR_NAMES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda"})

TENSOR_METHODS = frozenset({
    "size", "dim", "numel", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
    "transpose", "t", "contiguous", "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "chunk", "split",
    "unbind", "narrow", "mean", "sum", "amax", "amin", "max", "min", "argmax", "argmin", "softmax", "log_softmax",
    "sigmoid", "tanh", "relu", "clamp", "clamp_min", "clamp_max", "clip", "add", "sub", "mul", "div", "pow",
    "sqrt", "rsqrt", "exp", "log", "abs", "neg", "matmul", "mm", "bmm", "float", "double", "half", "bfloat16",
    "to", "type_as", "norm", "masked_fill", "detach", "clone", "add_", "mul_", "relu_", "sigmoid_", "square",
    "erf", "movedim", "roll", "flip", "cumsum", "index_select", "gather",
})

# Leaf module classes a file may build. torch.nn ones are rebuilt from their constructor arguments;
# the sparse layers from their packed weight.
_NN_CLASSES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear, nn.Bilinear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.Softmax2d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
MODULE_CLASSES: dict[str, type] = {f"torch.nn.{c.__name__}": c for c in _NN_CLASSES}
MODULE_CLASSES.update({"adapmtl.SparseConv2d": SparseConv2d, "adapmtl.SparseLinear": SparseLinear})
_CLASS_NAMES = {c: name for name, c in MODULE_CLASSES.items()}

_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_SPARSE_INIT = {SparseConv2d: ("weight_shape", "stride", "padding", "dilation", "groups", "backend", "clamp"),
                SparseLinear: ("weight_shape", "backend")}
_SPARSE_OPTIONAL = {"clamp"}  # saved only when set (the fused epilogue), so unfused exports read as before


def _is_identifier(name) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name) and name.isascii()


def _is_dotted(name) -> bool:
    # module paths: identifiers, or indices of Sequential/ModuleList ("features.0.conv")
    return isinstance(name, str) and bool(name) and all(
        _is_identifier(p) or (p.isdigit() and p.isascii()) for p in name.split("."))


def _ctor_params(cls: type) -> list[str]:
    """Constructor arguments recorded for a torch.nn class (factory kwargs and *args excluded)."""
    sig = inspect.signature(cls.__init__)
    return [p.name for p in list(sig.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("device", "dtype")]


# ----------------------------------------------------------------------------------------------
# Save.


class ExportTracer(fx.Tracer):
    """torch.nn built-ins and the sparse layers are leaves; user modules are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SPARSE_LAYER_TYPES) or super().is_leaf_module(m, qualname)


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


# save_exported keeps no code, so it takes the model classes and functions it knows; torch.export takes any.
PT2_HINT = ("; export such a model with adapmtl.interchange.export_pt2 instead (torch.export: any module, "
            "loaded with torch.export.load after `import adapmtl`)")


def _encode_function(fn, where: str) -> str:
    name = _FUNCTION_NAMES.get(id(fn))
    if name is None:
        raise ValueError(f"save_exported: {where} calls {fn!r}, which is not in adapmtl.export_format.FUNCTIONS "
                         "(the functions an exported model may call without its code)" + PT2_HINT)
    return name


def _module_record(path: str, m: nn.Module) -> dict:
    cls = type(m)
    name = _CLASS_NAMES.get(cls)
    if name is None:
        raise ValueError(f"save_exported: leaf module {path!r} is a {cls.__module__}.{cls.__qualname__}; only the "
                         "classes in adapmtl.export_format.MODULE_CLASSES can be saved" + PT2_HINT)
    where = f"module {path!r}"
    if cls in _SPARSE_INIT:
        init = {k: getattr(m, k) for k in _SPARSE_INIT[cls]}
        init = {k: v for k, v in init.items() if not (k in _SPARSE_OPTIONAL and v is None)}
    else:
        init = {}
        for p in _ctor_params(cls):
            if not hasattr(m, p):
                continue  # not kept as an attribute: the constructor's default is what it used
            v = getattr(m, p)
            if isinstance(v, Tensor) or (v is None and (p in m._parameters or p in m._buffers)):
                v = v is not None  # e.g. bias=True/False
            init[p] = v
    return {"class": name, "init": _encode_value(init, where), "training": m.training}


def default_concrete_args(model: nn.Module) -> Optional[dict]:
    """What tracing fixes when the caller does not say: MultiTaskModel's `tasks=None` (every head)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return {"tasks": None} if "tasks" in params else None


def save_exported(model: nn.Module, path, concrete_args: Optional[dict] = None) -> None:
    """Save `model` (typically from `export_sparse`) to one safetensors file (module docstring).

    `concrete_args` fixes forward arguments during tracing (e.g. {"tasks": None} for MultiTaskModel)."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_exported: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if concrete_args is None:
        concrete_args = default_concrete_args(model)
    try:
        graph = ExportTracer().trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; report them as one clear error
        raise ValueError(f"save_exported: the model's forward cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                         "pass concrete_args for branch-selecting arguments" + PT2_HINT) from exc

    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict] = {}
    attrs: list[str] = []
    nodes = []
    for node in graph.nodes:
        where = f"node {node.name!r}"
        record = {"name": node.name, "op": node.op, "args": _encode_value(node.args, where),
                  "kwargs": _encode_value(node.kwargs, where)}
        if node.op == "call_function":
            record["target"] = _encode_function(node.target, where)
        else:
            record["target"] = node.target
        if node.op == "call_method" and node.target not in TENSOR_METHODS:
            raise ValueError(f"save_exported: {where} calls method {node.target!r}, which is not in "
                             "adapmtl.export_format.TENSOR_METHODS" + PT2_HINT)
        if node.op == "call_module" and node.target not in modules:
            m = model.get_submodule(node.target)
            modules[node.target] = _module_record(node.target, m)
            for n, t in m.state_dict(keep_vars=True).items():
                tensors[f"{node.target}.{n}"] = t.detach()
        if node.op == "get_attr" and node.target not in attrs:
            value = model
            for part in node.target.split("."):
                value = getattr(value, part)
            if not isinstance(value, Tensor):
                raise ValueError(f"save_exported: attribute {node.target!r} used by the forward is not a tensor")
            tensors[node.target] = value.detach()
            attrs.append(node.target)
        nodes.append(record)
    config = {"format": FORMAT, "version": VERSION, "nodes": nodes, "modules": modules, "attrs": attrs}
    # safetensors stores each tensor once, contiguous, on the CPU.
    flat = {k: v.contiguous().cpu().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata={METADATA_KEY: json.dumps(config)})
    os.chmod(path, output_mode())  # safetensors creates 0600; an export is an ordinary file to share


# ----------------------------------------------------------------------------------------------
# Load.


class _Loader:
    """Decodes one file's config; every error names the file and where in it."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def fail(self, where: str, problem: str):
        raise ValueError(f"load_exported: {self.path}: {where}: {problem}")

    # -------------------------------------------------------------- values
    def value(self, v, nodes: dict, where: str, depth: int = 0):
        if depth > _MAX_DEPTH:
            self.fail(where, f"argument values nested deeper than {_MAX_DEPTH}")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.value(i, nodes, where, depth + 1) for i in v]
        if not isinstance(v, dict) or len(v) != 1:
            self.fail(where, f"malformed argument {_short(v)} (expected a JSON scalar, list or one-key tagged object)")
        (tag, body), = v.items()
        if tag == "__node__":
            if not isinstance(body, str) or body not in nodes:
                self.fail(where, f"argument refers to node {_short(body)}, which is not defined before it")
            return nodes[body]
        if tag in ("__tuple__", "__slice__", "__dict__") and not isinstance(body, list):
            self.fail(where, f"tag {tag!r} needs a list, got {_short(body)}")
        if tag == "__tuple__":
            return tuple(self.value(i, nodes, where, depth + 1) for i in body)
        if tag == "__slice__":
            if len(body) != 3:
                self.fail(where, f"tag '__slice__' needs [start, stop, step], got {_short(body)}")
            parts = [self.value(i, nodes, where, depth + 1) for i in body]
            return slice(*parts)
        if tag == "__dict__":
            out = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    self.fail(where, f"tag '__dict__' needs [key, value] pairs, got {_short(pair)}")
                key = self.value(pair[0], nodes, where, depth + 1)
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    self.fail(where, f"dict keys must be str or int, got {_short(pair[0])}")
                out[key] = self.value(pair[1], nodes, where, depth + 1)
            return out
        if tag == "__ellipsis__":
            return Ellipsis
        if tag == "__float__":
            if body not in ("inf", "-inf", "nan"):
                self.fail(where, f"tag '__float__' holds only 'inf', '-inf' or 'nan', got {_short(body)}")
            return float(body)
        if tag == "__dtype__":
            dt = getattr(torch, body, None) if _is_identifier(body) else None
            if not isinstance(dt, torch.dtype):
                self.fail(where, f"{_short(body)} is not a torch dtype")
            return dt
        if tag == "__memory_format__":
            mf = getattr(torch, body, None) if _is_identifier(body) else None
            if not isinstance(mf, torch.memory_format):
                self.fail(where, f"{_short(body)} is not a torch memory format")
            return mf
        if tag == "__device__":
            try:
                return torch.device(body)
            except (TypeError, RuntimeError, ValueError):
                self.fail(where, f"{_short(body)} is not a device")
        self.fail(where, f"unknown tag {_short(tag)}")

    # -------------------------------------------------------------- modules
    def module(self, path: str, record, tensors: dict[str, Tensor], used: set) -> nn.Module:
        where = f"module {path!r}"
        if not isinstance(record, dict) or set(record) != {"class", "init", "training"}:
            self.fail(where, "record must be {'class', 'init', 'training'}")
        cls = MODULE_CLASSES.get(record["class"]) if isinstance(record["class"], str) else None
        if cls is None:
            self.fail(where, f"refusing to build class {_short(record['class'])}: not in "
                             "adapmtl.export_format.MODULE_CLASSES")
        init = self.value(record["init"], {}, where)
        if not isinstance(init, dict) or not all(isinstance(k, str) for k in init):
            self.fail(where, "'init' must be a dict of constructor arguments")
        if not isinstance(record["training"], bool):
            self.fail(where, "'training' must be true or false")
        prefix = path + "."
        state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        used.update(prefix + k for k in state)
        if cls in _SPARSE_INIT:
            m = self._sparse_module(cls, init, state, where)
        else:
            m = self._nn_module(cls, init, state, where)
        m.train(record["training"])
        return m

    def _nn_module(self, cls, init: dict, state: dict, where: str) -> nn.Module:
        allowed = set(_ctor_params(cls))
        unknown = sorted(set(init) - allowed)
        if unknown:
            self.fail(where, f"{cls.__name__} takes no constructor argument(s) {unknown}")
        for k, v in init.items():
            if not _plain(v):
                self.fail(where, f"constructor argument {k!r} must be a number, bool, str, None or a tuple of those, "
                                 f"got {_short(v)}")
        kwargs = dict(init)
        if "device" in inspect.signature(cls.__init__).parameters:
            kwargs["device"] = "meta"  # shapes only: a hostile size allocates nothing
        try:
            m = cls(**kwargs)
        except Exception as exc:  # noqa: BLE001 - constructors raise TypeError/ValueError/RuntimeError
            self.fail(where, f"{cls.__name__}({_short(init)}) is invalid: {exc}")
        expected = m.state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            self.fail(where, f"tensors do not match {cls.__name__}: missing {missing}, unexpected {extra}")
        for k, t in expected.items():
            if tuple(state[k].shape) != tuple(t.shape):
                self.fail(where, f"tensor {k!r} has shape {tuple(state[k].shape)}, but {cls.__name__}({_short(init)}) "
                                 f"needs {tuple(t.shape)}")
            if t.is_floating_point() != state[k].is_floating_point():
                self.fail(where, f"tensor {k!r} has dtype {state[k].dtype}, expected a "
                                 f"{'floating-point' if t.is_floating_point() else 'integer'} tensor")
        m.load_state_dict(state, strict=True, assign=True)
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_meta:
                self.fail(where, f"{name!r} is not stored in the file")
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def _sparse_module(self, cls, init: dict, state: dict, where: str) -> nn.Module:
        names = _SPARSE_INIT[cls]
        if not set(names) - _SPARSE_OPTIONAL <= set(init) <= set(names):
            self.fail(where, f"{cls.__name__} needs exactly the arguments {list(names)} ({sorted(_SPARSE_OPTIONAL)} "
                             f"optional), got {sorted(init)}")
        shape = init["weight_shape"]
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            self.fail(where, f"'weight_shape' must be a tuple of ints, got {_short(shape)}")
        allowed = {"row_ptr", "col_idx", "values", "bias"}
        if not {"row_ptr", "col_idx", "values"} <= set(state) <= allowed:
            self.fail(where, f"needs tensors row_ptr, col_idx, values (and optionally bias), got {sorted(state)}")
        try:
            sw = SparseWeight(state["row_ptr"], state["col_idx"], state["values"], shape)
            rest = {k: v for k, v in init.items() if k != "weight_shape"}
            return cls(sw, state.get("bias"), **rest)
        except (TypeError, ValueError) as exc:
            self.fail(where, str(exc))

    # -------------------------------------------------------------- graph
    def node(self, rec, index: int, env: dict, modules: dict, attrs: set):
        where = f"node {index}"
        if not isinstance(rec, dict) or set(rec) != {"name", "op", "target", "args", "kwargs"}:
            self.fail(where, "must be an object with keys name, op, target, args, kwargs")
        name, op, target = rec["name"], rec["op"], rec["target"]
        if not _is_identifier(name):
            self.fail(where, f"name {_short(name)} is not a plain identifier")
        where = f"node {name!r}"
        if name in env:
            self.fail(where, "defined twice")
        if op not in _NODE_OPS:
            self.fail(where, f"unknown op {_short(op)} (expected one of {_NODE_OPS})")
        args = self.value(rec["args"], env, where)
        kwargs = self.value(rec["kwargs"], env, where)
        if isinstance(args, list):
            args = tuple(args)
        if not isinstance(args, tuple):
            self.fail(where, "'args' must be a tuple")
        if not isinstance(kwargs, dict) or not all(_is_identifier(k) for k in kwargs):
            self.fail(where, "'kwargs' must map plain identifiers to values")
        if op == "placeholder":
            bare = target.lstrip("*") if isinstance(target, str) else None
            if not (_is_identifier(bare) and len(target) - len(bare) <= 2) or kwargs or len(args) > 1:
                self.fail(where, f"placeholder target {_short(target)} must be an identifier (optionally *name / **name)")
            if args and not _plain(args[0]):
                self.fail(where, "a placeholder default must be a plain value")
        elif op == "call_function":
            fn = FUNCTIONS.get(target) if isinstance(target, str) else None
            if fn is None:
                self.fail(where, f"refusing to call {_short(target)}: not in adapmtl.export_format.FUNCTIONS")
            if fn is getattr and not (len(args) == 2 and args[1] in GETATTR_NAMES and not kwargs):
                self.fail(where, f"getattr may only read {sorted(GETATTR_NAMES)}, got {_short(args[1:])}")
            target = fn
        elif op == "call_method":
            if target not in TENSOR_METHODS:
                self.fail(where, f"refusing to call method {_short(target)}: not in "
                                 "adapmtl.export_format.TENSOR_METHODS")
            if not args:
                self.fail(where, "call_method needs the object as its first argument")
        elif op == "call_module":
            if target not in modules:
                self.fail(where, f"calls module {_short(target)}, which the file does not define")
        elif op == "get_attr":
            if target not in attrs:
                self.fail(where, f"reads tensor {_short(target)}, which the file does not define")
            if args or kwargs:
                self.fail(where, "get_attr takes no arguments")
        return op, name, target, args, kwargs


def _plain(v, depth: int = 0) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (tuple, list)) and depth < 3:
        return all(_plain(i, depth + 1) for i in v)
    return False


def _short(v, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def load_exported(path, map_location="cpu", backend: Optional[str] = None) -> fx.GraphModule:
    """Load a model saved by `save_exported` as a `torch.fx.GraphModule` on `map_location`.

    `backend`: the sparse layers' kernel backend. None keeps what the file says where that backend runs
    on `map_location`, and picks "auto" (the best one there) where it does not (a model exported for
    CUDA loaded on a CPU); a name sets every sparse layer to it.

    Safe on untrusted files (module docstring): a file can only describe a graph of the listed
    functions, methods and module classes; anything else raises ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    if backend is not None and backend not in SPARSE_BACKENDS:
        raise ValueError(f"load_exported: argument 'backend' must be None or one of {SPARSE_BACKENDS}, got {backend!r}")
    path_str = os.fspath(path)
    if not os.path.isfile(path_str):
        raise FileNotFoundError(f"load_exported: no file at {path_str!r}")
    loader = _Loader(path_str)
    try:
        with safe_open(path_str, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if METADATA_KEY not in meta:
                raise ValueError(f"load_exported: {path_str} is not an adapmtl export (no {METADATA_KEY!r} metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"load_exported: {path_str} is not a readable safetensors file ({exc})") from exc
    try:
        config = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"load_exported: {path_str}: the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        loader.fail("config", "must be a JSON object")
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(f"load_exported: {path_str}: unsupported export format {_short(config.get('format'))} "
                         f"version {_short(config.get('version'))} (expected {FORMAT!r} {VERSION}; re-export the model "
                         "with this version of adapmtl)")
    nodes, modules, attrs = config.get("nodes"), config.get("modules"), config.get("attrs")
    if not isinstance(nodes, list) or not isinstance(modules, dict) or not isinstance(attrs, list):
        loader.fail("config", "must hold 'nodes' (a list), 'modules' (an object) and 'attrs' (a list)")

    targets = list(modules) + attrs
    for target in targets:
        if not _is_dotted(target):
            loader.fail(f"module or tensor {_short(target)}", "name must be dotted identifiers")
    if len(set(targets)) != len(targets):
        loader.fail("config", "a module or tensor name is defined twice")
    ordered = sorted(targets)
    for a, b in zip(ordered, ordered[1:]):
        if b.startswith(a + "."):
            loader.fail(f"module or tensor {b!r}", f"would sit inside {a!r}")

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

    used: set = set()
    for target, record in modules.items():
        install(target, loader.module(target, record, tensors, used), True)
    for target in attrs:
        if target not in tensors:
            loader.fail(f"tensor {target!r}", "is not stored in the file")
        used.add(target)
        install(target, tensors[target], False)
    unused = sorted(set(tensors) - used)
    if unused:
        loader.fail("tensors", f"{len(unused)} stored tensor(s) belong to no module or attribute: {unused[:5]}")

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    has_output = False
    attr_set = set(attrs)
    for i, rec in enumerate(nodes):
        if has_output:
            loader.fail(f"node {i}", "comes after the output node")
        op, name, target, args, kwargs = loader.node(rec, i, env, modules, attr_set)
        if op == "output":
            if len(args) != 1 or kwargs:
                loader.fail(f"node {name!r}", "the output node takes exactly one argument")
            graph.output(args[0])
            has_output = True
            continue
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
    if not has_output:
        loader.fail("graph", "has no output node")
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph)
    except Exception as exc:  # noqa: BLE001 - fx reports inconsistent graphs in several ways
        loader.fail("graph", f"is inconsistent ({type(exc).__name__}: {exc})")
    gm.eval()
    gm = gm.to(map_location)
    runnable = set(available_sparse_backends(map_location)) | {"auto"}
    for m in gm.modules():
        if isinstance(m, (SparseConv2d, SparseLinear)):
            if backend is not None:
                m.backend = backend
            elif m.backend not in runnable:  # exported for another device: use what runs here
                m.backend = "auto"
    return gm
