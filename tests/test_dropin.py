"""sparsify on models and loops a user brings (issue 30): nothing a model computes changes behind the user's back,
every kind of prunable weight is pruned (or named as left dense), bad input fails before anything changes, and
the public TargetSparsity reaches a target in a plain loop."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import adapmtl
from adapmtl.nn import SoftThreshold, STRLinear
from adapmtl.ops import soft_threshold_reference


def _no_warnings(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


# ---------------------------------------------------------------------------------------------- transformers
def _transformer(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(16, 3))


def _thresholded_copy(model):
    """The model with every soft-thresholded weight replaced by sign(w)·relu(|w| − g) in float64 math."""
    return adapmtl.finalize(copy.deepcopy(model))


def test_transformer_eval_under_no_grad_uses_the_thresholded_weights():
    """PyTorch's transformer fast path (eval + no_grad) reads linear1/linear2 and the attention weights directly:
    they are parametrized, so it computes with w_hat like the slow path and the finalized model."""
    model = _transformer()
    _no_warnings(adapmtl.sparsify, model, init=-3.5)
    assert 0.05 < adapmtl.sparsity_report(model).overall < 0.5  # the threshold really prunes
    model.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        fast = model(x)
    slow = model(x).detach()  # grad enabled: the slow path
    with torch.no_grad():
        dense = _thresholded_copy(model)(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    names = {p.name for p in adapmtl.pruned_weights(model)}
    for i in (0, 1):
        assert {f"1.layers.{i}.self_attn.in_proj_weight", f"1.layers.{i}.self_attn.out_proj",
                f"1.layers.{i}.linear1", f"1.layers.{i}.linear2"} <= names
    # and the report counts every attention weight (nothing of the encoder is left out)
    report = adapmtl.sparsity_report(model)
    assert not report.left_dense and report.numel == sum(
        p.numel() for n, p in _transformer().named_parameters() if p.dim() >= 2)


def test_trainer_evaluate_path_matches_the_training_forward():
    """What every validation loop does (eval + no_grad) equals the training-mode forward without dropout."""
    model = _transformer(1)
    adapmtl.sparsify(model, init=-3.0)
    x = torch.randn(3, 4, 8)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    torch.testing.assert_close(evaluated, model(x).detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- containers
def test_sequential_root_keeps_its_children_and_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    before = model(x)
    adapmtl.sparsify(model, init=-1000.0)
    assert len(model) == 3 and isinstance(model[0], STRLinear) and isinstance(model[2], STRLinear)
    assert torch.equal(model(x), before)
    assert [n for n, _ in model.named_parameters() if n.startswith("adapmtl")] == ["adapmtl_threshold_model"]
    single = nn.Sequential(nn.Linear(4, 4))
    adapmtl.sparsify(single)  # the case: the registry was called as a layer
    assert single(x).shape == (3, 4)


def test_a_bare_layer_is_parametrized_in_place():
    layer = nn.Linear(5, 3)
    x = torch.randn(2, 5)
    before = layer(x)
    adapmtl.sparsify(layer, init=-1000.0)
    assert torch.equal(layer(x), before) and parametrize.is_parametrized(layer, "weight")
    adapmtl.reset_thresholds(layer, -1.0)
    w = layer.parametrizations.weight.original
    torch.testing.assert_close(layer(x), nn.functional.linear(x, soft_threshold_reference(w, torch.tensor(-1.0)),
                                                              layer.bias))


# ---------------------------------------------------------------------------------------------- subclasses
class ScaledLinear(nn.Linear):
    """A user's subclass with its own forward."""

    def forward(self, x):
        return 0.5 * nn.functional.linear(x, self.weight, self.bias) + 1.0


def test_subclass_keeps_its_class_and_forward():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(4, 6)
    before = model(x)
    adapmtl.sparsify(model, init=-1000.0)
    assert isinstance(model[0], ScaledLinear) and not isinstance(model[0], STRLinear)
    assert torch.equal(model(x), before)  # "unchanged exactly", the docstring's promise
    adapmtl.reset_thresholds(model, -1.5)
    w = model[0].parametrizations.weight.original
    g = torch.tensor(-1.5)
    expected = 0.5 * nn.functional.linear(x, soft_threshold_reference(w, g), model[0].bias) + 1.0
    torch.testing.assert_close(model[0](x), expected)
    assert int(model[0].parametrizations.weight[0].last_nnz) == int(torch.count_nonzero(soft_threshold_reference(w, g)))


# ---------------------------------------------------------------------------------------------- every layer type
class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.bag = nn.EmbeddingBag(20, 8, mode="sum")
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c3 = nn.Conv3d(2, 3, 3, padding=1)
        self.t2 = nn.ConvTranspose2d(3, 4, 3, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)  # q/k/v_proj_weight
        self.head = nn.Linear(8, 4)

    def forward(self, tokens, vol, img, k, v):
        e = self.emb(tokens) + self.bag(tokens).unsqueeze(1)
        e = self.c1(e.transpose(1, 2)).transpose(1, 2)
        a, _ = self.attn(e, e, e)
        c, _ = self.cross(a, k, v)
        return {"seq": self.head(a + c), "vol": self.c3(vol), "img": self.t2(img)}


def _zoo_inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, 20, (2, 7), generator=g), torch.randn(1, 2, 4, 5, 6, generator=g),
            torch.randn(1, 3, 5, 6, generator=g), torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 5, generator=g))


ZOO_WEIGHTS = {"emb", "bag", "c1", "c3", "t2", "attn.in_proj_weight", "attn.out_proj", "cross.q_proj_weight",
               "cross.k_proj_weight", "cross.v_proj_weight", "cross.out_proj", "head"}


@pytest.mark.parametrize("mode", ["component", "layer"])
def test_every_layer_type_is_pruned_exactly(mode):
    torch.manual_seed(0)
    model, inputs = Zoo(), _zoo_inputs()
    before = model(*inputs)
    _no_warnings(adapmtl.sparsify, model, init=-1000.0, mode=mode)
    assert {p.name for p in adapmtl.pruned_weights(model)} == ZOO_WEIGHTS
    after = model(*inputs)
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapmtl.reset_thresholds(model, -2.5)  # g ≈ 0.076: prunes a share of every weight
    got = model(*inputs)
    want = _thresholded_copy(model)(*inputs)
    for k in got:
        torch.testing.assert_close(got[k], want[k], msg=k)
    report = adapmtl.sparsity_report(model)
    rows = {r.name: r for r in report.layers}
    assert set(rows) == ZOO_WEIGHTS and not report.left_dense
    for p in adapmtl.pruned_weights(model):
        expected = int(torch.count_nonzero(soft_threshold_reference(p.originals()[0].detach(), p.unit.s.detach())))
        assert rows[p.name].nnz == expected and 0 < expected < rows[p.name].numel, p.name
        assert rows[p.name].kind == {"emb": "embedding", "bag": "embedding", "attn.in_proj_weight": "attention",
                                     "cross.q_proj_weight": "attention", "cross.k_proj_weight": "attention",
                                     "cross.v_proj_weight": "attention", "head": "linear", "attn.out_proj": "linear",
                                     "cross.out_proj": "linear"}.get(p.name, "conv")
    live = adapmtl.live_sparsity(model)
    assert float(live.overall) == pytest.approx(report.overall)
    # gradients reach every threshold and every weight through the parametrizations
    sum(v.square().mean() for v in got.values()).backward()
    assert all(s.grad is not None and float(s.grad) != 0.0 for s in adapmtl.threshold_parameters(model))
    # state_dict round trip into a fresh sparsified copy, and finalize leaves plain weights
    fresh = Zoo()
    adapmtl.sparsify(fresh, init=-7.0, mode=mode)
    fresh.load_state_dict(model.state_dict())
    again = fresh(*inputs)
    assert all(torch.equal(got[k], again[k]) for k in got)
    adapmtl.finalize(fresh)
    assert not adapmtl.pruned_weights(fresh) and not any(parametrize.is_parametrized(m) for m in fresh.modules())
    final = fresh(*inputs)
    for k in got:
        torch.testing.assert_close(final[k], got[k])


def test_finalizing_a_copy_leaves_the_original_working():
    """PyTorch's deepcopy of a parametrized module shares its class, whose properties remove_parametrizations
    deletes; export_sparse and export_onnx finalize copies, so finalize must not touch the original's class."""
    torch.manual_seed(0)
    model, inputs = Zoo(), _zoo_inputs()
    adapmtl.sparsify(model, init=-2.5)
    want = model(*inputs)
    dense = adapmtl.finalize(copy.deepcopy(model))
    got, again = dense(*inputs), model(*inputs)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
        assert torch.equal(again[k], want[k])
    assert len(adapmtl.pruned_weights(model)) == len(ZOO_WEIGHTS)


def test_weights_left_dense_are_named_in_a_warning_and_the_report():
    model = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8, batch_first=True))
    model.pos = nn.Parameter(torch.randn(5, 8))
    with pytest.warns(UserWarning, match=r"left dense: pos, 1.weight_ih_l0, 1.weight_hh_l0, 552 weights"):
        adapmtl.sparsify(model)
    report = adapmtl.sparsity_report(model)
    assert [d.name for d in report.left_dense] == ["pos", "1.weight_ih_l0", "1.weight_hh_l0"]
    assert all("not a conv, linear" in d.reason for d in report.left_dense)
    assert report.numel == 4 * 8  # 'overall' covers the pruned layer only, and says the rest is outside it
    assert "left dense, outside 'overall'" in report.table()


def test_a_user_parametrization_comes_before_the_threshold():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 4)), nn.Linear(4, 2))
    x = torch.randn(3, 6)
    before = model(x)
    adapmtl.sparsify(model, init=-1000.0)
    assert torch.equal(model(x), before)
    chain = model[0].parametrizations.weight
    assert isinstance(chain[-1], SoftThreshold) and len(chain) == 2
    adapmtl.reset_thresholds(model, -1.0)
    report = adapmtl.sparsity_report(model)
    assert not report.left_dense and report.layers[0].nnz == int(torch.count_nonzero(model[0].weight))
    out = model(x)
    adapmtl.finalize(model)
    torch.testing.assert_close(model(x), out)


# ---------------------------------------------------------------------------------------------- clear errors
def test_a_model_pruned_by_torch_is_refused_and_left_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"layer '1' was pruned with torch.nn.utils.prune.*prune.remove"):
        adapmtl.sparsify(model)
    assert type(model[0]) is nn.Linear and not adapmtl.pruned_weights(model)
    assert not [n for n, _ in model.named_parameters() if n.startswith("adapmtl")]
    prune.remove(model[1], "weight")
    adapmtl.sparsify(model)  # after the fix the same call works
    assert len(adapmtl.str_layers(model)) == 2


@pytest.mark.parametrize("init", [float("nan"), float("inf"), -float("inf"), "-4", True])
def test_init_must_be_a_finite_number(init):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="argument 'init' must be a finite number"):
        adapmtl.sparsify(model, init=init)
    assert type(model[0]) is nn.Linear


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_backend_that_cannot_run_fails_at_sparsify_not_at_the_first_forward():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises((ValueError, RuntimeError), match=r"sparsify: argument 'backend'.*cuda"):
        adapmtl.sparsify(model, backend="cuda")
    assert type(model[0]) is nn.Linear and not adapmtl.pruned_weights(model)


# ---------------------------------------------------------------------------------------------- TargetSparsity
def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _plain_loop(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95])
@pytest.mark.parametrize("init,optimizer", [(-15.0, "adam"), (-6.0, "adam"), (-15.0, "sgd"), (-4.0, "sgd")])
def test_target_sparsity_reaches_the_target_in_a_plain_loop(target, init, optimizer):
    torch.manual_seed(0)
    model = _cnn()
    adapmtl.sparsify(model, init=init)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4) if optimizer == "adam" else
           torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4))
    ctl = adapmtl.TargetSparsity(model, opt, target=target, total_steps=150)
    _plain_loop(model, opt, 150)
    assert ctl.step_count == 150 and ctl.last.phase == "hold"
    assert adapmtl.sparsity_report(model).overall == pytest.approx(target, abs=0.005)
    # the thresholds were moved into a group of their own without weight decay
    group = next(g for g in opt.param_groups if any(p is adapmtl.threshold_parameters(model)[0] for p in g["params"]))
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 1


def test_target_sparsity_resumes_exactly():
    def make():
        torch.manual_seed(0)
        model = _cnn()
        adapmtl.sparsify(model, init=-8.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return model, opt, adapmtl.TargetSparsity(model, opt, target=0.8, total_steps=40)

    model, opt, ctl = make()
    _plain_loop(model, opt, 40)
    first, opt1, ctl1 = make()
    _plain_loop(first, opt1, 20)
    state = {"model": first.state_dict(), "opt": opt1.state_dict(), "ctl": ctl1.state_dict()}
    resumed, opt2, ctl2 = make()
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    ctl2.load_state_dict(state["ctl"])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # the same batches as the uninterrupted run's last 20
        torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
    for _ in range(20):
        x, y = torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = nn.functional.cross_entropy(resumed(x), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    assert ctl2.state_dict() == ctl.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_target_sparsity_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="call adapmtl.sparsify"):
        adapmtl.TargetSparsity(_cnn(), target=0.9, total_steps=10)
    model = _cnn()
    adapmtl.sparsify(model)
    with pytest.raises(ValueError, match="does not update 1 of the model's 1 thresholds"):
        adapmtl.TargetSparsity(model, torch.optim.SGD(model[0].parameters(), lr=0.1), target=0.9, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        adapmtl.TargetSparsity(model, target=0.9, total_steps=0)
    with pytest.raises(ValueError, match="target"):
        adapmtl.TargetSparsity(model, target=1.5, total_steps=10)
    assert math.isfinite(float(adapmtl.threshold_parameters(model)[0].detach()))


# ---------------------------------------------------------------------------------------------- the Trainer
class MyNet(nn.Module):
    """A user's multitask model: not built from a config."""

    def __init__(self):
        super().__init__()
        from adapmtl.models import build_model
        self.net = build_model("tiny", tasks=["segment_semantic", "normal", "depth"], dataset="nyuv2", head_channels=4)
        self.tasks = list(self.net.tasks)

    def forward(self, x):
        return self.net(x)


def _trainer_cfg(root, out_dir, **over):
    from helpers import tiny_run_config
    return tiny_run_config(root, out_dir, {
        "seed": 0, "data": {"n_train": 8, "n_test": 4, "batch_size": 4, "eval_batch_size": 4, "val_fraction": 0.25},
        "prune": {"s0": -4.0, "target_sparsity": 0.5},
        "train": {"iterations": 2, "log_every": 1, "val_every": 2, "ckpt_every": 2},
    }, over)


def test_trainer_with_your_model_end_to_end(synthetic_scenes, tmp_path, capsys):
    from adapmtl.cli import main
    from adapmtl.train import Trainer, load_checkpoint_file, load_trained
    from adapmtl.train.checkpoint import CheckpointError

    cfg = _trainer_cfg(synthetic_scenes(8, 4), tmp_path / "run")
    torch.manual_seed(0)
    tr = Trainer(cfg, model=MyNet())
    results = tr.fit()
    assert results["sparsity"]["overall"] > 0 and adapmtl.pruned_weights(tr.model)
    head = (tmp_path / "run" / "config.yaml").read_text().splitlines()[0]
    assert head.startswith("# model: ") and "MyNet" in head and "was not used" in head
    ckpt = str(tmp_path / "run" / "latest.pt")
    with pytest.raises(CheckpointError, match=r"latest.pt: its model \(.*MyNet\) was given to Trainer"):
        load_trained(ckpt)
    for argv in (["eval", "--checkpoint", ckpt], ["export", "--checkpoint", ckpt, "--out", str(tmp_path / "m.st")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "given to Trainer(model=...)" in err, err
    # the documented way back: build it, convert it as the run did, load the checkpoint's weights
    model = MyNet()
    adapmtl.sparsify(model, init=cfg.prune.s0)
    model.load_state_dict(load_checkpoint_file(ckpt)["model"])
    model.eval()
    tr.model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want, got = tr.model(x), model(x)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_trainer_refuses_a_sparsified_model_and_says_what_to_do(synthetic_scenes, tmp_path):
    from adapmtl.train import Trainer

    model = MyNet()
    adapmtl.sparsify(model)
    with pytest.raises(ValueError, match="already sparsified; give it dense: method 'adapmtl' converts it itself"):
        Trainer(_trainer_cfg(synthetic_scenes(8, 4), tmp_path), model=model)


def test_eval_refuses_a_run_on_given_datasets(synthetic_scenes, tmp_path, capsys):
    from adapmtl.cli import main
    from adapmtl.train import Trainer
    from adapmtl.train.build import build_datasets

    cfg = _trainer_cfg(synthetic_scenes(8, 4), tmp_path / "run")
    sets = build_datasets(cfg)
    Trainer(cfg, train_set=sets["train"], val_set=sets["val"], test_set=sets["test"]).fit()
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("# data: datasets given to Trainer")
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "latest.pt")]) == 2
    assert "trained on datasets given to Trainer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- export, compile
def test_save_exported_points_other_models_to_pt2(tmp_path):
    model = _transformer()
    with pytest.raises(ValueError, match="export such a model with adapmtl.interchange.export_pt2"):
        adapmtl.save_exported(model, tmp_path / "m.safetensors")


def _exported_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    adapmtl.sparsify(model, init=-1.2)  # g ≈ 0.23: most weights pruned
    return adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover")


def test_exported_models_compile_fullgraph():
    fast = _exported_cnn()
    assert sum(isinstance(m, adapmtl.nn.SPARSE_LAYER_TYPES) for m in fast.modules()) == 3
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True)
    for batch in (2, 3):  # the linear layer's output layout matches its fake kernel at any batch
        x = torch.randn(batch, 3, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fast(x))


def test_pt2_takes_any_batch(tmp_path):
    from adapmtl.interchange import export_pt2

    fast = _exported_cnn()
    program = export_pt2(fast, torch.randn(1, 3, 6, 6), tmp_path / "m.pt2")  # traced from a batch of 1
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), fast(x))
    fixed = export_pt2(fast, torch.randn(2, 3, 6, 6), tmp_path / "f.pt2", dynamic_batch=False)
    with pytest.raises(Exception, match="2"):
        fixed.module()(torch.randn(3, 3, 6, 6))
    assert program is not None


# ---------------------------------------------------------------------------------------------- small ones
def test_adapmtl_train_after_a_plain_import():
    import subprocess
    import sys

    code = "import adapmtl; print(adapmtl.train.load_trained.__name__, adapmtl.baselines.build_method.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split() == ["load_trained", "build_method"], done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapmtl.nope  # noqa: B018


def test_layer_threshold_names_the_shared_group():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    groups = adapmtl.sparsify(model)
    assert model[0].threshold is model[1].threshold is groups["model"]
    own = nn.Sequential(nn.Linear(3, 3))
    adapmtl.sparsify(own, mode="layer")
    assert own[0].threshold is own[0].threshold_group and own[0].owns_threshold


def test_cli_bench_without_a_name_lists_them(capsys):
    from adapmtl.cli import main

    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "adapmtl bench <name> [--quick]" in err and "soft_threshold" in err


def test_cli_onnx_without_its_extra_is_one_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    from adapmtl.cli import main
    from helpers import tiny_demo_overrides

    monkeypatch.chdir(tmp_path)
    assert main(["train", "-c", "demo", *tiny_demo_overrides(tmp_path / "data")]) == 0
    ckpt = str(tmp_path / "runs" / "demo" / "latest.pt")
    # onnxscript made unimportable in a child process: the CLI says so in one line, exit 2
    code = ("import sys; sys.modules['onnxscript'] = None; from adapmtl.cli import main; "
            f"sys.exit(main(['export', '--checkpoint', {ckpt!r}, '--out', 'm.onnx', '--format', 'onnx']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "pip install onnx onnxscript" in done.stderr, done.stderr
