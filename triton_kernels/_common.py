"""Helpers shared by the Triton kernel launchers."""
import contextlib

import torch


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (nothing to do on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
