"""The one backend resolver (adapmtl/ops/backends.py) that both op families dispatch through."""
import os
import re
import sys

import pytest
import torch

import adapmtl
from adapmtl import _ext
from adapmtl.ops import backends
from adapmtl.ops.soft_threshold import soft_threshold
from adapmtl.ops.sparse_conv import sparse_conv2d
from adapmtl.ops.sparse_weight import SparseWeight

PACKAGE = os.path.dirname(os.path.abspath(adapmtl.__file__))
OPS = ("soft_threshold", "sparse_conv2d", "sparse_linear")


@pytest.mark.parametrize("op", OPS)
def test_auto_follows_the_table(op):
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        t = torch.zeros(3, dtype=dtype)
        expected = "cpp" if backends.HAS_CPP and dtype in backends.BACKEND_DTYPES["cpp"] else "torch"
        assert backends.resolve(op, "auto", t) == expected
    assert backends.resolve(op, "torch", torch.zeros(1)) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_named_backends_fail_the_same_way_for_every_op(op, monkeypatch):
    arg = backends.OPS[op][1]
    with pytest.raises(ValueError, match=f"{op}: argument 'backend' must be one of"):
        backends.resolve(op, "fast", torch.zeros(1))
    with pytest.raises(ValueError, match=f"backend 'cuda' needs CUDA tensors, got argument '{arg}' on cpu"):
        backends.resolve(op, "cuda", torch.zeros(1))
    if backends.HAS_CPP:
        with pytest.raises(TypeError, match=f"backend 'cpp' supports argument '{arg}' of dtype float32, float64"):
            backends.resolve(op, "cpp", torch.zeros(1, dtype=torch.float16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors \\(or CPU tensors with TRITON_INTERPRET=1"):
        backends.resolve(op, "triton", torch.zeros(1))
    # a backend this installation lacks: one error type, whichever op asks
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(backends._AVAILABLE, "triton", False)
    monkeypatch.setattr(_ext, "triton_available", lambda: False)
    with pytest.raises(_ext.ExtensionNotBuiltError, match="triton"):
        backends.resolve(op, "triton", torch.zeros(1))
    monkeypatch.setitem(backends._AVAILABLE, "cpp", False)
    monkeypatch.setattr(_ext, "_load", lambda name: (None, "ImportError: simulated"))
    with pytest.raises(_ext.ExtensionNotBuiltError, match="adapmtl._C.*simulated"):
        backends.resolve(op, "cpp", torch.zeros(1))


def test_both_op_families_resolve_through_it(monkeypatch):
    seen = []
    real = backends.resolve

    def spy(op, backend, t):
        seen.append((op, backend))
        return real(op, backend, t)

    for module in ("adapmtl.ops.soft_threshold", "adapmtl.ops.sparse_conv"):  # the modules, not the same-named ops
        monkeypatch.setattr(sys.modules[module], "resolve", spy)
    soft_threshold(torch.randn(5), torch.zeros(()), backend="torch")
    with torch.no_grad():
        sparse_conv2d(torch.randn(1, 2, 4, 4), SparseWeight.from_dense(torch.randn(3, 2, 1, 1)), backend="torch")
    assert seen == [("soft_threshold", "torch"), ("sparse_conv2d", "torch")]


def test_available_lists_what_resolve_accepts():
    for op in OPS:
        for backend in backends.available(op, "cpu"):
            dtype = backends.BACKEND_DTYPES.get(backend, (torch.float32,))[0]
            assert backends.resolve(op, backend, torch.zeros(1, dtype=dtype)) == backend


def test_backend_facts_are_read_in_one_place():
    """TRITON_INTERPRET is read by backends.py only, triton is looked up by _ext.py only, and no op asks the
    dispatcher which kernels exist: the op layer's choices all come from backends.py's constants."""
    readers = {"TRITON_INTERPRET": set(), "find_spec(\"triton": set(), "_dispatch_has_kernel": set()}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                code = re.sub(r'""".*?"""|#[^\n]*', "", open(path).read(), flags=re.S)  # docstrings and comments
                for needle in readers:
                    if needle in code:
                        readers[needle].add(os.path.relpath(path, PACKAGE))
    assert readers == {"TRITON_INTERPRET": {os.path.join("ops", "backends.py")},
                       "find_spec(\"triton": {"_ext.py"}, "_dispatch_has_kernel": set()}


def test_resolution_traces_without_graph_breaks():
    w = torch.randn(6, 5)
    fn = torch.compile(lambda w, s: soft_threshold(w, s), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(w, torch.zeros(())), soft_threshold(w, torch.zeros(())))


@pytest.mark.skipif(not os.environ.get("ADAPMTL_TEST_EXPECT_BACKENDS"),
                    reason="set ADAPMTL_TEST_EXPECT_BACKENDS (CI does) to the backends this installation must have")
def test_the_expected_backends_are_present():
    """Test lists come from the backends available at run time, so a backend that failed to install would
    silently drop its cases; CI names the ones it installs and this fails if any is missing."""
    expected = os.environ["ADAPMTL_TEST_EXPECT_BACKENDS"].replace(",", " ").split()
    assert expected and set(expected) <= set(backends.OPS["soft_threshold"][0]), expected
    for op in OPS:
        have = backends.available(op, "cpu")
        missing = [b for b in expected if b in backends.OPS[op][0] and b not in have]
        assert not missing, f"{op}: backends {missing} are not available on the CPU (have {have})"
