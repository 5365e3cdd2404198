"""The CUDA extension adapmtl._C_cuda: it is built wherever setup.py builds it, and importing it registers a
CUDA kernel for every op its sources implement. With a GPU, the soft-threshold kernels are also checked on
the cases that exercise their separate code paths (16-byte vectorised vs scalar loads, tails, dtype casts,
the grid cap, determinism). Numerical agreement on the shared shapes is in test_soft_threshold.py."""
import importlib
import os
import re
from pathlib import Path

import pytest
import torch

import adapmtl  # noqa: F401  (loads adapmtl._C: the op schemas)
from adapmtl.ops import soft_threshold_reference
from helpers import assert_sum_close

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

pytestmark = pytest.mark.skipif(torch.version.cuda is None, reason="torch has no CUDA: adapmtl._C_cuda is not built")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _schemas():
    return set(re.findall(r'm\.def\(\s*"(\w+)\(', (CSRC / "ops.cpp").read_text()))


def _cuda_impls():
    """Op names registered by `m.impl("name", ...)` inside TORCH_LIBRARY_IMPL(adapmtl, CUDA, m) blocks."""
    names = set()
    for path in sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp")):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(\s*adapmtl\s*,\s*CUDA\s*,\s*m\s*\)\s*\{(.*?)\n\}", path.read_text(), re.S):
            names.update(re.findall(r'm\.impl\(\s*"(\w+)"', block))
    return names


def _cuda_module():
    """The imported module; fails where setup.py would have built it, skips where it would not."""
    try:
        return importlib.import_module("adapmtl._C_cuda")
    except ImportError as exc:
        from torch.utils.cpp_extension import CUDA_HOME

        expected = not _flag("ADAPMTL_NO_CUDA") and CUDA_HOME is not None and any((CSRC / "cuda").glob("*.cu"))
        if expected or _flag("ADAPMTL_FORCE_CUDA"):
            pytest.fail(f"torch has CUDA and nvcc is at {CUDA_HOME}, so adapmtl._C_cuda should be built: {exc}")
        pytest.skip(f"adapmtl._C_cuda is not built (no nvcc or ADAPMTL_NO_CUDA=1): {exc}")


def test_sources_implement_schemas():
    impls, schemas = _cuda_impls(), _schemas()
    assert {"soft_threshold_forward", "soft_threshold_backward", "sparse_conv2d", "sparse_linear"} <= impls
    assert impls <= schemas, f"CUDA kernels for ops without a schema in ops.cpp: {sorted(impls - schemas)}"


def test_module_imports_and_registers_cuda_kernels():
    module = _cuda_module()
    assert "CUDA" in module.__doc__
    assert module.device_count() == torch.cuda.device_count()
    for name in sorted(_cuda_impls()):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adapmtl::{name}", "CUDA"), name


# ---------------------------------------------------------------------------------------------------------
# With a GPU: the CUDA soft-threshold kernels against the float64 reference.

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _reference(w, s, G, ste):
    """Float64 (out, grad_w, grad_s) of SPEC §1, with w and g rounded as the kernel sees them."""
    g = torch.sigmoid(s.reshape(())).to(w.dtype).double()
    wd = w.double()
    a = wd.abs() - g
    out = torch.where(a <= 0, torch.zeros_like(a), a).copysign(wd)
    m = (a > 0).double()
    gd = G.double()
    grad_w = gd if ste else gd * m
    gs = torch.sigmoid(s.double().reshape(()))
    grad_s = -gs * (1 - gs) * (gd * wd.sign() * m).sum()
    return out, grad_w, grad_s


def _check(w, s, G, ste=False):
    _cuda_module()
    out, nnz = torch.ops.adapmtl.soft_threshold_forward(w, s, ste)
    grad_w, grad_s = torch.ops.adapmtl.soft_threshold_backward(G, w, s, ste)
    ref_out, ref_gw, ref_gs = _reference(w, s, G, ste)
    tol = TOL[w.dtype]
    assert out.shape == w.shape and out.dtype == w.dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref_out, **tol)
    assert nnz.dtype == torch.int64 and nnz.dim() == 0 and nnz.device == w.device
    assert int(nnz) == int(torch.count_nonzero(out))
    assert grad_w.shape == w.shape and grad_w.dtype == w.dtype
    torch.testing.assert_close(grad_w.double(), ref_gw, **tol)
    assert grad_s.shape == s.shape and grad_s.dtype == s.dtype
    # dL/ds within PyTorch's own error in these dtypes (the reference's autograd on the GPU) against float64
    w_, s_ = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    (torch_gs,) = torch.autograd.grad(soft_threshold_reference(w_, s_, ste=ste), [s_], G)
    g = torch.sigmoid(s.double().reshape(()))
    terms = g * (1 - g) * G.double() * (w.double().abs() > torch.sigmoid(s.reshape(())).to(w.dtype).double())
    assert_sum_close(grad_s, ref_gs, torch_gs, terms, msg=f"{w.dtype} n={w.numel()} ste={ste}")
    return out, nnz, grad_w, grad_s


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 8, 9, 1023, 4096 * 9 + 5, 3_000_001])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_paths_tails_and_dtypes(dtype, n, offset):
    # offset 1 shifts the data pointer off 16 bytes: the scalar path; n covers tails of every vector width
    # and, at 3M, more vectors than the capped grid has threads (several grid-stride iterations).
    gen = torch.Generator(device="cuda").manual_seed(n)
    base = torch.randn(n + offset, generator=gen, device="cuda").to(dtype)
    w = base[offset:]
    w[: min(n, 4)] = 0.0
    G = torch.randn(n + offset, generator=gen, device="cuda").to(dtype)[offset:]
    s = torch.tensor([-1.5], device="cuda")
    _check(w, s, G, ste=False)
    _check(w, s, G, ste=True)


@needs_gpu
def test_nan_inf_non_contiguous_and_s_dtype():
    w = torch.randn(37, 41, device="cuda", dtype=torch.float16).t()  # non-contiguous
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), -float("inf")
    s = torch.tensor(-2.0, device="cuda", dtype=torch.float64)  # 0-d, another dtype than w
    out, nnz = torch.ops.adapmtl.soft_threshold_forward(w, s, False)
    assert torch.isnan(out[0, 0]) and out[1, 1] == float("inf") and out[2, 2] == -float("inf")
    assert int(nnz) == int(torch.count_nonzero(out))
    finite = torch.ones_like(w, dtype=torch.bool)
    finite[0, 0] = finite[1, 1] = finite[2, 2] = False
    G = torch.randn(w.shape, device="cuda", dtype=w.dtype)
    G[~finite] = 0
    w2 = torch.where(finite, w, torch.zeros_like(w))
    _check(w2, s, G)


@needs_gpu
def test_empty():
    _cuda_module()
    w = torch.empty(0, 3, device="cuda")
    s = torch.zeros(1, device="cuda")
    out, nnz = torch.ops.adapmtl.soft_threshold_forward(w, s, False)
    grad_w, grad_s = torch.ops.adapmtl.soft_threshold_backward(w, w, s, False)
    assert out.shape == (0, 3) and int(nnz) == 0 and grad_w.shape == (0, 3)
    assert grad_s.shape == (1,) and float(grad_s) == 0.0


@needs_gpu
def test_backward_bitwise_deterministic():
    _cuda_module()
    w = torch.randn(5_000_011, device="cuda")
    G = torch.randn_like(w)
    s = torch.tensor([-2.0], device="cuda")
    first = torch.ops.adapmtl.soft_threshold_backward(G, w, s, False)[1]
    for _ in range(3):
        assert torch.equal(torch.ops.adapmtl.soft_threshold_backward(G, w, s, False)[1], first)


@needs_gpu
def test_bad_arguments_raise():
    _cuda_module()
    w = torch.randn(10, device="cuda")
    with pytest.raises(ValueError, match="argument 's'"):
        torch.ops.adapmtl.soft_threshold_forward(w, torch.zeros(2, device="cuda"), False)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.adapmtl.soft_threshold_forward(w, torch.zeros(1), False)
    with pytest.raises(TypeError, match="argument 'w'"):
        torch.ops.adapmtl.soft_threshold_forward(w.int(), torch.zeros(1, device="cuda"), False)
    with pytest.raises(ValueError, match="argument 'grad_out'"):
        torch.ops.adapmtl.soft_threshold_backward(w[:5], w, torch.zeros(1, device="cuda"), False)


# ---------------------------------------------------------------------------------------------------------
# With a GPU: sparse_conv2d / sparse_linear against F.conv2d / F.linear on the dense weight.


def _csr(weight):
    """CSR over output channels of a dense weight (the layout of ops.cpp), built with plain torch ops."""
    flat = weight.reshape(weight.shape[0], -1)
    mask = flat != 0
    row_ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = mask.sum(1).cumsum(0)
    col_idx = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    return row_ptr, col_idx, flat[mask].contiguous()


def _pruned(shape, sparsity, dtype, gen):
    w = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64)
    w[torch.rand(shape, generator=gen, device="cuda", dtype=torch.float64) < sparsity] = 0
    w[0] = 0  # an empty row
    return w.to(dtype)


CONV_CASES = [
    # (N, C_in, H, W), (C_out, KH, KW), stride, padding, dilation
    ((1, 5, 9, 11), (7, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 16, 41, 41), (9, 3, 3), (1, 1), (24, 24), (24, 24)),
    ((1, 8, 41, 41), (6, 3, 3), (1, 1), (6, 12), (6, 12)),
    ((3, 6, 15, 17), (5, 7, 7), (2, 1), (3, 2), (1, 2)),
    ((16, 8, 9, 9), (6, 1, 1), (1, 1), (0, 0), (1, 1)),
    ((2, 3, 10, 13), (4, 1, 1), (2, 2), (0, 0), (1, 1)),
    ((1, 160, 20, 20), (300, 3, 3), (2, 2), (1, 1), (1, 1)),  # 1440 taps at 20% sparsity: rows longer than one staged chunk
    ((2, 64, 50, 50), (200, 1, 1), (1, 1), (0, 0), (1, 1)),  # many blocks: four pixels per thread
]
CONV_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}")
def test_sparse_conv2d_matches_conv2d(case, dtype):
    _cuda_module()
    (N, C_in, H, W), (C_out, KH, KW), stride, padding, dilation = case
    gen = torch.Generator(device="cuda").manual_seed(C_out * 1000 + KH)
    x = torch.randn(N, C_in, H, W, generator=gen, device="cuda").to(dtype)
    w = _pruned((C_out, C_in, KH, KW), 0.2 if C_in * KH * KW > 1024 else 0.9, dtype, gen)
    for bias in (None, torch.randn(C_out, generator=gen, device="cuda").to(dtype)):
        got = torch.ops.adapmtl.sparse_conv2d(x, *_csr(w), bias, list(w.shape), list(stride), list(padding), list(dilation))
        ref = torch.nn.functional.conv2d(x.double(), w.double(), None if bias is None else bias.double(), stride, padding, dilation)
        assert got.dtype == dtype and got.is_contiguous()
        scale = max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(got.double() / scale, ref / scale, **CONV_TOL[dtype])


@needs_gpu
def test_sparse_conv2d_channels_last_input_and_fully_pruned():
    _cuda_module()
    x = torch.randn(2, 4, 12, 12, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(3, 4, 3, 3, device="cuda")
    w[w.abs() < 1] = 0
    got = torch.ops.adapmtl.sparse_conv2d(x, *_csr(w), None, [3, 4, 3, 3], [1, 1], [1, 1], [2, 2])
    # laid out like the fake kernel says (and the CPU kernel does): channels_last in, channels_last out
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, None, 1, 1, 2), rtol=1e-4, atol=1e-4)
    got = torch.ops.adapmtl.sparse_conv2d(x.contiguous(), *_csr(w), None, [3, 4, 3, 3], [1, 1], [1, 1], [2, 2])
    assert got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, None, 1, 1, 2), rtol=1e-4, atol=1e-4)
    bias = torch.randn(3, device="cuda")
    zero = torch.zeros_like(w)
    got = torch.ops.adapmtl.sparse_conv2d(x, *_csr(zero), bias, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    assert torch.equal(got, bias.view(1, 3, 1, 1).expand(2, 3, 12, 12))
    empty = torch.ops.adapmtl.sparse_conv2d(x[:0], *_csr(w), None, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    assert empty.shape == (0, 3, 12, 12)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9), (100,)])
def test_sparse_linear_matches_linear(lead, dtype):
    _cuda_module()
    gen = torch.Generator(device="cuda").manual_seed(len(lead))
    x = torch.randn(*lead, 1024, generator=gen, device="cuda").to(dtype)
    w = _pruned((40, 1024), 0.9, dtype, gen)
    bias = torch.randn(40, generator=gen, device="cuda").to(dtype)
    for b in (None, bias):
        got = torch.ops.adapmtl.sparse_linear(x, *_csr(w), b, 1024)
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        assert got.shape == (*lead, 40) and got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, **CONV_TOL[dtype])


@needs_gpu
def test_sparse_conv_bad_arguments_raise():
    _cuda_module()
    x = torch.randn(1, 4, 8, 8, device="cuda")
    w = torch.randn(3, 4, 3, 3, device="cuda")
    row_ptr, col_idx, values = _csr(w)
    conv = torch.ops.adapmtl.sparse_conv2d
    with pytest.raises(TypeError, match="argument 'row_ptr'"):
        conv(x, row_ptr.long(), col_idx, values, None, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(TypeError, match="argument 'values'"):
        conv(x, row_ptr, col_idx, values.half(), None, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="argument 'x'"):
        conv(x[:, :3], row_ptr, col_idx, values, None, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="argument 'row_ptr'"):
        conv(x, row_ptr[:-1], col_idx, values, None, [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="argument 'stride'"):
        conv(x, row_ptr, col_idx, values, None, [3, 4, 3, 3], [0, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="argument 'bias'"):
        conv(x, row_ptr, col_idx, values, torch.zeros(4, device="cuda"), [3, 4, 3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv(x, row_ptr, col_idx, values, None, [3, 4, 3, 3], [1, 1], [0, 0], [5, 5])
    with pytest.raises(ValueError, match="argument 'x'"):
        torch.ops.adapmtl.sparse_linear(torch.randn(2, 5, device="cuda"), *_csr(torch.randn(3, 4, device="cuda")), None, 4)
