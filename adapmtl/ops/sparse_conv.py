"""Sparse inference ops over a `SparseWeight`: `sparse_conv2d` and `sparse_linear`.

Backends (all compute `F.conv2d(x, sw.to_dense(), ...)` / `F.linear(x, sw.to_dense(), ...)`):
  torch      reference: dense F.conv2d / F.linear on the unpacked weight
  torch_csr  torch.sparse CSR x unfold (conv) / CSR x x^T (linear): the torch.sparse peer
  cpp        C++ direct sparse kernel   -> torch.ops.adapmtl.sparse_conv2d on CPU tensors (float32/64)
  cuda       CUDA kernel                -> torch.ops.adapmtl.sparse_conv2d on CUDA tensors
  triton     Triton kernel              -> torch.ops.adapmtl.sparse_conv2d_triton (Python custom op)
  auto       cpp on CPU / cuda (else triton) on GPU when built and the dtype is supported, else torch

The cpp kernel skips, per output tile, kernel taps that read only zero padding (large dilations) and
picks its block layout and sizes per call from this machine's cache sizes (csrc/cpu/sparse_tuning.h):
deterministic. `set_cpu_autotune(True)` (or ADAPMTL_CPU_AUTOTUNE=1) times the candidate configurations at
the first call of each shape instead, as cuDNN's benchmark mode does, optionally remembered in a file;
ADAPMTL_CPU_SPARSE_CONFIG="layout=tap,rows=1,..." forces one (tests run them all).

Epilogue: `sparse_conv2d(..., residual=r, clamp=(lo, hi))` is clamp(conv + bias + r, lo, hi) -- the residual
add and ReLU (0, None) / ReLU6 (0, 6) that follow a conv in ResNet and MobileNet blocks. The cpp kernel does
both in its store (torch.ops.adapmtl.sparse_conv2d_fused), without another pass over the output; the other
backends run them after the conv. Either way the same operations in the same order: the same result as the
unfused conv, add and clamp, bit for bit on a backend.

Grouped and depthwise convolutions (groups > 1) always run dense (F.conv2d on the unpacked
weight), whatever the backend: their per-group rows are too short for sparsity to pay off.

Non-finite values (the same for every backend and every CPU block layout; tests/test_hostile.py):
  - pruned weights are structural zeros: they are not stored and multiply nothing, so an inf/NaN in `x`
    reaches an output only through a stored (non-zero) weight. F.conv2d on the dense weight differs
    here (0 * NaN = NaN), so with a non-finite `x` the torch backend and the grouped path compute over
    the stored weights only (torch.sparse), not with F.conv2d;
  - zero padding is a real zero: a stored inf/NaN weight that reads padding gives NaN there, as in
    F.conv2d (the C++ kernel's skipping of padding-only taps is switched off for such weights);
  - with a finite `x`, every backend equals F.conv2d(x, sw.to_dense(), ...) up to summation order.

Inference only: no backward is implemented, so calling with an input, weight or bias that
requires grad while grad mode is on raises ValueError (wrap the call in `torch.no_grad()` or
`torch.inference_mode()`).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from adapmtl import _ext
from adapmtl.ops.backends import HAS_CPP, SPARSE_BACKENDS, available, check_device, resolve  # noqa: F401 (re-exported)
from adapmtl.ops.sparse_weight import SparseWeight

IntPair = Union[int, Sequence[int]]


def available_sparse_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """Backends of sparse_conv2d / sparse_linear that can run on `device` here (torch ones always can)."""
    return available("sparse_conv2d", device)


def resolve_sparse_backend(backend: str, x: Tensor, op: str = "sparse_conv2d") -> str:
    """The concrete backend `backend` means for input `x`; raises if it cannot run there (backends.resolve)."""
    return resolve(op, backend, x)


def set_cpu_autotune(enabled: bool = True, cache_file: Union[str, os.PathLike, None] = None) -> None:
    """Autotune the C++ sparse conv (backend "cpp"), as `torch.backends.cudnn.benchmark` does for cuDNN.

    With it on, the first call of each (threads, dtype, shapes, stride, padding, dilation, non-zeros) times
    the candidate configurations on that call's input (a staged search: 10-15 candidates, 4 runs each) and later calls use
    the fastest. `cache_file` keeps the choices across processes (one line each, keyed by the CPU model and capability);
    default: ADAPMTL_CPU_AUTOTUNE_CACHE, or memory only. Off (the default), the configuration follows from
    the cache sizes alone and results are deterministic; on, results may differ in the last bits between
    processes (candidates sum in different orders), as with cudnn.benchmark.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_autotune: argument 'enabled' must be a bool, got {type(enabled).__name__}")
    path = "" if cache_file is None else os.fspath(cache_file)
    _ext.require_cpu_extension().set_cpu_autotune(enabled, path)


def cpu_autotune_info() -> dict:
    """The autotuner's state: enabled, cache file, tuned shapes, searches run, cache hits, skipped file lines."""
    keys = ("enabled", "cache_file", "entries", "searches", "hits", "skipped_lines")
    return dict(zip(keys, _ext.require_cpu_extension().cpu_autotune_info()))


def cpu_sparse_plan_cache_info() -> dict:
    """The C++ sparse kernel's plan cache: hits, misses, plans kept and their bytes (csrc/cpu/plan_cache.h).

    A call encodes its weight for the input's size (offsets into the packed input, channel panels); the plan is
    kept and reused while the weight's arrays hold the same bytes (compared on every call), at most
    ADAPMTL_CPU_PLAN_CACHE_MB megabytes (default 256; 0 turns it off).
    """
    keys = ("hits", "misses", "plans", "bytes")
    return dict(zip(keys, _ext.require_cpu_extension().cpu_sparse_plan_cache_info()))


def clear_cpu_sparse_plan_cache() -> None:
    """Drops every kept plan (and the counts); later calls encode their weights again."""
    _ext.require_cpu_extension().cpu_sparse_plan_cache_clear()


def int_pair(op: str, name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    """`value` (an int or a pair of ints, each >= minimum) as a pair, or an error naming `name`."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: argument {name!r} must be an int or a pair of ints, got bool")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: argument {name!r} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: argument {name!r} must be >= {minimum}, got {value!r}")
    return pair


def _check_common(op: str, x, sw, bias, weight_dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(sw, SparseWeight):
        raise TypeError(
            f"{op}: argument 'sw' must be an adapmtl SparseWeight (SparseWeight.from_dense(w)), got {type(sw).__name__}"
        )
    if len(sw.shape) != weight_dim:
        raise ValueError(f"{op}: argument 'sw' must pack a {weight_dim}-D weight, got shape {sw.shape}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: argument 'x' must be a floating-point tensor, got {x.dtype}")
    if sw.dtype != x.dtype:
        raise TypeError(f"{op}: argument 'sw' must have the dtype of 'x' ({x.dtype}), got {sw.dtype}")
    if sw.device != x.device:
        raise ValueError(f"{op}: argument 'sw' must be on the device of 'x' ({x.device}), got {sw.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{op}: argument 'bias' must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (sw.shape[0],):
            raise ValueError(f"{op}: argument 'bias' must have shape ({sw.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: argument 'bias' must have the dtype of 'x' ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{op}: argument 'bias' must be on the device of 'x' ({x.device}), got {bias.device}")
    if torch.is_grad_enabled() and (
        x.requires_grad or sw.values.requires_grad or (bias is not None and bias.requires_grad)
    ):
        raise ValueError(
            f"{op}: inference only (no backward is implemented), but an input requires grad; "
            "call it under torch.no_grad() / torch.inference_mode() or detach the inputs"
        )


def dead_tap_margin(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """How many kernel taps on each side of one dimension read only zero padding at every output position for
    an input of `size`: a conv without them (and with `dilation * margin` less padding) gives the same output
    (the same size too, since as many taps go from each side). E.g. 1 for a 3x3 conv with dilation >= the map,
    which is a 1x1 conv in disguise."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out <= 0:
        return 0

    def live(tap):  # a position o * stride - padding + tap * dilation inside [0, size) for some output o
        first = tap * dilation - padding
        last = first + (out - 1) * stride
        return last >= 0 and first < size and (first >= 0 or (-first + stride - 1) // stride * stride + first < size)

    margin = 0
    while 2 * (margin + 1) < kernel and not live(margin) and not live(kernel - 1 - margin) \
            and padding - (margin + 1) * dilation >= 0:
        margin += 1
    return margin


def sparse_conv2d(
    x: Tensor,
    sw: SparseWeight,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    backend: str = "auto",
    *,
    residual: Optional[Tensor] = None,
    clamp: Optional[tuple] = None,
) -> Tensor:
    """`F.conv2d(x, sw.to_dense(), bias, stride, padding, dilation, groups)` from the packed weight, then
    `+ residual` and `.clamp(*clamp)` when given (the epilogue, module docstring).

    Args:
        x: input [N, C_in, H, W], NCHW or channels-last (the output keeps channels-last).
        sw: `SparseWeight` of a [C_out, C_in/groups, KH, KW] weight, x's dtype and device.
        bias: optional [C_out].
        stride, padding, dilation: int or (h, w) pair; padding is zero padding (>= 0).
        groups: > 1 runs dense F.conv2d on the unpacked weight (stated fallback, module docstring).
        backend: one of SPARSE_BACKENDS (module docstring).
        residual: optional tensor of the output's shape, dtype and device, added after the bias.
        clamp: optional (lo, hi), numbers or None for no bound, lo <= hi: (0, None) is ReLU, (0, 6) ReLU6.
    """
    op = "sparse_conv2d"
    _check_common(op, x, sw, bias, 4)
    if x.dim() != 4:
        raise ValueError(f"{op}: argument 'x' must be 4-D [N, C_in, H, W], got shape {tuple(x.shape)}")
    stride = int_pair(op, "stride", stride, 1)
    padding = int_pair(op, "padding", padding, 0)
    dilation = int_pair(op, "dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: argument 'groups' must be a positive int, got {groups!r}")
    c_out, c_in_g, kh, kw = sw.shape
    if x.shape[1] != c_in_g * groups:
        raise ValueError(
            f"{op}: argument 'x' must have {c_in_g * groups} channels (weight C_in {c_in_g} x groups {groups}), "
            f"got {x.shape[1]}"
        )
    if c_out % groups:
        raise ValueError(f"{op}: the weight's C_out ({c_out}) must be divisible by 'groups' ({groups})")
    for i, side in enumerate("HW"):
        span = dilation[i] * ((kh, kw)[i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < span:
            raise ValueError(
                f"{op}: input {side} ({x.shape[2 + i]}) plus padding is smaller than the dilated kernel ({span})"
            )
    out_shape = conv2d_output_shape(x.shape, sw.shape, stride, padding, dilation)
    lo, hi = _check_epilogue(op, x, out_shape, residual, clamp)
    which = resolve(op, backend, x)
    if (residual is not None or lo is not None or hi is not None) and which == "cpp" and groups == 1 and c_out > 0:
        return torch.ops.adapmtl.sparse_conv2d_fused(x, sw.row_ptr, sw.col_idx, sw.values, bias, list(sw.shape),
                                                     list(stride), list(padding), list(dilation), residual,
                                                     None if lo is None else float(lo),
                                                     None if hi is None else float(hi))
    out = _sparse_conv2d(x, sw, bias, stride, padding, dilation, groups, which)
    if residual is not None:
        out = out + residual
    return out if lo is None and hi is None else out.clamp(lo, hi)


def _check_epilogue(op: str, x: Tensor, out_shape, residual, clamp) -> tuple:
    """The epilogue's arguments checked; returns (lo, hi) (None: no bound)."""
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{op}: argument 'residual' must be a torch.Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != tuple(out_shape) or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{op}: argument 'residual' must be a {tuple(out_shape)} {x.dtype} tensor on {x.device} "
                             f"(the output's), got {tuple(residual.shape)} {residual.dtype} on {residual.device}")
        if torch.is_grad_enabled() and residual.requires_grad:
            raise ValueError(f"{op}: inference only (no backward is implemented), but argument 'residual' requires "
                             "grad; call it under torch.no_grad() / torch.inference_mode()")
    return check_clamp(op, clamp) or (None, None)


def check_clamp(op: str, clamp) -> Optional[tuple]:
    """An epilogue's clamp checked: (lo, hi) as floats or None (no bound), or None for no clamp."""
    if clamp is None:
        return None

    def bound(v):
        return v is None or (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v))

    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(bound(v) for v in clamp) or (
            None not in clamp and clamp[0] > clamp[1]):
        raise ValueError(f"{op}: argument 'clamp' must be (lo, hi), finite numbers or None, lo <= hi, got {clamp!r}")
    return tuple(None if v is None else float(v) for v in clamp)


def _sparse_conv2d(x, sw, bias, stride, padding, dilation, groups, which) -> Tensor:
    """The conv itself, on backend `which` (arguments checked by sparse_conv2d)."""
    c_out = sw.shape[0]
    if c_out == 0:  # a weight with no output channels (F.conv2d refuses it): the empty output
        return x.new_zeros(conv2d_output_shape(x.shape, sw.shape, stride, padding, dilation))
    if groups > 1 or which == "torch":
        if not bool(torch.isfinite(x).all()):  # structural zeros (module docstring): stored weights only
            return _conv2d_stored_only(x, sw, bias, stride, padding, dilation, groups)
        return _dense_conv2d(x, sw.to_dense(), bias, stride, padding, dilation, groups)
    if which == "torch_csr":
        return _conv2d_torch_csr(x, sw, bias, stride, padding, dilation)
    args = (x, sw.row_ptr, sw.col_idx, sw.values, bias, list(sw.shape), list(stride), list(padding), list(dilation))
    if which == "triton":
        return torch.ops.adapmtl.sparse_conv2d_triton(*args)
    return torch.ops.adapmtl.sparse_conv2d(*args)


def sparse_linear(x: Tensor, sw: SparseWeight, bias: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """`F.linear(x, sw.to_dense(), bias)` from the packed [out_features, in_features] weight; x: [..., in]."""
    op = "sparse_linear"
    _check_common(op, x, sw, bias, 2)
    if x.dim() < 1 or x.shape[-1] != sw.shape[1]:
        raise ValueError(f"{op}: argument 'x' must have last dimension {sw.shape[1]}, got shape {tuple(x.shape)}")
    which = resolve(op, backend, x)
    if which == "torch" and bool(torch.isfinite(x).all()):
        return F.linear(x, sw.to_dense(), bias)
    if which in ("torch", "torch_csr"):  # torch with a non-finite x: stored weights only (module docstring)
        flat = x.reshape(-1, sw.shape[1])
        out = torch.sparse.mm(sw.to_torch_csr(), flat.t()).t()
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], sw.shape[0])
    args = (x, sw.row_ptr, sw.col_idx, sw.values, bias, sw.shape[1])
    if which == "triton":
        return torch.ops.adapmtl.sparse_linear_triton(*args)
    return torch.ops.adapmtl.sparse_linear(*args)


def _conv2d_torch_csr(x, sw, bias, stride, padding, dilation):
    """torch.sparse peer: CSR [C_out, C_in*KH*KW] times the unfolded input, one image at a time."""
    c_out, _, kh, kw = sw.shape
    n, _, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C_in*KH*KW, OH*OW]
    csr = sw.to_torch_csr()
    out = torch.stack([torch.sparse.mm(csr, cols[i]) for i in range(n)]) if n else cols.new_zeros(0, c_out, oh * ow)
    if bias is not None:
        out = out + bias[:, None]
    return out.reshape(n, c_out, oh, ow)


def _dense_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """F.conv2d on NCHW input with the bias added after: torch 2.14's CPU F.conv2d segfaults on some
    channels-last inputs with a bias (tests/test_hostile.py found e.g. x [2,4,8,1], w [1,4,2,1], stride
    (3,2), padding (5,3), dilation (2,5)); the output keeps x's memory format."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = F.conv2d(x.contiguous(), weight, None, stride, padding, dilation, groups)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _conv2d_stored_only(x, sw, bias, stride, padding, dilation, groups):
    """The conv over the stored weights only (torch.sparse, group by group): the structural-zero semantics
    for an input holding inf/NaN."""
    if groups == 1:
        return _conv2d_torch_csr(x, sw, bias, stride, padding, dilation)
    c_out = sw.shape[0]
    per_out, per_in = c_out // groups, sw.shape[1]
    outs = []
    for g in range(groups):
        lo, hi = sw.row_ptr[g * per_out], sw.row_ptr[(g + 1) * per_out]
        part = SparseWeight(sw.row_ptr[g * per_out:(g + 1) * per_out + 1] - lo, sw.col_idx[lo:hi], sw.values[lo:hi],
                            (per_out, *sw.shape[1:]))
        b = None if bias is None else bias[g * per_out:(g + 1) * per_out]
        outs.append(_conv2d_torch_csr(x[:, g * per_in:(g + 1) * per_in], part, b, stride, padding, dilation))
    return torch.cat(outs, dim=1)


def conv2d_output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    n, _, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, c_out, oh, ow)


# ----------------------------------------------------------------------------------------------
# Triton custom ops. Direct torch.ops calls are checked as the C++ ops are (csrc/common.h via adapmtl._C);
# the kernels are imported on first use, so TRITON_INTERPRET set before then applies.


@torch.library.custom_op("adapmtl::sparse_conv2d_triton", mutates_args=())
def _sparse_conv2d_triton(
    x: Tensor,
    row_ptr: Tensor,
    col_idx: Tensor,
    values: Tensor,
    bias: Optional[Tensor],
    weight_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    op = "sparse_conv2d_triton"
    check_device(op, "triton", "x", x)
    _ext.require_cpu_extension().check_sparse_conv2d_args(op, x, row_ptr, col_idx, values, bias, weight_shape,
                                                          stride, padding, dilation)
    from adapmtl.triton_kernels import sparse_conv as kernels

    return kernels.sparse_conv2d(x, row_ptr, col_idx, values, bias, weight_shape, stride, padding, dilation)


@torch.library.custom_op("adapmtl::sparse_linear_triton", mutates_args=())
def _sparse_linear_triton(
    x: Tensor, row_ptr: Tensor, col_idx: Tensor, values: Tensor, bias: Optional[Tensor], in_features: int
) -> Tensor:
    op = "sparse_linear_triton"
    check_device(op, "triton", "x", x)
    _ext.require_cpu_extension().check_sparse_linear_args(op, x, row_ptr, col_idx, values, bias, in_features)
    from adapmtl.triton_kernels import sparse_conv as kernels

    return kernels.sparse_linear(x, row_ptr, col_idx, values, bias, in_features)


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes only) for the C++/CUDA ops and the Triton ops, for torch.compile / export.


def _conv_fake(x, row_ptr, col_idx, values, bias, weight_shape, stride, padding, dilation):
    shape = conv2d_output_shape(x.shape, weight_shape, stride, padding, dilation)
    fmt = torch.channels_last if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _conv_fused_fake(x, row_ptr, col_idx, values, bias, weight_shape, stride, padding, dilation, residual, lo, hi):
    return _conv_fake(x, row_ptr, col_idx, values, bias, weight_shape, stride, padding, dilation)


def _linear_fake(x, row_ptr, col_idx, values, bias, in_features):
    return torch.empty((*x.shape[:-1], row_ptr.shape[0] - 1), dtype=x.dtype, device=x.device)


torch.library.register_fake("adapmtl::sparse_conv2d_triton")(_conv_fake)
torch.library.register_fake("adapmtl::sparse_linear_triton")(_linear_fake)
if HAS_CPP:  # the schemas come with adapmtl._C (without it the cpp/cuda backends report that)
    torch.library.register_fake("adapmtl::sparse_conv2d")(_conv_fake)
    torch.library.register_fake("adapmtl::sparse_conv2d_fused")(_conv_fused_fake)
    torch.library.register_fake("adapmtl::sparse_linear")(_linear_fake)


def dense_flops(weight_shape, out_shape) -> int:
    """Multiply-adds x 2 of the dense conv/linear (for benchmarks)."""
    return 2 * math.prod(weight_shape[1:]) * math.prod(out_shape)
