"""The op layer: one entry point per operation, dispatching by device and backend."""
from adapmtl.ops.reference import soft_threshold_reference
from adapmtl.ops.soft_threshold import BACKENDS, GRAD_MODES, available_backends, resolve_backend, soft_threshold
from adapmtl.ops.sparse_conv import (
    SPARSE_BACKENDS,
    available_sparse_backends,
    clear_cpu_sparse_plan_cache,
    cpu_autotune_info,
    cpu_sparse_plan_cache_info,
    resolve_sparse_backend,
    set_cpu_autotune,
    sparse_conv2d,
    sparse_linear,
)
from adapmtl.ops.sparse_weight import SparseWeight

__all__ = [
    "BACKENDS",
    "GRAD_MODES",
    "SPARSE_BACKENDS",
    "SparseWeight",
    "available_backends",
    "available_sparse_backends",
    "clear_cpu_sparse_plan_cache",
    "cpu_autotune_info",
    "cpu_sparse_plan_cache_info",
    "resolve_backend",
    "resolve_sparse_backend",
    "set_cpu_autotune",
    "soft_threshold",
    "soft_threshold_reference",
    "sparse_conv2d",
    "sparse_linear",
]
