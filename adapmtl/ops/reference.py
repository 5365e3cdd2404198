"""Pure-PyTorch reference of the soft-threshold reparameterisation (SPEC §1).

Plain tensor ops and autograd: the baseline every kernel is tested and benchmarked against.
"""
from __future__ import annotations

import torch


class _StraightThrough(torch.autograd.Function):
    """Returns `w_hat` unchanged; passes the incoming gradient to `w` as is (identity) and to `w_hat`,
    whose graph carries the exact gradient on to the threshold."""

    @staticmethod
    def forward(ctx, w, w_hat):
        return w_hat.view_as(w_hat)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def soft_threshold_reference(w: torch.Tensor, s: torch.Tensor, ste: bool = False) -> torch.Tensor:
    """`sign(w) * relu(|w| - sigmoid(s))`.

    Exact gradients are plain autograd of that formula. With `ste`, `w` gets the incoming gradient
    unchanged (straight-through) while `s` keeps its exact gradient.
    """
    threshold = torch.sigmoid(s.reshape(()))
    if not ste:
        return torch.sign(w) * torch.relu(w.abs() - threshold)
    frozen = w.detach()
    return _StraightThrough.apply(w, torch.sign(frozen) * torch.relu(frozen.abs() - threshold))
