"""Adaptive task-loss weights (SPEC §3).

From iteration `start` on, each task keeps the last `window` values of
`d_t(i) = |L_t(i-1) - L_t(i)| / L_t(i)`; once the window is full `w_t = mean(window)`, before that
`w_t = 1`; every iteration the weights are normalised to sum to T. The history is a ring buffer on
the losses' device, so updating it never synchronises with the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-12


class AdaptiveLossWeights:
    def __init__(self, tasks, start: int = 5000, window: int = 500, normalize: bool = True,
                 enabled: bool = True, priorities: dict | None = None):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("AdaptiveLossWeights: argument 'tasks' is empty")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"AdaptiveLossWeights: argument 'window' must be an int >= 1, got {window!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"AdaptiveLossWeights: argument 'start' must be an int >= 0, got {start!r}")
        unknown = sorted(set(priorities or {}) - set(self.tasks))
        if unknown:
            raise ValueError(f"AdaptiveLossWeights: priorities for unknown tasks {unknown}; tasks are {self.tasks}")
        self.start, self.window, self.normalize, self.enabled = start, window, normalize, enabled
        self.priorities = torch.tensor([float((priorities or {}).get(t, 1.0)) for t in self.tasks], dtype=torch.float64)
        self.history = torch.zeros(len(self.tasks), window, dtype=torch.float64)
        self.prev = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.count = 0  # d values stored (python int: the schedule is known without reading the device)
        self.has_prev = False

    def to(self, device) -> "AdaptiveLossWeights":
        self.history, self.prev, self.priorities = (t.to(device) for t in (self.history, self.prev, self.priorities))
        return self

    def weights(self) -> Tensor:
        """w_t (float64, one per task, no gradient), normalised to sum to T when enabled."""
        T = len(self.tasks)
        if not self.enabled or self.count < self.window:
            return torch.ones(T, dtype=torch.float64, device=self.history.device)
        w = self.history.mean(dim=1)
        if self.normalize:
            w = w * (T / w.sum().clamp_min(_EPS))
        return w

    def combined(self) -> Tensor:
        """p_t * w_t: the factor of each task's loss in the total."""
        return self.priorities * self.weights()

    def update(self, iteration: int, losses: Tensor) -> None:
        """Record the (detached, all-reduced under DDP) per-task losses of `iteration`."""
        losses = losses.detach().to(self.history.device, torch.float64)
        if self.enabled and iteration >= self.start and self.has_prev:
            d = (self.prev - losses).abs() / losses.clamp_min(_EPS)
            self.history[:, self.count % self.window] = d
            self.count += 1
        self.prev = losses.clone()
        self.has_prev = True

    def state_dict(self) -> dict:
        return {"tasks": list(self.tasks), "history": self.history.cpu(), "prev": self.prev.cpu(),
                "count": self.count, "has_prev": self.has_prev}

    def load_state_dict(self, state: dict) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"AdaptiveLossWeights: checkpoint tasks {state['tasks']} differ from {self.tasks}")
        if state["history"].shape != self.history.shape:
            raise ValueError("AdaptiveLossWeights: checkpoint window size differs from the configured one")
        device = self.history.device
        self.history = state["history"].to(device, torch.float64)
        self.prev = state["prev"].to(device, torch.float64)
        self.count, self.has_prev = int(state["count"]), bool(state["has_prev"])
