"""LTH: iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR 2019), rewinding to an early iteration
rather than to the init (Frankle et al., ICML 2020; Renda et al., ICLR 2020), within the run's one budget.

`prune.rounds` R rounds at the iterations t_1 < ... < t_R evenly spaced in (prune_start·N, prune_end·N]. At round
r the survivors with the smallest magnitude are pruned (global; (1 - target)^(r/R) of the weights remain), then
every parameter and buffer is rewound to its value at `prune.rewind_iter` (the survivors keep their rewound
values, the pruned ones are zero), Adam restarts and the LR schedule is replayed from its start, compressed into
the iterations up to the next round (or the end of the run) -- each round retrains the sparse net under the whole
schedule, as LTH's retraining does. Before t_1 the dense net trains under the schedule compressed into t_1."""
from __future__ import annotations

import torch

from adapmtl.baselines.masks import MaskedMethod


def rounds_schedule(iterations: int, start: float, end: float, rounds: int) -> list[int]:
    """The iterations t_1 < ... < t_R of LTH's pruning rounds (each >= 1, at most iterations - 1)."""
    first, last = start * iterations, end * iterations
    its = [min(iterations - 1, max(1, int(round(first + r * (last - first) / rounds)))) for r in range(1, rounds + 1)]
    if len(set(its)) != len(its):
        raise ValueError(f"LTH: {rounds} rounds in ({first:g}, {last:g}] of {iterations} iterations fall on the same "
                         f"iteration ({its}); lower prune.rounds or widen prune.prune_start/prune_end")
    return its


class LTHMethod(MaskedMethod):
    name = "lth"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.snapshot = None

    def rounds(self) -> list[int]:
        p = self.cfg.prune
        its = rounds_schedule(self.cfg.train.iterations, p.prune_start, p.prune_end, p.rounds)
        if p.rewind_iter >= its[0]:
            raise ValueError(f"LTH: prune.rewind_iter={p.rewind_iter} must come before the first round (iteration "
                             f"{its[0]})")
        return its

    def segment_length(self, it: int) -> int:
        """Iterations from `it` (0 or a round) to the next round or the end: the compressed schedule's length."""
        later = [t for t in self.rounds() if t > it] + [self.cfg.train.iterations]
        return later[0] - it

    def on_train_start(self, trainer):
        trainer.restart_optimization(self.segment_length(0))

    def before_iteration(self, trainer, it, batch):
        if it == self.cfg.prune.rewind_iter and self.snapshot is None:
            self.snapshot = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        rounds = self.rounds()
        if it not in rounds:
            return
        if self.snapshot is None:
            raise RuntimeError("LTH: no rewind snapshot (prune.rewind_iter must come before the first round)")
        r = rounds.index(it) + 1
        masks = self.magnitude_masks(trainer, 1.0 - (1.0 - self.cfg.prune.target_sparsity) ** (r / len(rounds)))
        trainer.model.load_state_dict(self.snapshot)
        self.set_masks(trainer, masks)
        trainer.restart_optimization(self.segment_length(it))
        if r == len(rounds):
            self.snapshot = None  # no rewind left

    def state_dict(self):
        state = super().state_dict()
        state["snapshot"] = None if self.snapshot is None else {k: v.cpu() for k, v in self.snapshot.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        snap = state.get("snapshot")
        self.snapshot = None if snap is None else {k: torch.as_tensor(v) for k, v in snap.items()}
