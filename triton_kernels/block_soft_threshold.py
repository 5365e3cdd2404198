"""Fused block (group) soft threshold in Triton (adapmtl/ops/block_soft_threshold.py defines it).

w viewed as [OC, R]; block b is rows [b * block, (b + 1) * block) at one column; n = ||w_B||, g = sigmoid(s):
forward:  out_B = w_B * (n <= g ? 0 : 1 - g / n), plus nnz(out);
backward: live blocks: dL/dw_B = (1 - g/n) G_B + g w_B (w_B . G_B) / n^3, dead: 0 (exact) or G_B (ste);
          dL/ds = -g(1 - g) * sum over live blocks of (w_B . G_B) / n.

One program per (block, tile of columns): it loads the block's rows of its columns as one 2-D tile, so a
block's norm is a reduction over the tile's first axis. Partial counts and sums go to one slot per program
and are added in slot order by the element-wise op's finish kernels: no float atomics, reproducible results.
Arithmetic in float32 (float64 for float64 w), rounded once on the store. Runs on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1; the launchers trust their arguments (the custom ops check them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapmtl.triton_kernels._common import device_guard as _device_guard
from adapmtl.triton_kernels.soft_threshold import _bf16_rne, _count_finish_kernel, _grad_s_finish_kernel

__all__ = ["block_soft_threshold_backward", "block_soft_threshold_forward"]

_TILE = 4096  # elements per program: block rows (padded to a power of two) x columns
_FINISH_BLOCK = 1024


def _shape(w: torch.Tensor, block: int):
    oc = w.shape[0] if w.dim() else 1
    cols = w.numel() // oc if oc else 0
    rows_p2 = triton.next_power_of_2(block)
    tile_cols = max(16, _TILE // rows_p2)
    return oc, cols, rows_p2, tile_cols, (triton.cdiv(oc, block), triton.cdiv(cols, tile_cols))


@triton.jit
def _tile(OC, R, BLOCK: tl.constexpr, RP: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    r = tl.arange(0, RP)
    rows = b.to(tl.int64) * BLOCK + r
    cols = t.to(tl.int64) * BC + tl.arange(0, BC)
    mask = ((r < BLOCK) & (rows < OC))[:, None] & (cols < R)[None, :]
    return rows[:, None] * R + cols[None, :], mask


@triton.jit
def _forward_kernel(w_ptr, g_ptr, out_ptr, count_ptr, OC, R, BLOCK: tl.constexpr, RP: tl.constexpr,
                    BC: tl.constexpr, F64: tl.constexpr, SOFT_BF16: tl.constexpr):
    offs, mask = _tile(OC, R, BLOCK, RP, BC)
    if F64:
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        g = tl.load(g_ptr).to(tl.float64)
    else:
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr).to(tl.float32)
    n = tl.sqrt(tl.sum(x * x, axis=0))
    dead = n <= g  # false for NaN: NaN scale, the block stays NaN
    scale = tl.where(dead, 0.0, 1.0 - g / tl.where(dead, 1.0, n))
    o = x * scale[None, :]
    if SOFT_BF16:
        out = _bf16_rne(o)
    else:
        out = o.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    nonzero = (out != 0) & mask
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(count_ptr + slot, tl.sum(tl.sum(nonzero.to(tl.int32), axis=1), axis=0))


@triton.jit
def _backward_kernel(grad_ptr, w_ptr, g_ptr, grad_w_ptr, partial_ptr, OC, R, BLOCK: tl.constexpr,
                     RP: tl.constexpr, BC: tl.constexpr, STE: tl.constexpr, F64: tl.constexpr):
    offs, mask = _tile(OC, R, BLOCK, RP, BC)
    G_raw = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    if F64:
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        g = tl.load(g_ptr).to(tl.float64)
        G = G_raw.to(tl.float64)
    else:
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr).to(tl.float32)
        G = G_raw.to(tl.float32)
    n = tl.sqrt(tl.sum(x * x, axis=0))
    dot = tl.sum(x * G, axis=0)
    live = n > g  # false for NaN and for columns past R (n = 0, g >= 0)
    safe = tl.where(live, n, 1.0)
    scale = tl.where(live, 1.0 - g / safe, 0.0)
    coef = tl.where(live, g * dot / (safe * safe * safe), 0.0)
    if STE:
        tl.store(grad_w_ptr + offs, G_raw, mask=mask)
    else:
        tl.store(grad_w_ptr + offs, (scale[None, :] * G + coef[None, :] * x).to(grad_w_ptr.dtype.element_ty),
                 mask=mask)
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + slot, tl.sum(tl.where(live, dot / safe, 0.0), axis=0))


def block_soft_threshold_forward(w: torch.Tensor, s: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block soft threshold of `w` and its number of non-zeros (NaN counts), in one pass over `w`."""
    w = w.detach().contiguous()
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    oc, cols, rows_p2, tile_cols, grid = _shape(w, block)
    if w.numel() == 0:
        return out, torch.zeros((), dtype=torch.int64, device=w.device)
    g = torch.sigmoid(s.detach().reshape(())).to(w.dtype)  # the reference's op, in w's dtype
    counts = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=w.device)
    nnz = torch.empty((), dtype=torch.int64, device=w.device)
    with _device_guard(w):
        _forward_kernel[grid](w, g, out, counts, oc, cols, BLOCK=block, RP=rows_p2, BC=tile_cols,
                              F64=w.dtype == torch.float64, SOFT_BF16=w.dtype == torch.bfloat16 and not w.is_cuda)
        _count_finish_kernel[(1,)](counts, nnz, counts.numel(), BLOCK=_FINISH_BLOCK, num_warps=4)
    return out, nnz


def block_soft_threshold_backward(grad_out: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: int,
                                  ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dw, dL/ds) of the block soft threshold, in one pass over `grad_out` and `w`."""
    w = w.detach().contiguous()
    grad = grad_out.detach().contiguous()
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    grad_s = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    oc, cols, rows_p2, tile_cols, grid = _shape(w, block)
    if w.numel() == 0:
        return grad_w, grad_s.zero_()
    g_s = torch.sigmoid(s.detach().reshape(()))
    f64 = w.dtype == torch.float64
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float64 if f64 else torch.float32, device=w.device)
    with _device_guard(w):
        _backward_kernel[grid](grad, w, g_s.to(w.dtype), grad_w, partials, oc, cols, BLOCK=block, RP=rows_p2,
                               BC=tile_cols, STE=ste, F64=f64)
        _grad_s_finish_kernel[(1,)](partials, g_s, grad_s, partials.numel(), BLOCK=_FINISH_BLOCK,
                                    SOFT_BF16=s.dtype == torch.bfloat16 and not s.is_cuda, num_warps=4)
    return grad_w, grad_s
