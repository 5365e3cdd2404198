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

import importlib.util
import warnings

import torch
from torch import Tensor

from adapmtl import _ext
from adapmtl.ops._backend_checks import check_device, check_dtype, check_triton_device, triton_interpreted
from adapmtl.ops.reference import soft_threshold_reference

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
GRAD_MODES = ("exact", "ste")

# dtypes each compiled backend implements (the torch reference takes every floating dtype).
BACKEND_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}

# Resolved once at import, so that backend selection is plain Python on constants (traceable by dynamo).
_HAS_CPP = _ext.cpu_extension() is not None
_HAS_CUDA_EXT = _ext.cuda_extension() is not None
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on `device` in this installation (the reference always can)."""
    kind = torch.device(device).type
    found = ["torch"]
    if kind == "cpu":
        if _HAS_CPP:
            found.append("cpp")
        if _HAS_TRITON and triton_interpreted():
            found.append("triton")
    elif kind == "cuda":
        if _HAS_CUDA_EXT:
            found.append("cuda")
        if _HAS_TRITON:
            found.append("triton")
    return found


_warned_fallback = set()


def _fallback_warning(key, message):
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, w: Tensor) -> str:
    """The concrete backend `backend` means for tensor `w`; raises if it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"soft_threshold: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
    kind = w.device.type
    if backend == "auto":
        if kind == "cpu" and _HAS_CPP and w.dtype in BACKEND_DTYPES["cpp"]:
            return "cpp"
        if kind == "cuda":
            if _HAS_CUDA_EXT:
                return "cuda"
            if _HAS_TRITON:
                return "triton"
        if kind == "cpu" and not _HAS_CPP:
            _fallback_warning("cpp", "adapmtl: the C++ CPU extension is not built; using the slow torch reference")
        return "torch"
    if backend == "torch":
        return backend
    # The require_* calls only run (and raise) when the extension is missing: keeps this traceable.
    if backend == "cpp":
        if not _HAS_CPP:
            _ext.require_cpu_extension()
        check_device("soft_threshold", backend, "w", w, "cpu")
    elif backend == "cuda":
        if not _HAS_CUDA_EXT:
            _ext.require_cuda_extension()
        check_device("soft_threshold", backend, "w", w, "cuda")
    elif backend == "triton":
        if not _HAS_TRITON:
            _ext.require_triton()
        check_triton_device("soft_threshold", "w", w)
    check_dtype("soft_threshold", backend, "w", w, BACKEND_DTYPES[backend])
    return backend


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


def soft_threshold(w: Tensor, s: Tensor, *, grad: str = "exact", backend: str = "auto", return_nnz: bool = False):
    """Soft-threshold `w` by `sigmoid(s)`: `sign(w) * relu(|w| - sigmoid(s))`.

    Args:
        w: weight tensor of any shape (floating point; any strides).
        s: the threshold parameter, a one-element floating tensor on `w`'s device.
        grad: "exact" (dL/dw = G * 1[|w| > sigmoid(s)]) or "ste" (dL/dw = G); dL/ds is exact in both.
        backend: one of "auto", "torch", "cpp", "cuda", "triton" (module docstring).
        return_nnz: also return the number of non-zeros of the result, an int64 0-d tensor on `w`'s
            device (free in the fused kernels: no extra pass, no host sync).

    Returns:
        `w_hat` (contiguous, `w`'s shape and dtype), or `(w_hat, nnz)` with `return_nnz`.
    """
    _check_args(w, s, grad)
    which = resolve_backend(backend, w)
    ste = grad == "ste"
    if which == "torch":
        out = soft_threshold_reference(w, s, ste=ste)
        return (out, torch.count_nonzero(out.detach())) if return_nnz else out
    if which == "triton":
        out, nnz = torch.ops.adapmtl.soft_threshold_forward_triton(w, s, ste)
    else:
        out, nnz = torch.ops.adapmtl.soft_threshold_forward(w, s, ste)
    return (out, nnz) if return_nnz else out


# ----------------------------------------------------------------------------------------------
# Triton ops (Python custom ops; the kernels are imported on first use so that TRITON_INTERPRET
# set by the caller before then takes effect).


@torch.library.custom_op("adapmtl::soft_threshold_forward_triton", mutates_args=())
def _soft_threshold_forward_triton(w: Tensor, s: Tensor, ste: bool) -> tuple[Tensor, Tensor]:
    from adapmtl.triton_kernels import soft_threshold as kernels

    return kernels.soft_threshold_forward(w, s)


@torch.library.custom_op("adapmtl::soft_threshold_backward_triton", mutates_args=())
def _soft_threshold_backward_triton(grad_out: Tensor, w: Tensor, s: Tensor, ste: bool) -> tuple[Tensor, Tensor]:
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
if _HAS_CPP:
    _register("adapmtl::soft_threshold_forward", "adapmtl::soft_threshold_backward")
