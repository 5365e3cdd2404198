"""Benchmark one training step of the STR (soft-threshold) model against the same dense model.

    python benchmarks/bench_str_step.py                    # ResNet-34 NYUv2, 161x161, batch 2, cpp backend
    python benchmarks/bench_str_step.py --quick            # tiny model, 3 rounds (a smoke test, runs/bench)

A step is forward, the three task losses, backward and an SGD (momentum) update, on the DeepLab-ResNet-34
multitask model of SPEC §4 with the three NYUv2 heads. The STR model is the dense one converted by
`adapmtl.sparsify` (one threshold per component), its thresholds set to mid-training sparsity: each
component at half its final sparsity in the paper (backbone 26%, heads 43/47/45%). Dense and STR steps
are timed in alternation in one run; the table also breaks the STR overhead down by timing, in the same
alternation, the soft threshold alone (forward + backward over every STR layer's weight, what the step
adds) and a dense step that also allocates and writes a copy of every weight (what an extra pass over
the weights would cost). Like the trainer, the process keeps freed host memory instead of faulting it in
again every step (adapmtl/train/host_memory.py); --no-retain-host-memory measures glibc's default
(results named ..._malloc_default). Output: a table on stdout and JSON (with the CPU) in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_description, format_table, interleaved_times_ms, write_results  # noqa: E402

import adapmtl  # noqa: E402
from adapmtl.models import build_model  # noqa: E402
from adapmtl.ops import soft_threshold  # noqa: E402
from adapmtl.train.host_memory import retain_freed_memory  # noqa: E402

TASKS = {"segment_semantic": 40, "normal": 3, "depth": 1}
HALF_PAPER_SPARSITY = {"backbone": 0.527 / 2, "segment_semantic": 0.862 / 2, "normal": 0.947 / 2, "depth": 0.908 / 2}


def loss_of(outputs: dict, targets: dict) -> torch.Tensor:
    """The three NYUv2 losses on outputs upsampled to the labels (as the trainer computes them)."""
    size = targets["depth"].shape[-2:]
    outputs = {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in outputs.items()}
    seg = F.cross_entropy(outputs["segment_semantic"], targets["segment_semantic"])
    normal = 1 - F.cosine_similarity(outputs["normal"], targets["normal"], dim=1).mean()
    depth = F.l1_loss(outputs["depth"], targets["depth"])
    return seg + normal + depth


def set_mid_training_thresholds(model, groups) -> dict:
    """Each component's threshold at the |w| quantile of HALF_PAPER_SPARSITY; returns the sparsity reached."""
    layers = adapmtl.str_layers(model)
    for name, group in groups.items():
        weights = torch.cat([layer.weight.detach().abs().flatten() for _, layer in layers if layer.component == name])
        target = HALF_PAPER_SPARSITY.get(name, 0.3)
        g = torch.quantile(weights[torch.randperm(weights.numel())[:1 << 24]], target).clamp(1e-12, 1 - 1e-6)
        with torch.no_grad():
            group.s.fill_(float(torch.log(g / (1 - g))))
    return adapmtl.sparsity_report(model).fractions()["components"]


def make_step(model, params, inputs, targets):
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=1e-4)  # tiny lr: sparsity stays put

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(model(inputs), targets).backward()
        opt.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--size", type=int, default=161)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backend", default="cpp", help="soft-threshold backend of the STR layers")
    parser.add_argument("--rounds", type=int, default=15, help="alternation rounds (one step of each per round)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-retain-host-memory", dest="retain", action="store_false",
                        help="glibc's default: freed memory goes back to the OS (the trainer keeps it)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x64, 3 rounds, written to runs/bench")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.size, args.rounds = "tiny", 64, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = retain_freed_memory() if args.retain else False
    torch.manual_seed(0)
    dense = build_model(args.backbone, tasks=TASKS).train()
    strm = copy.deepcopy(dense)
    groups = adapmtl.sparsify(strm, backend=args.backend)
    sparsity = set_mid_training_thresholds(strm, groups)
    n, size = args.batch, args.size
    inputs = torch.randn(n, 3, size, size)
    targets = {"segment_semantic": torch.randint(0, 40, (n, size, size)),
               "normal": F.normalize(torch.randn(n, 3, size, size), dim=1), "depth": torch.rand(n, 1, size, size)}
    step_dense = make_step(dense, list(dense.parameters()), inputs, targets)
    step_str = make_step(strm, list(strm.parameters()), inputs, targets)
    layers = adapmtl.str_layers(strm)
    weights = [layer.weight for _, layer in layers]
    shared_s = [layer.s for _, layer in layers]
    groups_s = [g.s for g in groups.values()]
    grads = [torch.randn_like(w) for w in weights]

    def soft_threshold_only():  # what STR adds to the step: w_hat and its backward, every layer
        outs = [soft_threshold(w, s, backend=args.backend) for w, s in zip(weights, shared_s)]
        torch.autograd.grad(outs, weights + groups_s, grads)

    dense_weights = [p for name, p in dense.named_parameters() if p.dim() > 1]

    def dense_plus_weight_copy():  # a dense step with one more pass over (and allocation of) every weight
        step_dense()
        [w.detach().clone() for w in dense_weights]

    device = torch.device("cpu")
    variants = {"dense step": step_dense, "STR step": step_str, "soft threshold fwd+bwd only": soft_threshold_only,
                "dense step + weight copy": dense_plus_weight_copy}
    times = dict(zip(variants, interleaved_times_ms(list(variants.values()), device, warmup=2, reps=args.rounds)))
    dense_times = times["dense step"]
    numel = sum(w.numel() for w in weights)
    rows = []
    for k, ts in times.items():
        # per round, against the dense step of the same round: its median and quartiles are the result's spread
        per_round = [100 * (t / d if k == "soft threshold fwd+bwd only" else t / d - 1) for t, d in zip(ts, dense_times)]
        q1, median, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        rows.append(dict(variant=k, ms=statistics.median(ts), over_dense=median, over_dense_q1=q1, over_dense_q3=q3))
    info = device_description(device)
    print(f"STR training step vs dense, {args.backbone} NYUv2 heads, {size}x{size}, batch {n}, backend {args.backend}, "
          f"on {info['device']} ({info['threads']} threads), {args.rounds} alternating rounds, "
          f"freed host memory {'retained' if retained else 'returned to the OS (glibc default)'}")
    print("mid-training sparsity per component: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sparsity.items()))
    print(format_table(rows, [("variant", "variant" + " " * 22, "s"), ("ms", "median ms", ".1f"),
                              ("over_dense", "% of / over dense", "+.1f"), ("over_dense_q1", "per round: q1", "+.1f"),
                              ("over_dense_q3", "q3", "+.1f")]))
    print("% of / over dense: the median over rounds of each round's time against that round's dense step "
          "(q1, q3: its quartiles)")
    print(f"{len(weights)} STR layers, {numel / 1e6:.1f}M weights: the soft threshold's floor (20 B/weight) "
          f"is {20 * numel / 1e9:.2f} GB per step")
    name = f"str_step_{args.backbone}" + ("" if args.retain else "_malloc_default") + ("_quick" if args.quick else "")
    path = write_results(name, info, {"backbone": args.backbone, "size": size, "batch": n, "backend": args.backend,
                                      "rounds": args.rounds, "retain_host_memory": retained, "sparsity": sparsity,
                                      "str_weights": numel, "rows": rows},
                         out_dir=args.out, smoke=args.quick)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
