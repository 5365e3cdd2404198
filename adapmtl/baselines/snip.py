"""SNIP (Lee et al., ICLR 2019): single-shot connection sensitivity at initialisation. On one mini-batch of
`score_batches` batches, s_j = |∂L/∂c_j| = |∂L/∂w_j · w_j| (c the mask, L the training loss -- here the sum of
the task losses, what the baselines train on), normalised by Σ s (which does not change the ranking); the top
(1 - target) of all weights together are kept and the sparse net is trained, the mask fixed (SPEC §7).

The scores are taken on the weights the run starts from: `adapmtl compare` starts SNIP from the seed's random
init (the one its dense start began from) for the dense start's iterations plus the others' budget, as the
paper defines it; given `model.init_from`, it scores those trained weights instead."""
from __future__ import annotations

from adapmtl.baselines.masks import MaskedMethod, global_topk_masks


class SNIPMethod(MaskedMethod):
    name = "snip"

    def on_train_start(self, trainer):
        batches = trainer.sample_batches(self.cfg.prune.score_batches)
        scores = self.sensitivity_scores(trainer, batches)
        self.set_masks(trainer, global_topk_masks(scores, self.cfg.prune.target_sparsity))
