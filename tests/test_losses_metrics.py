"""Losses (SPEC §5), metrics on hand-computed cases, edge cases, and ΔT against SPEC §6's table."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapmtl.losses import MultiTaskLoss, downsample_nearest, task_loss
from adapmtl.metrics import METRIC_DIRECTIONS, MultiTaskMetrics, delta_t, directions
from adapmtl.tasks import NYUV2_TASKS, TASKONOMY_TASKS, TaskSpec

SEG3 = TaskSpec("segment_semantic", 3, "segmentation")


# ---------------------------------------------------------------- losses
def test_seg_loss_downsamples_labels_nearest():
    torch.manual_seed(0)
    pred = torch.randn(2, 40, 5, 7, requires_grad=True)
    label = torch.randint(0, 40, (2, 10, 14))
    label[0, :4] = 255
    loss = task_loss("segment_semantic", pred, {"segment_semantic": label})
    small = label[:, ::2, ::2]  # nearest downsampling by 2 picks the even pixels
    torch.testing.assert_close(loss, F.cross_entropy(pred, small, ignore_index=255))
    loss.backward()
    w = torch.rand(40)
    lw = task_loss("segment_semantic", pred, {"segment_semantic": label}, class_weights=w)
    torch.testing.assert_close(lw, F.cross_entropy(pred, small, weight=w, ignore_index=255))


def test_normal_depth_l1_losses_on_valid_pixels():
    torch.manual_seed(1)
    pred_n, gt_n = torch.randn(2, 3, 6, 5), torch.randn(2, 3, 6, 5)
    mask = torch.rand(2, 6, 5) > 0.3
    ln = task_loss("normal", pred_n, {"normal": gt_n, "normal_mask": mask})
    cos = (F.normalize(pred_n, dim=1) * F.normalize(gt_n, dim=1)).sum(1)
    torch.testing.assert_close(ln, (1 - cos)[mask].mean())
    pred_d, gt_d = torch.randn(2, 1, 3, 5), torch.rand(2, 1, 6, 10)
    dmask = torch.rand(2, 6, 10) > 0.5
    ld = task_loss("depth", pred_d, {"depth": gt_d, "depth_mask": dmask})
    m, g = dmask[:, ::2, ::2], gt_d[:, 0, ::2, ::2]
    torch.testing.assert_close(ld, (pred_d[:, 0] - g).abs()[m].mean())
    kp = torch.rand(1, 1, 4, 4)
    kp[0, 0, 0] = 255
    lk = task_loss(TASKONOMY_TASKS[3], torch.zeros(1, 1, 4, 4), {"keypoints2d": kp})
    torch.testing.assert_close(lk, kp[0, 0, 1:].mean())


def test_loss_with_no_valid_pixel_is_zero_and_backprops():
    pred = torch.randn(1, 1, 4, 4, requires_grad=True)
    loss = task_loss("depth", pred, {"depth": torch.zeros(1, 1, 4, 4), "depth_mask": torch.zeros(1, 4, 4, dtype=torch.bool)})
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(pred.grad == 0)
    seg = torch.randn(1, 40, 2, 2, requires_grad=True)
    assert task_loss("segment_semantic", seg, {"segment_semantic": torch.full((1, 2, 2), 255)}).item() == 0.0


def test_multitask_loss_and_errors():
    crit = MultiTaskLoss(NYUV2_TASKS)
    batch = {"segment_semantic": torch.randint(0, 40, (1, 8, 8)), "normal": torch.randn(1, 3, 8, 8),
             "normal_mask": torch.ones(1, 8, 8, dtype=torch.bool), "depth": torch.rand(1, 1, 8, 8) + 1,
             "depth_mask": torch.ones(1, 8, 8, dtype=torch.bool)}
    preds = {"segment_semantic": torch.randn(1, 40, 4, 4), "depth": torch.rand(1, 1, 4, 4)}
    out = crit(preds, batch)
    assert set(out) == {"segment_semantic", "depth"} and all(v.dim() == 0 for v in out.values())
    with pytest.raises(ValueError, match="channels"):
        task_loss("depth", torch.randn(1, 2, 4, 4), batch)
    with pytest.raises(ValueError, match="unknown"):
        crit({"edges": torch.randn(1, 1, 4, 4)}, batch)
    with pytest.raises(TypeError):
        task_loss(3, torch.randn(1, 1, 4, 4), batch)


def test_downsample_nearest_non_contiguous():
    x = torch.arange(48).view(1, 6, 8).transpose(1, 2)
    torch.testing.assert_close(downsample_nearest(x, (4, 3)), x[:, ::2, ::2])


# ---------------------------------------------------------------- segmentation metrics
def _seg_batch(pred_cls, gt, C=3):
    logits = F.one_hot(torch.as_tensor(pred_cls), C).permute(0, 3, 1, 2).float()
    return {"segment_semantic": logits}, {"segment_semantic": torch.as_tensor(gt)}


def test_seg_metrics_hand_computed_with_absent_class():
    # C = 3; class 2 never appears in gt nor predictions; one ignored pixel
    pred = [[[0, 0, 1, 1]]]
    gt = [[[0, 1, 1, 255]]]
    met = MultiTaskMetrics([SEG3])
    met.update(*_seg_batch(pred, gt))
    r = met.compute()["segment_semantic"]
    # class 0: TP 1, union 2 -> 0.5 ; class 1: TP 1, union 2 -> 0.5 ; class 2: undefined
    assert r["mIoU"] == pytest.approx(50.0) and r["mIoU_all"] == pytest.approx(50.0)
    assert r["pixel_acc"] == pytest.approx(200 / 3)
    assert r["nan_fraction"] == 0 and r["num_pixels"] == 3


def test_seg_miou_variants_differ_and_accumulate_over_batches():
    met = MultiTaskMetrics([SEG3])
    met.update(*_seg_batch([[[0, 0]]], [[[0, 2]]]))  # class 2 present, never predicted right
    met.update(*_seg_batch([[[1, 1]]], [[[1, 1]]]))
    r = met.compute()["segment_semantic"]
    # IoU: class 0 = 1/2, class 1 = 1, class 2 = 0
    assert r["mIoU"] == pytest.approx(75.0)  # authors': classes with TP > 0
    assert r["mIoU_all"] == pytest.approx(50.0)
    assert r["pixel_acc"] == pytest.approx(75.0)
    met.reset()
    met.update(*_seg_batch([[[1]]], [[[1]]]))
    assert met.compute()["segment_semantic"]["pixel_acc"] == 100.0


def test_seg_prediction_upsampled_nearest_and_nan_counted():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 1  # left half -> class 2
    logits[0, :, 0, 1] = float("nan")  # right half NaN
    gt = torch.tensor([[[2, 2, 1, 1]]])
    met = MultiTaskMetrics([SEG3])
    met.update({"segment_semantic": logits}, {"segment_semantic": gt})
    r = met.compute()["segment_semantic"]
    assert r["nan_fraction"] == pytest.approx(0.5) and r["pixel_acc"] == pytest.approx(50.0)
    assert r["mIoU"] == pytest.approx(100.0) and r["mIoU_all"] == pytest.approx(50.0)  # class 1: 0/2


def test_seg_class_weighted_ce_err():
    torch.manual_seed(0)
    logits, gt = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    gt[0, 0, 0] = 255
    w = torch.tensor([0.5, 1.0, 2.0])
    met = MultiTaskMetrics([TaskSpec("segment_semantic", 3, "segmentation", class_weighted=True)],
                           class_weights={"segment_semantic": w})
    met.update({"segment_semantic": logits}, {"segment_semantic": gt})
    expect = F.cross_entropy(logits.double(), gt, weight=w.double(), ignore_index=255).item()
    assert met.compute()["segment_semantic"]["ce_err"] == pytest.approx(expect, rel=1e-9)


# ---------------------------------------------------------------- normal metrics
def _normals_at(angles_deg):
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    pred = torch.stack([torch.sin(a), torch.zeros_like(a), torch.cos(a)]).view(1, 3, 1, -1)
    gt = torch.zeros_like(pred)
    gt[:, 2] = 1
    return pred, gt


def test_normal_metrics_hand_computed():
    angles = [5.0, 10.0, 20.0, 25.0, 40.0, 90.0]
    pred, gt = _normals_at(angles)
    pred = pred * 3.0  # unnormalised predictions are normalised
    mask = torch.ones(1, 1, 7, dtype=torch.bool)
    pred = torch.cat([pred, torch.ones(1, 3, 1, 1)], -1)
    gt = torch.cat([gt, torch.ones(1, 3, 1, 1)], -1)
    mask[0, 0, 6] = False  # invalid pixel ignored
    met = MultiTaskMetrics(["normal"])
    met.update({"normal": pred.float()}, {"normal": gt.float(), "normal_mask": mask})
    r = met.compute()["normal"]
    assert r["angle_mean"] == pytest.approx(np.mean(angles), abs=1e-3)
    assert r["angle_median"] == pytest.approx(22.5, abs=0.01)
    assert r["within_11.25"] == pytest.approx(200 / 6) and r["within_22.5"] == pytest.approx(50.0)
    assert r["within_30"] == pytest.approx(400 / 6)
    assert r["cosine"] == pytest.approx(np.mean(np.cos(np.deg2rad(angles))), abs=1e-6)


def test_normal_metrics_nan_reported_and_median_pooled():
    pred, gt = _normals_at([1.0, 2.0, 3.0, 50.0])
    pred[0, :, 0, 3] = float("nan")
    met = MultiTaskMetrics(["normal"])
    met.update({"normal": pred.float()}, {"normal": gt.float(), "normal_mask": torch.ones(1, 1, 4, dtype=torch.bool)})
    p2, g2 = _normals_at([4.0, 60.0, 70.0])
    met.update({"normal": p2.float()}, {"normal": g2.float(), "normal_mask": torch.ones(1, 1, 3, dtype=torch.bool)})
    r = met.compute()["normal"]
    assert r["nan_fraction"] == pytest.approx(1 / 7)
    assert r["angle_mean"] == pytest.approx(np.mean([1, 2, 3, 4, 60, 70]), abs=1e-3)
    assert r["angle_median"] == pytest.approx(3.5, abs=0.01)  # pooled over both batches
    assert r["within_11.25"] == pytest.approx(400 / 7)  # the NaN pixel counts as a failure
    assert not math.isnan(r["angle_mean"])


def test_normal_prediction_upsampled_nearest():
    pred = torch.zeros(1, 3, 1, 1)
    pred[0, 2] = 1
    gt = torch.zeros(1, 3, 4, 4)
    gt[0, 0] = 1
    met = MultiTaskMetrics(["normal"])
    met.update({"normal": pred}, {"normal": gt, "normal_mask": torch.ones(1, 4, 4, dtype=torch.bool)})
    assert met.compute()["normal"]["angle_mean"] == pytest.approx(90.0, abs=1e-4)


# ---------------------------------------------------------------- depth metrics
def test_depth_metrics_hand_computed():
    p = torch.tensor([1.0, 1.9, 3.0, 1.0, 5.0, -1.0]).view(1, 1, 1, 6)
    g = torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0, 1.0]).view(1, 1, 1, 6)  # gt 0 is invalid
    met = MultiTaskMetrics(["depth"])
    met.update({"depth": p}, {"depth": g, "depth_mask": torch.ones(1, 1, 6, dtype=torch.bool)})
    r = met.compute()["depth"]
    err = [0, 0.9, 1, 1, 2]
    assert r["abs_err"] == pytest.approx(np.mean(err))
    assert r["rel_err"] == pytest.approx(np.mean([0, 0.9, 0.5, 0.5, 2]))
    # ratios: 1, 1.9, 1.5, 2, 1e9 (the negative prediction is clamped to 1e-9)
    assert r["delta_1.25"] == pytest.approx(20.0)
    assert r["delta_1.25^2"] == pytest.approx(40.0)  # < 1.5625: 1 and 1.5
    assert r["delta_1.25^3"] == pytest.approx(60.0)  # < 1.953125: 1, 1.5 and 1.9
    assert r["num_pixels"] == 5


def test_depth_batch_without_valid_pixels_and_nan():
    met = MultiTaskMetrics(["depth"])
    met.update({"depth": torch.ones(1, 1, 2, 2)}, {"depth": torch.zeros(1, 1, 2, 2), "depth_mask": torch.zeros(1, 2, 2, dtype=torch.bool)})
    r0 = met.compute()["depth"]
    assert math.isnan(r0["abs_err"]) and r0["num_pixels"] == 0  # nothing valid in the split so far
    p = torch.tensor([[[[1.0, float("nan")]]]])
    g = torch.tensor([[[[1.0, 1.0]]]])
    met.update({"depth": p}, {"depth": g, "depth_mask": torch.ones(1, 1, 2, dtype=torch.bool)})
    r = met.compute()["depth"]
    assert r["abs_err"] == 0 and r["nan_fraction"] == pytest.approx(0.5) and r["delta_1.25"] == pytest.approx(50.0)


def test_l1_metric_and_taskonomy_set():
    met = MultiTaskMetrics(TASKONOMY_TASKS, class_weights={"segment_semantic": torch.ones(17)}, dataset="taskonomy")
    lab = torch.tensor([[[[0.5, 255.0, -0.5]]]])
    met.update({"edge_texture": torch.zeros(1, 1, 1, 3)}, {"edge_texture": lab})
    r = met.compute()
    assert r["edge_texture"]["l1_err"] == pytest.approx(0.5)
    assert set(r) == {t.name for t in TASKONOMY_TASKS}
    with pytest.raises(ValueError, match="unknown"):
        met.update({"depth": torch.zeros(1, 1, 1, 3)}, {"depth": lab})
    with pytest.raises(ValueError):
        MultiTaskMetrics(["depth"], class_weights={"depth": torch.ones(1)})


def test_metrics_match_reference_on_random_data():
    """Pooled metrics equal a direct numpy computation on random odd-sized data over 2 batches."""
    torch.manual_seed(5)
    met = MultiTaskMetrics(NYUV2_TASKS)
    all_a, all_p, all_g, conf = [], [], [], np.zeros((40, 40))
    for _ in range(2):
        seg_l = torch.randint(0, 40, (2, 9, 13))
        seg_l[:, 0] = 255
        n_p, n_g = torch.randn(2, 3, 9, 13), torch.randn(2, 3, 9, 13)
        d_p, d_g = torch.rand(2, 1, 9, 13) + 0.5, torch.rand(2, 1, 9, 13) + 0.5
        mask = torch.rand(2, 9, 13) > 0.2
        logits = torch.randn(2, 40, 9, 13)
        met.update({"segment_semantic": logits, "normal": n_p, "depth": d_p},
                   {"segment_semantic": seg_l, "normal": n_g, "normal_mask": mask, "depth": d_g, "depth_mask": mask})
        v = seg_l != 255
        np.add.at(conf, (seg_l[v].numpy(), logits.argmax(1)[v].numpy()), 1)
        cos = (F.normalize(n_p.double(), dim=1) * F.normalize(n_g.double(), dim=1)).sum(1).clamp(-1, 1)
        all_a.append(np.degrees(np.arccos(cos[mask].numpy())))
        all_p.append(d_p[:, 0][mask].double().numpy())
        all_g.append(d_g[:, 0][mask].double().numpy())
    r = met.compute()
    tp = np.diag(conf)
    iou = tp / (conf.sum(0) + conf.sum(1) - tp)
    assert r["segment_semantic"]["mIoU"] == pytest.approx(iou[tp > 0].mean() * 100)
    assert r["segment_semantic"]["pixel_acc"] == pytest.approx(tp.sum() / conf.sum() * 100)
    a = np.concatenate(all_a)
    assert r["normal"]["angle_mean"] == pytest.approx(a.mean(), abs=1e-4)
    assert r["normal"]["angle_median"] == pytest.approx(np.median(a), abs=0.01)
    assert r["normal"]["within_22.5"] == pytest.approx((a < 22.5).mean() * 100)
    p, g = np.concatenate(all_p), np.concatenate(all_g)
    assert r["depth"]["rel_err"] == pytest.approx((np.abs(p - g) / g).mean(), rel=1e-6)
    assert r["depth"]["delta_1.25"] == pytest.approx((np.maximum(p / g, g / p) < 1.25).mean() * 100)


# ---------------------------------------------------------------- ΔT
COLS = ["mIoU", "pixel_acc", "angle_mean", "angle_median", "within_11.25", "within_22.5", "within_30",
        "abs_err", "rel_err", "delta_1.25", "delta_1.25^2", "delta_1.25^3"]
# SPEC §6: NYUv2, MobileNetV2, ~90% sparsity; last entry = the table's ΔT
TABLE = {
    "dense": ([19.94, 48.71, 17.85, 16.21, 29.77, 72.19, 86.19, 0.64, 0.24, 58.93, 86.27, 96.16], 0.00),
    "SNIP": ([18.96, 46.93, 18.33, 16.97, 28.93, 71.21, 85.78, 0.64, 0.25, 56.75, 85.71, 95.33], -9.99),
    "LTH": ([19.14, 47.25, 17.67, 16.32, 29.67, 72.15, 86.22, 0.65, 0.25, 57.68, 85.89, 96.13], -5.12),
    "IMP": ([18.76, 48.12, 18.71, 16.68, 29.63, 71.76, 85.91, 0.64, 0.23, 59.75, 86.52, 96.31], -3.41),
    "DiSparse": ([19.87, 48.83, 17.92, 16.79, 29.87, 71.76, 85.64, 0.65, 0.24, 58.42, 85.72, 96.28], -2.64),
    "single threshold": ([18.93, 47.51, 18.16, 16.87, 28.37, 71.53, 86.63, 0.65, 0.24, 58.26, 85.82, 95.92], -7.30),
    "AdapMTL": ([20.16, 49.14, 17.53, 15.96, 30.16, 72.36, 86.51, 0.64, 0.24, 59.03, 86.57, 96.38], 2.66),
}


def _nest(vals):
    d = dict(zip(COLS, vals))
    return {"segment_semantic": {k: d[k] for k in COLS[:2]}, "normal": {k: d[k] for k in COLS[2:7]},
            "depth": {k: d[k] for k in COLS[7:]}}


@pytest.mark.parametrize("method", list(TABLE))
def test_delta_t_reproduces_spec_table(method):
    vals, expected = TABLE[method]
    per_task, dt = delta_t(_nest(vals), _nest(TABLE["dense"][0]), directions("nyuv2"))
    assert set(per_task) == {"segment_semantic", "normal", "depth"}
    assert round(dt, 2) == pytest.approx(expected, abs=1e-9)


def test_delta_t_per_task_hand_computed():
    per_task, dt = delta_t(_nest(TABLE["SNIP"][0]), _nest(TABLE["dense"][0]), directions("nyuv2"))
    seg = (18.96 - 19.94) / 19.94 * 100 + (46.93 - 48.71) / 48.71 * 100
    depth = -(0.25 - 0.24) / 0.24 * 100 + sum((a - b) / b * 100 for a, b in ((56.75, 58.93), (85.71, 86.27), (95.33, 96.16)))
    assert per_task["segment_semantic"] == pytest.approx(seg) and per_task["depth"] == pytest.approx(depth)
    assert dt == pytest.approx(sum(per_task.values()) / 3)
    # a flat {metric: lower_is_better} gives the same numbers; a sum, not a mean, over metrics
    flat = {m: METRIC_DIRECTIONS[m] for m in COLS}
    assert delta_t(_nest(TABLE["SNIP"][0]), _nest(TABLE["dense"][0]), flat)[1] == pytest.approx(dt)


def test_delta_t_errors_and_directions():
    d = directions("nyuv2")
    assert d["normal"]["angle_mean"] is True and d["segment_semantic"]["mIoU"] is False
    assert directions("taskonomy")["segment_semantic"] == {"ce_err": True}
    assert directions(NYUV2_TASKS) == d
    dense = _nest(TABLE["dense"][0])
    res = _nest(TABLE["LTH"][0])
    del res["depth"]["rel_err"]
    with pytest.raises(ValueError, match="rel_err"):
        delta_t(res, dense, d)
    zero = _nest(TABLE["dense"][0])
    zero["depth"]["abs_err"] = 0.0
    with pytest.raises(ValueError, match="abs_err"):
        delta_t(dense, zero, d)
    with pytest.raises(TypeError):
        delta_t({}, dense, d)


def test_normal_median_histogram_fallback():
    from adapmtl.metrics import NormalMeter

    torch.manual_seed(2)
    pred, gt = torch.randn(1, 3, 50, 41), torch.randn(1, 3, 50, 41)
    batch = {"normal": gt, "normal_mask": torch.ones(1, 50, 41, dtype=torch.bool)}
    exact, approx = NormalMeter(NYUV2_TASKS[1]), NormalMeter(NYUV2_TASKS[1], exact_median_limit=1000)
    for m in (exact, approx):
        m.update(pred, gt, batch)
        m.update(pred[..., :7], gt[..., :7], {"normal": gt[..., :7], "normal_mask": batch["normal_mask"][..., :7]})
    assert approx.hist is not None and exact.hist is None
    re, ra = exact.compute(), approx.compute()
    assert ra["angle_median"] == pytest.approx(re["angle_median"], abs=0.005)
    assert ra["angle_mean"] == pytest.approx(re["angle_mean"])
