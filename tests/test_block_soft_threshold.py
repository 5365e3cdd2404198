"""The block (group) soft threshold (adapmtl/ops/block_soft_threshold.py): every backend against the reference
formula, the derived gradients against autograd (float64 gradcheck), the registered ops (opcheck), compile,
partial last blocks, NaN and all-zero blocks, and the argument checks."""
import pytest
import torch

from adapmtl.ops import soft_threshold
from adapmtl.ops.reference import block_soft_threshold_reference, soft_threshold_reference
from helpers import assert_close_to_reference, assert_sum_close, backend_device_pairs, param_backend_dtypes

PAIRS = [p for p in backend_device_pairs("block_soft_threshold") if p[0] != "torch"]
CPU_COMPILED = [b for b, d in PAIRS if d == "cpu"]  # the compiled backends that run the CPU tensors below
# (shape, block): partial last blocks, 1-d and 0-d weights, a block larger than the channels, block 1
CASES = [((7, 5, 3, 3), 4), ((16, 33), 8), ((5,), 2), ((9, 4, 1, 1), 16), ((13, 7), 1), ((1030, 3), 3), ((), 2),
         ((6, 0), 2), ((33, 17, 3, 3), 4)]


def _ops(backend):
    suffix = "_triton" if backend == "triton" else ""
    return (getattr(torch.ops.adapmtl, f"block_soft_threshold_forward{suffix}"),
            getattr(torch.ops.adapmtl, f"block_soft_threshold_backward{suffix}"))


def _inputs(shape, dtype, device, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    if strided and w.dim() == 2:  # a non-contiguous view: the transpose of a contiguous tensor
        w = torch.randn(shape[::-1], generator=g, dtype=torch.float64).t() * 0.5
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as the layers keep s
    return w.to(dtype).to(device), torch.tensor(-0.7, dtype=s_dtype, device=device)


@param_backend_dtypes(PAIRS)
def test_matches_the_reference_formula(backend, device, dtype):
    """Forward, non-zero count, dL/dw and dL/ds (exact and straight-through) against the float64 reference,
    within PyTorch's own error of the same formula in the dtype."""
    for i, (shape, block) in enumerate(CASES):
        for strided in (False, True):
            w, s = _inputs(shape, dtype, device, seed=i, strided=strided)
            for grad in ("exact", "ste"):
                ste = grad == "ste"
                w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()  # w, s: leaves without grad
                out, nnz = soft_threshold(w1, s1, block=(block, 1), grad=grad, backend=backend, return_nnz=True)
                w64, s64 = w.double().clone().requires_grad_(), s.double().clone().requires_grad_()
                ref = block_soft_threshold_reference(w64, s64, block, ste)
                wt, st = w.clone().requires_grad_(), s.clone().requires_grad_()
                theirs = block_soft_threshold_reference(wt, st, block, ste)
                msg = f"{backend} {dtype} {shape} block {block} {grad} strided={strided}"
                assert_close_to_reference(out, ref.detach(), theirs.detach(), w64.abs().detach() + 1, msg=msg)
                assert int(nnz) == int((out != 0).sum()), msg
                G = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                (out * G.to(dtype).to(device)).sum().backward()
                (ref * G.to(device)).sum().backward()
                (theirs * G.to(dtype).to(device)).sum().backward()
                assert_close_to_reference(w1.grad, w64.grad, wt.grad, G.abs().to(device) * 4, msg=msg + " dL/dw")
                assert_sum_close(s1.grad, s64.grad, st.grad, G.to(device) * w64.detach().abs(), msg=msg + " dL/ds")


def test_block_one_is_the_element_wise_op():
    w, s = _inputs((17, 9), torch.float64, "cpu", seed=3)
    torch.testing.assert_close(block_soft_threshold_reference(w, s, 1), soft_threshold_reference(w, s))
    for backend in CPU_COMPILED + ["torch"]:  # (1, 1) runs the element-wise op itself: bit for bit
        torch.testing.assert_close(soft_threshold(w, s, block=(1, 1), backend=backend),
                                   soft_threshold(w, s, backend=backend), rtol=0, atol=0)


def test_the_derived_gradient_is_autograd_of_the_formula():
    """dL/dw_B = (1 - g/n) G_B + g w_B (w_B . G_B) / n^3 on live blocks, 0 on dead ones, and dL/ds = -g(1-g)
    sum_live (w_B . G_B) / n, as written in the module's docstring, against autograd of the formula."""
    g_ = torch.Generator().manual_seed(0)
    w = (torch.randn(10, 6, generator=g_, dtype=torch.float64) * 0.4).requires_grad_()
    s = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    G = torch.randn(10, 6, generator=g_, dtype=torch.float64)
    (block_soft_threshold_reference(w, s, 4) * G).sum().backward()
    g = torch.sigmoid(s.detach())
    wb = torch.nn.functional.pad(w.detach(), (0, 0, 0, 2)).reshape(3, 4, 6)
    Gb = torch.nn.functional.pad(G, (0, 0, 0, 2)).reshape(3, 4, 6)
    n = wb.norm(dim=1, keepdim=True)
    dot = (wb * Gb).sum(1, keepdim=True)
    live = n > g
    want_w = torch.where(live, (1 - g / n) * Gb + g * wb * dot / n**3, torch.zeros_like(Gb))
    torch.testing.assert_close(w.grad, want_w.reshape(12, 6)[:10])
    torch.testing.assert_close(s.grad, -g * (1 - g) * torch.where(live, dot / n, torch.zeros_like(n)).sum())
    assert live.any() and not live.all()


@pytest.mark.parametrize("backend", ["torch"] + CPU_COMPILED)
@pytest.mark.parametrize("block", [1, 3, 4])
def test_gradcheck_float64(backend, block):
    w, s = _inputs((7, 3, 2), torch.float64, "cpu", seed=block)
    w, s = w.requires_grad_(), s.requires_grad_()
    # blocks away from the threshold (the formula is not differentiable where ||w_B|| = g)
    torch.autograd.gradcheck(lambda a, b: soft_threshold(a, b, block=block, backend=backend), (w, s))


@pytest.mark.parametrize("backend", CPU_COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype):
    fwd, bwd = _ops(backend)
    w, s = _inputs((9, 5), dtype, "cpu", seed=1)
    for ste in (False, True):
        torch.library.opcheck(fwd, (w.clone().requires_grad_(), s.clone().requires_grad_(), 4, ste))
        torch.library.opcheck(bwd, (torch.randn_like(w), w, s, 4, ste))


@pytest.mark.parametrize("backend", ["torch"] + CPU_COMPILED)
def test_compiles_without_graph_breaks(backend):
    w, s = _inputs((12, 7), torch.float32, "cpu", seed=2)
    w = w.requires_grad_()
    fn = torch.compile(lambda a, b: soft_threshold(a, b, block=(4, 1), backend=backend, return_nnz=True),
                       fullgraph=True, backend="eager")
    out, nnz = fn(w, s)
    torch.testing.assert_close(out, block_soft_threshold_reference(w, s, 4))
    assert int(nnz) == int((out != 0).sum())
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", ["torch"] + CPU_COMPILED)
def test_whole_blocks_are_zeroed_nan_blocks_stay_nan_and_zero_blocks_have_zero_gradient(backend):
    w = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.1, float("nan")], [0.1, 1.0], [0.0, 0.0]], requires_grad=True)
    s = torch.tensor(0.0, requires_grad=True)  # g = 0.5
    out, nnz = soft_threshold(w, s, block=2, backend=backend, return_nnz=True)
    # block 0 column 0: n = 5 > 0.5, scaled by 0.9; column 1: n = 0, zero; block 1: (0.1, 0.1) n < g -> zero,
    # column 1 has a NaN -> NaN; block 2 (the last, one channel): zeros
    want = torch.tensor([[2.7, 0.0], [3.6, 0.0], [0.0, float("nan")], [0.0, float("nan")], [0.0, 0.0]])
    torch.testing.assert_close(out, want, equal_nan=True)
    assert int(nnz) == 4
    out[:2].sum().backward()
    assert torch.isfinite(w.grad[:2]).all() and (w.grad[:2, 1] == 0).all()


@pytest.mark.parametrize("block,match", [((2, 2), "bi = 1"), (0, "1 <= bo"), (5000, "1 <= bo"), ("4", "int"),
                                         (True, "int"), ((4,), "pair"), ((4, 1.0), "pair")])
def test_bad_block_arguments_are_one_line_errors(block, match):
    with pytest.raises(ValueError, match=f"argument 'block'.*{match}"):
        soft_threshold(torch.randn(4, 3), torch.tensor(0.0), block=block)


@pytest.mark.parametrize("backend", CPU_COMPILED)
def test_direct_op_calls_are_checked(backend):
    fwd, _ = _ops(backend)
    with pytest.raises(ValueError, match="block"):
        fwd(torch.randn(4, 3), torch.tensor(0.0), 0, False)
    with pytest.raises((ValueError, TypeError), match="s"):
        fwd(torch.randn(4, 3), torch.zeros(2), 2, False)


# ---------------------------------------------------------------------------------------------- downstream


def _whole_blocks(w, block):
    """Whether every block of `block` rows of dim 0 (fewer in the last) at each column is all zero or all non-zero."""
    rows = w.reshape(w.shape[0], -1)
    for b in range(0, rows.shape[0], block):
        nz = rows[b:b + block] != 0
        if not (nz.all(0) | ~nz.any(0)).all():
            return False
    return True


def test_str_layers_threshold_blocks():
    from adapmtl.nn import STRConv2d, STRLinear

    torch.manual_seed(0)
    conv = STRConv2d(6, 10, 3, padding=1, init=-1.5, block=(4, 1))
    x = torch.randn(2, 6, 7, 7)
    want = torch.nn.functional.conv2d(x, block_soft_threshold_reference(conv.weight, conv.s, 4), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), want)
    assert _whole_blocks(conv.effective_weight(), 4) and int(conv.last_nnz) == int((conv.effective_weight() != 0).sum())
    assert "block=(4, 1)" in repr(conv)
    lin = STRLinear.from_dense(torch.nn.Linear(9, 7), init=-1.0, block=2)
    assert _whole_blocks(lin.effective_weight(), 2) and (lin.effective_weight() == 0).any()
    with pytest.raises(ValueError, match="STRConv2d: argument 'block'"):
        STRConv2d(3, 4, 3, block=(2, 3))


def test_sparsify_with_blocks_zeroes_whole_blocks_of_every_weight():
    import adapmtl
    from adapmtl.models import build_model

    model = build_model("tiny", ["depth", "normal"])
    adapmtl.sparsify(model, init=-2.5, block=4)
    pruned = adapmtl.pruned_weights(model)
    assert pruned and all(p.unit.block == 4 for p in pruned)
    model(torch.randn(1, 3, 32, 32))
    for p in pruned:
        assert _whole_blocks(p.effective(), 4), p.name
    report = adapmtl.sparsity_report(model)
    assert 0 < report.overall < 1
    with pytest.raises(ValueError, match="sparsify: argument 'block'"):
        adapmtl.sparsify(build_model("tiny", ["depth"]), block=0)


def test_a_run_with_blocks_trains_to_its_target_and_exports_to_channel_panels(synthetic_scenes, tmp_path):
    """prune.block=4 end to end: the controller reaches the target counting weights, every weight of the trained
    model is zero in whole blocks, and the exported model equals it; the C++ kernel runs a trained conv's blocks as
    panels of 4, or as channel vectors where its groups of 16 channels need at most 1.5 stored values per non-zero."""
    import adapmtl
    from adapmtl import _ext
    from adapmtl.train import Trainer
    from helpers import small_run_config

    cfg = small_run_config(synthetic_scenes(12, 4), tmp_path / "run", **{"prune.block": 4, "train.iterations": 12,
                                                                        "prune.target_sparsity": 0.6})
    tr = Trainer(cfg)
    results = tr.fit()
    assert abs(results["sparsity"]["overall"] - 0.6) < 0.05
    model = tr.model.eval()
    for name, layer in adapmtl.str_layers(model):
        assert layer.block == 4 and _whole_blocks(layer.effective_weight(), 4), name
    with pytest.raises(ValueError, match="prune.block"):
        small_run_config(synthetic_scenes(12, 4), tmp_path / "bad", **{"prune.block": 0})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = adapmtl.export_sparse(model, min_sparsity=0.0)(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    C = _ext.cpu_extension()
    if C is None:
        return
    # the packed weight of a trained conv: the C++ kernel finds its 4-channel blocks and runs panels of 4, or channel
    # vectors where a lightly pruned weight's groups of 16 channels hold nearly the same columns (kVectorsMaxFill)
    from adapmtl.ops import SparseWeight, sparse_conv2d

    name, conv = max(((n, m) for n, m in adapmtl.str_layers(model) if isinstance(m, torch.nn.Conv2d)),
                     key=lambda item: item[1].weight.shape[0])
    w = conv.effective_weight()
    xin = torch.randn(1, w.shape[1], 32, 32)  # >= 1024 output pixels: where the kernel picks panels
    before = C.cpu_sparse_panel_calls()
    out = sparse_conv2d(xin, SparseWeight.from_dense(w), None, 1, conv.padding, conv.dilation, backend="cpp")
    held = w.flatten(1) != 0
    groups = held[: held.shape[0] // 16 * 16].view(-1, 16, held.shape[1])
    fill = (groups.any(1).sum() * 16 / groups.sum()).item()  # stored per non-zero as channel vectors
    ran = [a - b for a, b in zip(C.cpu_sparse_panel_calls(), before)]
    assert ran == ([0, 0, 0, 1] if fill <= 1.5 else [0, 1, 0, 0]), (name, fill)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(xin, w, None, 1, conv.padding, conv.dilation))
