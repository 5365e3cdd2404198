"""The op layer: one entry point per operation, dispatching by device and backend."""
from adapmtl.ops.reference import soft_threshold_reference
from adapmtl.ops.soft_threshold import BACKENDS, GRAD_MODES, available_backends, resolve_backend, soft_threshold

__all__ = [
    "BACKENDS",
    "GRAD_MODES",
    "available_backends",
    "resolve_backend",
    "soft_threshold",
    "soft_threshold_reference",
]
