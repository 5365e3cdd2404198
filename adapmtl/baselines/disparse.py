"""DiSparse (Sun et al., CVPR 2022), dynamic variant, at a fixed overall sparsity (SPEC §7).

Init: each task's SNIP importance |∂L_t/∂w · w| (normalised per task), a weight's importance is the
max over tasks (so a weight important to any task -- the union -- survives), global top-k.
Every `update_every` iterations until `prune_end`·N: drop the fraction f of survivors with the
smallest magnitude and regrow as many pruned weights with the largest per-task gradient importance
|∂L_t/∂w| (max over tasks, normalised per task), f decaying from `regrow_fraction` by a cosine.
Regrown weights start at 0. The count of survivors never changes, so the sparsity stays on target."""
from __future__ import annotations

import math

import torch

from adapmtl.baselines.masks import MaskedMethod, global_topk_masks, split_like


class DiSparseMethod(MaskedMethod):
    name = "disparse"

    def union(self, per_task: dict) -> list:
        tasks = list(per_task)
        return [torch.stack([per_task[t][i] for t in tasks]).amax(0) for i in range(len(per_task[tasks[0]]))]

    def on_train_start(self, trainer):
        batches = trainer.sample_batches(self.cfg.prune.score_batches)
        scores = self.union(self.sensitivity_scores(trainer, batches, per_task=True))
        self.set_masks(trainer, global_topk_masks(scores, self.cfg.prune.target_sparsity))

    def fraction(self, it: int) -> float:
        end = max(1, int(self.cfg.prune.prune_end * self.cfg.train.iterations))
        return 0.5 * self.cfg.prune.regrow_fraction * (1 + math.cos(math.pi * it / end))

    @torch.no_grad()
    def _swap(self, trainer, grow_scores):
        ws = self.weights(trainer)
        masks = [self.masks[n] for n, _ in ws]
        alive = int(sum(int(m.sum()) for m in masks))
        n_swap = int(self.current_fraction * alive)
        if n_swap == 0:
            return 0
        flat_mag = torch.cat([torch.where(m, w.abs(), torch.full_like(w, float("inf"))).reshape(-1).double()
                              for (_, w), m in zip(ws, masks)])
        drop = torch.sort(flat_mag, stable=True).indices[:n_swap]
        flat_mask = torch.cat([m.reshape(-1) for m in masks]).clone()
        pruned_before = ~flat_mask
        flat_mask[drop] = False
        flat_grow = torch.cat([g.reshape(-1) for g in grow_scores])
        # regrow among weights pruned before this update (a just-dropped weight is not regrown at once)
        flat_grow = torch.where(pruned_before, flat_grow, torch.full_like(flat_grow, -float("inf")))
        grow = torch.sort(flat_grow, descending=True, stable=True).indices[:n_swap]
        flat_mask[grow] = True
        out = split_like(flat_mask, masks)
        self.set_masks(trainer, out)
        for (_, w), m_new, m_old in zip(ws, out, masks):
            w[m_new & ~m_old] = 0.0  # regrown weights start from zero
            state = trainer.optimizer.state.get(w)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][~m_new] = 0.0
        return n_swap

    def before_iteration(self, trainer, it, batch):
        p = self.cfg.prune
        if self.masks is None or it == 0 or it % p.update_every or it > int(p.prune_end * self.cfg.train.iterations):
            return
        self.current_fraction = self.fraction(it)
        with torch.enable_grad():
            grow = self.union(self.sensitivity_scores(trainer, [batch], per_task=True, use_weight=False))
        self._swap(trainer, grow)
