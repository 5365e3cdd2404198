"""Keep freed host memory in the process during CPU training, instead of handing it back to the OS.

glibc's malloc serves requests above its mmap threshold (adaptive, at most 32 MiB) with a fresh mmap and
returns free memory above its trim threshold at the top of the heap to the OS. A training step allocates
and frees the same activations, gradients and soft-thresholded weights every time, so each step faults
hundreds of megabytes back in, page by page, zeroed by the kernel. Measured on the 2-core EPYC (family 26),
ResNet-34 NYUv2 at 161x161, batch 2: 46-130k page faults per dense step and 100-235k per STR step, and
raising both thresholds (below) removed all of them: the dense step 7-10% faster, the STR step's cost over
dense from +8..+14% to +2..+6% (benchmarks/bench_str_step.py). The price: the process keeps its peak heap
(which every step reaches again anyway), as PyTorch's CUDA caching allocator does on the GPU.

The trainer applies it on the CPU (`train.retain_host_memory`, default on); it is process-wide, so a
library caller opts in with `retain_freed_memory()` itself. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Requests up to this size come from the heap (reused) rather than a fresh mmap: above the largest
# activation or weight gradient of the paper's models at batch 16, 321x321.
MMAP_THRESHOLD = 256 << 20
# Free memory at the top of the heap kept rather than trimmed.
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc refuses an mmap threshold above its heap limit on some builds: 32 MiB is always accepted.
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    _applied = mmap_ok and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
