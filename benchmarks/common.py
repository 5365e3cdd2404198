"""Timing, device description and result files shared by the benchmarks."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from adapmtl.checkpoint_io import write_json_atomic
from adapmtl.timing import ISA_FLAGS, cpu_facts  # noqa: F401 - the benchmarks use them from here
from adapmtl.timing import interleaved_median_ms, interleaved_times_ms, median_time_ms  # noqa: F401 - the benchmarks use them from here

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
        cpu = cpu_facts()
        info.update(device=f"{cpu['model']} ({os.cpu_count()} cores)", kind="cpu", cpu=cpu)
    return info


def device_tag(info: dict) -> str:
    """A file-name friendly device name, e.g. 'cpu-AMD-EPYC-f26m2-2c' (with the CPU family and model, so two
    machines of one marketing name do not overwrite each other's results; "(R)"/"(TM)" dropped, so
    'Intel(R) Xeon(R) Processor' gives 'cpu-Intel-Xeon-Processor-f6m167-2c') or 'cuda-NVIDIA-H200'."""
    if info["kind"] == "cuda":
        name = info["device"]
    else:
        cpu = info.get("cpu", {})
        family = f"-f{cpu['family']}m{cpu['model_number']}" if "family" in cpu and "model_number" in cpu else ""
        model = re.sub(r"\((R|TM)\)", "", info["device"].split(" (")[0], flags=re.IGNORECASE)  # "Intel(R) Xeon(R)"
        name = model + family + f"-{os.cpu_count()}c"
    return f"{info['kind']}-" + "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-")


SMOKE_DIR = Path("runs") / "bench"  # smoke runs (--quick) land here, never over the committed results


def write_results(name: str, info: dict, payload: dict, out_dir: Path | None = None, smoke: bool = False) -> Path:
    """Write the JSON to out_dir (default: benchmarks/results/, or runs/bench/ for a smoke run)."""
    out_dir = Path(out_dir or (SMOKE_DIR if smoke else RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device_tag(info)}.json"
    write_json_atomic(path, {"device": info, **payload}, indent=2)
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
