"""The C++ sparse conv's configurations and its autotuner (csrc/cpu/sparse_tuning.h): every configuration the
autotuner may pick computes the convolution, the tuner's choices are kept per process and in a cache file,
and a cache file is untrusted input."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from adapmtl import _ext
from adapmtl.ops import cpu_autotune_info, set_cpu_autotune
from adapmtl.ops.sparse_conv import available_sparse_backends, sparse_conv2d
from adapmtl.ops.sparse_weight import SparseWeight
from test_sparse_conv import DEAD_TAP_CASES, assert_conv_close, pruned

pytestmark = pytest.mark.skipif("cpp" not in available_sparse_backends("cpu"), reason="C++ sparse kernel not built")

# (n, c, oc, k, stride, padding, dilation, h, w, density, channels-last)
CASES = [(1, 33, 17, 3, 1, 1, 1, 11, 13, 0.3, False), (2, 20, 9, 3, 1, 12, 12, 21, 21, 0.2, True),
         (1, 64, 40, 1, 1, 0, 1, 9, 9, 0.1, False), (2, 7, 11, 5, 2, 2, 1, 17, 19, 0.5, False),
         (1, 96, 70, 3, 1, 6, 6, 13, 13, 0.1, False)]


def _inputs(case, dtype=torch.float32, seed=0):
    n, c, oc, k, s, p, d, h, w, density, cl = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = pruned((oc, c, k, k), density, dtype, g, empty_rows=1)
    b = torch.randn(oc, generator=g, dtype=dtype)
    return x, weight, b


@pytest.fixture
def tuner():
    set_cpu_autotune(False)
    _ext.cpu_extension().cpu_autotune_clear()
    yield
    set_cpu_autotune(False)
    _ext.cpu_extension().cpu_autotune_clear()


@pytest.mark.parametrize("config", _ext.cpu_extension().cpu_sparse_candidates(True) if _ext.cpu_extension() else [])
def test_every_configuration_the_autotuner_may_pick_matches_the_reference(config, monkeypatch):
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    cases = CASES + [(c["n"], c["c"], c["oc"], c["k"], c["stride"], c["pad"], c["dil"], c["h"], c["w"], 0.4, False)
                     for c in DEAD_TAP_CASES[:3]]
    for i, case in enumerate(cases):
        for dtype in (torch.float32, torch.float64) if i < 2 else (torch.float32,):
            x, w, b = _inputs(case, dtype, seed=i)
            _, _, _, _, s, p, d, *_ = case
            with torch.no_grad():
                out = sparse_conv2d(x, SparseWeight.from_dense(w), b, s, p, d, backend="cpp")
            assert_conv_close(out, x, w, b, s, p, d, msg=f"{config} {case} {dtype}")


def test_the_candidates_cover_both_layouts_tile_heights_and_this_machines_default():
    C = _ext.cpu_extension()
    with_tap, one_tap = C.cpu_sparse_candidates(True), C.cpu_sparse_candidates(False)
    # shapes: (channel-major, tap-major) x rows (auto, 2, 1), panels of 4 and 8 (channel-major), and channel-vector
    # tiles in either layout
    per_shape = len(one_tap) // 6
    assert len(one_tap) == 6 * per_shape and len(with_tap) == 10 * per_shape
    assert all("layout=channel" in c for c in one_tap)
    assert {"rows=auto", "rows=1", "rows=2", "panel=1", "panel=4", "panel=8", "panel=vector"} <= {
        part for c in with_tap for part in c.split(",")}
    # panels: channel-major only
    assert not any("layout=tap" in c and "panel=1" not in c and "panel=vector" not in c for c in with_tap)
    default = dict(kv.split("=") for kv in C.cpu_sparse_default_config().split(","))
    l1, l2, l3 = C.cpu_cache_sizes()
    assert int(default["l1_budget"]) == l1 * 5 // 8 and l1 >= 4096 and l3 >= l2 >= l1
    assert any(f"oc_chunk={default['oc_chunk']}" in c for c in with_tap)


def test_autotuning_picks_once_per_shape_and_stays_correct(tuner):
    set_cpu_autotune(True)
    x, w, b = _inputs(CASES[4])
    sw = SparseWeight.from_dense(w)
    with torch.no_grad():
        first = sparse_conv2d(x, sw, b, 1, 6, 6, backend="cpp")
        info = cpu_autotune_info()
        assert info["enabled"] and info["entries"] == 1 and info["searches"] == 1 and info["hits"] == 0
        second = sparse_conv2d(x, sw, b, 1, 6, 6, backend="cpp")
        assert cpu_autotune_info()["hits"] == 1 and cpu_autotune_info()["searches"] == 1
        sparse_conv2d(x[:, :, :12], sw, b, 1, 6, 6, backend="cpp")  # another input size: another search
    assert cpu_autotune_info()["searches"] == 2
    assert torch.equal(first, second)  # one configuration for the shape: the same summation order
    assert_conv_close(first, x, w, b, 1, 6, 6)


def test_a_forced_configuration_is_not_tuned(tuner, monkeypatch):
    set_cpu_autotune(True)
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", "layout=tap,rows=1")
    x, w, b = _inputs(CASES[0])
    with torch.no_grad():
        sparse_conv2d(x, SparseWeight.from_dense(w), b, 1, 1, 1, backend="cpp")
    assert cpu_autotune_info()["searches"] == 0


PROBE = """
import sys, torch
from adapmtl.ops import cpu_autotune_info, set_cpu_autotune
from adapmtl.ops.sparse_conv import sparse_conv2d
from adapmtl.ops.sparse_weight import SparseWeight
set_cpu_autotune(True, sys.argv[1])
before = cpu_autotune_info()
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 24, 15, 15, generator=g)
w = torch.randn(16, 24, 3, 3, generator=g) * (torch.rand(16, 24, 3, 3, generator=g) < 0.2)
with torch.no_grad():
    out = sparse_conv2d(x, SparseWeight.from_dense(w), None, 1, 2, 2, backend="cpp")
ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 2, 2)
after = cpu_autotune_info()
print(before["entries"], after["searches"], after["hits"], after["skipped_lines"], float((out.double() - ref).abs().max()))
"""


def _probe(cache):
    run = subprocess.run([sys.executable, "-c", PROBE, str(cache)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    entries, searches, hits, skipped, err = run.stdout.split()
    assert float(err) < 1e-4
    return int(entries), int(searches), int(hits), int(skipped), run.stderr


def test_the_cache_file_carries_choices_to_the_next_process(tmp_path):
    cache = tmp_path / "tune.txt"
    assert _probe(cache)[:3] == (0, 1, 0)  # a fresh file: one search, written down
    lines = cache.read_text().splitlines()
    ext = _ext.cpu_extension()  # keyed by the CPU and the kernels' capability (tuned AVX-512 tiles need not suit AVX2)
    assert len(lines) == 1 and lines[0].startswith(f"{ext.cpu_model()} {ext.cpu_capability()}|")
    assert _probe(cache)[:3] == (1, 0, 1)  # the next process finds it: no search


def test_a_hostile_cache_file_is_skipped_line_by_line_and_another_cpus_lines_are_not_used(tmp_path):
    cache = tmp_path / "tune.txt"
    _probe(cache)
    good = cache.read_text().splitlines()[0]
    key, config = good.split("\t")
    foreign = "Some Other CPU (family 1, model 1)|" + key.split("|", 1)[1]
    cache.write_text("\n".join([
        "# comment", "garbage without a tab", f"{key}\tlayout=tap,rows=9", f"{key}\t__import__('os').system('x')",
        f"{key}\tlayout=auto", "\tlayout=tap", f"{foreign}\t{config}", "\x00\x01binary"]) + "\n")
    entries, searches, hits, skipped, stderr = _probe(cache)
    assert skipped == 6 and "malformed" in stderr  # every bad line, one warning
    assert (entries, searches, hits) == (1, 1, 0)  # only the foreign CPU's line loaded, and it is not used
    set_cpu_autotune(False)
