"""Modules: soft-threshold (STR) layers, the soft threshold as a parametrization of any weight, their shared
thresholds; packed sparse inference layers."""
from adapmtl.nn.sparse_layers import SPARSE_LAYER_TYPES, SparseConv2d, SparseLinear
from adapmtl.nn.str_layers import STR_LAYER_TYPES, SoftThreshold, STRConv2d, STRLinear, ThresholdGroup

__all__ = ["SPARSE_LAYER_TYPES", "STR_LAYER_TYPES", "STRConv2d", "STRLinear", "SoftThreshold", "SparseConv2d", "SparseLinear",
           "ThresholdGroup"]
