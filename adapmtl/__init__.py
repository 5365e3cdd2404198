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
from adapmtl.sparsity_control import TargetSparsity  # noqa: E402
from adapmtl.sparsify import (  # noqa: E402
    LiveSparsity,
    PrunedWeight,
    SparsityReport,
    finalize,
    live_sparsity,
    pruned_weights,
    reset_thresholds,
    sparsify,
    sparsity_report,
    str_layers,
    threshold_groups,
    threshold_parameters,
)

__all__ = [
    "LiveSparsity",
    "PrunedWeight",
    "SparseWeight",
    "SparsityReport",
    "TargetSparsity",
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
    "pruned_weights",
    "reset_thresholds",
    "sparsify",
    "sparsity_report",
    "str_layers",
    "threshold_groups",
    "threshold_parameters",
    "__version__",
]


def __getattr__(name: str):
    # `adapmtl.train` (and the other upper layers) after a plain `import adapmtl`, loaded on first use: importing
    # them eagerly would load the trainer, data and plotting stack for every user of the ops.
    if name in ("train", "baselines", "cli"):
        import importlib

        return importlib.import_module(f"adapmtl.{name}")
    raise AttributeError(f"module 'adapmtl' has no attribute {name!r}")
