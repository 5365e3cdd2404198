"""Which backend runs an op of the op layer: one table and one `resolve` for every op family.

Per backend: the device kinds it runs on, the dtypes it implements and whether this installation has it.
Availability is resolved once, at import, into constants, so `resolve` is plain Python on constants and
`torch.compile` traces it without a graph break. TRITON_INTERPRET is read in `triton_interpreted` only,
and only when a Triton backend is asked for on a CPU tensor (Triton itself reads it when the kernels are
first imported, on first use).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from adapmtl import _ext

# Availability in this process. The CUDA extension needs adapmtl._C's op schemas, and the Triton ops check
# their arguments with adapmtl._C's checks (csrc/common.h, the one place for checks of direct torch.ops calls).
HAS_CPP = _ext.cpu_extension() is not None
HAS_CUDA = _ext.cuda_extension() is not None
HAS_TRITON = HAS_CPP and _ext.triton_available()

_ALL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# dtypes each compiled backend implements; the torch backends take every floating dtype.
BACKEND_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "cuda": _ALL_FLOATS,
    "triton": _ALL_FLOATS,
}
# The device kind each compiled backend needs ("triton" also runs on CPU under TRITON_INTERPRET=1).
BACKEND_DEVICE = {"cpp": "cpu", "cuda": "cuda", "triton": "cuda"}
_AVAILABLE = {"torch": True, "torch_csr": True, "cpp": HAS_CPP, "cuda": HAS_CUDA, "triton": HAS_TRITON}
# What backend="auto" tries, in order, per device kind; the reference when none applies.
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}

# Op families: their backends (auto first) and the argument whose device and dtype pick the backend.
SOFT_THRESHOLD_BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
SPARSE_BACKENDS = ("auto", "torch", "torch_csr", "cpp", "cuda", "triton")
OPS = {
    "soft_threshold": (SOFT_THRESHOLD_BACKENDS, "w"),
    "block_soft_threshold": (SOFT_THRESHOLD_BACKENDS, "w"),
    "sparse_conv2d": (SPARSE_BACKENDS, "x"),
    "sparse_linear": (SPARSE_BACKENDS, "x"),
}


def _require_triton():
    _ext.require_cpu_extension()
    _ext.require_triton()


_REQUIRE = {"cpp": _ext.require_cpu_extension, "cuda": _ext.require_cuda_extension, "triton": _require_triton}


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend` (available or not) can run on tensors of `device`."""
    if backend in ("torch", "torch_csr"):
        return True
    if backend == "triton" and device.type == "cpu":
        return triton_interpreted()
    return device.type == BACKEND_DEVICE[backend]


def available(op: str, device: str | torch.device = "cpu") -> list[str]:
    """Backends of `op` that can run on `device` in this installation (the torch ones always can)."""
    device = torch.device(device)
    return [b for b in OPS[op][0][1:] if _AVAILABLE[b] and runs_on(b, device)]


_warned_fallback = set()


def _fallback_warning(op: str) -> None:
    if op not in _warned_fallback:
        _warned_fallback.add(op)
        warnings.warn(f"adapmtl: the C++ CPU extension is not built; {op} uses the slow torch reference",
                      RuntimeWarning, stacklevel=4)


def check_device(op: str, backend: str, arg: str, t: Tensor) -> None:
    """`backend` must be able to run on `t`'s device."""
    if runs_on(backend, t.device):
        return
    if backend == "triton":
        raise ValueError(
            f"{op}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got argument '{arg}' on {t.device}"
        )
    kind = BACKEND_DEVICE[backend]
    raise ValueError(f"{op}: backend {backend!r} needs {kind.upper()} tensors, got argument '{arg}' on {t.device}")


def check_dtype(op: str, backend: str, arg: str, t: Tensor) -> None:
    """`t.dtype` must be one of the dtypes `backend` implements."""
    dtypes = BACKEND_DTYPES[backend]
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{op}: backend {backend!r} supports argument '{arg}' of dtype {names}; got {t.dtype} "
            f"(backend='torch' takes any floating dtype)"
        )


def resolve(op: str, backend: str, t: Tensor) -> str:
    """The concrete backend that `backend` means for `op` on tensor `t` (the argument named in OPS[op]).

    "auto" gives the first of AUTO_ORDER for t's device kind that is available and implements t's dtype,
    else "torch" (with a one-time warning where the C++ extension is missing on CPU). A named backend is
    returned as is or raises: ValueError (unknown name, wrong device), ExtensionNotBuiltError (not built
    here), TypeError (a dtype it does not implement).
    """
    choices, arg = OPS[op]
    if backend not in choices:
        raise ValueError(f"{op}: argument 'backend' must be one of {choices}, got {backend!r}")
    if backend == "auto":
        kind = t.device.type
        for candidate in AUTO_ORDER.get(kind, ()):
            if candidate in choices and _AVAILABLE[candidate] and t.dtype in BACKEND_DTYPES[candidate]:
                return candidate
        if kind == "cpu" and not HAS_CPP:
            _fallback_warning(op)
        return "torch"
    if backend in ("torch", "torch_csr"):
        return backend
    check_device(op, backend, arg, t)
    if not _AVAILABLE[backend]:  # only runs (and raises) when the backend is missing: keeps this traceable
        _REQUIRE[backend]()
    check_dtype(op, backend, arg, t)
    return backend
