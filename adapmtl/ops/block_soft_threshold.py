"""The block (group) soft threshold: AdapMTL's threshold applied to blocks of output channels.

A block B is `block` consecutive output channels (dim 0) of a weight at one position of its other dims
(input channel, kernel tap); the last block holds the OC % block channels left, if any. With g = sigmoid(s):

    w_hat_B = w_B * relu(1 - g / ||w_B||_2)

the proximal step of a group lasso: a block whose norm is at most g is zeroed whole, the others shrink
towards 0 by g along their own direction. For block = 1 it is sign(w) * relu(|w| - g), the element-wise op
(`soft_threshold(..., block=(1, 1))` runs that op itself, bit for bit). Whole blocks of zeros are what the
CPU sparse kernel's channel panels turn into one input load per `block` multiply-adds
(docs/cpu_sparse_kernel.md).

Gradient (exact). Where ||w_B|| = n > g, with u = w_B / n and G_B = dL/dw_hat_B: w_hat_B = w_B - g u, and
d u / d w_B = (I - u u^T) / n, so

    dL/dw_B = G_B - (g / n) (G_B - u u^T G_B) = (1 - g/n) G_B + g w_B (w_B . G_B) / n^3
    dL/dg   = -u^T G_B,   dL/ds = -g'(s) * sum over live blocks of u^T G_B,   g'(s) = g (1 - g);

a block with n <= g is zero in a neighbourhood (for n < g) and passes nothing to w; nor to s. Straight-through
(grad="ste"): dL/dw = G everywhere, dL/ds as above. The tests check both against autograd of the formula
(`adapmtl.ops.reference.block_soft_threshold_reference`) with gradcheck in float64.

Backends: torch (that reference), cpp (fused C++ CPU kernel, float32/64), cuda (fused CUDA kernel, compiled
here but not yet run on a GPU), triton (CUDA, or CPU under TRITON_INTERPRET=1); auto picks the compiled one
for the tensor. Not done: blocks along the input dims (bi > 1).

No threshold scaled with the block size (g * sqrt(block), the same threshold relative to the typical norm of
a block of i.i.d. weights): under the sparsity controller (`prune.control: controlled`, the default) all weights
of a component share one s and one block size, so g * sqrt(block) is the sigmoid of another s (while it stays
below 1, as thresholds on weights do) and the controller moves s to the same masks; only a tensor's last,
partial block would see another threshold, and g'(s) is reparametrised. Under `prune.control: paper` it
would change where the thresholds stop, as `s0` does. Argued, not measured.
"""
from __future__ import annotations

import torch
from torch import Tensor

from adapmtl import _ext
from adapmtl.ops.backends import HAS_CPP, check_device, resolve
from adapmtl.ops.reference import block_soft_threshold_reference

MAX_BLOCK = 4096  # csrc/common.h's kMaxThresholdBlock, which the compiled ops check


def block_of(block) -> int:
    """The output-channel block size of `block`: an int bo, or (bo, bi) with bi = 1; one-line ValueError else."""
    if isinstance(block, bool) or not isinstance(block, (int, tuple, list)):
        raise ValueError(f"argument 'block' must be an int or a (bo, bi) pair, got {block!r}")
    if isinstance(block, (tuple, list)):
        if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
            raise ValueError(f"argument 'block' must be a (bo, bi) pair of ints, got {block!r}")
        if block[1] != 1:
            raise ValueError(f"argument 'block' supports bi = 1 (blocks of output channels) only, got {tuple(block)}")
        block = block[0]
    if not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"argument 'block' must have 1 <= bo <= {MAX_BLOCK}, got {block}")
    return block


def block_soft_threshold(w: Tensor, s: Tensor, block: int, *, ste: bool = False, backend: str = "auto",
                         return_nnz: bool = False):
    """`w_B * relu(1 - sigmoid(s) / ||w_B||)` over blocks of `block` output channels (arguments checked by
    `soft_threshold`, which calls this for block sizes > 1)."""
    which = resolve("block_soft_threshold", backend, w)
    if which == "torch":
        out = block_soft_threshold_reference(w, s, block, ste=ste)
        return (out, torch.count_nonzero(out.detach())) if return_nnz else out
    if which == "triton":
        out, nnz = torch.ops.adapmtl.block_soft_threshold_forward_triton(w, s, block, ste)
    else:
        out, nnz = torch.ops.adapmtl.block_soft_threshold_forward(w, s, block, ste)
    return (out, nnz) if return_nnz else out


# ----------------------------------------------------------------------------------------------
# Triton ops, checked as the C++ ops are (csrc/common.h via adapmtl._C).


def _check_triton_args(op, w, s, block, grad_out=None):
    check_device(op, "triton", "w", w)
    checks = _ext.require_cpu_extension()
    checks.check_soft_threshold_args(op, w, s, grad_out)
    checks.check_threshold_block(op, block)


@torch.library.custom_op("adapmtl::block_soft_threshold_forward_triton", mutates_args=())
def _forward_triton(w: Tensor, s: Tensor, block: int, ste: bool) -> tuple[Tensor, Tensor]:
    _check_triton_args("block_soft_threshold_forward_triton", w, s, block)
    from adapmtl.triton_kernels import block_soft_threshold as kernels

    return kernels.block_soft_threshold_forward(w, s, block)


@torch.library.custom_op("adapmtl::block_soft_threshold_backward_triton", mutates_args=())
def _backward_triton(grad_out: Tensor, w: Tensor, s: Tensor, block: int, ste: bool) -> tuple[Tensor, Tensor]:
    _check_triton_args("block_soft_threshold_backward_triton", w, s, block, grad_out)
    from adapmtl.triton_kernels import block_soft_threshold as kernels

    return kernels.block_soft_threshold_backward(grad_out, w, s, block, ste)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the C++ and Triton ops.


def _forward_fake(w, s, block, ste):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device), torch.empty((), dtype=torch.int64, device=w.device)


def _backward_fake(grad_out, w, s, block, ste):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device), torch.empty(s.shape, dtype=s.dtype, device=s.device)


def _setup_context(ctx, inputs, output):
    w, s, block, ste = inputs
    ctx.save_for_backward(w, s)
    ctx.block, ctx.ste = block, ste


def _register(forward_name, backward_name):
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    backward_op = getattr(torch.ops.adapmtl, backward_name.split("::")[1])

    def backward(ctx, grad_out, _grad_nnz):
        w, s = ctx.saved_tensors
        grad_w, grad_s = backward_op(grad_out, w, s, ctx.block, ctx.ste)
        return grad_w, grad_s, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=_setup_context)


_register("adapmtl::block_soft_threshold_forward_triton", "adapmtl::block_soft_threshold_backward_triton")
if HAS_CPP:
    _register("adapmtl::block_soft_threshold_forward", "adapmtl::block_soft_threshold_backward")
