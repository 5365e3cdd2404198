"""File reading with errors that name the file and the dataset root; split handling; collate."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent (the message names the file and the root)."""


def _where(path: str, root: str) -> str:
    return f"{path!r} (dataset root {root!r})"


def resolve_index_path(rel, root: str, where: str, allow_outside_root: bool = False) -> str:
    """The path of an index entry, confined to the dataset root: absolute paths, `..` climbs and symlinks
    that leave the root are refused (an index file is untrusted input) unless `allow_outside_root`."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise DatasetError(f"{where}: index entries must be non-empty paths, got {rel!r} (dataset root {root!r})")
    if allow_outside_root:
        return os.path.join(root, rel)
    if os.path.isabs(rel):
        raise DatasetError(f"{where}: index entry {rel!r} is an absolute path; entries must be relative to the dataset "
                           f"root {root!r} (allow_outside_root / data.allow_outside_root allows others)")
    path = os.path.join(root, rel)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise DatasetError(f"{where}: index entry {rel!r} resolves to {real!r}, outside the dataset root {root!r} "
                           "(allow_outside_root / data.allow_outside_root allows it)")
    return path


def check_index_files(paths, root: str, what: str) -> None:
    """Every file of the index present and readable, checked before training starts: one error listing the
    problems instead of a failure at some later iteration."""
    bad = [p for p in paths if not (os.path.isfile(p) and os.access(p, os.R_OK))]
    if bad:
        shown = ", ".join(repr(p) for p in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DatasetError(f"{what}: {len(bad)} file(s) listed in the index are missing or unreadable "
                           f"(dataset root {root!r}): {shown}")


def check_file(path: str, root: str) -> None:
    if not os.path.isfile(path):
        raise DatasetError(f"missing file {_where(path, root)}")


def read_image(path: str, root: str, mode: str | None = None) -> np.ndarray:
    check_file(path, root)
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None:
                im = im.convert(mode)
            return np.asarray(im).copy()
    except Exception as e:  # PIL raises several types for truncated/corrupt files
        raise DatasetError(f"cannot read image {_where(path, root)}: {e}") from e


def read_npy(path: str, root: str) -> np.ndarray:
    check_file(path, root)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f"cannot read array {_where(path, root)}: {e}") from e


def read_json(path: str, root: str) -> dict:
    check_file(path, root)
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:
        raise DatasetError(f"cannot parse JSON {_where(path, root)}: {e}") from e


def as_2d(a: np.ndarray, path: str, root: str, what: str) -> np.ndarray:
    """Squeeze a [H,W], [H,W,1] or [1,H,W] array to [H,W]."""
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise DatasetError(f"{what} must be a single-channel HxW array, got shape {a.shape} in {_where(path, root)}")
    return a


def check_size(a: np.ndarray, hw, path: str, root: str, what: str) -> None:
    if tuple(a.shape[:2]) != tuple(hw):
        raise DatasetError(f"{what} size {tuple(a.shape[:2])} differs from the image's {tuple(hw)} in {_where(path, root)}")


def split_indices(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    """Deterministic train/val partition of a list of n train entries: a seeded permutation, the
    first round(n * val_fraction) (at least 1 when val_fraction > 0) are "val"."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"argument 'val_fraction' must be in [0, 1), got {val_fraction!r}")
    n_val = 0 if val_fraction == 0 or n == 0 else min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n).tolist()
    chosen = perm[:n_val] if split == "val" else perm[n_val:]
    return sorted(chosen)


def collate_multitask(samples: list[dict]) -> dict:
    """Stack a list of samples into a batch: tensors stacked, other values gathered in lists.

    A plain function at module level, so DataLoader can pickle it for worker processes."""
    if not samples:
        raise ValueError("collate_multitask: argument 'samples' is empty")
    keys = samples[0].keys()
    for i, s in enumerate(samples):
        if s.keys() != keys:
            raise ValueError(f"collate_multitask: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    out = {}
    for k in keys:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) != 1:
                raise ValueError(f"collate_multitask: key {k!r} has different shapes {sorted(shapes)}; crop/resize first")
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out
