"""Pruning baselines (SPEC §7): global top-k masks, IMP, LTH, SNIP, DiSparse, single threshold, dense.
Each must hit the requested overall sparsity, with masks enforced on weights and gradients."""
import pytest
import torch
from torch import nn

import adapmtl
from adapmtl.baselines import global_topk_masks, prunable_weights
from adapmtl.baselines.imp import round_schedule
from adapmtl.baselines.lth import rounds_schedule
from adapmtl.train import Trainer, config_from_dict
from adapmtl.train.config import apply_override


@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    from adapmtl.data import make_synthetic_scenes

    root = tmp_path_factory.mktemp("synb") / "scenes"
    make_synthetic_scenes(str(root), n_train=16, n_test=4, size=32, seed=0)
    return str(root)


def tiny_cfg(root, out_dir, method, **over):
    cfg = config_from_dict({
        "method": method, "seed": 1, "out_dir": str(out_dir),
        "data": {"dataset": "synthetic", "root": root, "n_train": 16, "n_test": 4, "image_size": 32, "crop_size": 32, "batch_size": 4, "eval_batch_size": 8,
                 "val_fraction": 0.25},
        "model": {"backbone": "tiny", "head_channels": 4},
        "prune": {"target_sparsity": 0.8, "s0": -5.0, "prune_start": 0.25, "prune_end": 0.75, "rounds": 3,
                  "score_batches": 2, "update_every": 2, "regrow_fraction": 0.3},
        "optim": {"lr": 1e-3, "weight_decay": 1e-4},
        "train": {"iterations": 8, "log_every": 4, "val_every": 8, "ckpt_every": 8, "progress": False,
                  "tensorboard": False, "plots": False},
    })
    for k, v in over.items():
        apply_override(cfg, f"{k}={v}")
    return cfg.validate()


def overall_zero_fraction(model):
    ws = [w for _, w in prunable_weights(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def test_global_topk_exact_count_and_largest():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 3, generator=g), torch.rand(13, generator=g), torch.rand(2, 5, 3, generator=g)]
    n = sum(s.numel() for s in scores)
    for sp in (0.0, 0.3, 0.77, 0.95):
        masks = global_topk_masks(scores, sp)
        kept = sum(int(m.sum()) for m in masks)
        assert kept == round((1 - sp) * n)
        flat = torch.cat([s.reshape(-1) for s in scores])
        fm = torch.cat([m.reshape(-1) for m in masks])
        if 0 < kept < n:
            assert flat[fm].min() > flat[~fm].max()
        assert all(m.shape == s.shape and m.dtype == torch.bool for m, s in zip(masks, scores))
    elig = [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    elig[1][:4] = True
    masks = global_topk_masks(scores, 1 - 3 / n, elig)
    assert int(masks[1][:4].sum()) == 3 and sum(int(m.sum()) for m in masks) == 3
    with pytest.raises(ValueError, match="sparsity"):
        global_topk_masks(scores, 1.0)


def test_imp_schedule():
    s = round_schedule(100, 0.2, 0.8, 4, 0.9)
    assert list(s) == [20, 40, 60, 80]
    vals = list(s.values())
    assert all(a < b for a, b in zip(vals, vals[1:])) and vals[-1] == pytest.approx(0.9)
    assert round_schedule(10, 0.5, 0.5, 1, 0.7) == {5: pytest.approx(0.7)}


@pytest.mark.parametrize("method", ["imp", "lth", "snip", "disparse"])
def test_mask_baselines_hit_target_and_enforce_masks(syn_root, tmp_path, method):
    cfg = tiny_cfg(syn_root, tmp_path, method)
    tr = Trainer(cfg)
    res = tr.fit()
    target = cfg.prune.target_sparsity
    masks = tr.method.masks
    assert masks is not None
    ws = prunable_weights(tr.model)
    n = sum(w.numel() for _, w in ws)
    assert sum(int(masks[k].sum()) for k, _ in ws) == round((1 - target) * n)
    for name, w in ws:  # pruned weights are exactly zero
        assert not w.detach()[~masks[name]].any(), name
    assert overall_zero_fraction(tr.model) >= target - 1e-9
    # the results describe the weights that were tested (the selected checkpoint, loaded into tr.model)
    assert res["selected"] == "final" or res["selected"].startswith("best@")
    assert res["sparsity"]["overall"] == pytest.approx(overall_zero_fraction(tr.model), abs=1e-6)
    # gradients are masked too: one more backward + after_backward leaves no gradient on pruned weights
    tr.optimizer.zero_grad()
    sum(tr.compute_losses(next(tr._train_batches(0))).values()).backward()
    tr.method.after_backward(tr, tr.iteration)
    for name, w in ws:
        assert not w.grad[~masks[name]].any(), name


def test_lth_prunes_iteratively_and_rewinds_every_round(syn_root, tmp_path):
    cfg = tiny_cfg(syn_root, tmp_path, "lth", **{"optim.step_size": 4})
    tr = Trainer(cfg)
    init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    rounds = tr.method.rounds()
    assert rounds == rounds_schedule(8, 0.25, 0.75, 3) == [3, 5, 6]
    tr.method.on_train_start(tr)
    assert tr.scheduler.step_size == 2  # the schedule compressed into the 3 iterations before the first round
    data = tr._train_batches(0)
    alive_before = None
    for r, it in enumerate(rounds, start=1):
        while tr.iteration < it:
            tr.train_step(next(data))
        name, w = prunable_weights(tr.model)[0]
        assert not torch.equal(w.detach(), init[name + ".weight"] * (tr.method.masks[name] if tr.method.masks else 1))
        tr.method.before_iteration(tr, tr.iteration, next(data))
        masks = tr.method.masks
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert kept == pytest.approx(0.2 ** (r / 3), abs=1e-3)  # (1 - target)^(r/R) of all weights remain
        if alive_before is not None:  # pruned among the survivors only
            assert all(not (m & ~alive_before[n]).any() for n, m in masks.items())
        alive_before = {n: m.clone() for n, m in masks.items()}
        for name, w in prunable_weights(tr.model):  # every round rewinds the survivors to the rewind point
            assert torch.equal(w.detach(), init[name + ".weight"] * masks[name]), name
        assert not tr.optimizer.state  # Adam restarts
        assert tr.optimizer.param_groups[0]["lr"] == cfg.optim.lr  # ... and the schedule, compressed
        assert tr.scheduler.step_size == max(1, round(4 * ((rounds + [8])[r] - it) / 8))
    assert tr.method.snapshot is None  # no rewind left after the last round
    assert overall_zero_fraction(tr.model) == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="prune.rewind_iter=3"):
        Trainer(tiny_cfg(syn_root, tmp_path / "x", "lth", **{"prune.rewind_iter": 3})).method.rounds()
    with pytest.raises(ValueError, match="prune.rounds"):
        rounds_schedule(4, 0.0, 0.5, 3)


def test_snip_masks_match_reference(syn_root, tmp_path):
    # no dropout: train-mode forwards are then deterministic, so an independent computation must agree
    cfg = tiny_cfg(syn_root, tmp_path, "snip", **{"model.dropout": 0.0})
    tr = Trainer(cfg)
    batches = tr.sample_batches(cfg.prune.score_batches)
    ws = prunable_weights(tr.model)
    acc = [torch.zeros_like(w, dtype=torch.float64) for _, w in ws]
    tr.model.train()
    for b in batches:  # reference: backward of the summed task losses, |g * w|
        tr.model.zero_grad()
        sum(tr.criterion(tr.model(b["image"]), b).values()).backward()
        for a, (_, w) in zip(acc, ws):
            a.add_((w.grad.double() * w.detach().double()).abs())
    expected = global_topk_masks(acc, cfg.prune.target_sparsity)
    tr.model.zero_grad()
    tr.sample_batches = lambda n: batches  # the very same (augmented) batches
    tr.method.on_train_start(tr)
    got = [tr.method.masks[name] for name, _ in ws]
    n = sum(m.numel() for m in got)
    differ = sum(int((e != g).sum()) for e, g in zip(expected, got))
    assert differ <= 2e-4 * n  # only float-rounding ties at the cut may differ
    for (name, w), m in zip(ws, got):
        assert not w.detach()[~m].any()


def test_disparse_keeps_sparsity_and_swaps(syn_root, tmp_path):
    cfg = tiny_cfg(syn_root, tmp_path, "disparse")
    tr = Trainer(cfg)
    tr.method.on_train_start(tr)
    data = tr._train_batches(0)
    tr.train_step(next(data))
    tr.train_step(next(data))
    before = {k: v.clone() for k, v in tr.method.masks.items()}
    assert tr.iteration == 2
    tr.train_step(next(data))  # iteration 2 is an update (update_every=2)
    after = tr.method.masks
    kept = lambda ms: sum(int(m.sum()) for m in ms.values())  # noqa: E731
    assert kept(before) == kept(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert overall_zero_fraction(tr.model) >= cfg.prune.target_sparsity - 1e-9


def test_single_threshold_and_str_and_dense(syn_root, tmp_path):
    single = Trainer(tiny_cfg(syn_root, tmp_path / "s", "single_threshold"))
    assert len(adapmtl.threshold_parameters(single.model)) == 1
    assert not single.loss_weights.enabled
    per_layer = Trainer(tiny_cfg(syn_root, tmp_path / "l", "str"))
    assert len(adapmtl.threshold_parameters(per_layer.model)) == len(adapmtl.str_layers(per_layer.model))
    comp = Trainer(tiny_cfg(syn_root, tmp_path / "c", "adapmtl"))
    assert len(adapmtl.threshold_parameters(comp.model)) == 4 and comp.loss_weights.enabled
    dense = Trainer(tiny_cfg(syn_root, tmp_path / "d", "dense"))
    assert not adapmtl.str_layers(dense.model) and not dense.method.prunes
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for _, m in dense.model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_mask_baseline_resume_restores_masks(syn_root, tmp_path):
    cfg = tiny_cfg(syn_root, tmp_path, "imp")
    tr = Trainer(cfg)
    tr.fit(stop_at=5)  # past the first pruning round (iteration 2)
    masks = {k: v.clone() for k, v in tr.method.masks.items()}
    again = Trainer(tiny_cfg(syn_root, tmp_path, "imp", **{"train.resume": "auto"}))
    assert again.iteration == 5
    assert all(torch.equal(masks[k], again.method.masks[k]) for k in masks)
