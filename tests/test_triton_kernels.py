"""Kernel-level tests of adapmtl.triton_kernels against the pure-PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be set before the kernel
modules are imported (conftest.py does it too; repeated here so the file also runs on its own).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import adapmtl  # noqa: E402,F401  (loads the op schemas)
from adapmtl.ops import soft_threshold_reference  # noqa: E402
from adapmtl.triton_kernels import soft_threshold as st  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET was not 1 when the kernels were imported",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
B = st.BLOCK_SIZE
SHAPES = [(0,), (1,), (7,), (B,), (2 * B + 3,), (33, 17), (3, 5, 7, 11), (2, 0, 3)]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make_w(shape, dtype, seed, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    if contiguous or len(shape) < 2:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:  # transposed view of a wider tensor, every other column: neither contiguous nor dense
        w = torch.randn((*shape[::-1][:-1], 2 * shape[0]), generator=gen, dtype=torch.float64)
        w = w[..., ::2].permute(*reversed(range(len(shape))))
        assert w.shape == shape and (w.numel() == 0 or not w.is_contiguous())
    return w.to(device=DEVICE, dtype=dtype)


def make_s(value, w_dtype):
    # s in float32 unless w is float64, as the STR layers do
    return torch.tensor(value, dtype=torch.float64 if w_dtype == torch.float64 else torch.float32, device=DEVICE)


def reference_grads(grad_out, w, s, ste):
    """Autograd of the reference at w's and s's own dtypes: the same mask as the kernel."""
    w = w.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    soft_threshold_reference(w, s, ste=ste).backward(grad_out)
    return w.grad, s.grad


def grad_s_float64(grad_out, w, s):
    """-g(1-g) * sum(G * sign(w) * m) in float64, with the mask of w's dtype (g rounded to w's dtype, as
    the reference's type promotion does), and the magnitude sum the rounding error scales with."""
    g = torch.sigmoid(s.detach().reshape(()))
    mask = (w.abs() - g.to(w.dtype)) > 0
    terms = grad_out.double() * torch.sign(w.double()) * mask.double()
    gd = g.double()
    return float(-(gd * (1 - gd)) * terms.sum()), float(gd * (1 - gd) * terms.abs().sum())


# ------------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_forward_bit_exact_and_nnz(dtype, shape, contiguous):
    w = make_w(shape, dtype, seed=sum(shape) + 7, contiguous=contiguous)
    s = make_s(-1.0, dtype)
    out, nnz = st.soft_threshold_forward(w, s)
    ref = soft_threshold_reference(w, s)
    assert out.shape == w.shape and out.dtype == dtype and out.device == w.device and out.is_contiguous()
    # same threshold, one rounding: bit-identical to PyTorch in every dtype (ties included for bf16/fp16)
    assert torch.equal(out, ref)
    assert nnz.dtype == torch.int64 and nnz.dim() == 0 and nnz.device == w.device
    assert int(nnz) == int(torch.count_nonzero(ref))
    if w.numel() > 100:  # the threshold really prunes some and keeps some
        assert 0 < int(nnz) < w.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_threshold_extremes(dtype):
    w = make_w((1001,), dtype, seed=1)
    w[:10] = 0.0
    # g = sigmoid(-1000) = 0: the identity (nothing shrunk); zeros stay zero
    out, nnz = st.soft_threshold_forward(w, make_s(-1000.0, dtype))
    assert torch.equal(out, w) and int(nnz) == int(torch.count_nonzero(w)) == 991
    # g = sigmoid(1000) = 1: everything with |w| <= 1 is pruned, the rest is shrunk by 1
    out, nnz = st.soft_threshold_forward(w, make_s(1000.0, dtype))
    assert int(nnz) == int((w.abs() > 1).sum())
    assert torch.equal(out, soft_threshold_reference(w, make_s(1000.0, dtype)))


@pytest.mark.parametrize("w_dtype,s_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float64), (torch.float64, torch.float32),
                                             (torch.float16, torch.float16)], ids=str)
def test_mixed_dtypes_follow_reference_promotion(w_dtype, s_dtype):
    """A 0-d s does not promote w: g is rounded to w's dtype first, in the kernel as in the reference."""
    w = make_w((B + 5,), w_dtype, seed=2)
    s = torch.tensor(-0.7, dtype=s_dtype, device=DEVICE)
    out, nnz = st.soft_threshold_forward(w, s)
    ref = soft_threshold_reference(w, s)
    assert out.dtype == w_dtype and torch.equal(out, ref) and int(nnz) == int(torch.count_nonzero(ref))
    grad_out = make_w((B + 5,), w_dtype, seed=3)
    gw, gs = st.soft_threshold_backward(grad_out, w, s, False)
    rgw, _ = reference_grads(grad_out, w, s, False)
    assert torch.equal(gw, rgw) and gs.dtype == s_dtype
    want, scale = grad_s_float64(grad_out, w, s)
    assert abs(float(gs) - want) <= 2e-3 * scale + 1e-12  # loosest: s in float16


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_propagates_and_counts(dtype):
    w = make_w((B + 9,), dtype, seed=4)
    w[3] = float("nan")
    w[B + 4] = float("nan")
    s = make_s(-1.0, dtype)
    out, nnz = st.soft_threshold_forward(w, s)
    assert torch.isnan(out[3]) and torch.isnan(out[B + 4]) and int(torch.isnan(out).sum()) == 2
    assert int(nnz) == int(torch.count_nonzero(soft_threshold_reference(w, s)))
    grad_out = make_w((B + 9,), dtype, seed=5)
    gw, gs = st.soft_threshold_backward(grad_out, w, s, False)
    # NaN fails |w| > g: no gradient through it (as autograd of the reference), and dL/ds stays finite
    assert gw[3] == 0 and gw[B + 4] == 0 and torch.isfinite(gs).all()
    rgw, _ = reference_grads(grad_out, w, s, False)
    assert torch.equal(gw, rgw)


# ------------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("ste", [False, True], ids=["exact", "ste"])
def test_backward_matches_reference(dtype, shape, contiguous, ste):
    seed = sum(shape) + 11
    w = make_w(shape, dtype, seed=seed, contiguous=contiguous)
    grad_out = make_w(shape, dtype, seed=seed + 1, contiguous=not contiguous)
    s = make_s(-1.3, dtype)
    gw, gs = st.soft_threshold_backward(grad_out, w, s, ste)
    rgw, rgs = reference_grads(grad_out, w, s, ste)
    assert gw.shape == w.shape and gw.dtype == dtype and gw.is_contiguous()
    # grad_w is G or G * m: no arithmetic, so exact in every dtype
    assert torch.equal(gw, rgw)
    assert gs.shape == s.shape and gs.dtype == s.dtype and gs.device == s.device
    want, scale = grad_s_float64(grad_out, w, s)
    # float32 partial sums (float64 for float64); the final sum and -g(1-g) in float64
    rtol = 1e-13 if dtype == torch.float64 else 2e-6
    assert abs(float(gs) - want) <= rtol * scale + 1e-30
    if dtype in (torch.float32, torch.float64):  # the reference itself sums in w's dtype
        torch.testing.assert_close(gs, rgs, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_backward_threshold_shape_one_element_tensor():
    w = make_w((5, 3), torch.float32, seed=6)
    s = torch.full((1,), -1.0, device=DEVICE)
    grad_out = torch.ones_like(w)
    gw, gs = st.soft_threshold_backward(grad_out, w, s, False)
    assert gs.shape == (1,)
    want, _ = grad_s_float64(grad_out, w, s)
    assert float(gs) == pytest.approx(want, rel=1e-6)
    gw, gs = st.soft_threshold_backward(grad_out[:0], w[:0], s, True)
    assert gw.shape == (0, 3) and gs.shape == (1,) and float(gs) == 0.0


def test_deterministic():
    """Partial sums in fixed slots, summed in a fixed order: two runs are bitwise equal."""
    w = make_w((3 * B + 17,), torch.float32, seed=8)
    grad_out = make_w((3 * B + 17,), torch.float32, seed=9) * 1e3
    s = make_s(-0.5, torch.float32)
    first = st.soft_threshold_forward(w, s) + st.soft_threshold_backward(grad_out, w, s, False)
    second = st.soft_threshold_forward(w, s) + st.soft_threshold_backward(grad_out, w, s, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b) and a.dtype == b.dtype


def test_inputs_untouched():
    w = make_w((100,), torch.float32, seed=10)
    s = make_s(-1.0, torch.float32)
    w0, s0 = w.clone(), s.clone()
    st.soft_threshold_forward(w, s)
    st.soft_threshold_backward(torch.ones_like(w), w, s, True)
    assert torch.equal(w, w0) and torch.equal(s, s0)


# ------------------------------------------------------------------------------------------------
# argument checks


def test_bad_arguments_raise_clear_errors(monkeypatch):
    """The launchers trust their arguments; direct calls of the registered ops are checked (csrc/common.h)."""
    fwd, bwd = torch.ops.adapmtl.soft_threshold_forward_triton, torch.ops.adapmtl.soft_threshold_backward_triton
    w = make_w((10,), torch.float32, seed=12)
    s = make_s(-1.0, torch.float32)
    with pytest.raises(TypeError, match="argument 'w'.*floating"):
        fwd(torch.ones(3, dtype=torch.int32, device=DEVICE), s, False)
    with pytest.raises((TypeError, RuntimeError), match="'w'"):  # the op's schema refuses a list
        fwd([1.0, 2.0], s, False)
    with pytest.raises(TypeError, match="argument 's'.*floating"):
        fwd(w, torch.tensor(1, device=DEVICE), False)
    with pytest.raises(TypeError, match="argument 'w'"):  # a float dtype the Triton kernels do not have
        fwd(w.to(torch.float8_e5m2), s, False)
    with pytest.raises(ValueError, match="argument 's'.*exactly one value"):
        fwd(w, torch.zeros(2, device=DEVICE), False)
    with pytest.raises(ValueError, match="argument 'grad_out'.*shape"):
        bwd(torch.ones(11, device=DEVICE), w, s, False)
    with pytest.raises(TypeError, match="argument 'grad_out'.*dtype"):
        bwd(w.double(), w, s, False)
    with pytest.raises((TypeError, RuntimeError), match="'ste'"):  # the op's schema: a bool
        bwd(w, w, s, "exact")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors.*argument 'w'"):
            fwd(w, s, False)
    else:
        with pytest.raises(ValueError, match="same device"):
            fwd(w, s.cpu(), False)


# ================================================================================================
# sparse convolution / linear (inference): against F.conv2d / F.linear on the dense weight

import torch.nn.functional as F  # noqa: E402

from torch.nn.modules.utils import _pair  # noqa: E402


def conv(x, row_ptr, col_idx, values, bias, weight_shape, stride, padding, dilation):
    """The registered op (checked arguments) over the Triton launcher, with int-or-pair arguments."""
    return torch.ops.adapmtl.sparse_conv2d_triton(x, row_ptr, col_idx, values, bias, list(weight_shape),
                                                  list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)))


linear = torch.ops.adapmtl.sparse_linear_triton

SPARSE_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def to_csr(weight):
    """CSR rows per output channel, built by hand: row_ptr int32, col_idx int32 (row-major order), values."""
    rows = weight.reshape(weight.shape[0], -1)
    nonzero = rows != 0
    row_ptr = torch.zeros(rows.shape[0] + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = torch.cumsum(nonzero.sum(1), 0)
    col_idx = nonzero.nonzero()[:, 1].to(torch.int32)
    return row_ptr, col_idx, rows[nonzero]


def pruned_weight(shape, dtype, seed, keep=0.4, empty_rows=(1,)):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    w[torch.rand(shape, generator=gen) > keep] = 0
    for r in empty_rows:
        if r < shape[0]:
            w[r] = 0
    return w.to(device=DEVICE, dtype=dtype)


def randn(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def dense_conv(x, w, b, stride, padding, dilation):
    # the reference in float64 on the same (already rounded) inputs
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)


# (N, C_in, H, W, C_out, (KH, KW), stride, padding, dilation)
CONV_CASES = [
    (1, 3, 5, 7, 4, (1, 1), 1, 0, 1),
    (3, 5, 6, 5, 3, (1, 1), 2, 0, 1),
    (3, 4, 12, 11, 6, (3, 3), 1, 1, 1),  # 36 taps per row > BLOCK_K, 132 pixels > BLOCK_P
    (1, 3, 9, 8, 5, (3, 3), 2, 1, 1),
    (1, 2, 10, 9, 3, (3, 3), 1, 2, 2),
    (1, 2, 13, 12, 3, (3, 3), 1, 24, 24),  # ASPP rate 24 on a map smaller than the dilation: most taps padding
    (1, 2, 30, 29, 2, (3, 3), 1, 18, 18),
    (3, 3, 11, 13, 4, (7, 7), 2, 3, 1),  # the ResNet stem
    (1, 3, 9, 10, 4, (3, 1), (1, 2), (1, 0), (2, 1)),  # non-square kernel, per-axis stride/padding/dilation
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"N{c[0]}-k{c[5][0]}x{c[5][1]}-s{c[6]}-p{c[7]}-d{c[8]}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sparse_conv2d_matches_conv2d(case, with_bias):
    N, C_in, H, W, C_out, (KH, KW), stride, padding, dilation = case
    dtype = torch.float32
    x = randn((N, C_in, H, W), dtype, seed=H * W)
    w = pruned_weight((C_out, C_in, KH, KW), dtype, seed=C_out + KH)
    b = randn((C_out,), dtype, seed=3) if with_bias else None
    row_ptr, col_idx, values = to_csr(w)
    assert row_ptr[2] == row_ptr[1]  # row 1 is empty
    out = conv(x, row_ptr, col_idx, values, b, list(w.shape), stride, padding, dilation)
    ref = dense_conv(x, w, b, stride, padding, dilation)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[dtype])
    if with_bias:  # the empty row gives exactly its bias
        assert torch.equal(out[:, 1], b[1].expand_as(out[:, 1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_conv2d_dtypes(dtype):
    x = randn((2, 4, 9, 10), dtype, seed=21)
    w = pruned_weight((5, 4, 3, 3), dtype, seed=22, keep=0.6)
    b = randn((5,), dtype, seed=23)
    out = conv(x, *to_csr(w), b, list(w.shape), 1, 1, 1)
    ref = dense_conv(x, w, b, 1, 1, 1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[dtype])


def test_sparse_conv2d_non_contiguous_input_and_dense_weight():
    x = randn((2, 9, 3, 11), torch.float32, seed=31).permute(0, 3, 1, 2)[:, ::2]  # [2, 6, 9, 3], strided
    assert not x.is_contiguous()
    w = randn((4, 6, 3, 3), torch.float32, seed=32)  # nothing pruned: 54 taps per row
    out = conv(x, *to_csr(w), None, [4, 6, 3, 3], (2, 1), (1, 2), (1, 1))
    ref = dense_conv(x, w, None, (2, 1), (1, 2), (1, 1))
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[torch.float32])


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sparse_conv2d_channels_last_in_and_out(with_bias):
    """Channels-last input is read in place and gives channels-last output (what the op layer's fake says)."""
    x = randn((3, 4, 9, 10), torch.float32, seed=35).to(memory_format=torch.channels_last)
    w = pruned_weight((5, 4, 3, 3), torch.float32, seed=36)
    b = randn((5,), torch.float32, seed=37) if with_bias else None
    out = conv(x, *to_csr(w), b, [5, 4, 3, 3], 2, 1, 1)
    ref = dense_conv(x, w, b, 2, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[torch.float32])
    out = conv(x.contiguous(), *to_csr(w), b, [5, 4, 3, 3], 2, 1, 1)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[torch.float32])


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sparse_conv2d_fully_pruned(with_bias):
    x = randn((3, 2, 5, 5), torch.float32, seed=41)
    w = torch.zeros((4, 2, 3, 3), device=DEVICE)
    b = randn((4,), torch.float32, seed=42) if with_bias else None
    row_ptr, col_idx, values = to_csr(w)
    assert col_idx.numel() == 0
    out = conv(x, row_ptr, col_idx, values, b, [4, 2, 3, 3], 1, 1, 1)
    assert out.shape == (3, 4, 5, 5)
    assert torch.equal(out, dense_conv(x, w, b, 1, 1, 1).float())


def test_sparse_conv2d_empty_batch_and_deterministic():
    w = pruned_weight((3, 2, 3, 3), torch.float32, seed=51)
    csr = to_csr(w)
    empty = torch.empty((0, 2, 5, 5), device=DEVICE)
    assert conv(empty, *csr, None, [3, 2, 3, 3], 1, 1, 1).shape == (0, 3, 5, 5)
    x = randn((2, 2, 17, 9), torch.float32, seed=52)
    first = conv(x, *csr, None, [3, 2, 3, 3], 1, 1, 1)
    assert torch.equal(first, conv(x, *csr, None, [3, 2, 3, 3], 1, 1, 1))


def test_sparse_conv2d_bad_index_contributes_nothing():
    """A corrupt column index is masked out instead of read out of bounds."""
    x = randn((1, 2, 6, 6), torch.float32, seed=61)
    w = pruned_weight((3, 2, 3, 3), torch.float32, seed=62, keep=0.7, empty_rows=())
    row_ptr, col_idx, values = to_csr(w)
    bad = col_idx.clone()
    bad[0] = 10**6
    w_without = w.reshape(3, -1).clone()
    w_without[0, int(col_idx[0])] = 0
    out = conv(x, row_ptr, bad, values, None, [3, 2, 3, 3], 1, 1, 1)
    ref = dense_conv(x, w_without.reshape(w.shape), None, 1, 1, 1)
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[torch.float32])


def test_sparse_conv2d_bad_arguments():
    x = randn((1, 2, 6, 6), torch.float32, seed=71)
    w = pruned_weight((3, 2, 3, 3), torch.float32, seed=72)
    row_ptr, col_idx, values = to_csr(w)
    shape = [3, 2, 3, 3]
    with pytest.raises(ValueError, match="'weight_shape'"):
        conv(x, row_ptr, col_idx, values, None, [3, 2, 3], 1, 1, 1)
    with pytest.raises(ValueError, match="'stride'.*>= 1"):
        conv(x, row_ptr, col_idx, values, None, shape, 0, 1, 1)
    with pytest.raises(ValueError, match="'dilation'"):
        conv(x, row_ptr, col_idx, values, None, shape, 1, 1, (1, 1, 1))
    with pytest.raises(TypeError, match="'row_ptr' must be int32"):
        conv(x, row_ptr.long(), col_idx, values, None, shape, 1, 1, 1)
    with pytest.raises(TypeError, match="'col_idx' must be int32"):
        conv(x, row_ptr, col_idx.long(), values, None, shape, 1, 1, 1)
    with pytest.raises(TypeError, match="'values' must have the dtype of 'x'"):
        conv(x, row_ptr, col_idx, values.double(), None, shape, 1, 1, 1)
    with pytest.raises(TypeError, match="'x' must be float32"):
        conv(x.int(), row_ptr, col_idx, values, None, shape, 1, 1, 1)
    with pytest.raises(ValueError, match="'row_ptr' must have shape \\[4\\]"):
        conv(x, row_ptr[:-1], col_idx, values, None, shape, 1, 1, 1)
    with pytest.raises(ValueError, match="'values' must be 1-D with the length of 'col_idx'"):
        conv(x, row_ptr, col_idx, values[:-1], None, shape, 1, 1, 1)
    with pytest.raises(ValueError, match="'bias' must have shape \\[3\\]"):
        conv(x, row_ptr, col_idx, values, torch.zeros(4, device=DEVICE), shape, 1, 1, 1)
    with pytest.raises(TypeError, match="'bias' must have the dtype"):
        bias64 = torch.zeros(3, device=DEVICE, dtype=torch.float64)
        conv(x, row_ptr, col_idx, values, bias64, shape, 1, 1, 1)
    with pytest.raises(ValueError, match="'x' must have shape \\[N, 2, H, W\\]"):
        conv(x[:, :1], row_ptr, col_idx, values, None, shape, 1, 1, 1)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(x, row_ptr, col_idx, values, None, shape, 1, 0, 4)


# (x shape, out_features)
LINEAR_CASES = [((7, 20), 9), ((2, 3, 20), 5), ((20,), 4), ((37, 1), 3), ((0, 20), 4)]


@pytest.mark.parametrize("x_shape,out_features", LINEAR_CASES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sparse_linear_matches_linear(x_shape, out_features, with_bias):
    in_features = x_shape[-1]
    x = randn(x_shape, torch.float32, seed=81)
    w = pruned_weight((out_features, in_features), torch.float32, seed=82, keep=0.5)
    b = randn((out_features,), torch.float32, seed=83) if with_bias else None
    out = linear(x, *to_csr(w), b, in_features)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, **SPARSE_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_linear_dtypes_and_strided_input(dtype):
    x = randn((40, 19), dtype, seed=91)[::2, 1:]  # [20, 18], strided rows; 20 rows > BLOCK_M
    w = pruned_weight((6, 18), dtype, seed=92, keep=0.9)  # some rows with > BLOCK_K/2 entries
    b = randn((6,), dtype, seed=93)
    out = linear(x, *to_csr(w), b, 18)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), F.linear(x.double(), w.double(), b.double()), **SPARSE_TOL[dtype])


def test_sparse_linear_long_rows_and_fully_pruned():
    x = randn((5, 300), torch.float32, seed=95)
    w = randn((3, 300), torch.float32, seed=96)  # 300 non-zeros per row: many BLOCK_K steps
    out = linear(x, *to_csr(w), None, 300)
    torch.testing.assert_close(out.double(), F.linear(x.double(), w.double()), **SPARSE_TOL[torch.float32])
    zero = torch.zeros((3, 300), device=DEVICE)
    b = randn((3,), torch.float32, seed=97)
    assert torch.equal(linear(x, *to_csr(zero), b, 300), b.expand(5, 3))
    assert torch.equal(linear(x, *to_csr(zero), None, 300), torch.zeros(5, 3, device=DEVICE))


def test_sparse_linear_bad_arguments():
    x = randn((4, 6), torch.float32, seed=99)
    w = pruned_weight((3, 6), torch.float32, seed=98)
    row_ptr, col_idx, values = to_csr(w)
    with pytest.raises(ValueError, match="'in_features' must be a positive int"):
        linear(x, row_ptr, col_idx, values, None, 0)
    with pytest.raises(ValueError, match="'x' must have shape \\[..., 7\\]"):
        linear(x, row_ptr, col_idx, values, None, 7)
    with pytest.raises(ValueError, match="'row_ptr' must be 1-D"):
        linear(x, row_ptr[:0], col_idx, values, None, 6)
    with pytest.raises(TypeError, match="'values' must have the dtype of 'x'"):
        linear(x, row_ptr, col_idx, values.half(), None, 6)
