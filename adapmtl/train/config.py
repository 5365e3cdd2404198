"""Run configuration: nested dataclasses, loaded from YAML, overridable with `key.sub=value` strings.

Unknown keys and values of the wrong type are rejected with a message naming them, so a typo in a
config or on the command line never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

from adapmtl.data.synthetic import DEMO_CLASSES, MAX_CLASSES
from adapmtl.ops.block_soft_threshold import block_of

METHODS = ("adapmtl", "single_threshold", "str", "dense", "imp", "lth", "snip", "disparse")
DATASETS = ("synthetic", "nyuv2", "taskonomy")
AMP = ("none", "bf16", "fp16")
SELECT = ("auto", "delta_t", "val_loss", "last", "last_mean")
ON_NONFINITE = ("stop", "skip")
CONTROL = ("controlled", "paper")
# `adapmtl compare`'s default methods, in the order of its table
COMPARE_METHODS = ("dense", "snip", "lth", "imp", "disparse", "single_threshold", "adapmtl")
DELTA_T_MIOU = ("auto", "mIoU", "mIoU_all")


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str = "~/.cache/adapmtl/synthetic"  # synthetic: generated here on first use
    tasks: list | None = None  # None: every task of the dataset
    crop_size: int = 64
    val_fraction: float = 0.1  # held-out part of the train list used for model selection
    batch_size: int = 16
    eval_batch_size: int = 16
    num_workers: int = 0
    n_train: int = 200  # synthetic only
    n_test: int = 50
    image_size: int = 64
    n_classes: int = 10  # synthetic only: semantic classes in the scenes (10, the demo's, up to 16)
    # synthetic only: the camera's height above the floor in every scene (null: drawn per scene in [1.1, 1.6]);
    # fixed, the absolute depth scale is inferable from the image (the floor's place under fixed intrinsics)
    camera_height: float | None = None
    allow_outside_root: bool = False  # index entries may point outside data.root (absolute paths, ..)


@dataclass
class ModelConfig:
    backbone: str = "tiny"
    channels: list | None = None  # tiny backbone only: its 4 stage widths (default 16, 32, 64, 64)
    head_channels: int | None = None
    dilations: list | None = None
    dropout: float = 0.5
    init_from: str | None = None  # dense checkpoint: AdapMTL starts from it with thresholds reset to s0


@dataclass
class PruneConfig:
    target_sparsity: float = 0.9  # overall, over every prunable weight
    s0: float = -15.0
    grad: str = "exact"
    backend: str = "auto"
    # soft-threshold methods: blocks of `block` output channels thresholded by their norm (an int bo or [bo, 1];
    # 1: the paper's element-wise threshold; adapmtl/ops/block_soft_threshold.py). The mask baselines ignore it.
    block: int | list = 1
    # soft-threshold methods: "controlled" follows a cubic ramp to target_sparsity (docs/sparsity_control.md);
    # "paper" is SPEC §3 (weight decay pushes the thresholds up, the cap stops them at the target)
    control: str = "controlled"
    ramp_start: float = 0.0  # fraction of train.iterations where the required sparsity starts to rise
    ramp_end: float = 0.7  # ... and reaches target_sparsity (held from there on)
    control_gain: float = 0.5  # fraction of the sparsity error one step removes (docs/sparsity_control.md)
    # mask baselines (SPEC §7)
    prune_start: float = 0.3  # fraction of the iterations trained before the first pruning (IMP, LTH)
    prune_end: float = 0.7  # IMP, LTH: last pruning round at this fraction; DiSparse: last regrow update
    rounds: int = 4  # IMP and LTH pruning rounds
    rewind_iter: int = 0  # LTH: iteration whose weights survivors are rewound to after every round
    score_batches: int = 4  # SNIP / DiSparse: batches for the importance scores at init
    update_every: int = 50  # DiSparse prune-and-regrow period
    regrow_fraction: float = 0.2  # DiSparse: fraction of survivors swapped at the first update (cosine decay)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 5e-5  # coupled L2 on every weight; on the thresholds too with prune.control=paper (SPEC §3)
    step_size: int = 4000  # StepLR, stepped every iteration
    gamma: float = 0.5
    # iterations where Adam's moments and the LR schedule start afresh, as in a new run (a method trained from
    # its init for the budget of a dense start plus a continuation gets the same schedule: compare's SNIP)
    restarts: list = field(default_factory=list)


@dataclass
class LossWeightConfig:
    # None: the method's own choice (on for adapmtl and str, off for the baselines and single_threshold,
    # which sum their task losses as in the paper); true / false: on / off for every method
    adaptive: bool | None = None
    start: int = 5000
    window: int = 500
    normalize: bool = True  # Σ w_t = T
    priorities: dict | None = None  # static p_t per task (default 1)


@dataclass
class TrainConfig:
    iterations: int = 20000
    amp: str = "none"
    log_every: int = 20
    val_every: int = 1000
    ckpt_every: int = 500
    resume: str | None = None  # a checkpoint path, or "auto" (out_dir/latest.pt if it exists)
    select: str = "auto"  # auto: ΔT vs dense_results when given, else val loss; last_mean: see score_window
    score_window: int = 5  # select=last_mean: val and test metrics are the mean over the last this-many validations
    dense_results: str | None = None  # JSON of the dense model's val/test metrics
    # the mIoU that ΔT sums: "auto" = mIoU_all (every class) on synthetic data, where a model that stops
    # predicting a class would otherwise gain from it, and the paper's TP > 0 mIoU elsewhere
    delta_t_miou: str = "auto"
    select_sparsity_tol: float = 0.005  # pruning runs: only checkpoints within ± this of the target are "best"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    max_val_batches: int | None = None
    on_nonfinite: str = "stop"  # a NaN/inf loss: "stop" (error; checkpoints stay the last good ones) or "skip" the step
    keep_checkpoints: int = 3  # latest.pt plus this many - 1 older ones (latest-<iteration>.pt) to fall back to
    # on the CPU, keep freed memory in the process instead of faulting it in again every step (host_memory.py)
    retain_host_memory: bool = True


@dataclass
class CompareConfig:
    """`adapmtl compare`'s experiment (adapmtl/train/compare.py, docs/compare.md); train ignores it."""
    methods: list = field(default_factory=lambda: list(COMPARE_METHODS))  # and ablations (compare.ABLATIONS)
    sparsities: list = field(default_factory=lambda: [0.9])  # target overall sparsities
    seeds: int = 1  # seeds seed, seed + 1, ...: init, data order and the dense start
    start: str = "dense"  # "dense": every method continues from one dense model per seed; "scratch"
    start_iterations: int | None = None  # the dense start's training (default: train.iterations)
    adaptive_weights_for_all: bool = False  # a separate experiment: adaptive task weights for every method
    seeds_for: dict | None = None  # {method: n}: fewer (or more) seeds than `seeds` for some methods
    rows: str | None = None  # folder of per-run result rows (JSON): written as runs finish, reused with --reuse


@dataclass
class Config:
    method: str = "adapmtl"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    out_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_weights: LossWeightConfig = field(default_factory=LossWeightConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        def bad(key, expected, value):
            raise ValueError(f"config: {key} must be {expected}, got {value!r}")

        if self.method not in METHODS:
            bad("method", f"one of {METHODS}", self.method)
        if self.data.dataset not in DATASETS:
            bad("data.dataset", f"one of {DATASETS}", self.data.dataset)
        if self.train.amp not in AMP:
            bad("train.amp", f"one of {AMP}", self.train.amp)
        if self.train.select not in SELECT:
            bad("train.select", f"one of {SELECT}", self.train.select)
        if self.prune.grad not in ("exact", "ste"):
            bad("prune.grad", "'exact' or 'ste'", self.prune.grad)
        try:
            block_of(self.prune.block)
        except ValueError:
            bad("prune.block", "an int bo in [1, 4096] or [bo, 1]", self.prune.block)
        if self.train.on_nonfinite not in ON_NONFINITE:
            bad("train.on_nonfinite", f"one of {ON_NONFINITE}", self.train.on_nonfinite)
        if self.train.delta_t_miou not in DELTA_T_MIOU:
            bad("train.delta_t_miou", f"one of {DELTA_T_MIOU}", self.train.delta_t_miou)
        if self.data.dataset == "synthetic" and not DEMO_CLASSES <= self.data.n_classes <= MAX_CLASSES:
            bad("data.n_classes", f"an int in [{DEMO_CLASSES}, {MAX_CLASSES}] (synthetic scenes)", self.data.n_classes)
        ch = self.model.channels
        if ch is not None and (len(ch) != 4 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                                       for c in ch)):
            bad("model.channels", "4 ints >= 1 (the tiny backbone's stage widths) or null", ch)
        if ch is not None and self.model.backbone != "tiny":
            bad("model.channels", "null unless model.backbone is tiny", ch)
        c = self.compare
        if c.start not in ("dense", "scratch"):
            bad("compare.start", "'dense' or 'scratch'", c.start)
        if not c.methods or not all(isinstance(m, str) and m for m in c.methods) or len(set(c.methods)) != len(c.methods):
            bad("compare.methods", "a non-empty list of distinct method names", c.methods)
        if not c.sparsities or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1
                                       for v in c.sparsities):
            bad("compare.sparsities", "a non-empty list of numbers in (0, 1)", c.sparsities)
        if c.seeds < 1:
            bad("compare.seeds", "an int >= 1", c.seeds)
        if c.seeds_for is not None and not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                               and v >= 1 for k, v in c.seeds_for.items()):
            bad("compare.seeds_for", "a mapping of method names to ints >= 1, or null", c.seeds_for)
        r = self.optim.restarts
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < self.train.iterations for v in r):
            bad("optim.restarts", f"a list of iterations in (0, train.iterations={self.train.iterations})", r)
        h = self.data.camera_height
        if h is not None and not (math.isfinite(h) and 0.2 <= h <= 3.0):
            bad("data.camera_height", "a height in [0.2, 3.0] (under the room's ceiling) or null", h)
        if c.start_iterations is not None and c.start_iterations < 1:
            bad("compare.start_iterations", "an int >= 1 or null", c.start_iterations)
        if self.prune.control not in CONTROL:
            bad("prune.control", f"one of {CONTROL}", self.prune.control)
        if not 0.0 <= self.prune.ramp_start < self.prune.ramp_end <= 1.0:
            bad("prune.ramp_start/ramp_end", "0 <= ramp_start < ramp_end <= 1",
                (self.prune.ramp_start, self.prune.ramp_end))
        if not 0.0 < self.prune.control_gain <= 1.0:
            bad("prune.control_gain", "in (0, 1]", self.prune.control_gain)
        if not 0.0 < self.prune.target_sparsity < 1.0:
            bad("prune.target_sparsity", "in (0, 1)", self.prune.target_sparsity)
        if not 0.0 <= self.data.val_fraction < 1.0:
            bad("data.val_fraction", "in [0, 1)", self.data.val_fraction)
        for key in ("data.batch_size", "data.eval_batch_size", "data.crop_size", "train.iterations", "train.log_every",
                    "train.val_every", "train.ckpt_every", "optim.step_size", "loss_weights.window", "prune.rounds",
                    "prune.score_batches", "prune.update_every", "data.n_train", "data.n_test", "data.image_size",
                    "train.keep_checkpoints", "train.score_window"):
            section, name = key.split(".")
            v = getattr(getattr(self, section), name)
            if v < 1:
                bad(key, "an int >= 1", v)
        for key in ("data.num_workers", "loss_weights.start", "prune.rewind_iter", "seed"):
            v = getattr(getattr(self, key.split(".")[0]), key.split(".")[1]) if "." in key else getattr(self, key)
            if v < 0:
                bad(key, "an int >= 0", v)
        if self.optim.lr <= 0:
            bad("optim.lr", "> 0", self.optim.lr)
        if not 0 < self.optim.gamma <= 1:
            bad("optim.gamma", "in (0, 1] (the StepLR factor)", self.optim.gamma)
        if not 0 <= self.model.dropout < 1:
            bad("model.dropout", "in [0, 1)", self.model.dropout)
        if self.model.head_channels is not None and self.model.head_channels < 1:
            bad("model.head_channels", "an int >= 1 or null", self.model.head_channels)
        if self.train.max_val_batches is not None and self.train.max_val_batches < 1:
            bad("train.max_val_batches", "an int >= 1 or null", self.train.max_val_batches)
        if not 0 <= self.train.select_sparsity_tol <= 1:
            bad("train.select_sparsity_tol", "in [0, 1]", self.train.select_sparsity_tol)
        if self.optim.weight_decay < 0:
            bad("optim.weight_decay", ">= 0", self.optim.weight_decay)
        if len(self.optim.betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.optim.betas):
            bad("optim.betas", "two numbers in [0, 1)", self.optim.betas)
        if not 0 <= self.prune.prune_start <= self.prune.prune_end <= 1:
            bad("prune.prune_start/prune_end", "0 <= prune_start <= prune_end <= 1",
                (self.prune.prune_start, self.prune.prune_end))
        if not 0 <= self.prune.regrow_fraction < 1:
            bad("prune.regrow_fraction", "in [0, 1)", self.prune.regrow_fraction)
        if self.loss_weights.priorities is not None:
            for k, v in self.loss_weights.priorities.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    bad(f"loss_weights.priorities.{k}", "a finite number >= 0", v)
        dil = self.model.dilations
        if dil is not None and not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dil):
            bad("model.dilations", "a list of ints >= 1", dil)
        return self


def _check_type(key: str, tp, value):
    """Coerce int -> float where a float is expected; reject everything else that does not match."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, a, value)
            except TypeError as e:
                errors.append(e)
        raise TypeError(f"config: {key} must be {' or '.join(getattr(a, '__name__', str(a)) for a in args)}, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf / .nan cannot train; say so before anything runs
                raise ValueError(f"config: {key} must be a finite number, got {value!r}")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise TypeError(f"config: {key} must be {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise TypeError(f"config: {prefix.rstrip('.') or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"config: unknown key '{prefix}{key}'; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _check_type(prefix + key, hints[key], value))


def config_from_dict(data: dict | None) -> Config:
    cfg = Config()
    _apply(cfg, data or {})
    return cfg.validate()


def bundled_configs() -> dict[str, str]:
    """{name: path} of the configs shipped inside the package (adapmtl/configs/*.yaml): `-c demo` works from
    any folder, with or without a source checkout."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return {os.path.basename(p)[:-len(".yaml")]: p for p in sorted(glob.glob(os.path.join(folder, "*.yaml")))}


def resolve_config(name_or_path: str) -> str:
    """The YAML file meant by `-c`: an existing file, else a bundled config name (`demo`, `demo.yaml`)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    bundled = bundled_configs()
    stem = name_or_path.removeprefix("configs/").removesuffix(".yaml")  # also the source tree's old spelling
    if stem in bundled:
        return bundled[stem]
    raise FileNotFoundError(f"config: {name_or_path!r} is neither a file nor a bundled config; bundled: "
                            f"{', '.join(bundled)} (`adapmtl configs` lists them)")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file or bundled config name (or the defaults) with `key.sub=value` overrides
    (values parsed as YAML)."""
    data = {}
    if path is not None:
        path = resolve_config(path)
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping at the top level")
    cfg = Config()
    _apply(cfg, data)
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def apply_override(cfg: Config, item: str) -> None:
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"config override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.strip().split(".")
    nested: dict = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    _apply(cfg, nested)


def save_config(cfg: Config, path: str, model_source: str = "config", data_source: str = "config") -> None:
    """Write the run's config; a model or data given to the Trainer instead of built from it is said at the top
    (the config's `model` / `data` sections then describe nothing that ran)."""
    notes = []
    if model_source != "config":
        notes.append(f"# model: {model_source}, given to Trainer(model=...); the model section below was not used")
    if data_source != "config":
        notes.append("# data: datasets given to Trainer(...); the data section below was not used")
    with open(path, "w") as fh:
        fh.write("".join(n + "\n" for n in notes))
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)


# ---------------------------------------------------------------------------------------------- resume
# What a resume may change against the checkpoint's config (README, "Untrusted files and values"). Keys in
# neither table shape the state the checkpoint holds (model, data, method, optimizer, schedule, loss weights,
# pruning method): a resume that changes one is refused, since the restored state would keep the old value
# while config.yaml recorded the new one.
RESUME_FREE = ("device", "out_dir", "deterministic", "data.root", "data.allow_outside_root", "data.num_workers",
               "data.eval_batch_size", "prune.backend", "train.log_every", "train.val_every", "train.ckpt_every",
               "train.resume", "train.tensorboard", "train.plots", "train.progress", "train.max_val_batches",
               "train.on_nonfinite", "train.keep_checkpoints", "train.retain_host_memory", "compare")
RESUME_WARN = {
    "seed": "the data order from here on follows the new seed (the random state is the checkpoint's)",
    "train.amp": "autocast changes from the checkpoint's iteration on",
    "train.iterations": "training goes on to the new length; the LR schedule continues and a sparsity ramp "
                        "(prune.ramp_start/ramp_end) is placed on the new length",
    "prune.target_sparsity": "pruning aims at the new target from here on, and checkpoints are selected at it",
}


def flatten_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, str]]:
    """(key, "key: old -> new") for every setting that differs between two config dicts and shapes what a run
    computes (the RESUME_FREE ones do not)."""
    old = flatten_config(old if isinstance(old, dict) else {})
    new = flatten_config(new if isinstance(new, dict) else {})
    return [(k, f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}") for k in sorted(set(old) | set(new))
            if (k not in old or k not in new or old[k] != new[k])
            and k not in RESUME_FREE and k.split(".")[0] not in RESUME_FREE]


def resume_changes(saved: dict, now: Config) -> tuple[list[str], list[str]]:
    """(refused, warned): the settings of `now` that differ from a checkpoint's config `saved`, as
    "key: old -> new" lines (warned ones with what happens)."""
    refused, warned = [], []
    for key, change in config_changes(saved, now.to_dict()):
        if key in RESUME_WARN:
            warned.append(f"{change} ({RESUME_WARN[key]})")
        else:
            refused.append(change)
    return refused, warned
