"""Binary masks on prunable weights (conv and linear weights, SPEC §6), enforced on the weights after
every optimizer step and on their gradients after every backward, and global top-k selection."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from adapmtl.baselines.base import Method
from adapmtl.distributed import all_reduce_mean


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(module name, weight) of every Conv2d / Linear of the model, in module order."""
    return [(name, m.weight) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def global_topk_masks(scores: list[Tensor], sparsity: float, eligible: list[Tensor] | None = None) -> list[Tensor]:
    """Keep exactly round((1 - sparsity) * N) entries with the highest score over all tensors together
    (N = total count). `eligible` (bool, optional) excludes entries from being kept."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"global_topk_masks: argument 'sparsity' must be in [0, 1), got {sparsity!r}")
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores])
    if eligible is not None:
        elig = torch.cat([e.reshape(-1) for e in eligible])
        flat = torch.where(elig, flat, torch.full_like(flat, -float("inf")))
    keep = int(round((1.0 - sparsity) * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        # topk is deterministic for ties on CPU; stable sort makes it so everywhere
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        mask[order] = True
    return split_like(mask, scores)


def split_like(flat: Tensor, tensors) -> list[Tensor]:
    """Cut a flat tensor (the concatenation of `tensors`, flattened) back into views shaped like them."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class MaskedMethod(Method):
    """Common machinery of the mask baselines (IMP, LTH, SNIP, DiSparse)."""

    prunes = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.masks: dict[str, Tensor] | None = None

    def weights(self, trainer) -> list[tuple[str, nn.Parameter]]:
        return prunable_weights(trainer.model)

    def set_masks(self, trainer, masks: list[Tensor]) -> None:
        self.masks = {name: m for (name, _), m in zip(self.weights(trainer), masks)}
        self.apply_to_weights(trainer)

    @torch.no_grad()
    def apply_to_weights(self, trainer) -> None:
        if self.masks is None:
            return
        for name, w in self.weights(trainer):
            w.mul_(self.masks[name].to(w.dtype))

    def after_backward(self, trainer, it: int) -> dict:
        if self.masks is not None:
            for name, w in self.weights(trainer):
                if w.grad is not None:
                    w.grad.mul_(self.masks[name].to(w.grad.dtype))
        return {}

    def after_step(self, trainer, it: int) -> None:
        # Adam's moments (and coupled decay) can move a pruned weight off zero: re-impose the mask
        self.apply_to_weights(trainer)

    def magnitude_masks(self, trainer, sparsity: float, within_current: bool = True) -> list[Tensor]:
        ws = self.weights(trainer)
        eligible = [self.masks[n] for n, _ in ws] if (within_current and self.masks is not None) else None
        return global_topk_masks([w.detach().abs() for _, w in ws], sparsity, eligible)

    def sensitivity_scores(self, trainer, batches: list[dict], per_task: bool = False, use_weight: bool = True):
        """|∂L/∂w · w| (SNIP connection sensitivity) summed over `batches`, all-reduced over ranks.
        per_task: a list per task of scores (each normalised to sum 1), else one list for Σ_t L_t."""
        ws = [w for _, w in self.weights(trainer)]
        tasks = trainer.tasks if per_task else [None]
        totals = {t: [torch.zeros_like(w, dtype=torch.float64) for w in ws] for t in tasks}
        model = trainer.model
        was_training = model.training
        model.train()
        for batch in batches:
            losses = trainer.compute_losses(batch, model=model)
            for t in tasks:
                loss = sum(losses.values()) if t is None else losses[t]
                grads = torch.autograd.grad(loss, ws, retain_graph=True, allow_unused=True)
                for acc, g, w in zip(totals[t], grads, ws):
                    if g is not None:
                        acc.add_((g * w).abs() if use_weight else g.abs())
        model.train(was_training)
        out = {}
        for t, acc in totals.items():
            acc = [all_reduce_mean(a) for a in acc]
            if per_task:
                norm = sum(a.sum() for a in acc).clamp_min(1e-30)
                acc = [a / norm for a in acc]
            out[t] = acc
        return out if per_task else out[None]

    def state_dict(self) -> dict:
        return {"masks": None if self.masks is None else {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        masks = state.get("masks")
        self.masks = None if masks is None else dict(masks)

    def move_masks(self, device) -> None:
        if self.masks is not None:
            self.masks = {k: v.to(device) for k, v in self.masks.items()}
