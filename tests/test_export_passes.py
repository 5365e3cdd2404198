"""The sparse export's graph passes (adapmtl/export_passes.py): BatchNorm folded into the conv before it equals the
unfolded model (float64 to rounding, float32 within PyTorch's own error), keeps every zero, and leaves alone what
it cannot fold."""
import pytest
import torch
from torch import nn

import adapmtl
from adapmtl.export_passes import conv_bn_pairs, fold_batchnorm
from adapmtl.models import build_model
from helpers import assert_close_to_reference


def _random_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


@pytest.mark.parametrize("backbone", ["tiny", "mobilenetv2"])
def test_every_batchnorm_of_the_models_folds_exactly(backbone):
    torch.manual_seed(0)
    model = _random_bn(build_model(backbone, tasks=["segment_semantic", "depth"], dataset="nyuv2"))
    adapmtl.sparsify(model, init=-4.5)
    model = adapmtl.finalize(model).eval().double()
    sparsity = {n: float((m.weight == 0).double().mean()) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    folded = fold_batchnorm(model, {"tasks": None})
    assert len(folded) == n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        got = model(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    for name, m in model.named_modules():  # a per-channel scale keeps every zero
        if isinstance(m, nn.Conv2d):
            assert float((m.weight == 0).double().mean()) == sparsity[name], name


def _block():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))


def test_float32_folding_is_within_pytorchs_own_error():
    torch.manual_seed(1)
    model = _random_bn(_block()).eval()
    x = torch.randn(4, 3, 17, 19)
    with torch.no_grad():
        ref = _random_bn(_block()).eval()
        ref.load_state_dict(model.state_dict())
        want64 = ref.double()(x.double())
        unfolded = model(x)
    assert fold_batchnorm(model) == [("0", "1"), ("3", "4")]
    with torch.no_grad():
        got = model(x)
    assert_close_to_reference(got, want64, unfolded, scale=want64.abs() + 1, msg="folded float32")


class Shared(nn.Module):
    """Patterns that must not fold: a conv output read twice, a conv called twice, a BN after a non-conv, a BN
    without running statistics."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.pool_bn = nn.BatchNorm2d(4)
        self.batch_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.bn_a(y) + y                     # y is read twice
        w = self.bn_b(self.b(z)) + self.b(z)     # b is called twice
        v = self.pool_bn(torch.relu(w))          # after a non-conv
        return self.batch_stats(self.c(v))       # no running statistics


def test_what_cannot_fold_is_left_as_it_was():
    torch.manual_seed(0)
    model = _random_bn(Shared()).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
    assert conv_bn_pairs(model) == [("c", "batch_stats")]  # the data flow allows it; the statistics do not
    assert fold_batchnorm(model) == []
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    with torch.no_grad():
        assert torch.equal(model(x), want)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


def test_an_untraceable_model_is_not_changed():
    model = Untraceable().eval()
    assert fold_batchnorm(model) is None and isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())


def test_export_sparse_folds_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _random_bn(build_model("tiny", tasks=["segment_semantic", "normal", "depth"], dataset="nyuv2"))
    adapmtl.sparsify(model, init=-3.0)
    model.eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        want = adapmtl.finalize(__import__("copy").deepcopy(model))(x)
    fast = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover")
    assert fast.folded_batchnorm and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, adapmtl.nn.SparseConv2d) for m in fast.modules()) > 0
    adapmtl.save_exported(fast, tmp_path / "m.safetensors")
    loaded = adapmtl.load_exported(tmp_path / "m.safetensors")
    with torch.no_grad():
        got, again = fast(x), loaded(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
        assert torch.equal(again[k], got[k])
    kept = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", fold_bn=False)
    assert kept.folded_batchnorm == [] and any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
