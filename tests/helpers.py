"""Shared test helpers: which backends run here, and tolerances per dtype."""
import importlib.util
import math
import os

import pytest
import torch

from adapmtl.ops.backends import BACKEND_DTYPES, available

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON_KERNELS = importlib.util.find_spec("triton") is not None and (
    HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
)


def backend_device_pairs(op="soft_threshold"):
    """(backend, device) for every backend of `op` that can run on this machine (the op layer's table)."""
    pairs = [(b, "cpu") for b in available(op, "cpu")]
    if HAS_CUDA:
        pairs += [(b, "cuda") for b in available(op, "cuda")]
    return pairs


def compiled_backend_device_pairs(op="soft_threshold"):
    return [(b, d) for b, d in backend_device_pairs(op) if b not in ("torch", "torch_csr")]


def dtypes_of(backend, device):
    """The dtypes `backend` implements (the op layer's table); for the torch backends, what tests run them in."""
    if backend in ("torch", "torch_csr"):
        return (torch.float32, torch.float64) + ((torch.float16, torch.bfloat16) if device == "cuda" else ())
    return BACKEND_DTYPES[backend]


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def param_backend_dtypes(pairs):
    """Parametrize (backend, device, dtype) over `pairs` and every dtype each backend implements there."""
    cases = [(b, d, dt) for b, d in pairs for dt in dtypes_of(b, d)]
    return pytest.mark.parametrize("backend,device,dtype", cases,
                                   ids=[f"{b}-{d}-{dtype_name(dt)}" for b, d, dt in cases])


def assert_close_to_reference(out, ref, torch_out, scale, factor=2.0, ulps=16, msg=""):
    """flash-attention's bound: the largest error of `out` against the float64 reference `ref` is at most
    `factor` times that of PyTorch's own op in out's dtype (`torch_out`), plus `ulps` units of out's dtype
    at the largest `scale` (the magnitude of the summed terms, e.g. F.conv2d(|x|, |w|) + |b|), which
    bounds the error where PyTorch's happens to be ~0 (float64, or a few terms)."""
    assert out.shape == ref.shape, f"{msg}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    floor = ulps * torch.finfo(out.dtype).eps * scale.abs().max().item()
    assert err <= factor * torch_err + floor, (
        f"{msg}: max error {err:.3g} > {factor} x PyTorch's {torch_err:.3g} + {floor:.3g} ({out.dtype})")


def assert_sum_close(got, ref, torch_value, terms, factor=2.0, msg=""):
    """A reduction (e.g. dL/ds = -g(1-g)·Σ G·sign(w)·m) against its float64 value `ref`: the error is at most
    `factor` times that of PyTorch's own computation in the same dtypes (`torch_value`), plus the rounding a
    blocked float32 sum of `terms` (float64) can make, (log2(n) + 4) float32 ulps of Σ|terms|. Nothing here
    grows with the tensor faster than its rounding does, so a wrong sign or a dropped mask is caught at any size."""
    got, ref, torch_value = float(got), float(ref), float(torch_value)
    if ref != ref:
        assert got != got, f"{msg}: got {got}, want NaN"
        return
    torch_err = abs(torch_value - ref)
    n = max(terms.numel(), 1)
    floor = (math.log2(n) + 4) * torch.finfo(torch.float32).eps * float(terms.double().abs().sum())
    assert abs(got - ref) <= factor * torch_err + floor, (
        f"{msg}: error {abs(got - ref):.3g} > {factor} x PyTorch's {torch_err:.3g} + {floor:.3g} (got {got:.6g}, "
        f"float64 {ref:.6g})")


def tolerances(dtype):
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    }[dtype]


def param_backends(pairs):
    return pytest.mark.parametrize("backend,device", pairs, ids=[f"{b}-{d}" for b, d in pairs])


def tiny_run_config(root, out_dir, settings: dict, overrides: dict | None = None):
    """A Config for a short run of the tiny model on synthetic scenes at `root` (32 px, no progress bar,
    TensorBoard or plots): a common base, the test file's `settings` merged in per section, then
    `key.sub=value` overrides."""
    from adapmtl.train import config_from_dict
    from adapmtl.train.config import apply_override

    base = {
        "method": "adapmtl", "out_dir": str(out_dir),
        "data": {"dataset": "synthetic", "root": root, "image_size": 32, "crop_size": 32},
        "model": {"backbone": "tiny"},
        "train": {"progress": False, "tensorboard": False, "plots": False},
    }
    for key, value in settings.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    cfg = config_from_dict(base)
    for k, v in (overrides or {}).items():
        apply_override(cfg, f"{k}={v}")
    return cfg.validate()


def tiny_demo_overrides(data_root) -> list[str]:
    """CLI overrides that shrink `-c demo` to a 2-iteration run on 8 small synthetic scenes at data_root."""
    return [f"data.root={data_root}", "data.n_train=8", "data.n_test=2", "data.image_size=32", "data.crop_size=32",
            "data.batch_size=4", "data.val_fraction=0.25", "train.iterations=2", "train.val_every=2",
            "train.ckpt_every=2", "train.progress=false", "train.tensorboard=false", "train.plots=false"]


def small_run_config(root, out_dir, **over):
    """A Config for a few iterations of the tiny model on 12 + 4 synthetic scenes, logging and checkpointing every
    iteration (the fault and hostile-input tests); `key.sub=value` overrides."""
    return tiny_run_config(root, out_dir, {
        "data": {"n_train": 12, "n_test": 4, "batch_size": 4, "eval_batch_size": 4, "val_fraction": 0.25},
        "model": {"head_channels": 4},
        "prune": {"s0": -4.0, "target_sparsity": 0.5},
        "loss_weights": {"start": 1, "window": 2},
        "train": {"iterations": 6, "log_every": 1, "val_every": 3, "ckpt_every": 1},
    }, over)


def last_logged_step(run) -> int:
    """The last training step a run folder's log.jsonl shows (0 before the first); a line being written is not
    counted."""
    import json

    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            steps.append(int(row["step"]))
    return max(steps)


def start_and_wait_for_step(args, run, step, timeout=120, **popen):
    """Start `args` (a training process writing to `run`) and return it once its log shows `step`; fails if it
    ended first, so that whatever the caller does next lands mid-training."""
    import subprocess
    import time

    proc = subprocess.Popen(args, **popen)
    deadline = time.time() + timeout
    while last_logged_step(run) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
    return proc
