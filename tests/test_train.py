"""Trainer (SPEC §3): config validation, adaptive loss weights, target-sparsity cap, exact resume,
atomic checkpoints, from-dense start, logs/plots/results, optimizer and schedule."""
import glob
import json
import os
import random

import pytest
import torch

import adapmtl
from adapmtl.train import AdaptiveLossWeights, Config, Trainer, config_from_dict, load_config
from adapmtl.train.checkpoint import atomic_save, load_checkpoint_file
from adapmtl.train.config import apply_override, bundled_configs
from helpers import tiny_run_config

CONFIGS = bundled_configs()  # inside the package under test (adapmtl/configs), installed or editable


@pytest.fixture(scope="module")
def syn_root(synthetic_scenes):
    return synthetic_scenes(20, 6)


def tiny_cfg(root, out_dir, **over) -> Config:
    return tiny_run_config(root, out_dir, {
        "seed": 3,
        "data": {"n_train": 20, "n_test": 6, "batch_size": 4, "eval_batch_size": 8, "val_fraction": 0.2},
        "model": {"head_channels": 4},
        "prune": {"s0": -5.0, "target_sparsity": 0.9},
        "optim": {"lr": 2e-3, "weight_decay": 1e-3, "step_size": 3, "gamma": 0.5},
        "loss_weights": {"start": 1, "window": 2},
        "train": {"iterations": 6, "log_every": 2, "val_every": 3, "ckpt_every": 2},
    }, over)


# ------------------------------------------------------------------ config
def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="'optim.lrr'"):
        config_from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="'bogus'"):
        config_from_dict({"bogus": 1})
    with pytest.raises(TypeError, match="train.iterations"):
        config_from_dict({"train": {"iterations": "many"}})
    with pytest.raises(ValueError, match="prune.target_sparsity"):
        config_from_dict({"prune": {"target_sparsity": 1.5}})
    with pytest.raises(ValueError, match="method"):
        config_from_dict({"method": "magic"})
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_override(Config(), "no-equals-sign")
    cfg = Config()
    apply_override(cfg, "optim.lr=1e-4")
    apply_override(cfg, "optim.weight_decay=0")  # an int where a float is expected is fine
    apply_override(cfg, "loss_weights.priorities={depth: 2}")
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.loss_weights.priorities == {"depth": 2}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load(name):
    assert set(CONFIGS) >= {"demo", "nyuv2_resnet34", "nyuv2_mobilenetv2", "taskonomy_resnet34"}
    cfg = load_config(name)
    assert load_config(CONFIGS[name]) == cfg == load_config(f"{name}.yaml")
    assert cfg.method in ("adapmtl",)
    assert cfg.optim.betas == [0.5, 0.999]


def test_paper_settings_in_configs():
    r34 = load_config("nyuv2_resnet34")
    assert (r34.train.iterations, r34.data.batch_size, r34.data.crop_size) == (20000, 16, 321)
    assert (r34.optim.lr, r34.optim.step_size, r34.optim.gamma, r34.prune.s0) == (1e-3, 4000, 0.5, -15.0)
    mb = load_config("nyuv2_mobilenetv2")
    assert mb.model.backbone == "mobilenetv2" and mb.prune.s0 == -18.0
    tk = load_config("taskonomy_resnet34")
    assert (tk.train.iterations, tk.data.crop_size, tk.optim.lr, tk.optim.step_size, tk.optim.gamma) == \
        (100000, 224, 1e-4, 12000, 0.3)
    for cfg in (r34, mb, tk):
        assert (cfg.loss_weights.start, cfg.loss_weights.window) == (5000, 500)


# ------------------------------------------------------------------ adaptive weights
def reference_weights(loss_seq, start, window, normalize, T):
    """Plain-Python SPEC §3 reference: weights used at each iteration."""
    hist = [[] for _ in range(T)]
    out = []
    prev = None
    for i, losses in enumerate(loss_seq):
        if all(len(h) >= window for h in hist):
            w = [sum(h[-window:]) / window for h in hist]
            if normalize:
                s = sum(w)
                w = [x * T / s for x in w]
        else:
            w = [1.0] * T
        out.append(w)
        if i >= start and prev is not None:
            for t in range(T):
                hist[t].append(abs(prev[t] - losses[t]) / losses[t])
        prev = losses
    return out


@pytest.mark.parametrize("start,window,normalize", [(0, 1, True), (3, 4, True), (2, 3, False)])
def test_adaptive_weights_match_reference(start, window, normalize):
    rng = random.Random(start * 10 + window)
    T = 3
    seq = [[rng.uniform(0.1, 3.0) for _ in range(T)] for _ in range(15)]
    ref = reference_weights(seq, start, window, normalize, T)
    aw = AdaptiveLossWeights(["a", "b", "c"], start=start, window=window, normalize=normalize)
    for i, losses in enumerate(seq):
        w = aw.weights()
        assert torch.allclose(w, torch.tensor(ref[i], dtype=torch.float64), rtol=1e-12), i
        if normalize:
            assert abs(float(w.sum()) - T) < 1e-9
        aw.update(i, torch.tensor(losses, dtype=torch.float64))
    # exact state round trip
    clone = AdaptiveLossWeights(["a", "b", "c"], start=start, window=window, normalize=normalize)
    clone.load_state_dict(aw.state_dict())
    assert torch.equal(clone.weights(), aw.weights())


def test_adaptive_weights_priorities_disabled_and_errors():
    aw = AdaptiveLossWeights(["x", "y"], start=0, window=1, enabled=False, priorities={"y": 2.0})
    for i in range(4):
        aw.update(i, torch.tensor([1.0 + i, 2.0 * (i + 1)]))
    assert torch.equal(aw.combined(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown tasks"):
        AdaptiveLossWeights(["x"], priorities={"z": 1.0})
    with pytest.raises(ValueError, match="window"):
        AdaptiveLossWeights(["x"], window=0)


# ------------------------------------------------------------------ trainer
def test_optimizer_scheduler_and_threshold_params(syn_root, tmp_path):
    tr = Trainer(tiny_cfg(syn_root, tmp_path, **{"optim.step_size": 2}))
    opt = tr.optimizer
    assert type(opt) is torch.optim.Adam
    g = opt.param_groups[0]
    assert g["betas"] == (0.5, 0.999) and g["weight_decay"] == 1e-3 and not g.get("decoupled_weight_decay", False)
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    ths = adapmtl.threshold_parameters(tr.model)
    assert len(ths) == 1 + len(tr.tasks)  # backbone + one per head
    assert all(id(s) in ids for s in ths)  # every threshold is trained (their group: test_sparsity_control.py)
    data = tr._train_batches(0)
    lrs = []
    for _ in range(5):
        tr.train_step(next(data))
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == lrs[-1]
    assert lrs == pytest.approx([2e-3 * 0.5 ** ((k + 1) // 2) for k in range(5)])


def test_cap_freezes_thresholds_over_all_components(syn_root, tmp_path):
    # s0 = -4 prunes ~some weights at once; target 1% is below that: the cap must fire every step
    tr = Trainer(tiny_cfg(syn_root, tmp_path, **{"prune.control": "paper", "prune.s0": -4.0, "prune.target_sparsity": 0.01}))
    before = [s.detach().clone() for s in adapmtl.threshold_parameters(tr.model)]
    w_before = tr.model.backbone.stages[0][0].weight.detach().clone()
    data = tr._train_batches(0)
    for _ in range(3):
        out = tr.train_step(next(data))
        assert out["cap"] == 1.0
        exact = adapmtl.sparsity_report(tr.model).overall
        assert exact >= 0.01
    for s, b in zip(adapmtl.threshold_parameters(tr.model), before):
        assert torch.equal(s.detach(), b)  # no update, no decay, no moment update
        assert not tr.optimizer.state.get(s)
    assert not torch.equal(tr.model.backbone.stages[0][0].weight.detach(), w_before)  # weights still train

    tr2 = Trainer(tiny_cfg(syn_root, tmp_path / "b", **{"prune.control": "paper", "prune.s0": -4.0,
                                                        "prune.target_sparsity": 0.99}))
    before = [s.detach().clone() for s in adapmtl.threshold_parameters(tr2.model)]
    out = tr2.train_step(next(tr2._train_batches(0)))
    assert out["cap"] == 0.0
    assert all(not torch.equal(s.detach(), b) for s, b in zip(adapmtl.threshold_parameters(tr2.model), before))


def test_cap_decision_uses_exact_overall_sparsity(syn_root, tmp_path):
    tr = Trainer(tiny_cfg(syn_root, tmp_path, **{"prune.control": "paper", "prune.s0": -4.5}))
    batch = next(tr._train_batches(0))
    tr.compute_losses(batch)
    exact = adapmtl.sparsity_report(tr.model).overall
    live = float(adapmtl.live_sparsity(tr.model).overall)
    assert live == pytest.approx(exact, abs=1e-12)
    # a target just above / below the current sparsity flips the decision
    for target, expect in ((exact + 1e-6, 0.0), (max(exact - 1e-3, 1e-4), 1.0)):
        tr.cfg.prune.target_sparsity = target
        tr.compute_losses(batch)
        tr.optimizer.zero_grad()
        sum(tr.compute_losses(batch).values()).backward()
        assert tr.method.after_backward(tr, 0)["cap"] == expect


def _state_tensors(tr):
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def test_exact_resume_is_bitwise(syn_root, tmp_path):
    over = {"train.iterations": 6, "train.val_every": 100, "train.ckpt_every": 100}
    straight = Trainer(tiny_cfg(syn_root, tmp_path / "a", **over))
    straight.fit()
    first = Trainer(tiny_cfg(syn_root, tmp_path / "b", **over))
    assert first.fit(stop_at=3) is None
    assert load_checkpoint_file(str(tmp_path / "b" / "latest.pt"))["iteration"] == 3
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    random.seed(5)
    resumed = Trainer(tiny_cfg(syn_root, tmp_path / "b", **over, **{"train.resume": "auto"}))
    assert resumed.iteration == 3
    resumed.fit()
    a, b = _state_tensors(straight), _state_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(straight.loss_weights.weights(), resumed.loss_weights.weights())
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][name], sb[k][name])
    # and the straight run really moved (the comparison is not vacuous)
    fresh = Trainer(tiny_cfg(syn_root, tmp_path / "c", **over))
    assert any(not torch.equal(v, a[k]) for k, v in _state_tensors(fresh).items() if v.is_floating_point())


def _logged_lr(out_dir):
    from adapmtl.train.logging import read_log
    return {r["step"]: r["lr"] for r in read_log(os.path.join(out_dir, "log.jsonl")) if r["kind"] == "train"}


def test_resume_continues_the_lr_schedule_across_a_step_boundary(syn_root, tmp_path):
    """Stopped between two StepLR boundaries (3 and 6) and resumed: the scheduler's state, every logged lr and
    the weights equal an uninterrupted run's. A scheduler restarted at resume would decay at 4 + 3 = 7, not 6."""
    over = {"train.iterations": 8, "train.log_every": 1, "train.val_every": 100, "train.ckpt_every": 100,
            "optim.step_size": 3, "optim.gamma": 0.5}
    straight = Trainer(tiny_cfg(syn_root, tmp_path / "a", **over))
    straight.fit()
    first = Trainer(tiny_cfg(syn_root, tmp_path / "b", **over))
    assert first.fit(stop_at=4) is None
    resumed = Trainer(tiny_cfg(syn_root, tmp_path / "b", **over, **{"train.resume": "auto"}))
    assert resumed.iteration == 4 and resumed.scheduler.state_dict() == first.scheduler.state_dict()
    resumed.fit()
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    lr_a, lr_b = _logged_lr(tmp_path / "a"), _logged_lr(tmp_path / "b")
    assert sorted(lr_a) == sorted(lr_b) == list(range(1, 9))
    assert lr_b == lr_a
    assert [lr_a[i] for i in (1, 3, 6, 8)] == [2e-3, 1e-3, 5e-4, 5e-4]  # the schedule the comparison covers
    a, b = _state_tensors(straight), _state_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_results_describe_the_selected_checkpoint(syn_root, tmp_path):
    """finish() tests the selected (best) checkpoint: its results' sparsity is that checkpoint's, not the sparsity
    of the weights training ended with (which here differ: the thresholds keep moving after the selection)."""
    from adapmtl.train.checkpoint import load_trained

    tr = Trainer(tiny_cfg(syn_root, tmp_path, **{"train.select_sparsity_tol": 1.0, "train.val_every": 3}))
    assert tr.fit(stop_at=3) is None and tr.best_iteration == 3  # best.pt written at iteration 3
    data = tr._train_batches(tr.iteration)
    for _ in range(3):  # train on without validating: the final weights move away from the selected ones
        tr.train_step(next(data))
    final = adapmtl.sparsity_report(tr.model).overall
    selected = adapmtl.sparsity_report(load_trained(str(tmp_path / "best.pt")).model).overall
    assert abs(final - selected) > 1e-3  # the premise: the two differ
    res = tr.finish()
    assert res["selected"] == "best@3"
    assert res["sparsity"]["overall"] == pytest.approx(selected, abs=1e-12)


def test_resume_rejects_other_method(syn_root, tmp_path):
    tr = Trainer(tiny_cfg(syn_root, tmp_path))
    tr.save("latest.pt")
    with pytest.raises(ValueError, match="method"):
        Trainer(tiny_cfg(syn_root, tmp_path, method="dense", **{"train.resume": str(tmp_path / "latest.pt")}))


def test_atomic_save_never_leaves_a_corrupt_file(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    atomic_save({"x": torch.arange(4)}, path)

    def dying_save(obj, fh, *a, **k):  # the process dies half-way through writing
        fh.write(b"partial garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": torch.arange(8)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["x"], torch.arange(4))
    assert os.listdir(tmp_path) == ["latest.pt"]  # no temp file left behind


def test_fit_writes_logs_plots_results_and_selects_on_val(syn_root, tmp_path):
    # every checkpoint eligible (select_sparsity_tol 1): the selection below is on the val score alone
    cfg = tiny_cfg(syn_root, tmp_path, **{"train.plots": True, "train.tensorboard": True,
                                          "prune.target_sparsity": 0.05, "prune.s0": -4.0,
                                          "train.select_sparsity_tol": 1.0})
    res = Trainer(cfg).fit()
    for name in ("latest.pt", "best.pt", "log.jsonl", "log.csv", "results.json", "sparsity.txt", "config.yaml",
                 "sparsity_components.png", "task_weights.png", "layer_sparsity.png"):
        assert (tmp_path / name).exists(), name
    assert glob.glob(str(tmp_path / "tensorboard" / "events.*"))
    records = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in val] == [3, 6]
    keys = train[0].keys()
    for t in ("segment_semantic", "normal", "depth"):
        assert f"loss/{t}" in keys and f"loss_weight/{t}" in keys and f"sparsity/component/{t}" in keys
        assert f"threshold/{t}" in keys
    assert "sparsity/component/backbone" in keys and any(k.startswith("sparsity/layer/") for k in keys)
    assert res["selected"].startswith("best@") and set(res["test"]) == {"segment_semantic", "normal", "depth"}
    best_it = int(res["selected"].split("@")[1])
    best_val = max((r for r in val if r["val/eligible"] == 1.0), key=lambda r: r["val/score"])
    assert best_val["step"] == best_it
    assert 0.0 < res["sparsity"]["overall"] < 1.0


def test_from_dense_start(syn_root, tmp_path):
    dense = Trainer(tiny_cfg(syn_root, tmp_path / "dense", method="dense", **{"train.iterations": 2}))
    dense.fit()
    ckpt = str(tmp_path / "dense" / "latest.pt")
    tr = Trainer(tiny_cfg(syn_root, tmp_path / "sparse", **{"model.init_from": ckpt, "prune.s0": -7.5}))
    dense_state = load_checkpoint_file(ckpt)["model"]
    own = tr.model.state_dict()
    for k, v in dense_state.items():
        assert torch.equal(own[k], v), k
    assert all(float(s) == -7.5 for s in adapmtl.threshold_parameters(tr.model))


def test_delta_t_selection_needs_dense_results(syn_root, tmp_path):
    tr = Trainer(tiny_cfg(syn_root, tmp_path, **{"train.select": "delta_t"}))
    with pytest.raises(ValueError, match="dense_results"):
        tr.score({"metrics": {}, "loss": {}})


def test_bf16_autocast_step(syn_root, tmp_path):
    tr = Trainer(tiny_cfg(syn_root, tmp_path, **{"train.amp": "bf16"}))
    out = tr.train_step(next(tr._train_batches(0)))
    assert torch.isfinite(out["total"])


def test_trainer_rejects_bad_config():
    with pytest.raises(TypeError, match="cfg"):
        Trainer({"method": "adapmtl"})
