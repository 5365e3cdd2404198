"""Multitask models of the paper: DeepLab-ResNet-34 / MobileNetV2 backbones, ASPP heads, MultiTaskModel."""
from adapmtl.models.aspp import ASPPHead
from adapmtl.models.mobilenet import MobileNetV2Backbone
from adapmtl.models.multitask import (
    BACKBONES,
    MultiTaskModel,
    build_backbone,
    build_model,
    count_conv_weights,
    load_checkpoint,
)
from adapmtl.models.resnet import DeepLabResNet34
from adapmtl.models.tiny import TinyBackbone

__all__ = [
    "ASPPHead",
    "BACKBONES",
    "DeepLabResNet34",
    "MobileNetV2Backbone",
    "MultiTaskModel",
    "TinyBackbone",
    "build_backbone",
    "build_model",
    "count_conv_weights",
    "load_checkpoint",
]
