"""AdapMTL (component thresholds + adaptive loss weights) and its ablations, as trainer methods."""
from __future__ import annotations

import torch

import adapmtl
from adapmtl.baselines.base import Method
from adapmtl.baselines.sparsity_control import SparsityController
from adapmtl.distributed import all_reduce_mean


class AdapMTLMethod(Method):
    """Soft-threshold pruning. mode "component" is AdapMTL, "global" the single-threshold ablation
    (which also turns off the adaptive loss weights), "layer" per-layer thresholds as in STR (with the
    adaptive weights: it ablates only the threshold granularity). `loss_weights.adaptive` overrides.

    `prune.control` decides how the thresholds reach `prune.target_sparsity`: "paper" (SPEC §3: the
    coupled weight decay pushes them up, the cap stops them once the sparsity reaches the target) or
    "controlled" (a `SparsityController` makes the overall sparsity follow a ramp to the target; the
    thresholds get no weight decay, their own gradients still decide the split between components)."""

    prunes = True

    def __init__(self, cfg, mode: str = "component", adaptive_weights: bool = True, name: str = "adapmtl"):
        super().__init__(cfg)
        self.mode, self.adaptive_weights, self.name = mode, adaptive_weights, name
        self.controller = None
        self.last_control = None

    def prepare_model(self, model):
        p = self.cfg.prune
        adapmtl.sparsify(model, init=p.s0, mode=self.mode, grad=p.grad, backend=p.backend)
        self.thresholds = adapmtl.threshold_parameters(model)

    def setup(self, model):
        self.prepare_model(model)
        p = self.cfg.prune
        if p.control == "controlled":
            # the share of the prunable weights each threshold acts on: weights of the mean threshold
            pruned = {id(s): 0 for s in self.thresholds}
            for _, layer in adapmtl.str_layers(model):
                pruned[id(layer.s)] += layer.weight.numel()
            total = sum(pruned.values())
            self.threshold_shares = torch.tensor([pruned[id(s)] / total for s in self.thresholds], dtype=torch.float64)
            self.controller = SparsityController(p.target_sparsity, self.cfg.train.iterations, p.ramp_start,
                                                 p.ramp_end, p.control_gain)

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
        overall = adapmtl.live_sparsity(trainer.model).overall
        if self.controller is None:  # SPEC §3 cap
            freeze = float(all_reduce_mean(overall)) >= self.cfg.prune.target_sparsity
        else:
            if self.threshold_shares.device != overall.device:  # once: the model moves after setup()
                self.threshold_shares = self.threshold_shares.to(overall.device)
            mean_s = (torch.stack([s.detach() for s in self.thresholds]).double() * self.threshold_shares).sum()
            overall, mean_s = all_reduce_mean(torch.stack([overall, mean_s])).tolist()
            self.last_control = self.controller.step(it, overall, mean_s)
            freeze = self.last_control.freeze
        if freeze:
            for s in self.thresholds:
                s.grad = None  # Adam skips a parameter without grad: no update, no decay, no moments
        return {"cap": float(freeze)}

    @torch.no_grad()
    def after_step(self, trainer, it):
        if self.last_control is not None and self.last_control.push != 0.0:
            for s in self.thresholds:
                s.add_(self.last_control.push)

    def log_scalars(self) -> dict:
        c = self.last_control
        if c is None:
            return {}
        out = {"control/error": c.error, "control/push": c.push, "control/shift": self.controller.shift,
               "control/plant_gain": self.controller.plant_gain, "control/integral": self.controller.integral,
               "control/ramp": float(c.phase == "ramp"), "control/hold": float(c.phase == "hold")}
        if c.schedule is not None:
            out["control/schedule"] = c.schedule
        return out

    def state_dict(self) -> dict:
        return {} if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        written = "controlled" if "controller" in state else "paper"
        if written != self.cfg.prune.control:
            raise ValueError(f"resume: the checkpoint was written with prune.control={written} (sparsity controller "
                             f"state), this run has prune.control={self.cfg.prune.control}")
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
