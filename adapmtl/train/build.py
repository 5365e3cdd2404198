"""Datasets and models from a Config (the synthetic demo data is generated on first use)."""
from __future__ import annotations

import os

from adapmtl import distributed as D


def _synthetic_root(cfg) -> str:
    """The folder of synthetic scenes for cfg.data: data.root itself if it holds scenes generated with
    exactly cfg.data's n_train / n_test / image_size, else a subfolder keyed by them (generated on first
    use), so a changed setting never silently reuses other data."""
    from adapmtl.data.synthetic import read_synthetic_params, synthetic_params

    d = cfg.data
    base = os.path.expanduser(d.root)
    wanted = synthetic_params(d.n_train, d.n_test, d.image_size, 0, d.n_classes, d.camera_height)
    root = base
    if read_synthetic_params(base) != wanted:
        classes = "" if "n_classes" not in wanted else f"-classes{d.n_classes}"
        camera = "" if "camera_height" not in wanted else f"-camera{wanted['camera_height']:g}"
        root = os.path.join(base, f"scenes-train{d.n_train}-test{d.n_test}-size{d.image_size}{classes}{camera}-seed0")
    if not os.path.isfile(os.path.join(root, "nyu_v2_3task.json")):
        if D.is_main():
            from adapmtl.data import make_synthetic_scenes
            tmp = root.rstrip("/") + f".tmp{os.getpid()}"
            make_synthetic_scenes(tmp, n_train=d.n_train, n_test=d.n_test, size=d.image_size, seed=0,
                                  n_classes=d.n_classes, camera_height=d.camera_height)
            try:  # publish the whole folder at once so a concurrent reader never sees half of it
                os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
                os.replace(tmp, root)
            except OSError:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        D.barrier()
    found = read_synthetic_params(root)
    if found != wanted:
        raise ValueError(f"data.root: {root!r} holds synthetic scenes generated with {found}, but the config asks for "
                         f"{wanted} (data.n_train / n_test / image_size / n_classes / camera_height); remove the folder or choose another data.root")
    return root


def build_datasets(cfg) -> dict:
    d = cfg.data
    if d.dataset in ("synthetic", "nyuv2"):
        from adapmtl.data import NYUv2
        root = _synthetic_root(cfg) if d.dataset == "synthetic" else os.path.expanduser(d.root)
        kw = dict(crop_size=d.crop_size, val_fraction=d.val_fraction, seed=cfg.seed, allow_outside_root=d.allow_outside_root)
        return {"train": NYUv2(root, "train", **kw), "val": NYUv2(root, "val", **kw), "test": NYUv2(root, "test", **kw)}
    from adapmtl.data import Taskonomy
    root = os.path.expanduser(d.root)
    kw = dict(crop_size=d.crop_size, val_fraction=d.val_fraction, seed=cfg.seed, allow_outside_root=d.allow_outside_root)
    train = Taskonomy(root, "train", **kw)
    out = {"train": train, "val": Taskonomy(root, "val", **kw), "test": Taskonomy(root, "test", **kw)}
    tasks = cfg.data.tasks or [t.name for t in train.tasks]
    if "segment_semantic" in tasks:
        out["class_weights"] = {"segment_semantic": train.class_weights}
    return out


def config_tasks(cfg) -> list[str]:
    """The tasks a run of cfg trains: data.tasks, else every task of its dataset (synthetic: NYUv2's)."""
    if cfg.data.tasks is not None:
        return list(cfg.data.tasks)
    from adapmtl.tasks import NYUV2_TASKS, TASKONOMY_TASKS
    return [t.name for t in (TASKONOMY_TASKS if cfg.data.dataset == "taskonomy" else NYUV2_TASKS)]


def build_model_from_config(cfg):
    from adapmtl.models import build_model

    m = cfg.model
    dataset = "taskonomy" if cfg.data.dataset == "taskonomy" else "nyuv2"
    return build_model(backbone=m.backbone, tasks=config_tasks(cfg), head_channels=m.head_channels,
                       dilations=m.dilations, dropout=m.dropout, dataset=dataset, channels=m.channels)
