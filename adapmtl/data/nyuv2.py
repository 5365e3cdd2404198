"""NYUv2 in the AdaShare on-disk layout (SPEC §5); see docs/data.md."""
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
from adapmtl.tasks import IGNORE_INDEX, NYUV2_TASKS

JSON_NAME = "nyu_v2_3task.json"
DEPTH_MIN_VALID = 3e-5  # depth <= this is invalid (sensor holes)
SPLITS = ("train", "val", "test")


def decode_normal(png: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWx3 -> (float32 3xHxW in [-1, 1] as v/255*2-1, bool HxW valid = no channel is 255)."""
    valid = ~(png == 255).any(axis=2)
    n = (png.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)
    n[:, ~valid] = 0.0
    return np.ascontiguousarray(n), valid


def encode_normal(n: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Inverse of decode_normal for writers: 3xHxW unit vectors -> uint8 HxWx3, invalid = (255,255,255).
    Valid values are capped at 254 so that they never read back as invalid."""
    v = np.clip(np.rint((n.transpose(1, 2, 0) + 1.0) * 127.5), 0, 254).astype(np.uint8)
    v[~valid] = 255
    return v


class NYUv2(Dataset):
    """NYUv2 (3 tasks: "segment_semantic" 40 classes, "normal", "depth") from the AdaShare layout:
    `root/nyu_v2_3task.json` = {"train": [[img, seg, normal, depth], ...], "test": [...]}, paths
    relative to root.

    Splits: "test" is the JSON's test list; "val" is a deterministic held-out part of the JSON's train
    list (`val_fraction` of it, chosen by `seed`), and "train" is the rest. Models are selected on
    "val", never on "test". With `val_fraction=0` "train" is the full train list (the paper's 795
    images) and "val" is an error (empty).

    Train (augment=True, the default for "train"): random scale [0.5, 1.5), horizontal flip, random
    crop/pad to crop_size. Otherwise: resize to crop_size x crop_size (labels nearest).

    Index entries are confined to `root` (no absolute paths, no `..` or symlinks out of it) unless
    `allow_outside_root`; with `check_files` (default) every listed file is checked to exist and be
    readable when the split is made.

    Sample: "image" float32 [3,H,W] (BGR minus mean, no /255); "segment_semantic" int64 [H,W] (255 =
    ignore); "normal" float32 [3,H,W] + "normal_mask" bool [H,W]; "depth" float32 [1,H,W] +
    "depth_mask" bool [H,W]; "index" int.
    """

    tasks = NYUV2_TASKS

    def __init__(self, root, split: str = "train", crop_size=321, augment: bool | None = None,
                 val_fraction: float = 0.1, seed: int = 0, normal_channel: int = 0, allow_outside_root: bool = False,
                 check_files: bool = True):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"NYUv2: argument 'root' must be a path, got {type(root).__name__}")
        if split not in SPLITS:
            raise ValueError(f"NYUv2: argument 'split' must be one of {SPLITS}, got {split!r}")
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        if len(crop_size) != 2 or not all(isinstance(c, int) and c > 0 for c in crop_size):
            raise ValueError(f"NYUv2: argument 'crop_size' must be a positive int or (H, W), got {crop_size!r}")
        if normal_channel not in (0, 1, 2):
            raise ValueError(f"NYUv2: argument 'normal_channel' must be 0, 1 or 2, got {normal_channel!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DatasetError(f"NYUv2: dataset root {self.root!r} is not a directory")
        self.split, self.crop_size, self.normal_channel = split, tuple(crop_size), normal_channel
        self.augment = (split == "train") if augment is None else bool(augment)
        meta = read_json(os.path.join(self.root, JSON_NAME), self.root)
        key = "test" if split == "test" else "train"
        entries = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise DatasetError(f"NYUv2: {JSON_NAME} in dataset root {self.root!r} has no {key!r} list")
        for i, e in enumerate(entries):
            if not (isinstance(e, (list, tuple)) and len(e) == 4 and all(isinstance(p, str) for p in e)):
                raise DatasetError(
                    f"NYUv2: {JSON_NAME} in dataset root {self.root!r}: {key}[{i}] must be [img, seg, normal, depth] paths"
                )
        if split != "test":
            entries = [entries[i] for i in split_indices(len(entries), split, val_fraction, seed)]
        if not entries:
            raise DatasetError(f"NYUv2: split {split!r} is empty (dataset root {self.root!r}, val_fraction={val_fraction})")
        self.entries = [[resolve_index_path(p, self.root, f"NYUv2: {JSON_NAME}", allow_outside_root) for p in e]
                        for e in entries]
        if check_files:
            check_index_files([p for e in self.entries for p in e], self.root, f"NYUv2: split {split!r}")
        self.specs = {t.name: t for t in self.tasks}

    def __len__(self) -> int:
        return len(self.entries)

    def load_raw(self, index: int) -> dict:
        """The sample at full resolution, before any transform."""
        img_p, seg_p, nrm_p, dep_p = self.entries[index]
        root = self.root
        rgb = read_image(img_p, root, "RGB")
        hw = rgb.shape[:2]
        seg = as_2d(read_image(seg_p, root), seg_p, root, "segmentation label")
        check_size(seg, hw, seg_p, root, "segmentation label")
        bad = (seg >= 40) & (seg != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(
                f"segmentation labels must be 0..39 or 255, found {np.unique(seg[bad])[:5].tolist()} in {seg_p!r} "
                f"(dataset root {root!r})"
            )
        nrm = read_image(nrm_p, root)
        if nrm.ndim != 3 or nrm.shape[2] != 3 or nrm.dtype != np.uint8:
            raise DatasetError(f"normal map must be a 3-channel uint8 png, got {nrm.shape} {nrm.dtype} in {nrm_p!r} "
                               f"(dataset root {root!r})")
        check_size(nrm, hw, nrm_p, root, "normal map")
        normal, nmask = decode_normal(nrm)
        depth = as_2d(read_npy(dep_p, root), dep_p, root, "depth").astype(np.float32)
        check_size(depth, hw, dep_p, root, "depth")
        dmask = np.isfinite(depth) & (depth > DEPTH_MIN_VALID)
        depth = np.where(dmask, depth, 0.0).astype(np.float32)
        return {
            "image": T.bgr_minus_mean(rgb),
            "segment_semantic": torch.from_numpy(seg.astype(np.int64)),
            "normal": torch.from_numpy(normal),
            "normal_mask": torch.from_numpy(nmask),
            "depth": torch.from_numpy(depth[None]),
            "depth_mask": torch.from_numpy(dmask),
        }

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"NYUv2: index {index} out of range for split {self.split!r} of length {len(self)}")
        s = self.load_raw(index)
        if self.augment:
            s = T.train_augment(s, self.crop_size, self.specs, self.normal_channel)
        else:
            s = T.resize(s, self.crop_size)
        s["index"] = index
        return s
