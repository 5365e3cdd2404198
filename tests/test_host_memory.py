"""Keeping freed host memory during CPU training (adapmtl/train/host_memory.py): large buffers come from the heap
and stay there when freed (so re-allocating them every step faults nothing in), and the trainer applies it on the
CPU unless told not to."""
import os
import platform
import subprocess
import sys

import pytest

import adapmtl.train.host_memory as host_memory
import adapmtl.train.trainer as trainer_module
from adapmtl.train import Trainer
from helpers import tiny_run_config

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# What the library controls is where glibc's malloc puts a large buffer and whether it hands it back: with the
# thresholds raised, a 100 MiB tensor comes from the heap (not a mapping of its own, mallinfo2's hblkhd) and the
# heap keeps it once freed (arena); by default it is mapped for itself and unmapped when freed. How many page
# faults that saves is the OS's business, not asserted here; its effect on a training step is what
# benchmarks/bench_str_step.py measures (against --no-retain-host-memory).
MALLINFO = r"""
import ctypes, sys, torch
from adapmtl.train.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else False
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
def info():
    i = mallinfo2()
    return i.hblkhd, i.uordblks, i.arena
before = info()
t = torch.empty(25 << 20).fill_(1.0)
held = info()
del t
after = info()
print(int(applied), *before, *held, *after)
"""
MiB = 1 << 20


def _mallinfo(retain: bool) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-c", MALLINFO, "1" if retain else "0"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_",
                                                                                  "MALLOC_TRIM_THRESHOLD_")})
    assert done.returncode == 0, done.stderr[-2000:]
    applied, *v = map(int, done.stdout.split())
    # (bytes in mappings of their own, bytes in use from the heap, the heap's size)
    return applied, {"before": v[0:3], "held": v[3:6], "after": v[6:9]}


def _has_mallinfo2():
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not GLIBC or not _has_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")
def test_large_buffers_come_from_the_heap_and_stay_there():
    applied, kept = _mallinfo(True)
    assert applied == 1
    assert kept["held"][0] - kept["before"][0] < 100 * MiB, kept  # not a mapping of its own
    assert kept["held"][1] - kept["before"][1] >= 100 * MiB, kept  # the heap holds it
    assert kept["after"][2] >= kept["held"][2], kept  # and keeps the memory when it is freed (nothing trimmed)
    _, default = _mallinfo(False)
    assert default["held"][0] - default["before"][0] >= 100 * MiB, default  # glibc's default: mapped for itself
    assert default["held"][0] - default["after"][0] >= 100 * MiB, default  # and unmapped when freed


def test_it_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.retain_freed_memory() is False
    monkeypatch.setattr(host_memory, "_applied", None)  # a later caller on glibc asks again


@pytest.mark.parametrize("retain", [True, False])
def test_the_trainer_applies_it_on_the_cpu_unless_told_not_to(synthetic_scenes, tmp_path, monkeypatch, retain):
    calls = []
    monkeypatch.setattr(trainer_module, "retain_freed_memory", lambda: calls.append(1) or True)
    cfg = tiny_run_config(synthetic_scenes(8, 4), tmp_path, {"device": "cpu", "data": {"n_train": 8, "n_test": 4, "batch_size": 2}},
                          {"train.retain_host_memory": retain})
    Trainer(cfg)
    assert calls == ([1] if retain else [])
