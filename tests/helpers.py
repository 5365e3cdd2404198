"""Shared test helpers: which backends run here, and tolerances per dtype."""
import importlib.util
import os

import pytest
import torch

from adapmtl.ops import available_backends
from adapmtl.ops.soft_threshold import BACKEND_DTYPES

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON_KERNELS = importlib.util.find_spec("triton") is not None and (
    HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
)


def backend_device_pairs():
    """(backend, device) for every compiled backend that can run on this machine, plus the reference."""
    pairs = [(b, "cpu") for b in available_backends("cpu")]
    if HAS_CUDA:
        pairs += [(b, "cuda") for b in available_backends("cuda")]
    return pairs


def compiled_backend_device_pairs():
    return [(b, d) for b, d in backend_device_pairs() if b != "torch"]


def dtypes_of(backend, device):
    if backend == "torch":
        return (torch.float32, torch.float64) + ((torch.float16, torch.bfloat16) if device == "cuda" else ())
    return BACKEND_DTYPES[backend]


def tolerances(dtype):
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


def param_backends(pairs):
    return pytest.mark.parametrize("backend,device", pairs, ids=[f"{b}-{d}" for b, d in pairs])
