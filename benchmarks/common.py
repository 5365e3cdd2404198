"""Timing, device description and result files shared by the benchmarks."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from adapmtl.checkpoint_io import write_json_atomic
from adapmtl.timing import interleaved_median_ms, interleaved_times_ms, median_time_ms  # noqa: F401 - the benchmarks use them from here

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
