"""Datasets: NYUv2 and Tiny-Taskonomy (AdaShare layouts), the synthetic demo scenes, collate."""
from adapmtl.data.common import DatasetError, collate_multitask
from adapmtl.data.nyuv2 import NYUv2
from adapmtl.data.synthetic import make_synthetic_scenes
from adapmtl.data.taskonomy import Taskonomy
from adapmtl.data.transforms import BGR_MEAN

__all__ = ["BGR_MEAN", "DatasetError", "NYUv2", "Taskonomy", "collate_multitask", "make_synthetic_scenes"]
