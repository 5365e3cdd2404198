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


def block_soft_threshold_reference(w: torch.Tensor, s: torch.Tensor, block: int, ste: bool = False) -> torch.Tensor:
    """`w_B * relu(1 - sigmoid(s) / ||w_B||_2)` over blocks B of `block` consecutive output channels (dim 0) at
    each position of the other dims; the last block holds the OC % block channels left, if any.

    Exact gradients are autograd of that formula. A block at or below the threshold (||w_B|| <= g) is zero and
    passes no gradient; its norm is replaced by 1 before the square root so that an all-zero block has a finite
    (zero) gradient rather than 0 * inf. With `ste`, `w` gets the incoming gradient unchanged while `s` keeps
    its exact gradient.
    """
    threshold = torch.sigmoid(s.reshape(()))
    source = w.detach() if ste else w
    oc = source.shape[0] if source.dim() else 1
    cols = source.numel() // oc if oc else 0
    rows = source.reshape(oc, cols)
    padded = torch.nn.functional.pad(rows, (0, 0, 0, (-oc) % block)).reshape(-(-oc // block), block, cols)
    sq = (padded * padded).sum(1, keepdim=True)
    dead = torch.sqrt(sq.detach()) <= threshold  # False for NaN: a NaN block stays NaN
    norm = torch.sqrt(torch.where(dead, torch.ones_like(sq), sq))
    scale = torch.where(dead, torch.zeros_like(sq), 1 - threshold / norm)
    out = (padded * scale).reshape(-(-oc // block) * block, cols)[:oc].reshape(w.shape)
    return _StraightThrough.apply(w, out) if ste else out
