"""AdapMTL (component thresholds + adaptive loss weights) and its ablations, as trainer methods."""
from __future__ import annotations

import adapmtl
from adapmtl.baselines.base import Method
from adapmtl.distributed import all_reduce_mean
from adapmtl.sparsity_control import TargetSparsity


class AdapMTLMethod(Method):
    """Soft-threshold pruning. mode "component" is AdapMTL, "global" the single-threshold ablation
    (which also turns off the adaptive loss weights), "layer" per-layer thresholds as in STR (with the
    adaptive weights: it ablates only the threshold granularity). `loss_weights.adaptive` overrides.

    `prune.control` decides how the thresholds reach `prune.target_sparsity`: "paper" (SPEC §3: the
    coupled weight decay pushes them up, the cap stops them once the sparsity reaches the target) or
    "controlled" (`adapmtl.TargetSparsity` makes the overall sparsity follow a ramp to the target; the
    thresholds get no weight decay, their own gradients still decide the split between components)."""

    prunes = True

    def __init__(self, cfg, mode: str = "component", adaptive_weights: bool = True, name: str = "adapmtl"):
        super().__init__(cfg)
        self.mode, self.adaptive_weights, self.name = mode, adaptive_weights, name
        self.controller = None

    def prepare_model(self, model):
        p = self.cfg.prune
        adapmtl.sparsify(model, init=p.s0, mode=self.mode, grad=p.grad, backend=p.backend, block=p.block)
        self.thresholds = adapmtl.threshold_parameters(model)

    def setup(self, model):
        self.prepare_model(model)
        p = self.cfg.prune
        if p.control == "controlled":  # the public controller; the trainer calls it around its optimizer step
            self.controller = TargetSparsity(model, target=p.target_sparsity, total_steps=self.cfg.train.iterations,
                                             ramp_start=p.ramp_start, ramp_end=p.ramp_end, gain=p.control_gain,
                                             hook=False)

    def param_groups(self, model):
        """The thresholds in a group of their own: in controlled mode without weight decay (the decay's
        upward push on s is the paper's indirect sparsity knob; the controller replaces it)."""
        ids = {id(s) for s in self.thresholds}
        decay = self.cfg.optim.weight_decay if self.controller is None else 0.0
        return [{"params": [q for q in model.parameters() if id(q) not in ids]},
                {"params": self.thresholds, "weight_decay": decay}]

    def after_backward(self, trainer, it):
        """Overall sparsity of this step's ŵ over all components, from the kernels' non-zero counts,
        all-reduced so every rank decides the same; reading it is the step's one host sync."""
        if self.controller is not None:
            return {"cap": float(self.controller.before_optimizer_step(it).freeze)}
        overall = adapmtl.live_sparsity(trainer.model).overall  # SPEC §3 cap
        freeze = float(all_reduce_mean(overall)) >= self.cfg.prune.target_sparsity
        if freeze:
            for s in self.thresholds:
                s.grad = None  # Adam skips a parameter without grad: no update, no decay, no moments
        return {"cap": float(freeze)}

    def after_step(self, trainer, it):
        if self.controller is not None:
            self.controller.after_optimizer_step()

    def log_scalars(self) -> dict:
        c = None if self.controller is None else self.controller.last
        if c is None:
            return {}
        ctl = self.controller.controller
        out = {"control/error": c.error, "control/push": c.push, "control/shift": ctl.shift,
               "control/plant_gain": ctl.plant_gain, "control/integral": ctl.integral,
               "control/ramp": float(c.phase == "ramp"), "control/hold": float(c.phase == "hold")}
        if c.schedule is not None:
            out["control/schedule"] = c.schedule
        return out

    def state_dict(self) -> dict:
        return {} if self.controller is None else {"controller": self.controller.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        written = "controlled" if "controller" in state else "paper"
        if written != self.cfg.prune.control:
            raise ValueError(f"resume: the checkpoint was written with prune.control={written} (sparsity controller "
                             f"state), this run has prune.control={self.cfg.prune.control}")
        if self.controller is not None:  # the step count is the trainer's iteration, passed every step
            self.controller.controller.load_state_dict(state["controller"])
