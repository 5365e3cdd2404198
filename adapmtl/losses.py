"""Per-task losses (SPEC §5), computed at the prediction's resolution against labels (and masks)
nearest-downsampled to it:

- segmentation: cross-entropy ignoring 255 (optionally class-weighted: Taskonomy);
- normal: mean of 1 - cos(pred, gt) over valid pixels;
- depth: mean |pred - gt| over valid pixels;
- dense_l1 (keypoints2d, edge_texture): mean |pred - gt| over pixels whose label != 255 (and mask).

A batch with no valid pixel for a task gives a zero loss that is still connected to the graph (so
backward works and the task contributes nothing), never NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapmtl.tasks import TaskSpec, get_task, resolve_tasks


def downsample_nearest(label: Tensor, size) -> Tensor:
    """[B,H,W] or [B,C,H,W] label/mask -> the same at `size`, nearest neighbour, dtype kept."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    dtype, was3 = label.dtype, label.dim() == 3
    x = label.unsqueeze(1) if was3 else label
    x = F.interpolate(x.float(), size=tuple(size), mode="nearest")
    x = x[:, 0] if was3 else x
    return x > 0.5 if dtype == torch.bool else x.to(dtype)


def _spec(spec_or_name) -> TaskSpec:
    if isinstance(spec_or_name, TaskSpec):
        return spec_or_name
    if isinstance(spec_or_name, str):
        return get_task(spec_or_name)
    raise TypeError(f"task_loss: argument 'spec_or_name' must be a TaskSpec or a task name, got {type(spec_or_name).__name__}")


def _check_pred(spec: TaskSpec, pred) -> None:
    if not isinstance(pred, Tensor) or pred.dim() != 4:
        raise ValueError(f"task_loss[{spec.name}]: argument 'pred' must be a [B,C,h,w] tensor, got "
                         f"{tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__}")
    if pred.shape[1] != spec.out_channels:
        raise ValueError(f"task_loss[{spec.name}]: pred has {pred.shape[1]} channels, the task has {spec.out_channels}")


def _zero(pred: Tensor) -> Tensor:
    return pred.sum() * 0.0


def valid_mask(spec: TaskSpec, batch: dict, label: Tensor) -> Tensor:
    """Bool [B,H,W] of the pixels that count for `spec` (label resolution)."""
    if spec.kind == "segmentation":
        return label != spec.ignore_index
    mask = batch.get(spec.mask_key)
    m = torch.ones(label.shape[0], *label.shape[-2:], dtype=torch.bool, device=label.device) if mask is None else mask.bool()
    if spec.kind == "dense_l1":
        m = m & (label[:, 0] != spec.ignore_index)
    return m


def task_loss(spec_or_name, pred: Tensor, batch: dict, class_weights: Tensor | None = None) -> Tensor:
    """The loss of one task (scalar tensor); `batch` holds the label under the task name and the
    optional "<task>_mask". `class_weights` (segmentation only) weights the cross-entropy."""
    spec = _spec(spec_or_name)
    _check_pred(spec, pred)
    if spec.name not in batch:
        raise ValueError(f"task_loss: the batch has no label {spec.name!r} (keys: {sorted(batch)})")
    label = batch[spec.name].to(pred.device)
    size = pred.shape[-2:]
    if spec.kind == "segmentation":
        if label.dim() != 3:
            raise ValueError(f"task_loss[{spec.name}]: labels must be [B,H,W] int, got {tuple(label.shape)}")
        target = downsample_nearest(label.long(), size)
        if not (target != spec.ignore_index).any():
            return _zero(pred)
        w = None if class_weights is None else class_weights.to(device=pred.device, dtype=pred.dtype)
        return F.cross_entropy(pred, target, weight=w, ignore_index=spec.ignore_index)
    if label.dim() != 4 or label.shape[1] != spec.out_channels:
        raise ValueError(f"task_loss[{spec.name}]: labels must be [B,{spec.out_channels},H,W], got {tuple(label.shape)}")
    m = downsample_nearest(valid_mask(spec, batch, label).to(pred.device), size)
    target = downsample_nearest(label, size).to(pred.dtype)
    if not m.any():
        return _zero(pred)
    if spec.kind == "normal":
        cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8)
        return (1.0 - cos)[m].mean()
    return (pred - target).abs()[:, 0][m].mean()


class MultiTaskLoss(nn.Module):
    """{task: loss} for the tasks present in `preds`. `class_weights`: {task: weights} for
    class-weighted segmentation (Taskonomy: the dataset's `class_weights`)."""

    def __init__(self, tasks, class_weights: dict[str, Tensor] | None = None, dataset: str = "nyuv2"):
        super().__init__()
        self.specs = {t.name: t for t in resolve_tasks(tasks, dataset)}
        self.class_weights = dict(class_weights or {})
        for name in self.class_weights:
            if name not in self.specs or self.specs[name].kind != "segmentation":
                raise ValueError(f"MultiTaskLoss: class_weights given for {name!r}, which is not a segmentation task here")

    def forward(self, preds: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        unknown = [t for t in preds if t not in self.specs]
        if unknown:
            raise ValueError(f"MultiTaskLoss: predictions for unknown tasks {unknown}; known {list(self.specs)}")
        return {t: task_loss(self.specs[t], p, batch, self.class_weights.get(t)) for t, p in preds.items()}
