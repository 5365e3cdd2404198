"""`adapmtl compare`: dense, the pruning baselines and AdapMTL at matched sparsity, over several seeds.

The protocol (docs/compare.md): per seed, one dense model is trained for `compare.start_iterations`
and every method -- dense included -- continues from it for the same `train.iterations` (or all
start from scratch, `compare.start: scratch`). Adaptive task weights belong to AdapMTL only (each
method's own choice; `compare.adaptive_weights_for_all` gives them to every method as a separate
experiment). Every run selects its checkpoint by one rule: the best validation ΔT against the dense
start (from scratch: against the dense run, which itself selects on validation loss), among the
checkpoints within ±`train.select_sparsity_tol` of the target. ΔT on test is against the seed's
dense run; a run whose selected checkpoint is off the target is flagged.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from adapmtl.checkpoint_io import write_json_atomic
from adapmtl.train.config import COMPARE_METHODS, METHODS, Config, apply_override, config_changes, config_from_dict

# the paper's ablations: name -> (trainer method, config overrides)
ABLATIONS = {
    "adapmtl_fixed_weights": ("adapmtl", ["loss_weights.adaptive=false"]),
    "single_threshold_adaptive": ("single_threshold", ["loss_weights.adaptive=true"]),
    "str": ("str", []),
    "adapmtl_ste": ("adapmtl", ["prune.grad=ste"]),
}
# not the paper's: AdapMTL thresholding blocks of 4 output channels (prune.block; the accuracy price of the CPU
# kernel's channel panels, docs/cpu_sparse_kernel.md)
BLOCK_VARIANTS = {"adapmtl_block4": ("adapmtl", ["prune.block=4"])}
VARIANTS = {m: (m, []) for m in METHODS} | ABLATIONS | BLOCK_VARIANTS
AT_TARGET_TOL = 0.005  # ±0.5 pp: a pruned run whose evaluated checkpoint is further off is flagged


def variant(name: str) -> tuple[str, list[str]]:
    """(trainer method, overrides) of a compare method name (a trainer method or an ablation)."""
    if name not in VARIANTS:
        raise ValueError(f"compare.methods: unknown method {name!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[name]


def _sparsity_tag(sparsity: float) -> str:
    return f"sparsity{100 * sparsity:g}"


def plan(cfg: Config) -> list[dict]:
    """Every run of the experiment, in an order where each run comes after the ones it needs:
    [{"name", "kind" (start | dense | method), "seed", "target_sparsity", "needs", "config" (dict)}]."""
    c = cfg.compare
    for name in c.methods:
        variant(name)
    runs = []
    for k in range(c.seeds):
        seed = cfg.seed + k
        base = os.path.join(cfg.out_dir, f"seed{seed}")

        def run_config(method, out_dir, overrides=()):
            run = config_from_dict(cfg.to_dict())
            for item in [f"method={method}", f"seed={seed}", f"out_dir={out_dir}", *overrides]:
                apply_override(run, item)
            return run

        start_name = None
        if c.start == "dense":
            start = run_config("dense", os.path.join(base, "start"),
                               [f"train.iterations={c.start_iterations or cfg.train.iterations}", "train.select=last",
                                "loss_weights.adaptive=null"])
            start_name = f"seed{seed}/start"
            runs.append({"name": start_name, "kind": "start", "seed": seed, "target_sparsity": 0.0, "needs": [],
                         "config": start.to_dict()})
        start_overrides = [] if start_name is None else [f"model.init_from={os.path.join(base, 'start', 'latest.pt')}"]
        # the selection reference: the dense start's results (from scratch: the dense run's)
        reference = os.path.join(base, "start" if start_name else "dense", "results.json")
        shared = ["loss_weights.adaptive=true"] if c.adaptive_weights_for_all else []
        dense = run_config("dense", os.path.join(base, "dense"),
                           start_overrides + shared + ([f"train.dense_results={reference}"] if start_name else
                                                       ["train.select=val_loss"]))
        dense_name = f"seed{seed}/dense"
        runs.append({"name": dense_name, "kind": "dense", "seed": seed, "target_sparsity": 0.0,
                     "needs": [start_name] if start_name else [], "config": dense.to_dict()})
        for sparsity in c.sparsities:
            for name in c.methods:
                if name == "dense":
                    continue
                method, overrides = variant(name)
                out = os.path.join(base, _sparsity_tag(sparsity), name)
                run = run_config(method, out, start_overrides + [f"prune.target_sparsity={sparsity}",
                                                                 f"train.dense_results={reference}"] + overrides + shared)
                runs.append({"name": f"seed{seed}/{_sparsity_tag(sparsity)}/{name}", "kind": "method", "method": name,
                             "seed": seed, "target_sparsity": sparsity, "needs": [start_name or dense_name],
                             "config": run.to_dict()})
    return runs


def _train(config: dict, threads: int | None) -> dict:
    """One run (in a worker process when jobs > 1)."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    from adapmtl.train.trainer import Trainer
    return Trainer(config_from_dict(config)).fit()


def execute(runs: list[dict], jobs: int = 1, reuse: bool = False, progress: bool = True) -> dict[str, dict]:
    """Train the planned runs (`jobs` at a time, each in its own process with its share of the CPU
    threads, in dependency order); a finished run's results.json is reused with `reuse`.
    Returns {run name: results}."""
    done = {}
    for r in runs:
        if reuse:
            reused = reusable_results(r)
            if reused is not None:
                done[r["name"]] = reused
    pending = [r for r in runs if r["name"] not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(runs), initial=len(done), desc="compare runs", dynamic_ncols=True)
    if jobs <= 1:
        for r in pending:
            if bar is not None:
                bar.set_postfix_str(r["name"])
            done[r["name"]] = _train(r["config"], None)
            if bar is not None:
                bar.update(1)
    else:
        import multiprocessing as mp
        threads = max(1, (os.cpu_count() or 1) // jobs)
        for r in pending:
            r["config"]["train"]["progress"] = False  # one bar, the runs', instead of interleaved ones
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            running = {}
            while pending or running:
                for r in [r for r in pending if all(n in done for n in r["needs"])][:jobs - len(running)]:
                    pending.remove(r)
                    running[pool.submit(_train, r["config"], threads)] = r
                if not running:
                    raise RuntimeError(f"compare: runs {[r['name'] for r in pending]} wait on runs that never finish")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    r = running.pop(fut)
                    done[r["name"]] = fut.result()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(r["name"])
    if bar is not None:
        bar.close()
    return done


def reusable_results(run: dict) -> dict | None:
    """The results of a finished run of the plan, or None to train it: a run folder whose config.yaml differs from
    the planned config (another plan's run) is trained again, saying why. A results.json that is there but broken
    or holds impossible values (non-finite metrics, sparsity outside [0, 1]) is an error naming the file."""
    import warnings

    import yaml

    folder = run["config"]["out_dir"]
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(os.path.join(folder, "config.yaml")) as fh:
            stored = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        stored = None
    if not isinstance(stored, dict):
        warnings.warn(f"compare --reuse: {folder} has no readable config.yaml; training {run['name']} again",
                      UserWarning, stacklevel=2)
        return None
    differ = [change for _, change in config_changes(stored, run["config"])]
    if differ:
        warnings.warn(f"compare --reuse: {run['name']} in {folder} was trained with another plan ({'; '.join(differ[:3])}"
                      f"{'; ...' if len(differ) > 3 else ''}); training it again", UserWarning, stacklevel=2)
        return None
    return read_results(path, run)


def read_results(path: str, run: dict) -> dict:
    """A run's results.json, checked: ValueError naming the file for what a finished run cannot have written."""
    def bad(problem):
        return ValueError(f"compare: {path}: {problem}; delete it to train the run again")

    try:
        with open(path) as fh:
            res = json.load(fh)  # NaN and Infinity parse: the checks below refuse them
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    except OSError as exc:
        raise ValueError(f"compare: cannot read {path}: {exc.strerror}") from None
    if not isinstance(res, dict):
        raise bad(f"a JSON {type(res).__name__}, not the results object")
    for key in ("test", "val", "sparsity", "iterations"):
        if key not in res:
            raise bad(f"no {key!r} entry")
    if res["iterations"] != run["config"]["train"]["iterations"]:
        raise bad(f"{res['iterations']!r} iterations, the plan has {run['config']['train']['iterations']}")
    for split in ("test", "val"):
        if not isinstance(res[split], dict) or not res[split]:
            raise bad(f"{split!r} is not a non-empty object of tasks")
        for task, metrics in res[split].items():
            if not isinstance(metrics, dict):
                raise bad(f"{split}.{task} is not an object of metrics")
            for name, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise bad(f"{split}.{task}.{name} is {value!r}, not a finite number")
    sparsity = res["sparsity"]
    values = [sparsity.get("overall")] + list((sparsity.get("components") or {}).values()) if isinstance(
        sparsity, dict) else [sparsity]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise bad(f"a sparsity of {value!r}, not a fraction in [0, 1]")
    return res


# ----------------------------------------------------------------------------------------- results
def run_records(runs: list[dict], results: dict[str, dict], directions: dict) -> list[dict]:
    """The committed per-run records: ΔT on test against the seed's dense run, the evaluated checkpoint's
    overall sparsity and whether it is at the target."""
    from adapmtl.metrics import safe_delta_t

    dense = {r["seed"]: results[r["name"]] for r in runs if r["kind"] == "dense"}
    records = []
    for r in runs:
        if r["kind"] == "start":
            continue
        res = results[r["name"]]
        per_task, dt, skipped = safe_delta_t(res["test"], dense[r["seed"]]["test"], directions)
        sparsity = res["sparsity"]["overall"]
        target = r["target_sparsity"]
        records.append({
            "method": r.get("method", "dense"), "seed": r["seed"], "target_sparsity": target, "sparsity": sparsity,
            "components": res["sparsity"]["components"], "selected": res["selected"],
            "at_target": target == 0.0 or abs(sparsity - target) <= AT_TARGET_TOL,
            "delta_t": dt, "delta_t_tasks": per_task, "skipped_metrics": skipped, "metrics": res["test"],
        })
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def summarize(records: list[dict], reference: str = "adapmtl") -> list[dict]:
    """Per (target, method): mean ± std over seeds of every metric, ΔT_i and ΔT, and the per-seed paired
    difference ΔT(method) − ΔT(reference) at the same target (dense rows: at target 0)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["target_sparsity"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"target_sparsity": target, "method": method, "seeds": [r["seed"] for r in rs],
               "delta_t": mean_std([r["delta_t"] for r in rs]),
               "sparsity": mean_std([r["sparsity"] for r in rs]),
               "delta_t_tasks": {t: mean_std([r["delta_t_tasks"][t] for r in rs if t in r["delta_t_tasks"]])
                                 for t in rs[0]["delta_t_tasks"]},
               "metrics": {t: {m: mean_std([r["metrics"][t][m] for r in rs]) for m in ms}
                           for t, ms in rs[0]["metrics"].items()},
               "selected": [r["selected"] for r in rs], "missed": [r["seed"] for r in rs if not r["at_target"]]}
        ref = {r["seed"]: r["delta_t"] for r in groups.get((target, reference), [])}
        paired = [r["delta_t"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        row["paired_vs_reference"] = mean_std(paired) if paired and method != reference else None
        out.append(row)
    return out


def format_mean_std(ms: tuple[float, float], digits: int = 2, signed: bool = False) -> str:
    mean, std = ms
    head = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return head if std != std else f"{head} ± {std:.{digits}f}"


TABLE_METRICS = (("segment_semantic", "mIoU_all"), ("segment_semantic", "mIoU"), ("segment_semantic", "pixel_acc"),
                 ("normal", "angle_mean"), ("normal", "within_11.25"), ("depth", "abs_err"), ("depth", "delta_1.25"))


def markdown_table(summary: list[dict], target: float, method_order: list[str], reference: str = "adapmtl") -> str:
    """One target's table: mean ± std over seeds (dense first)."""
    rows = [s for s in summary if s["target_sparsity"] in (0.0, target)]
    rows.sort(key=lambda s: method_order.index(s["method"]) if s["method"] in method_order else len(method_order))
    tasks = list(rows[0]["delta_t_tasks"]) if rows else []
    metrics = [(t, m) for t, m in TABLE_METRICS if rows and m in rows[0]["metrics"].get(t, {})]
    header = (["method", "seeds", "overall sparsity %", "selected"] + [f"{t}/{m}" for t, m in metrics]
              + [f"ΔT_{t}" for t in tasks] + ["ΔT", f"ΔT − ΔT({reference}), paired"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in rows:
        sp_mean, sp_std = s["sparsity"]
        sparsity = format_mean_std((100 * sp_mean, 100 * sp_std)) + (f" ⚠ off target (seeds {s['missed']})" if s["missed"] else "")
        cells = [s["method"], str(len(s["seeds"])), sparsity, ", ".join(s["selected"])]
        for t, m in metrics:
            mean = s["metrics"][t][m][0]
            cells.append(format_mean_std(s["metrics"][t][m], 3 if abs(mean) < 1 else 2))
        cells += [format_mean_std(s["delta_t_tasks"][t], signed=True) if t in s["delta_t_tasks"] else "–" for t in tasks]
        cells.append(format_mean_std(s["delta_t"], signed=True))
        cells.append("–" if s["paired_vs_reference"] is None else format_mean_std(s["paired_vs_reference"], signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: list[dict], path: str, reference: str = "adapmtl") -> str:
    """ΔT (mean ± std over seeds) against the reached overall sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({s["method"] for s in summary if s["method"] != "dense"}, key=lambda m: (m != reference, m))
    for method in methods:
        rows = sorted((s for s in summary if s["method"] == method), key=lambda s: s["target_sparsity"])
        xs = [100 * s["sparsity"][0] for s in rows]
        ys = [s["delta_t"][0] for s in rows]
        err = [0.0 if s["delta_t"][1] != s["delta_t"][1] else s["delta_t"][1] for s in rows]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method, lw=2.2 if method == reference else 1.2)
    ax.axhline(0.0, color="k", lw=0.8, ls=":", label="dense")
    ax.set_yscale("symlog", linthresh=10)  # a collapsed method (ΔT in the hundreds) beside ones within -10..-40
    ax.set_xlabel("overall sparsity of the evaluated checkpoint (%)")
    ax.set_ylabel("ΔT vs dense (test, mean ± std over seeds; symlog)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(cfg: Config, runs: list[dict], results: dict[str, dict], directions: dict) -> dict:
    """Write results.json ({"config", "protocol", "runs"}), table.md / table.csv and delta_t_vs_sparsity.png
    into cfg.out_dir; returns the results dict."""
    import csv

    records = run_records(runs, results, directions)
    summary = summarize(records)
    order = [m for m in COMPARE_METHODS if m in cfg.compare.methods or m == "dense"] + [
        m for m in cfg.compare.methods if m not in COMPARE_METHODS]
    c = cfg.compare
    protocol = {"start": c.start, "start_iterations": (c.start_iterations or cfg.train.iterations) if c.start == "dense"
                else 0, "iterations": cfg.train.iterations, "seeds": [cfg.seed + k for k in range(c.seeds)],
                "adaptive_weights_for_all": c.adaptive_weights_for_all, "delta_t_metrics": directions,
                "select_sparsity_tol": cfg.train.select_sparsity_tol, "at_target_tol": AT_TARGET_TOL}
    out = {"config": cfg.to_dict(), "protocol": protocol, "runs": records}
    write_json_atomic(os.path.join(cfg.out_dir, "results.json"), out)
    parts = []
    for target in c.sparsities:
        parts.append(f"### Target overall sparsity {100 * target:g}%\n\n" + markdown_table(summary, target, order))
    miou = next((m for m in directions.get("segment_semantic", {}) if m.startswith("mIoU")), "mIoU")
    start = (f"each seed's methods continue for {cfg.train.iterations} iterations from one dense model trained "
             f"{protocol['start_iterations']} iterations" if c.start == "dense" else
             f"every method trains {cfg.train.iterations} iterations from scratch")
    note = (f"Test split, mean ± std over seeds {protocol['seeds']}; {start}. ΔT_i sums the signed relative changes "
            f"of task i's metrics vs the seed's dense run (SPEC §6; the segmentation mIoU in it: {miou}); ΔT is "
            f"their mean. The paired column is the mean ± std over seeds of ΔT(method) − ΔT(adapmtl) on the same "
            f"seed. Selected: the checkpoint evaluated (best@i: best validation ΔT at iteration i among those within "
            f"±{100 * cfg.train.select_sparsity_tol:g} pp of the target; final: none was). mIoU_all: every class; "
            f"mIoU: classes with TP > 0. Adaptive task weights: "
            f"{'every method' if c.adaptive_weights_for_all else 'AdapMTL (and str) only'}.\n")
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as fh:
        fh.write("\n".join(parts) + "\n" + note)
    with open(os.path.join(cfg.out_dir, "table.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seed", "target_sparsity", "sparsity", "selected", "at_target", "delta_t"]
                   + [f"delta_t_{t}" for t in directions]
                   + [f"{t}/{m}" for t, ms in records[0]["metrics"].items() for m in ms])
        for r in records:
            w.writerow([r["method"], r["seed"], r["target_sparsity"], r["sparsity"], r["selected"], r["at_target"],
                        r["delta_t"]] + [r["delta_t_tasks"].get(t, "") for t in directions]
                       + [v for ms in r["metrics"].values() for v in ms.values()])
    plot_sweep(summary, os.path.join(cfg.out_dir, "delta_t_vs_sparsity.png"))
    return out


def compare(cfg: Config, jobs: int = 1, reuse: bool = False, directions: dict | None = None) -> dict:
    """Plan, train and report the experiment of cfg.compare (see the module docstring)."""
    from adapmtl.train.build import config_tasks
    from adapmtl.train.trainer import delta_t_directions

    runs = plan(cfg)
    results = execute(runs, jobs=jobs, reuse=reuse, progress=cfg.train.progress)
    if directions is None:
        dense = next(results[r["name"]] for r in runs if r["kind"] == "dense")
        directions = delta_t_directions(cfg, [t for t in config_tasks(cfg) if t in dense["test"]])
    return report(cfg, runs, results, directions)
