"""Task specifications shared by the data loaders, the losses and the metrics.

A task is identified by its name (the key of a model's heads, of a sample's label and of the metric
results). `kind` says which loss / metric family applies (SPEC §5, §6):

- "segmentation": int64 labels [H, W], `ignore_index` (255) marks unlabeled / padded pixels.
- "normal": float32 [3, H, W] unit vectors, bool mask "<name>_mask" [H, W].
- "depth": float32 [1, H, W], bool mask "<name>_mask" [H, W].
- "dense_l1": float32 [1, H, W] regression scored by L1 (Taskonomy keypoints2d / edge_texture);
  label value 255 (padding) is ignored, and a "<name>_mask" is given too.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("segmentation", "normal", "depth", "dense_l1")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class TaskSpec:
    name: str
    out_channels: int
    kind: str
    num_classes: int | None = None  # segmentation only
    ignore_index: int = IGNORE_INDEX
    class_weighted: bool = False  # Taskonomy segmentation: CE weighted by semseg_prior_factor.npy

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"TaskSpec: argument 'name' must be a non-empty str, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"TaskSpec: argument 'kind' must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.out_channels, int) or self.out_channels < 1:
            raise ValueError(f"TaskSpec: argument 'out_channels' must be a positive int, got {self.out_channels!r}")
        if self.kind == "segmentation":
            if self.num_classes is None:
                object.__setattr__(self, "num_classes", self.out_channels)
            if self.num_classes != self.out_channels:
                raise ValueError(
                    f"TaskSpec {self.name!r}: num_classes ({self.num_classes}) must equal out_channels "
                    f"({self.out_channels})"
                )
        elif self.kind == "normal" and self.out_channels != 3:
            raise ValueError(f"TaskSpec {self.name!r}: a normal task has out_channels 3, got {self.out_channels}")
        elif self.kind in ("depth", "dense_l1") and self.out_channels != 1:
            raise ValueError(f"TaskSpec {self.name!r}: a {self.kind} task has out_channels 1, got {self.out_channels}")

    @property
    def mask_key(self) -> str:
        return f"{self.name}_mask"


NYUV2_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("segment_semantic", 40, "segmentation"),
    TaskSpec("normal", 3, "normal"),
    TaskSpec("depth", 1, "depth"),
)

TASKONOMY_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("segment_semantic", 17, "segmentation", class_weighted=True),
    TaskSpec("normal", 3, "normal"),
    TaskSpec("depth_zbuffer", 1, "depth"),
    TaskSpec("keypoints2d", 1, "dense_l1"),
    TaskSpec("edge_texture", 1, "dense_l1"),
)

_BY_NAME = {"nyuv2": {t.name: t for t in NYUV2_TASKS}, "taskonomy": {t.name: t for t in TASKONOMY_TASKS}}
_KIND_BY_NAME = {"segment_semantic": "segmentation", "normal": "normal", "depth": "depth",
                 "depth_zbuffer": "depth", "keypoints2d": "dense_l1", "edge_texture": "dense_l1"}


def get_task(name: str, dataset: str = "nyuv2") -> TaskSpec:
    """The TaskSpec of a known task name ("nyuv2" first, then "taskonomy" for names NYUv2 lacks)."""
    if dataset not in _BY_NAME:
        raise ValueError(f"get_task: argument 'dataset' must be one of {tuple(_BY_NAME)}, got {dataset!r}")
    table = _BY_NAME[dataset]
    if name in table:
        return table[name]
    if name in _BY_NAME["taskonomy"]:
        return _BY_NAME["taskonomy"][name]
    raise ValueError(
        f"get_task: unknown task {name!r}; known: {sorted(set(_BY_NAME['nyuv2']) | set(_BY_NAME['taskonomy']))}"
    )


def resolve_tasks(tasks, dataset: str = "nyuv2") -> list[TaskSpec]:
    """Normalise `tasks` to a list of TaskSpec.

    Accepts an iterable (list, tuple, dict values) of TaskSpec or task names, or a dict name -> out_channels (a known name keeps
    its kind; an unknown name becomes a segmentation task when out_channels > 1, else dense_l1)."""
    if isinstance(tasks, TaskSpec):
        tasks = [tasks]
    out: list[TaskSpec] = []
    if isinstance(tasks, dict):
        for name, ch in tasks.items():
            if not isinstance(name, str) or not isinstance(ch, int) or isinstance(ch, bool):
                raise TypeError(f"tasks: expected a dict str -> int (out_channels), got {name!r}: {ch!r}")
            kind = _KIND_BY_NAME.get(name, "segmentation" if ch > 1 else "dense_l1")
            known = _BY_NAME[dataset].get(name) or _BY_NAME["taskonomy"].get(name)
            weighted = bool(known and known.class_weighted and known.out_channels == ch)
            out.append(TaskSpec(name, ch, kind, class_weighted=weighted))
    elif isinstance(tasks, Iterable) and not isinstance(tasks, (str, bytes)):
        for t in tasks:
            if isinstance(t, TaskSpec):
                out.append(t)
            elif isinstance(t, str):
                out.append(get_task(t, dataset))
            else:
                raise TypeError(f"tasks: expected TaskSpec or str entries, got {type(t).__name__}")
    else:
        raise TypeError(f"tasks: expected a list of TaskSpec/str or a dict name -> out_channels, got {type(tasks).__name__}")
    if not out:
        raise ValueError("tasks: at least one task is needed")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks: duplicate task names in {names}")
    return out
