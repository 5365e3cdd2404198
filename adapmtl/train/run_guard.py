"""What keeps a training run's folder and work safe from the faults an operator meets: one trainer per folder
(a lock that dies with its process), a stop on SIGTERM/SIGINT that finishes the step and checkpoints first,
and a free-space check before the first checkpoint."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented)
    fcntl = None

LOCK_NAME = ".adapmtl-run.lock"


class RunLockedError(RuntimeError):
    """Another live process is training in this out_dir."""


class TrainingInterrupted(Exception):
    """fit() stopped on a signal after writing a checkpoint; `signum` is the signal (exit code 128 + signum)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class OutDirLock:
    """An exclusive `flock` on `<out_dir>/.adapmtl-run.lock` while a trainer writes there. The kernel drops it
    when the holder dies (kill -9 included), so a stale lock file is simply taken over; the file says who
    holds it (pid, host, start, command) for the error a second trainer gets."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None

    def __enter__(self) -> "OutDirLock":
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"train: {os.path.dirname(self.path)} is in use by another trainer ({holder}); "
                                     "wait for it, stop it, or give this run another out_dir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime(
            "%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:200]}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (the next holder overwrites it)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]}, started {str(info['started'])[:32]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class StopSignals:
    """While active (main thread only), SIGTERM and SIGINT only set `requested`: the trainer finishes its step,
    writes a checkpoint and stops. The first signal restores the previous handler, so a second one acts at
    once (SIGINT: KeyboardInterrupt; SIGTERM: the default, which ends the process)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        print(f"adapmtl: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def check_free_space(out_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, files: int) -> None:
    """Refuse to start when `files` checkpoints (the kept ones and the one being written) cannot fit in the free
    space of `out_dir`: the model's parameters and buffers plus the optimizer state (Adam: two moments per
    parameter, counted before they exist), with 10% and 1 MiB to spare."""
    tensors = list(model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for t in tensors) + 2 * params
    need = int(files * (state * 1.1 + (1 << 20)))
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OSError(errno.ENOSPC, f"train: not enough space in {out_dir} for {files} checkpoints of about "
                      f"{state / 2**20:.1f} MiB: {free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed "
                      "(free some, or lower train.keep_checkpoints)")
