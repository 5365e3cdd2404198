"""A tiny CPU demo backbone: 4 conv stages 16-32-64-64, output stride 8 (8x8 features at 64x64)."""
from __future__ import annotations

from torch import Tensor, nn


class TinyBackbone(nn.Module):
    out_channels = 64
    output_stride = 8

    def __init__(self, channels=(16, 32, 64, 64)):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.out_channels = c4

        def block(i, o, stride, dilation=1):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
            )

        # the last stage keeps the resolution and dilates instead, as DeepLab does
        self.stages = nn.Sequential(block(3, c1, 2), block(c1, c2, 2), block(c2, c3, 2), block(c3, c4, 1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)
