"""`adapmtl compare`: dense, the pruning baselines and AdapMTL at matched sparsity, over several seeds.

The protocol (docs/compare.md): per seed, one dense model is trained for `compare.start_iterations` and every
method -- dense included -- continues from it for the same `train.iterations` (SNIP, which its paper defines
at initialisation, starts from the seed's init instead, for the start's iterations plus the others' budget, with
the same restart of Adam and the LR schedule where the others continue from the start); `compare.start:
scratch` starts everything from the init. Adaptive task weights belong to AdapMTL only (each method's own
choice; `compare.adaptive_weights_for_all` gives them to every method as a separate experiment). One scoring
rule for every run: val and test metrics are the mean over the last `train.score_window` validations
(train.select=last_mean) -- no checkpoint is chosen, so no method gains from having more of them at its
target. ΔT on test is against the seed's dense run; a run off its target at any scored checkpoint is flagged.
Each finished run can leave a small JSON row in `compare.rows` (with its CPU); `--reuse` takes a run from its
row when the row's config digest matches the plan's, so the experiment resumes from committed rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from adapmtl.checkpoint_io import write_json_atomic
from adapmtl.train.config import (COMPARE_METHODS, METHODS, RESUME_FREE, Config, apply_override, config_changes,
                                  config_from_dict, flatten_config)

# the paper's ablations: name -> (trainer method, config overrides)
ABLATIONS = {
    "adapmtl_fixed_weights": ("adapmtl", ["loss_weights.adaptive=false"]),
    "single_threshold_adaptive": ("single_threshold", ["loss_weights.adaptive=true"]),
    "str": ("str", []),
    "adapmtl_ste": ("adapmtl", ["prune.grad=ste"]),
}
# not the paper's: AdapMTL thresholding blocks of 4 or 16 output channels (prune.block; the accuracy price of the CPU
# kernel's channel panels and channel-vector tiles, docs/cpu_sparse_kernel.md)
BLOCK_VARIANTS = {"adapmtl_block4": ("adapmtl", ["prune.block=4"]), "adapmtl_block16": ("adapmtl", ["prune.block=16"])}
VARIANTS = {m: (m, []) for m in METHODS} | ABLATIONS | BLOCK_VARIANTS
AT_TARGET_TOL = 0.005  # ±0.5 pp: a pruned run whose evaluated checkpoint is further off is flagged


def variant(name: str) -> tuple[str, list[str]]:
    """(trainer method, overrides) of a compare method name (a trainer method or an ablation)."""
    if name not in VARIANTS:
        raise ValueError(f"compare.methods: unknown method {name!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[name]


def _sparsity_tag(sparsity: float) -> str:
    return f"sparsity{100 * sparsity:g}"


def seeds_of(cfg: Config, method: str) -> int:
    """How many seeds `method` runs (compare.seeds, or its compare.seeds_for entry)."""
    return (cfg.compare.seeds_for or {}).get(method, cfg.compare.seeds)


def plan(cfg: Config) -> list[dict]:
    """Every run of the experiment, in an order where each run comes after the ones it needs:
    [{"name", "kind" (start | dense | method), "seed", "target_sparsity", "needs", "config" (dict)}].
    Every run but the start is scored by train.select=last_mean."""
    c = cfg.compare
    for name in c.methods:
        variant(name)
    n_seeds = max([c.seeds] + [seeds_of(cfg, m) for m in c.methods])
    start_its = (c.start_iterations or cfg.train.iterations) if c.start == "dense" else 0
    if any(variant(m)[0] == "snip" for m in c.methods) and start_its % cfg.train.val_every:
        raise ValueError(f"compare.start_iterations={start_its} must be a multiple of train.val_every="
                         f"{cfg.train.val_every}: SNIP trains from the init through both budgets, and its scored "
                         "validations must fall where the others' do")
    runs = []
    for k in range(n_seeds):
        seed = cfg.seed + k
        base = os.path.join(cfg.out_dir, f"seed{seed}")

        def run_config(method, out_dir, overrides=()):
            run = config_from_dict(cfg.to_dict())
            for item in [f"method={method}", f"seed={seed}", f"out_dir={out_dir}", "train.select=last_mean",
                         *overrides]:
                apply_override(run, item)
            return run

        start_name = None
        if c.start == "dense":
            start = run_config("dense", os.path.join(base, "start"),
                               [f"train.iterations={start_its}", "train.select=last", "loss_weights.adaptive=null"])
            start_name = f"seed{seed}/start"
            runs.append({"name": start_name, "kind": "start", "seed": seed, "target_sparsity": 0.0, "needs": [],
                         "config": start.to_dict()})
        start_overrides = [] if start_name is None else [f"model.init_from={os.path.join(base, 'start', 'latest.pt')}"]
        needs = [start_name] if start_name else []
        shared = ["loss_weights.adaptive=true"] if c.adaptive_weights_for_all else []
        dense = run_config("dense", os.path.join(base, "dense"), start_overrides + shared)
        runs.append({"name": f"seed{seed}/dense", "kind": "dense", "seed": seed, "target_sparsity": 0.0,
                     "needs": needs, "config": dense.to_dict()})
        for sparsity in c.sparsities:
            for name in c.methods:
                if name == "dense" or k >= seeds_of(cfg, name):
                    continue
                method, overrides = variant(name)
                out = os.path.join(base, _sparsity_tag(sparsity), name)
                common = [f"prune.target_sparsity={sparsity}"] + overrides + shared
                if method == "snip" and start_name:  # at init: the start's iterations + the budget, one restart
                    run = run_config(method, out, common + [f"train.iterations={start_its + cfg.train.iterations}",
                                                            f"optim.restarts=[{start_its}]"])
                    run_needs = []
                else:
                    run = run_config(method, out, start_overrides + common)
                    run_needs = needs
                runs.append({"name": f"seed{seed}/{_sparsity_tag(sparsity)}/{name}", "kind": "method", "method": name,
                             "seed": seed, "target_sparsity": sparsity, "needs": run_needs, "config": run.to_dict()})
    return runs


def _train(config: dict, threads: int | None) -> tuple[dict, float]:
    """One run (in a worker process when jobs > 1): its results and minutes."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    from adapmtl.train.trainer import Trainer
    t0 = time.time()
    results = Trainer(config_from_dict(config)).fit()
    minutes = (time.time() - t0) / 60
    # beside results.json: what a row needs if this process is gone before the row is written (run_info)
    write_json_atomic(os.path.join(config["out_dir"], RUN_INFO),
                      {"cpu": cpu_name(), "minutes": minutes, "finished": _utc_now()})
    return results, minutes


RUN_INFO = "compare_run.json"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_info(run: dict) -> dict | None:
    """The CPU, minutes and finishing time the run's worker recorded beside its results.json, or None (an older
    run folder, or a file that is not what _train writes)."""
    try:
        with open(os.path.join(run["config"]["out_dir"], RUN_INFO)) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None
    ok = (isinstance(info, dict) and isinstance(info.get("cpu"), str) and len(info["cpu"]) < 200
          and isinstance(info.get("minutes"), (int, float)) and 0 <= info["minutes"] < 1e6
          and isinstance(info.get("finished"), str) and len(info["finished"]) < 40)
    return info if ok else None


# ----------------------------------------------------------------------------------------- rows
# what does not change a run's result (the RESUME_FREE settings, but the validation period sets the scored window)
def config_digest(config: dict) -> str:
    """A short digest of the settings that shape what a run computes: rows are reused only when it matches."""
    flat = flatten_config(config)
    kept = {k: v for k, v in flat.items() if k == "train.val_every" or (
        k not in RESUME_FREE and k.split(".")[0] not in RESUME_FREE and k != "model.init_from")}
    kept["model.init_from"] = bool(flat.get("model.init_from"))  # where the start lies is not what it is
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(path: str) -> str:
    """A short digest of a checkpoint's model tensors: the rows say which dense start each run began from."""
    import torch

    from adapmtl.train.checkpoint import load_checkpoint_file
    state = load_checkpoint_file(path, "cpu")["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cpu_name() -> str:
    """The CPU a row ran on: model name, family/model, cores (two EPYCs share a name)."""
    from adapmtl.timing import cpu_facts
    f = cpu_facts()
    fm = f" f{f['family']}m{f['model_number']}" if "family" in f and "model_number" in f else ""
    return f"{f['model']}{fm}, {os.cpu_count()} cores"


def row_path(rows: str, name: str) -> str:
    return os.path.join(rows, name.replace("/", "__") + ".json")


def write_row(rows: str, run: dict, results: dict, minutes: float, cpu: str | None = None,
              finished: str | None = None) -> dict:
    """The committed record of one finished run (small JSON, with its CPU: this machine's and now, unless given)."""
    import torch

    row = {"name": run["name"], "kind": run["kind"], "method": run.get("method", "dense"), "seed": run["seed"],
           "target_sparsity": run["target_sparsity"], "config_digest": config_digest(run["config"]),
           "cpu": cpu or cpu_name(), "torch": torch.__version__, "python": platform.python_version(),
           "minutes": round(minutes, 2), "finished": finished or _utc_now(),
           "results": results}
    init = run["config"]["model"]["init_from"]
    if run["kind"] == "start":
        row["weights_digest"] = weights_digest(os.path.join(run["config"]["out_dir"], "latest.pt"))
    elif init:
        row["start_digest"] = weights_digest(init)
    os.makedirs(rows, exist_ok=True)
    write_json_atomic(row_path(rows, run["name"]), row)
    return row


def row_results(row: dict) -> dict:
    """A row's results as `execute` returns them: with the CPU it ran on and the start it began from."""
    return {**row["results"], "cpu": row.get("cpu", "not recorded"), "start_digest": row.get("start_digest")}


def reusable_row(run: dict, rows: str | None) -> dict | None:
    """A committed row of this very run (same name and config digest), or None. A row that is there but
    broken is an error naming the file; one of another plan is ignored, saying so."""
    import warnings

    if not rows:
        return None
    path = row_path(rows, run["name"])
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            row = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"compare: {path}: not a readable row ({exc}); delete it to train the run again") from None
    if not isinstance(row, dict) or not isinstance(row.get("results"), dict):
        raise ValueError(f"compare: {path}: no 'results' object; delete it to train the run again")
    if row.get("config_digest") != config_digest(run["config"]):
        warnings.warn(f"compare --reuse: {path} is a row of another plan (config digest {row.get('config_digest')!r}); "
                      f"training {run['name']} again", UserWarning, stacklevel=3)
        return None
    check_results(row["results"], run, path)
    return row


def execute(runs: list[dict], jobs: int = 1, reuse: bool = False, progress: bool = True,
            rows: str | None = None) -> dict[str, dict]:
    """Train the planned runs (`jobs` at a time, each in its own process with its share of the CPU threads, in
    dependency order), writing each finished run's row into `rows`. With `reuse`, a run is taken from its
    committed row or its folder's results.json instead; a start whose checkpoint is gone is trained again when
    a run that needs it is still to train. Returns {run name: results}, each with the "cpu" it ran on."""
    done = {}
    for r in runs:
        if reuse:
            row = reusable_row(r, rows)
            if row is not None:
                done[r["name"]] = row_results(row)
                continue
            reused = reusable_results(r)
            if reused is None:
                continue
            # a finished run folder of this plan (its row, if any, is of another plan): a run whose process was
            # stopped after training and before writing its row gets the row now, with what its worker recorded
            info = run_info(r)
            if rows and info is not None:
                done[r["name"]] = row_results(write_row(rows, r, reused, info["minutes"], cpu=info["cpu"],
                                                        finished=info["finished"]))
            else:
                done[r["name"]] = {**reused, "cpu": "not recorded (a run folder)"}
    pending = [r for r in runs if r["name"] not in done]
    if reuse:
        for r in pending:  # an interrupted run of this plan continues from its last checkpoint
            if resumable(r):
                r["config"]["train"]["resume"] = "auto"
    for r in list(pending):  # the checkpoint a pending run starts from must be on disk
        for n in r["needs"]:
            need = next(x for x in runs if x["name"] == n)
            if n in done and not os.path.isfile(os.path.join(need["config"]["out_dir"], "latest.pt")):
                del done[n]
                pending.insert(0, need)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(runs), initial=len(done), desc="compare runs", dynamic_ncols=True)

    def finished(r, out):
        results, minutes = out
        row = write_row(rows, r, results, minutes) if rows else {"results": results, "cpu": cpu_name()}
        done[r["name"]] = row_results(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(r["name"])

    if jobs <= 1:
        for r in pending:
            finished(r, _train(r["config"], None))
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
                ready, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in ready:
                    finished(running.pop(fut), fut.result())
    if bar is not None:
        bar.close()
    return done


def stored_config(folder: str) -> dict | None:
    import yaml
    try:
        with open(os.path.join(folder, "config.yaml")) as fh:
            stored = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return None
    return stored if isinstance(stored, dict) else None


def resumable(run: dict) -> bool:
    """Whether the run's folder holds a checkpoint of this very plan's run to continue from."""
    folder = run["config"]["out_dir"]
    stored = stored_config(folder)
    return (stored is not None and not config_changes(stored, run["config"])
            and os.path.isfile(os.path.join(folder, "latest.pt")))


def reusable_results(run: dict) -> dict | None:
    """The results of a finished run of the plan, or None to train it: a run folder whose config.yaml differs from
    the planned config (another plan's run) is trained again, saying why. A results.json that is there but broken
    or holds impossible values (non-finite metrics, sparsity outside [0, 1]) is an error naming the file."""
    import warnings

    folder = run["config"]["out_dir"]
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None
    stored = stored_config(folder)
    if stored is None:
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
    try:
        with open(path) as fh:
            res = json.load(fh)  # NaN and Infinity parse: the checks below refuse them
    except ValueError as exc:
        raise ValueError(f"compare: {path}: not valid JSON ({exc}); delete it to train the run again") from None
    except OSError as exc:
        raise ValueError(f"compare: cannot read {path}: {exc.strerror}") from None
    return check_results(res, run, path)


def check_results(res, run: dict, path: str) -> dict:
    """A run's results (from `path`), checked: ValueError naming the file for what a finished run cannot have
    written (a missing entry, another budget, non-finite metrics, a sparsity outside [0, 1])."""
    def bad(problem):
        return ValueError(f"compare: {path}: {problem}; delete it to train the run again")

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
    window = res.get("window", [])
    if not isinstance(window, list) or not all(
            isinstance(e, dict) and not isinstance(e.get("sparsity"), bool) and isinstance(e.get("sparsity"), (int, float))
            and 0.0 <= e["sparsity"] <= 1.0 for e in window):
        raise bad("a 'window' that is not a list of scored checkpoints with sparsities in [0, 1]")
    return res


# ----------------------------------------------------------------------------------------- results
def run_records(runs: list[dict], results: dict[str, dict], directions: dict) -> list[dict]:
    """The committed per-run records: ΔT on test against the seed's dense run, the overall sparsity of the final
    weights, whether every scored checkpoint is at the target, and the CPU the run was trained on."""
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
        scored = [e["sparsity"] for e in res.get("window", [])] or [sparsity]
        records.append({
            "method": r.get("method", "dense"), "seed": r["seed"], "target_sparsity": target, "sparsity": sparsity,
            "components": res["sparsity"]["components"], "selected": res["selected"],
            "at_target": target == 0.0 or all(abs(v - target) <= AT_TARGET_TOL for v in scored),
            "delta_t": dt, "delta_t_tasks": per_task, "skipped_metrics": skipped, "metrics": res["test"],
            "cpu": res.get("cpu", "not recorded"), "start_digest": res.get("start_digest"),
        })
    return records


def mixed_starts(records: list[dict]) -> list[int]:
    """Seeds whose runs began from different dense starts (a start trained again, e.g. on another CPU, after some
    of its runs were committed): their paired differences mix two starts."""
    digests: dict[int, set] = {}
    for r in records:
        if r.get("start_digest"):
            digests.setdefault(r["seed"], set()).add(r["start_digest"])
    return sorted(seed for seed, d in digests.items() if len(d) > 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def paired_test(diffs: list[float]) -> dict:
    """Mean, std, the 95% confidence interval (Student t) and the two-sided p of a paired t-test of per-seed
    differences (the seeds share start, data and evaluation); p is NaN below two seeds."""
    from scipy import stats

    n = len(diffs)
    mean, std = mean_std(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "std": std, "ci95": [float("nan")] * 2, "p": float("nan")}
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if std > 0 else (1.0 if mean == 0 else 0.0)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "p": p}


def holm(pvalues: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down adjustment: {key: (adjusted p, rejected at alpha)} for a family of tests (NaN p: not
    tested, never rejected)."""
    tested = sorted((p, k) for k, p in pvalues.items() if p == p)
    out = {k: (float("nan"), False) for k, p in pvalues.items() if p != p}
    running, m = 0.0, len(tested)
    for i, (p, k) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = (running, running < alpha)
    return out


def summarize(records: list[dict], reference: str = "adapmtl") -> list[dict]:
    """Per (target, method): mean ± std over seeds of every metric, ΔT_i and ΔT, and the per-seed paired
    difference ΔT(method) − ΔT(reference) at the same target (dense rows: at target 0) with its 95% interval,
    paired t-test and Holm-adjusted p over the methods of the target ("resolved": Holm p < 0.05)."""
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
               "metrics": {t: {m: mean_std([r["metrics"][t][m] for r in rs if m in r["metrics"].get(t, {})])
                               for m in ms} for t, ms in rs[0]["metrics"].items()},
               "selected": sorted({r["selected"] for r in rs}), "missed": [r["seed"] for r in rs if not r["at_target"]],
               "cpus": sorted({r.get("cpu", "not recorded") for r in rs})}
        ref = {r["seed"]: r["delta_t"] for r in groups.get((target, reference), [])}
        paired = [r["delta_t"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        row["paired_vs_reference"] = mean_std(paired) if paired and method != reference else None
        row["paired_test"] = paired_test(paired) if paired and method != reference and target else None
        out.append(row)
    for target in {s["target_sparsity"] for s in out}:
        family = {s["method"]: s["paired_test"]["p"] for s in out
                  if s["target_sparsity"] == target and s["paired_test"] is not None}
        for s in out:
            if s["target_sparsity"] == target and s["method"] in family:
                s["paired_test"]["p_holm"], s["paired_test"]["resolved"] = holm(family)[s["method"]]
    return out


def format_mean_std(ms: tuple[float, float], digits: int = 2, signed: bool = False) -> str:
    mean, std = ms
    head = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return head if std != std else f"{head} ± {std:.{digits}f}"


TABLE_METRICS = (("segment_semantic", "mIoU_all"), ("segment_semantic", "mIoU"), ("segment_semantic", "pixel_acc"),
                 ("normal", "angle_mean"), ("normal", "within_11.25"), ("depth", "abs_err"), ("depth", "delta_1.25"), ("depth", "si_log"))


def markdown_table(summary: list[dict], target: float, method_order: list[str], reference: str = "adapmtl") -> str:
    """One target's table: mean ± std over seeds (dense first), the paired difference to the reference with its
    95% interval, the Holm-adjusted p over the target's methods and whether the difference is resolved."""
    rows = [s for s in summary if s["target_sparsity"] in (0.0, target)]
    rows.sort(key=lambda s: method_order.index(s["method"]) if s["method"] in method_order else len(method_order))
    tasks = list(rows[0]["delta_t_tasks"]) if rows else []
    metrics = [(t, m) for t, m in TABLE_METRICS if rows and m in rows[0]["metrics"].get(t, {})]
    header = (["method", "seeds", "overall sparsity %"] + [f"{t}/{m}" for t, m in metrics]
              + [f"ΔT_{t}" for t in tasks] + ["ΔT", f"ΔT − ΔT({reference}), paired [95% CI]", "p (Holm)", "resolved"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in rows:
        sp_mean, sp_std = s["sparsity"]
        sparsity = format_mean_std((100 * sp_mean, 100 * sp_std)) + (f" ⚠ off target (seeds {s['missed']})" if s["missed"] else "")
        cells = [s["method"], str(len(s["seeds"])), sparsity]
        for t, m in metrics:
            mean = s["metrics"][t][m][0]
            cells.append(format_mean_std(s["metrics"][t][m], 3 if abs(mean) < 1 else 2))
        cells += [format_mean_std(s["delta_t_tasks"][t], signed=True) if t in s["delta_t_tasks"] else "–" for t in tasks]
        cells.append(format_mean_std(s["delta_t"], signed=True))
        test = s.get("paired_test")
        if s["paired_vs_reference"] is None:
            cells += ["–", "–", "–"]
        elif test is None or test["p"] != test["p"]:
            cells += [format_mean_std(s["paired_vs_reference"], signed=True), "–", "– (one seed)"]
        else:
            lo, hi = test["ci95"]
            cells += [f"{format_mean_std(s['paired_vs_reference'], signed=True)} [{lo:+.2f}, {hi:+.2f}]",
                      f"{test['p_holm']:.3g}", "resolved" if test["resolved"] else "not resolved"]
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


def protocol_of(cfg: Config, directions: dict) -> dict:
    """What a comparison's numbers mean: the start, budget, seeds per method, scoring rule and ΔT metrics."""
    c = cfg.compare
    return {"start": c.start, "start_iterations": (c.start_iterations or cfg.train.iterations) if c.start == "dense"
            else 0, "iterations": cfg.train.iterations, "seeds": {m: [cfg.seed + k for k in range(seeds_of(cfg, m))]
                                                                   for m in c.methods},
            "sparsities": list(c.sparsities), "adaptive_weights_for_all": c.adaptive_weights_for_all,
            "delta_t_metrics": directions, "scoring": f"mean over the last {cfg.train.score_window} validations "
            f"(every {cfg.train.val_every} iterations), val and test", "at_target_tol": AT_TARGET_TOL,
            "camera_height": cfg.data.camera_height}


def report(cfg: Config, runs: list[dict], results: dict[str, dict], directions: dict) -> dict:
    """Write results.json ({"config", "protocol", "runs"}), table.md / table.csv and delta_t_vs_sparsity.png
    into cfg.out_dir; returns the results dict."""
    import csv

    records = run_records(runs, results, directions)
    summary = summarize(records)
    order = [m for m in COMPARE_METHODS if m in cfg.compare.methods or m == "dense"] + [
        m for m in cfg.compare.methods if m not in COMPARE_METHODS]
    c = cfg.compare
    protocol = protocol_of(cfg, directions)
    out = {"config": cfg.to_dict(), "protocol": protocol, "runs": records}
    write_json_atomic(os.path.join(cfg.out_dir, "results.json"), out)
    parts = []
    for target in c.sparsities:
        parts.append(f"### Target overall sparsity {100 * target:g}%\n\n" + markdown_table(summary, target, order))
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as fh:
        fh.write("\n".join(parts) + "\n" + table_note(cfg, directions, records) + "\n")
    with open(os.path.join(cfg.out_dir, "table.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seed", "target_sparsity", "sparsity", "selected", "at_target", "delta_t"]
                   + [f"delta_t_{t}" for t in directions]
                   + [f"{t}/{m}" for t, ms in records[0]["metrics"].items() for m in ms] + ["cpu"])
        for r in records:
            w.writerow([r["method"], r["seed"], r["target_sparsity"], r["sparsity"], r["selected"], r["at_target"],
                        r["delta_t"]] + [r["delta_t_tasks"].get(t, "") for t in directions]
                       + [v for ms in r["metrics"].values() for v in ms.values()] + [r["cpu"]])
    plot_sweep(summary, os.path.join(cfg.out_dir, "delta_t_vs_sparsity.png"))
    return out


def table_note(cfg: Config, directions: dict, records: list[dict]) -> str:
    """What the tables' columns mean, and on which CPUs the runs were trained."""
    c = cfg.compare
    miou = next((m for m in directions.get("segment_semantic", {}) if m.startswith("mIoU")), "mIoU")
    start = (f"each seed's methods continue for {cfg.train.iterations} iterations from one dense model trained "
             f"{(c.start_iterations or cfg.train.iterations)} iterations (SNIP: from the seed's init for both budgets)"
             if c.start == "dense" else f"every method trains {cfg.train.iterations} iterations from scratch")
    cpus = sorted({r["cpu"] for r in records})
    mixed = mixed_starts(records)
    return (f"Test split, mean ± std over seeds; {start}. Every run is scored by the mean of its last "
            f"{cfg.train.score_window} validations' metrics (no checkpoint chosen). ΔT_i sums the signed relative "
            f"changes of task i's metrics vs the seed's dense run (SPEC §6; the segmentation mIoU in it: {miou}); ΔT "
            f"is their mean. Paired: ΔT(method) − ΔT(adapmtl) on the same seed, mean ± std with its 95% t interval; "
            f"p: two-sided paired t-test, Holm-adjusted over the methods of the target; resolved: adjusted p < 0.05. "
            f"⚠ off target: a scored checkpoint further than {100 * AT_TARGET_TOL:g} pp from the target. mIoU_all: "
            f"every class; mIoU: classes with TP > 0; si_log: scale-invariant depth error (not in ΔT). Adaptive task "
            f"weights: {'every method' if c.adaptive_weights_for_all else 'AdapMTL (and str) only'}. Trained on: "
            f"{'; '.join(cpus)}." + (f" ⚠ seeds {mixed}: runs from different dense starts." if mixed else ""))


def compare(cfg: Config, jobs: int = 1, reuse: bool = False, directions: dict | None = None) -> dict:
    """Plan, train and report the experiment of cfg.compare (see the module docstring)."""
    from adapmtl.train.build import config_tasks
    from adapmtl.train.trainer import delta_t_directions

    runs = plan(cfg)
    results = execute(runs, jobs=jobs, reuse=reuse, progress=cfg.train.progress, rows=cfg.compare.rows)
    if directions is None:
        dense = next(results[r["name"]] for r in runs if r["kind"] == "dense")
        directions = delta_t_directions(cfg, [t for t in config_tasks(cfg) if t in dense["test"]])
    return report(cfg, runs, results, directions)
