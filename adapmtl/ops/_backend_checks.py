"""Argument checks shared by the op layers' backend resolution (soft_threshold, sparse_conv2d/linear):
one wording for "this backend cannot run on that tensor"."""
from __future__ import annotations

import os

import torch
from torch import Tensor


def triton_interpreted() -> bool:
    """Whether Triton kernels run on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def check_device(op: str, backend: str, arg: str, t: Tensor, kind: str) -> None:
    """`backend` runs on `kind` ("cpu" or "cuda") tensors only."""
    if t.device.type != kind:
        raise ValueError(f"{op}: backend {backend!r} needs {kind.upper()} tensors, got argument '{arg}' on {t.device}")


def check_triton_device(op: str, arg: str, t: Tensor) -> None:
    if not triton_can_run(t.device):
        raise ValueError(
            f"{op}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got argument '{arg}' on {t.device}"
        )


def check_dtype(op: str, backend: str, arg: str, t: Tensor, dtypes) -> None:
    """`t.dtype` must be one of `dtypes`, the dtypes `backend` supports."""
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{op}: backend {backend!r} supports argument '{arg}' of dtype {names}; got {t.dtype} "
            f"(backend='torch' takes any floating dtype)"
        )
