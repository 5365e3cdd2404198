"""Benchmark the deployment formats of a pruned multitask model: eager (dense finalized and sparse export),
the torch.export program (.pt2, the sparse layers as adapmtl custom ops) and AOTInductor's compilation of
each, timed in alternation in one run.

    python benchmarks/bench_export.py                   # tiny model at 90% sparsity, batch 1, 64x64
    python benchmarks/bench_export.py --backbone mobilenetv2 --head-channels 64 --size 128
    python benchmarks/bench_export.py --quick           # a smoke run (fewer reps, written to runs/bench)

The model's thresholds are set to each component's own 90% quantile of |w| (the sparsity is reported),
so the result does not depend on a training run. Results: a table on stdout and JSON in
benchmarks/results/ (GFLOP/s counts the dense model's multiply-adds, 2 FLOPs each).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_description, format_table, interleaved_median_ms, write_results  # noqa: E402

import adapmtl  # noqa: E402
from adapmtl.interchange import export_pt2  # noqa: E402
from adapmtl.models import build_model  # noqa: E402


def pruned_model(backbone: str, head_channels, sparsity: float):
    torch.manual_seed(0)
    model = build_model(backbone, tasks=["segment_semantic", "normal", "depth"], head_channels=head_channels,
                        dataset="nyuv2")
    groups = adapmtl.sparsify(model, init=-15.0)
    with torch.no_grad():
        for name, group in groups.items():
            weights = torch.cat([m.weight.detach().abs().flatten() for _, m in adapmtl.str_layers(model)
                                 if m.s is group.s])
            t = float(torch.quantile(weights[torch.randperm(weights.numel())[:1_000_000]], sparsity))
            group.s.fill_(math.log(t / (1 - t)))  # sigmoid(s) = the component's quantile
    return model.eval()


def conv_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    flops = 0.0

    def hook(m, inp, out):
        nonlocal flops
        flops += 2.0 * out.numel() * m.weight[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="tiny, mobilenetv2 or resnet34")
    parser.add_argument("--head-channels", type=int, default=None, help="ASPP width (default: the model's)")
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.9, help="per-component sparsity the thresholds are set to")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 repetitions, written to runs/bench")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; runs/bench with --quick)")
    args = parser.parse_args(argv)
    reps = 5 if args.quick else args.reps

    info = device_description("cpu")
    model = pruned_model(args.backbone, args.head_channels, args.sparsity)
    x = torch.randn(args.batch, 3, args.size, args.size)
    rep = adapmtl.sparsity_report(model)
    sparse = adapmtl.export_sparse(model, min_sparsity=0.5)  # a copy: `model` stays as it is
    dense = adapmtl.finalize(model)
    layers = sum(1 for d in sparse.sparse_export_report if d.get("sparse"))
    flops = conv_flops(dense, x)

    variants, compile_s = {"eager dense": dense, "eager sparse": sparse}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in (("dense", dense), ("sparse", sparse)):
            program = export_pt2(module, x, os.path.join(tmp, f"{name}.pt2"))
            variants[f"pt2 {name}"] = torch.export.load(os.path.join(tmp, f"{name}.pt2")).module()
            t0 = time.perf_counter()
            package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, f"{name}_aoti.pt2"))
            compile_s[f"aoti {name}"] = time.perf_counter() - t0
            variants[f"aoti {name}"] = torch._inductor.aoti_load_package(package)
        with torch.no_grad():
            ref = dense(x)
            errors = {}
            for name, fn in variants.items():
                out = fn(x)
                errors[name] = max(float((out[t] - ref[t]).abs().max() / ref[t].abs().max().clamp_min(1e-12))
                                   for t in ref)
            names = list(variants)
            times = interleaved_median_ms([lambda f=variants[n]: f(x) for n in names], "cpu", warmup=2, reps=reps)
    base = times[names.index("eager dense")]
    rows = [{"variant": n, "ms": t, "ratio": base / t, "gflops": flops / t / 1e6, "err": errors[n],
             "compile_s": compile_s.get(n)} for n, t in zip(names, times)]
    print(f"{info['device']}, {info['threads']} threads; {args.backbone} (head_channels {args.head_channels}), "
          f"input {args.batch}x3x{args.size}x{args.size}, overall sparsity {100 * rep.overall:.1f}%, "
          f"{layers}/{len(sparse.sparse_export_report)} layers sparse; median of {reps}, variants in alternation")
    print(format_table(rows, [("variant", "variant", "<14"), ("ms", "median ms", ".3f"),
                              ("ratio", "speedup vs eager dense", ".2f"), ("gflops", "dense-equiv GFLOP/s", ".1f"),
                              ("err", "max rel err", ".1e"), ("compile_s", "compile s", ".1f")]))
    name = f"export_{args.backbone}" + ("_quick" if args.quick else "")
    path = write_results(name, info, {"args": vars(args), "overall_sparsity": rep.overall, "sparse_layers": layers,
                                      "dense_flops": flops, "rows": rows}, args.out, smoke=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
