"""Keeping freed host memory during CPU training (adapmtl/train/host_memory.py): it removes the page faults
of re-allocating the same buffers every step, and the trainer applies it on the CPU unless told not to."""
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

# Page faults of each of ten rounds of allocating, writing and freeing a 100 MiB tensor, after five warm-up
# rounds. With memory retained most rounds reuse the heap and fault nothing; a few may still fault a whole
# tensor while the heap grows around torch's other allocations (seen: 3 of 10 on a clean CI machine).
FAULTS = r"""
import resource, sys, torch
from adapmtl.train.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else False
for _ in range(5):
    torch.empty(25 << 20).fill_(1.0)
rounds = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(25 << 20).fill_(1.0)
    rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), *rounds)
"""


def _faults(retain: bool) -> tuple[int, list[int]]:
    done = subprocess.run([sys.executable, "-c", FAULTS, "1" if retain else "0"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    assert done.returncode == 0, done.stderr[-2000:]
    applied, *rounds = map(int, done.stdout.split())
    return applied, rounds


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc settings only")
def test_retained_memory_is_not_faulted_in_again():
    applied, retained = _faults(True)
    _, default = _faults(False)
    assert applied == 1
    # glibc's default maps and unmaps 100 MiB every round: ~25k faults (4 KiB pages) each time
    quiet = lambda rounds: sum(f < 1000 for f in rounds)  # noqa: E731 - rounds that faulted (almost) nothing
    assert quiet(default) <= 1 and sum(default) > 10 * 10000, default
    assert quiet(retained) >= 6, retained


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
