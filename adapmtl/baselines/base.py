"""The "method" interface shared by AdapMTL, its ablations and the pruning baselines.

The trainer calls the hooks in this order: `setup(model)` (converts the model with `prepare_model`; before
the optimizer exists), `on_train_start` (fresh runs only, never on resume), then per iteration
`before_iteration`, forward/backward, `after_backward`, optimizer step, `after_step`. `param_groups`
is asked once, after `setup`, for the optimizer.
`state_dict` / `load_state_dict` carry whatever the method needs for exact resume.
"""
from __future__ import annotations


class Method:
    name = "dense"
    prunes = False  # whether the run must reach the target sparsity (best-checkpoint eligibility)
    adaptive_weights = False  # the paper's baselines sum their task losses (loss_weights.adaptive overrides)

    def __init__(self, cfg):
        self.cfg = cfg  # the full run Config

    def prepare_model(self, model) -> None:
        """Convert the model the way this method trains it (in place; nothing for mask methods)."""

    def setup(self, model) -> None:
        self.prepare_model(model)

    def on_train_start(self, trainer) -> None:
        pass

    def param_groups(self, model) -> list[dict]:
        """The optimizer's parameter groups (settings not given here come from cfg.optim)."""
        return [{"params": list(model.parameters())}]

    def before_iteration(self, trainer, it: int, batch: dict) -> None:
        pass

    def after_backward(self, trainer, it: int) -> dict:
        """Returns scalars to log (e.g. whether the sparsity cap fired)."""
        return {}

    def after_step(self, trainer, it: int) -> None:
        pass

    def log_scalars(self) -> dict:
        """The method's state at the latest step, logged with the training scalars."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DenseMethod(Method):
    """No pruning: the dense reference every ΔT is measured against."""

    name = "dense"
