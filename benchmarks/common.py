"""Timing, device description and result files shared by the benchmarks."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once_ms(fn, device: torch.device) -> float:
    """Wall time of one `fn()` call in ms: CUDA events on GPU (the work queued by fn), perf_counter on CPU."""
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
    """Median wall time of `fn()` in milliseconds (CUDA events on GPU, perf_counter on CPU).

    Runs at least `reps` times and, if `min_time_s` is given, until that much time has been spent.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start_all < min_time_s:
        times.append(_time_once_ms(fn, device))
        if len(times) >= 10 * reps:
            break
    return statistics.median(times)


def interleaved_median_ms(fns, device, *, warmup: int = 1, reps: int = 10) -> list[float]:
    """Median wall times (ms) of several functions timed in alternation, one call of each per round.

    Used where the ratio between them is the result (sparse vs dense): on a shared or virtualised
    machine the speed drifts over seconds, and alternating exposes every function to the same drift.
    """
    device = torch.device(device)
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            ts.append(_time_once_ms(fn, device))
    return [statistics.median(ts) for ts in times]


def copy_bandwidth_gbps(numel: int, device, dtype=torch.float32, reps: int = 10) -> float:
    """Achieved bandwidth of `dst.copy_(src)` (read + write) for a tensor of `numel` elements: the
    memory-bound ceiling that elementwise kernels are measured against."""
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * numel * src.element_size() / (ms * 1e-3) / 1e9


def device_description(device) -> dict:
    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, kind="cuda", sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info.update(device=f"{name} ({os.cpu_count()} cores)", kind="cpu")
    return info


def device_tag(info: dict) -> str:
    """A file-name friendly device name, e.g. 'cpu-AMD-EPYC-2c' or 'cuda-NVIDIA-H100-80GB-HBM3'."""
    if info["kind"] == "cuda":
        name = info["device"]
    else:
        name = info["device"].split(" (")[0] + f"-{os.cpu_count()}c"
    return f"{info['kind']}-" + "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-")


SMOKE_DIR = Path("runs") / "bench"  # smoke runs (--quick) land here, never over the committed results


def write_results(name: str, info: dict, payload: dict, out_dir: Path | None = None, smoke: bool = False) -> Path:
    """Write the JSON to out_dir (default: benchmarks/results/, or runs/bench/ for a smoke run)."""
    out_dir = Path(out_dir or (SMOKE_DIR if smoke else RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device_tag(info)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"device": info, **payload}, indent=2))
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    header = " | ".join(h for _, h, _ in columns)
    lines = [header, " | ".join("-" * len(h) for _, h, _ in columns)]
    for row in rows:
        cells = []
        for key, h, spec in columns:
            value = row.get(key)
            cells.append(("-" if value is None else format(value, spec)).rjust(len(h)))
        lines.append(" | ".join(cells))
    return "\n".join(lines)
