"""adapmtl.ops.soft_threshold: every backend against the pure-PyTorch reference."""
import pytest
import torch

from adapmtl import _ext
from adapmtl.ops import resolve_backend, soft_threshold, soft_threshold_reference
from helpers import (
    HAS_CUDA,
    assert_sum_close,
    backend_device_pairs,
    compiled_backend_device_pairs,
    dtypes_of,
    param_backends,
    tolerances,
)

SHAPES = [(0,), (1,), (7,), (33, 17), (5, 3, 3, 3), (2, 3, 5, 7), (4099,), (64, 70, 3)]
PAIRS = backend_device_pairs()
COMPILED = compiled_backend_device_pairs()


def make(shape, dtype, device, seed=0, s_value=-2.0, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:  # a transposed view of a wider tensor with a step: neither contiguous nor dense
        w = torch.randn((*shape[::-1][:-1], 2 * shape[0]), generator=gen, dtype=torch.float64)
        w = w[..., ::2].permute(*reversed(range(len(shape))))
        assert w.shape == shape and not w.is_contiguous()
    # s in float32 unless the weights are float64 (as the layers do)
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(s_value, dtype=s_dtype, device=device)
    return w.to(device=device, dtype=dtype), s


def run(fn, w, s, grad_out, **kw):
    w = w.detach().requires_grad_(True)
    s = s.detach().requires_grad_(True)
    out = fn(w, s, **kw)
    out.backward(grad_out)
    return out.detach(), w.grad, s.grad


def all_cases(pairs):
    return [(b, d, dt) for b, d in pairs for dt in dtypes_of(b, d)]


# The kernels against the reference (backend="torch" is the reference itself: not a case here).
CASES = all_cases([(b, d) for b, d in PAIRS if b != "torch"])


# strided layouts need two dimensions to transpose: 1-d shapes run contiguous only
LAYOUTS = [(shape, contiguous) for shape in SHAPES for contiguous in (True, False) if contiguous or len(shape) >= 2]


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=[f"{b}-{d}-{str(t)[6:]}" for b, d, t in CASES])
@pytest.mark.parametrize("shape,contiguous", LAYOUTS, ids=[f"{s}-{'contig' if c else 'strided'}" for s, c in LAYOUTS])
@pytest.mark.parametrize("grad", ["exact", "ste"])
def test_matches_reference(backend, device, dtype, shape, contiguous, grad):
    w, s = make(shape, dtype, device, seed=hash(shape) % 1000, contiguous=contiguous)
    grad_out = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    out, gw, gs = run(soft_threshold, w, s, grad_out, grad=grad, backend=backend)
    ref, rgw, rgs = run(soft_threshold_reference, w.double(), s.double(), grad_out.double(), ste=grad == "ste")
    tol = tolerances(dtype)
    assert out.dtype == dtype and out.shape == w.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(gw.double(), rgw, **tol)
    assert gs.shape == s.shape and gs.dtype == s.dtype
    assert_grad_s_close(gs, w, s, grad_out, grad, msg=f"{backend} {dtype} {shape}")


def grad_s_parts(w, s, grad_out, grad):
    """(float64 dL/ds, PyTorch's own dL/ds in the inputs' dtypes, the float64 terms it sums)."""
    ste = grad == "ste"
    rgs = run(soft_threshold_reference, w.double(), s.double(), grad_out.double(), ste=ste)[2]
    torch_gs = run(soft_threshold_reference, w, s, grad_out, ste=ste)[2]
    g = torch.sigmoid(s.double())
    terms = g * (1 - g) * grad_out.double() * (w.double().abs() > g)
    return rgs, torch_gs, terms


def assert_grad_s_close(gs, w, s, grad_out, grad, msg=""):
    """dL/ds within PyTorch's own error in these dtypes against float64 (helpers.assert_sum_close)."""
    rgs, torch_gs, terms = grad_s_parts(w, s, grad_out, grad)
    assert_sum_close(gs, rgs, torch_gs, terms, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [7, 4099, 200_003])
def test_grad_s_bound_rejects_a_wrong_sign_and_a_dropped_mask(dtype, n):
    """The dL/ds bound above is tight enough to see the two plausible kernel bugs, at every size."""
    w, s = make((n,), dtype, "cpu", seed=n, s_value=-1.0)  # g ≈ 0.27: about a fifth of the weights pruned
    grad_out = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    rgs, torch_gs, terms = grad_s_parts(w, s, grad_out, "exact")
    assert_sum_close(torch_gs, rgs, torch_gs, terms)  # PyTorch's own value passes
    g = torch.sigmoid(s.double())
    unmasked = -g * (1 - g) * (grad_out.double() * w.double().sign()).sum()  # mask dropped
    for wrong, what in ((-rgs, "wrong sign"), (unmasked, "dropped mask")):
        with pytest.raises(AssertionError):
            assert_sum_close(wrong, rgs, torch_gs, terms, msg=what)


@param_backends(PAIRS)
def test_nnz_counts_nonzeros(backend, device):
    w, s = make((301, 13), torch.float32, device, s_value=-1.0)
    w[0, :5] = 0.0
    out, nnz = soft_threshold(w, s, backend=backend, return_nnz=True)
    assert nnz.dtype == torch.int64 and nnz.device == w.device and nnz.dim() == 0
    assert int(nnz) == int(torch.count_nonzero(out)) == int(torch.count_nonzero(soft_threshold_reference(w, s)))
    assert 0 < int(nnz) < w.numel()  # the threshold really prunes some and keeps some


@param_backends(PAIRS)
def test_exact_values_float32(backend, device):
    """Bit-exact forward in float32: same threshold, same arithmetic."""
    w, s = make((1000,), torch.float32, device, s_value=-1.5)
    assert torch.equal(soft_threshold(w, s, backend=backend), soft_threshold_reference(w, s))


@param_backends(PAIRS)
def test_nan_propagates(backend, device):
    w, s = make((10,), torch.float32, device)
    w[3] = float("nan")
    out, nnz = soft_threshold(w, s, backend=backend, return_nnz=True)
    assert torch.isnan(out[3]) and int(torch.isnan(out).sum()) == 1
    assert int(nnz) == int(torch.count_nonzero(soft_threshold_reference(w, s)))


@param_backends(PAIRS)
@pytest.mark.parametrize("grad", ["exact", "ste"])
def test_threshold_gradient_sums_over_layers_sharing_it(backend, device, grad):
    """dL/ds accumulates over every layer that uses the same s (SPEC §1)."""
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (50, 123, 7)]
    s = torch.tensor(-1.2, device=device, requires_grad=True)
    loss = sum((soft_threshold(w, s, grad=grad, backend=backend) * (i + 1)).sum() for i, w in enumerate(ws))
    loss.backward()
    total = s.grad.clone()
    expected = 0.0
    for i, w in enumerate(ws):
        s1 = s.detach().clone().requires_grad_()
        (soft_threshold_reference(w.detach(), s1) * (i + 1)).sum().backward()
        expected += float(s1.grad)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    g = torch.sigmoid(s.detach())
    mask = [(w.detach().abs() > g) for w in ws]
    by_formula = -g * (1 - g) * sum(((i + 1) * torch.sign(w.detach()) * m).sum() for i, (w, m) in enumerate(zip(ws, mask)))
    assert float(total) == pytest.approx(float(by_formula), rel=1e-5)
    for i, (w, m) in enumerate(zip(ws, mask)):
        want = torch.full_like(w, float(i + 1)) if grad == "ste" else (i + 1) * m.to(w.dtype)
        torch.testing.assert_close(w.grad, want)


@param_backends([p for p in PAIRS if torch.float64 in dtypes_of(*p)])
@pytest.mark.parametrize("grad", ["exact", "ste"])
def test_gradcheck_float64(backend, device, grad):
    gen = torch.Generator().manual_seed(1)
    # keep |w| away from the threshold: the function has kinks there
    w = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    w = torch.where(w.abs() < 0.35, w.sign() * 0.6, w).to(device).requires_grad_()
    s = torch.tensor(-0.5, dtype=torch.float64, device=device, requires_grad=True)  # g(s) ≈ 0.38
    if grad == "exact":
        assert torch.autograd.gradcheck(lambda w, s: soft_threshold(w, s, backend=backend), (w, s))
    else:
        # straight-through is not the derivative of the forward; check it against its definition instead
        out = soft_threshold(w, s, grad="ste", backend=backend)
        gw, = torch.autograd.grad(out.sum(), w)
        assert torch.equal(gw, torch.ones_like(w))
        assert torch.autograd.gradcheck(lambda s: soft_threshold(w.detach(), s, grad="ste", backend=backend), (s,))


@param_backends(COMPILED)
def test_empty_tensor(backend, device):
    w = torch.empty(0, 3, device=device, requires_grad=True)
    s = torch.tensor(-1.0, device=device, requires_grad=True)
    out, nnz = soft_threshold(w, s, backend=backend, return_nnz=True)
    assert out.shape == (0, 3) and int(nnz) == 0
    out.sum().backward()
    assert w.grad.shape == (0, 3) and float(s.grad) == 0.0


@param_backends(COMPILED)
def test_backward_is_deterministic(backend, device):
    w, s = make((200_003,), torch.float32, device)
    g = torch.randn_like(w)
    results = [run(soft_threshold, w, s, g, backend=backend)[2] for _ in range(2)]
    if backend == "cpp":  # independent of the thread count too
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results.append(run(soft_threshold, w, s, g, backend=backend)[2])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def _op_names(backend):
    if backend == "triton":
        return "soft_threshold_forward_triton", "soft_threshold_backward_triton"
    return "soft_threshold_forward", "soft_threshold_backward"


@param_backends(COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, device, dtype):
    fwd_name, bwd_name = _op_names(backend)
    fwd = getattr(torch.ops.adapmtl, fwd_name)
    bwd = getattr(torch.ops.adapmtl, bwd_name)
    w, s = make((6, 5), dtype, device)
    grad_out = torch.randn_like(w)
    for ste in (False, True):
        torch.library.opcheck(fwd, (w.requires_grad_(), s.requires_grad_(), ste))
        torch.library.opcheck(bwd, (grad_out, w.detach(), s.detach(), ste))


def test_auto_backend_choice():
    w = torch.randn(4)
    assert resolve_backend("auto", w) == ("cpp" if _ext.cpu_extension() is not None else "torch")
    assert resolve_backend("auto", w.half()) == "torch"  # cpp has no float16: fall back to the reference
    if HAS_CUDA:
        assert resolve_backend("auto", w.cuda()) in ("cuda", "triton")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(w=torch.arange(4)), TypeError, "argument 'w'"),
        (dict(w=[1.0, 2.0]), TypeError, "argument 'w'"),
        (dict(s=torch.zeros(2)), ValueError, "argument 's'"),
        (dict(s=torch.tensor(1)), TypeError, "argument 's'"),
        (dict(s=torch.zeros((), device="meta")), ValueError, "same device"),
        (dict(grad="straight"), ValueError, "argument 'grad'"),
        (dict(backend="cudnn"), ValueError, "argument 'backend'"),
        (dict(w=torch.randn(4, dtype=torch.float16), backend="cpp"), TypeError, "float16"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(w=torch.randn(4), s=torch.tensor(0.0))
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("grad", "backend") if k in args}
    with pytest.raises(error, match=match):
        soft_threshold(args["w"], args["s"], **extra)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA kernels")
def test_cuda_backend_on_cpu_tensor_is_a_clear_error():
    with pytest.raises((ValueError, _ext.ExtensionNotBuiltError), match="cuda|CUDA"):
        soft_threshold(torch.randn(3), torch.tensor(0.0), backend="cuda")


def test_cpp_kernel_rejects_bad_input_directly():
    """The C++ op checks its arguments too (no segfault when called without the Python layer)."""
    if _ext.cpu_extension() is None:
        pytest.skip("C++ extension not built")
    with pytest.raises(TypeError, match="'w'"):
        torch.ops.adapmtl.soft_threshold_forward(torch.arange(3), torch.tensor(0.0), False)
    with pytest.raises(ValueError, match="'s'"):
        torch.ops.adapmtl.soft_threshold_forward(torch.randn(3), torch.zeros(2), False)
    with pytest.raises(ValueError, match="'grad_out'"):
        torch.ops.adapmtl.soft_threshold_backward(torch.randn(4), torch.randn(3), torch.tensor(0.0), False)


@param_backends([p for p in COMPILED if p[0] != "cpp"])
@pytest.mark.parametrize("s_dtype", [torch.float16, torch.bfloat16])
def test_grad_s_in_a_half_precision_s(backend, device, s_dtype):
    """dL/ds is stored in s's dtype: a bfloat16 s under the Triton interpreter once got 0 (its float64 ->
    bfloat16 conversion), found by the block op's tests. Within two of s's ulps of the float64 value."""
    w, _ = make((301,), torch.float32, device, s_value=-1.0)
    s = torch.tensor(-1.0, dtype=s_dtype, device=device, requires_grad=True)
    G = torch.randn(301, generator=torch.Generator().manual_seed(2)).to(device)
    (soft_threshold(w, s, backend=backend) * G).sum().backward()
    s64 = s.detach().double().requires_grad_()
    (soft_threshold_reference(w.double(), s64) * G.double()).sum().backward()
    assert abs(float(s.grad) - float(s64.grad)) <= 2 * torch.finfo(s_dtype).eps * abs(float(s64.grad)) + 1e-6
