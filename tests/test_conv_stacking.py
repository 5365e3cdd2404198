"""The export pass that stacks sparse convs reading one tensor (adapmtl.export_stacking) and the packed weights'
row concatenation under it (SparseWeight.cat_rows): which convs stack and which must not, the stacked model
against the unstacked one (float64 to rounding, float32 within PyTorch's own error) at the export's input size
and others (dead taps trimmed alike), the export file, torch.export / AOTInductor, and export_sparse's timed
choice."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapmtl
from adapmtl.export_format import default_concrete_args
from adapmtl.export_stacking import stack_parallel_convs, stacked_conv
from adapmtl.models import build_model
from adapmtl.nn import SparseConv2d
from adapmtl.ops.sparse_conv import SparseWeight, available_sparse_backends

HAS_CPP = "cpp" in available_sparse_backends("cpu")


def _sw(shape, density=0.2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < density)
    return SparseWeight.from_dense(w.to(dtype))


def test_cat_rows_is_the_dense_weights_concatenated():
    parts = [_sw((c, 5, 3, 3), density=d, seed=c) for c, d in ((3, 0.3), (1, 0.0), (6, 0.9), (2, 0.5))]
    got = SparseWeight.cat_rows(parts)
    assert got.shape == (12, 5, 3, 3) and got.row_ptr.dtype == torch.int32
    assert torch.equal(got.to_dense(), torch.cat([p.to_dense() for p in parts]))
    linear = [_sw((4, 7), seed=1), _sw((2, 7), seed=2)]
    assert torch.equal(SparseWeight.cat_rows(linear).to_dense(), torch.cat([p.to_dense() for p in linear]))


def test_cat_rows_refuses_what_does_not_stack():
    with pytest.raises(TypeError, match="'weights'"):
        SparseWeight.cat_rows([])
    with pytest.raises(TypeError, match="'weights'"):
        SparseWeight.cat_rows([_sw((2, 3, 1, 1)), torch.zeros(2, 3, 1, 1)])
    with pytest.raises(ValueError, match="cannot be stacked"):
        SparseWeight.cat_rows([_sw((2, 3, 3, 3)), _sw((2, 3, 1, 1))])
    with pytest.raises(ValueError, match="cannot be stacked"):
        SparseWeight.cat_rows([_sw((2, 3, 1, 1)), _sw((2, 3, 1, 1), dtype=torch.float64)])


def _conv(cin, cout, k=3, dilation=1, clamp=None, bias=True, seed=0, dtype=torch.float32):
    sw = _sw((cout, cin, k, k), seed=seed, dtype=dtype)
    b = torch.randn(cout, dtype=dtype) if bias else None
    return SparseConv2d(sw, b, padding=dilation * (k // 2), dilation=dilation, clamp=clamp)


class Heads(nn.Module):
    """Convs on one tensor: two groups that stack, and every reason not to."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        c = 6
        self.stem = nn.Conv2d(3, c, 3, padding=1).to(dtype)
        self.a = nn.ModuleList(_conv(c, o, 3, 4, (0.0, None), seed=o, dtype=dtype) for o in (5, 7, 4))  # stack
        self.b = nn.Sequential(_conv(c, 3, 1, seed=11, dtype=dtype), nn.ReLU6(), _conv(3, 2, 1, seed=9, dtype=dtype))
        self.b2 = _conv(c, 4, 1, seed=12, dtype=dtype)  # stacks with b[0]
        self.other_clamp = _conv(c, 5, 3, 4, (0.0, 6.0), seed=13, dtype=dtype)  # its epilogue differs from a's
        self.no_bias = _conv(c, 5, 3, 4, (0.0, None), bias=False, seed=14, dtype=dtype)
        self.residual = _conv(c, c, 3, 1, seed=15, dtype=dtype)  # called with a residual
        self.twice = _conv(c, c, 3, 1, seed=16, dtype=dtype)  # called twice
        self.dilated = _conv(c, 5, 3, 2, (0.0, None), seed=17, dtype=dtype)  # another geometry

    def forward(self, x):
        f = self.stem(x)
        outs = [m(f) for m in self.a]
        y = self.b(f)
        return {"a": torch.cat(outs, 1), "b": y, "b2": self.b2(f), "clamp": self.other_clamp(f),
                "no_bias": self.no_bias(f), "res": self.residual(f, f), "twice": self.twice(self.twice(f)) + self.twice(f),
                "dilated": self.dilated(f)}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stacking_groups_what_reads_one_tensor_with_one_geometry(dtype, tmp_path):
    torch.manual_seed(0)
    model = Heads(dtype).eval()
    x = torch.randn(2, 3, 11, 9, dtype=dtype)
    want = model(x)
    stacked = copy.deepcopy(model)
    report = stack_parallel_convs(stacked, None)
    assert sorted(sorted(e["convs"]) for e in report) == [["a.0", "a.1", "a.2"], ["b.0", "b2"]]
    assert all(e["stacked"] and e["module"].startswith("stacked_conv_") for e in report)
    assert isinstance(stacked, Heads) and type(stacked) is not Heads
    assert all(type(stacked.get_submodule(n)) is nn.Identity for e in report for n in e["convs"])
    assert isinstance(stacked.twice, SparseConv2d) and isinstance(stacked.other_clamp, SparseConv2d)
    with pytest.raises(Exception):  # pickling by name would revive the unstacked forward: it fails instead
        pickle.dumps(stacked)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for size, last in (((11, 9), False), ((3, 4), False), ((20, 17), True)):  # (3, 4): dilation 4 reads padding
        xi = torch.randn(2, 3, *size, dtype=dtype)  # at every tap but the centre; True: channels-last
        xi = xi.contiguous(memory_format=torch.channels_last) if last else xi
        ref, got = model(xi), stacked(xi)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], **tol, msg=k)
    got = stacked(x)
    assert torch.equal(model(x)["a"], want["a"])  # the model given is not changed
    adapmtl.save_exported(stacked, tmp_path / "s.safetensors")
    back = adapmtl.load_exported(tmp_path / "s.safetensors")(x)
    for k in want:
        assert torch.equal(back[k], got[k]), k
    assert isinstance(copy.deepcopy(stacked).get_submodule(report[0]["module"]), SparseConv2d)


@torch.no_grad()
def test_declined_groups_and_untraceable_models_are_left_as_they_were():
    model = Heads().eval()
    seen = []
    report = stack_parallel_convs(model, None, decide=lambda names, conv: (seen.append((names, conv)) or False,
                                                                           {"why": "no"}))
    assert [e["stacked"] for e in report] == [False, False] and all(e["why"] == "no" and e["module"] is None
                                                                    for e in report)
    assert type(model) is Heads and isinstance(model.a[0], SparseConv2d)
    assert not any(n.startswith("stacked_conv") for n, _ in model.named_modules())
    names, conv = seen[0]
    assert conv.out_channels == sum(model.get_submodule(n).out_channels for n in names)

    class Untraceable(Heads):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.a[0](x)
            return self.a[1](x)

    odd = Untraceable().eval()
    assert stack_parallel_convs(odd, None) is None and type(odd) is Untraceable


def test_stacked_conv_is_its_members_side_by_side():
    members = [_conv(4, o, 3, 2, (0.0, None), seed=o, dtype=torch.float64) for o in (3, 1, 5)]
    conv = stacked_conv(members)
    x = torch.randn(1, 4, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), torch.cat([m(x) for m in members], 1), rtol=1e-12, atol=1e-12)
    assert (conv.dilation, conv.padding, conv.clamp, conv.out_channels) == ((2, 2), (2, 2), (0.0, None), 9)


def _multitask():
    torch.manual_seed(0)
    model = build_model("tiny", tasks=["segment_semantic", "normal", "depth"], dataset="nyuv2")
    adapmtl.sparsify(model, init=-3.0)
    return model.eval()


@torch.no_grad()
def test_export_sparse_stacks_the_heads_where_it_measured_faster(tmp_path):
    model = _multitask()
    x = torch.randn(1, 3, 40, 40)
    plain = adapmtl.export_sparse(model, min_sparsity=0.0, policy="time", example_input=x, stack=False)
    assert plain.stacked_convs is None
    assert adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover").stacked_convs is None
    out = adapmtl.export_sparse(model, min_sparsity=0.0, policy="time", example_input=x, repeats=3)
    assert out.stacked_convs, "the three heads' first convs read one tensor: there are groups to time"
    for group in out.stacked_convs:
        assert group["stacked"] == (group["stacked_s"] < group["separate_s"])
        assert len(group["convs"]) >= 2 and all(c.startswith("heads.") for c in group["convs"])
    into = {e["layer"]: e.get("stacked_into") for e in out.sparse_export_report}
    for group in out.stacked_convs:
        assert all(into[c] == group["module"] for c in group["convs"])
    # the decisions timed apart can differ between exports: stack every group of the plain export to compare
    every = copy.deepcopy(plain)
    assert all(e["stacked"] for e in stack_parallel_convs(every, default_concrete_args(every)))
    want, got = plain(x), every(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    adapmtl.save_exported(every, tmp_path / "m.safetensors")
    back = adapmtl.load_exported(tmp_path / "m.safetensors")(x)
    for k in want:
        assert torch.equal(back[k], got[k])
    assert stack_parallel_convs(every, default_concrete_args(every)) == []  # a rewritten forward traces again
    with pytest.raises(TypeError, match="'stack'"):
        adapmtl.export_sparse(model, stack="yes")


@torch.no_grad()
def test_passes_over_a_rewritten_forward_leave_fx_working():
    """A fused multitask export's forward calls fx's _assert_is_none (its `tasks` fixed by the first trace). Traced
    again by a pass (stacking after fusion, or a second export) and regenerated, that call made fx register the
    function by a dotted name, after which every trace in the process failed with a KeyError (seen while the
    stacking pass was written; export_passes.traced_without_identities keeps it a plain call)."""
    model = _multitask()
    x = torch.randn(1, 3, 24, 24)
    once = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", example_input=x)
    twice = adapmtl.export_sparse(once, min_sparsity=0.0, policy="crossover", example_input=x)
    assert stack_parallel_convs(twice, None) is not None
    assert torch.fx.symbolic_trace(nn.Sequential(nn.ReLU())) is not None
    want, got = once(x), twice(x)
    for k in want:
        assert torch.equal(got[k], want[k])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_an_aotinductor_package_runs_the_stacked_convs(tmp_path):
    from adapmtl.interchange import export_pt2
    model = Heads().eval()
    x = torch.randn(1, 3, 11, 9)
    stack_parallel_convs(model, None)
    with torch.no_grad():
        program = export_pt2(model, x, tmp_path / "m.pt2", dynamic_batch=False)
        assert any("split" in str(n.target) for n in program.graph.nodes)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m_aoti.pt2"))
        got, want = torch._inductor.aoti_load_package(package)(x), model(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
