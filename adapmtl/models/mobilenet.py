"""MobileNetV2 backbone (SPEC §4): width 1.0, output stride 32, 1280 channels, no classifier."""
from __future__ import annotations

from torch import Tensor, nn


def _conv_bn(in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_ch, out_ch, k, stride, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [_conv_bn(in_ch, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, out_ch, 1, relu=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Backbone(nn.Module):
    """52 convs, 2,189,760 conv weights. Initialisation as the authors': conv weights He-normal
    (fan_out), BatchNorm weight 1 / bias 0."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    out_channels = 1280
    output_stride = 32

    def __init__(self):
        super().__init__()
        layers = [_conv_bn(3, 32, 3, 2)]
        in_ch = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(_conv_bn(in_ch, self.out_channels, 1))
        self.features = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)
