"""Benchmark a pruned model against the runtimes a user could run instead (issue: "faster than the runtime a user
already has"): the same pruned weights run dense in torch eager, torch.compile (Inductor), an AOTInductor package
with freezing (`aoti_frozen`) and onnxruntime (and DeepSparse when it is importable), and ours:
`export_sparse(policy="time")` in eager and as an AOTInductor package of its torch.export program (frozen too).
Every variant of a row is timed in alternation in one process.

    python benchmarks/bench_peer.py                        # the six rows at batch 1 (~15 min on 2 cores)
    python benchmarks/bench_peer.py --rows aspp_d6_90 --batches 1 16
    python benchmarks/bench_peer.py --fuse-ab --batches 1 16  # the export with / without fused conv epilogues
    python benchmarks/bench_peer.py --plan-cache-ab         # the C++ kernel's plans kept across calls or not
    python benchmarks/bench_peer.py --tile-rows-ab          # 2-row register tiles vs the default (tall on narrow maps)
    python benchmarks/bench_peer.py --quick                # a smoke run (small inputs, runs/bench)
    python benchmarks/bench_peer.py --block 4              # weights pruned in 4x1 blocks (prune.block=4)
    python benchmarks/bench_peer.py --components           # each model's backbone and heads on their own

DeepSparse (`deepsparse==1.8.0`, the last release with its engine) needs numpy 1.x and reads ONNX IR <= 9, so it
runs from a venv of its own that still sees this environment's torch and adapmtl; there the ONNX file both
onnxruntime and DeepSparse run comes from torch's TorchScript exporter (_onnx_exporter):

    python -m venv --system-site-packages ds-venv && ds-venv/bin/pip install deepsparse==1.8.0
    ds-venv/bin/python benchmarks/bench_peer.py

Every variant's output is checked against torch eager before it is timed; one that differs is reported, not
timed (DeepSparse under numpy 2 computed garbage without an error).

Rows: the ASPP 3x3 dilation-6 conv 512->1024 and the 1x1 conv 1024->1024 at 41x41 (90% and 95%, random
unstructured masks), and DeepLab-ResNet-34 / MobileNetV2 with three ASPP heads at 321x321 at the paper's
component sparsities. "vs best dense" divides the fastest dense runtime's median (of torch eager, torch.compile,
the frozen AOTInductor package and onnxruntime) by ours (the better of eager and AOTInductor). GFLOP/s counts
the dense model's multiply-adds (2 FLOPs each) in every column, so it reads as effective throughput. "per round"
is the range of that ratio taken round by round (`round_vs_best_dense`: the variants of one round run within
seconds of each other, and this VM moves our kernels' speed between rounds). Results: a table, JSON (each row's
medians and every round's times, `round_ms`) and a PNG named by the CPU in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_export import conv_flops  # noqa: E402
from bench_sparse_conv import PAPER_SPARSITY, TASKS  # noqa: E402
from common import device_description, device_tag, format_table, write_results  # noqa: E402
from common import interleaved_median_ms, interleaved_times_ms  # noqa: E402

import adapmtl  # noqa: E402
from adapmtl.export_format import default_concrete_args  # noqa: E402
from adapmtl.export_passes import fuse_epilogues  # noqa: E402
from adapmtl.export_stacking import stack_where_faster  # noqa: E402
from adapmtl.interchange import export_onnx  # noqa: E402
from adapmtl.ops import clear_cpu_sparse_plan_cache, cpu_sparse_plan_cache_info  # noqa: E402

ROWS = {
    "aspp_d6_90": ("conv", dict(cin=512, cout=1024, k=3, dilation=6, size=41), 0.90),
    "aspp_d6_95": ("conv", dict(cin=512, cout=1024, k=3, dilation=6, size=41), 0.95),
    "conv1x1_90": ("conv", dict(cin=1024, cout=1024, k=1, dilation=1, size=41), 0.90),
    "conv1x1_95": ("conv", dict(cin=1024, cout=1024, k=1, dilation=1, size=41), 0.95),
    "resnet34": ("model", dict(backbone="resnet34", size=321), None),
    "mobilenetv2": ("model", dict(backbone="mobilenetv2", size=321), None),
}
DENSE = ("torch_eager", "torch_compile", "aoti_frozen", "onnxruntime", "deepsparse")
OURS = ("ours_eager", "ours_aoti")
# The dense runtimes "vs best dense" takes the fastest of; DeepSparse, itself a sparse engine, is compared apart.
BEST_DENSE = DENSE[:4]
# AOTInductor's inference setting on the CPU: weights are constants, so convolutions take oneDNN's prepacked
# weights and their pointwise neighbours fused (dense MobileNetV2's backbone: 9.9 against 15.6 ms under
# torch.compile without it, 12.4 for onnxruntime).
AOTI_CONFIGS = {"freezing": True}


def pruning_mask(shape, sparsity: float, block: int, gen) -> torch.Tensor:
    """A random mask keeping 1 - sparsity of the weights: per weight (block 1), or per block of `block`
    consecutive output channels at each (input channel, tap), as `prune.block` training leaves them."""
    live = torch.rand((-(-shape[0] // block), *shape[1:]), generator=gen) >= sparsity
    return live.repeat_interleave(block, 0)[: shape[0]].float()


class _Conv(nn.Module):
    """One pruned conv as a model (so every runtime gets the same kind of input)."""

    def __init__(self, cin, cout, k, dilation, sparsity, gen, block=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation)
        with torch.no_grad():
            self.conv.weight.mul_(pruning_mask(self.conv.weight.shape, sparsity, block, gen))

    def forward(self, x):
        return self.conv(x)


def build_row(kind: str, spec: dict, sparsity, batch: int, quick: bool, block: int = 1):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    size = spec["size"] if not quick else max(9, spec["size"] // 4)
    if kind == "conv":
        cin, cout = (spec["cin"], spec["cout"]) if not quick else (spec["cin"] // 8, spec["cout"] // 8)
        model = _Conv(cin, cout, spec["k"], spec["dilation"], sparsity, gen, block)
        x = torch.randn(batch, cin, size, size, generator=gen)
        label = f"{spec['k']}x{spec['k']} d{spec['dilation']} {cin}->{cout} at {size}^2, {int(100 * sparsity)}%"
    else:
        from adapmtl.models import build_model
        backbone = "tiny" if quick else spec["backbone"]
        model = build_model(backbone, tasks=TASKS, dataset="nyuv2")
        with torch.no_grad():
            for name, component in model.components().items():
                for m in component.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        m.weight.mul_(pruning_mask(m.weight.shape, PAPER_SPARSITY[name], block, gen))
                    elif isinstance(m, nn.BatchNorm2d):  # trained-like statistics, so folding is not a no-op
                        m.running_var.uniform_(0.5, 2.0, generator=gen)
                        m.running_mean.uniform_(-0.5, 0.5, generator=gen)
        x = torch.randn(batch, 3, size, size, generator=gen)
        label = f"{backbone} + 3 ASPP heads at {size}^2, paper sparsities"
    if block > 1:
        label += f", {block}x1 blocks"
    return model.eval(), x, label


def _onnx_exporter() -> str:
    """torch.onnx's dynamo exporter (what adapmtl.interchange.export_onnx uses) where its onnxscript imports;
    else the TorchScript one. DeepSparse 1.8 needs numpy 1.x and reads ONNX IR <= 9, and in its venv onnxscript's
    dependencies (ml_dtypes for numpy 2) fail to import: there the legacy exporter writes the file (opset 17, IR 8)
    that onnxruntime and DeepSparse both run."""
    try:
        import onnxscript  # noqa: F401
    except Exception:  # noqa: BLE001 -- a broken dependency raises more than ImportError
        return "torchscript"
    return "dynamo"


def _onnx_file(model, x, tmp, exporter: str) -> str:
    path = os.path.join(tmp, "m.onnx")
    export_onnx(model, x, path, exporter=exporter)
    return path


def _onnxruntime(path, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads spin after a run by default: on a 2-core machine they would take the cores from the
    # variant timed next in the alternation (measured: our eager conv 48.8 ms after it vs ~25 ms with this off)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _deepsparse(onnx_path, x):
    from deepsparse import compile_model  # only where it is installed (its own venv: Python <= 3.11)

    engine = compile_model(onnx_path, batch_size=x.shape[0], num_cores=torch.get_num_threads())
    inputs = [x.numpy()]
    return lambda: engine(inputs)


def outputs_of(out) -> list:
    """A variant's outputs as float64 tensors, in the model's order (a dict's keys, which name the ONNX outputs)."""
    if isinstance(out, dict):
        out = list(out.values())
    elif not isinstance(out, (list, tuple)):
        out = [out]
    return [torch.as_tensor(o).detach().double() for o in out]


# A variant whose output differs from torch eager's by more than this fraction of the output's largest magnitude
# is wrong, not fast: it is reported and left out of the timing (DeepSparse 1.8 under numpy 2 returned garbage
# on a plain conv, silently; fp32 runtimes agree to ~1e-6 of the scale on these rows).
WRONG_RESULT = 1e-3


def result_error(out, reference: list) -> float:
    got = outputs_of(out)
    if len(got) != len(reference):
        return float("inf")
    return max(((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item() if g.shape == r.shape else float("inf")
               for g, r in zip(got, reference))


def _aoti(model, x, tmp, name: str):
    """`model` (ours or the dense one) as an AOTInductor package of its torch.export program, frozen."""
    from adapmtl.interchange import export_pt2

    program = export_pt2(model, x, os.path.join(tmp, f"{name}.pt2"), dynamic_batch=False)
    package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, f"{name}_aoti.pt2"),
                                                       inductor_configs=AOTI_CONFIGS)
    runner = torch._inductor.aoti_load_package(package)
    return lambda: runner(x)


def bench_row(name: str, batch: int, reps: int, quick: bool, skip: set, block: int = 1) -> dict:
    kind, spec, sparsity = ROWS[name]
    model, x, label = build_row(kind, spec, sparsity, batch, quick, block)
    return bench_case(name, model, x, label, batch, reps, skip)


def bench_case(name: str, model: nn.Module, x: torch.Tensor, label: str, batch: int, reps: int, skip: set) -> dict:
    """Every variant of one model on one input, checked against torch eager, then timed in alternation."""
    flops = conv_flops(model, x)
    exporter = _onnx_exporter()
    fns, setup, errors, result_errors = {"torch_eager": lambda: model(x)}, {}, {}, {}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        reference = outputs_of(model(x))

        def attempt(variant, make):
            """Set up one variant (timed as setup_s); a runtime that fails is reported, not fatal."""
            if variant in skip:
                return None
            t0 = time.perf_counter()
            try:
                made = make()
            except ImportError as exc:
                errors[variant] = f"not installed ({exc})"
                return None
            except Exception as exc:  # noqa: BLE001
                errors[variant] = f"{type(exc).__name__}: {str(exc)[:200]}"
                return None
            setup[variant] = time.perf_counter() - t0
            return made

        def add(variant, fn):
            """Time `fn` only if its output is torch eager's (within WRONG_RESULT of the scale)."""
            err = result_errors[variant] = result_error(fn(), reference)
            if err <= WRONG_RESULT:
                fns[variant] = fn
            else:
                errors[variant] = f"wrong result: max error {err:.2e} of the output's scale; not timed"

        compiled = attempt("torch_compile", lambda: torch.compile(copy.deepcopy(model)))
        if compiled is not None and attempt("torch_compile", lambda: compiled(x)) is not None:  # compile now
            add("torch_compile", lambda: compiled(x))
        frozen = attempt("aoti_frozen", lambda: _aoti(model, x, tmp, "dense"))
        if frozen is not None:
            add("aoti_frozen", frozen)
        onnx_path = None
        if not {"onnxruntime", "deepsparse"} <= skip:
            onnx_path = attempt("onnx_export", lambda: _onnx_file(model, x, tmp, exporter))
        if onnx_path is not None:
            for variant, make in (("onnxruntime", _onnxruntime), ("deepsparse", _deepsparse)):
                fn = attempt(variant, lambda make=make: make(onnx_path, x))
                if fn is not None:
                    add(variant, fn)
        exported = attempt("ours_eager", lambda: adapmtl.export_sparse(model, policy="time", example_input=x))
        if exported is not None:
            add("ours_eager", lambda: exported(x))
            aoti = attempt("ours_aoti", lambda: _aoti(exported, x, tmp, "ours"))
            if aoti is not None:
                add("ours_aoti", aoti)
        names = list(fns)
        rounds = interleaved_times_ms([fns[n] for n in names], torch.device("cpu"), reps=reps)
    ms = {n: statistics.median(t) for n, t in zip(names, rounds)}
    # every round's times: this VM runs a model at two speeds in phases of seconds (ours far more than dense), which a
    # median hides and the rounds show
    round_ms = dict(zip(names, rounds))
    best_dense = min((ms[n], n) for n in BEST_DENSE if n in ms)
    best_ours = min(((ms[n], n) for n in OURS if n in ms), default=(None, None))
    row = {"row": name, "case": label, "batch": batch, "gflop": flops / 1e9, "ms": ms, "round_ms": round_ms,
           "setup_s": setup, "errors": errors, "result_errors": result_errors, "onnx_exporter": exporter,
           "best_dense": best_dense[1], "best_ours": best_ours[1],
           "vs_best_dense": None if best_ours[0] is None else best_dense[0] / best_ours[0],
           "round_vs_best_dense": round_ratios(round_ms, BEST_DENSE)}
    if "deepsparse" in ms and best_ours[0] is not None:
        row["vs_deepsparse"] = ms["deepsparse"] / best_ours[0]
        row["round_vs_deepsparse"] = round_ratios(round_ms, ["deepsparse"])
    if exported is not None:
        row["layers"] = export_layers(exported)
    return row


def round_ratios(round_ms: dict, against) -> list:
    """Per round, the fastest of `against` over our faster variant: a paired sample of the ratio. The
    machine's state moves within a run (docs/cpu_sparse_kernel.md: this VM runs our kernels at two speeds in
    phases of seconds to minutes, dense far less), and a round's variants run within seconds of each other, so the
    spread of these is the spread of the ratio over the states the run met; a ratio of medians hides it."""
    dense = [round_ms[n] for n in against if n in round_ms]
    ours = [round_ms[n] for n in OURS if n in round_ms]
    if not dense or not ours:
        return []
    return [min(d) / min(o) for d, o in zip(zip(*dense), zip(*ours))]


def ratio_spread(ratios: list) -> str | None:
    """'min-max' of the per-round ratios, for the table."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else None


def row_line(row: dict) -> str:
    """One timed row as a line of progress: every variant's median and ours against the best dense runtime."""
    ratio = (f"; ours vs best dense ({row['best_dense']}) {row['vs_best_dense']:.2f}x (rounds "
             f"{ratio_spread(row['round_vs_best_dense'])})" if row["vs_best_dense"] else "")
    return f"{row['case']} b{row['batch']}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items()) + ratio


def export_layers(exported) -> list:
    """The time policy's own per-layer record: each conv / linear alone, dense (torch eager) and sparse (ours), ms."""
    return [{"layer": e["layer"], "kind": e["kind"], "sparsity": e["sparsity"], "sparse": e["sparse"],
             "dense_ms": 1e3 * e["dense_s"] if "dense_s" in e else None,
             "sparse_ms": 1e3 * e["sparse_s"] if "sparse_s" in e else None} for e in exported.sparse_export_report]


def layer_split(row: dict) -> dict:
    """Where our export's time goes: its sparse layers and its timed dense layers at their own (isolated) times, and
    the rest of its measured median (convs below min_sparsity or not candidates, e.g. depthwise; pooling,
    upsampling, elementwise ops; the layers' interplay in cache)."""
    layers = row.get("layers") or []
    sparse = sum(e["sparse_ms"] for e in layers if e["sparse"] and e["sparse_ms"] is not None)
    dense = sum(e["dense_ms"] for e in layers if not e["sparse"] and e["dense_ms"] is not None)
    dense_of_sparse = sum(e["dense_ms"] for e in layers if e["sparse"] and e["dense_ms"] is not None)
    ours = row["ms"].get("ours_eager")
    return {"sparse_layers_ms": sparse, "their_dense_ms": dense_of_sparse, "dense_layers_ms": dense,
            "rest_ms": None if ours is None else ours - sparse - dense,
            "sparse_of_layers": f"{sum(e['sparse'] for e in layers)}/{len(layers)}"}


def bench_components(names, batch: int, reps: int, quick: bool, skip: set, block: int = 1) -> list:
    """Each component of a model row (the backbone on the image; each head on the backbone's features) as a model of
    its own, every variant in alternation as in a row: which part of the model keeps ours from the goal."""
    rows = []
    for name in names:
        kind, spec, sparsity = ROWS[name]
        if kind != "model":
            continue
        model, x, label = build_row(kind, spec, sparsity, batch, quick, block)
        with torch.no_grad():
            features = model.backbone(x)
        for part, module in model.components().items():
            row = bench_case(f"{name}/{part}", module, x if part == "backbone" else features,
                             f"{label}: {part}", batch, reps, skip)
            row["component"], row["model_row"] = part, name
            row["split"] = layer_split(row)
            rows.append(row)
            print(f"{row_line(row)}; split {row['split']}", flush=True)
    return rows


def fold_bn_ab(names, reps: int, quick: bool) -> dict:
    """Our eager export with and without BatchNorm folding, in alternation (what the graph pass buys)."""
    out = {}
    for name in names:
        kind, spec, sparsity = ROWS[name]
        if kind != "model":
            continue
        model, x, _ = build_row(kind, spec, sparsity, 1, quick)
        with torch.no_grad():
            plain = adapmtl.export_sparse(model, policy="time", example_input=x, fold_bn=False)
            folded = adapmtl.export_sparse(model, policy="time", example_input=x, fold_bn=True)
            a, b = interleaved_median_ms([lambda: plain(x), lambda: folded(x)], torch.device("cpu"), reps=reps)
        out[name] = {"unfolded_ms": a, "folded_ms": b, "gain": a / b, "folded": len(folded.folded_batchnorm)}
        print(f"{name}: BatchNorm folding {a:.1f} -> {b:.1f} ms ({a / b:.3f}x, {out[name]['folded']} folded)", flush=True)
    return out


def fuse_ab(names, reps: int, quick: bool, batches=(1,)) -> dict:
    """Our eager export with and without the fused conv epilogues (residual add, ReLU / ReLU6), in alternation:
    what the fusion pass buys (the same outputs, bit for bit: checked here too)."""
    out = {}
    for batch in batches:
        for name in names:
            kind, spec, sparsity = ROWS[name]
            if kind != "model":
                continue
            model, x, _ = build_row(kind, spec, sparsity, batch, quick)
            with torch.no_grad():
                # one export's layer decisions (the time policy's can differ between two exports), fused or not
                plain = adapmtl.export_sparse(model, policy="time", example_input=x, fuse=False, stack=False)
                fused = copy.deepcopy(plain)
                fused.fused_epilogues = fuse_epilogues(fused, default_concrete_args(fused), (x,))
                same = result_error(fused(x), outputs_of(plain(x))) == 0.0
                a, b = interleaved_median_ms([lambda: plain(x), lambda: fused(x)], torch.device("cpu"), reps=reps)
            key = f"{name}_b{batch}"
            out[key] = {"unfused_ms": a, "fused_ms": b, "gain": a / b, "fused": fused.fused_epilogues,
                        "identical_outputs": same, "batch": batch}
            print(f"{key}: epilogue fusion {a:.1f} -> {b:.1f} ms ({a / b:.3f}x, {len(fused.fused_epilogues)} fused, "
                  f"identical {same})", flush=True)
    return out


def stack_ab(names, reps: int, quick: bool, block: int = 1) -> dict:
    """Our eager export with and without its sparse convs that read one tensor stacked into one conv
    (adapmtl.export_stacking; the groups stacked where the export's timing found them faster), in alternation, on
    one export's layer decisions; the outputs' largest difference (of their scale) beside the times."""
    out = {}
    for name in names:
        kind, spec, sparsity = ROWS[name]
        if kind != "model":
            continue
        model, x, _ = build_row(kind, spec, sparsity, 1, quick, block)
        with torch.no_grad():
            plain = adapmtl.export_sparse(model, policy="time", example_input=x, stack=False)
            stacked = copy.deepcopy(plain)
            groups = stack_where_faster(stacked, (x,), 5) or []
            diff = result_error(stacked(x), outputs_of(plain(x)))
            a, b = interleaved_median_ms([lambda: plain(x), lambda: stacked(x)], torch.device("cpu"), reps=reps)
        out[name] = {"unstacked_ms": a, "stacked_ms": b, "gain": a / b, "groups": groups, "max_rel_diff": diff,
                     "block": block}
        print(f"{name}: stacking {a:.1f} -> {b:.1f} ms ({a / b:.3f}x; {sum(g['stacked'] for g in groups)} of "
              f"{len(groups)} groups stacked, outputs differ by {diff:.1e} of their scale)", flush=True)
    return out


def env_ab(names, reps: int, quick: bool, batches, var: str, settings: dict, note=None) -> dict:
    """One eager export per row, run with environment variable `var` at each of `settings` ({label: value}) in
    alternation. The C++ kernel reads its variables at every call, so every setting runs in this one process on
    the same export; `var` is restored afterwards. A row holds each label's median ms, the first setting's over
    the last one's ("gain"), and the outputs' largest difference from the first setting's (of their scale)."""
    out = {}
    before = os.environ.get(var)

    def with_value(value, fn):
        def run():
            os.environ[var] = value
            return fn()
        return run

    try:
        for batch in batches:
            for name in names:
                kind, spec, sparsity = ROWS[name]
                model, x, _ = build_row(kind, spec, sparsity, batch, quick)
                clear_cpu_sparse_plan_cache()
                with torch.no_grad():
                    exported = adapmtl.export_sparse(model, policy="time", example_input=x)
                    fns = [with_value(v, lambda: exported(x)) for v in settings.values()]
                    first = outputs_of(fns[0]())
                    diff = max(result_error(fn(), first) for fn in fns[1:])
                    times = interleaved_median_ms(fns, torch.device("cpu"), reps=reps)
                row = f"{name}_b{batch}"
                out[row] = {**{f"{label}_ms": t for label, t in zip(settings, times)}, "gain": times[0] / times[-1],
                            "max_rel_diff": diff, "identical_outputs": diff == 0.0, "batch": batch,
                            "settings": {label: f"{var}={v}" for label, v in settings.items()}, **(note() if note else {})}
                print(f"{row}: " + " -> ".join(f"{label} {t:.2f} ms" for label, t in zip(settings, times))
                      + f" ({times[0] / times[-1]:.3f}x, outputs differ by {diff:.1e})", flush=True)
    finally:
        if before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = before
    return out


def plan_cache_ab(names, reps: int, quick: bool, batches=(1,)) -> dict:
    """The C++ kernel's plan cache off (ADAPMTL_CPU_PLAN_CACHE_MB=0: every call encodes its weights) and on (the
    default budget: reused after the bytes are compared): what keeping the plans buys."""
    def kept():
        info = cpu_sparse_plan_cache_info()
        return {"plans_kept": info["plans"], "bytes_kept": info["bytes"]}

    return env_ab(names, reps, quick, batches, "ADAPMTL_CPU_PLAN_CACHE_MB", {"cache_off": "0", "cache_on": "256"},
                  note=kept)


def tile_rows_ab(names, reps: int, quick: bool, batches=(1,)) -> dict:
    """The C++ kernel with register tiles of 2 output rows everywhere (ADAPMTL_CPU_SPARSE_CONFIG=rows=2, its height
    before tall tiles) and its default (up to 8 rows where a row is one vector: MobileNetV2's 11x11 heads), both
    with today's layout choice."""
    return env_ab(names, reps, quick, batches, "ADAPMTL_CPU_SPARSE_CONFIG", {"rows2": "rows=2", "default": ""})


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in DENSE + OURS if any(v in r["ms"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        vals = [r["ms"].get(v, float("nan")) / r["ms"]["torch_eager"] for r in rows]
        # whiskers: the variant's fastest and slowest round (this VM moves our kernels' speed between rounds)
        rounds = [[t / r["ms"]["torch_eager"] for t in r["round_ms"].get(v, [])] for r in rows]
        spread = [[m - min(t) if t else 0 for m, t in zip(vals, rounds)], [max(t) - m if t else 0 for m, t in zip(vals, rounds)]]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=v, yerr=spread, capsize=2,
               error_kw={"elinewidth": 0.6})
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['row']}\nb{r['batch']}" for r in rows], fontsize=8)
    ax.set_ylabel("time / torch eager dense (lower is faster;\nwhiskers: fastest and slowest round)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def components_report(args, reps: int, info: dict) -> list:
    rows = []
    for batch in args.batches:
        rows += bench_components(args.rows, batch, reps, args.quick, set(args.skip), args.block)
    table = []
    for r in rows:
        best = r["ms"][r["best_dense"]]
        ours = r["ms"].get(r["best_ours"]) if r["best_ours"] else None
        table.append({"case": f"{r['model_row']}/{r['component']}", "b": r["batch"], "best": best,
                      "by": r["best_dense"], "ours": ours, "ratio": r["vs_best_dense"], **r["split"]})
    summary = {}
    for model_row in dict.fromkeys(r["model_row"] for r in rows):
        for batch in args.batches:
            parts = [t for t, r in zip(table, rows) if r["model_row"] == model_row and r["batch"] == batch]
            if not parts or any(t["ours"] is None for t in parts):
                continue
            best, ours = sum(t["best"] for t in parts), sum(t["ours"] for t in parts)
            backbone = next(t for t in parts if t["case"].endswith("/backbone"))
            # Amdahl: the ratio ours would reach if its heads cost nothing, with today's backbone
            summary[f"{model_row}_b{batch}"] = {
                "best_dense_sum_ms": best, "ours_sum_ms": ours, "ratio_of_sums": best / ours,
                "ratio_if_heads_free": best / backbone["ours"],
                "backbone_share_of_ours": backbone["ours"] / ours}
            table.append({"case": f"{model_row} (sum of parts)", "b": batch, "best": best, "by": "per part",
                          "ours": ours, "ratio": best / ours})
    print(f"\n{info['device']}, torch {info['torch']}, {info['threads']} threads, fp32, medians in ms; "
          "sparse/dense layers: the export's isolated per-layer times, rest: the remainder of ours\n")
    print(format_table(table, [("case", "component", "<32"), ("b", "b", "d"), ("best", "best dense", ".2f"),
                               ("by", "by", "<13"), ("ours", "ours", ".2f"), ("ratio", "ours vs best", ".2f"),
                               ("sparse_layers_ms", "sparse layers", ".2f"),
                               ("their_dense_ms", "same layers dense", ".2f"),
                               ("dense_layers_ms", "dense layers", ".2f"), ("rest_ms", "rest", ".2f"),
                               ("sparse_of_layers", "sparse of layers", ">16")]))
    for key, v in summary.items():
        print(f"{key}: best dense {v['best_dense_sum_ms']:.1f} ms, ours {v['ours_sum_ms']:.1f} ms "
              f"({v['ratio_of_sums']:.2f}x); backbone {100 * v['backbone_share_of_ours']:.0f}% of ours; "
              f"with heads at zero cost: {v['ratio_if_heads_free']:.2f}x")
    name = "peer_components" if args.block == 1 else f"peer_components_block{args.block}"
    path = write_results(name, info, {"reps": reps, "quick": args.quick, "block": args.block, "rows": rows,
                                      "summary": summary}, out_dir=args.out_dir, smoke=args.quick)
    blocks = "" if args.block == 1 else f", {args.block}x1 blocks"
    plot_components(rows, path.parent / f"{name}_{device_tag(info)}.png",
                    f"where the time goes, {info['device']}{blocks}")
    print(f"\nwrote {path}")
    return rows


def plot_components(rows, path, title):
    """Per model (a panel each, its own scale): the best dense runtime's time per component beside our eager
    export's, split into its sparse layers, its dense layers and the rest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys((r["model_row"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(max(6, 3.2 * len(models)), 4), squeeze=False)
    for ax, (model_row, batch) in zip(axes[0], models):
        part = [r for r in rows if r["model_row"] == model_row and r["batch"] == batch]
        xs = range(len(part))
        ax.bar([i - 0.2 for i in xs], [r["ms"][r["best_dense"]] for r in part], 0.4, label="best dense", color="0.6")
        bottom = [0.0] * len(part)
        for key, label in (("sparse_layers_ms", "ours eager: sparse layers"),
                           ("dense_layers_ms", "ours eager: dense layers"), ("rest_ms", "ours eager: rest")):
            vals = [max(r["split"].get(key) or 0.0, 0.0) for r in part]
            ax.bar([i + 0.2 for i in xs], vals, 0.4, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["component"] for r in part], fontsize=7, rotation=20)
        ax.set_title(f"{model_row}, batch {batch}", fontsize=9)
        ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Ours runs twice in a row's alternation (eager and the AOTInductor package, each with its own copy of the weights),
# and the C++ kernel keeps each copy's plans. Both sets must fit its plan cache, as one model's do for a user who
# runs one: ResNet-34 in 16 x 1 blocks keeps 268 MB per copy, over the default 256 MB budget for the pair, and the
# two copies evicted each other's plans on every call. Set when run as a script, unless the caller set it.
PLAN_CACHE_MB = "1024"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--batches", nargs="+", type=int, default=[1])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--skip", nargs="*", default=[], choices=[v for v in DENSE + OURS if v != "torch_eager"],
                   help="variants not to run (e.g. torch_compile ours_aoti: their compilation takes minutes)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small inputs and channels, 2 reps, runs/bench")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--block", type=int, default=1,
                   help="prune in blocks of this many output channels (as prune.block trains); results peer_block<N>_*")
    p.add_argument("--fold-bn-ab", action="store_true",
                   help="instead: the model rows' export with and without BatchNorm folding (peer_fold_bn_*.json)")
    p.add_argument("--fuse-ab", action="store_true",
                   help="instead: the model rows' export with and without the fused epilogues (peer_fuse_*.json)")
    p.add_argument("--stack-ab", action="store_true",
                   help="instead: the model rows' export with and without stacked convs (peer_stack[_block<N>]_*.json)")
    p.add_argument("--plan-cache-ab", action="store_true",
                   help="instead: our export with the C++ kernel's plan cache off and on (peer_plan_cache_*.json)")
    p.add_argument("--tile-rows-ab", action="store_true",
                   help="instead: our export with 2-row register tiles and with the default (tall tiles on narrow "
                        "maps) (peer_tile_rows_*.json)")
    p.add_argument("--components", action="store_true",
                   help="instead: each component of the model rows (backbone, each head) on its own, every variant "
                        "(peer_components[_block<N>]_*.json/png): where the model's time goes")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    reps = 2 if args.quick else args.reps
    info = device_description("cpu")
    info["plan_cache_mb"] = os.environ.get("ADAPMTL_CPU_PLAN_CACHE_MB", "default")
    if args.components:
        return components_report(args, reps, info)
    if args.fuse_ab:
        ab = fuse_ab(args.rows, reps, args.quick, args.batches)
        print(f"wrote {write_results('peer_fuse', info, {'reps': reps, 'rows': ab}, args.out_dir, args.quick)}")
        return ab
    if args.stack_ab:
        ab = stack_ab(args.rows, reps, args.quick, args.block)
        name = "peer_stack" if args.block == 1 else f"peer_stack_block{args.block}"
        print(f"wrote {write_results(name, info, {'reps': reps, 'rows': ab}, args.out_dir, args.quick)}")
        return ab
    if args.plan_cache_ab:
        ab = plan_cache_ab(args.rows, reps, args.quick, args.batches)
        print(f"wrote {write_results('peer_plan_cache', info, {'reps': reps, 'rows': ab}, args.out_dir, args.quick)}")
        return ab
    if args.tile_rows_ab:
        ab = tile_rows_ab(args.rows, reps, args.quick, args.batches)
        print(f"wrote {write_results('peer_tile_rows', info, {'reps': reps, 'rows': ab}, args.out_dir, args.quick)}")
        return ab
    if args.fold_bn_ab:
        ab = fold_bn_ab(args.rows, reps, args.quick)
        print(f"wrote {write_results('peer_fold_bn', info, {'reps': reps, 'rows': ab}, args.out_dir, args.quick)}")
        return ab
    rows = []
    for batch in args.batches:
        for name in args.rows:
            row = bench_row(name, batch, reps, args.quick, set(args.skip), args.block)
            rows.append(row)
            print(row_line(row) + (f"; errors {row['errors']}" if row["errors"] else ""), flush=True)
    table = [{"case": r["case"], "b": r["batch"], **{k: r["ms"].get(k) for k in DENSE + OURS},
              "ours/best": r["vs_best_dense"], "rounds": ratio_spread(r["round_vs_best_dense"]), "ours/DS": r.get("vs_deepsparse"),
              "DS rounds": ratio_spread(r.get("round_vs_deepsparse", [])), "GF/s ours": r["gflop"] / (min(r["ms"].get(k, 1e30) for k in OURS) / 1e3)
              if any(k in r["ms"] for k in OURS) else None} for r in rows]
    print(f"\n{info['device']}, torch {info['torch']}, {info['threads']} threads, fp32, medians in ms\n")
    print(format_table(table, [("case", "case", "<48"), ("b", "b", "d")] + [(k, k, ".2f") for k in DENSE + OURS]
                       + [("ours/best", "ours vs best dense", ".2f"), ("rounds", "per round", "s"),
                          ("ours/DS", "ours vs DeepSparse", ".2f"), ("DS rounds", "per round", "s"),
                          ("GF/s ours", "GF/s ours", ".1f")]))
    name = "peer" if args.block == 1 else f"peer_block{args.block}"
    if args.batches != [1]:  # batch 1 keeps the plain name
        name += "_b" + "_".join(map(str, args.batches))
    path = write_results(name, info, {"reps": reps, "quick": args.quick, "block": args.block, "rows": rows},
                         out_dir=args.out_dir, smoke=args.quick)
    out_dir = path.parent
    what = "pruned models" if args.block == 1 else f"models pruned in {args.block}x1 blocks"
    plot(rows, out_dir / f"{name}_{device_tag(info)}.png", f"{what} vs dense runtimes, {info['device']}")
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("ADAPMTL_CPU_PLAN_CACHE_MB", PLAN_CACHE_MB)
    main()
