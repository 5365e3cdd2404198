"""How much cache this machine gives the kernels, and how steadily: pointer-chase latency against buffer size.

benchmarks/memory_latency.c (gcc -O2, one thread) follows a random cycle through a buffer of each size and
reports ns per load every few milliseconds, for a few seconds per size. A size that fits the last-level cache
costs its latency (~10-20 ns); one that does not costs DRAM's (~100 ns). On a shared VM the cache other
tenants take moves over time, and with it the kernels whose working set streams through it (the sparse conv's
weights and packed input) -- not the compute-bound ones (a dense oneDNN conv).

    python benchmarks/bench_memory_latency.py            # ~1 minute: 1-32 MB, 8 s each
    python benchmarks/bench_memory_latency.py --quick    # a smoke run into runs/bench
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_description, format_table, write_results  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "memory_latency.c"
SIZES_MB = (1, 2, 4, 8, 12, 16, 32)


def chase(exe: Path, mb: float, seconds: float) -> dict:
    """ns per load over the samples: min, deciles 1/5/9, max."""
    out = subprocess.run([str(exe), str(mb), str(seconds)], check=True, capture_output=True, text=True).stdout
    ns = sorted(float(line.split()[1]) for line in out.splitlines())
    q = statistics.quantiles(ns, n=10, method="inclusive") if len(ns) > 1 else ns * 9
    return {"mb": mb, "samples": len(ns), "min": ns[0], "p10": q[0], "median": statistics.median(ns),
            "p90": q[8], "max": ns[-1]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: two sizes, 0.3 s each, runs/bench")
    p.add_argument("--seconds", type=float, default=8.0, help="sampling time per size")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if shutil.which("gcc") is None:
        raise SystemExit("gcc not found: bench_memory_latency needs it")
    sizes, seconds = ((1, 4), 0.3) if args.quick else (SIZES_MB, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "memory_latency"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(SOURCE)], check=True)
        rows = []
        for mb in sizes:
            rows.append(chase(exe, mb, seconds))
            print(f"{mb} MB: median {rows[-1]['median']:.1f} ns", flush=True)
    info = device_description("cpu")
    print(f"\n{info['device']}, one thread, ns per dependent load, {seconds:g} s per size\n")
    print(format_table(rows, [("mb", "MB", "g"), ("min", "min", ".1f"), ("p10", "p10", ".1f"),
                              ("median", "median", ".1f"), ("p90", "p90", ".1f"), ("max", "max", ".1f")]))
    path = write_results("memory_latency", info, {"quick": args.quick, "seconds_per_size": seconds, "rows": rows},
                         out_dir=args.out_dir, smoke=args.quick)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
