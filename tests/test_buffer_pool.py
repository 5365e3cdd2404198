"""The CPU kernels' pool of large output buffers (csrc/cpu/buffer_pool.h): reused, correct, can be turned off."""
import io
import os
import subprocess
import sys

import pytest
import torch

from adapmtl.ops import available_backends, soft_threshold, soft_threshold_reference

pytestmark = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="C++ extension not built")
N = 3 << 20  # 12 MiB of float32: above the pool's 4 MiB minimum


def test_a_freed_large_output_is_reused_and_results_stay_exact():
    w, s = torch.randn(N) * 0.05, torch.tensor(-3.0)
    first = soft_threshold(w, s, backend="cpp")
    ptr = first.data_ptr()
    assert torch.equal(first, soft_threshold_reference(w, s))
    del first
    second = soft_threshold(w * 2, s, backend="cpp")  # same size: the freed buffer, overwritten in full
    assert second.data_ptr() == ptr
    assert torch.equal(second, soft_threshold_reference(w * 2, s))
    third = soft_threshold(w, s, backend="cpp")  # `second` still alive: a different buffer
    assert third.data_ptr() != second.data_ptr() and torch.equal(third, soft_threshold_reference(w, s))


def test_pooled_tensors_behave_like_any_other():
    w = (torch.randn(N) * 0.05).requires_grad_()
    s = torch.tensor(-3.0, requires_grad=True)
    out = soft_threshold(w, s, backend="cpp")
    out.sum().backward()  # grad_w comes from the pool too
    ref_w, ref_s = w.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    soft_threshold_reference(ref_w, ref_s).sum().backward()
    assert torch.equal(w.grad, ref_w.grad) and torch.allclose(s.grad, ref_s.grad)
    buf = io.BytesIO()
    torch.save(out.detach(), buf)
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue())), out.detach())
    assert torch.equal(out.detach().clone(), out.detach()) and out.is_contiguous()


def test_the_pool_can_be_turned_off():
    """ADAPMTL_CPU_BUFFER_POOL_MB=0: outputs come from PyTorch's allocator (resizable storage, unlike the
    pool's fixed buffers)."""
    code = ("import torch, adapmtl; from adapmtl.ops import soft_threshold\n"
            f"w, s = torch.randn({N}), torch.tensor(-3.0)\n"
            "print(int(soft_threshold(w, s, backend='cpp').untyped_storage().resizable()))\n")
    for mb, resizable in (("0", "1"), ("1024", "0")):
        env = {**os.environ, "ADAPMTL_CPU_BUFFER_POOL_MB": mb}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == resizable, (mb, out.stdout, out.stderr)
