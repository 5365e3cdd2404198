"""The training loop shared by AdapMTL, its ablations and the pruning baselines (SPEC §3, §7).

One iteration: method.before_iteration -> forward (optional autocast) -> per-task losses ->
Σ_t p_t w_t L_t -> backward -> method.after_backward (AdapMTL: sparsity controller or the paper's cap;
masks: grad masks) -> Adam step -> StepLR step -> method.after_step -> adaptive weights update.

Data order is a pure function of (seed, iteration) and every RNG is checkpointed, so a run resumed
from `latest.pt` continues bit for bit as if it had never stopped (with `data.num_workers: 0`; with
workers, the order of samples is still exact but augmentation draws restart per resume).
"""
from __future__ import annotations

import glob
import json
import math
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import adapmtl
from adapmtl.baselines import Method, build_method
from adapmtl.checkpoint_io import write_json_atomic
from adapmtl.metrics import safe_delta_t
from adapmtl import distributed as D
from adapmtl.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint_file,
    load_newest_good,
    read_header,
    remove_orphan_temps,
    rng_state,
    save_rotating,
    set_rng_state,
)
from adapmtl.train.config import Config, resume_changes, save_config
from adapmtl.train.host_memory import retain_freed_memory
from adapmtl.train.logging import RunLogger
from adapmtl.train.loss_weights import AdaptiveLossWeights
from adapmtl.train.run_guard import OutDirLock, StopSignals, TrainingInterrupted, check_free_space

_DATA_EPOCH_SCORES = 1 << 30  # data-order "epoch" reserved for SNIP/DiSparse scoring batches


class NonFiniteLossError(ValueError):
    """Training produced a NaN/inf loss (train.on_nonfinite=stop); the checkpoints on disk are the last good ones."""


def delta_t_miou(cfg: Config) -> str:
    """The segmentation mIoU that ΔT sums for this run (train.delta_t_miou, "auto" resolved)."""
    if cfg.train.delta_t_miou != "auto":
        return cfg.train.delta_t_miou
    return "mIoU_all" if cfg.data.dataset == "synthetic" else "mIoU"


def delta_t_directions(cfg: Config, tasks) -> dict:
    """{task: {metric: lower_is_better}} that ΔT of a run of cfg sums over `tasks` (names or TaskSpecs)."""
    from adapmtl.metrics import directions
    return directions(tasks, miou=delta_t_miou(cfg))


def _any_rank(flag: bool, device) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer)."""
    if not D.is_dist():
        return flag
    return bool(D.all_reduce_mean(torch.tensor([float(flag)], dtype=torch.float64, device=device)).item() > 0)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches of one epoch for one rank: a seeded permutation, split across ranks, full batches."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (1 << 63))
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = n // world
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(per_rank // batch_size)]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


class Trainer:
    """Train one method on one dataset.

    Args:
        cfg: the run Config.
        model: a multitask model (`forward(x) -> {task: out}`, ideally `.components()`); default: built
            from cfg.model.
        train_set, val_set, test_set: datasets of sample dicts; default: built from cfg.data.
        criterion: `(preds, batch) -> {task: loss}`; default `adapmtl.losses.MultiTaskLoss`.
        metrics_factory: `() -> accumulator` with update(preds, batch) / compute() / reset();
            default `adapmtl.metrics.MultiTaskMetrics`.
        directions: {task: {metric: lower_is_better}} for ΔT; default `adapmtl.metrics.directions`.
        method: how the run trains and prunes (an `adapmtl.baselines.Method`); default: the one cfg.method names.
    """

    def __init__(self, cfg: Config, model: nn.Module | None = None, train_set=None, val_set=None, test_set=None,
                 criterion=None, metrics_factory=None, directions=None, collate_fn=None, method: Method | None = None):
        if not isinstance(cfg, Config):
            raise TypeError(f"Trainer: argument 'cfg' must be an adapmtl.train.Config, got {type(cfg).__name__}")
        self.cfg = cfg.validate()
        self._setup_process()
        class_weights = self._setup_data(train_set, val_set, test_set, collate_fn)
        self._setup_model(model, criterion, metrics_factory, directions, class_weights)
        self._setup_method(method)
        self._setup_optimization()
        self._setup_state()
        if cfg.train.resume:
            self._resume(cfg.train.resume)

    # ---------------------------------------------------------------- construction, in this order (the RNG draws)
    def _setup_process(self) -> None:
        """Distributed group, device, leftovers of interrupted writes, seeds."""
        cfg = self.cfg
        self.distributed = D.init_from_env(cfg.device if cfg.device != "auto" else
                                           ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world = D.rank(), D.world_size()
        self.device = _resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif cfg.train.retain_host_memory:
            retain_freed_memory()
        self.out_dir = cfg.out_dir
        seed_everything(cfg.seed, cfg.deterministic)

    def _setup_data(self, train_set, val_set, test_set, collate_fn):
        """The three splits (built from cfg.data unless all are given); returns the class weights, if any."""
        class_weights = None
        self.data_source = "config" if train_set is None and val_set is None and test_set is None else "given"
        if train_set is None or val_set is None or test_set is None:
            from adapmtl.train.build import build_datasets
            built = build_datasets(self.cfg)
            train_set = train_set or built["train"]
            val_set = val_set or built["val"]
            test_set = test_set or built["test"]
            class_weights = built.get("class_weights")
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        if collate_fn is None:
            from adapmtl.data import collate_multitask as collate_fn
        self.collate_fn = collate_fn
        return class_weights

    def _setup_model(self, model, criterion, metrics_factory, directions, class_weights) -> None:
        """The model (built from cfg.model unless given), its tasks, loss, metrics and ΔT directions."""
        # Where the model came from, kept in every checkpoint: `load_trained` (and `adapmtl eval/export`) rebuild
        # a model only from the config, so they refuse a run whose model the config does not describe.
        self.model_source = "config"
        if model is None:
            from adapmtl.train.build import build_model_from_config
            model = build_model_from_config(self.cfg)
        else:
            self.model_source = f"{type(model).__module__}.{type(model).__qualname__}"
        self.model = model
        self.tasks = list(getattr(model, "tasks", None) or self.cfg.data.tasks or [])
        if not self.tasks:
            raise ValueError("Trainer: cannot tell the model's tasks (give the model a .tasks list)")
        specs = getattr(model, "task_specs", None)
        task_list = list(specs.values()) if specs else self.tasks
        if criterion is None:
            from adapmtl.losses import MultiTaskLoss
            criterion = MultiTaskLoss(task_list, class_weights=class_weights)
        self.criterion = criterion
        if metrics_factory is None:
            from adapmtl.metrics import MultiTaskMetrics
            metrics_factory = lambda: MultiTaskMetrics(task_list, class_weights=class_weights)  # noqa: E731
        self.metrics_factory = metrics_factory
        self.directions = directions if directions is not None else delta_t_directions(self.cfg, task_list)

    def _setup_method(self, method) -> None:
        """From-dense weights, then the method converts the model; device and DDP wrapper."""
        if self.cfg.model.init_from:  # from-dense start: the thresholds then start at s0 (sparsify's init)
            from adapmtl.models import load_checkpoint
            load_checkpoint(self.model, os.path.expanduser(self.cfg.model.init_from))
        self.method = build_method(self.cfg) if method is None else method
        if adapmtl.pruned_weights(self.model) and type(self.method).prepare_model is not Method.prepare_model:
            raise ValueError(f"Trainer: the model given is already sparsified; give it dense: method "
                             f"{self.cfg.method!r} converts it itself (prune.s0, prune.grad, prune.backend)")
        self.method.setup(self.model)
        self.model.to(self.device)
        self.forward_model = self.model
        if self.distributed:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _setup_optimization(self) -> None:
        """Adam, StepLR, autocast and grad scaler, task loss weights."""
        cfg, o = self.cfg, self.cfg.optim
        # coupled L2 decay (Adam's weight_decay, not AdamW); the method may give its thresholds their own group
        self.optimizer = torch.optim.Adam(self.method.param_groups(self.model), lr=o.lr, betas=tuple(o.betas),
                                          weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=o.step_size, gamma=o.gamma)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        lw = cfg.loss_weights
        adaptive = self.method.adaptive_weights if lw.adaptive is None else lw.adaptive
        self.loss_weights = AdaptiveLossWeights(self.tasks, lw.start, lw.window, lw.normalize, enabled=adaptive,
                                                priorities=lw.priorities).to(self.device)

    def _setup_state(self) -> None:
        """Counters, selection state, the dense reference, batches per epoch."""
        cfg = self.cfg
        self.iteration = 0
        self.best_score = -math.inf
        self.best_iteration = None
        self.score_window = []  # select=last_mean: {"iteration", "val", "val_loss", "test", "test_loss", "sparsity"}
        self.dense_results = None
        if cfg.train.dense_results:
            with open(os.path.expanduser(cfg.train.dense_results)) as fh:
                self.dense_results = json.load(fh)
        self.bpe = len(batch_indices(len(self.train_set), cfg.data.batch_size, cfg.seed, 0, self.rank, self.world))
        if self.bpe == 0:
            raise ValueError(f"Trainer: the train split ({len(self.train_set)} samples over {self.world} ranks) is "
                             f"smaller than data.batch_size={cfg.data.batch_size}")
        self.resumed = False
        self.skipped_steps = 0

    def _resume(self, path: str) -> None:
        """train.resume: a checkpoint path, or "auto" (out_dir/latest.pt or a rotated one, when there is one)."""
        if path == "auto":
            path = os.path.join(self.out_dir, "latest.pt")
            has_any = os.path.isfile(path) or glob.glob(os.path.join(glob.escape(self.out_dir), "latest-*.pt"))
            path = path if has_any else None
        if path:
            self.load(path)

    # ---------------------------------------------------------------- data
    def _loader(self, dataset, batches, generator_seed: int) -> DataLoader:
        # A dedicated generator: creating a loader never draws from the global RNG (exact resume).
        g = torch.Generator().manual_seed(generator_seed % (1 << 63))
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                          num_workers=self.cfg.data.num_workers, generator=g)

    def _train_batches(self, start_it: int):
        it = start_it
        while True:
            epoch, pos = divmod(it, self.bpe)
            batches = batch_indices(len(self.train_set), self.cfg.data.batch_size, self.cfg.seed, epoch,
                                    self.rank, self.world)[pos:]
            for batch in self._loader(self.train_set, batches, self.cfg.seed * 7919 + it):
                yield batch
                it += 1

    def sample_batches(self, n: int) -> list[dict]:
        """n training batches (for importance scores at init), on the device."""
        batches = batch_indices(len(self.train_set), self.cfg.data.batch_size, self.cfg.seed, _DATA_EPOCH_SCORES,
                                self.rank, self.world)
        batches = (batches * (n // max(len(batches), 1) + 1))[:n]
        return [_to_device(b, self.device) for b in self._loader(self.train_set, batches, self.cfg.seed)]

    def _eval_loader(self, dataset):
        n, bs = len(dataset), self.cfg.data.eval_batch_size
        batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        if self.cfg.train.max_val_batches:
            batches = batches[:self.cfg.train.max_val_batches]
        return self._loader(dataset, batches, 0)

    # ---------------------------------------------------------------- steps
    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def compute_losses(self, batch: dict, model: nn.Module | None = None) -> dict:
        batch = _to_device(batch, self.device)
        with self.autocast():
            preds = (model or self.forward_model)(batch["image"])
        preds = {t: p.float() for t, p in preds.items()}
        return self.criterion(preds, batch)

    def train_step(self, batch: dict) -> dict:
        it = self.iteration
        batch = _to_device(batch, self.device)
        if it in self.cfg.optim.restarts:
            self.restart_optimization()
        self.method.before_iteration(self, it, batch)
        self.model.train()
        losses = self.compute_losses(batch)
        factors = self.loss_weights.combined()
        total = sum(factors[i].to(losses[t].dtype) * losses[t] for i, t in enumerate(self.tasks))
        self.optimizer.zero_grad(set_to_none=True)
        # One all-reduce gives the logged loss means and the finiteness of every rank's total, so all ranks
        # stop or skip together (a NaN anywhere makes the mean NaN).
        reduced = D.all_reduce_mean(torch.stack([losses[t].detach().double() for t in self.tasks]
                                                + [total.detach().double()]))
        loss_vec = reduced[:-1]
        if not bool(torch.isfinite(reduced).all()):
            if self.cfg.train.on_nonfinite == "stop":
                per_task = ", ".join(f"{t}={float(v):.4g}" for t, v in zip(self.tasks, loss_vec))
                raise NonFiniteLossError(
                    f"train: the loss is not finite at iteration {it + 1} ({per_task}); stopping. The checkpoints in "
                    f"{self.out_dir} are from before it (lower optim.lr, or set train.on_nonfinite=skip)")
            self.skipped_steps += 1  # skip: no update, the schedule and the data move on
            self.scheduler.step()
            self.iteration += 1
            return {"losses": loss_vec, "total": total.detach(), "factors": factors, "skipped": True}
        self.scaler.scale(total).backward()
        extra = self.method.after_backward(self, it)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.method.after_step(self, it)
        self.loss_weights.update(it, loss_vec)
        self.iteration += 1
        return {"losses": loss_vec, "total": total.detach(), "factors": factors, **extra}

    def restart_optimization(self, length: int | None = None) -> None:
        """Adam and the LR schedule from here on as in a new run: moments and step counts cleared, every group's
        lr back to its initial value, StepLR from its first step. `length`: the whole schedule compressed into
        that many iterations (step_size * length / train.iterations), for a method that replays it in a part of
        the budget (LTH's rounds). The scheduler's state (step size included) is in every checkpoint."""
        o = self.cfg.optim
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        step = o.step_size if length is None else max(1, round(o.step_size * length / self.cfg.train.iterations))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=step, gamma=o.gamma)

    # ---------------------------------------------------------------- sparsity
    def sparsity(self) -> dict:
        """{"overall", "components": {...}, "layers": {...}} as floats (host sync: for logging)."""
        if adapmtl.pruned_weights(self.model):
            return adapmtl.live_sparsity(self.model).fractions()
        return adapmtl.sparsity_report(self.model).fractions()

    def thresholds(self) -> dict:
        """g(s) of every threshold, by its name (the component's, or the layer's in per-layer mode)."""
        return {name: float(torch.sigmoid(g.s.detach().double()))
                for name, g in adapmtl.threshold_groups(self.model).items()}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, dataset) -> dict:
        """{"metrics": {task: {metric: v}}, "loss": {task: mean loss}} of the current model on a split."""
        model = self.model
        was = model.training
        model.eval()
        acc = self.metrics_factory()
        totals, count = {t: 0.0 for t in self.tasks}, 0
        for batch in self._eval_loader(dataset):
            batch = _to_device(batch, self.device)
            with self.autocast():
                preds = model(batch["image"])
            preds = {t: p.float() for t, p in preds.items()}
            for t, v in self.criterion(preds, batch).items():
                totals[t] += float(v)
            count += 1
            acc.update(preds, batch)
        model.train(was)
        return {"metrics": acc.compute(), "loss": {t: v / max(count, 1) for t, v in totals.items()}}

    def score(self, result: dict) -> tuple[float, dict]:
        mode = self.cfg.train.select
        if mode == "auto":
            mode = "delta_t" if self.dense_results else "val_loss"
        if mode == "delta_t":
            if not self.dense_results:
                raise ValueError("train.select=delta_t needs train.dense_results (a dense run's results.json)")
            per_task, dt, _ = safe_delta_t(result["metrics"], self.dense_results["val"], self.directions)
            return dt, {f"val/delta_t/{t}": v for t, v in per_task.items()} | {"val/delta_t": dt}
        if mode == "val_loss":
            return -sum(result["loss"].values()), {}
        return float(self.iteration), {}  # "last" / "last_mean": the latest checkpoint (and the ones before it)

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "loss_weights": self.loss_weights.state_dict(), "method": self.method.state_dict(),
            "method_name": self.cfg.method, "iteration": self.iteration, "rng": rng_state(),
            "best_score": self.best_score, "best_iteration": self.best_iteration, "score_window": self.score_window,
            "config": self.cfg.to_dict(), "model_source": self.model_source, "data_source": self.data_source,
        }

    def save(self, name: str = "latest.pt") -> str | None:
        """Write a checkpoint (rank 0). "latest.pt" rotates, keeping train.keep_checkpoints files to fall back
        to. Weights that are no longer finite are never written: the last good checkpoint stays."""
        names, params = zip(*self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in params]).tolist()  # one host sync
        bad = [n for n, ok in zip(names, finite) if not ok]
        if bad:
            raise NonFiniteLossError(f"train: parameter {bad[0]!r} (and {len(bad) - 1} more) is not finite at iteration "
                                     f"{self.iteration}; not writing {name}, the checkpoints in {self.out_dir} are the "
                                     "last good ones (lower optim.lr)")
        state = self.state()  # every rank builds it (collectives-free); rank 0 writes
        if not D.is_main():
            return None
        if name == "latest.pt":
            return save_rotating(state, self.out_dir, self.iteration, self.cfg.train.keep_checkpoints)
        path = os.path.join(self.out_dir, name)
        atomic_save(state, path, self.iteration)
        return path

    def load(self, path: str) -> None:
        """Resume from a checkpoint. For a `latest.pt`, a missing or corrupt file falls back to the newest good
        rotated one beside it (with a warning naming both)."""
        if os.path.basename(path) == "latest.pt":
            state, path = load_newest_good(path, map_location=self.device)
        else:
            state = load_checkpoint_file(path, map_location=self.device)
        missing = [k for k in ("model", "optimizer", "scheduler", "scaler", "loss_weights", "method", "iteration", "rng",
                               "best_score", "best_iteration") if k not in state]
        if missing:
            raise CheckpointError(f"resume: {path} is not a trainer checkpoint (missing {missing})")
        if state.get("method_name") != self.cfg.method:
            raise ValueError(f"resume: {path} was written by method {state.get('method_name')!r}, "
                             f"this run is {self.cfg.method!r}")
        refused, warned = resume_changes(state.get("config"), self.cfg)
        if refused:
            raise ValueError(f"resume: {path} was written with other settings that its state holds: "
                             f"{'; '.join(refused)}; resume with the checkpoint's values, or start a new run "
                             "(another out_dir, or train.resume=null)")
        for change in warned:
            warnings.warn(f"resume: {change}", UserWarning, stacklevel=3)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss_weights.load_state_dict(state["loss_weights"])
        self.method.load_state_dict(state["method"])
        if hasattr(self.method, "move_masks"):
            self.method.move_masks(self.device)
        self.iteration = int(state["iteration"])
        self.best_score, self.best_iteration = state["best_score"], state["best_iteration"]
        self.score_window = list(state.get("score_window") or [])  # checkpoints before last_mean existed: none
        set_rng_state(state["rng"])
        self.resumed = True
        self.resumed_from = path

    # ---------------------------------------------------------------- main loop
    def _log_scalars(self, out: dict) -> dict:
        s = {f"loss/{t}": float(v) for t, v in zip(self.tasks, out["losses"])}
        s["loss/total"] = float(out["total"])
        s.update({f"loss_weight/{t}": float(v) for t, v in zip(self.tasks, self.loss_weights.weights())})
        s["lr"] = self.optimizer.param_groups[0]["lr"]
        sp = self.sparsity()
        s["sparsity/overall"] = sp["overall"]
        s.update({f"sparsity/component/{k}": v for k, v in sp["components"].items()})
        s.update({f"sparsity/layer/{k}": v for k, v in sp["layers"].items()})
        if adapmtl.pruned_weights(self.model):
            s.update({f"threshold/{k}": v for k, v in self.thresholds().items()})
        if "cap" in out:
            s["cap"] = out["cap"]
        s.update(self.method.log_scalars())
        if self.skipped_steps:
            s["train/skipped_nonfinite_steps"] = float(self.skipped_steps)
        return s

    def _validate(self, logger: RunLogger) -> None:
        result = self.evaluate(self.val_set)
        score, extra = self.score(result)
        sp = adapmtl.sparsity_report(self.model).overall
        # matched sparsity (SPEC §7): within ± select_sparsity_tol of the target, on both sides
        eligible = (not self.method.prunes) or abs(sp - self.cfg.prune.target_sparsity) <= self.cfg.train.select_sparsity_tol
        scalars = {f"val/{t}/{m}": v for t, ms in result["metrics"].items() for m, v in ms.items()}
        scalars |= {f"val/loss/{t}": v for t, v in result["loss"].items()} | extra
        scalars |= {"val/score": score, "val/sparsity": sp, "val/eligible": float(eligible)}
        logger.log(self.iteration, scalars, kind="val")
        if self.cfg.train.select == "last_mean":
            self._record_window(result, sp)
            return
        # rank 0 decides: other ranks' BN running stats can differ by their last local batch
        if D.broadcast_object(bool(eligible and score > self.best_score)):
            self.best_score, self.best_iteration = score, self.iteration
            self.save("best.pt")

    def in_score_window(self, iteration: int) -> bool:
        """Whether a validation at `iteration` is one of the last train.score_window ones (select=last_mean)."""
        t = self.cfg.train
        return iteration >= t.iterations - (t.score_window - 1) * t.val_every

    def _record_window(self, val: dict, sparsity: float) -> None:
        """select=last_mean: keep this validation's val and test metrics when it is in the scoring window (test is
        evaluated there only to be averaged, never to choose anything)."""
        if not self.in_score_window(self.iteration) or any(e["iteration"] == self.iteration for e in self.score_window):
            return
        test = self.evaluate(self.test_set)
        self.score_window.append({"iteration": self.iteration, "val": val["metrics"], "val_loss": val["loss"],
                                  "test": test["metrics"], "test_loss": test["loss"], "sparsity": sparsity})

    def fit(self, stop_at: int | None = None) -> dict | None:
        """Train to cfg.train.iterations (or stop after `stop_at` iterations, saving latest.pt, for
        tests of resume), then evaluate the selected checkpoint on the test split. Returns the results
        dict (also written to out_dir/results.json) when the run finished.

        While it runs it holds out_dir (a second trainer there gets RunLockedError naming this one), and
        SIGTERM/SIGINT stop it after the current step with a checkpoint: TrainingInterrupted (a second signal
        stops it at once)."""
        main = D.is_main()
        os.makedirs(self.out_dir, exist_ok=True)
        with OutDirLock(self.out_dir) if main else nullcontext():
            if main:
                remove_orphan_temps(self.out_dir)  # writes a kill interrupted: never valid checkpoints
                check_free_space(self.out_dir, self.model, self.optimizer, self.cfg.train.keep_checkpoints + 1)
            with StopSignals() as stop:  # the training loop only: a signal during the final test acts as usual
                finished = self._train(stop_at, stop)
            return self.finish() if finished else None

    def _train(self, stop_at: int | None, stop: StopSignals) -> bool:
        """The training loop of fit(); whether it reached cfg.train.iterations."""
        cfg, main = self.cfg, D.is_main()
        if main:
            save_config(cfg, os.path.join(self.out_dir, "config.yaml"), model_source=self.model_source,
                        data_source=self.data_source)
        if not self.resumed:
            self.method.on_train_start(self)
        # On resume the logs are cut back to the checkpoint's iteration: the steps after it are re-run.
        logger = RunLogger(self.out_dir, tensorboard=cfg.train.tensorboard, enabled=main,
                           resume_step=self.iteration if self.resumed else None)
        end = cfg.train.iterations if stop_at is None else min(stop_at, cfg.train.iterations)
        bar = None
        if main and cfg.train.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.train.iterations, initial=self.iteration, desc=cfg.method, dynamic_ncols=True)
        data = self._train_batches(self.iteration)
        t0 = time.time()
        try:
            while self.iteration < end:
                out = self.train_step(next(data))
                it = self.iteration
                if it % cfg.train.log_every == 0 or it == cfg.train.iterations:
                    scalars = self._log_scalars(out)
                    scalars["time/s_per_iter"] = (time.time() - t0) / cfg.train.log_every
                    t0 = time.time()
                    logger.log(it, scalars)
                    if bar is not None:
                        bar.set_postfix(loss=f"{scalars['loss/total']:.4f}", sparsity=f"{scalars['sparsity/overall']:.3f}",
                                        lr=f"{scalars['lr']:.2e}")
                if bar is not None:
                    bar.update(1)
                if it % cfg.train.val_every == 0 or it == cfg.train.iterations:
                    self._validate(logger)
                # every rank stops at the same step when any rank got a signal
                stopping = _any_rank(stop.requested is not None, self.device)
                if it % cfg.train.ckpt_every == 0 or it == end or stopping:
                    path = self.save("latest.pt")
                if stopping:
                    name = signal.Signals(stop.requested or signal.SIGTERM).name
                    raise TrainingInterrupted(stop.requested or signal.SIGTERM,
                                              f"train: stopped on {name} after iteration {it}, checkpoint "
                                              f"{path or 'latest.pt'} written; resume with train.resume=auto")
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        return self.iteration >= cfg.train.iterations

    def finish(self) -> dict:
        """Test the selected checkpoint (best on val, else the final weights); write results, plots."""
        best_path = os.path.join(self.out_dir, "best.pt")
        D.barrier()
        selected = "final"
        if self.cfg.train.select == "last_mean":
            return self._finish_window()
        if self.best_iteration is not None and os.path.isfile(best_path):
            _, saved_at = read_header(best_path)
            if saved_at != self.best_iteration:  # only after a non-exact resume (data.num_workers > 0)
                raise CheckpointError(f"{best_path} holds iteration {saved_at}, but this run selected iteration "
                                      f"{self.best_iteration}; delete it and re-run from the last checkpoint")
            self.model.load_state_dict(load_checkpoint_file(best_path, self.device)["model"])
            selected = f"best@{self.best_iteration}"
        val = self.evaluate(self.val_set)
        test = self.evaluate(self.test_set)
        rep = adapmtl.sparsity_report(self.model)
        results = {
            "method": self.cfg.method, "selected": selected, "iterations": self.iteration,
            "target_sparsity": self.cfg.prune.target_sparsity if self.method.prunes else 0.0,
            "val": val["metrics"], "val_loss": val["loss"], "test": test["metrics"], "test_loss": test["loss"],
            "sparsity": rep.fractions(),
        }
        if self.dense_results:
            per_task, dt, skipped = safe_delta_t(test["metrics"], self.dense_results["test"], self.directions)
            results["delta_t_test"] = {"per_task": per_task, "mean": dt, "skipped_metrics": skipped}
        return self._write_results(results, rep)

    def _finish_window(self) -> dict:
        """select=last_mean: val and test are each metric's mean over the last train.score_window validations (the
        final weights' sparsity report; every window checkpoint's sparsity in "window")."""
        window = sorted(self.score_window, key=lambda e: e["iteration"])
        if not window or window[-1]["iteration"] != self.iteration:
            raise RuntimeError(f"train.select=last_mean: no validation at the final iteration {self.iteration} "
                               "was recorded (was the run resumed from a checkpoint of another selection rule?)")

        def mean(key):
            return {t: {m: sum(e[key][t][m] for e in window) / len(window) for m in ms}
                    for t, ms in window[-1][key].items()}

        rep = adapmtl.sparsity_report(self.model)
        results = {
            "method": self.cfg.method, "iterations": self.iteration,
            "selected": f"mean@{window[0]['iteration']}-{window[-1]['iteration']}x{len(window)}",
            "target_sparsity": self.cfg.prune.target_sparsity if self.method.prunes else 0.0,
            "val": mean("val"), "val_loss": {t: sum(e["val_loss"][t] for e in window) / len(window)
                                             for t in window[-1]["val_loss"]},
            "test": mean("test"), "test_loss": {t: sum(e["test_loss"][t] for e in window) / len(window)
                                                for t in window[-1]["test_loss"]},
            "sparsity": rep.fractions(),
            "window": [{"iteration": e["iteration"], "sparsity": e["sparsity"], "test": e["test"]} for e in window],
        }
        if self.dense_results:
            per_task, dt, skipped = safe_delta_t(results["test"], self.dense_results["test"], self.directions)
            results["delta_t_test"] = {"per_task": per_task, "mean": dt, "skipped_metrics": skipped}
        return self._write_results(results, rep)

    def _write_results(self, results: dict, rep) -> dict:
        if D.is_main():
            write_json_atomic(os.path.join(self.out_dir, "results.json"), results)  # `compare --reuse` reads it
            with open(os.path.join(self.out_dir, "sparsity.txt"), "w") as fh:
                fh.write(rep.table() + "\n")
            if self.cfg.train.plots:
                from adapmtl.train.plots import make_plots
                make_plots(self.out_dir, results["sparsity"]["layers"], results["target_sparsity"] or None)
        return results
