"""Sparse (CSR) convolution and linear layers in Triton, for inference with a pruned weight.

Weight layout (the same as the C++/CUDA ops): one CSR row per output channel, row_ptr int32 [C_out + 1],
col_idx int32 [nnz] = c * KH * KW + kh * KW + kw (for linear: the input feature), values [nnz] in the
activation's dtype. groups == 1.

sparse_conv2d: one program per (output channel, tile of BLOCK_P output pixels of one image, image). It
walks its row's non-zeros BLOCK_K at a time and gathers x with an implicit im2col (x read in place,
zero padding as a bounds mask, through x's strides so NCHW and channels-last both work without a copy):
a [BLOCK_K, BLOCK_P] tile of products reduced over K per step. Output
channels vary fastest across programs, so programs that read the same x tile run close together and
share it in L2.

With ADAPMTL_GPU_SPARSE_ROWS = 2, 4 or 8 (opt-in, see rows_per_program) a program takes that many
consecutive output channels; where their rows hold the same columns (a weight pruned in blocks of output
channels) one gather of x feeds them all, else each row runs as above. Checked per program from the indices,
so any CSR weight gives the same result either way.

sparse_linear: one program per (output feature, tile of BLOCK_M input rows), the same walk over the row.

Accumulation in float32 (float64 for float64), in a fixed order: deterministic. The index arrays are
trusted to come from the packer (which validates them), but every gather is also masked by the bounds of
the row, of col_idx and of the weight, so a bad index contributes nothing instead of reading out of bounds.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from adapmtl.triton_kernels._common import device_guard as _device_guard

from .soft_threshold import _bf16_rne

__all__ = ["SUPPORTED_DTYPES", "sparse_conv2d", "sparse_linear"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# 128 pixels x 32 non-zeros per step: 4096 gathers in flight per program over 4 warps, while small layers
# (41x41 feature maps, a few hundred channels) still give thousands of programs.
_BLOCK_P = 128
_BLOCK_K = 32
_BLOCK_M = 16
_MAX_GRID_YZ = 65535
_INT32_MAX = 2**31 - 1


@triton.jit
def _store_cast(ptrs, acc, mask, SOFT_BF16: tl.constexpr):
    if SOFT_BF16:
        tl.store(ptrs, _bf16_rne(acc.to(tl.float32)), mask=mask)
    else:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _gather_x(x_img, col, k_ok, ih0, iw0, p_ok, H, W, x_sc, x_sh, x_sw, dh, dw, KH: tl.constexpr,
              KW: tl.constexpr):
    """x at columns col (c * KH * KW + kh * KW + kw) of the tile's pixels: [BLOCK_K, BLOCK_P], an implicit
    im2col (x read in place through its strides, zero padding as the bounds mask)."""
    c = col // (KH * KW)
    rem = col - c * (KH * KW)
    kh = rem // KW
    kw = rem - kh * KW
    ih = ih0[None, :] + (kh * dh)[:, None]
    iw = iw0[None, :] + (kw * dw)[:, None]
    ok = k_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_img + (c * x_sc)[:, None] + ih * x_sh + iw * x_sw, mask=ok, other=0.0)


@triton.jit
def _tile_pixels(tile, H_out, W_out, sh, sw, ph, pw, BLOCK_P: tl.constexpr):
    """The tile's output pixels: which are in range, their (oh, ow), and where each one's window starts in x."""
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < H_out * W_out
    oh = p // W_out
    ow = p - oh * W_out
    return p_ok, oh, ow, oh * sh - ph, ow * sw - pw


@triton.jit
def _conv_channel(x_img, row_ptr, col_ptr, val_ptr, bias_ptr, out_img, o, nnz_total, C_in, H, W, x_sc, x_sh, x_sw,
                  o_sc, o_sh, o_sw, p_ok, oh, ow, ih0, iw0, dh, dw, KH: tl.constexpr, KW: tl.constexpr,
                  HAS_BIAS: tl.constexpr, F64: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Output channel o at the tile's pixels: its row's non-zeros BLOCK_K at a time, + bias, stored."""
    first = tl.load(row_ptr + o)
    last = tl.minimum(tl.load(row_ptr + o + 1), nnz_total)
    cols = C_in * KH * KW
    if F64:
        acc = tl.zeros([BLOCK_P], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(first, last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k >= 0) & (k < last)
        col = tl.load(col_ptr + k, mask=k_ok, other=0)
        k_ok = k_ok & (col >= 0) & (col < cols)
        v = tl.load(val_ptr + k, mask=k_ok, other=0.0).to(acc.dtype)
        xv = _gather_x(x_img, col, k_ok, ih0, iw0, p_ok, H, W, x_sc, x_sh, x_sw, dh, dw, KH, KW).to(acc.dtype)
        acc += tl.sum(v[:, None] * xv, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(acc.dtype)
    out = out_img + o.to(tl.int64) * o_sc + oh.to(tl.int64) * o_sh + ow.to(tl.int64) * o_sw
    _store_cast(out, acc, p_ok, SOFT_BF16)


@triton.jit
def _sparse_conv2d_kernel(x_ptr, row_ptr, col_ptr, val_ptr, bias_ptr, out_ptr, nnz_total, C_in, H, W,
                          x_sn, x_sc, x_sh, x_sw, H_out, W_out, o_sn, o_sc, o_sh, o_sw,
                          sh, sw, ph, pw, dh, dw, KH: tl.constexpr, KW: tl.constexpr,
                          HAS_BIAS: tl.constexpr, F64: tl.constexpr, SOFT_BF16: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0)
    n = tl.program_id(2)
    p_ok, oh, ow, ih0, iw0 = _tile_pixels(tl.program_id(1), H_out, W_out, sh, sw, ph, pw, BLOCK_P)
    x_img = x_ptr + n.to(tl.int64) * x_sn  # offsets inside one image fit in int32 (checked by the launcher)
    _conv_channel(x_img, row_ptr, col_ptr, val_ptr, bias_ptr, out_ptr + n.to(tl.int64) * o_sn, o, nnz_total, C_in,
                  H, W, x_sc, x_sh, x_sw, o_sc, o_sh, o_sw, p_ok, oh, ow, ih0, iw0, dh, dw, KH, KW, HAS_BIAS, F64,
                  SOFT_BF16, BLOCK_P, BLOCK_K)


@triton.jit
def _sparse_conv2d_rows_kernel(x_ptr, row_ptr, col_ptr, val_ptr, bias_ptr, out_ptr, nnz_total, C_in, H, W, C_out,
                               x_sn, x_sc, x_sh, x_sw, H_out, W_out, o_sn, o_sc, o_sh, o_sw,
                               sh, sw, ph, pw, dh, dw, shared_ptr, KH: tl.constexpr, KW: tl.constexpr,
                               HAS_BIAS: tl.constexpr, F64: tl.constexpr, SOFT_BF16: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                               RECORD: tl.constexpr):
    """ROWS consecutive output channels per program. Where their rows hold the same columns (a weight pruned
    in blocks of output channels, by our block thresholds or anyone's), each gather of x feeds all ROWS
    channels; otherwise each row runs as in _sparse_conv2d_kernel. Decided per program from the indices
    (RECORD: which way, into shared_ptr[channel group], for the tests)."""
    o0 = tl.program_id(0) * ROWS
    n = tl.program_id(2)
    p_ok, oh, ow, ih0, iw0 = _tile_pixels(tl.program_id(1), H_out, W_out, sh, sw, ph, pw, BLOCK_P)
    x_img = x_ptr + n.to(tl.int64) * x_sn
    r = tl.arange(0, ROWS)
    o = o0 + r
    o_ok = o < C_out
    first = tl.load(row_ptr + o, mask=o_ok, other=0)
    length = tl.minimum(tl.load(row_ptr + o + 1, mask=o_ok, other=0), nnz_total) - first
    first0 = tl.load(row_ptr + o0)
    len0 = tl.minimum(tl.load(row_ptr + o0 + 1), nnz_total) - first0
    cols = C_in * KH * KW
    # shared: every channel of the program has row o0's length and columns (index loads only)
    diff = tl.sum(tl.where(o_ok & (length != len0), 1, 0))
    for k0 in range(0, len0, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < len0
        at = first[:, None] + k[None, :]  # [ROWS, BLOCK_K]
        at_ok = o_ok[:, None] & k_ok[None, :] & (at >= 0) & (at < nnz_total)
        c_r = tl.load(col_ptr + at, mask=at_ok, other=-1)
        c_0 = tl.load(col_ptr + first0 + k, mask=k_ok & (first0 + k >= 0) & (first0 + k < nnz_total), other=-1)
        diff += tl.sum(tl.sum(tl.where(o_ok[:, None] & k_ok[None, :] & (c_r != c_0[None, :]), 1, 0), axis=1), axis=0)
    if RECORD:
        tl.store(shared_ptr + tl.program_id(0), (diff == 0).to(tl.int32))
    if diff == 0:
        if F64:
            acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float64)
        else:
            acc = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
        for k0 in range(0, len0, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            at0 = first0 + k
            k_ok = (k < len0) & (at0 >= 0) & (at0 < nnz_total)
            col = tl.load(col_ptr + at0, mask=k_ok, other=0)
            k_ok = k_ok & (col >= 0) & (col < cols)
            at = first[:, None] + k[None, :]
            v = tl.load(val_ptr + at, mask=o_ok[:, None] & k_ok[None, :], other=0.0).to(acc.dtype)  # [ROWS, K]
            xv = _gather_x(x_img, col, k_ok, ih0, iw0, p_ok, H, W, x_sc, x_sh, x_sw, dh, dw, KH, KW).to(acc.dtype)
            acc += tl.sum(v[:, :, None] * xv[None, :, :], axis=1)  # one gather, ROWS channels
        if HAS_BIAS:
            acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(acc.dtype)[:, None]
        out = (out_ptr + n.to(tl.int64) * o_sn + o.to(tl.int64)[:, None] * o_sc
               + (oh.to(tl.int64) * o_sh + ow.to(tl.int64) * o_sw)[None, :])
        _store_cast(out, acc, o_ok[:, None] & p_ok[None, :], SOFT_BF16)
    else:
        for i in tl.static_range(ROWS):
            if o0 + i < C_out:
                _conv_channel(x_img, row_ptr, col_ptr, val_ptr, bias_ptr, out_ptr + n.to(tl.int64) * o_sn, o0 + i,
                              nnz_total, C_in, H, W, x_sc, x_sh, x_sw, o_sc, o_sh, o_sw, p_ok, oh, ow, ih0, iw0, dh,
                              dw, KH, KW, HAS_BIAS, F64, SOFT_BF16, BLOCK_P, BLOCK_K)


@triton.jit
def _sparse_linear_kernel(x_ptr, row_ptr, col_ptr, val_ptr, bias_ptr, out_ptr, nnz_total, M, K, O,
                          HAS_BIAS: tl.constexpr, F64: tl.constexpr, SOFT_BF16: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    first = tl.load(row_ptr + o)
    last = tl.minimum(tl.load(row_ptr + o + 1), nnz_total)
    if F64:
        acc = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(first, last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k >= 0) & (k < last)
        col = tl.load(col_ptr + k, mask=k_ok, other=0)
        k_ok = k_ok & (col >= 0) & (col < K)
        v = tl.load(val_ptr + k, mask=k_ok, other=0.0).to(acc.dtype)
        ok = k_ok[:, None] & m_ok[None, :]
        xv = tl.load(x_ptr + m[None, :] * K + col[:, None], mask=ok, other=0.0).to(acc.dtype)
        acc += tl.sum(v[:, None] * xv, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o).to(acc.dtype)
    _store_cast(out_ptr + m * O + o, acc, m_ok, SOFT_BF16)


# ------------------------------------------------------------------------------------------------
# launchers: the custom ops of adapmtl.ops check the arguments (csrc/common.h's checks, as for the C++ ops)
# before calling here; these check only what the kernels themselves cannot address.


def _check_int32_csr(op, cols, nnz):
    if cols > _INT32_MAX or nnz > _INT32_MAX:
        raise ValueError(f"{op}: the weight is too large for int32 CSR indices ({cols} columns, {nnz} non-zeros)")


def _soft_bf16(x):
    # the interpreter's float32 -> bfloat16 conversion truncates; round to nearest even ourselves there
    return x.dtype == torch.bfloat16 and not x.is_cuda


def _bias_only(bias, out, channel_dim):
    """Output of a fully pruned weight: the bias broadcast (or zeros), no launch needed."""
    if bias is None:
        return out.zero_()
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    return out.copy_(bias.detach().reshape(shape).expand_as(out))


def sparse_conv2d(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    record_shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, dilation)` (groups 1, zero padding) with the weight given
    as CSR rows per output channel. Inference only (no autograd).
    record_shared (tests): an int32 tensor of one entry per group of rows_per_program() channels, set to 1
    where that group's gathers were shared (rows_per_program() > 1 only).

    Args:
        x: [N, C_in, H, W], float32/float64/float16/bfloat16, on CUDA (or CPU under TRITON_INTERPRET=1);
            NCHW-contiguous and channels-last inputs are read in place, others copied to NCHW first.
        row_ptr: int32 [C_out + 1]; col_idx: int32 [nnz] = c * KH * KW + kh * KW + kw; values: [nnz], x's dtype.
        bias: [C_out] in x's dtype, or None.
        weight_shape: [C_out, C_in, KH, KW]. stride >= 1, padding >= 0, dilation >= 1: 2 ints each.

    Returns:
        [N, C_out, H_out, W_out] in x's dtype: channels-last if x is channels-last (and not also NCHW
        contiguous), else contiguous NCHW.
    """
    op = "sparse_conv2d"
    C_out, C_in, KH, KW = weight_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    _check_int32_csr(op, C_in * KH * KW, col_idx.numel())
    N, _, H, W = x.shape
    H_out = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    W_out = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    # 32-bit offsets inside one image, 32-bit pixel coordinates, grid limits
    tiles = triton.cdiv(H_out * W_out, _BLOCK_P)
    if (C_in * H * W > _INT32_MAX or H_out * W_out > _INT32_MAX or max(sh, sw, ph, pw, dh, dw) > _INT32_MAX // 4
            or H + ph + dh * KH > _INT32_MAX // 2
            or W + pw + dw * KW > _INT32_MAX // 2 or tiles > _MAX_GRID_YZ):
        raise ValueError(f"{op}: argument 'x' is too large (one image must hold < 2^31 elements and "
                         f"< {_MAX_GRID_YZ * _BLOCK_P} output pixels), got {tuple(x.shape)}")
    # channels-last in, channels-last out (as the C++ kernel and the op layer's fake); anything else NCHW
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty((N, C_out, H_out, W_out), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    if values.numel() == 0:
        return _bias_only(bias, out, 1)
    x = x.detach().contiguous(memory_format=fmt)
    row_ptr, col_idx, values = row_ptr.contiguous(), col_idx.contiguous(), values.detach().contiguous()
    bias_arg = bias.detach().contiguous() if bias is not None else values  # never read without HAS_BIAS
    rows = rows_per_program()
    with _device_guard(x):
        for n0 in range(0, N, _MAX_GRID_YZ):  # grid axis 2 holds at most 65535 images
            nb = min(_MAX_GRID_YZ, N - n0)
            args = (x[n0:n0 + nb], row_ptr, col_idx, values, bias_arg, out[n0:n0 + nb], values.numel(), C_in, H, W)
            geometry = (*x.stride(), H_out, W_out, *out.stride(), sh, sw, ph, pw, dh, dw)
            flags = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, F64=x.dtype == torch.float64,
                         SOFT_BF16=_soft_bf16(x), BLOCK_P=_BLOCK_P, num_warps=4)
            if rows == 1:
                _sparse_conv2d_kernel[(C_out, tiles, nb)](*args, *geometry, BLOCK_K=_BLOCK_K, **flags)
            else:  # the [ROWS, BLOCK_K, BLOCK_P] products stay the size of one row's [BLOCK_K, BLOCK_P]
                _sparse_conv2d_rows_kernel[(triton.cdiv(C_out, rows), tiles, nb)](
                    *args, C_out, *geometry, values if record_shared is None else record_shared, ROWS=rows,
                    BLOCK_K=max(4, _BLOCK_K // rows), RECORD=record_shared is not None, **flags)
    return out


ROWS_ENV = "ADAPMTL_GPU_SPARSE_ROWS"
ROWS_CHOICES = ("1", "2", "4", "8")


def rows_per_program() -> int:
    """Output channels per program of the Triton sparse conv: ADAPMTL_GPU_SPARSE_ROWS, 1 (the default: one
    channel per program) or 2, 4, 8 (_sparse_conv2d_rows_kernel: channels whose rows hold the same columns share
    each gather of x). The CUDA kernel reads the same variable. Opt-in until timed on a GPU: none has run it yet."""
    value = os.environ.get(ROWS_ENV, "1").strip()
    if value not in ROWS_CHOICES:
        raise ValueError(f"{ROWS_ENV} must be one of {', '.join(ROWS_CHOICES)}, got {value!r}")
    return int(value)


def sparse_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the weight [out_features, in_features] given as CSR rows.
    Inference only (no autograd).

    Args:
        x: [..., in_features], float32/float64/float16/bfloat16, on CUDA (or CPU under TRITON_INTERPRET=1).
        row_ptr: int32 [out_features + 1]; col_idx: int32 [nnz] input features; values: [nnz], x's dtype.
        bias: [out_features] in x's dtype, or None.
        in_features: the weight's number of columns.

    Returns:
        [..., out_features], contiguous, x's dtype.
    """
    op = "sparse_linear"
    O = row_ptr.numel() - 1
    if O > _INT32_MAX:
        raise ValueError(f"{op}: too many output features ({O})")
    _check_int32_csr(op, in_features, col_idx.numel())
    out = torch.empty((*x.shape[:-1], O), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if values.numel() == 0:
        return _bias_only(bias, out, out.dim() - 1)
    x = x.detach().contiguous()
    M = x.numel() // in_features
    row_ptr, col_idx, values = row_ptr.contiguous(), col_idx.contiguous(), values.detach().contiguous()
    bias_arg = bias.detach().contiguous() if bias is not None else values
    m_tiles = triton.cdiv(M, _BLOCK_M)
    with _device_guard(x):
        for t0 in range(0, m_tiles, _MAX_GRID_YZ):  # grid axis 1 holds at most 65535 tiles
            tb = min(_MAX_GRID_YZ, m_tiles - t0)
            r0, r1 = t0 * _BLOCK_M, min(M, (t0 + tb) * _BLOCK_M)
            _sparse_linear_kernel[(O, tb)](
                x.view(M, in_features)[r0:r1], row_ptr, col_idx, values, bias_arg, out.view(M, O)[r0:r1],
                values.numel(), r1 - r0, in_features, O, HAS_BIAS=bias is not None, F64=x.dtype == torch.float64,
                SOFT_BF16=_soft_bf16(x), BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, num_warps=4,
            )
    return out
