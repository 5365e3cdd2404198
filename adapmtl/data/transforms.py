"""Joint image/label transforms on tensors (no torchvision/opencv): resize, flip, crop/pad.

A sample here is a dict: "image" float32 [3,H,W] (already BGR minus mean), per task its label and, for
tasks with invalid pixels, a bool "<task>_mask" [H,W]. Images are resized bilinearly, labels and masks
with nearest neighbour (SPEC §5). Padding uses the image value 0 (= the mean colour), label 255 /
mask False (ignored). Randomness comes from torch's global RNG, which DataLoader seeds per worker.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adapmtl.tasks import IGNORE_INDEX, TaskSpec

BGR_MEAN = (104.008, 116.669, 122.679)


def _nearest(t: Tensor, size) -> Tensor:
    dtype, lead = t.dtype, t.dim() == 2
    x = t.unsqueeze(0) if lead else t
    x = F.interpolate(x.unsqueeze(0).float(), size=size, mode="nearest")[0]
    x = x[0] if lead else x
    return x.to(dtype) if dtype != torch.bool else x > 0.5


def resize(sample: dict, size) -> dict:
    """Image bilinear (align_corners=False), every other tensor nearest, to `size` = (H, W)."""
    size = (int(size[0]), int(size[1]))
    out = {}
    for k, v in sample.items():
        if not isinstance(v, Tensor):
            out[k] = v
        elif k == "image":
            out[k] = F.interpolate(v.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
        else:
            out[k] = _nearest(v, size)
    return out


def hflip(sample: dict, normal_tasks=("normal",), normal_channel: int = 0) -> dict:
    """Mirror left-right; the horizontal component of surface normals changes sign."""
    out = {}
    for k, v in sample.items():
        if isinstance(v, Tensor):
            v = v.flip(-1)
            if k in normal_tasks:
                v = v.clone()
                v[normal_channel] = -v[normal_channel]
        out[k] = v
    return out


def _pad_value(key: str, specs: dict[str, TaskSpec], t: Tensor):
    if key == "image" or t.dtype == torch.bool:
        return 0
    spec = specs.get(key)
    if spec is not None and spec.kind in ("segmentation", "dense_l1"):
        return IGNORE_INDEX
    return 0  # normal/depth: the mask (False in the padding) marks them invalid


def random_crop_pad(sample: dict, crop, specs: dict[str, TaskSpec]) -> dict:
    """Pad (centred) to at least `crop`, then take a random crop of exactly `crop` = (H, W)."""
    ch, cw = crop
    h, w = sample["image"].shape[-2:]
    ph, pw = max(h, ch), max(w, cw)
    top, left = (ph - h) // 2, (pw - w) // 2
    y0 = int(torch.randint(0, ph - ch + 1, ()).item())
    x0 = int(torch.randint(0, pw - cw + 1, ()).item())
    out = {}
    for k, v in sample.items():
        if not isinstance(v, Tensor):
            out[k] = v
            continue
        if (ph, pw) != (h, w):
            padded = torch.full((*v.shape[:-2], ph, pw), _pad_value(k, specs, v), dtype=v.dtype)
            padded[..., top:top + h, left:left + w] = v
            v = padded
        out[k] = v[..., y0:y0 + ch, x0:x0 + cw].contiguous()
    return out


def random_scale(sample: dict, low: float = 0.5, high: float = 1.5) -> dict:
    """Rescale by a factor drawn uniformly from [low, high)."""
    s = low + (high - low) * float(torch.rand(()).item())
    h, w = sample["image"].shape[-2:]
    return resize(sample, (max(1, int(h * s)), max(1, int(w * s))))


def train_augment(sample: dict, crop, specs: dict[str, TaskSpec], normal_channel: int = 0) -> dict:
    """The paper's training augmentation: random scale [0.5, 1.5), horizontal flip (p=0.5), random
    crop/pad to `crop`."""
    sample = random_scale(sample)
    if float(torch.rand(()).item()) < 0.5:
        normals = tuple(n for n, s in specs.items() if s.kind == "normal")
        sample = hflip(sample, normals, normal_channel)
    return random_crop_pad(sample, crop, specs)


def bgr_minus_mean(rgb_uint8) -> Tensor:
    """HxWx3 RGB uint8 array -> float32 [3,H,W] in BGR order minus the BGR mean (no /255, SPEC §5)."""
    t = torch.from_numpy(rgb_uint8[:, :, ::-1].astype("float32").transpose(2, 0, 1).copy())
    return t - torch.tensor(BGR_MEAN, dtype=torch.float32).view(3, 1, 1)
