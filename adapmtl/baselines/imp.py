"""IMP: iterative global magnitude pruning with fine-tuning between rounds (SPEC §7).

Dense training until `prune_start`·N, then `rounds` pruning rounds evenly spaced up to
`prune_end`·N; round r (1-based) keeps (1 - target)^(r / rounds) of the weights, chosen by global
magnitude among the survivors; training (fine-tuning) continues between and after the rounds."""
from __future__ import annotations

from adapmtl.baselines.masks import MaskedMethod


def round_schedule(iterations: int, start: float, end: float, rounds: int, target: float) -> dict[int, float]:
    """iteration -> sparsity to reach at that iteration."""
    first, last = int(start * iterations), int(end * iterations)
    out = {}
    for r in range(rounds):
        it = first if rounds == 1 else first + round(r * (last - first) / (rounds - 1))
        out[min(it, iterations - 1)] = 1.0 - (1.0 - target) ** ((r + 1) / rounds)
    return out


class IMPMethod(MaskedMethod):
    name = "imp"

    def before_iteration(self, trainer, it, batch):
        p = self.cfg.prune
        sched = round_schedule(self.cfg.train.iterations, p.prune_start, p.prune_end, p.rounds, p.target_sparsity)
        if it in sched:
            self.set_masks(trainer, self.magnitude_masks(trainer, sched[it]))
