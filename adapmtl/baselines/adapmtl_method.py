"""AdapMTL (component thresholds + adaptive loss weights) and its ablations, as trainer methods."""
from __future__ import annotations

import adapmtl
from adapmtl.baselines.base import Method
from adapmtl.train.distributed import all_reduce_mean


class AdapMTLMethod(Method):
    """Soft-threshold pruning. mode "component" is AdapMTL, "global" the single-threshold ablation
    (which also turns off the adaptive loss weights), "layer" the original STR."""

    prunes = True

    def __init__(self, cfg, mode: str = "component", adaptive_weights: bool = True, name: str = "adapmtl"):
        super().__init__(cfg)
        self.mode, self.adaptive_weights, self.name = mode, adaptive_weights, name

    def setup(self, trainer):
        p = self.cfg.prune
        adapmtl.sparsify(trainer.model, init=p.s0, mode=self.mode, grad=p.grad, backend=p.backend)
        self.thresholds = adapmtl.threshold_parameters(trainer.model)

    def after_backward(self, trainer, it):
        """Target-sparsity cap (SPEC §3): overall sparsity of this step's ŵ over all components,
        from the kernels' non-zero counts, all-reduced so every rank decides the same."""
        overall = all_reduce_mean(adapmtl.live_sparsity(trainer.model).overall)
        capped = bool(overall >= self.cfg.prune.target_sparsity)
        if capped:
            for s in self.thresholds:
                s.grad = None  # Adam skips a parameter without grad: no update, no decay, no moments
        return {"cap": float(capped)}


def build_method(cfg) -> Method:
    from adapmtl.baselines import METHOD_CLASSES

    name = cfg.method
    if name == "adapmtl":
        return AdapMTLMethod(cfg, "component", True, "adapmtl")
    if name == "single_threshold":
        return AdapMTLMethod(cfg, "global", False, "single_threshold")
    if name == "str":
        return AdapMTLMethod(cfg, "layer", True, "str")
    if name not in METHOD_CLASSES:
        raise ValueError(f"method must be one of {sorted(METHOD_CLASSES) + ['adapmtl', 'single_threshold', 'str']}, got {name!r}")
    return METHOD_CLASSES[name](cfg)


