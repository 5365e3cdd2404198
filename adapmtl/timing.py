"""Wall-time measurement shared by `export_sparse(policy="time")` and the benchmarks: CUDA events on the
GPU (the work a call queued), perf_counter on the CPU; medians, and alternation where a ratio is the result.
Also the CPU a result comes from (`cpu_facts`), for every result file that names it."""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn, device: torch.device) -> float:
    """Wall time of one `fn()` call in ms."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_time_ms(fn, device, *, warmup: int = 2, reps: int = 10, min_time_s: float = 0.0) -> float:
    """Median wall time of `fn()` in milliseconds: at least `reps` calls and, if `min_time_s` is given, until
    that much time has been spent (at most 10 * reps calls)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_time_s:
        times.append(time_once_ms(fn, device))
        if len(times) >= 10 * reps:
            break
    return statistics.median(times)


def interleaved_times_ms(fns, device, *, warmup: int = 1, reps: int = 10) -> list[list[float]]:
    """Wall times (ms) of several functions timed in alternation, one call of each per round: times[f][round].

    For where the ratio between them is the result (sparse vs dense): on a shared or virtualised machine the
    speed drifts over seconds, and alternating exposes every function to the same drift (and the ratio of
    two functions' times in one round is a sample of their ratio).
    """
    device = torch.device(device)
    for fn in fns:
        for _ in range(warmup):  # first-call allocations and lazy initialisation
            fn()
    synchronize(device)
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            ts.append(time_once_ms(fn, device))
    return times


def interleaved_median_ms(fns, device, *, warmup: int = 1, reps: int = 10) -> list[float]:
    """Median wall times (ms) of several functions timed in alternation (interleaved_times_ms)."""
    return [statistics.median(ts) for ts in interleaved_times_ms(fns, device, warmup=warmup, reps=reps)]


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_facts() -> dict:
    """The CPU a result comes from: model name, vendor, family/model/stepping (two EPYCs share a name), the
    vector extensions that matter to the kernels, and the cache sizes of one core (sysfs)."""
    facts = {"model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name":
                    facts["model"] = value
                elif key in ("vendor_id", "cpu family", "model", "stepping"):
                    facts[{"vendor_id": "vendor", "cpu family": "family", "model": "model_number"}.get(key, key)] = value
                elif key == "flags":
                    facts["isa"] = [flag for flag in ISA_FLAGS if flag in value.split()]
    except OSError:
        pass
    caches = {}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")) if root.is_dir() else []:
        try:
            level, kind, size = ((index / n).read_text().strip() for n in ("level", "type", "size"))
        except OSError:
            continue
        caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
    facts["caches_per_core"] = caches
    return facts
