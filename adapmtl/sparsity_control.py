"""Target-sparsity control for soft-threshold pruning (docs/sparsity_control.md explains the design).

`TargetSparsity` is the public object for any training loop; the trainer's `prune.control=controlled` uses
the same object (adapmtl/baselines/adapmtl_method.py), and both decide through `SparsityController`.

The paper's trainer sets the final sparsity only indirectly (s0, weight decay, schedule and length);
`prune.control=controlled` makes the *overall* sparsity follow a required-sparsity schedule instead:

- schedule: the cubic ramp of gradual magnitude pruning (Zhu & Gupta 2017) from the sparsity measured
  when the ramp starts to `prune.target_sparsity` when it ends, then the target;
- feedback: after every optimizer step every threshold parameter gets the same additive push,
  `gain * (schedule(t + 1) - sparsity(t)) / G`, so the overall level follows the schedule while the
  differences between the thresholds (the backbone/head split) stay what learning made them. G, the
  plant gain d sparsity / d s, is measured on the way (secants of the sparsity against the weighted
  mean threshold parameter, over the ramp): it falls from ~0.4 in the bulk of a weight distribution
  to ~0.05 in its tail (sparsity 0.99), and a fixed gain would be either too slow there or unstable
  in the bulk. The estimate is never taken below half the gain of Laplace-distributed weights;
- hold: after the ramp the thresholds' own updates stop (the cap: the split is final) and the push
  alone keeps the overall sparsity on the target, with an integral term against steady drifts.

The controller is plain host arithmetic on two floats per step (the all-reduced overall sparsity from
the kernels' non-zero counts and the weighted mean threshold parameter), so every DDP rank takes the
same decision and its whole state fits in the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapmtl.distributed import all_reduce_mean
from adapmtl.sparsify import live_sparsity, pruned_weights, threshold_parameters

MAX_PUSH = 0.5  # s units per step: bounds one step's change of every threshold to a factor e^0.5
G_RANGE = (1e-3, 2.0)  # the plant-gain estimate is kept in this range
# The hold adds an integral term, INTEGRAL * error / G per step, so that a steady drift (the weights shrinking
# under weight decay, or Adam's jitter of pruned weights around zero) leaves no offset: with the loop gain 0.5
# both closed-loop poles are real (no oscillation) for a plant gain from 0.5x to several times the estimate.
# It integrates only while the error is within INTEGRAL_BAND, so the approach to the target cannot wind it up.
INTEGRAL = 0.03
INTEGRAL_BAND = 0.01
G_INITIAL = 1.0  # before the first measurement: an upper bound for common weight distributions (safe side)
SECANT = 0.05  # the mean threshold parameter must move this far for a new plant-gain measurement


def plant_gain_floor(sparsity: float) -> float:
    """A lower bound on d sparsity / d s the estimate is never allowed under: half that of Laplace-distributed
    weights, -(1-S) ln(1-S), or S near 0 (where it holds for any weight density that is finite at 0).
    A secant can come out too low when the weights' own drift cancels the thresholds' move (the controller
    holding the level against it), and a too-low estimate is what would make the loop oscillate."""
    if sparsity <= 0.0 or sparsity >= 1.0:
        return G_RANGE[0]
    return max(G_RANGE[0], 0.5 * min(sparsity, -(1.0 - sparsity) * math.log1p(-sparsity)))


@dataclass
class ControlStep:
    """What the controller decided for one iteration."""

    phase: str  # "warmup" (before the ramp), "ramp" or "hold"
    schedule: float | None  # the required sparsity at this iteration (None in warmup)
    error: float  # schedule(t + 1) - measured sparsity (0 in warmup)
    push: float  # added to every threshold parameter after this step's optimizer update
    freeze: bool  # drop the thresholds' own gradients this step (no learned update, no moments)


class SparsityController:
    """Drive the overall sparsity of a soft-threshold model along a cubic ramp to `target`.

    Args:
        target: the overall sparsity to reach, in (0, 1).
        iterations: the run's length; the ramp runs over iterations [start, end).
        ramp_start, ramp_end: fractions of `iterations` (0 <= ramp_start < ramp_end <= 1).
        gain: the loop gain, the fraction of the error one step removes (with the plant gain measured
            right); in (0, 1] the sparsity approaches the schedule without overshoot even where the
            measured plant gain is off by a factor 1/gain.
    """

    def __init__(self, target: float, iterations: int, ramp_start: float = 0.0, ramp_end: float = 0.7,
                 gain: float = 0.5):
        if not 0.0 < target < 1.0:
            raise ValueError(f"SparsityController: target must be in (0, 1), got {target!r}")
        if not 0.0 <= ramp_start < ramp_end <= 1.0:
            raise ValueError(f"SparsityController: need 0 <= ramp_start < ramp_end <= 1, got {ramp_start!r}, {ramp_end!r}")
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"SparsityController: gain must be a finite number > 0, got {gain!r}")
        self.target, self.gain = float(target), float(gain)
        self.start = int(round(ramp_start * iterations))
        self.end = max(self.start + 1, int(round(ramp_end * iterations)))
        self.start_sparsity: float | None = None  # measured at the first ramp step
        self.plant_gain = G_INITIAL
        self.integral = 0.0  # the hold's integral term (threshold units per step)
        self.anchor: tuple[float, float] | None = None  # (mean s, sparsity) where the current secant starts
        self.shift = 0.0  # sum of every push so far (logged: how far the controller moved the thresholds)

    def phase(self, t: int) -> str:
        return "warmup" if t < self.start else "ramp" if t < self.end else "hold"

    def schedule(self, t: int) -> float | None:
        """The required overall sparsity at iteration t (None before the ramp has started)."""
        if t < self.start or self.start_sparsity is None:
            return None
        p = min(1.0, (t - self.start) / (self.end - self.start))
        return self.target + (self.start_sparsity - self.target) * (1.0 - p) ** 3

    def step(self, t: int, sparsity: float, mean_s: float) -> ControlStep:
        """Decide iteration t from the overall sparsity its forward pass measured and the mean threshold
        parameter it used (weighted by the number of weights each threshold prunes)."""
        phase = self.phase(t)
        if phase == "warmup":
            return ControlStep(phase, None, 0.0, 0.0, False)
        if self.start_sparsity is None:  # the ramp starts from wherever learning has brought the model
            self.start_sparsity = float(sparsity)
        if phase == "ramp":  # in the hold the pushes are too small against the weights' own drift
            self._measure(sparsity, mean_s)
        error = self.schedule(t + 1) - sparsity  # the push acts on the next forward
        g = max(self.plant_gain, plant_gain_floor(sparsity))
        if phase == "hold" and abs(error) < INTEGRAL_BAND:
            # bounded like the push it feeds: beyond that it only winds up (and the checkpoint refuses it)
            self.integral = max(-MAX_PUSH, min(MAX_PUSH, self.integral + INTEGRAL * (self.gain / 0.5) ** 2 * error / g))
        push = max(-MAX_PUSH, min(MAX_PUSH, self.gain * error / g + self.integral))
        self.shift += push
        return ControlStep(phase, self.schedule(t), error, push, phase == "hold")

    def _measure(self, sparsity: float, mean_s: float) -> None:
        if self.anchor is None:
            self.anchor = (mean_s, sparsity)
            return
        ds = mean_s - self.anchor[0]
        if abs(ds) < SECANT:
            return
        slope = (sparsity - self.anchor[1]) / ds
        if slope > 0:  # else the weights' drift outweighed the thresholds' move: no information
            self.plant_gain = min(G_RANGE[1], max(G_RANGE[0], slope))
        self.anchor = (mean_s, sparsity)

    def state_dict(self) -> dict:
        return {"start_sparsity": self.start_sparsity, "plant_gain": self.plant_gain, "integral": self.integral,
                "anchor": None if self.anchor is None else list(self.anchor), "shift": self.shift}

    def load_state_dict(self, state: dict) -> None:
        def number(key, value, lo=-math.inf, hi=math.inf):
            if not (isinstance(value, float) and lo <= value <= hi):
                raise ValueError(f"SparsityController: state {key!r} must be a float in [{lo}, {hi}], got {value!r}")
            return value

        start, anchor = state.get("start_sparsity"), state.get("anchor")
        if start is not None:
            start = number("start_sparsity", start, 0.0, 1.0)
        if anchor is not None:
            if not (isinstance(anchor, list) and len(anchor) == 2):
                raise ValueError(f"SparsityController: state 'anchor' must be None or [mean_s, sparsity], got {anchor!r}")
            anchor = (number("anchor", anchor[0], -1e6, 1e6), number("anchor", anchor[1], 0.0, 1.0))
        self.plant_gain = number("plant_gain", state.get("plant_gain"), *G_RANGE)
        self.shift = number("shift", state.get("shift"), -1e9, 1e9)
        self.integral = number("integral", state.get("integral"), -MAX_PUSH, MAX_PUSH)
        self.start_sparsity, self.anchor = start, anchor


class TargetSparsity:
    """Drive a sparsified model's overall sparsity to `target` in your own training loop.

        adapmtl.sparsify(model)                       # default init=-15: nothing pruned yet
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        ctl = adapmtl.TargetSparsity(model, optimizer, target=0.9, total_steps=N)
        for x, y in data:                             # N optimizer steps
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()   # nothing else to call

    The overall sparsity (all thresholds together, weighted by the weights each prunes) follows a cubic ramp
    from wherever the model is when the ramp starts (`ramp_start` x N steps) to `target` at `ramp_end` x N,
    then holds it: after every optimizer step each threshold gets the same push, so their differences (the
    split between components) stay what learning made them; in the hold the thresholds' own updates stop.
    Measured from the kernels' non-zero counts of the step's forward pass (no extra pass over the weights;
    all-reduced under DDP so every rank decides the same). It hooks `optimizer.step` (`hook=False`: call
    `before_optimizer_step()` and `after_optimizer_step()` around it yourself, as the trainer does).

    The thresholds need a parameter group without weight decay (decay would push them against the
    controller): if the optimizer has them in a group with decay, they are moved, before the first step, into a
    group of their own with the same settings and `weight_decay=0`. `state_dict()` / `load_state_dict()`
    resume it exactly.

    Args:
        model: a model converted by `adapmtl.sparsify` (any mode).
        optimizer: the optimizer that updates the model's thresholds (None: no hooks, no group check).
        target: the overall sparsity to reach, in (0, 1).
        total_steps: optimizer steps of the run (the ramp is placed within them).
        ramp_start, ramp_end, gain: see `SparsityController`.
        hook: register the optimizer hooks.
    """

    def __init__(self, model, optimizer=None, *, target: float, total_steps: int, ramp_start: float = 0.0,
                 ramp_end: float = 0.7, gain: float = 0.5, hook: bool = True):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"TargetSparsity: argument 'total_steps' must be a positive int, got {total_steps!r}")
        units = pruned_weights(model)
        if not units:
            raise ValueError("TargetSparsity: the model has no soft-thresholded weights; call adapmtl.sparsify(model) "
                             "first")
        self.model = model
        self.controller = SparsityController(target, total_steps, ramp_start, ramp_end, gain)
        self.thresholds = threshold_parameters(model)
        counts = {id(s): 0 for s in self.thresholds}
        for p in units:
            counts[id(p.unit.s)] += p.numel
        total = sum(counts.values())
        self.shares = torch.tensor([counts[id(s)] / total for s in self.thresholds], dtype=torch.float64)
        self.step_count = 0
        self.last: ControlStep | None = None
        self._handles = []
        if optimizer is not None:
            _thresholds_without_decay(optimizer, self.thresholds)
            if hook:
                self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                                 optimizer.register_step_post_hook(self._post_hook)]

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        self.before_optimizer_step()

    def _post_hook(self, optimizer, args, kwargs) -> None:
        self.after_optimizer_step()

    def before_optimizer_step(self, step: int | None = None) -> ControlStep:
        """Decide this step from its forward pass's sparsity; in the hold, drop the thresholds' gradients (the
        optimizer then leaves them alone). `step` defaults to the count of steps taken."""
        t = self.step_count if step is None else int(step)
        overall = live_sparsity(self.model).overall
        if self.shares.device != overall.device:  # once: the model may move after construction
            self.shares = self.shares.to(overall.device)
        mean_s = (torch.stack([s.detach() for s in self.thresholds]).double() * self.shares).sum()
        overall, mean_s = all_reduce_mean(torch.stack([overall, mean_s])).tolist()
        self.last = self.controller.step(t, overall, mean_s)
        self.step_count = t
        if self.last.freeze:
            for s in self.thresholds:
                s.grad = None  # optimizers skip a parameter without grad: no update, no decay, no moments
        return self.last

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Push every threshold by this step's decision."""
        if self.last is None:
            raise RuntimeError("TargetSparsity: after_optimizer_step() before before_optimizer_step()")
        if self.last.push != 0.0:
            for s in self.thresholds:
                s.add_(self.last.push)
        self.step_count += 1

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        step = state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"TargetSparsity: state 'step' must be an int >= 0, got {step!r}")
        self.controller.load_state_dict(state["controller"])
        self.step_count = step


def _thresholds_without_decay(optimizer, thresholds) -> None:
    """Check that `optimizer` updates every threshold, and move those in a group with weight decay into a group
    of their own without it."""
    where = {}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            where[id(p)] = i
    missing = [s for s in thresholds if id(s) not in where]
    if missing:
        raise ValueError(f"TargetSparsity: the optimizer does not update {len(missing)} of the model's "
                         f"{len(thresholds)} thresholds; build it after adapmtl.sparsify(model), from model.parameters()")
    decayed = [s for s in thresholds if optimizer.param_groups[where[id(s)]].get("weight_decay", 0.0)]
    if not decayed:
        return
    if any(s in optimizer.state for s in decayed):
        raise ValueError("TargetSparsity: the thresholds are in a parameter group with weight decay and the optimizer "
                         "has already stepped; give them a group with weight_decay=0 (adapmtl.threshold_parameters)")
    ids = {id(s) for s in decayed}
    settings = {}
    for s in decayed:
        group = optimizer.param_groups[where[id(s)]]
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        settings = {k: v for k, v in group.items() if k != "params"}
    optimizer.add_param_group({**settings, "params": decayed, "weight_decay": 0.0})
