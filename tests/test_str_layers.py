"""STR layers, sparsify, sparsity reports and finalize."""
import copy

import pytest
import torch
from torch import nn

import adapmtl
from adapmtl.nn import STRConv2d, STRLinear, ThresholdGroup
from adapmtl.ops import soft_threshold_reference
from helpers import backend_device_pairs, param_backends

PAIRS = backend_device_pairs()


class TwoHeads(nn.Module):
    """A small multitask model: shared backbone, a conv head and a linear head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, dilation=2)
        )
        self.heads = nn.ModuleDict(
            {"seg": nn.Conv2d(8, 5, 1), "cls": nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))}
        )

    def components(self):
        return {"backbone": self.backbone, **self.heads}

    def forward(self, x):
        f = self.backbone(x)
        return {k: h(f) for k, h in self.heads.items()}


def model_and_input(seed=0):
    torch.manual_seed(seed)
    return TwoHeads().eval(), torch.randn(2, 3, 11, 13)


@param_backends(PAIRS)
@pytest.mark.parametrize("mode", ["component", "global", "layer"])
def test_sparsify_with_very_negative_init_keeps_outputs_exactly(backend, device, mode):
    model, x = model_and_input()
    model, x = model.to(device), x.to(device)
    before = model(x)
    adapmtl.sparsify(model, init=-1000.0, mode=mode, backend=backend)
    after = model(x)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_sparsify_keeps_parameters_and_converts_every_layer():
    model, _ = model_and_input()
    params = {name: p for name, p in model.named_parameters()}
    groups = adapmtl.sparsify(model, init=-5.0)
    assert set(groups) == {"backbone", "seg", "cls"}
    layers = dict(adapmtl.str_layers(model))
    assert set(layers) == {"backbone.0", "backbone.3", "heads.seg", "heads.cls.2"}
    assert isinstance(layers["heads.cls.2"], STRLinear) and isinstance(layers["heads.seg"], STRConv2d)
    for name, layer in layers.items():
        assert layer.weight is params[name + ".weight"] and layer.bias is params[name + ".bias"]
    assert layers["backbone.0"].s is layers["backbone.3"].s is groups["backbone"].s
    assert layers["heads.seg"].component == "seg"
    # BatchNorm untouched
    assert type(model.backbone[1]) is nn.BatchNorm2d


def test_state_dict_stores_each_threshold_once_and_round_trips():
    model, x = model_and_input()
    adapmtl.sparsify(model, init=-3.0)
    keys = [k for k in model.state_dict() if k.startswith("adapmtl_threshold") or k.endswith(".s")]
    assert sorted(keys) == sorted(f"adapmtl_threshold_{c}" for c in ("backbone", "seg", "cls"))
    assert len(adapmtl.threshold_parameters(model)) == 3
    # parameters() sees every threshold exactly once
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert all(any(p is s for p in model.parameters()) for s in adapmtl.threshold_parameters(model))

    other, _ = model_and_input(seed=1)
    adapmtl.sparsify(other, init=-9.0)
    other.load_state_dict(model.state_dict())
    for k in model(x):
        assert torch.equal(model(x)[k], other(x)[k])


def test_layer_mode_owns_one_threshold_per_layer():
    model, _ = model_and_input()
    groups = adapmtl.sparsify(model, mode="layer", init=-4.0)
    assert set(groups) == {"backbone.0", "backbone.3", "heads.seg", "heads.cls.2"}
    assert not [n for n, _ in model.named_parameters() if n.startswith("adapmtl_threshold")]
    keys = [k for k in model.state_dict() if k.endswith(".s")]
    assert sorted(keys) == sorted(f"{n}.threshold.s" for n in groups)


def test_global_mode_shares_one_threshold():
    model, _ = model_and_input()
    groups = adapmtl.sparsify(model, mode="global")
    assert list(groups) == ["global"]
    assert len({id(layer.s) for _, layer in adapmtl.str_layers(model)}) == 1


@param_backends(PAIRS)
@pytest.mark.parametrize("grad", ["exact", "ste"])
def test_component_threshold_gets_gradient_from_its_layers_only(backend, device, grad):
    model, x = model_and_input()
    model, x = model.to(device), x.to(device)
    groups = adapmtl.sparsify(model, init=-3.0, backend=backend, grad=grad)
    out = model(x)
    out["seg"].square().mean().backward()
    assert groups["backbone"].s.grad is not None and float(groups["backbone"].s.grad) != 0.0
    assert groups["seg"].s.grad is not None and float(groups["seg"].s.grad) != 0.0
    assert groups["cls"].s.grad is None  # the cls head did not take part in this loss

    # the backbone's s gradient equals the reference's summed over both backbone layers
    ref, _ = model_and_input()
    ref = ref.to(device)
    ref_groups = adapmtl.sparsify(ref, init=-3.0, backend="torch", grad=grad)
    ref(x)["seg"].square().mean().backward()
    torch.testing.assert_close(groups["backbone"].s.grad, ref_groups["backbone"].s.grad, rtol=1e-4, atol=1e-7)
    for (name, layer), (_, ref_layer) in zip(adapmtl.str_layers(model), adapmtl.str_layers(ref)):
        if layer.weight.grad is not None:
            torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_standalone_layers_match_nn_layers():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect")
    str_conv = STRConv2d.from_dense(conv, init=-1.0)
    x = torch.randn(2, 4, 9, 10)
    w_hat = soft_threshold_reference(conv.weight, str_conv.s)
    expected = nn.functional.conv2d(nn.functional.pad(x, (2, 2, 1, 1), mode="reflect"), w_hat, conv.bias, (2, 1), 0, (1, 2), 2)
    torch.testing.assert_close(str_conv(x), expected)
    assert int(str_conv.last_nnz) == int(torch.count_nonzero(w_hat))

    lin = STRLinear(7, 3, bias=False, init=-1.0)
    y = torch.randn(5, 7)
    torch.testing.assert_close(lin(y), y @ soft_threshold_reference(lin.weight, lin.s).T)

    group = ThresholdGroup(-1.5, name="shared")
    a, b = STRLinear(3, 3, threshold=group), STRConv2d(3, 3, 1, threshold=group)
    assert a.s is b.s is group.s and not a.owns_threshold
    assert "threshold" not in dict(a.named_children())
    assert [k for k in a.state_dict()] == ["weight", "bias"]


def test_layers_reject_bad_options():
    with pytest.raises(ValueError, match="'grad'"):
        STRLinear(2, 2, grad="sometimes")
    with pytest.raises(ValueError, match="'backend'"):
        STRConv2d(2, 2, 1, backend="fast")
    with pytest.raises(TypeError, match="'threshold'"):
        STRLinear(2, 2, threshold=nn.Parameter(torch.zeros(())))


def test_sparsify_rejects_bad_input():
    model, _ = model_and_input()
    with pytest.raises(ValueError, match="'mode'"):
        adapmtl.sparsify(model, mode="per-head")
    with pytest.raises(ValueError, match="not a submodule"):
        adapmtl.sparsify(model, groups={"x": nn.Conv2d(1, 1, 1)})
    with pytest.raises(ValueError, match="overlap"):
        adapmtl.sparsify(model, groups={"all": model, "seg": model.heads["seg"]})
    with pytest.raises(ValueError, match="no conv, linear"):
        adapmtl.sparsify(model, groups={"bn": model.backbone[1]})
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="lazy"):
        adapmtl.sparsify(lazy)
    adapmtl.sparsify(model)
    with pytest.raises(ValueError, match="already sparsified"):
        adapmtl.sparsify(model)


def test_sparsity_report_and_live_sparsity_agree_with_the_weights():
    model, x = model_and_input()
    adapmtl.sparsify(model, init=-2.0)
    adapmtl.reset_thresholds(model, -1.0)
    model(x)
    report = adapmtl.sparsity_report(model)
    live = adapmtl.live_sparsity(model)
    total = nnz = 0
    for row in report.layers:
        layer = model.get_submodule(row.name)
        expected = int(torch.count_nonzero(soft_threshold_reference(layer.weight, layer.s)))
        assert row.nnz == expected and row.numel == layer.weight.numel()
        assert float(live.layers[row.name]) == pytest.approx(1 - expected / row.numel)
        total, nnz = total + row.numel, nnz + expected
    assert report.overall == pytest.approx(1 - nnz / total)
    assert float(live.overall) == pytest.approx(report.overall)
    assert live.numel == total == report.numel
    for name, comp in report.components.items():
        assert float(live.components[name]) == pytest.approx(comp.sparsity)
        assert comp.threshold == pytest.approx(float(torch.sigmoid(torch.tensor(-1.0))))
    text = str(report)
    assert "overall" in text and "heads.seg" in text and "backbone" in text
    assert report.to_dict()["components"]["seg"]["numel"] == 8 * 5


def test_sparsity_report_counts_plain_layers_too():
    model, _ = model_and_input()
    with torch.no_grad():
        model.heads["seg"].weight[:2] = 0
    report = adapmtl.sparsity_report(model)
    assert report.components["seg"].nnz == 8 * 3 and report.components["seg"].threshold is None


def test_finalize_bakes_effective_weights():
    model, x = model_and_input()
    adapmtl.sparsify(model, init=-1.5)
    expected = model(x)
    report = adapmtl.sparsity_report(model)
    adapmtl.finalize(model)
    assert not adapmtl.str_layers(model) and not hasattr(model, "adapmtl_threshold_backbone")
    assert type(model.heads["seg"]) is nn.Conv2d and type(model.heads["cls"][2]) is nn.Linear
    got = model(x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert adapmtl.sparsity_report(model).overall == pytest.approx(report.overall)
    assert not any(k.endswith(".s") for k in model.state_dict())


def test_deepcopy_and_pickle_keep_threshold_sharing(tmp_path):
    model, x = model_and_input()
    adapmtl.sparsify(model, init=-2.0)
    clone = copy.deepcopy(model)
    assert clone.backbone[0].s is clone.adapmtl_threshold_backbone
    assert clone.backbone[0].s is not model.backbone[0].s
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.backbone[3].s is loaded.adapmtl_threshold_backbone
    torch.testing.assert_close(loaded(x)["seg"], model(x)["seg"])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_torch_compile_fullgraph_has_no_graph_break(backend):
    if backend not in adapmtl.ops.available_backends("cpu"):
        pytest.skip(f"{backend} not built")
    model, x = model_and_input()
    adapmtl.sparsify(model, init=-2.0, backend=backend)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    for k in eager:
        torch.testing.assert_close(out[k], eager[k])
    out["seg"].sum().backward()
    assert model.adapmtl_threshold_backbone.grad is not None
    assert int(model.heads["seg"].last_nnz) == int(torch.count_nonzero(model.heads["seg"].effective_weight()))


def test_torch_compile_inductor_with_cpp_kernel():
    if "cpp" not in adapmtl.ops.available_backends("cpu"):
        pytest.skip("cpp not built")
    torch._dynamo.reset()
    layer = STRLinear(16, 4, init=-2.0, backend="cpp")
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_inference_mode_forward_records_nnz():
    model, x = model_and_input()
    adapmtl.sparsify(model, init=-1.0)
    with torch.inference_mode():
        model(x)
    assert int(model.heads["seg"].last_nnz) == int(torch.count_nonzero(model.heads["seg"].effective_weight()))
