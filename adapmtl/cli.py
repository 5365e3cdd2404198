"""`adapmtl` command line: train | eval | export | bench | compare | configs (also `python -m adapmtl`).

Every config value can be overridden: `--set optim.lr=1e-4` or just `optim.lr=1e-4` after the
command (values are parsed as YAML; unknown keys and wrong types are rejected, naming the key).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys


def _config(args):
    from adapmtl.train import load_config

    return load_config(args.config, list(args.set or []) + list(args.overrides or []))


def cmd_train(args) -> int:
    from adapmtl.train import Trainer

    cfg = _config(args)
    results = Trainer(cfg).fit()
    if results is not None:
        _print_results(results)
        print(f"run written to {cfg.out_dir}")
    return 0


def _print_results(results: dict) -> None:
    print(f"method {results['method']} ({results['selected']}), overall sparsity {100 * results['sparsity']['overall']:.2f}%")
    for comp, sp in results["sparsity"]["components"].items():
        print(f"  sparsity {comp:<20} {100 * sp:6.2f}%")
    for task, ms in results["test"].items():
        print(f"  test {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in ms.items()))
    if "delta_t_test" in results:
        print(f"  ΔT = {results['delta_t_test']['mean']:+.2f}")


def _model_from_checkpoint(path: str):
    from adapmtl.train import load_trained

    trained = load_trained(path)
    return trained.config, trained.model, trained.data_from_config


EVAL_SETTINGS = ("data.", "device", "train.max_val_batches", "train.delta_t_miou")


def _check_writable_file(path: str, option: str) -> None:
    """Before the work: an output path that names a folder, or a file in a missing folder, is an error now."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path!r}: the folder {parent!r} does not exist")


def cmd_eval(args) -> int:
    import adapmtl
    from adapmtl.train import Trainer
    from adapmtl.train.config import apply_override

    overrides = list(args.set or []) + list(args.overrides or [])
    for item in overrides:  # the model is the checkpoint's: only what evaluation reads may change
        key = item.split("=", 1)[0].strip()
        if not key.startswith(EVAL_SETTINGS):
            raise ValueError(f"eval: {key} has no effect on evaluating a checkpoint (its model and method are the "
                             "checkpoint's); eval takes data.*, device, train.max_val_batches, train.delta_t_miou")
    if args.out:
        _check_writable_file(args.out, "--out")
    cfg, model, data_from_config = _model_from_checkpoint(args.checkpoint)
    if not data_from_config:
        raise ValueError(f"{args.checkpoint} was trained on datasets given to Trainer(...), which its config does not "
                         "describe; evaluate it in Python with Trainer.evaluate on those datasets")
    for item in overrides:
        apply_override(cfg, item)
    cfg.method, cfg.train.resume, cfg.model.init_from = "dense", None, None  # model already converted/loaded
    cfg.train.progress = False
    trainer = Trainer(cfg.validate(), model=model)
    split = {"val": trainer.val_set, "test": trainer.test_set, "train": trainer.train_set}[args.split]
    result = trainer.evaluate(split)
    rep = adapmtl.sparsity_report(trainer.model)
    fractions = rep.fractions()
    out = {"split": args.split, "metrics": result["metrics"], "loss": result["loss"], "sparsity": fractions["overall"],
           "components": fractions["components"]}
    print(rep.table(per_layer=False))
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def cmd_export(args) -> int:
    import torch

    import adapmtl
    from adapmtl.interchange import export_onnx, export_pt2

    if args.input_size is not None and args.input_size < 1:
        raise ValueError(f"export: --input-size must be a positive number of pixels, got {args.input_size}")
    _check_writable_file(args.out, "--out")
    cfg, model, _ = _model_from_checkpoint(args.checkpoint)
    size = args.input_size or cfg.data.crop_size
    example = torch.randn(1, 3, size, size)
    if args.format == "onnx":  # dense: ONNX has no sparse convolution
        export_onnx(model, example, args.out)
        print(f"exported the finalized dense model to {args.out} (input 1x3x{size}x{size}); run it with onnxruntime")
        return 0
    exported = adapmtl.export_sparse(model.eval(), min_sparsity=args.min_sparsity, backend=args.backend)
    sparse = sum(1 for d in exported.sparse_export_report if d.get("sparse"))
    if args.format == "pt2":
        export_pt2(exported, example, args.out)
        how = f"torch.export.load({args.out!r}) after `import adapmtl`"
    else:
        adapmtl.save_exported(exported, args.out)
        how = f"adapmtl.load_exported({args.out!r})"
    print(f"exported to {args.out} ({sparse} of {len(exported.sparse_export_report)} layers sparse); load it with {how}")
    return 0


def cmd_bench(args) -> int:
    # benchmarks/ are part of a source checkout, not of the package: next to an editable install, or the
    # checkout the command is run from
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = sorted(glob.glob(os.path.join(here, "benchmarks", "bench_*.py"))) or sorted(
        glob.glob(os.path.join("benchmarks", "bench_*.py")))
    names = {os.path.basename(s)[len("bench_"):-3]: s for s in scripts}
    if not names:
        print("no benchmarks/bench_*.py found: run this from a source checkout of adapmtl", file=sys.stderr)
        return 2
    quick = ["--quick"] if args.quick else []
    if args.name is None:
        if not args.quick:
            print(f"name a benchmark: adapmtl bench <name> [--quick]; available: {', '.join(sorted(names))} "
                  "(adapmtl bench --quick: every one's smoke run)", file=sys.stderr)
            return 2
        for name in sorted(names):  # every smoke run, stopping at the first that fails
            print(f"== adapmtl bench {name} --quick", flush=True)
            rc = subprocess.call([sys.executable, names[name], *quick, *args.bench_args])
            if rc:
                return rc
        return 0
    if args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {sorted(names)}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, names[args.name], *quick, *args.bench_args])


def cmd_configs(args) -> int:
    from adapmtl.train.config import bundled_configs, resolve_config

    if args.name is None:
        for name, path in bundled_configs().items():
            with open(path) as fh:
                first = fh.readline().lstrip("# ").strip()
            print(f"{name:<22} {first}")
        print("\nuse one with `adapmtl train -c <name>`; `adapmtl configs <name> --out my.yaml` writes a copy to edit")
        return 0
    with open(resolve_config(args.name)) as fh:
        text = fh.read()
    if args.out is None:
        print(text, end="")
        return 0
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out} exists (use --force to overwrite)")
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"written {args.out}; train with `adapmtl train -c {args.out}`")
    return 0


def cmd_compare(args) -> int:
    from adapmtl.train.compare import ABLATIONS, compare
    from adapmtl.train.config import apply_override
    from adapmtl.train.trainer import delta_t_directions

    if args.jobs < 1:
        raise ValueError(f"--jobs must be an int >= 1, got {args.jobs}")
    cfg = _config(args)
    flags = {"compare.sparsities": None if args.sparsity is None else f"[{args.sparsity}]",
             "compare.methods": None if args.methods is None else "[" + args.methods + "]",
             "compare.seeds": args.seeds, "compare.start": args.start, "compare.start_iterations": args.start_iterations,
             "compare.rows": args.rows, "out_dir": args.out}
    for key, value in flags.items():
        if value is not None:
            apply_override(cfg, f"{key}={value}")
    if args.adaptive_weights_for_all:
        cfg.compare.adaptive_weights_for_all = True
    if args.ablations:
        cfg.compare.methods += [m for m in ABLATIONS if m not in cfg.compare.methods]
    if "dense" not in cfg.compare.methods:
        cfg.compare.methods.insert(0, "dense")
    cfg.validate()
    out = compare(cfg, jobs=args.jobs, reuse=args.reuse,
                  directions=None if args.directions is None else delta_t_directions(cfg, args.directions))
    with open(os.path.join(cfg.out_dir, "table.md")) as fh:
        print(fh.read())
    print(f"written {cfg.out_dir}/results.json ({len(out['runs'])} runs), table.md, table.csv")
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option that has a default says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from adapmtl import __version__

    p = argparse.ArgumentParser(prog="adapmtl", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"adapmtl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    def with_config(sp, required=True):
        sp.add_argument("--config", "-c", required=required,
                        help="a YAML file, or a bundled config by name (demo, nyuv2_resnet34, ...: `adapmtl configs`)")
        sp.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                        help="override a config value (repeatable), e.g. optim.lr=1e-4")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, without --set")

    t = command("train", "train one method (AdapMTL, an ablation or a baseline)")
    with_config(t)
    e = command("eval", "evaluate a trainer checkpoint on a split")
    e.add_argument("--checkpoint", required=True, help="a trainer checkpoint (runs/<run>/latest.pt or best.pt)")
    e.add_argument("--split", choices=("val", "test", "train"), default="test", help="the split to evaluate")
    e.add_argument("--out", help="also write the results JSON here")
    e.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                   help="override a value of the checkpoint's config (e.g. data.root=...)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, without --set")
    x = command("export", "export a trained model: sparse layers in our safetensors format or a torch.export "
                          ".pt2, or the dense finalized model as ONNX")
    x.add_argument("--checkpoint", required=True, help="a trainer checkpoint (runs/<run>/latest.pt or best.pt)")
    x.add_argument("--out", required=True, help="the file to write")
    x.add_argument("--format", choices=("safetensors", "pt2", "onnx"), default="safetensors",
                   help="safetensors: adapmtl.load_exported, safe on untrusted files; pt2: torch.export program "
                        "(AOTInductor's input); onnx: dense, for other runtimes")
    x.add_argument("--input-size", type=int, help="H = W of the example input that pt2/onnx trace with "
                   "(default: the config's data.crop_size)")
    x.add_argument("--min-sparsity", type=float, default=0.5, help="layers below this sparsity stay dense")
    x.add_argument("--backend", default="auto", help="sparse kernel backend: auto (the best where the file is loaded), "
                   "torch, torch_csr, cpp, cuda or triton (must run on this machine)")
    b = command("bench", "run a benchmarks/bench_<name>.py script")
    b.add_argument("name", nargs="?", help="the benchmark, e.g. soft_threshold or sparse_conv (omit to list them; "
                   "with --quick, every benchmark's smoke run)")
    b.add_argument("--quick", action="store_true", help="a smoke run (results under runs/bench, never the committed ones)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the script (e.g. --quick, --help)")
    c = command("compare", "dense, the pruning baselines and AdapMTL at matched sparsity over seeds -> results.json, "
                           "Markdown + CSV tables, a ΔT-vs-sparsity plot (docs/compare.md)")
    with_config(c)
    c.add_argument("--sparsity", help="target overall sparsities, comma-separated, e.g. 0.8,0.9,0.95 "
                   "(default: the config's compare.sparsities, 0.9)")
    c.add_argument("--methods", help="comma-separated methods and ablations (default: compare.methods: "
                   "dense,snip,lth,imp,disparse,single_threshold,adapmtl)")
    c.add_argument("--ablations", action="store_true", help="add the ablations: adapmtl_fixed_weights, "
                   "single_threshold_adaptive, str, adapmtl_ste")
    c.add_argument("--seeds", type=int, help="run everything for this many seeds (default: compare.seeds)")
    c.add_argument("--start", choices=("dense", "scratch"), help="every method from one dense model per seed, "
                   "or from scratch (default: compare.start, dense)")
    c.add_argument("--start-iterations", type=int, help="training of the dense start (default: "
                   "compare.start_iterations, else train.iterations)")
    c.add_argument("--adaptive-weights-for-all", action="store_true",
                   help="a separate experiment: adaptive task weights for every method, not AdapMTL's only")
    c.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process with "
                   "its share of the CPU threads")
    c.add_argument("--out", help="folder for the runs and results (default: the config's out_dir)")
    c.add_argument("--rows", help="folder of per-run result rows (small JSON with the CPU), written as runs finish "
                   "(default: compare.rows, none)")
    c.add_argument("--reuse", action="store_true", help="take finished runs from their rows (--rows), else from their "
                   "folders' results.json, when of this plan; interrupted runs continue from their last checkpoint")
    c.add_argument("--directions", default=None, help="'nyuv2' or 'taskonomy' metric set (default: per task kind)")
    g = command("configs", "list the bundled configs, print one, or write a copy to edit")
    g.add_argument("name", nargs="?", help="a bundled config (omit to list them)")
    g.add_argument("--out", help="write the config here instead of printing it")
    g.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench,
               "compare": cmd_compare, "configs": cmd_configs}[args.command]
    from adapmtl.train.run_guard import TrainingInterrupted

    try:
        return handler(args)
    except TrainingInterrupted as e:  # a signal stopped training after a checkpoint: the signal's exit code
        print(f"adapmtl {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"adapmtl {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:  # a user's mistake: one line naming it (ADAPMTL_DEBUG=1 shows the traceback)
        if os.environ.get("ADAPMTL_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"adapmtl {args.command}: error: {message}", file=sys.stderr)
        return 2


def _user_errors() -> tuple:
    """What bad input raises: bad values and types, unreadable or missing files, malformed YAML/safetensors."""
    import yaml

    from adapmtl.train.run_guard import RunLockedError

    # ImportError: an optional extra is missing; RunLockedError: another trainer holds the out_dir
    errors = [ValueError, TypeError, OSError, KeyError, ImportError, RunLockedError, yaml.YAMLError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
