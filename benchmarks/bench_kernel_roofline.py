"""Where the CPU sparse kernel stands against the machine: vector FMAs per cycle and loads per FMA.

Two parts, one JSON (benchmarks/results/kernel_roofline_<cpu>.json), read in docs/cpu_sparse_kernel.md:
  inner loop: benchmarks/kernel_roofline.cpp (g++ -O3 -march=native, one thread): the inner loop of one
      output channel per tile (today's kernel) against panels of 2-8 channels sharing each input load, on
      unstructured and on M x 1 block-pruned non-zeros, against accumulators kept in L1 (scatter) and
      against per-matrix generated code (what a JIT with the weights in the code runs), in units of this
      core's measured FMA peak;
  real kernel: torch.ops.adapmtl.sparse_conv2d on the ASPP 3x3 d6 and 1x1 head convs (41x41, batch 1) at
      90/95%, unstructured and pruned in 2/4/8/16 x 1 blocks, with one channel per tile, panels of 4 and 8,
      channel-vector tiles (where a weight's groups of 16 channels are uniform: 16 x 1 blocks; elsewhere the
      kernel's own choice runs) and the kernel's own choice (ADAPMTL_CPU_SPARSE_CONFIG), timed in alternation,
      2 threads;
  tile rows (--tile-rows-only, its own JSON kernel_tile_rows_<cpu>.json): the real kernel at each register tile
      height on narrow maps (MobileNetV2's 11x11 head conv), 2 threads;
  blocks with holes (--block-holes-only, its own JSON kernel_block_holes_<cpu>.json): weights pruned in 16 x 1
      blocks with a fraction of the live blocks' weights zeroed too, so channel-vector tiles store zeros (padding:
      stored / non-zeros); channel vectors forced against panels of 4 and one channel: where padding stops paying
      (the kernel's kVectorsMaxFill), 2 threads;
  one-tap rows (--one-tap-only, its own JSON kernel_one_tap_<cpu>.json): 1x1 convs and linear layers in 16 x 1
      blocks, channel vectors forced against panels of 4 and one channel, by the length of the row (pixels, or the
      batch): where the default stops running channel vectors on one-tap calls (kVectorsOneTapRow), 2 threads;
  CPU capabilities (--capabilities-only, its own JSON kernel_capabilities_<cpu>.json): the kernels are compiled for
      AVX-512, AVX2 and the baseline (csrc/cpu/sparse_conv_tiles.h) and run torch's capability; each that this CPU
      has, in a process of its own under ATEN_CPU_CAPABILITY (and oneDNN's dense conv under ONEDNN_MAX_CPU_ISA, the
      same level), on the ASPP and 1x1 convs at 90%, unstructured and 16 x 1: every tile against the default's
      choice and dense F.conv2d, in alternation, 2 threads. What a CPU without AVX-512 gets.

    python benchmarks/bench_kernel_roofline.py            # ~2 minutes on 2 cores
    python benchmarks/bench_kernel_roofline.py --quick    # a smoke run (small convs, runs/bench)
    python benchmarks/bench_kernel_roofline.py --inner-loop-only   # ~75 s, one thread
    python benchmarks/bench_kernel_roofline.py --tile-rows-only    # ~1 minute: tile heights on narrow maps
    python benchmarks/bench_kernel_roofline.py --block-holes-only  # ~4 minutes: padded channel vectors
    python benchmarks/bench_kernel_roofline.py --one-tap-only      # ~1 minute: channel vectors on one-tap rows
    python benchmarks/bench_kernel_roofline.py --capabilities-only # ~2 minutes: AVX-512, AVX2, baseline kernels
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_description, format_table, interleaved_median_ms, write_results  # noqa: E402

import adapmtl  # noqa: E402
from adapmtl import _ext  # noqa: E402
from adapmtl.ops.sparse_weight import SparseWeight  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "kernel_roofline.cpp"
CXXFLAGS = ["-O3", "-march=native", "-std=c++17"]
# Per-matrix code (M channels x NV vectors in registers): one channel as today, 8 x 3 (24 registers), and
# FBGEMM generateSpMM's 24 rows x 1 vector.
GENERATED = ("1x3", "8x3", "24x1")
CONFIGS = {"one channel": "panel=1", "panel 4": "panel=4", "panel 8": "panel=8", "channel vectors": "panel=vector",
           "auto": ""}
CONVS = {"ASPP 3x3 d6 512->1024": (512, 1024, 3, 6), "1x1 1024->1024": (1024, 1024, 1, 1)}


def inner_loop(densities=(0.1, 0.05), reps: int = 20, columns: int = 432) -> list[dict]:
    """The microbenchmark's JSON lines, or [] (with a note) where g++ is missing."""
    if shutil.which("g++") is None:
        print("g++ not found: the inner-loop part is skipped")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "roofline"
        subprocess.run(["g++", *CXXFLAGS, "-o", str(exe), str(SOURCE)], check=True)
        lines = []
        for d in densities:
            libs = generated_libs(exe, d, columns, Path(tmp))
            lines.append(json.loads(subprocess.run(
                [str(exe), str(d), str(columns), str(reps), *(f"generated_{g}={lib}" for g, lib in libs.items())],
                check=True, capture_output=True, text=True).stdout))
        return lines


def generated_libs(exe: Path, density: float, columns: int, tmp: Path) -> dict[str, Path]:
    """The per-matrix code of every GENERATED tiling for this density's weight, compiled (in parallel) to
    shared objects the microbenchmark loads: what a JIT with the weights in the code would run."""
    libs, builds = {}, []
    for g in GENERATED:
        m, nv = g.split("x")
        src, lib = tmp / f"generated_{g}_{density}.cpp", tmp / f"generated_{g}_{density}.so"
        subprocess.run([str(exe), str(density), str(columns), "1", "emit", str(src), m, nv], check=True)
        builds.append(subprocess.Popen(["g++", *CXXFLAGS, "-shared", "-fPIC", "-o", str(lib), str(src)]))
        libs[g] = lib
    if any(b.wait() != 0 for b in builds):
        raise RuntimeError("compiling the generated variants failed")
    return libs


def block_pruned(oc: int, c: int, k: int, block: int, density: float, gen) -> torch.Tensor:
    """A weight whose non-zeros come in `block` x 1 blocks (consecutive output channels), a block live with
    probability `density` (so the weight's density is `density` whatever the block)."""
    live = torch.rand((oc + block - 1) // block, c, k, k, generator=gen) < density
    return torch.randn(oc, c, k, k, generator=gen) * live.repeat_interleave(block, 0)[:oc]


def time_under_configs(run, configs: dict, reps: int, reference=None) -> list[float]:
    """Medians (ms) of `run()` (a C++ sparse op call) under each of `configs` (ADAPMTL_CPU_SPARSE_CONFIG values),
    timed in alternation; each first checked against `reference` where given. The variable is unset afterwards."""
    def call(config):
        def fn():
            os.environ["ADAPMTL_CPU_SPARSE_CONFIG"] = config
            return run()
        return fn

    try:
        if reference is not None:
            for config in configs.values():
                torch.testing.assert_close(call(config)(), reference, rtol=1e-4, atol=1e-3, msg=config)
        return interleaved_median_ms([call(c) for c in configs.values()], "cpu", reps=reps)
    finally:
        os.environ.pop("ADAPMTL_CPU_SPARSE_CONFIG", None)


def time_configs(x, sw, pad: int, dil: int, configs: dict, reps: int, reference=None) -> list[float]:
    """time_under_configs for the C++ sparse conv of `x` with `sw` (stride 1, `pad`, dilation `dil`)."""
    return time_under_configs(lambda: torch.ops.adapmtl.sparse_conv2d(x, sw.row_ptr, sw.col_idx, sw.values, None,
                                                                      list(sw.shape), [1, 1], [pad, pad], [dil, dil]),
                              configs, reps, reference)


def head_convs(quick: bool, gen):
    """(name, c_in, c_out, kernel, dilation, map side, input) of each of CONVS (an eighth of the channels at 11x11 in
    a smoke run)."""
    for name, (cin, cout, k, dil) in CONVS.items():
        if quick:
            cin, cout = cin // 8, cout // 8
        size = 11 if quick else 41
        yield name, cin, cout, k, dil, size, torch.randn(1, cin, size, size, generator=gen)


def real_kernel(quick: bool, reps: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, cin, cout, k, dil, size, x in head_convs(quick, gen):
        for sparsity in (0.9, 0.95):
            for block in (1, 2, 4, 8, 16):
                w = block_pruned(cout, cin, k, block, 1 - sparsity, gen)
                sw = SparseWeight.from_dense(w)
                pad = dil * (k // 2)

                ms = time_configs(x, sw, pad, dil, CONFIGS, reps)
                flop = 2 * sw.values.numel() * size * size  # the non-zeros' multiply-adds, every output pixel
                row = {"conv": name, "size": size, "sparsity": sparsity, "block": f"{block}x1",
                       "ms": dict(zip(CONFIGS, ms)), "gflop_per_s": {c: flop / t / 1e6 for c, t in zip(CONFIGS, ms)}}
                rows.append(row)
                print(f"{name} {sparsity:.0%} {block}x1: " + ", ".join(f"{c} {t:.2f} ms" for c, t in zip(CONFIGS, ms)),
                      flush=True)
    return rows


# Tall register tiles (rows of one vector get up to 8 output rows per tile): the MobileNetV2 head's 3x3 d6 conv at
# 11x11 at each head's sparsity (paper's, segment / depth / normal), a 16-wide map (exactly one fp32 vector), and a
# 21-wide one (two vectors per row, where the default stays at 2 rows), at forced heights and in both layouts.
TALL_CONVS = {"MobileNetV2 head 3x3 d6 1280->1024 at 11x11": (1280, 1024, 3, 6, 11, (0.862, 0.908, 0.947)),
              "3x3 d6 1280->1024 at 16x16": (1280, 1024, 3, 6, 16, (0.9,)),
              "3x3 d1 320->1024 at 21x21": (320, 1024, 3, 1, 21, (0.9,))}
# "2 rows" is the kernel's own layout choice at 2 rows; "channel-major, 2 rows" what the kernel chose before tall tiles
# and before its cost model left out the plan's encoding (paid once per weight since plans are cached).
TALL_CONFIGS = {"2 rows": "rows=2", "4 rows": "rows=4", "8 rows": "rows=8", "default": "",
                "tap-major, 2 rows": "layout=tap,rows=2", "tap-major, default": "layout=tap",
                "channel-major, 2 rows": "layout=channel,rows=2", "channel-major, default": "layout=channel"}


def tile_rows(quick: bool, reps: int) -> list[dict]:
    """The real kernel at each tile height (ADAPMTL_CPU_SPARSE_CONFIG), timed in alternation, 2 threads."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (cin, cout, k, dil, size, sparsities) in TALL_CONVS.items():
        if quick:
            cin, cout, sparsities = cin // 16, cout // 16, sparsities[:1]
        x = torch.randn(1, cin, size, size, generator=gen)
        for sparsity in sparsities:
            w = block_pruned(cout, cin, k, 1, 1 - sparsity, gen)
            sw = SparseWeight.from_dense(w)
            pad = dil * (k // 2)
            ms = time_configs(x, sw, pad, dil, TALL_CONFIGS, reps,
                              reference=torch.nn.functional.conv2d(x, w, None, 1, pad, dil))
            row = {"conv": name, "sparsity": sparsity, "nnz": sw.values.numel(), "ms": dict(zip(TALL_CONFIGS, ms)),
                   "default_vs_2_rows": ms[0] / ms[3], "default_vs_channel_major_2_rows": ms[6] / ms[3]}
            rows.append(row)
            print(f"{name} {sparsity:.1%}: " + ", ".join(f"{c} {t:.2f} ms" for c, t in zip(TALL_CONFIGS, ms)),
                  flush=True)
    return rows


# Blocks with holes: 16 x 1 block-pruned convs (ResNet-34's dilated layer3 / layer4 convs at its backbone's sparsity,
# the ASPP and MobileNetV2 head convs at 90%) with a fraction `hole` of the live blocks' weights zeroed as well.
HOLE_CONVS = {"ResNet-34 layer3 3x3 d2 256->256 at 41x41": (256, 256, 3, 2, 41, 0.527),
              "ResNet-34 layer4 3x3 d4 512->512 at 41x41": (512, 512, 3, 4, 41, 0.527),
              "ASPP 3x3 d6 512->1024 at 41x41": (512, 1024, 3, 6, 41, 0.9),
              "MobileNetV2 head 3x3 d6 1280->1024 at 11x11": (1280, 1024, 3, 6, 11, 0.9)}
HOLES = (0.0, 0.001, 0.1, 0.2, 0.33, 0.5)
HOLE_CONFIGS = {"channel vectors": "panel=vector", "panel 4": "panel=4", "one channel": "panel=1", "auto": ""}


def block_holes(quick: bool, reps: int) -> list[dict]:
    """The real kernel on 16 x 1 blocks with holes under each of HOLE_CONFIGS, timed in alternation, 2 threads."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (cin, cout, k, dil, size, sparsity) in HOLE_CONVS.items():
        if quick:
            cin, cout, size = cin // 16, cout // 16, min(size, 11)
        x = torch.randn(1, cin, size, size, generator=gen)
        blocks = block_pruned(cout, cin, k, 16, 1 - sparsity, gen)
        for hole in HOLES[:2] if quick else HOLES:
            w = blocks * (torch.rand(blocks.shape, generator=gen) >= hole)
            sw = SparseWeight.from_dense(w)
            pad = dil * (k // 2)
            ms = time_configs(x, sw, pad, dil, HOLE_CONFIGS, reps,
                              reference=torch.nn.functional.conv2d(x, w, None, 1, pad, dil))
            padding = torch.count_nonzero(blocks).item() / max(1, sw.values.numel())
            best_other = min(ms[1], ms[2])
            row = {"conv": name, "hole": hole, "nnz": sw.values.numel(), "padding": padding,
                   "ms": dict(zip(HOLE_CONFIGS, ms)), "vectors_vs_best_other": best_other / ms[0]}
            rows.append(row)
            print(f"{name} holes {hole:.3f} (padding {padding:.3f}): "
                  + ", ".join(f"{c} {t:.2f} ms" for c, t in zip(HOLE_CONFIGS, ms))
                  + f"; channel vectors {row['vectors_vs_best_other']:.2f}x the better other", flush=True)
    return rows


# One-tap rows: (c_in, c_out, map side or None for a linear layer, batch, sparsity), 16 x 1 blocks. MobileNetV2's
# backbone 1x1 convs at its backbone's sparsity and its heads' 1x1 conv at two heads' sparsities; rows of 256 to 1681
# pixels at 52.7% and 90%; a linear layer at batch 64 to 1024.
ONE_TAP_CASES = [(96, 24, 81, 1, 0.527), (144, 32, 41, 1, 0.527), (192, 64, 21, 1, 0.527), (576, 96, 21, 1, 0.527),
                 (960, 320, 11, 1, 0.527), (320, 1280, 11, 1, 0.527), (1024, 1024, 11, 1, 0.862),
                 (1024, 1024, 11, 1, 0.947)]
ONE_TAP_CASES += [(cin, cin, side, 1, sparsity) for cin, sparsity in ((256, 0.527), (512, 0.9))
                  for side in (16, 21, 23, 29, 41)]
ONE_TAP_CASES += [(1024, 1024, None, batch, 0.9) for batch in (64, 256, 512, 768, 1024)]
ONE_TAP_CONFIGS = {"channel vectors": "panel=vector", "panel 4": "panel=4", "one channel": "panel=1", "auto": ""}


def one_tap(quick: bool, reps: int) -> list[dict]:
    """The real kernel on one-tap calls (1x1 convs, linear) in 16 x 1 blocks under each of ONE_TAP_CONFIGS, timed
    in alternation and checked against F.conv2d / F.linear first, 2 threads."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for cin, cout, side, batch, sparsity in ONE_TAP_CASES[::6] if quick else ONE_TAP_CASES:
        if quick:
            cin, cout = max(16, cin // 16), max(16, cout // 16)
        w = block_pruned(cout, cin, 1, 16, 1 - sparsity, gen)
        sw = SparseWeight.from_dense(w)
        if side is None:
            x = torch.randn(batch, cin, generator=gen)
            reference, row = torch.nn.functional.linear(x, w.flatten(1)), batch
            args = (sw.row_ptr, sw.col_idx, sw.values, None, cin)
            op = torch.ops.adapmtl.sparse_linear
            name = f"linear {cin}->{cout} batch {batch}"
        else:
            x = torch.randn(batch, cin, side, side, generator=gen)
            reference, row = torch.nn.functional.conv2d(x, w), side * side
            args = (sw.row_ptr, sw.col_idx, sw.values, None, list(sw.shape), [1, 1], [0, 0], [1, 1])
            op = torch.ops.adapmtl.sparse_conv2d
            name = f"1x1 {cin}->{cout} at {side}x{side}"
        ms = time_under_configs(lambda: op(x, *args), ONE_TAP_CONFIGS, reps, reference)
        best_other = min(ms[1], ms[2])
        r = {"case": name, "row": row, "sparsity": sparsity, "ms": dict(zip(ONE_TAP_CONFIGS, ms)),
             "vectors_vs_best_other": best_other / ms[0]}
        rows.append(r)
        print(f"{name} ({row}-pixel row) {sparsity:.1%}: "
              + ", ".join(f"{c} {t:.3f} ms" for c, t in zip(ONE_TAP_CONFIGS, ms))
              + f"; channel vectors {r['vectors_vs_best_other']:.2f}x the better other", flush=True)
    return rows


# The capability levels, highest first: ATEN_CPU_CAPABILITY's value, and oneDNN's for its dense conv at that level.
CAPABILITIES = {"AVX512": ("avx512", "AVX512_CORE"), "AVX2": ("avx2", "AVX2"), "DEFAULT": ("default", "SSE41")}
CAPABILITY_CONFIGS = {**CONFIGS, "dense": None}


def capability_worker(quick: bool, reps: int) -> list[dict]:
    """In a process under one capability: the real kernel's convs at 90% (unstructured and 16 x 1) under each tile,
    the default's choice and dense F.conv2d, in alternation, each checked against F.conv2d first."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    ext = _ext.cpu_extension()
    for name, cin, cout, k, dil, size, x in head_convs(quick, gen):
        for block in (1, 16):
            w = block_pruned(cout, cin, k, block, 0.1, gen)
            sw = SparseWeight.from_dense(w)
            pad = dil * (k // 2)
            reference = torch.nn.functional.conv2d(x, w, None, 1, pad, dil)
            sparse = time_configs(x, sw, pad, dil, CONFIGS, reps, reference)
            dense = interleaved_median_ms([lambda: torch.nn.functional.conv2d(x, w, None, 1, pad, dil)], "cpu",
                                          reps=reps)[0]
            before = ext.cpu_sparse_panel_calls()
            torch.ops.adapmtl.sparse_conv2d(x, sw.row_ptr, sw.col_idx, sw.values, None, list(sw.shape), [1, 1],
                                            [pad, pad], [dil, dil])
            ran = [after - was for after, was in zip(ext.cpu_sparse_panel_calls(), before)]
            rows.append({"capability": ext.cpu_capability(), "conv": name, "size": size, "sparsity": 0.9,
                         "block": f"{block}x1", "ms": {**dict(zip(CONFIGS, sparse)), "dense": dense},
                         "auto_runs": ["one channel", "panel 4", "panel 8", "channel vectors"][ran.index(1)],
                         "auto_vs_dense": dense / sparse[-1]})
    return rows


def capabilities(quick: bool, reps: int) -> list[dict]:
    """capability_worker under each capability this CPU has (torch's own, and each below it), one process each."""
    own = torch.backends.cpu.get_cpu_capability()
    names = list(CAPABILITIES)
    if own not in names:
        return []  # not x86-64: one capability, the real kernel part's
    here = str(Path(adapmtl.__file__).parents[1])  # the workers import this process's adapmtl
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, os.path.abspath(__file__), "--capability-worker", "--reps", str(reps)]
    cmd += ["--quick"] if quick else []
    rows = []
    for cap in names[names.index(own):]:
        aten, onednn = CAPABILITIES[cap]
        env = {**base, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"the {cap} process failed (rc {run.returncode}):\n{run.stderr[-3000:]}")
        part = json.loads(run.stdout.strip().splitlines()[-1])
        assert all(r["capability"] == cap for r in part), (cap, part)
        for r in part:
            print(f"{cap} {r['conv']} {r['block']}: " + ", ".join(f"{c} {t:.2f} ms" for c, t in r["ms"].items())
                  + f"; auto ran {r['auto_runs']}, {r['auto_vs_dense']:.2f}x dense", flush=True)
        rows += part
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small convs, 2 reps, runs/bench")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--inner-loop-only", action="store_true",
                   help="only the single-threaded microbenchmark, into kernel_roofline_inner_<cpu>.json")
    p.add_argument("--tile-rows-only", action="store_true",
                   help="only the real kernel at each register tile height, into kernel_tile_rows_<cpu>.json")
    p.add_argument("--block-holes-only", action="store_true",
                   help="only padded channel vectors on 16x1 blocks with holes, into kernel_block_holes_<cpu>.json")
    p.add_argument("--one-tap-only", action="store_true",
                   help="only channel vectors against panels on one-tap rows, into kernel_one_tap_<cpu>.json")
    p.add_argument("--capabilities-only", action="store_true",
                   help="only the kernels at each CPU capability, into kernel_capabilities_<cpu>.json")
    p.add_argument("--capability-worker", action="store_true", help=argparse.SUPPRESS)  # one capability's process
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    reps = 2 if args.quick else args.reps
    if args.capability_worker:
        print(json.dumps(capability_worker(args.quick, reps)))
        return None
    info = device_description("cpu")

    def report(stem: str, rows: list, table: list, columns: list, what: str = "fp32, batch 1"):
        """A part run on its own: its table, and its rows into <stem>_<cpu>.json."""
        print(f"\n{info['device']}, torch {info['torch']}, {info['threads']} threads, {what}, medians in ms\n")
        print(format_table(table, columns))
        path = write_results(stem, info, {"quick": args.quick, "reps": args.reps, "rows": rows},
                             out_dir=args.out_dir, smoke=args.quick)
        print(f"\nwrote {path}")
        return rows

    if args.capabilities_only:
        rows = capabilities(args.quick, reps)
        table = [{"case": f"{r['capability']} {r['conv']} {r['block']}", **r["ms"], "runs": r["auto_runs"],
                  "gain": r["auto_vs_dense"]} for r in rows]
        return report("kernel_capabilities", rows, table,
                      [("case", "case", "<36")] + [(c, c, ".2f") for c in CAPABILITY_CONFIGS]
                      + [("runs", "auto runs", "<15"), ("gain", "auto vs dense", ".2f")])
    if args.one_tap_only:
        rows = one_tap(args.quick, reps)
        table = [{"case": r["case"], "row": r["row"], "sparsity": r["sparsity"], **r["ms"],
                  "gain": r["vectors_vs_best_other"]} for r in rows]
        return report("kernel_one_tap", rows, table,
                      [("case", "case", "<28"), ("row", "row", "d"), ("sparsity", "sparsity", ".3f")]
                      + [(c, c, ".3f") for c in ONE_TAP_CONFIGS] + [("gain", "vectors vs better other", ".2f")], "fp32")
    if args.block_holes_only:
        rows = block_holes(args.quick, reps)
        table = [{"case": f"{r['conv']} holes {r['hole']:.3f}", "padding": r["padding"], **r["ms"],
                  "gain": r["vectors_vs_best_other"]} for r in rows]
        return report("kernel_block_holes", rows, table,
                      [("case", "case", "<58"), ("padding", "padding", ".3f")] + [(c, c, ".2f") for c in HOLE_CONFIGS]
                      + [("gain", "vectors vs better other", ".2f")])
    if args.tile_rows_only:
        rows = tile_rows(args.quick, reps)
        return report("kernel_tile_rows", rows, [{"case": f"{r['conv']} {r['sparsity']:.1%}", **r["ms"]} for r in rows],
                      [("case", "case", "<50")] + [(c, c, ".2f") for c in TALL_CONFIGS])
    # the quick run's block is L1-sized (48 columns): its generated code compiles in seconds, not a minute
    loop = inner_loop((0.1,), reps=2, columns=48) if args.quick else inner_loop()
    for line in loop:
        print(f"inner loop at density {line['density']}: peak {line['peak_vfma_per_s'] / 1e9:.2f} G vector FMA/s; "
              + ", ".join(f"{k} {v['vfma_per_peak']:.2f}/peak ({v['loads_per_fma']:.2f} loads/FMA)"
                          for k, v in line.items() if isinstance(v, dict)))
    rows = [] if args.inner_loop_only else real_kernel(args.quick, reps)
    if rows:
        table = [{"case": f"{r['conv']} {r['sparsity']:.0%} {r['block']}", **r["ms"]} for r in rows]
        print(f"\n{info['device']}, torch {info['torch']}, {info['threads']} threads, fp32, batch 1, medians in ms\n")
        print(format_table(table, [("case", "case", "<36")] + [(c, c, ".2f") for c in CONFIGS]))
    name = "kernel_roofline_inner" if args.inner_loop_only else "kernel_roofline"
    path = write_results(name, info, {"quick": args.quick, "inner_loop": loop, "real_kernel": rows},
                         out_dir=args.out_dir, smoke=args.quick)
    print(f"\nwrote {path}")
    return loop, rows


if __name__ == "__main__":
    main()
