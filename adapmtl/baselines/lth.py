"""LTH: train dense, prune by global magnitude to the target at `prune_start`·N, rewind the
survivors (and every other parameter and buffer) to their values at `rewind_iter`, reset the
optimizer moments, and retrain the sparse net for the rest of the schedule (SPEC §7)."""
from __future__ import annotations

import torch

from adapmtl.baselines.masks import MaskedMethod


class LTHMethod(MaskedMethod):
    name = "lth"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.snapshot = None

    def prune_iteration(self) -> int:
        return max(self.cfg.prune.rewind_iter + 1, int(self.cfg.prune.prune_start * self.cfg.train.iterations))

    def before_iteration(self, trainer, it, batch):
        if it == self.cfg.prune.rewind_iter and self.snapshot is None:
            self.snapshot = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        if it == self.prune_iteration():
            if self.snapshot is None:
                raise RuntimeError("LTH: no rewind snapshot (prune.rewind_iter must be < the pruning iteration)")
            masks = self.magnitude_masks(trainer, self.cfg.prune.target_sparsity)
            trainer.model.load_state_dict(self.snapshot)
            trainer.optimizer.state.clear()  # the winning ticket is retrained from its rewound state
            self.set_masks(trainer, masks)
            self.snapshot = None

    def state_dict(self):
        state = super().state_dict()
        state["snapshot"] = None if self.snapshot is None else {k: v.cpu() for k, v in self.snapshot.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        snap = state.get("snapshot")
        self.snapshot = None if snap is None else {k: torch.as_tensor(v) for k, v in snap.items()}
