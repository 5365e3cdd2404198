"""The soft-threshold op: `w_hat = sign(w) * relu(|w| - sigmoid(s))`, dispatched by backend.

Backends (all compute the same function and the gradients of SPEC §1):
  torch   pure-PyTorch reference (plain tensor ops, autograd)
  cpp     fused C++ CPU kernel           -> torch.ops.adapmtl.soft_threshold_forward on CPU tensors
  cuda    fused CUDA kernel              -> torch.ops.adapmtl.soft_threshold_forward on CUDA tensors
  triton  fused Triton kernel            -> torch.ops.adapmtl.soft_threshold_forward_triton
  auto    the fastest compiled backend available for the tensor's device and dtype, else torch

The compiled backends are torch.library ops with registered fake kernels and autograd, so a model
using them compiles with `torch.compile(fullgraph=True)` without graph breaks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from adapmtl import _ext
from adapmtl.ops.backends import HAS_CPP, SOFT_THRESHOLD_BACKENDS, available, check_device, resolve
from adapmtl.ops.block_soft_threshold import block_of, block_soft_threshold
from adapmtl.ops.reference import soft_threshold_reference

BACKENDS = SOFT_THRESHOLD_BACKENDS
GRAD_MODES = ("exact", "ste")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends of soft_threshold that can run on `device` in this installation (the reference always can)."""
    return available("soft_threshold", device)


def resolve_backend(backend: str, w: Tensor) -> str:
    """The concrete backend `backend` means for tensor `w`; raises if it cannot run there (backends.resolve)."""
    return resolve("soft_threshold", backend, w)


def _check_args(w, s, grad):
    if not isinstance(w, Tensor):
        raise TypeError(f"soft_threshold: argument 'w' must be a torch.Tensor, got {type(w).__name__}")
    if not isinstance(s, Tensor):
        raise TypeError(f"soft_threshold: argument 's' must be a torch.Tensor, got {type(s).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"soft_threshold: argument 'w' must be a floating-point tensor, got {w.dtype}")
    if not s.is_floating_point():
        raise TypeError(f"soft_threshold: argument 's' must be a floating-point tensor, got {s.dtype}")
    if s.numel() != 1:
        raise ValueError(f"soft_threshold: argument 's' must hold exactly one value, got shape {tuple(s.shape)}")
    if w.device != s.device:
        raise ValueError(f"soft_threshold: arguments 'w' and 's' must be on the same device, got {w.device} and {s.device}")
    if grad not in GRAD_MODES:
        raise ValueError(f"soft_threshold: argument 'grad' must be one of {GRAD_MODES}, got {grad!r}")


def soft_threshold(w: Tensor, s: Tensor, *, grad: str = "exact", backend: str = "auto", return_nnz: bool = False,
                   block=(1, 1)):
    """Soft-threshold `w` by `sigmoid(s)`: `sign(w) * relu(|w| - sigmoid(s))`, or per block of output channels.

    Args:
        w: weight tensor of any shape (floating point; any strides).
        s: the threshold parameter, a one-element floating tensor on `w`'s device.
        grad: "exact" (dL/dw = G * 1[|w| > sigmoid(s)]) or "ste" (dL/dw = G); dL/ds is exact in both.
        backend: one of "auto", "torch", "cpp", "cuda", "triton" (module docstring).
        return_nnz: also return the number of non-zeros of the result, an int64 0-d tensor on `w`'s
            device (free in the fused kernels: no extra pass, no host sync).
        block: (bo, 1) or bo: soft-threshold blocks of bo consecutive output channels (dim 0) by their
            norm, `w_B * relu(1 - sigmoid(s) / ||w_B||)` (adapmtl/ops/block_soft_threshold.py; the same
            backends). (1, 1), the default, is the element-wise op above, bit for bit.

    Returns:
        `w_hat` (contiguous, `w`'s shape and dtype), or `(w_hat, nnz)` with `return_nnz`.
    """
    _check_args(w, s, grad)
    bo = block_of(block)
    ste = grad == "ste"
    if bo > 1:
        return block_soft_threshold(w, s, bo, ste=ste, backend=backend, return_nnz=return_nnz)
    which = resolve("soft_threshold", backend, w)
    if which == "torch":
        out = soft_threshold_reference(w, s, ste=ste)
        return (out, torch.count_nonzero(out.detach())) if return_nnz else out
    if which == "triton":
        out, nnz = torch.ops.adapmtl.soft_threshold_forward_triton(w, s, ste)
    else:
        out, nnz = torch.ops.adapmtl.soft_threshold_forward(w, s, ste)
    return (out, nnz) if return_nnz else out


# ----------------------------------------------------------------------------------------------
# Triton ops (Python custom ops). Direct torch.ops calls are checked as the C++ ops are (csrc/common.h via
# adapmtl._C); the kernels are imported on first use, so TRITON_INTERPRET set before then takes effect.


def _check_triton_args(op, w, s, grad_out=None):
    check_device(op, "triton", "w", w)
    _ext.require_cpu_extension().check_soft_threshold_args(op, w, s, grad_out)


@torch.library.custom_op("adapmtl::soft_threshold_forward_triton", mutates_args=())
def _soft_threshold_forward_triton(w: Tensor, s: Tensor, ste: bool) -> tuple[Tensor, Tensor]:
    _check_triton_args("soft_threshold_forward_triton", w, s)
    from adapmtl.triton_kernels import soft_threshold as kernels

    return kernels.soft_threshold_forward(w, s)


@torch.library.custom_op("adapmtl::soft_threshold_backward_triton", mutates_args=())
def _soft_threshold_backward_triton(grad_out: Tensor, w: Tensor, s: Tensor, ste: bool) -> tuple[Tensor, Tensor]:
    _check_triton_args("soft_threshold_backward_triton", w, s, grad_out)
    from adapmtl.triton_kernels import soft_threshold as kernels

    return kernels.soft_threshold_backward(grad_out, w, s, ste)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the C++/CUDA ops and the Triton ops.


def _forward_fake(w, s, ste):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device), torch.empty((), dtype=torch.int64, device=w.device)


def _backward_fake(grad_out, w, s, ste):
    return torch.empty(w.shape, dtype=w.dtype, device=w.device), torch.empty(s.shape, dtype=s.dtype, device=s.device)


def _setup_context(ctx, inputs, output):
    w, s, ste = inputs
    ctx.save_for_backward(w, s)
    ctx.ste = ste


def _autograd_backward(backward_op):
    def backward(ctx, grad_out, _grad_nnz):
        w, s = ctx.saved_tensors
        grad_w, grad_s = backward_op(grad_out, w, s, ctx.ste)
        return grad_w, grad_s, None

    return backward


def _register(forward_name, backward_name):
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    backward_op = getattr(torch.ops.adapmtl, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, _autograd_backward(backward_op), setup_context=_setup_context)


_register("adapmtl::soft_threshold_forward_triton", "adapmtl::soft_threshold_backward_triton")
if HAS_CPP:
    _register("adapmtl::soft_threshold_forward", "adapmtl::soft_threshold_backward")
