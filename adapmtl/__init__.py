"""adapmtl: AdapMTL adaptive soft-threshold pruning of multitask models, with fused kernels.

Layers: kernels (csrc/, triton_kernels/) -> `adapmtl.ops` (one op layer dispatching by device and
backend) -> `adapmtl.nn` (STR layers) -> model-level API below -> trainer, data, models -> CLI.
"""
__version__ = "0.1.0"

from adapmtl import nn, ops  # noqa: E402  (importing ops loads the compiled extensions)
from adapmtl import data, losses, metrics, models, tasks  # noqa: E402
from adapmtl.export import export_sparse  # noqa: E402
from adapmtl.export_format import load_exported, save_exported  # noqa: E402
from adapmtl.ops import SparseWeight  # noqa: E402
from adapmtl.sparsify import (  # noqa: E402
    LiveSparsity,
    SparsityReport,
    finalize,
    live_sparsity,
    reset_thresholds,
    sparsify,
    sparsity_report,
    str_layers,
    threshold_parameters,
)

__all__ = [
    "LiveSparsity",
    "SparseWeight",
    "SparsityReport",
    "data",
    "export_sparse",
    "load_exported",
    "losses",
    "metrics",
    "models",
    "save_exported",
    "tasks",
    "finalize",
    "live_sparsity",
    "nn",
    "ops",
    "reset_thresholds",
    "sparsify",
    "sparsity_report",
    "str_layers",
    "threshold_parameters",
    "__version__",
]
