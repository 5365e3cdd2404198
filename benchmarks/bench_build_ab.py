"""Two builds of adapmtl on the same sparse convs, process by process in alternation: is any row slower than before?

An issue's "no row of bench_sparse_conv.py slower than today" compares the kernel of the day the issue was filed
with today's. Results files from that day do not answer it on this VM (its cache phases move the sparse kernel by
up to 2x between runs, docs/cpu_sparse_kernel.md), and one process cannot load two builds of the extension. So
each round runs one process per build, their order swapped every round (ABBA), and every case's ratio is taken
between the two processes of a round:

    git worktree add /tmp/before <commit> && (cd /tmp/before && ADAPMTL_NO_CUDA=1 python setup.py build_ext --inplace)
    python benchmarks/bench_build_ab.py --before /tmp/before               # this checkout is --after
    python benchmarks/bench_build_ab.py --before /tmp/before --rounds 12 --sparsities 0.9 0.95 0.99

Cases: every distinct head conv of both paper models (bench_sparse_conv.py --heads-only's shapes) at each sparsity,
random unstructured masks from a fixed seed (the same weights in both builds), batch 1. Each process times dense
F.conv2d and our sparse_conv2d in alternation (medians); each build's process imports adapmtl from its own folder
(checked: a process that imported another copy is an error, not a result, and so are two builds whose sparse convs
ran on different backends: a folder without its C++ extension falls back to the torch one). Per row and round: the
paired ratio (after / before) and the same over the two processes' dense ratio (the same oneDNN conv in both, so it
takes out part of a process's cache phase). A row is "slower" when the medians of both exceed 1 + --tolerance and
the paired ratios' sign test gives p <= 0.05 (at least 6 rounds: small convs of 0.5 ms swing 0.6-2x between
processes); "faster" likewise; else "same" (within this machine's noise). Output: a table, JSON and a PNG under
benchmarks/results/ (build_ab_<cpu>.*; --quick: two small convs, one round, runs/bench).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QUICK_CASES = [dict(c_in=32, c_out=64, k=3, stride=1, padding=2, dilation=2, groups=1, h=13, w=13, model="quick"),
               dict(c_in=64, c_out=64, k=1, stride=1, padding=0, dilation=1, groups=1, h=9, w=9, model="quick")]
RESULT_TAG = "BUILD_AB_RESULT "
MIN_CASE_S = 0.5  # seconds of calls per case and process, at least


def worker(spec: dict) -> dict:
    """In a process of one build: every case, dense and sparse timed in alternation. Uses only the op layer (every
    build since the C++ kernel has it), so the timing is this file's, the same for both builds."""
    import torch
    import torch.nn.functional as F

    import adapmtl
    from adapmtl.ops.sparse_conv import resolve_sparse_backend, sparse_conv2d
    from adapmtl.ops.sparse_weight import SparseWeight

    def alternated_medians(fns, reps):
        """Medians of `reps` rounds, or of as many as take MIN_CASE_S (small convs: 0.1-1 ms calls are noisy)."""
        times = [[] for _ in fns]
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        first = time.perf_counter() - t0
        reps = min(max(reps, int(MIN_CASE_S / max(first, 1e-6))), 20 * reps)
        for _ in range(reps):
            for fn, t in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                t.append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(t) for t in times]

    torch.set_num_threads(spec["threads"])
    out = {"module": os.path.realpath(adapmtl.__file__), "backend": resolve_sparse_backend("auto", torch.empty(0)),
           "cases": []}
    for case in spec["cases"]:
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(1, case["c_in"], case["h"], case["w"], generator=gen)
        shape = (case["c_out"], case["c_in"], case["k"], case["k"])
        w = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) >= case["sparsity"])
        sw = SparseWeight.from_dense(w)
        args = (case["stride"], case["padding"], case["dilation"])
        with torch.no_grad():
            dense, sparse = (lambda: F.conv2d(x, w, None, *args)), (lambda: sparse_conv2d(x, sw, None, *args))
            ref = dense()
            err = ((sparse() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            dense_ms, sparse_ms = alternated_medians([dense, sparse], spec["reps"])
        out["cases"].append({"dense_ms": dense_ms, "sparse_ms": sparse_ms, "max_rel_err": err})
    return out


def run_build(root: Path, spec: dict) -> dict:
    """One process of the build in `root` (its adapmtl first on the path); its result, checked to come from there."""
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_build_ab: the process of build {root} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    if not Path(result["module"]).is_relative_to(root.resolve()):
        raise RuntimeError(f"bench_build_ab: the process for build {root} imported adapmtl from {result['module']}; "
                           "build the extension in that folder (setup.py build_ext --inplace)")
    return result


def check_same_backend(runs: dict) -> str:
    """The sparse backend every process of both builds ran ({label: [worker results]}); two differ: an error (a build
    without its C++ extension falls back to the torch backend, and the table would compare backends, not builds)."""
    used = {label: {r["backend"] for r in results} for label, results in runs.items()}
    if len(set().union(*used.values())) != 1:
        raise RuntimeError(f"bench_build_ab: the builds ran different sparse backends ({used}); build the C++ "
                           "extension in place in each folder (setup.py build_ext --inplace)")
    return next(iter(used["after"]))


def git_commit(root: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def sign_test_p(ratios: list[float]) -> float:
    """Two-sided exact sign test of "the ratio is 1": the chance of pairs at least this one-sided by coin flips."""
    n, above = len(ratios), sum(r > 1 for r in ratios)
    tail = sum(math.comb(n, k) for k in range(max(above, n - above), n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def verdict(ratios: list[float], over_dense: list[float], tolerance: float, alpha: float = 0.05) -> str:
    """"slower", "faster" or "same" from one row's paired ratios (after / before per round) and the same ratios over
    each process's dense time (module docstring): both medians past the tolerance and the pairs' sign test at
    `alpha` (so at least 6 pairs: 6 of 6 one way is p = 0.031, 7 of 8 p = 0.070)."""
    if sign_test_p(ratios) > alpha:
        return "same"
    if min(statistics.median(ratios), statistics.median(over_dense)) > 1 + tolerance:
        return "slower"
    if max(statistics.median(ratios), statistics.median(over_dense)) < 1 / (1 + tolerance):
        return "faster"
    return "same"


def plot(rows: list[dict], tolerance: float, path: Path, title: str) -> None:
    """Each row's paired ratios (dots) and their median (bar), on a log axis around 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    colors = {"slower": "tab:red", "same": "tab:gray", "faster": "tab:green"}
    for i, r in enumerate(rows):
        ax.scatter(r["paired_ratios"], [i] * len(r["paired_ratios"]), s=10, color=colors[r["verdict"]], alpha=0.6)
        ax.plot([r["ratio"]] * 2, [i - 0.35, i + 0.35], color=colors[r["verdict"]], lw=2)
    ax.axvspan(1 / (1 + tolerance), 1 + tolerance, color="0.9", zorder=0)
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ticks = [t for t in (0.25, 0.35, 0.5, 0.7, 1, 1.4, 2, 2.8, 4) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_yticks(range(len(rows)), [r["conv"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("our sparse conv, after / before, per process pair (< 1: faster now)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_cases(sparsities) -> list[dict]:
    from bench_sparse_conv import model_conv_shapes

    shapes = [s for m in ("resnet34", "mobilenetv2") for s in model_conv_shapes(m) if s["part"] == "head"]
    return [{**s, "sparsity": p} for s in shapes for p in sparsities]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="folder of the earlier build (its extension built in place)")
    p.add_argument("--after", default=str(Path(__file__).resolve().parents[1]), help="folder of the later build "
                   "(default: this checkout)")
    p.add_argument("--rounds", type=int, default=8, help="process pairs (default: 8; a verdict needs 6 or more)")
    p.add_argument("--reps", type=int, default=11, help="timed calls per case and process (default: 11)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    p.add_argument("--tolerance", type=float, default=0.05, help="paired ratio beyond which a row differs "
                   "(default: 0.05)")
    p.add_argument("--quick", action="store_true", help="a smoke run: two small convs, one round, runs/bench")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="build_ab", help="result file stem (default: build_ab)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.reps < 1 or not args.tolerance >= 0 or any(not 0 <= s < 1 for s in args.sparsities):
        p.error("--rounds and --reps must be >= 1, --tolerance >= 0 and every sparsity in [0, 1)")
    # here, not at the top: a worker process runs another build's adapmtl and imports only its op layer
    import torch

    from common import device_description, format_table, write_results

    builds = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    for label, root in builds.items():
        if not (root / "adapmtl" / "__init__.py").is_file():
            p.error(f"--{label} {root}: no adapmtl package there")
    cases = ([{**c, "sparsity": 0.9} for c in QUICK_CASES] if args.quick else head_cases(args.sparsities))
    rounds, reps = (1, 3) if args.quick else (args.rounds, args.reps)
    spec = {"cases": cases, "reps": reps, "threads": torch.get_num_threads()}
    runs = {"before": [], "after": []}
    for i in range(rounds):
        for label in (("before", "after") if i % 2 == 0 else ("after", "before")):  # ABBA: neither always first
            runs[label].append(run_build(builds[label], spec))
            print(f"round {i + 1}/{rounds}: {label} done", flush=True)
    backend = check_same_backend(runs)
    rows = []
    for c, case in enumerate(cases):
        ms = {label: [r["cases"][c] for r in runs[label]] for label in runs}
        ratios = [a["sparse_ms"] / b["sparse_ms"] for a, b in zip(ms["after"], ms["before"])]
        dense_ratios = [a["dense_ms"] / b["dense_ms"] for a, b in zip(ms["after"], ms["before"])]
        over_dense = [r / d for r, d in zip(ratios, dense_ratios)]
        rows.append({**case, **{f"{label}_{k}": statistics.median(r[f"{k}_ms"] for r in ms[label])
                                for label in ms for k in ("dense", "sparse")},
                     "paired_ratios": ratios, "dense_paired_ratios": dense_ratios,
                     "ratio": statistics.median(ratios), "ratio_over_dense": statistics.median(over_dense),
                     "sign_test_p": sign_test_p(ratios), "verdict": verdict(ratios, over_dense, args.tolerance),
                     "max_rel_err": max(r["max_rel_err"] for label in ms for r in ms[label])})
    for r in rows:
        r["conv"] = (f"{r['model']} {r['c_in']}->{r['c_out']} {r['k']}x{r['k']} s{r['stride']} d{r['dilation']} "
                     f"{r['h']}x{r['w']} {r['sparsity']:.0%}")
    info = device_description("cpu")
    print(f"\n{info['device']}, {spec['threads']} threads, batch 1, fp32, backend {backend}, medians in ms over "
          f"{rounds} process pairs\n")
    print(format_table(rows, [("conv", "conv", "<46"), ("before_dense", "dense before", ".2f"),
                              ("after_dense", "dense after", ".2f"), ("before_sparse", "ours before", ".2f"),
                              ("after_sparse", "ours after", ".2f"), ("ratio", "after/before (paired)", ".3f"),
                              ("ratio_over_dense", "same, over dense", ".3f"),
                              ("verdict", "verdict", ">8")]))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("slower", "same", "faster")}
    print(f"\n{counts}")
    payload = {"builds": {label: {"path": str(root), "commit": git_commit(root)} for label, root in builds.items()},
               "backend": backend, "rounds": rounds, "reps": reps, "tolerance": args.tolerance, "quick": args.quick,
               "counts": counts, "rows": rows}
    path = write_results(args.name, info, payload, out_dir=args.out_dir, smoke=args.quick)
    commits = {label: (b["commit"] or label)[:7] for label, b in payload["builds"].items()}
    plot(rows, args.tolerance, path.with_suffix(".png"),
         f"{info['device']}: our sparse conv, build {commits['after']} against {commits['before']}")
    print(f"wrote {path} and its .png")
    return payload


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(RESULT_TAG + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
