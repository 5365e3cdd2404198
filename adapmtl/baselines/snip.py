"""SNIP: connection sensitivity |∂L/∂w · w| on `score_batches` batches at initialisation, global
top-k, then train the fixed sparse net (SPEC §7)."""
from __future__ import annotations

from adapmtl.baselines.masks import MaskedMethod, global_topk_masks


class SNIPMethod(MaskedMethod):
    name = "snip"

    def on_train_start(self, trainer):
        batches = trainer.sample_batches(self.cfg.prune.score_batches)
        scores = self.sensitivity_scores(trainer, batches)
        self.set_masks(trainer, global_topk_masks(scores, self.cfg.prune.target_sparsity))
