"""A shared backbone plus one head per task, with explicit components for component-wise thresholds."""
from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from adapmtl.checkpoint_io import CheckpointError, is_adapmtl_checkpoint, load_checkpoint_file
from adapmtl.models.aspp import ASPPHead
from adapmtl.models.mobilenet import MobileNetV2Backbone
from adapmtl.models.resnet import DeepLabResNet34
from adapmtl.models.tiny import TinyBackbone
from adapmtl.tasks import TaskSpec, resolve_tasks

BACKBONES = ("resnet34", "mobilenetv2", "tiny")
HEADS = ("aspp",)


class MultiTaskModel(nn.Module):
    """`forward(x, tasks=None)` runs the backbone once and the heads of `tasks` (None = all), returning
    {task: output at the backbone's feature resolution}.

    `components()` = {"backbone": backbone, task: head, ...}: `adapmtl.sparsify` gives each its own
    threshold (one for the shared backbone, one per head) without the user listing modules."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"MultiTaskModel: argument 'backbone' must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(heads, (dict, nn.ModuleDict)) or len(heads) == 0:
            raise TypeError("MultiTaskModel: argument 'heads' must be a non-empty dict of task name -> nn.Module")
        for name, head in heads.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"MultiTaskModel: head names must be non-empty str without '.', got {name!r}")
            if name == "backbone":
                raise ValueError("MultiTaskModel: a task may not be named 'backbone' (that is the shared component)")
            if not isinstance(head, nn.Module):
                raise TypeError(f"MultiTaskModel: heads[{name!r}] must be an nn.Module, got {type(head).__name__}")
            if head is backbone:
                raise ValueError(f"MultiTaskModel: heads[{name!r}] is the backbone itself")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def components(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, **{name: head for name, head in self.heads.items()}}

    def forward(self, x: Tensor, tasks: Iterable[str] | None = None) -> dict[str, Tensor]:
        if tasks is None:
            names = self.tasks
        else:
            if isinstance(tasks, str):
                tasks = [tasks]
            names = list(tasks)
            unknown = [t for t in names if t not in self.heads]
            if unknown:
                raise ValueError(f"MultiTaskModel.forward: argument 'tasks' has unknown tasks {unknown}; model has {self.tasks}")
            if not names:
                raise ValueError("MultiTaskModel.forward: argument 'tasks' is empty")
        features = self.backbone(x)
        return {name: self.heads[name](features) for name in names}


def build_backbone(name: str, channels=None) -> nn.Module:
    """`channels`: the tiny backbone's 4 stage widths (default 16, 32, 64, 64); only for "tiny"."""
    if channels is not None and name != "tiny":
        raise ValueError(f"build_backbone: argument 'channels' is for the tiny backbone only, not {name!r}")
    if name == "resnet34":
        return DeepLabResNet34()
    if name == "mobilenetv2":
        return MobileNetV2Backbone()
    if name == "tiny":
        return TinyBackbone() if channels is None else TinyBackbone(tuple(channels))
    raise ValueError(f"build_backbone: argument 'backbone' must be one of {BACKBONES}, got {name!r}")


def build_model(
    backbone: str = "resnet34",
    tasks=None,
    head: str = "aspp",
    head_channels: int | None = None,
    dilations=None,
    dropout: float = 0.5,
    dataset: str = "nyuv2",
    channels=None,
) -> MultiTaskModel:
    """Backbone + one head per task.

    Args:
        backbone: "resnet34" (DeepLab-ResNet-34), "mobilenetv2", or "tiny" (CPU demo).
        tasks: list of TaskSpec / task names, or dict name -> out_channels. Default: the NYUv2 tasks.
        head: "aspp" (the only head the paper uses).
        head_channels: ASPP width; default 1024 (paper), 32 for "tiny".
        dilations: ASPP dilations; default (6, 12, 18, 24) (paper), (1, 2, 3, 4) for "tiny" (its 8x8
            feature maps at 64x64 input would otherwise see mostly padding).
        channels: the tiny backbone's 4 stage widths (default 16, 32, 64, 64).
    """
    from adapmtl.tasks import NYUV2_TASKS

    specs: list[TaskSpec] = resolve_tasks(list(NYUV2_TASKS) if tasks is None else tasks, dataset)
    if head not in HEADS:
        raise ValueError(f"build_model: argument 'head' must be one of {HEADS}, got {head!r}")
    tiny = backbone == "tiny"
    net = build_backbone(backbone, channels)
    hc = head_channels if head_channels is not None else (32 if tiny else 1024)
    dil = tuple(dilations) if dilations is not None else ((1, 2, 3, 4) if tiny else (6, 12, 18, 24))
    heads = {t.name: ASPPHead(net.out_channels, t.out_channels, hc, dil, dropout) for t in specs}
    model = MultiTaskModel(net, heads)
    model.task_specs = {t.name: t for t in specs}
    return model


def load_checkpoint(model: nn.Module, path_or_state, strict: bool = True, map_location="cpu"):
    """Load a user's checkpoint into `model` (no download ever happens).

    Accepts a path or a state dict; a dict wrapping the weights under "state_dict" or "model" is
    unwrapped, and a "module." prefix (DataParallel) is stripped. Returns load_state_dict's result."""
    if isinstance(path_or_state, (str, os.PathLike)):
        if not os.path.isfile(path_or_state):
            raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {os.fspath(path_or_state)!r}")
        path = os.fspath(path_or_state)
        if is_adapmtl_checkpoint(path):  # a trainer checkpoint: verified, then its "model" entry
            state = load_checkpoint_file(path, map_location)
        else:
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for a bad file
                raise CheckpointError(f"load_checkpoint: cannot read {path!r} as a torch checkpoint "
                                      f"({type(exc).__name__}: {exc})") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"load_checkpoint: {path!r} holds a {type(state).__name__}, expected a state dict")
    elif isinstance(path_or_state, dict):
        state = path_or_state
    else:
        raise TypeError(f"load_checkpoint: expected a path or a state dict, got {type(path_or_state).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return model.load_state_dict(state, strict=strict)


def count_conv_weights(module: nn.Module) -> int:
    """Number of prunable weights (conv and linear weights; no biases, no norm layers)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
