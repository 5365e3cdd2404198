"""Benchmark sparse convolution: every conv shape of the paper's multitask models vs dense F.conv2d.

    python benchmarks/bench_sparse_conv.py                 # all shapes, batch 1 and 16, CPU (+CUDA if present)
    python benchmarks/bench_sparse_conv.py --quick         # head shapes only, batch 1, 2 sparsities, few reps
    python benchmarks/bench_sparse_conv.py --batches 1 --models resnet34 --no-e2e

Shapes: every distinct Conv2d of DeepLab-ResNet-34 and MobileNetV2 with three NYUv2 ASPP heads
(SPEC §4) at 321x321 input, found by running the models on the meta device. Depthwise/grouped convs
are listed but always run dense (the op layer's stated fallback). For each shape, batch and sparsity
(unstructured random masks): dense F.conv2d (oneDNN on CPU / cuDNN on GPU, default settings), the
torch.sparse CSR x unfold peer (batch 1 only: it is far behind), and each of our backends; median
times, speedup vs dense, and the crossover sparsity (where our fastest backend first beats dense,
interpolated linearly between grid points). End-to-end: the whole pruned model at the paper's
sparsity (backbone 52.7%, heads 86.2/94.7/90.8%, SPEC §6), dense vs `export_sparse`, batch 1 (and
--e2e-batches). --autotune adds the column cpp_tuned: the C++ kernel with the autotuner's configuration
(set_cpu_autotune), while cpp stays on the default one, in the same alternation.
Output: a table on stdout, JSON and a PNG plot (speedup vs sparsity) in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_description, format_table, interleaved_median_ms, median_time_ms, write_results  # noqa: E402

from adapmtl.ops.sparse_conv import available_sparse_backends, set_cpu_autotune, sparse_conv2d  # noqa: E402
from adapmtl.ops.sparse_weight import SparseWeight  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
PAPER_SPARSITY = {"backbone": 0.527, "segment_semantic": 0.862, "normal": 0.947, "depth": 0.908}
TASKS = {"segment_semantic": 40, "normal": 3, "depth": 1}


def model_conv_shapes(backbone: str, size: int = 321) -> list[dict]:
    """Distinct conv layers (shape, stride, padding, dilation, groups, input size) of one model."""
    from adapmtl.models import build_model

    model = build_model(backbone, tasks=TASKS).to("meta").eval()
    seen: dict[tuple, dict] = {}

    def hook(module, inputs, name):
        x = inputs[0]
        key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0], module.padding[0],
               module.dilation[0], module.groups, x.shape[2], x.shape[3])
        entry = seen.setdefault(key, dict(zip(("c_in", "c_out", "k", "stride", "padding", "dilation", "groups", "h", "w"),
                                              key), model=backbone, count=0, part="head" if name.startswith("heads") else "backbone"))
        entry["count"] += 1

    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: hook(mod, inp, name))
               for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    return list(seen.values())


def random_pruned(shape, sparsity, gen, device):
    w = torch.randn(shape, generator=gen)
    keep = torch.rand(shape, generator=gen) >= sparsity
    return (w * keep).to(device)


def crossover(points: list[tuple[float, float]]) -> float | None:
    """First sparsity where speedup reaches 1 (linear interpolation); None if never; the first grid point
    if already faster there."""
    points = sorted(points)
    if not points:
        return None
    if points[0][1] >= 1:
        return points[0][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v0 < 1 <= v1:
            return s0 + (1 - v0) * (s1 - s0) / (v1 - v0)
    return None


def _with_config(config: str, fn):
    """fn run under ADAPMTL_CPU_SPARSE_CONFIG=config ("" = the autotuner's choice when it is on)."""
    def run():
        os.environ["ADAPMTL_CPU_SPARSE_CONFIG"] = config
        try:
            return fn()
        finally:
            os.environ.pop("ADAPMTL_CPU_SPARSE_CONFIG", None)
    return run


def sparse_fn(x, sw, args, backend):
    """One timed variant: a backend, or "cpp_tuned" (the C++ kernel with the autotuner's configuration; the
    plain "cpp" then runs the default configuration, forced, so that the autotuner never touches it)."""
    if backend == "cpp_tuned":
        return _with_config("", lambda: sparse_conv2d(x, sw, None, *args, backend="cpp"))
    fn = lambda: sparse_conv2d(x, sw, None, *args, backend=backend)  # noqa: E731
    return _with_config("layout=auto", fn) if backend == "cpp" else fn


def bench_shape(shape: dict, batch: int, sparsities, device, backends, reps: int, csr: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, shape["c_in"], shape["h"], shape["w"], generator=gen).to(device)
    wshape = (shape["c_out"], shape["c_in"] // shape["groups"], shape["k"], shape["k"])
    args = (shape["stride"], shape["padding"], shape["dilation"])
    dense_w = torch.randn(wshape, generator=gen).to(device)
    dense_fn = lambda: F.conv2d(x, dense_w, None, *args, shape["groups"])  # noqa: E731
    rows = []
    for sp in sparsities:
        row = dict(shape, batch=batch, sparsity=sp)
        if shape["groups"] != 1:  # depthwise/grouped: always dense (the op layer's fallback)
            row["dense_ms"] = median_time_ms(dense_fn, device, warmup=1, reps=reps)
        else:
            sw = SparseWeight.from_dense(random_pruned(wshape, sp, gen, device))
            ref = F.conv2d(x, sw.to_dense(), None, *args)
            names = backends + (["torch_csr"] if csr else [])
            fns = [sparse_fn(x, sw, args, backend) for backend in names]
            for fn in fns:
                torch.testing.assert_close(fn(), ref, rtol=1e-3, atol=1e-3)  # never time a wrong kernel
            # dense is timed in the same rounds as the sparse kernels (see interleaved_median_ms)
            dense_ms, *sparse_ms = interleaved_median_ms([dense_fn] + fns, device, reps=reps)
            row["dense_ms"] = dense_ms
            for backend, ms in zip(names, sparse_ms):
                row[f"{backend}_ms"] = ms
                row[f"{backend}_speedup"] = dense_ms / ms
            ours = [row[f"{b}_speedup"] for b in backends]
            row["best_speedup"] = max(ours) if ours else None
        rows.append(row)
    return rows


def end_to_end(backbone: str, device, reps: int, batch: int = 1) -> dict:
    """Whole model at the paper's sparsity, 321x321: dense (finalized) vs export_sparse."""
    from adapmtl.export import export_sparse
    from adapmtl.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, tasks=TASKS).eval().to(device)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, component in model.components().items():
            for m in component.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_((torch.rand(m.weight.shape, generator=gen) >= PAPER_SPARSITY[name]).to(device))
    x = torch.randn(batch, 3, 321, 321, generator=gen).to(device)
    result = {"model": backbone, "batch": batch, "sparsity": PAPER_SPARSITY}
    for policy in ("crossover", "time"):
        t0 = time.perf_counter()
        exported = export_sparse(model, policy=policy, example_input=x if policy == "time" else None)
        export_s = time.perf_counter() - t0
        with torch.no_grad():
            ref, out = model(x), exported(x)
            err = max(((out[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item() for k in ref)
            dense_ms, sparse_ms = interleaved_median_ms([lambda: model(x), lambda: exported(x)], device, reps=reps)
        n_sparse = sum(r["sparse"] for r in exported.sparse_export_report)
        result[policy] = dict(dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                              sparse_layers=n_sparse, layers=len(exported.sparse_export_report),
                              max_rel_err=err, export_s=export_s)
    return result


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("backbone", "head") if any(r["part"] == p for r in rows)]  # e.g. --heads-only
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, part in zip(axes, parts):
        groups: dict[str, list] = {}
        for r in rows:
            if r["part"] == part and r.get("best_speedup"):
                label = (f"{r['model'][:3]} {r['c_in']}->{r['c_out']} k{r['k']} s{r['stride']} d{r['dilation']} "
                         f"{r['h']}px b{r['batch']}")
                groups.setdefault(label, []).append((r["sparsity"], r["best_speedup"]))
        for label, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1, label=label)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(f"{part} convs")
        if 0 < len(groups) <= 16:
            ax.legend(fontsize=6)
    axes[0].set_ylabel("speedup vs dense (fastest adapmtl backend)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda too if present)")
    parser.add_argument("--models", nargs="+", default=["resnet34", "mobilenetv2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--heads-only", action="store_true", help="only the head (ASPP) shapes")
    parser.add_argument("--no-csr", action="store_true", help="skip the torch.sparse CSR peer")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model timing")
    parser.add_argument("--e2e-batches", nargs="+", type=int, default=[1], help="batch sizes of the end-to-end timing")
    parser.add_argument("--autotune", action="store_true",
                        help="also time the C++ kernel with the autotuner's configuration (column cpp_tuned; "
                             "adapmtl.ops.set_cpu_autotune), and the end-to-end models with it on")
    parser.add_argument("--quick", action="store_true", help="head shapes of resnet34, batch 1, 0.9/0.95, 3 reps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; runs/bench "
                        "with --quick)")
    parser.add_argument("--name", default=None, help="result file stem (default sparse_conv[_quick])")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.batches, args.sparsities, args.reps, args.heads_only = ["resnet34"], [1], [0.9, 0.95], 3, True
        args.no_e2e = True
    devices = [args.device] if args.device else (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for device_name in devices:
        device = torch.device(device_name)
        info = device_description(device)
        backends = [b for b in available_sparse_backends(device) if b not in ("torch", "torch_csr")]
        if device.type == "cpu":
            backends = [b for b in backends if b != "triton"]  # the interpreter is not a CPU backend
            if args.autotune and "cpp" in backends:
                set_cpu_autotune(True)
                backends.append("cpp_tuned")
        shapes = [s for m in args.models for s in model_conv_shapes(m)]
        if args.heads_only:
            shapes = [s for s in shapes if s["part"] == "head"]
        print(f"# {info['device']} ({info['threads']} threads), backends {backends}, {len(shapes)} shapes", flush=True)
        rows = []
        for batch in args.batches:
            for shape in shapes:
                csr = not args.no_csr and batch == 1
                rows += bench_shape(shape, batch, args.sparsities, device, backends, args.reps, csr)
                last = rows[-1]
                print(f"  b{batch} {shape['model']} {shape['c_in']}->{shape['c_out']} k{shape['k']} s{shape['stride']} "
                      f"d{shape['dilation']} g{shape['groups']} {shape['h']}x{shape['w']}: dense {last['dense_ms']:.2f} ms, "
                      f"best speedup at {last['sparsity']}: {last.get('best_speedup') or 0:.2f}", flush=True)
        cross = []
        for batch in args.batches:
            for shape in shapes:
                if shape["groups"] != 1:
                    continue
                pts = [(r["sparsity"], r["best_speedup"]) for r in rows
                       if r["batch"] == batch and all(r[k] == shape[k] for k in ("model", "c_in", "c_out", "k", "stride",
                                                                                  "padding", "dilation", "h", "w"))]
                cross.append(dict(shape, batch=batch, crossover=crossover(pts)))
        cols = [("model", "model", "s"), ("part", "part", "s"), ("c_in", "C_in", "d"), ("c_out", "C_out", "d"),
                ("k", "k", "d"), ("stride", "s", "d"), ("dilation", "dil", "d"), ("groups", "g", "d"), ("h", "H", "d"),
                ("batch", "N", "d"), ("sparsity", "sparsity", ".2f"), ("dense_ms", "dense ms", ".2f")]
        for b in backends + (["torch_csr"] if not args.no_csr else []):
            cols += [(f"{b}_ms", f"{b} ms", ".2f"), (f"{b}_speedup", f"{b} x", ".2f")]
        print(format_table(rows, cols))
        print()
        print(format_table(cross, [("model", "model", "s"), ("part", "part", "s"), ("c_in", "C_in", "d"),
                                   ("c_out", "C_out", "d"), ("k", "k", "d"), ("stride", "s", "d"),
                                   ("dilation", "dil", "d"), ("h", "H", "d"), ("batch", "N", "d"),
                                   ("crossover", "crossover sparsity", ".3f")]))
        e2e = []
        if not args.no_e2e:
            for m, batch in [(m, b) for m in args.models for b in args.e2e_batches]:
                e2e.append(end_to_end(m, device, max(3, args.reps), batch))
                r = e2e[-1]
                for policy in ("crossover", "time"):
                    p = r[policy]
                    print(f"end-to-end {m} batch {batch} ({policy}): dense {p['dense_ms']:.1f} ms, exported "
                          f"{p['sparse_ms']:.1f} ms, speedup {p['speedup']:.2f}x, {p['sparse_layers']}/{p['layers']} "
                          f"layers sparse, max rel err {p['max_rel_err']:.1e}", flush=True)
        name = args.name or ("sparse_conv_quick" if args.quick else "sparse_conv")
        path = write_results(name, info, {"backends": backends, "rows": rows, "crossover": cross, "end_to_end": e2e,
                                          "args": vars(args)}, args.out, smoke=args.quick)
        png = path.with_suffix(".png")
        plot(rows, png, f"sparse conv speedup vs dense, {info['device']} ({info['threads']} threads)")
        print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
