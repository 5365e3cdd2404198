"""Models of SPEC §4: exact weight counts, shapes, components, init, checkpoints, sparsify modes."""
import pytest
import torch
from torch import nn

from adapmtl.models import (
    ASPPHead,
    DeepLabResNet34,
    MobileNetV2Backbone,
    MultiTaskModel,
    TinyBackbone,
    build_model,
    count_conv_weights,
    load_checkpoint,
)
from adapmtl.tasks import NYUV2_TASKS, TASKONOMY_TASKS, TaskSpec


def _convs(m):
    return [x for x in m.modules() if isinstance(x, nn.Conv2d)]


def test_backbone_conv_counts():
    with torch.device("meta"):
        r, m = DeepLabResNet34(), MobileNetV2Backbone()
    assert len(_convs(r)) == 36 and count_conv_weights(r) == 21_267_648
    assert len(_convs(m)) == 52 and count_conv_weights(m) == 2_189_760


def test_full_nyuv2_model_counts():
    with torch.device("meta"):
        r = build_model("resnet34", NYUV2_TASKS)
        m = build_model("mobilenetv2", NYUV2_TASKS)
    assert count_conv_weights(r) == 90_653_888
    assert count_conv_weights(m) == 156_510_656
    # heads carry ~75% / ~98% of the prunable weights (SPEC §4)
    heads_r = sum(count_conv_weights(h) for h in r.heads.values())
    assert 0.74 < heads_r / 90_653_888 < 0.78
    assert count_conv_weights(m.heads["normal"]) == 4 * (9 * 1280 * 1024 + 1024**2 + 1024 * 3)


def test_resnet_output_stride_and_structure():
    r = DeepLabResNet34().eval()
    with torch.no_grad():
        assert r(torch.randn(1, 3, 321, 321)).shape == (1, 512, 41, 41)
    assert isinstance(r.maxpool, nn.MaxPool2d) and r.maxpool.ceil_mode
    # dilation = padding on every 3x3 conv; stage dilations 1, 1, 2, 4
    for stage, dil in ((r.layer1, 1), (r.layer2, 1), (r.layer3, 2), (r.layer4, 4)):
        for c in _convs(stage):
            if c.kernel_size == (3, 3):
                assert c.dilation == (dil, dil) and c.padding == (dil, dil)
    assert all(c.bias is None for c in _convs(r))


def test_mobilenet_output_and_odd_size():
    m = MobileNetV2Backbone().eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1280, 2, 2)
        assert m(torch.randn(1, 3, 45, 71)).shape[1] == 1280


def test_init_matches_authors():
    torch.manual_seed(0)
    r = DeepLabResNet34()
    w = torch.cat([c.weight.flatten() for c in _convs(r)])
    assert abs(w.std().item() - 0.01) < 2e-4 and abs(w.mean().item()) < 2e-4
    m = MobileNetV2Backbone()
    last = m.features[-1][0]  # 1x1 conv 320 -> 1280, He-normal fan_out: std = sqrt(2 / 1280)
    assert abs(last.weight.std().item() - (2 / 1280) ** 0.5) / (2 / 1280) ** 0.5 < 0.02
    for bn in (x for x in r.modules() if isinstance(x, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # heads keep PyTorch's default init: kaiming_uniform(a=sqrt(5)) -> |w| <= 1/sqrt(fan_in)
    h = ASPPHead(16, 3, head_channels=8)
    c = h.branches[0][0]
    bound = 1 / (16 * 9) ** 0.5
    assert c.weight.abs().max() <= bound and c.weight.abs().max() > 0.8 * bound


def test_aspp_head_structure_and_sum():
    h = ASPPHead(6, 5, head_channels=7, dilations=(1, 2), dropout=0.0).eval()
    x = torch.randn(2, 6, 9, 11)
    out = h(x)
    assert out.shape == (2, 5, 9, 11)
    torch.testing.assert_close(out, h.branches[0](x) + h.branches[1](x))
    assert [b[0].dilation for b in h.branches] == [(1, 1), (2, 2)]
    assert all(b[0].padding == b[0].dilation for b in h.branches)
    assert count_conv_weights(h) == 2 * (9 * 6 * 7 + 7 * 7 + 7 * 5)
    for bad in (dict(head_channels=0), dict(dilations=()), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            ASPPHead(6, 5, **bad)


def test_multitask_forward_subset_and_components():
    torch.manual_seed(0)
    model = build_model("tiny", {"segment_semantic": 40, "normal": 3, "depth": 1}).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "segment_semantic": (2, 40, 8, 8), "normal": (2, 3, 8, 8), "depth": (2, 1, 8, 8)}
    sub = model(x, tasks=["depth"])
    assert list(sub) == ["depth"]
    torch.testing.assert_close(sub["depth"], out["depth"])
    comps = model.components()
    assert list(comps) == ["backbone", "segment_semantic", "normal", "depth"]
    assert comps["backbone"] is model.backbone and comps["normal"] is model.heads["normal"]
    assert model.tasks == ["segment_semantic", "normal", "depth"]
    with pytest.raises(ValueError, match="unknown"):
        model(x, tasks=["edges"])
    # odd, non-contiguous input
    xo = torch.randn(1, 3, 70, 45).transpose(2, 3)
    assert model(xo)["normal"].shape[1] == 3


def test_multitask_rejects_bad_heads():
    bb = TinyBackbone()
    with pytest.raises(ValueError, match="backbone"):
        MultiTaskModel(bb, {"backbone": nn.Conv2d(64, 1, 1)})
    with pytest.raises(TypeError):
        MultiTaskModel(bb, {})
    with pytest.raises(TypeError):
        MultiTaskModel("resnet", {"a": nn.Conv2d(64, 1, 1)})
    with pytest.raises(TypeError):
        MultiTaskModel(bb, {"a": "head"})


def test_build_model_taskonomy_and_errors():
    with torch.device("meta"):
        m = build_model("resnet34", TASKONOMY_TASKS)
    assert m.tasks == [t.name for t in TASKONOMY_TASKS]
    assert m.heads["segment_semantic"].out_channels == 17
    with pytest.raises(ValueError, match="backbone"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="head"):
        build_model("tiny", head="fpn")
    with pytest.raises(TypeError):
        build_model("tiny", tasks=42)
    with pytest.raises(ValueError):
        TaskSpec("normal", 4, "normal")


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    a = build_model("tiny").eval()
    b = build_model("tiny").eval()
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a(x)["depth"], b(x)["depth"])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"module." + k: v for k, v in a.state_dict().items()}, "iteration": 5}, path)
    load_checkpoint(b, path)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(b, tmp_path / "nothing.pt")
    with pytest.raises(RuntimeError):  # a checkpoint of another model fails loudly
        load_checkpoint(b, build_model("tiny", {"depth": 1}).state_dict() | {"extra": torch.zeros(1)})


@pytest.mark.parametrize("mode", ["component", "global", "layer"])
def test_sparsify_uses_components(mode):
    import adapmtl

    model = build_model("tiny", head_channels=8)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    created = adapmtl.sparsify(model, init=-1000.0, mode=mode)
    if mode == "component":
        assert list(created) == ["backbone", "segment_semantic", "normal", "depth"]
    elif mode == "global":
        assert len(created) == 1
    else:
        assert len(created) == n_layers
    out = model(torch.randn(2, 3, 32, 32))
    sum(v.float().mean() for v in out.values()).backward()
