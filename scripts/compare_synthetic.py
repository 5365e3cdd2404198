"""The committed comparison (docs/compare.md): `adapmtl compare` on the bundled compare_synthetic config in
three parts that share each seed's dense start and dense run, then one JSON, Markdown and PNG in
benchmarks/results/compare_synthetic.{json,md,png}.

    python3 scripts/compare_synthetic.py --jobs 2        # all three parts (~2 h on 2 cores)
    python3 scripts/compare_synthetic.py --parts main    # the 90% table only
    python3 scripts/compare_synthetic.py --smoke         # a 3-minute check of the pipeline, into runs/

main: the 7 methods at 90% over 3 seeds; ablations: AdapMTL without adaptive weights, the single threshold
with them, per-layer STR, straight-through gradients (90%, 3 seeds); sweep: the methods at 80% and 95%
(2 seeds). Finished runs are reused, so an interrupted call continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from adapmtl.checkpoint_io import write_json_atomic  # noqa: E402
from adapmtl.train.compare import (  # noqa: E402
    ABLATIONS, compare, format_mean_std, markdown_table, mean_std, plot_sweep, summarize)
from adapmtl.train.config import COMPARE_METHODS, apply_override, load_config  # noqa: E402
from benchmarks.common import SMOKE_DIR, device_description  # noqa: E402

PARTS = {  # calibration: does dense clearly beat a 99% sparse model? (one seed)
    "calibration": {"compare.methods": ["dense", "adapmtl"], "compare.sparsities": [0.99], "compare.seeds": 1},
    "main": {"compare.methods": list(COMPARE_METHODS), "compare.sparsities": [0.9]},
    "ablations": {"compare.methods": ["dense", "adapmtl", *ABLATIONS], "compare.sparsities": [0.9]},
    "sweep": {"compare.methods": list(COMPARE_METHODS), "compare.sparsities": [0.8, 0.95], "compare.seeds": 2},
}
SMOKE = ["data.n_train=24", "data.n_test=8", "data.image_size=32", "data.crop_size=32", "data.batch_size=4",
         "data.eval_batch_size=8", "data.root=runs/compare_smoke/scenes", "model.head_channels=8",
         "train.iterations=20", "train.val_every=5", "train.ckpt_every=10", "compare.start_iterations=20",
         "compare.seeds=2", "loss_weights.start=5", "loss_weights.window=4", "prune.update_every=4"]


def noise_floor(out: str, seeds: list[int], directions: dict) -> dict:
    """How much ΔT the choice of checkpoint alone moves: per seed, the dense run's final weights against its
    selected checkpoint (the tables' reference), on test. Returns {seed: {"selected", "delta_t",
    "delta_t_tasks", "final_metrics"}}."""
    from adapmtl.metrics import safe_delta_t
    from adapmtl.train import Trainer, load_trained

    floor = {}
    for seed in seeds:
        run = os.path.join(out, f"seed{seed}", "dense")
        trained = load_trained(os.path.join(run, "latest.pt"))
        cfg = trained.config
        cfg.train.resume = cfg.model.init_from = cfg.train.dense_results = None
        cfg.train.progress, cfg.train.tensorboard = False, False
        trainer = Trainer(cfg, model=trained.model)
        final = trainer.evaluate(trainer.test_set)["metrics"]
        with open(os.path.join(run, "results.json")) as fh:
            selected = json.load(fh)
        per_task, dt, _ = safe_delta_t(final, selected["test"], directions)
        floor[seed] = {"selected": selected["selected"], "delta_t": dt, "delta_t_tasks": per_task,
                       "final_metrics": final}
    return floor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (default: 2)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--out", default="runs/compare_synthetic", help="folder of the runs (default: %(default)s)")
    p.add_argument("--sweep-seeds", type=int, default=PARTS["sweep"]["compare.seeds"],
                   help="seeds of the 80%% / 95%% sweep (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny data and budget, results into runs/bench/")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    out = "runs/compare_smoke" if args.smoke else args.out
    base = ["train.progress=false", f"out_dir={out}"] + (SMOKE if args.smoke else [])
    device = device_description("cpu")
    payload = {"device": device, "jobs": args.jobs}
    os.makedirs(out, exist_ok=True)
    minutes_path = os.path.join(out, "minutes.json")  # wall time of the call that trained each part
    minutes = json.load(open(minutes_path)) if os.path.isfile(minutes_path) else {}
    unique = {}  # the parts share each seed's dense run (and ablations AdapMTL's): every run once
    for part in parts:
        cfg = load_config("compare_synthetic", base)
        settings = PARTS[part] | ({"compare.seeds": args.sweep_seeds} if part == "sweep" else {})
        for key, value in settings.items():
            apply_override(cfg, f"{key}={json.dumps(value)}")
        cfg.validate()
        t0 = time.time()
        result = compare(cfg, jobs=args.jobs, reuse=True)
        took = round((time.time() - t0) / 60, 1)  # not counting the runs an earlier part made
        if took >= 0.5 or part not in minutes:
            minutes[part] = took
            write_json_atomic(minutes_path, minutes)
        for r in result["runs"]:
            unique[(r["method"], r["seed"], r["target_sparsity"])] = r
        payload.setdefault("config", result["config"])
        payload.setdefault("protocol", result["protocol"])
        print(f"{part}: {took} min", flush=True)
    payload["minutes"] = {k: minutes[k] for k in parts}
    everything = list(unique.values())
    payload["runs"] = [r for r in everything if r["method"] in COMPARE_METHODS and r["target_sparsity"] in (0.0, 0.9)]
    payload["ablations"] = [r for r in everything if r["method"] in ABLATIONS]
    payload["sweep"] = [r for r in everything if r["target_sparsity"] in PARTS["sweep"]["compare.sparsities"]]
    payload["calibration"] = [r for r in everything if r["target_sparsity"] == 0.99]
    summary = summarize(everything)
    directions = payload["protocol"]["delta_t_metrics"]
    seeds = sorted({r["seed"] for r in payload["runs"]})
    payload["noise_floor"] = noise_floor(out, seeds, directions) if payload["runs"] else {}
    order = list(COMPARE_METHODS) + list(ABLATIONS)
    md = [f"# Comparison on compare_synthetic ({device['device']}, torch {device['torch']})\n",
          "Produced by `python3 scripts/compare_synthetic.py`; protocol and reading: docs/compare.md. Mean ± std "
          "over seeds; ΔT on test vs each seed's dense run; the paired column is ΔT(method) − ΔT(adapmtl) on the "
          "same seed.\n"]
    if payload["runs"]:
        md.append("## 90% overall sparsity\n\n" + markdown_table(summarize(payload["runs"]), 0.9, order))
    if payload["noise_floor"]:
        from adapmtl.metrics import safe_delta_t
        floor = payload["noise_floor"]
        md.append("## Noise floor: the dense run against itself\n\nΔT of each seed's dense run at its *final* "
                  "weights against its selected checkpoint (the reference of every ΔT above), and each method's ΔT "
                  "against that final-weights dense model instead (mean ± std over seeds):\n\n"
                  "| seed | dense selected | ΔT of dense final vs selected | " +
                  " | ".join(f"ΔT_{t}" for t in directions) + " |\n|" + "---|" * (3 + len(directions)))
        for seed, f in floor.items():
            md.append(f"| {seed} | {f['selected']} | {f['delta_t']:+.2f} | " +
                      " | ".join(f"{f['delta_t_tasks'].get(t, float('nan')):+.2f}" for t in directions) + " |")
        rows = ["\n| method | ΔT vs dense selected | ΔT vs dense final |", "|---|---|---|"]
        for method in COMPARE_METHODS[1:]:
            rs = [r for r in payload["runs"] if r["method"] == method]
            vs_final = [safe_delta_t(r["metrics"], floor[r["seed"]]["final_metrics"], directions)[1] for r in rs]
            rows.append(f"| {method} | {format_mean_std(mean_std([r['delta_t'] for r in rs]), signed=True)} | "
                        f"{format_mean_std(mean_std(vs_final), signed=True)} |")
        md.append("\n".join(rows) + "\n")
    if payload["ablations"]:
        ablation = [r for r in everything if r["target_sparsity"] in (0.0, 0.9) and r["method"] in
                    ("dense", "adapmtl", *ABLATIONS)]
        md.append("## Ablations at 90%\n\n" + markdown_table(summarize(ablation), 0.9, order))
    for target in sorted({r["target_sparsity"] for r in payload["sweep"] + payload["calibration"]}):
        md.append(f"## {100 * target:g}% overall sparsity\n\n" + markdown_table(summary, target, order))
    md.append("Minutes per part (2-core CPU, `--jobs {}`): {}\n".format(
        args.jobs, ", ".join(f"{k} {v}" for k, v in payload["minutes"].items())))
    folder = os.path.join(ROOT, "benchmarks", "results") if not args.smoke else str(SMOKE_DIR)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, "compare_synthetic")
    write_json_atomic(stem + ".json", payload)
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(md))
    sweep = [s for s in summary if s["method"] in COMPARE_METHODS and s["target_sparsity"] != 0.99]
    plot_sweep(sweep, stem + ".png")
    print(f"written {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
