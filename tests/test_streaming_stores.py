"""The CPU soft threshold's streaming-store path (csrc/cpu/soft_threshold_cpu.cpp): the same results as the
reference and as the cached path, bit for bit, at every size, dtype and special value, in both grad modes."""
import os
import subprocess
import sys

import pytest
import torch

from adapmtl import _ext
from adapmtl.ops import available_backends, soft_threshold_reference

pytestmark = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="C++ extension not built")

# Sizes around the 16 / 8 lanes, one 16384-element chunk and several, each with a tail.
SIZES = (1, 7, 8, 15, 16, 17, 16384, 16384 + 3, 3 * 16384 + 17, 100003)
SCRIPT = r"""
import sys, torch
from adapmtl import _ext
from adapmtl.ops import soft_threshold
torch.manual_seed(0)
results = []
for dtype in (torch.float32, torch.float64):
    for n in SIZES:
        s = torch.tensor(-2.5, dtype=torch.float32)
        g = torch.sigmoid(s).to(dtype)
        w = torch.randn(2 * n, dtype=dtype)[::2] * 0.2  # a strided view: the op packs it
        special = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), float(g), -float(g)], dtype=dtype)
        w[: min(n, 7)] = special[: min(n, 7)]
        G = torch.randn(n, dtype=dtype)
        G[n // 2] = float("nan") if n > 1 else G[0]
        for grad in ("exact", "ste"):
            wg, sg = w.clone().requires_grad_(), s.clone().requires_grad_()
            out, nnz = soft_threshold(wg, sg, grad=grad, backend="cpp", return_nnz=True)
            grad_w, grad_s = torch.autograd.grad(out, [wg, sg], G)
            results.append(dict(dtype=dtype, n=n, grad=grad, w=w, s=s, G=G, out=out.detach(), nnz=int(nnz),
                                grad_w=grad_w, grad_s=grad_s))
torch.save({"results": results, "streamed": _ext.cpu_extension().soft_threshold_streamed_calls()}, sys.argv[1])
"""


def _results(tmp_path, mode):
    path = tmp_path / f"streaming-{mode}.pt"
    env = {**os.environ, "ADAPMTL_CPU_STREAMING_STORES": mode}
    code = f"SIZES = {SIZES!r}\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _assert_sum_close(got, want, G, what):
    """dL/ds sums O(n) terms in the element dtype: bounded by a few ulps of the sum of magnitudes."""
    got, want = float(got), float(want)
    if want != want:
        assert got != got, what
        return
    eps = torch.finfo(G.dtype).eps
    bound = 10 * eps * (float(G.double().nan_to_num(0).abs().sum()) * 0.25 + 1)
    bound += 4 * torch.finfo(torch.float32).eps * abs(want)  # s, and so dL/ds, is float32
    assert abs(got - want) <= bound, (what, got, want)


def _cpu_has_avx512f():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def _streamed():
    """(forward, backward) calls of this process that took the streaming path, as the extension counts them."""
    return _ext.cpu_extension().soft_threshold_streamed_calls()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    return {mode: _results(tmp, mode) for mode in ("0", "1")}


@pytest.fixture(scope="module")
def by_mode(runs):
    return {mode: run["results"] for mode, run in runs.items()}


@pytest.mark.parametrize("mode", ["0", "1"])
def test_the_setting_picks_the_path(runs, mode):
    """ADAPMTL_CPU_STREAMING_STORES=1 streams every call (where AVX-512 is), =0 none: the extension's count of
    streamed calls says which path ran, which equal results cannot."""
    calls = len(runs[mode]["results"])  # one forward and one backward each
    expect = calls if mode == "1" and _cpu_has_avx512f() else 0
    assert tuple(runs[mode]["streamed"]) == (expect, expect)


@pytest.mark.parametrize("mode", ["0", "1"])
def test_both_paths_match_the_reference(by_mode, mode):
    for r in by_mode[mode]:
        what = f"mode {mode} {r['dtype']} n={r['n']} {r['grad']}"
        w = r["w"].clone().requires_grad_()
        s = r["s"].clone().requires_grad_()
        ref = soft_threshold_reference(w, s, ste=r["grad"] == "ste")
        ref_w, ref_s = torch.autograd.grad(ref, [w, s], r["G"])
        torch.testing.assert_close(r["out"], ref.detach(), rtol=0, atol=0, equal_nan=True, msg=what)
        assert r["nnz"] == int((ref.detach() != 0).sum()), what  # NaN counts as a non-zero
        torch.testing.assert_close(r["grad_w"], ref_w, rtol=0, atol=0, equal_nan=True, msg=what)
        _assert_sum_close(r["grad_s"], ref_s, r["G"], what)


@pytest.mark.skipif(not _cpu_has_avx512f(), reason="streaming stores need AVX-512: both modes run the cached path")
def test_streaming_matches_the_cached_path_bit_for_bit(by_mode):
    for cached, streamed in zip(by_mode["0"], by_mode["1"]):
        what = f"{cached['dtype']} n={cached['n']} {cached['grad']}"
        assert torch.equal(_bits(cached["out"]), _bits(streamed["out"])), what  # -0 and NaN signs too
        assert torch.equal(_bits(cached["grad_w"]), _bits(streamed["grad_w"])), what
        assert cached["nnz"] == streamed["nnz"], what
        # dL/ds sums each chunk in another order: equal to rounding
        _assert_sum_close(streamed["grad_s"], cached["grad_s"], cached["G"], what)


def test_sizes_past_the_thresholds_stream_by_default_and_stay_exact():
    """Unset (by size): a w_hat above half of L3 (counting at most 16 MiB per thread) and a dL/dw above the
    cores' L2 take the streaming path."""
    l3 = min(_ext.cpu_extension().cpu_cache_sizes()[2], (16 << 20) * max(1, torch.get_num_threads()))
    n = l3 // 2 // 4 + 4099
    if n * 4 > 256 << 20:
        pytest.skip(f"this machine's L3 ({l3} bytes) makes the test tensor too large")
    w = (torch.randn(n) * 0.1).requires_grad_()
    s = torch.tensor(-2.0, requires_grad=True)
    env_mode = os.environ.get("ADAPMTL_CPU_STREAMING_STORES")
    assert env_mode in (None, ""), "the test expects the default (by size)"
    from adapmtl.ops import soft_threshold

    before = _streamed()
    out = soft_threshold(w, s, backend="cpp")
    G = torch.randn(n)
    grad_w, grad_s = torch.autograd.grad(out, [w, s], G)
    after = _streamed()
    if _cpu_has_avx512f():  # both passes took the streaming path
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    w2, s2 = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = soft_threshold_reference(w2, s2)
    ref_w, ref_s = torch.autograd.grad(ref, [w2, s2], G)
    assert torch.equal(out.detach(), ref.detach()) and torch.equal(grad_w, ref_w)
    _assert_sum_close(grad_s, ref_s, G, f"n={n}")


def test_small_sizes_stay_cached_by_default():
    """A w_hat and dL/dw that fit in L2 are stored through the cache (streaming them measured slower)."""
    assert os.environ.get("ADAPMTL_CPU_STREAMING_STORES") in (None, ""), "the test expects the default (by size)"
    from adapmtl.ops import soft_threshold

    w = torch.randn(4096).requires_grad_()
    s = torch.tensor(-2.0, requires_grad=True)
    before = _streamed()
    torch.autograd.grad(soft_threshold(w, s, backend="cpp"), [w, s], torch.randn(4096))
    assert _streamed() == before


def test_a_bad_setting_names_the_variable():
    code = "import torch; from adapmtl.ops import soft_threshold; soft_threshold(torch.randn(8), torch.tensor(0.), backend='cpp')"
    env = {**os.environ, "ADAPMTL_CPU_STREAMING_STORES": "yes"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "ADAPMTL_CPU_STREAMING_STORES must be 0 or 1" in done.stderr, done.stderr[-2000:]
