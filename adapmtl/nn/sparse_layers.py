"""Inference modules holding a packed sparse weight: `SparseConv2d` and `SparseLinear`.

Made from a trained layer with `from_dense(layer)`: a plain `nn.Conv2d` / `nn.Linear`, or an STR layer
(its soft-thresholded `effective_weight()` is packed). The packed arrays (layout:
adapmtl/ops/sparse_weight.py) are buffers, so `.to(device)`, `state_dict()` and the exporter's
save/load handle them like any other module state. Inference only (see adapmtl.ops.sparse_conv).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from adapmtl.ops.sparse_conv import (SPARSE_BACKENDS, check_clamp, dead_tap_margin, int_pair, sparse_conv2d,
                                     sparse_linear)
from adapmtl.ops.sparse_weight import SparseWeight


def _dense_weight(layer: nn.Module) -> Tensor:
    # STR layers expose the soft-thresholded weight; plain layers are packed as they are.
    effective = getattr(layer, "effective_weight", None)
    weight = effective() if callable(effective) else layer.weight
    return weight.detach()


class _SparseBase(nn.Module):
    row_ptr: Tensor
    col_idx: Tensor
    values: Tensor
    bias: Optional[Tensor]

    def _set_weight(self, op: str, sw: SparseWeight, bias: Optional[Tensor], backend: str) -> None:
        if not isinstance(sw, SparseWeight):
            raise TypeError(f"{op}: argument 'sw' must be a SparseWeight, got {type(sw).__name__}")
        if bias is not None and not isinstance(bias, Tensor):
            raise TypeError(f"{op}: argument 'bias' must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias is not None and (tuple(bias.shape) != (sw.shape[0],) or bias.dtype != sw.dtype):
            raise ValueError(f"{op}: argument 'bias' must be a [{sw.shape[0]}] tensor of dtype {sw.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        if backend not in SPARSE_BACKENDS:
            raise ValueError(f"{op}: argument 'backend' must be one of {SPARSE_BACKENDS}, got {backend!r}")
        self.register_buffer("row_ptr", sw.row_ptr)
        self.register_buffer("col_idx", sw.col_idx)
        self.register_buffer("values", sw.values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_shape = tuple(sw.shape)
        self.backend = backend
        self._packed, self._packed_versions = sw, _versions((sw.row_ptr, sw.col_idx, sw.values))

    @property
    def sparse_weight(self) -> SparseWeight:
        """The packed weight over the buffers (follows `.to()` and `load_state_dict`). Validated once per
        change of the buffers (a new tensor or an in-place write), not per forward."""
        buffers = (self.row_ptr, self.col_idx, self.values)
        if torch.compiler.is_compiling():  # traced: the buffers are graph inputs, and their contents (checked
            return SparseWeight(*buffers, self.weight_shape)  # eagerly when made or loaded) cannot be read here
        sw = self.__dict__.get("_packed")
        if sw is not None and all(a is b for a, b in zip((sw.row_ptr, sw.col_idx, sw.values), buffers)) \
                and sw.shape == self.weight_shape and self.__dict__.get("_packed_versions") == _versions(buffers):
            return sw
        sw = SparseWeight(*buffers, self.weight_shape)
        self.__dict__["_packed"], self.__dict__["_packed_versions"] = sw, _versions(buffers)
        return sw

    @property
    def sparsity(self) -> float:
        return self.sparse_weight.sparsity

    def dense_weight(self) -> Tensor:
        return self.sparse_weight.to_dense()


class SparseConv2d(_SparseBase):
    """`nn.Conv2d` (zero padding) inference with a CSR-packed weight; `backend` as in `sparse_conv2d`.

    `clamp` (lo, hi) and `forward(x, residual)` are the conv's epilogue (sparse_conv2d): clamp(conv(x) +
    residual, lo, hi), fused into the CPU kernel's store; the export's `fuse_epilogues` pass sets them from the
    add and ReLU / ReLU6 that follow the conv."""

    def __init__(self, sw: SparseWeight, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, backend: str = "auto", clamp: Optional[tuple] = None):
        super().__init__()
        op = "SparseConv2d"
        if isinstance(sw, SparseWeight) and len(sw.shape) != 4:
            raise ValueError(f"{op}: argument 'sw' must pack a 4-D conv weight, got shape {sw.shape}")
        self._set_weight(op, sw, bias, backend)
        self.stride = int_pair(op, "stride", stride, 1)
        self.padding = int_pair(op, "padding", padding, 0)
        self.dilation = int_pair(op, "dilation", dilation, 1)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or sw.shape[0] % groups:
            raise ValueError(f"{op}: argument 'groups' must be a positive int dividing C_out ({sw.shape[0]}), "
                             f"got {groups!r}")
        self.groups = groups
        self.clamp = check_clamp(op, clamp)
        self.out_channels = sw.shape[0]
        self.in_channels = sw.shape[1] * self.groups
        self.kernel_size = tuple(sw.shape[2:])

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, backend: str = "auto") -> "SparseConv2d":
        """From an `nn.Conv2d` or STR conv layer (zero padding with integer padding only)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense: argument 'conv' must be an nn.Conv2d (or STRConv2d), got "
                            f"{type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d.from_dense: only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"SparseConv2d.from_dense: string padding {conv.padding!r} is not supported; use ints")
        return cls(SparseWeight.from_dense(_dense_weight(conv)), conv.bias, conv.stride, conv.padding,
                   conv.dilation, conv.groups, backend)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        sw, padding = self._weight_for(x)
        return sparse_conv2d(x, sw, self.bias, self.stride, padding, self.dilation, self.groups, self.backend,
                             residual=residual, clamp=self.clamp)

    def _weight_for(self, x: Tensor) -> tuple[SparseWeight, tuple[int, int]]:
        """The packed weight and padding for this input's size: without the outer taps that read only padding
        at this size (a 3x3 conv with dilation >= the map runs as the 1x1 it is; the kernels would pack and skip
        all that padding), the same output. Kept per input size, rebuilt when the weight changes as torch sees
        it (a buffer's version counter: in-place torch ops, assignment, load_state_dict). A write that bypasses
        the counter (`.data`, numpy) is not seen by this trimmed copy, while the untrimmed path sees it (the C++
        kernel compares the bytes of its kept plans); checking the bytes here would cost about what trimming
        saves. Traced (torch.compile / export): the whole weight, which the C++ kernel trims itself (slower than
        this copy: its kept plan holds and compares the whole weight's values, 3x on MobileNetV2's 11x11 heads),
        except inside `traced_at_static_sizes`, which hands the trace the trimmed copy for the one size it admits."""
        sw = self.sparse_weight
        if torch.compiler.is_compiling():
            static = self.__dict__.get("_static_taps")  # (input size, trimmed weight, padding)
            if static is not None and x.dim() == 4 and tuple(x.shape[2:]) == static[0]:
                return static[1], static[2]
            return sw, self.padding
        if self.groups != 1 or x.dim() != 4:
            return sw, self.padding
        margin = tuple(dead_tap_margin(x.shape[2 + i], self.kernel_size[i], self.stride[i], self.padding[i],
                                       self.dilation[i]) for i in range(2))
        if margin == (0, 0):
            return sw, self.padding
        packed_from, trimmed = self.__dict__.get("_trimmed_by_margin", (None, None))
        if packed_from is not sw:  # a new packed weight (a load, an in-place write): start over
            trimmed = {}
            self.__dict__["_trimmed_by_margin"] = (sw, trimmed)
        if margin not in trimmed:
            trimmed[margin] = sw.trim_taps(margin)
        if trimmed[margin] is None:  # a non-finite weight on a dead tap: its NaN on the padding must stay
            return sw, self.padding
        padding = (self.padding[0] - margin[0] * self.dilation[0], self.padding[1] - margin[1] * self.dilation[1])
        return trimmed[margin], padding

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity:.4f}, backend={self.backend!r}")


def forward_with_pre_hooks(model: nn.Module, args: tuple, hooks: dict) -> None:
    """One forward of `model` on `args` without grad, calling hooks[m](m, inputs) before each listed module m runs
    (the hooks are removed afterwards, whatever happens)."""
    handles = [m.register_forward_pre_hook(hook) for m, hook in hooks.items()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()


def first_inputs(model: nn.Module, args: tuple, modules: dict) -> dict:
    """{name: the first positional input module `modules[name]` receives} in one forward of `model` on `args`
    (detached; modules the forward never reaches are absent)."""
    inputs: dict = {}
    forward_with_pre_hooks(model, args, {m: lambda mod, inp, name=name: inputs.setdefault(name, inp[0].detach())
                                         for name, m in modules.items()})
    return inputs


@contextlib.contextmanager
def traced_at_static_sizes(model: nn.Module, args: tuple):
    """For a trace whose inputs' spatial sizes are fixed (torch.export with static height and width, as
    adapmtl.interchange.export_pt2 makes): each SparseConv2d hands the trace the copy of its weight without the
    taps that read only padding at the size it sees in one eager forward on `args`, as eager runs it, instead of
    the whole weight. The program then admits only those sizes, so its output is the same. Inside the block
    only; the model is left as it was."""
    convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]

    def keep(module, inputs):
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and x.dim() == 4:
            sw, padding = module._weight_for(x)
            if sw is not module.sparse_weight:
                module.__dict__["_static_taps"] = (tuple(x.shape[2:]), sw, padding)

    forward_with_pre_hooks(model, args, {m: keep for m in convs})
    try:
        yield
    finally:
        for m in convs:
            m.__dict__.pop("_static_taps", None)


class SparseLinear(_SparseBase):
    """`nn.Linear` inference with a CSR-packed weight; `backend` as in `sparse_linear`."""

    def __init__(self, sw: SparseWeight, bias: Optional[Tensor] = None, backend: str = "auto"):
        super().__init__()
        if isinstance(sw, SparseWeight) and len(sw.shape) != 2:
            raise ValueError(f"SparseLinear: argument 'sw' must pack a 2-D linear weight, got shape {sw.shape}")
        self._set_weight("SparseLinear", sw, bias, backend)
        self.out_features, self.in_features = sw.shape

    @classmethod
    def from_dense(cls, linear: nn.Linear, backend: str = "auto") -> "SparseLinear":
        """From an `nn.Linear` or STR linear layer."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: argument 'linear' must be an nn.Linear (or STRLinear), got "
                            f"{type(linear).__name__}")
        return cls(SparseWeight.from_dense(_dense_weight(linear)), linear.bias, backend)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.sparse_weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity:.4f}, backend={self.backend!r}")


SPARSE_LAYER_TYPES = (SparseConv2d, SparseLinear)


def _versions(tensors) -> Optional[tuple]:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter: validate every time
        return None
