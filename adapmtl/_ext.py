"""Loading of the compiled extensions.

`adapmtl._C` (C++ CPU kernels, always built) and `adapmtl._C_cuda` (CUDA kernels, built where CUDA
is present) register their operators under `torch.ops.adapmtl` when imported. Importing adapmtl
never fails because an extension is missing; asking for a backend that needs one raises
`ExtensionNotBuiltError` with the reason and the fix.
"""
from __future__ import annotations

import importlib
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
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton():
    if not triton_available():
        raise ExtensionNotBuiltError("backend 'triton' needs the triton package: `pip install triton`")
