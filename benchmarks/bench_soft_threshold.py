"""Benchmark the soft-threshold op: every backend vs the eager PyTorch reference and torch.compile of it.

    python benchmarks/bench_soft_threshold.py                # CPU (and CUDA too if present)
    python benchmarks/bench_soft_threshold.py --device cuda --sizes 4718592 23068672
    python benchmarks/bench_soft_threshold.py --quick        # small sizes, few repetitions

Sizes are the weight tensors of the DeepLab-ResNet-34 NYUv2 multitask model (SPEC §4): a 1x1 head conv
(1M), the largest backbone conv (2.4M), an ASPP 3x3 branch conv (4.7M), one whole ASPP head as a flat
tensor (23M), and "model": all 90.7M prunable weights of the model, layer by layer, as one training
step sees them. Passes: fwd, bwd, fwd+bwd (float32, exact gradient). Bandwidth counts the memory floor of
SPEC §1 (fwd 8, bwd 12, fwd+bwd 20 bytes per element) and is compared with the copy bandwidth, a
`dst.copy_(src)` of the case's size timed in alternation with the passes (the machine's bandwidth drifts).
Like the trainer, the process keeps freed host memory (adapmtl/train/host_memory.py), so that no pass
pays for faulting in what an earlier one handed back to the OS. Results: a table on stdout and JSON in
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_description, format_table, interleaved_median_ms, write_results  # noqa: E402

from adapmtl.ops import available_backends, soft_threshold, soft_threshold_reference  # noqa: E402
from adapmtl.train.host_memory import retain_freed_memory  # noqa: E402

BYTES_PER_ELEMENT = {"fwd": 8, "bwd": 12, "fwd+bwd": 20}  # float32, SPEC §1


def resnet34_nyuv2_weight_shapes() -> list[tuple[int, ...]]:
    """Shapes of every prunable weight of DeepLab-ResNet-34 + three NYUv2 ASPP heads (SPEC §4)."""
    shapes = [(64, 3, 7, 7)]
    in_ch = 64
    for blocks, ch, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 1), (3, 512, 1)):
        for b in range(blocks):
            shapes += [(ch, in_ch, 3, 3), (ch, ch, 3, 3)]
            if b == 0 and (stride != 1 or in_ch != ch):
                shapes.append((ch, in_ch, 1, 1))
            in_ch = ch
    for out_ch in (40, 3, 1):  # segmentation, normals, depth
        for _ in range(4):  # ASPP branches
            shapes += [(1024, 512, 3, 3), (1024, 1024, 1, 1), (out_ch, 1024, 1, 1)]
    return shapes


def flat_sizes() -> dict[str, int]:
    return {"1x1 head conv": 1024 * 1024, "largest backbone conv": 512 * 512 * 9, "ASPP 3x3 conv": 1024 * 512 * 9,
            "one ASPP head": 4 * (9 * 512 * 1024 + 1024 * 1024 + 1024 * 40)}


def make_fn(backend: str, compiled_reference):
    if backend == "torch":
        return soft_threshold_reference
    if backend == "torch.compile":
        return compiled_reference
    return lambda w, s: soft_threshold(w, s, backend=backend)


def case_passes(shapes, fn, device):
    """The three passes of one backend over weights of `shapes`: [(pass name, callable)]."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ws = [(torch.randn(shape, generator=gen) * 0.05).to(device).requires_grad_() for shape in shapes]
    s = torch.tensor(-3.5, device=device, requires_grad=True)  # g(s) ≈ 0.03: about half the weights survive
    grads = [torch.randn_like(w) for w in ws]

    def forward():
        return [fn(w, s) for w in ws]

    outs = forward()

    def backward():
        torch.autograd.grad(outs, [*ws, s], grads, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(forward(), [*ws, s], grads)

    return [("fwd", forward), ("bwd", backward), ("fwd+bwd", forward_backward)]


def bench_case(label, shapes, backends, device, reps):
    """Every backend's passes and the copy of the same size, in alternation; rows and the copy bandwidth."""
    numel = sum(torch.Size(shape).numel() for shape in shapes)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    runs = [("copy", None, lambda: dst.copy_(src))]
    for backend, fn in backends.items():
        runs += [(name, backend, run) for name, run in case_passes(shapes, fn, device)]
    times = interleaved_median_ms([run for _, _, run in runs], device, warmup=1, reps=reps)
    copy_gbps = 2 * numel * src.element_size() / (times[0] * 1e-3) / 1e9
    rows = [dict(case=label, numel=numel, backend=backend, pass_=name, ms=ms,
                 gbps=BYTES_PER_ELEMENT[name] * numel / (ms * 1e-3) / 1e9)
            for (name, backend, _), ms in zip(runs[1:], times[1:])]
    return rows, copy_gbps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="device(s) to run on (default: cpu, plus cuda when available)")
    parser.add_argument("--sizes", type=int, nargs="*", help="flat tensor sizes instead of the model's")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model case")
    parser.add_argument("--backends", nargs="*", help="subset of backends (torch, torch.compile, cpp, cuda, triton)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions (a smoke test, written to runs/bench)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON (default benchmarks/results; "
                        "runs/bench with --quick)")
    args = parser.parse_args(argv)

    retained = retain_freed_memory()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.quick:
        cases = {f"{n} elements": [(n,)] for n in (args.sizes or [4099, 65536])}
        args.reps = 3
    else:
        cases = {f"{n} elements": [(n,)] for n in args.sizes} if args.sizes else {k: [(v,)] for k, v in flat_sizes().items()}
        if not args.no_model and not args.sizes:
            cases["model (90.7M, all layers)"] = resnet34_nyuv2_weight_shapes()

    for device in devices:
        info = device_description(device)
        backends = ["torch", "torch.compile"] + [b for b in available_backends(device) if b != "torch"]
        if device == "cpu":
            backends = [b for b in backends if b != "triton"]  # the CPU interpreter is for testing only
        if args.backends:
            backends = [b for b in backends if b in args.backends]
        torch._dynamo.reset()
        compiled_reference = torch.compile(soft_threshold_reference, dynamic=False)

        rows = []
        copy_bw = {}
        fns = {backend: make_fn(backend, compiled_reference) for backend in backends}
        for label, shapes in cases.items():
            case_rows, copy_bw[label] = bench_case(label, shapes, fns, device, args.reps)
            rows += case_rows
        eager = {(r["case"], r["pass_"]): r["ms"] for r in rows if r["backend"] == "torch"}
        for r in rows:
            # vs the eager reference, when it is among the backends timed (--backends may leave it out)
            r["speedup"] = eager[(r["case"], r["pass_"])] / r["ms"] if eager else None
            r["copy_gbps"] = copy_bw[r["case"]]
            r["of_copy"] = r["gbps"] / copy_bw[r["case"]]
            r["floor_ms"] = BYTES_PER_ELEMENT[r["pass_"]] * r["numel"] / (copy_bw[r["case"]] * 1e9) * 1e3

        print(f"\nsoft_threshold on {info['device']} (torch {info['torch']}, {info['threads']} threads), float32, exact grad")
        print(format_table(rows, [
            ("case", "case" + " " * 22, "<26"), ("numel", "elements", ",d"), ("backend", "backend      ", "<13"),
            ("pass_", "pass    ", "<8"), ("ms", "median ms", ".3f"), ("speedup", "vs eager", ".2f"),
            ("gbps", "GB/s", ".1f"), ("of_copy", "of copy BW", ".0%"), ("floor_ms", "floor ms", ".3f"),
        ]))
        path = write_results("soft_threshold", info, {
            "dtype": "float32", "grad": "exact", "bytes_per_element": BYTES_PER_ELEMENT,
            "copy_bandwidth_gbps": copy_bw, "retain_host_memory": retained, "rows": rows,
        }, args.out_dir, smoke=args.quick)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
