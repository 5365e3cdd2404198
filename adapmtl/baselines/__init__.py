"""Pruning baselines of the paper's comparison (SPEC §7) and the method interface of the trainer."""
from adapmtl.baselines.base import DenseMethod, Method
from adapmtl.baselines.disparse import DiSparseMethod
from adapmtl.baselines.imp import IMPMethod
from adapmtl.baselines.lth import LTHMethod
from adapmtl.baselines.masks import MaskedMethod, global_topk_masks, prunable_weights
from adapmtl.baselines.snip import SNIPMethod

METHOD_CLASSES = {"dense": DenseMethod, "imp": IMPMethod, "lth": LTHMethod, "snip": SNIPMethod,
                  "disparse": DiSparseMethod}

from adapmtl.baselines.adapmtl_method import AdapMTLMethod, build_method  # noqa: E402

__all__ = ["AdapMTLMethod", "DenseMethod", "DiSparseMethod", "IMPMethod", "LTHMethod", "METHOD_CLASSES",
           "MaskedMethod", "Method", "SNIPMethod", "build_method", "global_topk_masks", "prunable_weights"]
