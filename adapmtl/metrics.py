"""Evaluation metrics accumulated over a whole split (SPEC §6), and ΔT.

Predictions are upsampled (nearest) to the label size. Everything is pooled over the split:
a confusion matrix for segmentation, per-pixel angles for normals, per-pixel errors and ratios for
depth -- not averaged per batch. Percent metrics are in percent, as the paper's tables.

Segmentation (gt < C; 255 ignored):
- "mIoU": mean IoU over the classes with TP > 0 -- the authors' evaluation code, and the variant
  the paper's tables (and SPEC §6's table) use;
- "mIoU_all": mean IoU over every class present in the ground truth or the predictions (a class
  absent from both has an undefined 0/0 IoU and is left out; a class present but never predicted
  right counts as 0);
- "pixel_acc"; "ce_err" (class-weighted cross-entropy, when class weights are given: Taskonomy).
Normals (valid pixels): "angle_mean", "angle_median" (exact, as numpy's median over all angles of
  the split, while there are at most 2^26 of them -- the NYUv2 test set at 321x321 has ~6.7e7 -- and
  past that from a 0.005-degree histogram, exact to that resolution in constant memory), "within_11.25", "within_22.5", "within_30", "cosine" (mean
  cosine similarity, Taskonomy's metric).
Depth (valid: mask and gt > 3e-5): "abs_err", "rel_err" (|p - g| / g), "delta_1.25",
  "delta_1.25^2", "delta_1.25^3" (% of pixels with max(p/g, g/p) below the threshold; p is clamped
  to 1e-9 before the ratio); "si_log": the scale-invariant log error of Eigen et al. (2014, lambda = 1),
  100 * the standard deviation of log p - log g over an image's valid pixels, averaged over the images
  (the one metric taken per image: it removes each image's global depth scale; not in ΔT).
Dense L1 (keypoints2d, edge_texture; label != 255): "l1_err".

NaN predictions are never dropped silently: every task reports "nan_fraction" (share of its valid
pixels whose prediction is NaN); such pixels count as wrong in every percentage (pixel_acc, IoU
denominators, within_*, delta_*) and are left out of the averaged errors (angle mean/median,
abs/rel/l1 err, cosine, ce_err) which would otherwise all be NaN. A split with no valid pixel for a
task gives NaN metrics for it (and "num_pixels" 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adapmtl.losses import downsample_nearest, valid_mask
from adapmtl.tasks import TaskSpec, resolve_tasks

DEPTH_MIN_VALID = 3e-5
_HIST_BIN = 0.005  # degrees
EXACT_MEDIAN_LIMIT = 1 << 26  # angles kept (float32, 256 MiB) for the exact median; beyond: histogram
_HIST_BINS = int(round(180.0 / _HIST_BIN))

# lower is better? (p_j = 1 in SPEC §6's ΔT formula)
METRIC_DIRECTIONS: dict[str, bool] = {
    "mIoU": False, "mIoU_all": False, "pixel_acc": False, "ce_err": True,
    "angle_mean": True, "angle_median": True, "within_11.25": False, "within_22.5": False, "within_30": False,
    "cosine": False,
    "abs_err": True, "rel_err": True, "si_log": True, "delta_1.25": False, "delta_1.25^2": False, "delta_1.25^3": False,
    "l1_err": True, "nan_fraction": True,
}

# the metrics each paper table reports per task (and so the ones ΔT sums)
PAPER_METRICS = {
    "nyuv2": {
        "segment_semantic": ("mIoU", "pixel_acc"),
        "normal": ("angle_mean", "angle_median", "within_11.25", "within_22.5", "within_30"),
        "depth": ("abs_err", "rel_err", "delta_1.25", "delta_1.25^2", "delta_1.25^3"),
    },
    "taskonomy": {
        "segment_semantic": ("ce_err",),
        "normal": ("cosine",),
        "depth_zbuffer": ("abs_err", "rel_err"),
        "keypoints2d": ("l1_err",),
        "edge_texture": ("l1_err",),
    },
}


def _upsample(pred: Tensor, size) -> Tensor:
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred.float(), size=tuple(size), mode="nearest")


def _nan() -> float:
    return float("nan")


class SegmentationMeter:
    def __init__(self, spec: TaskSpec, class_weights: Tensor | None = None):
        self.spec, self.C = spec, spec.num_classes
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float64)
        if self.class_weights is not None and self.class_weights.shape != (self.C,):
            raise ValueError(f"metrics[{spec.name}]: class_weights must have {self.C} entries, got {tuple(self.class_weights.shape)}")
        self.reset()

    def reset(self):
        # column C collects pixels whose prediction is NaN: they are in the class's gt count, never TP
        self.conf = torch.zeros(self.C, self.C + 1, dtype=torch.float64)
        self.ce_sum = 0.0
        self.w_sum = 0.0

    def update(self, logits: Tensor, label: Tensor, batch: dict | None = None):
        C = self.C
        size = label.shape[-2:]
        logits = logits.detach()
        nan = torch.isnan(logits).any(1)
        pred = logits.argmax(1)
        pred = downsample_nearest(pred, size).cpu()
        nan = downsample_nearest(nan, size).cpu()
        gt = label.cpu().long()
        valid = gt < C
        pred = torch.where(nan, torch.full_like(pred, C), pred)
        idx = gt[valid] * (C + 1) + pred[valid]
        self.conf += torch.bincount(idx, minlength=C * (C + 1)).view(C, C + 1).double()
        if self.class_weights is not None:
            good = valid & ~nan
            if good.any():
                up = _upsample(logits, size).cpu().double()
                ce = F.cross_entropy(up, torch.where(good, gt, 0), reduction="none")
                w = self.class_weights[torch.where(good, gt, 0)]
                self.ce_sum += float((ce * w)[good].sum())
                self.w_sum += float(w[good].sum())

    def compute(self) -> dict[str, float]:
        conf = self.conf
        total = float(conf.sum())
        tp = conf[:, : self.C].diagonal()
        gt_c = conf.sum(1)
        pred_c = conf[:, : self.C].sum(0)
        union = gt_c + pred_c - tp
        iou = tp / union.clamp_min(1)
        out = {
            "mIoU": float(iou[tp > 0].mean()) * 100 if (tp > 0).any() else (0.0 if total > 0 else _nan()),
            "mIoU_all": float(iou[union > 0].mean()) * 100 if (union > 0).any() else _nan(),
            "pixel_acc": float(tp.sum()) / total * 100 if total > 0 else _nan(),
        }
        if self.class_weights is not None:
            out["ce_err"] = self.ce_sum / self.w_sum if self.w_sum > 0 else _nan()
        out["nan_fraction"] = float(conf[:, self.C].sum()) / total if total > 0 else 0.0
        out["num_pixels"] = total
        return out


class _PixelMeter:
    """What the per-pixel meters share: the counts of valid and NaN pixels, and the coverage they report."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        self.reset()

    def reset(self):
        self.total = 0
        self.nan = 0

    def _count(self, valid: Tensor, values: Tensor) -> Tensor:
        """Counts the valid pixels and those among them whose value is NaN; returns the valid, non-NaN ones."""
        nan = torch.isnan(values) & valid
        self.total += int(valid.sum())
        self.nan += int(nan.sum())
        return valid & ~nan

    def _coverage(self) -> dict[str, float]:
        return {"nan_fraction": self.nan / self.total if self.total else 0.0, "num_pixels": float(self.total)}


class NormalMeter(_PixelMeter):
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, spec: TaskSpec, exact_median_limit: int = EXACT_MEDIAN_LIMIT):
        self.exact_median_limit = exact_median_limit
        super().__init__(spec)

    def reset(self):
        super().reset()
        self.angle_sum = 0.0
        self.cos_sum = 0.0
        self.within = [0, 0, 0]
        self.angles: list[Tensor] = []  # kept for the exact median until there are too many
        self.n_kept = 0
        self.hist: Tensor | None = None

    def _to_hist(self, a: Tensor) -> Tensor:
        bins = (a.double() / _HIST_BIN).long().clamp_(0, _HIST_BINS - 1)
        return torch.bincount(bins, minlength=_HIST_BINS).double()

    def update(self, pred: Tensor, label: Tensor, batch: dict):
        size = label.shape[-2:]
        pred = _upsample(pred.detach(), size).cpu().double()
        gt = label.cpu().double()
        gnorm = gt.norm(dim=1)
        valid = valid_mask(self.spec, batch, label).cpu() & (gnorm > 1e-12)
        cos = (pred * gt).sum(1) / (pred.norm(dim=1).clamp_min(1e-12) * gnorm.clamp_min(1e-12))
        cos = cos.clamp(-1.0, 1.0)  # clamp keeps NaN
        angle = torch.rad2deg(torch.acos(cos))
        good = self._count(valid, angle)
        a = angle[good]
        self.angle_sum += float(a.sum())
        self.cos_sum += float(cos[good].sum())
        for i, t in enumerate(self.THRESHOLDS):
            self.within[i] += int((a < t).sum())
        if self.hist is None:
            self.angles.append(a.float())
            self.n_kept += a.numel()
            if self.n_kept > self.exact_median_limit:  # switch to the constant-memory histogram
                self.hist = self._to_hist(torch.cat(self.angles))
                self.angles, self.n_kept = [], 0
        else:
            self.hist += self._to_hist(a)

    def _median(self, n: int) -> float:
        if self.hist is None:  # exact: numpy's median (mean of the two middle values)
            s = torch.cat(self.angles).double().sort().values
            return float((s[(n - 1) // 2] + s[n // 2]) / 2)
        cum = torch.cumsum(self.hist, 0)
        vals = []
        for r in ((n - 1) // 2, n // 2):
            k = int(torch.searchsorted(cum, torch.tensor(r + 1, dtype=torch.float64)))
            vals.append((k + 0.5) * _HIST_BIN)
        return sum(vals) / 2

    def compute(self) -> dict[str, float]:
        n = self.total - self.nan
        out = {
            "angle_mean": self.angle_sum / n if n else _nan(),
            "angle_median": self._median(n) if n else _nan(),
        }
        for t, c in zip(self.THRESHOLDS, self.within):
            out[f"within_{t:g}"] = c / self.total * 100 if self.total else _nan()
        out["cosine"] = self.cos_sum / n if n else _nan()
        out.update(self._coverage())
        return out


class DepthMeter(_PixelMeter):
    THRESHOLDS = (("delta_1.25", 1.25), ("delta_1.25^2", 1.25 ** 2), ("delta_1.25^3", 1.25 ** 3))

    def reset(self):
        super().reset()
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.delta = [0, 0, 0]
        self.si_sum = 0.0
        self.si_images = 0

    def update(self, pred: Tensor, label: Tensor, batch: dict):
        size = label.shape[-2:]
        p = _upsample(pred.detach(), size).cpu().double()[:, 0]
        g = label.cpu().double()[:, 0]
        valid = valid_mask(self.spec, batch, label).cpu() & (g > DEPTH_MIN_VALID)
        good = self._count(valid, p)
        log_ratio = torch.where(good, p.clamp_min(1e-9).log() - g.clamp_min(DEPTH_MIN_VALID).log(), 0.0).flatten(1)
        mask = good.flatten(1)
        n_img = mask.sum(1).clamp_min(1)
        mean = log_ratio.sum(1, keepdim=True) / n_img[:, None]
        var = torch.where(mask, log_ratio - mean, 0.0).square().sum(1) / n_img  # two passes: no cancellation
        self.si_sum += float(var.sqrt()[mask.any(1)].sum()) * 100
        self.si_images += int(mask.any(1).sum())
        p, g = p[good], g[good]
        err = (p - g).abs()
        self.abs_sum += float(err.sum())
        self.rel_sum += float((err / g).sum())
        pc = p.clamp_min(1e-9)
        ratio = torch.maximum(pc / g, g / pc)
        for i, (_, t) in enumerate(self.THRESHOLDS):
            self.delta[i] += int((ratio < t).sum())

    def compute(self) -> dict[str, float]:
        n = self.total - self.nan
        out = {"abs_err": self.abs_sum / n if n else _nan(), "rel_err": self.rel_sum / n if n else _nan(),
               "si_log": self.si_sum / self.si_images if self.si_images else _nan()}
        for (name, _), c in zip(self.THRESHOLDS, self.delta):
            out[name] = c / self.total * 100 if self.total else _nan()
        out.update(self._coverage())
        return out


class L1Meter(_PixelMeter):
    def reset(self):
        super().reset()
        self.abs_sum = 0.0

    def update(self, pred: Tensor, label: Tensor, batch: dict):
        size = label.shape[-2:]
        p = _upsample(pred.detach(), size).cpu().double()[:, 0]
        g = label.cpu().double()[:, 0]
        good = self._count(valid_mask(self.spec, batch, label).cpu(), p)
        self.abs_sum += float((p - g).abs()[good].sum())

    def compute(self) -> dict[str, float]:
        n = self.total - self.nan
        return {"l1_err": self.abs_sum / n if n else _nan(), **self._coverage()}


class MultiTaskMetrics:
    """Accumulates every task's metrics over a split: `update(preds, batch)` per batch (preds: {task:
    [B,C,h,w]} at any resolution), `compute()` -> {task: {metric: float}}, `reset()`.

    `class_weights`: {task: weights} adds the class-weighted CE error ("ce_err") for segmentation
    (Taskonomy: pass the dataset's `class_weights`)."""

    def __init__(self, tasks, class_weights: dict[str, Tensor] | None = None, dataset: str = "nyuv2"):
        self.specs = {t.name: t for t in resolve_tasks(tasks, dataset)}
        class_weights = dict(class_weights or {})
        self.meters = {}
        for name, spec in self.specs.items():
            if spec.kind == "segmentation":
                self.meters[name] = SegmentationMeter(spec, class_weights.pop(name, None))
            elif spec.kind == "normal":
                self.meters[name] = NormalMeter(spec)
            elif spec.kind == "depth":
                self.meters[name] = DepthMeter(spec)
            else:
                self.meters[name] = L1Meter(spec)
        if class_weights:
            raise ValueError(f"MultiTaskMetrics: class_weights for {sorted(class_weights)}, which are not segmentation tasks here")

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()

    def update(self, preds: dict[str, Tensor], batch: dict) -> None:
        if not isinstance(preds, dict):
            raise TypeError(f"MultiTaskMetrics.update: argument 'preds' must be a dict task -> tensor, got {type(preds).__name__}")
        for name, pred in preds.items():
            if name not in self.meters:
                raise ValueError(f"MultiTaskMetrics.update: unknown task {name!r}; known {list(self.meters)}")
            if name not in batch:
                raise ValueError(f"MultiTaskMetrics.update: the batch has no label {name!r}")
            spec, label = self.specs[name], batch[name]
            if not isinstance(pred, Tensor) or pred.dim() != 4 or pred.shape[1] != spec.out_channels:
                raise ValueError(f"MultiTaskMetrics.update: preds[{name!r}] must be [B,{spec.out_channels},h,w], got "
                                 f"{tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__}")
            if pred.shape[0] != label.shape[0]:
                raise ValueError(f"MultiTaskMetrics.update: preds[{name!r}] has batch {pred.shape[0]}, labels {label.shape[0]}")
            self.meters[name].update(pred, label, batch)

    def compute(self) -> dict[str, dict[str, float]]:
        return {name: m.compute() for name, m in self.meters.items()}


def directions(tasks="nyuv2", miou: str = "mIoU") -> dict[str, dict[str, bool]]:
    """{task: {metric: lower_is_better}} for the metrics the paper's tables report (those ΔT sums).

    `tasks`: "nyuv2", "taskonomy", or a list of TaskSpec / names (per kind: segmentation -> mIoU,
    pixel_acc (ce_err when class-weighted); normal -> the 5 angle metrics; depth -> abs, rel, 3 deltas;
    dense_l1 -> l1_err). `miou`: "mIoU" (TP > 0, the paper's) or "mIoU_all" in its place."""
    if miou not in ("mIoU", "mIoU_all"):
        raise ValueError(f"directions: argument 'miou' must be 'mIoU' or 'mIoU_all', got {miou!r}")

    def swap(ms):
        return tuple(miou if m == "mIoU" else m for m in ms)

    if isinstance(tasks, str) and tasks in PAPER_METRICS:
        table = PAPER_METRICS[tasks]
        return {t: {m: METRIC_DIRECTIONS[m] for m in swap(ms)} for t, ms in table.items()}
    out = {}
    for spec in resolve_tasks(tasks):
        if spec.kind == "segmentation":
            ms = ("ce_err",) if spec.class_weighted else PAPER_METRICS["nyuv2"]["segment_semantic"]
        elif spec.kind == "normal":
            ms = PAPER_METRICS["nyuv2"]["normal"]
        elif spec.kind == "depth":
            ms = PAPER_METRICS["nyuv2"]["depth"]
        else:
            ms = ("l1_err",)
        out[spec.name] = {m: METRIC_DIRECTIONS[m] for m in swap(ms)}
    return out


def delta_t(results: dict, dense_results: dict, directions: dict) -> tuple[dict[str, float], float]:
    """ΔT_i = Σ_j (-1)^{p_j} (M_j - M_j^dense) / M_j^dense * 100 over task i's metrics (p_j = 1 when lower
    is better) -- a sum, not a mean -- and ΔT = mean_i ΔT_i (SPEC §6).

    `directions`: {task: {metric: lower_is_better}} (e.g. `directions("nyuv2")`): exactly these
    metrics are summed; or a flat {metric: lower_is_better}: every metric of results[task] listed
    there is summed. lower_is_better is True/False or "lower"/"higher" (anything else is refused).
    Returns ({task: ΔT_i}, ΔT)."""
    for arg, v in (("results", results), ("dense_results", dense_results), ("directions", directions)):
        if not isinstance(v, dict) or not v:
            raise TypeError(f"delta_t: argument '{arg}' must be a non-empty dict")
    nested = all(isinstance(v, dict) for v in directions.values())
    flat = directions.values() if not nested else [d for inner in directions.values() for d in inner.values()]
    for d in flat:  # 1 / -1 would both read as "lower is better": only booleans or the two words
        if not (isinstance(d, bool) or d in ("lower", "higher")):
            raise TypeError("delta_t: argument 'directions' must map task -> {metric: lower_is_better} or "
                            "metric -> lower_is_better, each True/False or 'lower'/'higher', got "
                            f"{d!r}")
    tasks = list(directions) if nested else list(results)
    per_task: dict[str, float] = {}
    for task in tasks:
        if task not in results or task not in dense_results:
            raise ValueError(f"delta_t: task {task!r} is missing from {'results' if task not in results else 'dense_results'}")
        if nested:
            metric_dirs = directions[task]
        else:
            metric_dirs = {m: directions[m] for m in results[task] if m in directions}
        if not metric_dirs:
            raise ValueError(f"delta_t: no metric of task {task!r} has a direction")
        total = 0.0
        for metric, lower in metric_dirs.items():
            for name, res in (("results", results), ("dense_results", dense_results)):
                if metric not in res[task]:
                    raise ValueError(f"delta_t: metric {metric!r} of task {task!r} is missing from {name}")
            m, d = float(results[task][metric]), float(dense_results[task][metric])
            if d == 0:
                raise ValueError(f"delta_t: dense value of {task}/{metric} is 0; the relative change is undefined")
            sign = -1.0 if lower in (True, "lower") else 1.0
            total += sign * (m - d) / d * 100.0
        per_task[task] = total
    return per_task, sum(per_task.values()) / len(per_task)


def safe_delta_t(results: dict, dense: dict, directions: dict) -> tuple[dict, float, list[str]]:
    """`delta_t` over the metrics whose dense value is a non-zero number (a relative change
    against 0 is undefined: tiny demo runs can have e.g. 0% of normals within 11.25°). Returns
    ({task: ΔT_i}, ΔT, ["task/metric" skipped])."""
    kept, skipped = {}, []
    for task, metrics in directions.items():
        for metric, lower in metrics.items():
            d = dense.get(task, {}).get(metric)
            if d is None or d == 0 or d != d:
                skipped.append(f"{task}/{metric}")
            else:
                kept.setdefault(task, {})[metric] = lower
    if not kept:
        raise ValueError("delta_t: no metric has a usable (non-zero) dense value")
    per_task, dt = delta_t(results, dense, kept)
    return per_task, dt, skipped
