"""Sparse inference: SparseWeight packing, sparse_conv2d / sparse_linear on every backend, modules."""
import math
import os
import platform
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapmtl import _ext
from adapmtl.nn.sparse_layers import SparseConv2d, SparseLinear
from adapmtl.ops.sparse_conv import available_sparse_backends, sparse_conv2d, sparse_linear
from adapmtl.ops.sparse_weight import SparseWeight
from helpers import assert_close_to_reference, backend_device_pairs, param_backend_dtypes

# every non-reference backend of the sparse ops that runs here, with every dtype it implements (the op
# layer's tables); errors bounded by PyTorch's own in the same dtype (helpers.assert_close_to_reference)
PAIRS = [p for p in backend_device_pairs("sparse_conv2d") if p[0] != "torch"]
BACKEND_IDS = [f"{b}-{d}" for b, d in PAIRS]


def _double(t):
    return None if t is None else t.double()


def assert_conv_close(out, x, w, b, stride, padding, dilation, msg=""):
    """`out` against F.conv2d in float64 on the same inputs, within PyTorch's own error in out's dtype."""
    ref = F.conv2d(x.double(), w.double(), _double(b), stride, padding, dilation)
    scale = F.conv2d(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), stride, padding,
                     dilation)
    assert out.dtype == x.dtype
    assert_close_to_reference(out, ref, F.conv2d(x, w, b, stride, padding, dilation), scale, msg=msg)


def assert_linear_close(out, x, w, b, msg=""):
    ref = F.linear(x.double(), w.double(), _double(b))
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert out.dtype == x.dtype
    assert_close_to_reference(out, ref, F.linear(x, w, b), scale, msg=msg)


def pruned(shape, density, dtype=torch.float32, gen=None, empty_rows=0):
    w = torch.randn(shape, generator=gen, dtype=dtype)
    w = w * (torch.rand(shape, generator=gen) < density)
    if empty_rows:
        w[:empty_rows] = 0
    return w


# --------------------------------------------------------------------------------------------
# SparseWeight


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (4, 1, 1, 1), (3, 2, 7, 7), (9, 13), (0, 4, 1, 1), (5, 0)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_sparse_weight_round_trip(shape, density):
    g = torch.Generator().manual_seed(1)
    w = pruned(shape, density, gen=g)
    sw = SparseWeight.from_dense(w)
    assert torch.equal(sw.to_dense(), w)
    assert sw.nnz == int(torch.count_nonzero(w))
    assert sw.row_ptr.dtype == torch.int32 and sw.col_idx.dtype == torch.int32
    assert sw.row_ptr[0] == 0 and sw.row_ptr[-1] == sw.nnz
    expected = 1.0 - sw.nnz / w.numel() if w.numel() else 1.0
    assert math.isclose(sw.sparsity, expected)
    if w.numel():
        flat = w.reshape(w.shape[0], -1)
        for row in range(w.shape[0]):  # columns sorted within each row and pointing at the non-zeros
            cols = sw.col_idx[sw.row_ptr[row]: sw.row_ptr[row + 1]].long()
            assert torch.all(cols[1:] > cols[:-1])
            assert torch.equal(flat[row, cols], sw.values[sw.row_ptr[row]: sw.row_ptr[row + 1]])
    # torch.sparse view and state round trip
    assert torch.equal(sw.to_torch_csr().to_dense().reshape(shape), w)
    back = SparseWeight.from_state_tensors(sw.state_tensors())
    assert torch.equal(back.to_dense(), w) and back.shape == sw.shape


def test_sparse_weight_keeps_nan_and_moves():
    w = torch.tensor([[0.0, float("nan"), 2.0], [0.0, 0.0, 0.0]])
    sw = SparseWeight.from_dense(w)
    assert sw.nnz == 2 and torch.equal(sw.row_ptr, torch.tensor([0, 2, 2], dtype=torch.int32))
    assert torch.equal(sw.to_dense(), w, ) is False and torch.allclose(sw.to_dense(), w, equal_nan=True)
    d = sw.to(dtype=torch.float64)
    assert d.dtype == torch.float64 and d.col_idx.dtype == torch.int32
    with pytest.raises(TypeError, match="dtype"):
        sw.to(dtype=torch.int32)


def test_sparse_weight_bad_input():
    with pytest.raises(TypeError, match="'w'"):
        SparseWeight.from_dense([[1.0]])
    with pytest.raises(ValueError, match="2-D or 4-D"):
        SparseWeight.from_dense(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        SparseWeight.from_dense(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="row_ptr"):
        SparseWeight(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0), (3, 4))
    with pytest.raises(TypeError, match="int32"):
        SparseWeight(torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0), (3, 4))


# --------------------------------------------------------------------------------------------
# sparse_conv2d against dense F.conv2d


def _random_conv_cases(n_cases, seed, small=False):
    """Random shapes covering 1x1/3x3/5x5/7x7, strides 1-3, paddings 0-3, dilations up to 24,
    odd channel counts, batch 1-4, NCHW / channels-last / non-contiguous input, bias or not."""
    rng = random.Random(seed)
    cases = []
    for i in range(n_cases):
        k = rng.choice([1, 3, 3, 5, 7])
        dil = rng.choice([1, 1, 2, 3] + ([] if small else [6, 12, 24])) if k > 1 else 1
        stride = rng.choice([1, 2, 3])
        pad = rng.randint(0, 3) if k > 1 else rng.choice([0, 0, 1])
        if dil > 3:
            pad = dil  # ASPP-style "same" padding
        dil2 = rng.choice([1, dil])
        pad2 = rng.randint(0, pad)
        span, span2 = dil * (k - 1) + 1, dil2 * (k - 1) + 1
        h = rng.randint(max(1, span - 2 * pad), span + (6 if small else 20))
        w = rng.randint(max(1, span2 - 2 * pad2), span2 + (9 if small else 40))
        cases.append(dict(
            n=rng.randint(1, 2 if small else 4), c=rng.choice([1, 3, 5, 8]) if small else rng.choice([1, 3, 5, 16, 33]),
            oc=rng.choice([1, 2, 7]) if small else rng.choice([1, 2, 7, 17, 40]), k=k,
            stride=(stride, rng.choice([1, 2, stride])), pad=(pad, pad2), dil=(dil, dil2), h=h, w=w,
            density=rng.choice([0.0, 0.05, 0.3, 1.0]), layout=rng.choice(["nchw", "cl", "view"]),
            bias=rng.random() < 0.6, empty_rows=rng.choice([0, 0, 1]), id=i))
    return cases


def _make_input(case, dtype, device, gen):
    n, c, h, w = case["n"], case["c"], case["h"], case["w"]
    if case["layout"] == "view":  # a strided view: every other column of a wider tensor
        x = torch.randn(n, c, h, 2 * w, generator=gen, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
        if case["layout"] == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def _check_conv(backend, device, dtype, case):
    g = torch.Generator().manual_seed(1000 + case["id"])
    x = _make_input(case, dtype, device, g)
    w = pruned((case["oc"], case["c"], case["k"], case["k"]), case["density"], dtype, g, case["empty_rows"]).to(device)
    b = torch.randn(case["oc"], generator=g, dtype=dtype).to(device) if case["bias"] else None
    out = sparse_conv2d(x, SparseWeight.from_dense(w), b, case["stride"], case["pad"], case["dil"], backend=backend)
    assert_conv_close(out, x, w, b, case["stride"], case["pad"], case["dil"], msg=f"{backend} {case}")
    if case["layout"] == "cl" and backend == "cpp" and case["c"] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


CONV_CASES = _random_conv_cases(48, seed=7)
SMALL_CASES = _random_conv_cases(10, seed=8, small=True)


@param_backend_dtypes(PAIRS)
def test_sparse_conv2d_matches_dense(backend, device, dtype):
    cases = CONV_CASES
    if backend == "triton" and device == "cpu":
        cases = SMALL_CASES  # the interpreter is slow
    elif backend == "torch_csr":
        cases = CONV_CASES[:12]  # the peer is slow and not what ships
    for case in cases:
        _check_conv(backend, device, dtype, case)


TRITON_PAIRS = [p for p in PAIRS if p[0] == "triton"]


@pytest.mark.skipif(not TRITON_PAIRS, reason="needs triton (on CUDA, or interpreted on the CPU)")
@pytest.mark.parametrize("rows", [2, 4, 8])
def test_triton_rows_kernel_shares_gathers_where_rows_match(rows, monkeypatch):
    """ADAPMTL_GPU_SPARSE_ROWS: channels whose rows hold the same columns (block-pruned) share each gather,
    others run row by row; the same result as F.conv2d either way, partial last groups and empty blocks too."""
    from adapmtl.triton_kernels import sparse_conv as kernels

    (_, device), = TRITON_PAIRS
    monkeypatch.setenv("ADAPMTL_GPU_SPARSE_ROWS", str(rows))
    g = torch.Generator().manual_seed(rows)
    oc, c = 3 * rows + 1, 5
    groups = -(-oc // rows)
    for block, dtype, layout in [(rows, torch.float32, "nchw"), (rows, torch.float64, "cl"), (1, torch.float32, "view")]:
        live = torch.rand((oc + block - 1) // block, c, 3, 3, generator=g) < 0.4
        live[0] = False  # an empty block: a group of empty rows
        w = (torch.randn(oc, c, 3, 3, generator=g, dtype=dtype) * live.repeat_interleave(block, 0)[:oc]).to(device)
        case = dict(n=2, c=c, h=9, w=8, layout=layout)
        x = _make_input(case, dtype, device, g)
        b = torch.randn(oc, generator=g, dtype=dtype).to(device)
        sw = SparseWeight.from_dense(w)
        shared = torch.zeros(groups, dtype=torch.int32, device=device)
        out = kernels.sparse_conv2d(x, sw.row_ptr, sw.col_idx, sw.values, b, list(w.shape), [1, 2], [2, 1], [2, 1],
                                    record_shared=shared)
        assert_conv_close(out, x, w, b, (1, 2), (2, 1), (2, 1), msg=f"rows={rows} block={block}")
        if block == rows:
            assert shared.tolist() == [1] * groups
        else:  # unstructured at 40% density: no group of 2+ rows holds the same 45-column pattern
            assert shared[:-1].sum() == 0 and shared[-1] == 1  # the last group is one row
    # through the op layer too
    out = sparse_conv2d(x, sw, b, (1, 2), (2, 1), (2, 1), backend="triton")
    assert_conv_close(out, x, w, b, (1, 2), (2, 1), (2, 1))


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in available_sparse_backends("cuda"),
                    reason="needs a CUDA device and the CUDA extension")
@pytest.mark.parametrize("rows", [2, 4, 8])
def test_cuda_rows_kernel_matches_dense(rows, monkeypatch):
    """The CUDA kernel with ADAPMTL_GPU_SPARSE_ROWS: block-pruned (shared gathers) and unstructured (row by row)
    weights, partial last groups, empty blocks, every dtype it implements, against F.conv2d."""
    monkeypatch.setenv("ADAPMTL_GPU_SPARSE_ROWS", str(rows))
    g = torch.Generator().manual_seed(rows)
    oc, c = 3 * rows + 1, 5
    for block in (rows, 1):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            live = torch.rand((oc + block - 1) // block, c, 3, 3, generator=g) < 0.4
            live[0] = False
            w = torch.randn(oc, c, 3, 3, generator=g).to(dtype) * live.repeat_interleave(block, 0)[:oc]
            x = torch.randn(2, c, 40, 37, generator=g).to(dtype)
            b = torch.randn(oc, generator=g).to(dtype)
            out = sparse_conv2d(x.cuda(), SparseWeight.from_dense(w.cuda()), b.cuda(), (1, 2), (2, 1), (2, 1),
                                backend="cuda")
            assert_conv_close(out.cpu(), x, w, b, (1, 2), (2, 1), (2, 1), msg=f"rows={rows} block={block} {dtype}")
    monkeypatch.setenv("ADAPMTL_GPU_SPARSE_ROWS", "3")
    with pytest.raises(ValueError, match="ADAPMTL_GPU_SPARSE_ROWS"):
        sparse_conv2d(x.cuda(), SparseWeight.from_dense(w.cuda()), b.cuda(), backend="cuda")


def test_triton_rows_setting_is_checked(monkeypatch):
    pytest.importorskip("triton")
    from adapmtl.triton_kernels import sparse_conv as kernels

    for bad in ("3", "0", "four", "16", ""):
        monkeypatch.setenv("ADAPMTL_GPU_SPARSE_ROWS", bad)
        with pytest.raises(ValueError, match="ADAPMTL_GPU_SPARSE_ROWS must be one of 1, 2, 4, 8"):
            kernels.rows_per_program()
    monkeypatch.delenv("ADAPMTL_GPU_SPARSE_ROWS")
    assert kernels.rows_per_program() == 1


@pytest.mark.parametrize("backend,device", PAIRS, ids=BACKEND_IDS)
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_sparse_conv2d_fully_pruned_and_dense(backend, device, density):
    case = dict(n=2, c=6, oc=5, k=3, stride=(1, 1), pad=(1, 1), dil=(2, 2), h=9, w=11, density=density,
                layout="nchw", bias=True, empty_rows=0, id=99)
    _check_conv(backend, device, torch.float32, case)


@pytest.mark.parametrize("backend,device", [p for p in PAIRS if p[0] != "triton"] or [("torch", "cpu")],
                         ids=lambda p: str(p))
def test_sparse_conv2d_paper_shapes_batch16(backend, device):
    """The shapes the paper's models use, small spatial size: 7x7/2 stem, 3x3/2, 1x1/2, ASPP dilation 24."""
    g = torch.Generator().manual_seed(3)
    for (c, oc, k, s, p, d, hw, n) in [(3, 64, 7, 2, 3, 1, 23, 2), (64, 128, 3, 2, 1, 1, 15, 16),
                                       (64, 128, 1, 2, 0, 1, 15, 3), (96, 40, 3, 1, 24, 24, 9, 1)]:
        x = torch.randn(n, c, hw, hw, generator=g).to(device)
        w = pruned((oc, c, k, k), 0.1, gen=g).to(device)
        b = torch.randn(oc, generator=g).to(device)
        out = sparse_conv2d(x, SparseWeight.from_dense(w), b, s, p, d, backend=backend)
        assert_conv_close(out, x, w, b, s, p, d, msg=f"{backend} {(c, oc, k, s, p, d, hw, n)}")


def test_grouped_conv_falls_back_to_dense():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, 10, 9, generator=g)
    for groups in (3, 12):  # grouped and depthwise
        w = pruned((12, 12 // groups, 3, 3), 0.5, gen=g)
        ref = F.conv2d(x, w, None, 2, 1, 1, groups)
        for backend in available_sparse_backends("cpu"):
            out = sparse_conv2d(x, SparseWeight.from_dense(w), None, 2, 1, 1, groups, backend=backend)
            torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------
# sparse_linear


@param_backend_dtypes(PAIRS)
def test_sparse_linear_matches_dense(backend, device, dtype):
    g = torch.Generator().manual_seed(5)
    for in_f, out_f, lead, density, bias in [(33, 17, (1,), 0.1, True), (8, 5, (4, 3), 0.5, False),
                                             (64, 40, (16,), 0.05, True), (7, 3, (), 1.0, True),
                                             (9, 6, (2,), 0.0, True), (19, 4, (37,), 0.3, False)]:
        x = torch.randn(*lead, in_f, generator=g, dtype=dtype).to(device)
        w = pruned((out_f, in_f), density, dtype, g, empty_rows=1).to(device)
        b = torch.randn(out_f, generator=g, dtype=dtype).to(device) if bias else None
        out = sparse_linear(x, SparseWeight.from_dense(w), b, backend=backend)
        assert_linear_close(out, x, w, b, msg=f"{backend} {(in_f, out_f, lead, density, bias)}")
    x = torch.randn(6, 10, generator=g, dtype=dtype)[:, ::2].to(device)  # non-contiguous
    w = pruned((3, 5), 0.5, dtype, g).to(device)
    assert_linear_close(sparse_linear(x, SparseWeight.from_dense(w), backend=backend), x, w, None, msg="strided x")


# --------------------------------------------------------------------------------------------
# Errors


def test_sparse_conv2d_bad_arguments():
    x = torch.randn(1, 4, 8, 8)
    sw = SparseWeight.from_dense(pruned((3, 4, 3, 3), 0.5))
    with pytest.raises(TypeError, match="'sw'"):
        sparse_conv2d(x, torch.zeros(3, 4, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        sparse_conv2d(torch.randn(1, 5, 8, 8), sw)
    with pytest.raises(TypeError, match="dtype"):
        sparse_conv2d(x.double(), sw)
    with pytest.raises(ValueError, match="'stride'"):
        sparse_conv2d(x, sw, stride=0)
    with pytest.raises(ValueError, match="'padding'"):
        sparse_conv2d(x, sw, padding=-1)
    with pytest.raises(ValueError, match="'backend'"):
        sparse_conv2d(x, sw, backend="fast")
    with pytest.raises(ValueError, match="'bias'"):
        sparse_conv2d(x, sw, torch.zeros(4))
    with pytest.raises(ValueError, match="dilated kernel"):
        sparse_conv2d(x, sw, dilation=6)
    with pytest.raises(ValueError, match="4-D"):
        sparse_conv2d(x[0], sw)
    with pytest.raises(ValueError, match="inference only"):
        sparse_conv2d(x.requires_grad_(), sw)
    with torch.no_grad():
        sparse_conv2d(x, sw)  # fine without grad mode
    with pytest.raises(ValueError, match="last dimension"):
        sparse_linear(torch.randn(2, 5), SparseWeight.from_dense(torch.ones(3, 4)))


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
def test_cpp_op_validates_csr():
    x = torch.randn(1, 2, 5, 5)
    rp = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="col_idx"):
        torch.ops.adapmtl.sparse_conv2d(x, rp, torch.tensor([18], dtype=torch.int32), torch.ones(1), None,
                                        [1, 2, 3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="row_ptr"):
        torch.ops.adapmtl.sparse_conv2d(x, torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                                        torch.ones(1), None, [1, 2, 3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.adapmtl.sparse_conv2d(x.half(), rp, torch.tensor([1], dtype=torch.int32), torch.ones(1).half(),
                                        None, [1, 2, 3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="backend 'cpp' supports"):
        sparse_conv2d(x.bfloat16(), SparseWeight.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bfloat16)), backend="cpp")


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_kernel_channel_blocks_and_unsorted_rows(dtype):
    """Many input channels at moderate density cut each CSR row into several channel-block segments, some
    empty (a band of pruned channels); rows whose columns are shuffled (a user-built CSR) give the same.
    The 1x1 stride-1 case takes the flattened (1 x H*W) path, also with channels-last input."""
    g = torch.Generator().manual_seed(11)
    for (c, oc, k, s, d, hw) in [(150, 37, 3, 1, 2, 13), (301, 19, 1, 2, 1, 9), (301, 19, 1, 1, 1, 9),
                                 (97, 21, 5, 2, 3, 17)]:
        w = pruned((oc, c, k, k), 0.5, dtype, g)
        w[:, c // 5: c // 2] = 0
        x = torch.randn(2, c, hw, hw, generator=g, dtype=dtype)
        b = torch.randn(oc, generator=g, dtype=dtype)
        sw = SparseWeight.from_dense(w)
        perm = torch.cat([torch.randperm(int(sw.row_ptr[r + 1] - sw.row_ptr[r]), generator=g) + int(sw.row_ptr[r])
                          for r in range(oc)])
        assert not torch.equal(sw.col_idx[perm], sw.col_idx)
        args = ([oc, c, k, k], [s, s], [d * (k // 2)] * 2, [d, d])
        for cols, vals in [(sw.col_idx, sw.values), (sw.col_idx[perm], sw.values[perm])]:
            out = torch.ops.adapmtl.sparse_conv2d(x, sw.row_ptr, cols, vals, b, *args)
            assert_conv_close(out, x, w, b, s, d * (k // 2), d, msg=f"{(c, oc, k, s, d, hw)}")
        out = torch.ops.adapmtl.sparse_conv2d(x.contiguous(memory_format=torch.channels_last), sw.row_ptr,
                                              sw.col_idx, sw.values, b, *args)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_conv_close(out, x, w, b, s, d * (k // 2), d, msg=f"channels-last {(c, oc, k, s, d, hw)}")
        lin_w = w.flatten(1)
        xl = torch.randn(5, lin_w.shape[1], generator=g, dtype=dtype)
        lsw = SparseWeight.from_dense(lin_w)
        out = torch.ops.adapmtl.sparse_linear(xl, lsw.row_ptr, lsw.col_idx[perm], lsw.values[perm], b, lin_w.shape[1])
        assert_linear_close(out, xl, lin_w, b, msg=f"linear {(c, oc, k, s, d, hw)}")


# Convs whose taps read only zero padding over whole output tiles, which the C++ kernel skips: ASPP-style
# dilations larger than the map (only the centre tap is live), partly dead rows and vectors (dilation 24
# on a 41-wide map), outputs that read nothing but padding (bias only), stride 2 over a dilated kernel.
DEAD_TAP_CASES = [
    dict(n=1, c=33, oc=17, k=3, stride=(1, 1), pad=(12, 12), dil=(12, 12), h=5, w=6),
    dict(n=2, c=20, oc=9, k=3, stride=(1, 1), pad=(24, 24), dil=(24, 24), h=41, w=41),
    dict(n=1, c=16, oc=40, k=3, stride=(1, 1), pad=(6, 18), dil=(6, 18), h=11, w=37),
    dict(n=1, c=5, oc=7, k=1, stride=(1, 1), pad=(3, 2), dil=(1, 1), h=4, w=4),
    dict(n=1, c=7, oc=3, k=3, stride=(1, 1), pad=(9, 9), dil=(1, 1), h=3, w=2),
    dict(n=2, c=9, oc=11, k=3, stride=(2, 2), pad=(7, 7), dil=(7, 7), h=9, w=19),
    dict(n=1, c=3, oc=8, k=7, stride=(2, 2), pad=(3, 3), dil=(1, 1), h=23, w=23),
]


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("layout", ["tap", "channel", ""])
def test_cpp_kernel_block_layouts(layout, monkeypatch):
    """The C++ kernel's two block layouts (tap-major with dead-tap skipping, channel-major), forced through
    ADAPMTL_CPU_SPARSE_CONFIG, and its own choice (""), on the random shapes, the dead-tap shapes, float64,
    and rows with shuffled columns."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", f"layout={layout}" if layout else "")
    cases = CONV_CASES + [dict(case, density=density, layout=memory, bias=True, empty_rows=1, id=200 + i)
                          for i, case in enumerate(DEAD_TAP_CASES)
                          for density, memory in [(0.3, "nchw"), (0.9, "cl")]]
    for case in cases:
        _check_conv("cpp", "cpu", torch.float32, case)
    for case in cases[-2 * len(DEAD_TAP_CASES):]:
        _check_conv("cpp", "cpu", torch.float64, case)
    g = torch.Generator().manual_seed(5)
    for case in DEAD_TAP_CASES:
        x = torch.randn(case["n"], case["c"], case["h"], case["w"], generator=g)
        w = pruned((case["oc"], case["c"], case["k"], case["k"]), 0.4, gen=g)
        b = torch.randn(case["oc"], generator=g)
        sw = SparseWeight.from_dense(w)
        perm = torch.cat([torch.randperm(int(sw.row_ptr[r + 1] - sw.row_ptr[r]), generator=g) + int(sw.row_ptr[r])
                          for r in range(case["oc"])])
        out = torch.ops.adapmtl.sparse_conv2d(x, sw.row_ptr, sw.col_idx[perm], sw.values[perm], b, list(w.shape),
                                              list(case["stride"]), list(case["pad"]), list(case["dil"]))
        assert_conv_close(out, x, w, b, case["stride"], case["pad"], case["dil"], msg=f"shuffled {case}")


def block_pruned(oc, c, k, block, density, dtype=torch.float32, gen=None):
    """Non-zeros shared by `block` consecutive output channels (a block live with probability `density`)."""
    live = torch.rand(-(-oc // block), c, k, k, generator=gen) < density
    return torch.randn(oc, c, k, k, generator=gen, dtype=dtype) * live.repeat_interleave(block, 0)[:oc]


def block_case(c, oc, k, s, d, hw, block, dtype, gen):
    """A conv with a `block` x 1 pruned weight at density 0.3, "same" padding: (w, x, bias, packed w, op args)."""
    w = block_pruned(oc, c, k, block, 0.3, dtype, gen)
    x = torch.randn(2, c, hw, hw, generator=gen, dtype=dtype)
    b = torch.randn(oc, generator=gen, dtype=dtype)
    return w, x, b, SparseWeight.from_dense(w), ([oc, c, k, k], [s, s], [d * (k // 2)] * 2, [d, d])


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("config", ["panel=4", "panel=8", "panel=4,oc_chunk=6", "panel=8,min_segment=1", ""])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_kernel_channel_panels(config, dtype, monkeypatch):
    """Panels of 4 and 8 output channels per register tile (each column of the weight loaded once for the
    channels holding it), forced and by the kernel's own choice: unstructured and block-pruned weights, output
    channels that do not fill the last panel, chunks that are not a whole number of panels, many channel blocks,
    shuffled and duplicate columns in a row (summed), dead taps (dropped), channels-last input, and linear."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    g = torch.Generator().manual_seed(21)
    shapes = [(150, 37, 3, 1, 2, 13, 2), (301, 19, 1, 1, 1, 9, 4), (64, 40, 3, 1, 6, 11, 8), (33, 17, 5, 2, 1, 17, 1),
              (20, 9, 3, 1, 24, 41, 4), (16, 13, 3, 1, 12, 5, 8)]
    for c, oc, k, s, d, hw, block in shapes:
        w, x, b, sw, args = block_case(c, oc, k, s, d, hw, block, dtype, g)
        perm = torch.cat([torch.randperm(int(sw.row_ptr[r + 1] - sw.row_ptr[r]), generator=g) + int(sw.row_ptr[r])
                          for r in range(oc)])
        for xin, cols, vals in [(x, sw.col_idx, sw.values), (x, sw.col_idx[perm], sw.values[perm]),
                                (x.contiguous(memory_format=torch.channels_last), sw.col_idx, sw.values)]:
            out = torch.ops.adapmtl.sparse_conv2d(xin, sw.row_ptr, cols, vals, b, *args)
            assert_conv_close(out, x, w, b, s, d * (k // 2), d, msg=f"{config} {(c, oc, k, s, d, hw, block)}")
        # every non-zero of row 0 twice, with half its value each time: the kernel sums duplicates
        n0 = int(sw.row_ptr[1])
        dup_cols = torch.cat([sw.col_idx[:n0], sw.col_idx[:n0], sw.col_idx[n0:]])
        dup_vals = torch.cat([sw.values[:n0] / 2, sw.values[:n0] / 2, sw.values[n0:]])
        dup_ptr = sw.row_ptr.clone()
        dup_ptr[1:] += n0
        out = torch.ops.adapmtl.sparse_conv2d(x, dup_ptr, dup_cols, dup_vals, b, *args)
        assert_conv_close(out, x, w, b, s, d * (k // 2), d, msg=f"duplicates {config} {(c, oc, k, block)}")
        lin_w = w.flatten(1)
        xl = torch.randn(5, lin_w.shape[1], generator=g, dtype=dtype)
        lsw = SparseWeight.from_dense(lin_w)
        out = torch.ops.adapmtl.sparse_linear(xl, lsw.row_ptr, lsw.col_idx, lsw.values, b, lin_w.shape[1])
        assert_linear_close(out, xl, lin_w, b, msg=f"linear {config} {(c, oc, k, block)}")


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("config", ["", "panel=vector", "panel=vector,layout=tap",
                                    "panel=vector,layout=channel,oc_chunk=20"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_kernel_channel_vectors(config, dtype, monkeypatch):
    """Channel-vector tiles (one vector of output channels -- 16 fp32, 8 fp64 -- at each of up to 28 pixels of a
    row) on weights whose channels come in uniform groups of that many (pruned in 16 x 1 / 8 x 1 blocks or
    larger), by default and forced: output channels that do not fill the last group, chunks that are not whole
    groups, tiles of 1 to 28 pixels, dead taps (tap-major skips them), stride 2, channels-last input, the epilogue
    (residual and clamp), linear at batch 1, 17, 29, 64 and 1024 (by default not on one-tap calls with rows of 1024
    pixels or more, where panels run: linear at batch 1024); a weight with a zero inside one block runs them too
    (padded), except on an input with an inf that the padded zero would read; one padded past kVectorsMaxFill only
    where forced; always with the same result."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    C = _ext.cpu_extension()
    L = 16 if dtype == torch.float32 else 8
    g = torch.Generator().manual_seed(41)
    # (c, oc, k, stride, dilation, h = w, block)
    shapes = [(37, 150, 3, 1, 2, 13, L), (19, 2 * L, 1, 1, 1, 9, 2 * L), (40, 64, 3, 1, 6, 11, L),
              (17, 33, 5, 2, 1, 17, L), (9, 20, 3, 1, 24, 41, L), (13, L, 3, 1, 12, 5, L), (6, 3 * L, 3, 1, 1, 40, L),
              (5, L, 1, 1, 1, 14, L)]  # the last: a 1 x 196 row, 7 tiles of 28 pixels (the most a tile holds)
    for c, oc, k, s, d, hw, block in shapes:
        w, x, b, sw, args = block_case(c, oc, k, s, d, hw, block, dtype, g)
        msg = f"{config} {dtype} {(c, oc, k, s, d, hw, block)}"
        # by default not on a one-tap call whose (flattened) row holds >= 1024 pixels: panels are as fast there
        vector = config != "" or k > 1 or hw * hw < 1024
        for xin in (x, x.contiguous(memory_format=torch.channels_last)):
            before = C.cpu_sparse_panel_calls()
            out = torch.ops.adapmtl.sparse_conv2d(xin, sw.row_ptr, sw.col_idx, sw.values, b, *args)
            assert C.cpu_sparse_panel_calls()[3] == before[3] + vector, msg  # the channel-vector tiles ran
            assert_conv_close(out, x, w, b, s, d * (k // 2), d, msg=msg)
        r = torch.randn_like(out)
        for lo, hi in [(0.0, None), (-0.5, 0.5)]:
            fused = torch.ops.adapmtl.sparse_conv2d_fused(x, sw.row_ptr, sw.col_idx, sw.values, b, *args, r, lo, hi)
            unfused = torch.clamp(torch.ops.adapmtl.sparse_conv2d(x, sw.row_ptr, sw.col_idx, sw.values, b, *args) + r,
                                  lo, hi)
            torch.testing.assert_close(fused, unfused, rtol=0, atol=0, msg=msg)  # the same operations, in order
        lin_w = w.flatten(1)
        lsw = SparseWeight.from_dense(lin_w)
        for batch in (1, 17, 29, 64, 1024):
            xl = torch.randn(batch, lin_w.shape[1], generator=g, dtype=dtype)
            before = C.cpu_sparse_panel_calls()[3]
            out = torch.ops.adapmtl.sparse_linear(xl, lsw.row_ptr, lsw.col_idx, lsw.values, b, lin_w.shape[1])
            assert C.cpu_sparse_panel_calls()[3] == before + (config != "" or batch < 1024), msg
            assert_linear_close(out, xl, lin_w, b, msg=f"linear {msg} batch {batch}")
    # one channel of one group loses a weight its group keeps (a zero inside a block, as training or BatchNorm folding
    # can leave): the group stores that column with a zero for the channel, and channel vectors still run, by default
    # and forced; a sampled check may miss the group, the encoding does not
    w = block_pruned(96, 11, 3, L, 0.3, dtype, g)
    row, col = 5 * L + 3, int(w[5 * L + 3].flatten().nonzero()[0])
    w.view(96, -1)[row, col] = 0
    x = torch.randn(1, 11, 14, 14, generator=g, dtype=dtype)
    sw = SparseWeight.from_dense(w)

    def vectors_ran(inp):
        before = C.cpu_sparse_panel_calls()[3]
        out = torch.ops.adapmtl.sparse_conv2d(inp, sw.row_ptr, sw.col_idx, sw.values, None, [96, 11, 3, 3], [1, 1],
                                              [1, 1], [1, 1])
        return C.cpu_sparse_panel_calls()[3] - before, out

    ran, out = vectors_ran(x)
    assert ran == 1
    assert_conv_close(out, x, w, None, 1, 1, 1, msg=f"a zero inside a block {config}")
    # an inf in x that the padded zero would read: that stored zero is not the weight's (pruned weights are
    # structural: 0 * inf must not reach the channel), so the call runs another tile, as the torch backend computes
    c_in, tap = divmod(col, 9)
    x[0, c_in, 7, 7] = float("inf")
    ran, out = vectors_ran(x)
    assert ran == 0
    ky, kx = divmod(tap, 3)
    assert torch.isfinite(out[0, row, 8 - ky, 8 - kx])  # reads the inf only through the weight the channel lacks
    torch.testing.assert_close(out, sparse_conv2d(x, sw, None, 1, 1, backend="torch"), equal_nan=True,
                               msg=f"inf beside a padded zero {config}")
    # the same weight as a linear layer (batch 5): padded channel vectors, and another tile for an inf input
    lsw = SparseWeight.from_dense(w.flatten(1))
    for vectors in (1, 0):
        xl = torch.randn(5, 99, generator=g, dtype=dtype)
        if not vectors:
            xl[2, col] = float("inf")
        before = C.cpu_sparse_panel_calls()[3]
        out = torch.ops.adapmtl.sparse_linear(xl, lsw.row_ptr, lsw.col_idx, lsw.values, None, 99)
        assert C.cpu_sparse_panel_calls()[3] - before == vectors
        torch.testing.assert_close(out, sparse_linear(xl, lsw, backend="torch"), equal_nan=True, msg=f"linear {config}")
        assert torch.isfinite(out[2, row])  # only the weight the channel lacks reads the inf
    # 8 x 1 blocks at density 0.1: a group of 16 channels is two blocks, ~1.9 columns stored per non-zero, more than
    # channel vectors pay for (kVectorsMaxFill): by default another tile runs; forced, channel vectors, padded
    w = block_pruned(96, 11, 3, L // 2, 0.1, dtype, g)
    x = torch.randn(1, 11, 14, 14, generator=g, dtype=dtype)
    sw = SparseWeight.from_dense(w)
    ran, out = vectors_ran(x)
    assert ran == (config != "")
    assert_conv_close(out, x, w, None, 1, 1, 1, msg=f"half blocks {config}")


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
def test_the_kernel_runs_panels_where_the_weight_shares_its_columns(monkeypatch):
    """By default: panels of 4 where a panel's loaded inputs feed >= 1.3 multiply-adds on average (weights pruned
    in blocks of >= 2 output channels, unstructured ones from ~17% density) on a map of >= 1024 output pixels,
    one channel per tile for an unstructured weight at 90% (a panel finds ~1.2) or on a smaller map (the panel's
    plan costs more than it saves there), and one channel under a forced panel=1."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", "")
    C = _ext.cpu_extension()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 32, 32, generator=g)

    def ran(w, inp=x, padding=1):
        before = C.cpu_sparse_panel_calls()
        sparse_conv2d(inp, SparseWeight.from_dense(w), None, 1, padding, backend="cpp")
        return tuple(a - b for a, b in zip(C.cpu_sparse_panel_calls(), before))

    assert ran(block_pruned(64, 64, 3, 4, 0.1, gen=g), x[..., :31, :32]) == (1, 0, 0, 0)  # 992 output pixels

    assert ran(block_pruned(64, 64, 3, 4, 0.1, gen=g)) == (0, 1, 0, 0)
    assert ran(block_pruned(64, 64, 3, 8, 0.1, gen=g)) == (0, 1, 0, 0)  # 16 channels: two 8-blocks, not uniform
    assert ran(block_pruned(64, 64, 3, 1, 0.1, gen=g)) == (1, 0, 0, 0)
    assert ran(block_pruned(64, 64, 3, 2, 0.1, gen=g)) == (0, 1, 0, 0)  # ~2.1 per loaded input
    assert ran(block_pruned(64, 64, 3, 1, 0.35, gen=g)) == (0, 1, 0, 0)  # unstructured at 65%: ~1.7
    assert ran(block_pruned(64, 64, 3, 1, 0.35, gen=g), x[..., :31, :32]) == (1, 0, 0, 0)
    # a vector of output channels (16 fp32) holding one column set: channel-vector tiles, on any map
    assert ran(block_pruned(64, 64, 3, 16, 0.1, gen=g)) == (0, 0, 0, 1)
    assert ran(block_pruned(64, 64, 3, 32, 0.1, gen=g), x[..., :11, :11]) == (0, 0, 0, 1)
    assert ran(block_pruned(64, 64, 1, 16, 0.1, gen=g), padding=0) == (0, 1, 0, 0)  # one tap, a 1024-pixel row
    assert ran(block_pruned(64, 64, 3, 8, 0.1, dtype=torch.float64, gen=g), x.double()) == (0, 0, 0, 1)
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", "panel=1")
    assert ran(block_pruned(64, 64, 3, 4, 0.1, gen=g)) == (1, 0, 0, 0)
    assert ran(block_pruned(64, 64, 3, 16, 0.1, gen=g)) == (1, 0, 0, 0)
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", "panel=8")
    assert ran(block_pruned(64, 64, 3, 1, 0.1, gen=g)) == (0, 0, 1, 0)


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("rows", ["auto", "1", "2", "3", "5", "8"])
@pytest.mark.parametrize("layout", ["tap", "channel"])
def test_cpp_kernel_tall_tiles_on_narrow_maps(rows, layout, monkeypatch):
    """Rows of one vector (maps up to 16 fp32 / 8 fp64 columns wide, MobileNetV2's 11x11 heads) take tiles of up to
    8 rows (by default as many as fit, balanced over the row groups): every height, with a last row group shorter
    than the rest, dead taps of a dilated conv (tap-major skips them per row group), stride 2, channels-last input,
    several channel blocks, and the epilogue; also where a forced height exceeds what the row's vectors allow."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", f"layout={layout},rows={rows},min_segment=1")
    g = torch.Generator().manual_seed(31)
    # (n, c, oc, k, stride, dilation, h, w)
    shapes = [(1, 40, 19, 3, 1, 6, 11, 11), (2, 9, 7, 3, 1, 1, 13, 16), (1, 12, 5, 3, 2, 1, 33, 7),
              (1, 24, 9, 1, 1, 1, 17, 5), (1, 10, 6, 3, 1, 2, 3, 8), (2, 30, 11, 3, 1, 4, 29, 12),
              (1, 8, 4, 5, 1, 1, 9, 30)]  # the last: two vectors per fp32 row, so a forced height is capped at 2
    for n, c, oc, k, s, d, h, w in shapes:
        for dtype in (torch.float32, torch.float64):
            weight = pruned((oc, c, k, k), 0.35, dtype, g, empty_rows=1)
            x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
            b = torch.randn(oc, generator=g, dtype=dtype)
            p = d * (k // 2)
            sw = SparseWeight.from_dense(weight)
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                out = sparse_conv2d(xin, sw, b, s, p, d, backend="cpp")
                assert_conv_close(out, x, weight, b, s, p, d, msg=f"rows={rows} {layout} {(n, c, oc, k, s, d, h, w)}")
            res = torch.randn_like(out)
            got = sparse_conv2d(x, sw, b, s, p, d, backend="cpp", residual=res, clamp=(0.0, 6.0))
            want = (sparse_conv2d(x, sw, b, s, p, d, backend="cpp") + res).clamp(0.0, 6.0)
            assert torch.equal(got, want), f"epilogue rows={rows} {layout} {(n, c, oc, k, s, d, h, w)}"


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("config", ["layout=diagonal", "rows=9", "rows=0", "rows=2.5", "min_segment=0", "oc_chunk=1.5", "l1_budget=7",
                                    "panel=3", "panel=2", "layout=tap,panel=4",
                                    "speed=max", "layout"])
def test_cpp_kernel_rejects_a_bad_forced_config(monkeypatch, config):
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    sw = SparseWeight.from_dense(pruned((4, 3, 3, 3), 0.5))
    with pytest.raises(ValueError, match="ADAPMTL_CPU_SPARSE_CONFIG must be comma-separated key=value pairs"):
        sparse_conv2d(torch.randn(1, 3, 8, 8), sw, None, 1, 1, backend="cpp")


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
def test_compiles_without_graph_breaks():
    sw = SparseWeight.from_dense(pruned((5, 3, 3, 3), 0.4))
    x = torch.randn(2, 3, 9, 9)
    fn = torch.compile(lambda t: sparse_conv2d(t, sw, None, 2, 1, backend="cpp"), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), F.conv2d(x, sw.to_dense(), None, 2, 1))


# --------------------------------------------------------------------------------------------
# Modules


def test_sparse_modules_from_dense_and_str():
    from adapmtl.nn import STRConv2d, STRLinear

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2)
    conv.weight.data[conv.weight.abs() < 0.1] = 0
    x = torch.randn(2, 6, 13, 12)
    with torch.no_grad():
        torch.testing.assert_close(SparseConv2d.from_dense(conv)(x), conv(x))
        str_conv = STRConv2d.from_dense(conv, init=-2.0)  # sigmoid(-2) = 0.12: prunes many weights
        eff = str_conv.effective_weight()
        sparse = SparseConv2d.from_dense(str_conv)
        assert sparse.sparsity == pytest.approx(1 - torch.count_nonzero(eff).item() / eff.numel())
        torch.testing.assert_close(sparse(x), F.conv2d(x, eff, conv.bias, 2, 2, 2))
        lin = STRLinear.from_dense(nn.Linear(7, 4), init=-2.0)
        y = torch.randn(3, 7)
        torch.testing.assert_close(SparseLinear.from_dense(lin)(y), F.linear(y, lin.effective_weight(), lin.bias))
        # buffers follow .to() and round-trip through state_dict
        sparse64 = SparseConv2d.from_dense(conv).to(torch.float64)
        assert sparse64.values.dtype == torch.float64 and sparse64.row_ptr.dtype == torch.int32
        torch.testing.assert_close(sparse64(x.double()), conv.double()(x.double()))
        other = SparseConv2d.from_dense(conv.float())
        other.load_state_dict(SparseConv2d.from_dense(conv).state_dict())
    with pytest.raises(TypeError, match="'conv'"):
        SparseConv2d.from_dense(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_reference_bound_catches_an_error_beyond_pytorchs_own():
    """The bound the tests above use fails on an output a few float32 ulps of the scale beyond PyTorch's."""
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(1, 8, 9, 9, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    good = F.conv2d(x, w, None, 1, 1)
    assert_conv_close(good, x, w, None, 1, 1, 1)
    scale = F.conv2d(x.double().abs(), w.double().abs(), None, 1, 1).max().item()
    bad = good.clone()
    bad[0, 0, 4, 4] += 64 * torch.finfo(torch.float32).eps * scale
    with pytest.raises(AssertionError, match="max error"):
        assert_conv_close(bad, x, w, None, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- dead taps
def _brute_margin(size, k, s, p, d):
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out <= 0:
        return 0
    live = [any(0 <= o * s - p + t * d < size for o in range(out)) for t in range(k)]
    m = 0
    while 2 * (m + 1) < k and not live[m] and not live[k - 1 - m] and p - (m + 1) * d >= 0:
        m += 1
    return m


def test_dead_tap_margin_by_enumeration():
    from adapmtl.ops.sparse_conv import dead_tap_margin

    cases = [(size, k, s, p, d) for size in range(1, 14) for k in (1, 2, 3, 5, 7) for s in (1, 2, 3)
             for p in range(0, 14) for d in (1, 2, 5, 6, 12)]
    assert [dead_tap_margin(*c) for c in cases] == [_brute_margin(*c) for c in cases]
    assert dead_tap_margin(11, 3, 1, 24, 24) == 1 and dead_tap_margin(41, 3, 1, 6, 6) == 0


@pytest.mark.parametrize("backend,device", PAIRS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cin,cout,k,d,s,hw", [(8, 6, 3, 12, 1, (11, 11)), (4, 4, 3, 24, 1, (11, 30)),
                                               (4, 5, 5, 3, 2, (4, 4)), (3, 4, 3, 6, 1, (5, 9))])
def test_dead_taps_are_skipped_at_any_input_size(backend, device, cin, cout, k, d, s, hw):
    """A conv whose outer taps read only padding at this size runs without them (the MobileNetV2 heads' 3x3
    convs with dilation >= 11 on 11x11 maps are 1x1 convs), and a larger input, where they are live, runs whole."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=d * (k // 2), dilation=d).to(device)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.5).to(conv.weight.dtype))
    layer = SparseConv2d.from_dense(conv, backend=backend)
    for h, w in (hw, (hw[0] + 2 * d + 3, hw[1] + 2 * d + 3), hw):
        x = torch.randn(2, cin, h, w, device=device)
        with torch.no_grad():
            out = layer(x)
        assert_conv_close(out, x, conv.weight, conv.bias, (s, s), (d * (k // 2),) * 2, (d, d), msg=f"{h}x{w}")
    assert any(v is not None for v in layer.__dict__["_trimmed_by_margin"][1].values())  # a trimmed weight ran
    with torch.no_grad():  # a new weight (in place): the trimmed copy is made again
        layer.values.mul_(2)
        conv.weight.mul_(2)
        x = torch.randn(1, cin, *hw, device=device)
        assert_conv_close(layer(x), x, conv.weight, conv.bias, (s, s), (d * (k // 2),) * 2, (d, d), msg="rewritten")


@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")
@pytest.mark.parametrize("config", ["", "layout=tap", "layout=channel", "panel=4"])
def test_the_cpp_kernel_drops_dead_taps_itself(config, monkeypatch):
    """The op itself (a compiled or exported program calls it, without SparseConv2d's trimmed copy) runs a conv
    without the outer taps that read only padding: a 3x3 conv with dilation and padding 10^5 on an 11x11 map is the 1x1 it leaves,
    whose whole padded input would not fit the kernel's int32 offsets; a larger map, where they live, runs whole;
    an inf on a dropped tap still gives NaN where it reads padding."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 6, 3, 3, generator=g) * (torch.rand(8, 6, 3, 3, generator=g) > 0.4)
    sw = SparseWeight.from_dense(w)
    op = torch.ops.adapmtl.sparse_conv2d
    for d, hw in ((100_000, (11, 11)), (12, (11, 11)), (12, (11, 30)), (3, (4, 4)), (6, (31, 31))):
        x = torch.randn(2, 6, *hw, generator=g)
        out = op(x, sw.row_ptr, sw.col_idx, sw.values, None, list(sw.shape), [1, 1], [d, d], [d, d])
        if d < 1000:
            assert_conv_close(out, x, w, None, 1, d, d, msg=f"d{d} {hw}")
        else:  # F.conv2d cannot take this padding either: the centre tap alone is the conv
            torch.testing.assert_close(out, F.conv2d(x, w[:, :, 1:2, 1:2]), rtol=1e-5, atol=1e-5)
    bad = w.clone()
    bad[0, 0, 0, 0] = float("inf")  # a dropped tap on 11x11 with dilation 12
    swb = SparseWeight.from_dense(bad)
    x = torch.randn(1, 6, 11, 11, generator=g)
    out = op(x, swb.row_ptr, swb.col_idx, swb.values, None, list(swb.shape), [1, 1], [12, 12], [12, 12])
    want = F.conv2d(x, bad, None, 1, 12, 12)
    assert torch.equal(out.isnan(), want.isnan()) and out[0, 0].isnan().all()
    torch.testing.assert_close(out[0, 1:], want[0, 1:])


def test_a_non_finite_weight_on_a_dead_tap_keeps_its_nan():
    w = torch.zeros(2, 1, 3, 3)
    w[0, 0, 0, 0] = float("inf")  # reads only padding on a 4x4 map with dilation 6
    w[1, 0, 1, 1] = 1.0
    layer = SparseConv2d(SparseWeight.from_dense(w), padding=6, dilation=6)
    x = torch.ones(1, 1, 4, 4)
    with torch.no_grad():
        out = layer(x)
    want = F.conv2d(x, w, None, 1, 6, 6)
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out[0, 0]).all()
    torch.testing.assert_close(out[0, 1], want[0, 1])


# ---- CPU capabilities ----------------------------------------------------------------------------------------
# The C++ kernels are compiled once per capability (csrc/cpu/sparse_conv_tiles.h) and run torch's; a machine runs
# only its highest, so the lower ones run below under ATEN_CPU_CAPABILITY, this whole file in a process of its own.
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="x86-64 capabilities")
@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="the C++ extension is not built")
def test_the_cpp_kernels_run_at_torch_cpu_capability():
    capability = torch.backends.cpu.get_cpu_capability()
    assert _ext.cpu_extension().cpu_capability() == capability
    if "ATEN_CPU_CAPABILITY" in os.environ:  # the run below: lowered, as asked
        assert capability == os.environ["ATEN_CPU_CAPABILITY"].upper()


@pytest.mark.skipif(not X86, reason="x86-64 capabilities")
@pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="the C++ extension is not built")
@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ, reason="already under a chosen capability")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_every_test_here_passes_at_a_lower_cpu_capability(capability):
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    run = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-v", "-x", "-p",
                          "no:cacheprovider"], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "test_the_cpp_kernels_run_at_torch_cpu_capability PASSED" in run.stdout
