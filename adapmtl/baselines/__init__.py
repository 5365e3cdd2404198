"""The training methods: AdapMTL and its ablations, the pruning baselines of the paper's comparison (SPEC §7),
and the `Method` interface the trainer drives."""
from adapmtl.baselines.adapmtl_method import AdapMTLMethod
from adapmtl.baselines.base import DenseMethod, Method
from adapmtl.baselines.disparse import DiSparseMethod
from adapmtl.baselines.imp import IMPMethod
from adapmtl.baselines.lth import LTHMethod
from adapmtl.baselines.masks import MaskedMethod, global_topk_masks, prunable_weights
from adapmtl.baselines.snip import SNIPMethod

# config `method` -> the Method it builds from the run Config
METHOD_CLASSES = {
    "adapmtl": lambda cfg: AdapMTLMethod(cfg, "component", True, "adapmtl"),
    "single_threshold": lambda cfg: AdapMTLMethod(cfg, "global", False, "single_threshold"),
    "str": lambda cfg: AdapMTLMethod(cfg, "layer", True, "str"),
    "dense": DenseMethod, "imp": IMPMethod, "lth": LTHMethod, "snip": SNIPMethod, "disparse": DiSparseMethod,
}


def build_method(cfg) -> Method:
    """The Method of `cfg.method`."""
    if cfg.method not in METHOD_CLASSES:
        raise ValueError(f"method must be one of {sorted(METHOD_CLASSES)}, got {cfg.method!r}")
    return METHOD_CLASSES[cfg.method](cfg)


__all__ = ["AdapMTLMethod", "DenseMethod", "DiSparseMethod", "IMPMethod", "LTHMethod", "METHOD_CLASSES",
           "MaskedMethod", "Method", "SNIPMethod", "build_method", "global_topk_masks", "prunable_weights"]
