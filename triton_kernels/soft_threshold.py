"""Fused soft-threshold kernels in Triton (SPEC §1).

forward:  out = sign(w) * relu(|w| - g), g = sigmoid(s), plus nnz(out), in one read of w.
backward: grad_w = G * m (exact) or G (ste), m = 1[|w| - g > 0], plus grad_s = -g(1 - g) * sum(G * sign(w) * m),
          in one read of G and w.

Each program handles BLOCK consecutive elements and writes its partial count / partial sum into its own
slot; one single-program kernel then sums the slots in index order (and applies -g(1 - g)). No float
atomics, so results are bitwise reproducible, and nothing is read back to the host.

g is computed on the device by `torch.sigmoid(s)`, the same op as the reference, then rounded to w's dtype
as PyTorch's type promotion does in the reference (a 0-d s never promotes w), and passed by pointer: the
threshold is bit-identical to the reference's and no host sync is needed. Arithmetic is in float32 (float64
for float64 w); float16/bfloat16 values are exact in float32, so `|w| - g` rounds once, on the store,
exactly like PyTorch's half-precision ops, and the forward is bit-identical to the reference.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before this
module is imported). The launchers trust their arguments: the custom ops of adapmtl.ops check them (the
checks of csrc/common.h, as for the C++ ops) before calling here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapmtl.triton_kernels._common import device_guard as _device_guard

__all__ = ["BLOCK_SIZE", "SUPPORTED_DTYPES", "soft_threshold_backward", "soft_threshold_forward"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Elements per program: a memory-bound elementwise pass wants many bytes in flight per SM; 4096 elements
# over 8 warps is 16 per thread (vectorised 16-byte accesses for float32). Also keeps the number of
# partial slots small (n / 4096) for the final ordered sum. Fixed rather than autotuned: the slot count
# must be known before the launch, and a fixed size keeps results independent of tuning.
BLOCK_SIZE = 4096
_NUM_WARPS = 8
_FINISH_BLOCK = 1024


@triton.jit
def _bf16_rne(x):
    # float32 -> bfloat16 rounding to nearest even with integer ops. Only used under the interpreter, whose
    # own float32 -> bfloat16 conversion truncates; compiled kernels use the hardware conversion (also RNE).
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN: the carry could reach the sign bit


@triton.jit
def _forward_kernel(w_ptr, g_ptr, out_ptr, count_ptr, n, BLOCK: tl.constexpr, F64: tl.constexpr,
                    SOFT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tensors may exceed 2^31 elements
    inside = offs < n
    if F64:
        x = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float64)
        g = tl.load(g_ptr).to(tl.float64)
    else:
        x = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr).to(tl.float32)
    a = tl.abs(x) - g
    # written so that NaN survives: NaN <= 0 is false, so r = NaN, and NaN < 0 is false
    r = tl.where(a <= 0, 0.0, a)
    if SOFT_BF16:
        out = _bf16_rne(tl.where(x < 0, -r, r))
    else:
        out = tl.where(x < 0, -r, r).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=inside)
    # count what was stored: a tiny positive a can round to 0 in float16/bfloat16; NaN != 0 counts
    nonzero = (out != 0) & inside
    tl.store(count_ptr + pid, tl.sum(nonzero.to(tl.int32), axis=0))


@triton.jit
def _backward_kernel(grad_ptr, w_ptr, g_ptr, grad_w_ptr, partial_ptr, n, BLOCK: tl.constexpr, STE: tl.constexpr,
                     F64: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    G_raw = tl.load(grad_ptr + offs, mask=inside, other=0.0)
    if F64:
        x = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float64)
        g = tl.load(g_ptr).to(tl.float64)
        G = G_raw.to(tl.float64)
    else:
        x = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr).to(tl.float32)
        G = G_raw.to(tl.float32)
    keep = (tl.abs(x) - g) > 0  # false for NaN and for padding lanes (x = 0, g >= 0)
    masked = tl.where(keep, G, 0.0)
    if STE:
        tl.store(grad_w_ptr + offs, G_raw, mask=inside)
    else:
        tl.store(grad_w_ptr + offs, masked.to(grad_w_ptr.dtype.element_ty), mask=inside)
    # masked * sign(x): x != 0 wherever masked != 0
    signed = tl.where(x < 0, -masked, masked)
    tl.store(partial_ptr + pid, tl.sum(signed, axis=0))


@triton.jit
def _count_finish_kernel(count_ptr, nnz_ptr, num, BLOCK: tl.constexpr):
    # one program, slots summed in a fixed order
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, num, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(count_ptr + offs, mask=offs < num, other=0).to(tl.int64)
    tl.store(nnz_ptr, tl.sum(acc, axis=0))


@triton.jit
def _grad_s_finish_kernel(partial_ptr, g_ptr, grad_s_ptr, num, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    # one program, slots summed in a fixed order, in float64 (a few thousand values: cheap even where
    # float64 is slow), then grad_s = -g(1 - g) * sum, stored in s's dtype (a bfloat16 s under the interpreter
    # through _bf16_rne: its float64 -> bfloat16 conversion gives 0)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, num, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    g = tl.load(g_ptr).to(tl.float64)
    value = -(g * (1.0 - g)) * total
    if SOFT_BF16:
        tl.store(grad_s_ptr, _bf16_rne(value.to(tl.float32)))
    else:
        tl.store(grad_s_ptr, value.to(grad_s_ptr.dtype.element_ty))


def _thresholds(s, dtype):
    """g in s's dtype (for g(1 - g) in grad_s) and g rounded to w's dtype (what the reference subtracts)."""
    g = torch.sigmoid(s.detach().reshape(()))  # the reference's op, so g is bit-identical
    return g, g.to(dtype)


def soft_threshold_forward(w: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sign(w) * relu(|w| - sigmoid(s))` and its number of non-zeros, in one pass over `w`.

    Args:
        w: float32/float64/float16/bfloat16 tensor of any shape and strides, on CUDA (or CPU under
            TRITON_INTERPRET=1).
        s: one-element floating tensor on `w`'s device.

    Returns:
        `(out, nnz)`: `out` contiguous with `w`'s shape and dtype; `nnz` an int64 0-d tensor on `w`'s
        device counting the non-zeros of `out` (NaN counts as non-zero).
    """
    w = w.detach().contiguous()
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    n = w.numel()
    if n == 0:
        return out, torch.zeros((), dtype=torch.int64, device=w.device)
    _, g_w = _thresholds(s, w.dtype)
    programs = triton.cdiv(n, BLOCK_SIZE)
    counts = torch.empty(programs, dtype=torch.int32, device=w.device)
    nnz = torch.empty((), dtype=torch.int64, device=w.device)
    with _device_guard(w):
        _forward_kernel[(programs,)](w, g_w, out, counts, n, BLOCK=BLOCK_SIZE, F64=w.dtype == torch.float64,
                                     SOFT_BF16=w.dtype == torch.bfloat16 and not w.is_cuda, num_warps=_NUM_WARPS)
        _count_finish_kernel[(1,)](counts, nnz, programs, BLOCK=_FINISH_BLOCK, num_warps=4)
    return out, nnz


def soft_threshold_backward(
    grad_out: torch.Tensor, w: torch.Tensor, s: torch.Tensor, ste: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the soft threshold with respect to `w` and `s`, in one pass over `grad_out` and `w`.

    Args:
        grad_out: dL/d(out), `w`'s shape, dtype and device (any strides).
        w, s: as for `soft_threshold_forward`.
        ste: straight-through (`grad_w = grad_out`) instead of exact (`grad_w = grad_out * 1[|w| > g]`).

    Returns:
        `(grad_w, grad_s)`: `grad_w` contiguous with `w`'s shape and dtype; `grad_s` with `s`'s shape and
        dtype, `-g(1 - g) * sum(grad_out * sign(w) * 1[|w| > g])` (exact in both modes), summed
        deterministically.
    """
    w = w.detach().contiguous()
    grad = grad_out.detach().contiguous()
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    grad_s = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    n = w.numel()
    if n == 0:
        return grad_w, grad_s.zero_()
    g_s, g_w = _thresholds(s, w.dtype)
    f64 = w.dtype == torch.float64
    programs = triton.cdiv(n, BLOCK_SIZE)
    partials = torch.empty(programs, dtype=torch.float64 if f64 else torch.float32, device=w.device)
    with _device_guard(w):
        _backward_kernel[(programs,)](grad, w, g_w, grad_w, partials, n, BLOCK=BLOCK_SIZE, STE=ste, F64=f64,
                                      num_warps=_NUM_WARPS)
        _grad_s_finish_kernel[(1,)](partials, g_s, grad_s, programs, BLOCK=_FINISH_BLOCK,
                                    SOFT_BF16=s.dtype == torch.bfloat16 and not s.is_cuda, num_warps=4)
    return grad_w, grad_s
