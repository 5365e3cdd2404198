"""Checkpoint rotation and resume (the last few kept, the newest good one loaded) and RNG state for exact
resume. The file format itself: adapmtl.checkpoint_io."""
from __future__ import annotations

import glob
import os
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from adapmtl.baselines import build_method
from adapmtl.checkpoint_io import TMP_PREFIX, CheckpointError, atomic_save, load_checkpoint_file, read_header

__all__ = ["CheckpointError", "TrainedModel", "atomic_save", "load_checkpoint_file", "load_newest_good", "load_trained",
           "read_header", "remove_orphan_temps", "rng_state", "save_rotating", "set_rng_state"]


# ---------------------------------------------------------------------------------------------- trained models
@dataclass
class TrainedModel:
    """A model as it was trained: `model` (STR layers and thresholds for the soft-threshold methods, in eval
    mode), the run's `config`, its `method` and the `iteration` the checkpoint was written at."""

    model: torch.nn.Module
    config: object  # adapmtl.train.Config
    method: str
    iteration: int
    data_from_config: bool = True  # False: the run trained on datasets given to the Trainer, not the config's


def load_trained(path: str, map_location="cpu") -> TrainedModel:
    """The model of a trainer checkpoint (`runs/<run>/latest.pt` or `best.pt`), rebuilt from the checkpoint's
    config, converted the way its method trained it and loaded (checksum verified)."""
    from adapmtl.train.build import build_model_from_config
    from adapmtl.train.config import config_from_dict

    state = load_checkpoint_file(path, map_location="cpu")
    missing = [k for k in ("config", "model") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not an adapmtl trainer checkpoint (no {missing} entries)")
    source = state.get("model_source", "config")
    if source != "config":
        raise CheckpointError(f"{path}: its model ({source}) was given to Trainer(model=...), not built from the "
                              "config, so it cannot be rebuilt from the checkpoint; build it, convert it as the run "
                              "did (adapmtl.sparsify for the soft-threshold methods) and load_state_dict("
                              "adapmtl.train.load_checkpoint_file(path)['model'])")
    cfg = config_from_dict(state["config"])
    model = build_model_from_config(cfg)
    build_method(cfg).prepare_model(model)
    model.load_state_dict(state["model"])
    return TrainedModel(model.to(map_location).eval(), cfg, cfg.method, int(state.get("iteration", -1)),
                        state.get("data_source", "config") == "config")

# ---------------------------------------------------------------------------------------------- rotation
_ROTATED = re.compile(r"^latest-(\d+)\.pt$")


def rotated_path(directory: str, iteration: int) -> str:
    return os.path.join(directory, f"latest-{iteration:08d}.pt")


def save_rotating(obj, directory: str, iteration: int, keep: int) -> str:
    """Write `latest.pt`; the previous `latest.pt` becomes `latest-<its iteration>.pt`, and only the newest
    `keep - 1` of those stay. A crash at any point leaves at least one complete checkpoint."""
    latest = os.path.join(directory, "latest.pt")

    def rotate():  # once the new file is complete: a failed write (a full disk) leaves latest.pt where it was
        if keep > 1 and os.path.isfile(latest):
            try:
                _, previous = read_header(latest)
            except (CheckpointError, OSError):
                previous = None  # a bad latest.pt is not worth keeping
            if previous is not None and previous >= 0 and previous != iteration:
                os.replace(latest, rotated_path(directory, previous))

    atomic_save(obj, latest, iteration, before_replace=rotate)
    older = sorted(rotated_checkpoints(directory), key=lambda p: -p[0])
    for _, path in older[max(keep - 1, 0):]:
        os.unlink(path)
    return latest


def rotated_checkpoints(directory: str) -> list[tuple[int, str]]:
    out = []
    for path in glob.glob(os.path.join(glob.escape(directory), "latest-*.pt")):
        m = _ROTATED.match(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return out


def load_newest_good(path: str, map_location="cpu") -> tuple[dict, str]:
    """Load `path` (a `latest.pt`), or, if it is missing or fails verification, the newest good rotated
    checkpoint beside it, warning with both names. CheckpointError (naming every file tried) if none loads."""
    directory = os.path.dirname(os.path.abspath(path))
    candidates = [path] + [p for _, p in sorted(rotated_checkpoints(directory), key=lambda p: -p[0])]
    failures = []
    for candidate in candidates:
        if not os.path.isfile(candidate):
            failures.append(f"{candidate}: missing")
            continue
        try:
            state = load_checkpoint_file(candidate, map_location)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            warnings.warn(f"resume: {failures[0]}; resuming from {candidate!r} (iteration {state.get('iteration')}) "
                          "instead", RuntimeWarning, stacklevel=2)
        return state, candidate
    raise CheckpointError("resume: no checkpoint could be loaded: " + "; ".join(failures))


def remove_orphan_temps(directory: str) -> list[str]:
    """Delete the temp files of writes that a kill interrupted (they are never valid checkpoints)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _py_state_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_py_state_from_tensor(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_tensor(st) -> dict:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss)}


def _py_state_from_tensor(d):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])
