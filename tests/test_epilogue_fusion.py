"""The sparse conv's epilogue (sparse_conv2d(..., residual, clamp); the CPU kernel's fused store,
torch.ops.adapmtl.sparse_conv2d_fused) and the export pass that uses it (adapmtl.export_passes.fuse_epilogues):
the same result as the unfused conv, add and clamp -- bit for bit on a backend -- over the shape / stride /
dilation / padding / channels-last / dtype grid, the documented NaN semantics, hostile arguments, opcheck and
torch.compile, and whole models exported fused against unfused, through the export file."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapmtl
from adapmtl.export_passes import fuse_epilogues
from adapmtl.models import build_model
from adapmtl.nn import SparseConv2d
from adapmtl.ops.sparse_conv import SparseWeight, available_sparse_backends, sparse_conv2d

HAS_CPP = "cpp" in available_sparse_backends("cpu")
CLAMPS = [None, (0.0, None), (0.0, 6.0), (-0.25, 0.5), (None, 0.1)]


def _weight(shape, density=0.2, dtype=torch.float32, block=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    keep = torch.rand((shape[0] // block + 1, *shape[1:]), generator=g) < density
    w = w * keep.repeat_interleave(block, 0)[:shape[0]]
    return w.to(dtype)


def _unfused(x, w, bias, stride, padding, dilation, residual, clamp, backend):
    out = sparse_conv2d(x, SparseWeight.from_dense(w), bias, stride, padding, dilation, backend=backend)
    if residual is not None:
        out = out + residual
    if clamp is not None and clamp != (None, None):
        out = out.clamp(*clamp)
    return out


CASES = [  # (N, C, H, W, OC, k, stride, padding, dilation)
    (1, 5, 9, 11, 7, 3, 1, 1, 1),
    (2, 3, 13, 7, 9, 3, 2, 2, 2),
    (1, 8, 6, 6, 5, 1, 1, 0, 1),  # 1x1: the kernel's flattened path
    (3, 4, 10, 17, 6, (3, 1), (1, 2), (0, 3), (3, 1)),
    (1, 6, 5, 5, 4, 3, 1, 6, 6),  # every tap but the centre reads padding
]


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_epilogue_is_the_unfused_conv_add_and_clamp(case, clamp, dtype):
    n, c, h, w_, oc, k, stride, padding, dilation = case
    k = (k, k) if isinstance(k, int) else k
    torch.manual_seed(hash((case, clamp)) % 1000)
    x = torch.randn(n, c, h, w_, dtype=dtype)
    w = _weight((oc, c, *k), dtype=dtype)
    bias = torch.randn(oc, dtype=dtype)
    shape = F.conv2d(x, w, None, stride, padding, dilation).shape
    for residual in (None, torch.randn(shape, dtype=dtype)):
        if residual is None and clamp is None:
            continue
        for channels_last in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            ri = None if residual is None else (
                residual.contiguous(memory_format=torch.channels_last) if channels_last else residual)
            want = _unfused(xi, w, bias, stride, padding, dilation, ri, clamp, "cpp")
            got = sparse_conv2d(xi, SparseWeight.from_dense(w), bias, stride, padding, dilation, backend="cpp",
                                residual=ri, clamp=clamp)
            assert torch.equal(got, want)  # the same operations in the same order: the same bits
            assert got.is_contiguous(memory_format=torch.channels_last) == channels_last or got.shape[1] == 1
            ref = F.conv2d(xi, w, bias, stride, padding, dilation)
            ref = ref if ri is None else ref + ri
            ref = ref if clamp is None else ref.clamp(*clamp)
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
            torch.testing.assert_close(got, ref, **tol)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("config", ["layout=tap", "layout=channel", "panel=4", "panel=8", "rows=1", "layout=tap,rows=2",
                                    "panel=vector", "panel=vector,layout=tap"])
def test_every_kernel_configuration_fuses_the_same(config, monkeypatch):
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    torch.manual_seed(3)
    x = torch.randn(2, 16, 37, 35)
    # blocks of 4 channels: the panels' full patterns; of 16: the channel-vector tiles' uniform groups (16 + 4)
    w = _weight((20, 16, 3, 3), density=0.15, block=16 if "vector" in config else 4)
    bias = torch.randn(20)
    res = torch.randn(2, 20, 37, 35)
    for clamp in ((0.0, None), (0.0, 6.0)):
        want = _unfused(x, w, bias, 1, 2, 2, res, clamp, "cpp")
        got = sparse_conv2d(x, SparseWeight.from_dense(w), bias, 1, 2, 2, backend="cpp", residual=res, clamp=clamp)
        assert torch.equal(got, want), config


@pytest.mark.parametrize("backend", [b for b in available_sparse_backends("cpu") if b != "auto"])
def test_every_backend_runs_the_epilogue(backend):
    torch.manual_seed(4)
    x = torch.randn(2, 6, 9, 8)
    w = _weight((5, 6, 3, 3))
    res = torch.randn(2, 5, 9, 8)
    got = sparse_conv2d(x, SparseWeight.from_dense(w), None, 1, 1, 1, backend=backend, residual=res, clamp=(0, 6))
    torch.testing.assert_close(got, (F.conv2d(x, w, None, 1, 1) + res).clamp(0, 6), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, _unfused(x, w, None, 1, 1, 1, res, (0, 6), backend))


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_nan_semantics_of_the_epilogue():
    x = torch.randn(1, 3, 6, 6)
    w = _weight((4, 3, 3, 3), density=0.5)
    res = torch.randn(1, 4, 6, 6)
    res[0, 1, 2, 3] = float("nan")
    res[0, 2, 0, 0] = float("inf")
    res[0, 3, 5, 5] = -float("inf")
    for clamp in ((0.0, None), (0.0, 6.0)):
        got = sparse_conv2d(x, SparseWeight.from_dense(w), None, 1, 1, backend="cpp", residual=res, clamp=clamp)
        assert torch.isnan(got[0, 1, 2, 3])  # clamp keeps NaN, as torch.clamp does
        assert got[0, 2, 0, 0] == (float("inf") if clamp[1] is None else 6.0) and got[0, 3, 5, 5] == 0.0
        torch.testing.assert_close(got, _unfused(x, w, None, 1, 1, 1, res, clamp, "cpp"), equal_nan=True, rtol=0,
                                   atol=0)


def test_hostile_epilogue_arguments():
    x = torch.randn(1, 3, 6, 6)
    sw = SparseWeight.from_dense(_weight((4, 3, 3, 3)))
    for bad in (torch.randn(1, 4, 6, 5), torch.randn(1, 4, 6, 6, dtype=torch.float64), "r"):
        with pytest.raises((ValueError, TypeError), match="residual"):
            sparse_conv2d(x, sw, None, 1, 1, residual=bad)
    for bad in ((1.0, 0.0), (0.0,), (float("nan"), 1.0), (0, float("inf")), (True, 1.0), "relu", 0.0):
        with pytest.raises(ValueError, match="clamp"):
            sparse_conv2d(x, sw, None, 1, 1, clamp=bad)
        with pytest.raises(ValueError, match="clamp"):
            SparseConv2d(sw, padding=1, clamp=bad)
    with pytest.raises(ValueError, match="residual"):
        sparse_conv2d(x, sw, None, 1, 1, residual=torch.randn(1, 4, 6, 6, requires_grad=True))
    assert torch.equal(sparse_conv2d(x, sw, None, 1, 1, clamp=(None, None)), sparse_conv2d(x, sw, None, 1, 1))
    if HAS_CPP:
        with pytest.raises(ValueError, match="lo <= hi"):
            torch.ops.adapmtl.sparse_conv2d_fused(x, sw.row_ptr, sw.col_idx, sw.values, None, list(sw.shape),
                                                  [1, 1], [1, 1], [1, 1], None, 1.0, 0.0)
        with pytest.raises(ValueError, match="residual"):
            torch.ops.adapmtl.sparse_conv2d_fused(x, sw.row_ptr, sw.col_idx, sw.values, None, list(sw.shape),
                                                  [1, 1], [1, 1], [1, 1], torch.randn(1, 4, 6, 5), 0.0, 6.0)


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_fused_op_opcheck_and_compile():
    x = torch.randn(2, 3, 7, 6)
    sw = SparseWeight.from_dense(_weight((4, 3, 3, 3)))
    res = torch.randn(2, 4, 7, 6)
    for lo, hi in ((0.0, 6.0), (0.0, None), (None, None)):
        args = (x, sw.row_ptr, sw.col_idx, sw.values, torch.randn(4), list(sw.shape), [1, 1], [1, 1], [1, 1], res, lo,
                hi)
        torch.library.opcheck(torch.ops.adapmtl.sparse_conv2d_fused.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    layer = SparseConv2d(sw, torch.randn(4), padding=1, clamp=(0.0, None)).eval()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, res), layer(x, res))


class Block(nn.Module):  # ResNet's basic block, with its shared ReLU, and MobileNet's ReLU6
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv3, self.act3 = nn.Conv2d(c, c, 1), nn.ReLU6()
        self.conv4, self.conv5, self.conv6 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Conv2d(c, 4, 1)
        self.scale = nn.Parameter(torch.randn(1, 1, 1, 1))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + identity)  # add + ReLU
        out = self.act3(self.conv3(out))  # ReLU6 module
        a = self.conv4(out)
        out = torch.clamp(a + out, min=0.0, max=6.0) + F.relu(a)  # a has two users: not fused
        b = F.relu(self.conv5(out) * self.scale)  # a mul between: not fused
        return {"out": self.conv6(b).clamp(-1.0, 1.0), "b": b}  # method clamp


def _sparse_block(dtype=torch.float32):
    torch.manual_seed(0)
    model = Block()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = _weight(m.weight.shape, density=0.1, seed=int(m.weight.numel()))
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_export_fuses_what_follows_sparse_convs_and_computes_the_same(dtype, tmp_path):
    model = _sparse_block(dtype)
    x = torch.randn(2, 8, 13, 11, dtype=dtype)
    with torch.no_grad():
        original = model(x)
    plain = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", fuse=False)
    fused = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", example_input=x, fuse=True)
    assert plain.fused_epilogues == [] and isinstance(fused, Block) and type(fused) is not Block
    with pytest.raises(Exception):  # pickling by name would revive the unfused forward: it fails instead
        __import__("pickle").dumps(fused)
    assert isinstance(copy.deepcopy(fused).conv2, SparseConv2d)
    by_conv = {e["conv"]: (e["residual"], e["clamp"]) for e in fused.fused_epilogues}
    assert by_conv == {"conv1": (False, (0.0, None)), "conv2": (True, (0.0, None)), "conv3": (False, (0.0, 6.0)),
                       "conv6": (False, (-1.0, 1.0))}
    with torch.no_grad():
        want, got = plain(x), fused(x)
        again = model(x)
    for k in want:
        assert torch.equal(got[k], want[k]), k  # fused is the unfused export, bit for bit
        assert torch.equal(again[k], original[k])  # the model given is not changed
    adapmtl.save_exported(fused, tmp_path / "fused.safetensors")
    loaded = adapmtl.load_exported(tmp_path / "fused.safetensors")
    with torch.no_grad():
        back = loaded(x)
    for k in want:
        assert torch.equal(back[k], want[k])
    # without an example input no shapes are known: the activations fuse, the residual add does not
    no_shapes = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", fuse=True)
    assert {e["conv"] for e in no_shapes.fused_epilogues if e["residual"]} == set()
    assert "conv2" not in {e["conv"] for e in no_shapes.fused_epilogues}  # its ReLU follows the add


def test_a_broadcast_add_and_a_shared_module_are_not_fused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = SparseConv2d(SparseWeight.from_dense(_weight((4, 4, 3, 3))), padding=1)
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            y = F.relu(self.conv(x) + self.shift)  # broadcast: not a residual; ReLU after the add: not fused
            return F.relu(self.conv(y))  # the module is called twice: not fused

    model = Odd().eval()
    x = torch.randn(1, 4, 6, 6)
    assert fuse_epilogues(model, None, (x,)) == [] and type(model) is Odd


def test_multitask_models_export_fused_with_their_tasks(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", tasks=["segment_semantic", "normal", "depth"], dataset="nyuv2")
    adapmtl.sparsify(model, init=-3.0)
    model.eval()
    x = torch.randn(1, 3, 40, 40)
    plain = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", example_input=x, fuse=False)
    fused = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", example_input=x)
    assert fused.fused_epilogues and list(fused.tasks) == list(model.tasks)
    with torch.no_grad():
        want, got = plain(x), fused(x)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    adapmtl.save_exported(fused, tmp_path / "m.safetensors")
    with torch.no_grad():
        back = adapmtl.load_exported(tmp_path / "m.safetensors")(x)
    for k in want:
        assert torch.equal(back[k], want[k])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
def test_an_aotinductor_package_runs_the_fused_epilogues(tmp_path):
    """The fused op in a torch.export program compiled by AOTInductor (its arguments go through JSON: the
    bounds are optional floats, not infinities) computes what the unfused eager export does, bit for bit."""
    from adapmtl.interchange import export_pt2
    model = _sparse_block()
    x = torch.randn(1, 8, 13, 11)
    fused = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", example_input=x)
    plain = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover", example_input=x, fuse=False)
    with torch.no_grad():
        program = export_pt2(fused, x, tmp_path / "m.pt2", dynamic_batch=False)
        assert "adapmtl.sparse_conv2d_fused.default" in {str(n.target) for n in program.graph.nodes}
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m_aoti.pt2"))
        got, want = torch._inductor.aoti_load_package(package)(x), plain(x)
    for k in want:
        assert torch.equal(got[k], want[k]), k
