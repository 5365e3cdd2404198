"""The checkpoint file format: atomic, checksummed, verified before anything is unpickled.

A checkpoint file is a 64-byte header then a `torch.save` payload:
    magic b"ADAPMTL-CKPT-v1\n" (16 B) | SHA-256 of the payload (32 B) | payload length (8 B, LE)
    | iteration (8 B, LE, signed; -1 when not a training state)
so truncation, flipped bytes and foreign files are caught before unpickling (which is `weights_only=True`
as well). Files are written to a temp file in the same folder, fsynced and renamed (`write_json_atomic` does the
same for the JSON results files). Rotation and resume live in adapmtl.train.checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile

import torch

MAGIC = b"ADAPMTL-CKPT-v1\n"
_HEADER = struct.Struct("<16s32sqq")  # magic, sha256, payload length, iteration
TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not an adapmtl checkpoint (the message names it)."""


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through (torch.save streams into it)."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save reports a failed write as "unexpected pos": keep the cause

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        try:
            return self.fh.write(b)
        except OSError as exc:
            self.error = exc
            raise


def atomic_save(obj, path: str, iteration: int = -1, before_replace=None) -> None:
    """Write `obj` as a checksummed checkpoint file: a reader (or a crash at any moment) sees either the
    old complete file or the new complete file, never a partial one. `before_replace()` runs once the new
    file is complete on disk, just before it takes `path`'s name (rotation: nothing is moved before the new
    file exists). A failed write (a full disk) is an OSError naming its cause and the file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path), dir=directory)
    writer = None
    try:
        with os.fdopen(fd, "w+b") as fh:
            fh.write(b"\0" * _HEADER.size)
            writer = _HashingWriter(fh)
            torch.save(obj, writer)
            fh.seek(0)
            fh.write(_HEADER.pack(MAGIC, writer.sha.digest(), writer.size, int(iteration)))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, output_mode())  # mkstemp makes 0600; a checkpoint is an ordinary output file
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {os.strerror(cause.errno)} (in {directory}); "
                          "the checkpoints already there are intact") from exc
        raise
    _fsync_dir(directory)


def output_mode() -> int:
    """The mode open() would give a new file: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def is_adapmtl_checkpoint(path: str) -> bool:
    """Whether the file starts with this format's magic (reads 16 bytes)."""
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def _parse_header(data: bytes, path: str) -> tuple[bytes, int, int]:
    """(sha256, payload length, iteration) from the first bytes of a file, or CheckpointError."""
    if len(data) < _HEADER.size or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"checkpoint {path!r} is not an adapmtl checkpoint (bad header; truncated, corrupt, "
                              "or written by another program)")
    _, digest, size, iteration = _HEADER.unpack(data[:_HEADER.size])
    return digest, size, iteration


def read_header(path: str) -> tuple[int, int]:
    """(payload length, iteration) of a checkpoint file, reading only its header."""
    with open(path, "rb") as fh:
        _, size, iteration = _parse_header(fh.read(_HEADER.size), path)
    return size, iteration


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    """Verify a checkpoint file's checksum and load it (weights_only). CheckpointError names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file at {path!r}")
    with open(path, "rb") as fh:
        data = fh.read()
    digest, size, _ = _parse_header(data, path)
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {path!r} is truncated or padded: {len(payload)} payload bytes, the header "
                              f"says {size}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its SHA-256 does not match the one it was written with")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a verified payload that still fails: report it against the file
        raise CheckpointError(f"checkpoint {path!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a dict")
    return state


def write_json_atomic(path, obj, indent: int = 1) -> None:
    """Write `obj` as JSON so that a reader (`compare --reuse`, another process) or a crash at any moment
    sees the old complete file or the new complete one, never a partial one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=indent)
        os.chmod(tmp, output_mode())  # mkstemp makes 0600; results are ordinary output files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
