"""Tiny-Taskonomy in the AdaShare/TreeMTL on-disk layout (SPEC §5); see docs/data.md."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from adapmtl.data import transforms as T
from adapmtl.data.common import (
    DatasetError,
    as_2d,
    check_index_files,
    check_size,
    read_image,
    read_json,
    read_npy,
    resolve_index_path,
    split_indices,
)
from adapmtl.tasks import IGNORE_INDEX, TASKONOMY_TASKS

JSON_NAME = "taskonomy.json"
PRIOR_NAME = "semseg_prior_factor.npy"
SPLITS = ("train", "val", "test")
DEPTH_INVALID_FROM = 64500  # uint16 depth >= this is invalid (no return)
KEYPOINT_RANGE = 0.005  # value/2^16 is clipped to [0, range] and mapped to [-1, 1]
EDGE_RANGE = 0.08


def _to_pm1(x: np.ndarray, hi: float) -> np.ndarray:
    return (np.clip(x, 0.0, hi) / hi * 2.0 - 1.0).astype(np.float32)


class Taskonomy(Dataset):
    """Tiny-Taskonomy, 5 tasks: "segment_semantic" (17 classes), "normal", "depth_zbuffer",
    "keypoints2d", "edge_texture". Layout: `root/taskonomy.json` = {"train": [[rgb, seg, normal,
    depth, keypoints2d, edge_texture], ...], "test": [...]} (paths relative to root) and
    `root/semseg_prior_factor.npy` (17 class weights for the cross-entropy).

    Decoding (as the authors' loader): every map is first resized to `size` (256); seg png 0 =
    unlabeled -> 255, else label - 1; normal uint8 -> v/255*2-1, valid where depth is valid; depth
    uint16 -> log(1 + d) / log(2^16), valid where d < 64500; keypoints2d / edge_texture uint16 ->
    (v / 2^16) clipped to [0, 0.005] / [0, 0.08] and mapped to [-1, 1]. Train: random scale, flip,
    random crop/pad to crop_size (224); test/val: the `size` x `size` maps. Splits as NYUv2 ("val" =
    held-out part of the train list). `class_weights` holds the prior factors as a tensor. Index paths are
    confined to `root` and checked up front, as in NYUv2 (`allow_outside_root`, `check_files`).
    """

    tasks = TASKONOMY_TASKS

    def __init__(self, root, split: str = "train", crop_size=224, size=256, augment: bool | None = None,
                 val_fraction: float = 0.1, seed: int = 0, allow_outside_root: bool = False, check_files: bool = True):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"Taskonomy: argument 'root' must be a path, got {type(root).__name__}")
        if split not in SPLITS:
            raise ValueError(f"Taskonomy: argument 'split' must be one of {SPLITS}, got {split!r}")
        crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        size = (size, size) if isinstance(size, int) else tuple(size)
        for arg, v in (("crop_size", crop_size), ("size", size)):
            if len(v) != 2 or not all(isinstance(c, int) and c > 0 for c in v):
                raise ValueError(f"Taskonomy: argument '{arg}' must be a positive int or (H, W), got {v!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DatasetError(f"Taskonomy: dataset root {self.root!r} is not a directory")
        self.split, self.crop_size, self.size = split, crop_size, size
        self.augment = (split == "train") if augment is None else bool(augment)
        meta = read_json(os.path.join(self.root, JSON_NAME), self.root)
        key = "test" if split == "test" else "train"
        entries = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise DatasetError(f"Taskonomy: {JSON_NAME} in dataset root {self.root!r} has no {key!r} list")
        for i, e in enumerate(entries):
            if not (isinstance(e, (list, tuple)) and len(e) == 6 and all(isinstance(p, str) for p in e)):
                raise DatasetError(f"Taskonomy: {JSON_NAME} in dataset root {self.root!r}: {key}[{i}] must be 6 paths "
                                   "[rgb, seg, normal, depth, keypoints2d, edge_texture]")
        if split != "test":
            entries = [entries[i] for i in split_indices(len(entries), split, val_fraction, seed)]
        if not entries:
            raise DatasetError(f"Taskonomy: split {split!r} is empty (dataset root {self.root!r})")
        prior_path = os.path.join(self.root, PRIOR_NAME)
        prior = np.asarray(read_npy(prior_path, self.root), dtype=np.float32).reshape(-1)
        if prior.shape != (17,) or not np.all(np.isfinite(prior)) or (prior < 0).any():
            raise DatasetError(f"class weights must be 17 finite non-negative values, got shape {prior.shape} in "
                               f"{prior_path!r} (dataset root {self.root!r})")
        self.class_weights = torch.from_numpy(prior)
        self.entries = [[resolve_index_path(p, self.root, f"Taskonomy: {JSON_NAME}", allow_outside_root) for p in e]
                        for e in entries]
        if check_files:
            check_index_files([p for e in self.entries for p in e], self.root, f"Taskonomy: split {split!r}")
        self.specs = {t.name: t for t in self.tasks}

    def __len__(self) -> int:
        return len(self.entries)

    def _u16(self, path: str, hw) -> np.ndarray:
        a = as_2d(read_image(path, self.root), path, self.root, "label map")
        check_size(a, hw, path, self.root, "label map")
        return a.astype(np.float64)

    def load_raw(self, index: int) -> dict:
        img_p, seg_p, nrm_p, dep_p, kp_p, edge_p = self.entries[index]
        root = self.root
        rgb = read_image(img_p, root, "RGB")
        hw = rgb.shape[:2]
        seg = self._u16(seg_p, hw).astype(np.int64)
        if (seg > 17).any():
            raise DatasetError(f"segmentation png values must be 0..17, found {int(seg.max())} in {seg_p!r} "
                               f"(dataset root {root!r})")
        seg = np.where(seg == 0, IGNORE_INDEX, seg - 1)
        nrm = read_image(nrm_p, root, "RGB")
        check_size(nrm, hw, nrm_p, root, "normal map")
        depth_raw = self._u16(dep_p, hw)
        dmask = depth_raw < DEPTH_INVALID_FROM
        depth = (np.log1p(depth_raw) / np.log(2.0 ** 16)).astype(np.float32)
        normal = (nrm.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)
        kp = _to_pm1(self._u16(kp_p, hw) / 2.0 ** 16, KEYPOINT_RANGE)
        edge = _to_pm1(self._u16(edge_p, hw) / 2.0 ** 16, EDGE_RANGE)
        s = {
            "image": T.bgr_minus_mean(rgb),
            "segment_semantic": torch.from_numpy(seg),
            "normal": torch.from_numpy(np.ascontiguousarray(normal)),
            "normal_mask": torch.from_numpy(dmask.copy()),
            "depth_zbuffer": torch.from_numpy(depth[None]),
            "depth_zbuffer_mask": torch.from_numpy(dmask),
            "keypoints2d": torch.from_numpy(kp[None]),
            "keypoints2d_mask": torch.ones(hw, dtype=torch.bool),
            "edge_texture": torch.from_numpy(edge[None]),
            "edge_texture_mask": torch.ones(hw, dtype=torch.bool),
        }
        return T.resize(s, self.size)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"Taskonomy: index {index} out of range for split {self.split!r} of length {len(self)}")
        s = self.load_raw(index)
        if self.augment:
            s = T.train_augment(s, self.crop_size, self.specs)
        s["index"] = index
        return s
