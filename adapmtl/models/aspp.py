"""DeepLab-v2 ASPP head (SPEC §4): parallel dilated branches whose outputs are summed."""
from __future__ import annotations

from torch import Tensor, nn


class ASPPHead(nn.Module):
    """4 branches (dilation = padding in `dilations`), each 3x3 dilated conv C_in->head_channels -> ReLU ->
    Dropout -> 1x1 -> ReLU -> Dropout -> 1x1 ->C_out, all with bias; outputs summed.

    Conv weights = len(dilations) * (9*C_in*h + h*h + h*C_out), h = head_channels. PyTorch default init."""

    def __init__(self, in_channels: int, out_channels: int, head_channels: int = 1024,
                 dilations=(6, 12, 18, 24), dropout: float = 0.5):
        super().__init__()
        for arg, v in (("in_channels", in_channels), ("out_channels", out_channels), ("head_channels", head_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ASPPHead: argument '{arg}' must be a positive int, got {v!r}")
        dilations = tuple(dilations)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(f"ASPPHead: argument 'dilations' must be a non-empty sequence of ints >= 1, got {dilations!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ASPPHead: argument 'dropout' must be in [0, 1), got {dropout!r}")
        self.in_channels, self.out_channels, self.dilations = in_channels, out_channels, dilations
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, head_channels, 3, padding=d, dilation=d),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(head_channels, head_channels, 1),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(head_channels, out_channels, 1),
            )
            for d in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out
