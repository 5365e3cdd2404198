"""Modules: soft-threshold (STR) layers and their shared thresholds."""
from adapmtl.nn.str_layers import STR_LAYER_TYPES, STRConv2d, STRLinear, ThresholdGroup

__all__ = ["STR_LAYER_TYPES", "STRConv2d", "STRLinear", "ThresholdGroup"]
