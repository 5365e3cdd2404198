"""`SparseWeight`: a pruned weight packed once for the sparse inference kernels.

Layout (the one place it is documented; every backend reads these three arrays):

    dense weight   w: [C_out, C_in_per_group, KH, KW] (conv) or [out_features, in_features] (linear)
    row_ptr  int32 [C_out + 1]   CSR row pointers, one row per output channel; row_ptr[0] = 0,
                                 row_ptr[C_out] = nnz, non-decreasing.
    col_idx  int32 [nnz]         column of each non-zero in the flattened row of w:
                                 c * KH * KW + kh * KW + kw (conv), or the input feature (linear);
                                 strictly increasing within a row (row-major scan order).
    values   [nnz] (w's dtype)   the non-zero values, in the same order.
    shape    tuple               the dense weight's shape (restores w exactly, zeros included).

Exactly-zero entries are dropped; NaN/inf are kept (they are not zero), so `to_dense()` is `w` bit
for bit. Empty rows (fully pruned output channels) have row_ptr[i] == row_ptr[i + 1].

Kernel-private re-orderings are derived from these arrays inside each kernel and never stored:
the C++ CPU kernel turns each (c, kh, kw) into one element offset into a zero-padded, vector-aligned
copy of the input and groups each row into blocks, either of input channels (all taps) or of one tap
and a range of input channels, so that output tiles can skip taps that read only zero padding
(csrc/cpu/sparse_conv_cpu.cpp explains it); it also accepts rows whose columns are not sorted.
"""
from __future__ import annotations

import itertools
import math
import warnings
from typing import Sequence

import torch
from torch import Tensor


class SparseWeight:
    """A CSR-packed pruned weight. Build with `SparseWeight.from_dense(w)`.

    The constructor checks the arrays' contents once (vectorised: row_ptr starts at 0, never
    decreases and ends at nnz; every column lies in its row's range, strictly increasing within the
    row), so every backend only ever sees valid CSR; the arrays are read-only attributes."""

    __slots__ = ("_row_ptr", "_col_idx", "_values", "_shape")

    def __init__(self, row_ptr: Tensor, col_idx: Tensor, values: Tensor, shape: Sequence[int]):
        if isinstance(shape, Tensor) or not isinstance(shape, Sequence) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise TypeError(f"SparseWeight: argument 'shape' must be a sequence of ints, got {shape!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 4) or any(s < 0 for s in shape):
            raise ValueError(f"SparseWeight: argument 'shape' must be 2-D or 4-D and non-negative, got {shape}")
        cols = math.prod(shape[1:])
        if cols >= 2**31 or shape[0] >= 2**31:
            raise ValueError(f"SparseWeight: argument 'shape' {shape} is too large for int32 indices")
        for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("values", values)):
            if not isinstance(t, Tensor) or t.dim() != 1:
                raise TypeError(f"SparseWeight: argument {name!r} must be a 1-D torch.Tensor, got {_describe(t)}")
        if row_ptr.dtype != torch.int32 or col_idx.dtype != torch.int32:
            raise TypeError(
                f"SparseWeight: arguments 'row_ptr' and 'col_idx' must be int32, got {row_ptr.dtype} and {col_idx.dtype}"
            )
        if not values.is_floating_point():
            raise TypeError(f"SparseWeight: argument 'values' must be floating point, got {values.dtype}")
        if row_ptr.numel() != shape[0] + 1:
            raise ValueError(f"SparseWeight: argument 'row_ptr' must have {shape[0] + 1} entries, got {row_ptr.numel()}")
        if col_idx.numel() != values.numel():
            raise ValueError(
                f"SparseWeight: arguments 'col_idx' and 'values' must have equal length, got "
                f"{col_idx.numel()} and {values.numel()}"
            )
        if not (row_ptr.device == col_idx.device == values.device):
            raise ValueError("SparseWeight: 'row_ptr', 'col_idx' and 'values' must be on one device")
        if row_ptr.is_meta or col_idx.is_meta or values.is_meta:
            raise ValueError("SparseWeight: the arrays must hold data (got meta tensors)")
        row_ptr, col_idx = row_ptr.contiguous(), col_idx.contiguous()
        if not _is_traced(row_ptr):  # torch.export / compile trace fake tensors: contents checked when made
            _check_csr(row_ptr, col_idx, cols)
        self._row_ptr = row_ptr
        self._col_idx = col_idx
        self._values = values.contiguous()
        self._shape = shape

    row_ptr = property(lambda self: self._row_ptr, doc="int32 [C_out + 1] row pointers")
    col_idx = property(lambda self: self._col_idx, doc="int32 [nnz] columns")
    values = property(lambda self: self._values, doc="[nnz] non-zero values")
    shape = property(lambda self: self._shape, doc="the dense weight's shape")

    @classmethod
    def from_dense(cls, w: Tensor) -> "SparseWeight":
        """Pack a dense (pruned) weight of shape [C_out, C_in/groups, KH, KW] or [out, in]."""
        if not isinstance(w, Tensor):
            raise TypeError(f"SparseWeight.from_dense: argument 'w' must be a torch.Tensor, got {_describe(w)}")
        if w.dim() not in (2, 4):
            raise ValueError(f"SparseWeight.from_dense: argument 'w' must be 2-D or 4-D, got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"SparseWeight.from_dense: argument 'w' must be floating point, got {w.dtype}")
        cols = math.prod(w.shape[1:])
        if cols >= 2**31 or w.numel() >= 2**31:
            raise ValueError(f"SparseWeight.from_dense: argument 'w' is too large for int32 indices: {tuple(w.shape)}")
        w = w.detach()
        flat = w.reshape(w.shape[0], cols)
        mask = flat != 0
        counts = mask.sum(dim=1, dtype=torch.int64)
        row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32, device=w.device)
        row_ptr[1:] = counts.cumsum(0).to(torch.int32)
        # nonzero() scans row-major, so the columns come out sorted within each row.
        col_idx = mask.nonzero()[:, 1].to(torch.int32)
        values = flat[mask].clone()
        return cls(row_ptr, col_idx, values, w.shape)

    @classmethod
    def cat_rows(cls, weights: Sequence["SparseWeight"]) -> "SparseWeight":
        """The weights' output channels one after another (their rows stacked): the packed form of
        torch.cat of their dense weights along dim 0. They must agree in every other dimension, dtype and device."""
        weights = list(weights)
        if not weights or not all(isinstance(w, SparseWeight) for w in weights):
            raise TypeError("SparseWeight.cat_rows: argument 'weights' must be a non-empty sequence of SparseWeight")
        first = weights[0]
        for w in weights[1:]:
            if w.shape[1:] != first.shape[1:] or w.dtype != first.dtype or w.device != first.device:
                raise ValueError(f"SparseWeight.cat_rows: weights of shape {w.shape[1:]} {w.dtype} {w.device} and "
                                 f"{first.shape[1:]} {first.dtype} {first.device} cannot be stacked")
        offsets = [0, *itertools.accumulate(w.nnz for w in weights)]
        if offsets[-1] >= 2**31:
            raise ValueError(f"SparseWeight.cat_rows: {offsets[-1]} non-zeros are too many for int32 row pointers")
        row_ptr = torch.cat([first.row_ptr[:1]] + [w.row_ptr[1:] + o for w, o in zip(weights, offsets)])
        return cls(row_ptr, torch.cat([w.col_idx for w in weights]), torch.cat([w.values for w in weights]),
                   (sum(w.shape[0] for w in weights), *first.shape[1:]))

    def to_dense(self) -> Tensor:
        """The dense weight (zeros where nothing is stored)."""
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(rows, device=self.values.device), counts)
        dense = torch.zeros(rows * cols, dtype=self.values.dtype, device=self.values.device)
        dense[row_of * cols + self.col_idx.to(torch.int64)] = self.values
        return dense.reshape(self.shape)

    def trim_taps(self, margin: tuple[int, int]) -> "SparseWeight | None":
        """The conv weight without its outer `margin` = (rows, cols) of kernel taps on every side: a [C_out, C_in,
        KH - 2 mh, KW - 2 mw] weight holding the stored entries of the taps in between (their order kept). None
        when a dropped entry is not finite: on padding it gives NaN (inf * 0), which the trimmed conv would lose."""
        if len(self.shape) != 4:
            raise ValueError(f"SparseWeight.trim_taps: needs a 4-D conv weight, got shape {self.shape}")
        c_out, c_in, kh, kw = self.shape
        mh, mw = margin
        if not (0 <= 2 * mh < kh and 0 <= 2 * mw < kw):
            raise ValueError(f"SparseWeight.trim_taps: margin {margin} leaves no tap of a {kh}x{kw} kernel")
        cols = self.col_idx.to(torch.int64)
        channel, tap = cols // (kh * kw), cols % (kh * kw)
        r, q = tap // kw, tap % kw
        keep = (r >= mh) & (r < kh - mh) & (q >= mw) & (q < kw - mw)
        if not bool(torch.isfinite(self.values[~keep]).all()):
            return None
        kh2, kw2 = kh - 2 * mh, kw - 2 * mw
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(c_out, device=cols.device), counts)
        row_ptr = torch.zeros(c_out + 1, dtype=torch.int32, device=cols.device)
        row_ptr[1:] = torch.bincount(row_of[keep], minlength=c_out).cumsum(0).to(torch.int32)
        col_idx = (channel * (kh2 * kw2) + (r - mh) * kw2 + (q - mw))[keep].to(torch.int32)
        return SparseWeight(row_ptr, col_idx, self.values[keep], (c_out, c_in, kh2, kw2))

    def to_torch_csr(self) -> Tensor:
        """The same matrix [C_out, C_in*KH*KW] as a `torch.sparse_csr_tensor` (the torch.sparse peer)."""
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        with warnings.catch_warnings():  # torch warns that sparse CSR is "beta" on every construction
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.row_ptr.to(torch.int64), self.col_idx.to(torch.int64), self.values, size=(rows, cols),
                check_invariants=False,
            )

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        """Fraction of exactly-zero entries of the dense weight (1.0 for an empty weight)."""
        return 1.0 - self.nnz / self.numel if self.numel else 1.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device=None, dtype=None) -> "SparseWeight":
        """Move to `device` and/or cast the values to `dtype` (indices stay int32)."""
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"SparseWeight.to: argument 'dtype' must be floating point, got {dtype}")
        return SparseWeight(
            self.row_ptr.to(device), self.col_idx.to(device), self.values.to(device=device, dtype=dtype), self.shape
        )

    def cpu(self) -> "SparseWeight":
        return self.to("cpu")

    def cuda(self, device=None) -> "SparseWeight":
        return self.to(torch.device("cuda") if device is None else device)

    def state_tensors(self) -> dict[str, Tensor]:
        """The packed arrays plus the dense shape (as an int64 tensor), for saving."""
        return {
            "row_ptr": self.row_ptr,
            "col_idx": self.col_idx,
            "values": self.values,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_tensors(cls, state: dict[str, Tensor]) -> "SparseWeight":
        missing = {"row_ptr", "col_idx", "values", "shape"} - set(state)
        if missing:
            raise ValueError(f"SparseWeight.from_state_tensors: missing entries {sorted(missing)}")
        shape = state["shape"]
        if not isinstance(shape, Tensor) or shape.dim() != 1 or shape.dtype != torch.int64:
            raise TypeError(f"SparseWeight.from_state_tensors: entry 'shape' must be a 1-D int64 tensor, got "
                            f"{_describe(shape)}")
        return cls(state["row_ptr"], state["col_idx"], state["values"], shape.tolist())

    def __repr__(self) -> str:
        return (
            f"SparseWeight(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.4f}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _is_traced(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _check_csr(row_ptr: Tensor, col_idx: Tensor, cols: int) -> None:
    """Valid CSR, or ValueError saying what is wrong. Vectorised, two host syncs (one per stage)."""
    nnz = col_idx.numel()
    r = row_ptr.to(torch.int64)
    counts = r[1:] - r[:-1]
    out_of_range = (col_idx < 0) | (col_idx >= cols)
    if bool(torch.stack([r[0] != 0, r[-1] != nnz, (counts < 0).any(), out_of_range.any()]).any()):
        if int(r[0]) != 0 or int(r[-1]) != nnz:
            raise ValueError(f"SparseWeight: argument 'row_ptr' must start at 0 and end at nnz = {nnz}, got "
                             f"{int(r[0])} ... {int(r[-1])}")
        if bool((counts < 0).any()):
            row = int(torch.nonzero(counts < 0)[0, 0])
            raise ValueError(f"SparseWeight: argument 'row_ptr' must be non-decreasing, but row_ptr[{row}] = "
                             f"{int(r[row])} > row_ptr[{row + 1}] = {int(r[row + 1])}")
        k = int(torch.nonzero(out_of_range)[0, 0])
        raise ValueError(f"SparseWeight: argument 'col_idx' entries must lie in [0, {cols}), got col_idx[{k}] = "
                         f"{int(col_idx[k])}")
    if nnz < 2:
        return
    # Strictly increasing within each row: a step down (or a repeat) is allowed only where a row starts.
    starts = torch.zeros(nnz, dtype=torch.bool, device=col_idx.device)
    starts[r[1:-1][counts[1:] > 0]] = True
    bad = (col_idx[1:] <= col_idx[:-1]) & ~starts[1:]
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0]) + 1
        row = int(torch.searchsorted(r, torch.tensor([k], device=r.device), right=True)[0]) - 1
        raise ValueError(f"SparseWeight: argument 'col_idx' must be strictly increasing within each row (no "
                         f"duplicates), but row {row} holds column {int(col_idx[k - 1])} and then {int(col_idx[k])}")


def _describe(obj) -> str:
    if isinstance(obj, Tensor):
        return f"a {obj.dim()}-D tensor of dtype {obj.dtype}"
    return type(obj).__name__
