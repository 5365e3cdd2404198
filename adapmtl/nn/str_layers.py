"""Drop-in soft-threshold (STR) layers: `nn.Conv2d` / `nn.Linear` whose weight passes through
`sign(w) * relu(|w| - sigmoid(s))` on every forward (SPEC §1).

A layer either owns its threshold (per-layer STR: a `ThresholdGroup` registered as the submodule
`threshold`) or uses a shared one owned elsewhere (AdapMTL: one group per component, registered on
the model by `adapmtl.sparsify`). A shared group is kept as a plain attribute, not a submodule, so
`state_dict()` stores each threshold once, under its owner.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapmtl.ops import BACKENDS, GRAD_MODES, soft_threshold
from adapmtl.ops.block_soft_threshold import block_of


class ThresholdGroup(nn.Module):
    """The learnable threshold `s` of one component (or one layer); `g(s) = sigmoid(s)`."""

    def __init__(self, init: float = -15.0, name: str = "", device=None, dtype=None):
        super().__init__()
        self.name = name
        self.s = nn.Parameter(torch.full((), float(init), device=device, dtype=dtype or torch.float32))

    def threshold(self) -> Tensor:
        """g(s), the magnitude below which weights are exactly zero."""
        return torch.sigmoid(self.s.detach())

    @torch.no_grad()
    def reset(self, init: float) -> None:
        self.s.fill_(float(init))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, s={self.s.item():.4g}"


class _ThresholdState:
    """What every soft-thresholded weight holds: its threshold (owned or shared), grad mode and backend, its
    component and the non-zero count of its last forward. Shared by the STR layers and the parametrization."""

    def _init_str(self, weight, threshold, init, grad, backend, component, device, block=1):
        try:
            self.block = block_of(block)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        if grad not in GRAD_MODES:
            raise ValueError(f"{type(self).__name__}: argument 'grad' must be one of {GRAD_MODES}, got {grad!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: argument 'backend' must be one of {BACKENDS}, got {backend!r}")
        self.grad_mode = grad
        self.backend = backend
        self.component = component
        if threshold is None:
            self.threshold = ThresholdGroup(init, device=device, dtype=_threshold_dtype(weight))
        else:
            self.share_threshold(threshold)
        self.weight_numel = weight.numel()
        # Non-zeros of the effective weight at the last forward, straight from the kernel (no host sync).
        self.register_buffer(
            "last_nnz", torch.full((), weight.numel(), dtype=torch.long, device=device), persistent=False
        )

    def share_threshold(self, group: ThresholdGroup) -> None:
        """Use `group` (owned elsewhere) as this layer's threshold; drops an owned one."""
        if not isinstance(group, ThresholdGroup):
            raise TypeError(
                f"{type(self).__name__}: argument 'threshold' must be an adapmtl.nn.ThresholdGroup, got {type(group).__name__}"
            )
        if "threshold" in self._modules:
            del self._modules["threshold"]
        # Deliberately not registered as a submodule: the owner stores it in the state_dict.
        self.__dict__["_shared_threshold"] = group

    @property
    def threshold_group(self) -> ThresholdGroup:
        shared = self.__dict__.get("_shared_threshold")
        return shared if shared is not None else self._modules["threshold"]

    # `layer.threshold`: the group whether owned (a submodule, registered by nn.Module.__setattr__) or shared
    threshold = property(lambda self: self.threshold_group, doc="this weight's ThresholdGroup, owned or shared")

    @property
    def owns_threshold(self) -> bool:
        return self.__dict__.get("_shared_threshold") is None

    @property
    def s(self) -> nn.Parameter:
        return self.threshold_group.s

    def _recorded(self, weight: Tensor) -> Tensor:
        """w_hat of `weight` for this forward, its non-zero count kept in `last_nnz`."""
        out, nnz = soft_threshold(weight, self.s, grad=self.grad_mode, backend=self.backend, return_nnz=True,
                                  block=self.block)
        with torch.no_grad():
            self.last_nnz.copy_(nnz)
        return out

    def _str_repr(self) -> str:
        owner = "own" if self.owns_threshold else f"shared:{self.threshold_group.name or '?'}"
        block = f", block=({self.block}, 1)" if self.block > 1 else ""
        return (f"threshold={owner}, component={self.component!r}, grad={self.grad_mode!r}, backend={self.backend!r}"
                + block)


class SoftThreshold(_ThresholdState, nn.Module):
    """The soft threshold as a `torch.nn.utils.parametrize` parametrization of any weight: reading the weight
    (by the module's own forward, or by code that reads it directly, as PyTorch's MultiheadAttention and its
    transformer fast path do) gives `sign(w) * relu(|w| - sigmoid(s))`. `adapmtl.sparsify` puts it on every
    prunable weight that is not an exact `nn.Conv2d` / `nn.Linear` it can replace by an STR layer (subclasses
    with their own forward, Conv1d/3d, transposed convs, Embedding, attention projections).

    Args: as `STRConv2d`; `like` is the weight it will parametrize (dtype, size, device of the state).
    """

    def __init__(self, like: Tensor, *, threshold: "ThresholdGroup | None" = None, init: float = -15.0,
                 grad: str = "exact", backend: str = "auto", component: str = "", block=1):
        super().__init__()
        self._init_str(like, threshold, init, grad, backend, component, like.device, block)

    def forward(self, weight: Tensor) -> Tensor:
        return self._recorded(weight)

    def extra_repr(self) -> str:
        return self._str_repr()


class _STRMixin(_ThresholdState):
    """What STRConv2d and STRLinear share beyond the threshold: conversion from a dense layer, the effective weight."""

    @classmethod
    def from_dense(cls, dense: nn.Module, *, threshold=None, init=-15.0, grad="exact", backend="auto", component="",
                   block=1):
        """An STR layer that reuses `dense`'s weight and bias Parameters (optimizer state stays valid)."""
        layer = cls(*cls._constructor_args(dense), device="meta", dtype=dense.weight.dtype, threshold=threshold,
                    init=init, grad=grad, backend=backend, component=component, block=block)
        _adopt_parameters(layer, dense, threshold, init)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._str_repr()

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The soft-thresholded weight `w_hat` (detached)."""
        return soft_threshold(self.weight, self.s, backend=self.backend, block=self.block)

class STRConv2d(_STRMixin, nn.Conv2d):
    """`nn.Conv2d` with a soft-thresholded weight. Same constructor and forward as `nn.Conv2d`, plus:

    Args:
        threshold: a shared `ThresholdGroup` (owned by the caller, e.g. one per component), or None to
            own a fresh one (per-layer STR) initialised at `init`.
        init: initial `s` of an owned threshold (SPEC §2: -15 for ResNet-34, -18 for MobileNetV2;
            -1000 gives a dense layer).
        grad: "exact" or "ste" (SPEC §1).
        backend: soft-threshold backend (see `adapmtl.ops.soft_threshold`).
        component: name of the component the layer belongs to (used by reports).
        block: (bo, 1) or bo: threshold blocks of bo consecutive output channels by their norm (group soft
            threshold, `adapmtl.ops.soft_threshold`); 1, the default, is the element-wise threshold.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        threshold: ThresholdGroup | None = None,
        init: float = -15.0,
        grad: str = "exact",
        backend: str = "auto",
        component: str = "",
        block=1,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._init_str(self.weight, threshold, init, grad, backend, component, device, block)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self._recorded(self.weight), self.bias)

    @staticmethod
    def _constructor_args(conv: nn.Conv2d) -> tuple:
        return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode)


class STRLinear(_STRMixin, nn.Linear):
    """`nn.Linear` with a soft-thresholded weight; extra arguments as `STRConv2d`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        threshold: ThresholdGroup | None = None,
        init: float = -15.0,
        grad: str = "exact",
        backend: str = "auto",
        component: str = "",
        block=1,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_str(self.weight, threshold, init, grad, backend, component, device, block)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self._recorded(self.weight), self.bias)

    @staticmethod
    def _constructor_args(linear: nn.Linear) -> tuple:
        return (linear.in_features, linear.out_features, linear.bias is not None)


def _adopt_parameters(layer: _STRMixin, dense: nn.Module, threshold, init) -> None:
    """Move a layer built on the meta device onto `dense`'s Parameters and device."""
    device = dense.weight.device
    layer.weight = dense.weight
    layer.bias = dense.bias
    if threshold is None:
        layer.threshold = ThresholdGroup(init, device=device, dtype=_threshold_dtype(dense.weight))
    layer.last_nnz = torch.full((), dense.weight.numel(), dtype=torch.long, device=device)
    layer.train(dense.training)


def _threshold_dtype(weight: Tensor) -> torch.dtype:
    # float32 thresholds, except for float64 models (gradcheck) where s follows the weights.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


STR_LAYER_TYPES = (STRConv2d, STRLinear)
