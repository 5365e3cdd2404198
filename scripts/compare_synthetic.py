"""The committed comparison (docs/compare.md): `adapmtl compare` on the bundled compare_synthetic config in four
parts that share each seed's dense start and dense run, one JSON row per finished run in
benchmarks/results/compare_synthetic_rows/ (committed as runs finish: the experiment takes several sittings), and
from the rows one JSON, Markdown and PNG in benchmarks/results/compare_synthetic.{json,md,png}.

    python3 scripts/compare_synthetic.py --jobs 2              # train what has no row yet, then report
    python3 scripts/compare_synthetic.py --parts main          # the 90% / 95% tables only
    python3 scripts/compare_synthetic.py --report-only         # tables from the committed rows, training nothing
    python3 scripts/compare_synthetic.py --smoke               # a few-minute check of the pipeline, into runs/

main: the 7 methods at 90% and 95%, 7 seeds (SNIP, LTH and IMP: 3); ablations: AdapMTL without adaptive weights,
the single threshold with them, per-layer STR, straight-through gradients (90%, 3 seeds); sweep: the 7 methods at
80% (3 seeds); block: AdapMTL thresholding blocks of 4 and of 16 output channels (prune.block=4 / 16, not the
paper's) against AdapMTL at 90% (3 seeds), the accuracy price of the CPU kernel's channel panels and channel-vector
tiles. A run with a row of the same
plan is never trained again; an interrupted run continues from its last checkpoint in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from adapmtl.checkpoint_io import write_json_atomic  # noqa: E402
from adapmtl.train.compare import (  # noqa: E402
    ABLATIONS, BLOCK_VARIANTS, compare, markdown_table, mixed_starts, plan, plot_sweep, protocol_of, reusable_row,
    row_results, run_records, summarize, table_note)
from adapmtl.train.config import COMPARE_METHODS, apply_override, load_config  # noqa: E402

PARTS = {
    "main": {"compare.methods": list(COMPARE_METHODS), "compare.sparsities": [0.9, 0.95]},
    "ablations": {"compare.methods": ["dense", "adapmtl", *ABLATIONS], "compare.sparsities": [0.9], "compare.seeds": 3,
                  "compare.seeds_for": None},
    "sweep": {"compare.methods": list(COMPARE_METHODS), "compare.sparsities": [0.8], "compare.seeds": 3,
              "compare.seeds_for": None},
    "block": {"compare.methods": ["dense", "adapmtl", *BLOCK_VARIANTS], "compare.sparsities": [0.9],
              "compare.seeds": 3, "compare.seeds_for": None},
}
SMOKE = ["data.n_train=24", "data.n_test=8", "data.image_size=32", "data.crop_size=32", "data.batch_size=4",
         "data.eval_batch_size=8", "data.root=runs/compare_smoke/scenes", "model.head_channels=8",
         "train.iterations=20", "train.val_every=5", "train.ckpt_every=10", "train.score_window=2",
         "compare.start_iterations=20", "compare.seeds=2", 'compare.seeds_for={"snip": 1, "lth": 1, "imp": 1}',
         "loss_weights.start=5", "loss_weights.window=4", "prune.update_every=4"]
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def part_config(part: str, base: list[str]):
    cfg = load_config("compare_synthetic", base)
    for key, value in PARTS[part].items():
        apply_override(cfg, f"{key}={json.dumps(value)}")
    return cfg.validate()


def committed(cfg) -> tuple[list[dict], dict]:
    """The runs of cfg's plan that have a row (a seed whose dense run has none is left out whole), as compare's
    results: (runs, {name: results})."""
    runs = plan(cfg)
    results = {}
    for r in runs:
        row = reusable_row(r, cfg.compare.rows)
        if row is not None:
            results[r["name"]] = row_results(row)
    seeds = {r["seed"] for r in runs if r["kind"] == "dense" and r["name"] in results}
    return [r for r in runs if r["name"] in results and r["seed"] in seeds], results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (default: 2)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--out", default="runs/compare_synthetic", help="folder of the runs (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="write the tables from the committed rows, train nothing")
    p.add_argument("--smoke", action="store_true", help="tiny data and budget, rows and results under runs/")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    out = "runs/compare_smoke" if args.smoke else args.out
    results_dir = os.path.join(out, "results") if args.smoke else RESULTS
    rows = os.path.join(results_dir, "compare_synthetic_rows")
    base = ["train.progress=false", f"out_dir={out}", f"compare.rows={rows}"] + (SMOKE if args.smoke else [])
    if not args.report_only:
        for part in parts:  # each part's runs, rows written as they finish
            compare(part_config(part, base), jobs=args.jobs, reuse=True)
            print(f"{part}: trained", flush=True)

    from adapmtl.timing import cpu_facts
    from adapmtl.train.build import config_tasks
    from adapmtl.train.trainer import delta_t_directions
    payload = {"produced_by": "scripts/compare_synthetic.py", "parts": {}}
    md = ["# Comparison on compare_synthetic\n",
          "Produced by `python3 scripts/compare_synthetic.py` from the per-run rows in `compare_synthetic_rows/` "
          "(each with the CPU it ran on); protocol and reading: docs/compare.md.\n"]
    everything = {}
    for part in parts:
        cfg = part_config(part, base)
        runs, results = committed(cfg)
        directions = delta_t_directions(cfg, config_tasks(cfg))
        planned = len([r for r in plan(cfg) if r["kind"] != "start"])
        records = run_records(runs, results, directions) if runs else []
        payload["parts"][part] = {"protocol": protocol_of(cfg, directions), "planned_runs": planned,
                                  "finished_runs": len(records), "runs": records}
        for r in records:
            everything[(r["method"], r["seed"], r["target_sparsity"])] = r
        md.append(f"## Part `{part}`: {len(records)} of {planned} runs finished\n")
        if not records:
            continue
        summary = summarize(records)
        order = list(COMPARE_METHODS) + list(ABLATIONS)
        for target in cfg.compare.sparsities:
            md.append(f"### {100 * target:g}% overall sparsity\n\n" + markdown_table(summary, target, order))
        md.append(table_note(cfg, directions, records) + "\n")
    payload["mixed_starts"] = mixed_starts(list(everything.values()))
    payload["cpu_here"] = cpu_facts()
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, "compare_synthetic")
    write_json_atomic(stem + ".json", payload)
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(md))
    sweep = [s for s in summarize(list(everything.values())) if s["method"] in COMPARE_METHODS]
    if sweep:
        plot_sweep(sweep, stem + ".png")
    print(f"written {stem}.json, .md" + (", .png" if sweep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
