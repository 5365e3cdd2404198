"""Loading of the compiled extensions.

`adapmtl._C` (C++ CPU kernels, always built) and `adapmtl._C_cuda` (CUDA kernels, built where CUDA
is present) register their operators under `torch.ops.adapmtl` when imported. Importing adapmtl
never fails because an extension is missing; asking for a backend that needs one raises
`ExtensionNotBuiltError` with the reason and the fix.
"""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

_REBUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the adapmtl source tree "
    "(CUDA_HOME must point at nvcc for the CUDA extension)"
)


class ExtensionNotBuiltError(RuntimeError):
    """A backend needs a compiled extension that is not importable."""


@lru_cache(maxsize=None)
def _load(name: str):
    """Import an extension once; return (module, None) or (None, error text)."""
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"


def cpu_extension():
    """The C++ CPU extension module, or None if it is not built."""
    return _load("adapmtl._C")[0]


def cuda_extension():
    """The CUDA extension module, or None if it is not built (it needs the CPU one for the op schemas)."""
    if cpu_extension() is None:
        return None
    return _load("adapmtl._C_cuda")[0]


def require_cpu_extension():
    module, error = _load("adapmtl._C")
    if module is None:
        raise ExtensionNotBuiltError(f"adapmtl's C++ CPU extension (adapmtl._C) is not available ({error}); {_REBUILD_HINT}")
    return module


def require_cuda_extension():
    require_cpu_extension()
    module, error = _load("adapmtl._C_cuda")
    if module is None:
        raise ExtensionNotBuiltError(
            f"adapmtl's CUDA extension (adapmtl._C_cuda) is not available ({error}); {_REBUILD_HINT}"
        )
    return module


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed and adapmtl ships its Triton kernels (found without importing either)."""
    try:
        return (importlib.util.find_spec("triton") is not None
                and importlib.util.find_spec("adapmtl.triton_kernels") is not None)
    except (ImportError, ValueError):
        return False


def require_triton():
    if not triton_available():
        raise ExtensionNotBuiltError(
            "backend 'triton' needs the triton package (`pip install triton`) and adapmtl's Triton kernels "
            f"(adapmtl.triton_kernels); {_REBUILD_HINT}"
        )
