"""The C++ sparse kernel's plan cache (csrc/cpu/plan_cache.h): kept plans are reused only for the same bytes.

A stale plan would be a silently wrong answer, so every test changes a weight the ways a user can -- in place
through .data and numpy (no version counter sees those), its pattern, a bad index -- and checks the result
against a fresh computation, as well as that the cache was (or was not) used.
"""
import pytest
import torch
import torch.nn.functional as F

from adapmtl import _ext
from adapmtl.ops import clear_cpu_sparse_plan_cache, cpu_sparse_plan_cache_info
from adapmtl.ops.sparse_conv import available_sparse_backends, sparse_conv2d, sparse_linear
from adapmtl.ops.sparse_weight import SparseWeight

pytestmark = pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("ADAPMTL_CPU_PLAN_CACHE_MB", raising=False)
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", "")
    clear_cpu_sparse_plan_cache()
    yield
    clear_cpu_sparse_plan_cache()


def pruned(shape, density, gen, block=1):
    live = torch.rand(-(-shape[0] // block), *shape[1:], generator=gen) < density
    return torch.randn(*shape, generator=gen) * live.repeat_interleave(block, 0)[: shape[0]]


def conv(x, sw, padding=1, dilation=1):
    return sparse_conv2d(x, sw, None, 1, padding, dilation, backend="cpp")


def expected(x, sw, padding=1, dilation=1):
    return F.conv2d(x.double(), sw.to_dense().double(), None, 1, padding, dilation).float()


def check(out, x, sw, **kw):
    torch.testing.assert_close(out, expected(x, sw, **kw), rtol=1e-4, atol=1e-4)


# (weight block, input size): one channel per tile, 4-channel panels (>= 1,024 output pixels), channel-vector tiles
CASES = [pytest.param(1, 12, id="one-channel"), pytest.param(4, 33, id="panels"),
         pytest.param(16, 12, id="channel-vectors")]
KERNEL = {1: 0, 4: 1, 16: 3}  # the index of cpu_sparse_panel_calls() each case runs


@pytest.mark.parametrize("block,size", CASES)
def test_a_repeated_call_reuses_its_plan_and_gives_the_same_bits(block, size):
    g = torch.Generator().manual_seed(0)
    sw = SparseWeight.from_dense(pruned((32 if block == 16 else 12, 8, 3, 3), 0.2, g, block))
    x = torch.randn(2, 8, size, size, generator=g)
    C = _ext.cpu_extension()
    before = C.cpu_sparse_panel_calls()[KERNEL[block]]
    first = conv(x, sw)
    assert C.cpu_sparse_panel_calls()[KERNEL[block]] - before == 1  # the case runs the kernel it names
    info = cpu_sparse_plan_cache_info()
    assert (info["hits"], info["misses"], info["plans"]) == (0, 1, 1) and info["bytes"] > 0
    for _ in range(3):
        assert torch.equal(conv(x, sw), first)
    assert cpu_sparse_plan_cache_info()["hits"] == 3
    check(first, x, sw)
    # another input size is another plan; the first one is still kept
    conv(x[..., :-1, :-2], sw)
    assert cpu_sparse_plan_cache_info()["plans"] == 2


@pytest.mark.parametrize("block,size", CASES)
def test_a_weight_changed_in_place_is_never_run_with_a_stale_plan(block, size):
    g = torch.Generator().manual_seed(1)
    sw = SparseWeight.from_dense(pruned((32 if block == 16 else 12, 8, 3, 3), 0.2, g, block))
    x = torch.randn(1, 8, size, size, generator=g)
    conv(x, sw)
    changes = [
        lambda: sw.values.data.mul_(-2.0),  # no version-counter bump
        lambda: sw.values.numpy().__setitem__(0, 7.5),  # memory written outside torch
        lambda: sw.values.data.__setitem__(-1, 0.0),  # a stored zero
    ]
    for i, change in enumerate(changes):
        change()
        before = cpu_sparse_plan_cache_info()
        check(conv(x, sw), x, sw)
        after = cpu_sparse_plan_cache_info()
        assert after["hits"] + after["misses"] == before["hits"] + before["misses"] + 1 and after["plans"] == 1, i
        if block == 4:  # a panel's plan holds the values: encoded again
            assert after["misses"] == before["misses"] + 1, i


def test_a_plan_reading_the_values_in_place_follows_them_and_keeps_only_the_structure():
    """A 1x1 conv's one-channel plan reads the weight's values at run time: a value change reuses it (and is
    seen), a structure change does not; only row_ptr and col_idx are kept with it, not the values."""
    g = torch.Generator().manual_seed(7)
    sw = SparseWeight.from_dense(pruned((256, 512, 1, 1), 0.3, g))
    x = torch.randn(1, 512, 5, 7, generator=g)
    check(conv(x, sw, padding=0), x, sw, padding=0)
    # structure (rp, ci) and offsets: ~8 bytes per non-zero; with a copy of the values it would be ~16
    assert cpu_sparse_plan_cache_info()["bytes"] < 12 * sw.nnz + (64 << 10)
    sw.values.data.mul_(3.0)
    check(conv(x, sw, padding=0), x, sw, padding=0)
    assert cpu_sparse_plan_cache_info()["hits"] == 1
    k0, k1 = int(sw.row_ptr[0]), int(sw.row_ptr[1])
    assert 0 < k1 - k0 < 512
    moved = torch.arange(512 - (k1 - k0), 512, dtype=torch.int32)
    if torch.equal(moved, sw.col_idx[k0:k1]):
        moved = torch.arange(k1 - k0, dtype=torch.int32)
    sw.col_idx.data[k0:k1] = moved
    check(conv(x, sw, padding=0), x, sw, padding=0)
    assert cpu_sparse_plan_cache_info()["misses"] == 2


def test_a_changed_pattern_is_encoded_again_and_a_bad_index_still_raises():
    g = torch.Generator().manual_seed(2)
    sw = SparseWeight.from_dense(pruned((6, 5, 3, 3), 0.3, g))
    x = torch.randn(1, 5, 9, 9, generator=g)
    conv(x, sw)
    # move every non-zero of row 0 to other (sorted, distinct) columns
    k0, k1 = int(sw.row_ptr[0]), int(sw.row_ptr[1])
    sw.col_idx.data[k0:k1] = torch.arange(k1 - k0, dtype=torch.int32) * 2
    check(conv(x, sw), x, sw)
    sw.col_idx.data[k0] = 5 * 9  # past the last column: checked again, not run from the kept plan
    with pytest.raises(ValueError, match="col_idx"):
        conv(x, sw)


def test_a_new_weight_at_a_freed_ones_address_is_not_confused_with_it():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 10, 10, generator=g)
    for trial in range(6):  # the allocator hands back the same addresses often; correct either way
        sw = SparseWeight.from_dense(pruned((8, 8, 3, 3), 0.25, g))
        check(conv(x, sw), x, sw, padding=1)
        del sw


def test_linear_plans_follow_the_batch_and_the_weight():
    g = torch.Generator().manual_seed(4)
    w = pruned((20, 37), 0.2, g)
    sw = SparseWeight.from_dense(w)
    for batch in (1, 5, 1, 33, 5):
        x = torch.randn(batch, 37, generator=g)
        torch.testing.assert_close(sparse_linear(x, sw, None, backend="cpp"), x @ sw.to_dense().t(), rtol=1e-4,
                                   atol=1e-4)
    # batches 1 and 5 pack into the same 16-lane row, so they share a plan; 33 needs its own
    info = cpu_sparse_plan_cache_info()
    assert (info["hits"], info["misses"]) == (3, 2)
    sw.values.data.add_(1.0)
    x = torch.randn(5, 37, generator=g)
    torch.testing.assert_close(sparse_linear(x, sw, None, backend="cpp"), x @ sw.to_dense().t(), rtol=1e-4, atol=1e-4)


def test_the_budget_bounds_what_is_kept_and_zero_turns_it_off(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, 12, 12, generator=g)
    weights = [SparseWeight.from_dense(pruned((256, 64, 3, 3), 0.5, g)) for _ in range(4)]  # ~0.6-1.2 MB kept each
    monkeypatch.setenv("ADAPMTL_CPU_PLAN_CACHE_MB", "2")
    for sw in weights:
        check(conv(x, sw), x, sw)
    info = cpu_sparse_plan_cache_info()
    assert 1 <= info["plans"] < 4 and info["bytes"] <= 2 << 20
    monkeypatch.setenv("ADAPMTL_CPU_PLAN_CACHE_MB", "0")
    clear_cpu_sparse_plan_cache()
    for sw in weights[:2] * 2:
        check(conv(x, sw), x, sw)
    info = cpu_sparse_plan_cache_info()
    assert (info["hits"], info["misses"], info["plans"], info["bytes"]) == (0, 4, 0, 0)


def test_a_plan_larger_than_the_budget_is_used_and_not_kept(monkeypatch):
    g = torch.Generator().manual_seed(8)
    sw = SparseWeight.from_dense(pruned((512, 256, 3, 3), 0.5, g))  # ~590k non-zeros: several MB of plan
    x = torch.randn(1, 256, 6, 6, generator=g)
    monkeypatch.setenv("ADAPMTL_CPU_PLAN_CACHE_MB", "1")
    for _ in range(2):
        check(conv(x, sw), x, sw)
    info = cpu_sparse_plan_cache_info()
    assert (info["plans"], info["bytes"], info["hits"], info["misses"]) == (0, 0, 0, 2)


@pytest.mark.parametrize("bad", ["-1", "abc", "1e3", " 5", str(1 << 40)])
def test_a_bad_budget_is_an_error_naming_the_variable(bad, monkeypatch):
    sw = SparseWeight.from_dense(torch.randn(2, 3, 3, 3))
    monkeypatch.setenv("ADAPMTL_CPU_PLAN_CACHE_MB", bad)
    with pytest.raises(ValueError, match="ADAPMTL_CPU_PLAN_CACHE_MB"):
        conv(torch.randn(1, 3, 5, 5), sw)


def test_non_finite_weights_reading_padding_keep_their_nan():
    """A kept plan that skips dead taps must not hide an inf that reads zero padding (run_conv's rerun)."""
    g = torch.Generator().manual_seed(6)
    w = pruned((4, 3, 3, 3), 0.6, g)
    w[0, 0, 0, 0] = float("inf")
    sw = SparseWeight.from_dense(w)
    x = torch.randn(1, 3, 3, 3, generator=g)
    for _ in range(2):
        out = sparse_conv2d(x, sw, None, 1, 6, 6, backend="cpp")
        ref = F.conv2d(x, sw.to_dense(), None, 1, 6, 6)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
