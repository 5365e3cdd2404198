"""Faults an operator meets (issue 32): two trainers on one folder, changed settings on resume, stale compare
results, preemption signals, a full disk, hostile cache files and environment values, CLI arguments."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import adapmtl.checkpoint_io as checkpoint_io
import adapmtl.train.run_guard as run_guard
from adapmtl.train import RunLockedError, Trainer, TrainingInterrupted
from adapmtl.train.checkpoint import load_checkpoint_file, read_header
from adapmtl.train.run_guard import OutDirLock, StopSignals
from helpers import last_logged_step, small_run_config, start_and_wait_for_step, tiny_demo_overrides


@pytest.fixture(scope="module")
def scenes(synthetic_scenes):
    return synthetic_scenes(12, 4)


_cfg = small_run_config


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "adapmtl", *args], capture_output=True, text=True, timeout=300, **kw)


def _yaml_config(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


# ---------------------------------------------------------------------------------------------- 1. one folder
def test_a_second_trainer_on_a_busy_folder_is_refused_naming_the_holder(scenes, tmp_path):
    run = tmp_path / "run"
    with OutDirLock(str(tmp_path)):  # a live holder (this process)
        pass
    run.mkdir()
    with OutDirLock(str(run)):
        with pytest.raises(RunLockedError, match=rf"{run} is in use by another trainer \(pid {os.getpid()} on "):
            Trainer(_cfg(scenes, run)).fit()
        assert not (run / "log.jsonl").exists()  # refused before writing anything
    Trainer(_cfg(scenes, run, **{"train.iterations": 2})).fit()  # released: the folder is free again


def test_two_processes_on_one_folder(scenes, tmp_path):
    """A runs; B on the same folder exits 2 with one line naming A's pid and touches nothing; A finishes as if
    alone. A killed with SIGKILL leaves a stale lock file, which the next trainer takes over."""
    run = tmp_path / "run"
    path = _yaml_config(tmp_path, _cfg(scenes, run, **{"train.iterations": 40, "train.val_every": 40,
                                                       "train.ckpt_every": 40}))
    a = start_and_wait_for_step([sys.executable, "-m", "adapmtl", "train", "-c", path], run, 1,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # A paused (still holding its flock) while B tries: 40 small steps can end before B's interpreter starts
    a.send_signal(signal.SIGSTOP)
    try:
        b = _cli(["train", "-c", path, "seed=1"])
    finally:
        a.send_signal(signal.SIGCONT)
    assert b.returncode == 2 and len(b.stderr.strip().splitlines()) == 1, b.stderr
    assert f"in use by another trainer (pid {a.pid} " in b.stderr
    assert a.wait(timeout=300) == 0, a.stderr.read()
    results = json.loads((run / "results.json").read_text())
    assert results["iterations"] == 40 and yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0
    # stale: a holder killed with SIGKILL
    c = start_and_wait_for_step([sys.executable, "-m", "adapmtl", "train", "-c", path, "train.iterations=80",
                                 "train.resume=auto"], run, 41, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c.kill()
    c.wait()
    assert (run / run_guard.LOCK_NAME).exists()
    d = _cli(["train", "-c", path, "train.iterations=42", "train.resume=auto"], stdin=subprocess.DEVNULL)
    assert d.returncode == 0, d.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- 2. resume
def test_changed_settings_on_resume_are_refused_or_applied_and_said(scenes, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(scenes, run)).fit(stop_at=3)
    auto = {"train.resume": "auto"}
    for key, value in (("optim.lr", 0.1), ("optim.betas", "[0.9,0.99]"), ("optim.weight_decay", 0.5),
                       ("optim.step_size", 7), ("optim.gamma", 0.9), ("model.channels", "[8,8,8,8]"),
                       ("data.tasks", "[depth]"), ("prune.control", "paper"), ("prune.block", 4)):
        with pytest.raises(ValueError, match=rf"resume: .*latest.pt was written with other settings .*{key}: "):
            Trainer(_cfg(scenes, run, **auto, **{key: value}))
    # what a resume may change: said in a warning, then used
    for key, value, says in (("seed", 5, "data order"), ("train.iterations", 8, "new length"),
                             ("prune.target_sparsity", 0.6, "new target"), ("train.amp", "bf16", "autocast")):
        with pytest.warns(UserWarning, match=rf"resume: {key}: .* -> .*{says}"):
            tr = Trainer(_cfg(scenes, run, **auto, **{key: value}))
        assert tr.iteration == 3
    # things that do not touch the state: no word
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(_cfg(scenes, run, **auto, **{"train.log_every": 2, "train.progress": False, "data.num_workers": 0}))


def test_cli_resume_with_another_model_is_one_line_exit_2(scenes, tmp_path):
    run = tmp_path / "run"
    path = _yaml_config(tmp_path, _cfg(scenes, run, **{"train.iterations": 2}))
    assert _cli(["train", "-c", path]).returncode == 0
    done = _cli(["train", "-c", path, "train.resume=auto", "model.channels=[8,8,8,8]", "train.iterations=4"])
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "model.channels: None -> [8, 8, 8, 8]" in done.stderr


# ---------------------------------------------------------------------------------------------- 3. compare --reuse
def test_compare_reuse_checks_the_plan_and_the_results(scenes, tmp_path):
    from adapmtl.train.compare import compare
    from adapmtl.train.config import apply_override

    cfg = _cfg(scenes, tmp_path, **{"train.iterations": 2, "train.val_every": 2, "train.ckpt_every": 2})
    for item in ("compare.methods=[dense,adapmtl]", "compare.sparsities=[0.5]", "compare.seeds=1",
                 "compare.start=scratch"):
        apply_override(cfg, item)
    compare(cfg)
    results = tmp_path / "seed0" / "sparsity50" / "adapmtl" / "results.json"
    stamp = os.path.getmtime(results)
    apply_override(cfg, "train.iterations=3")  # another plan: the old runs are trained again, saying why
    with pytest.warns(UserWarning, match=r"trained with another plan \(train.iterations: 2 -> 3"):
        out = compare(cfg, reuse=True)
    assert os.path.getmtime(results) != stamp and json.loads(results.read_text())["iterations"] == 3
    assert all(r["method"] in ("dense", "adapmtl") for r in out["runs"])
    good = results.read_text()
    for broken, says in (("{", "not valid JSON"),
                         (good.replace('"overall": ', '"overall": 7.5, "was": '), "sparsity of 7.5"),
                         (json.dumps({**json.loads(good), "test": {"depth": {"abs_err": float("nan")}}}),
                          "test.depth.abs_err is nan")):
        results.write_text(broken)
        with pytest.raises(ValueError, match=rf"compare: {results}: .*{says}"):
            compare(cfg, reuse=True)


# ---------------------------------------------------------------------------------------------- 4. signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_with_its_code(scenes, tmp_path, sig):
    """ckpt_every is 100: without the handling, up to 99 iterations would be lost. Resumed, the run ends as an
    uninterrupted one would."""
    over = {"train.iterations": 30, "train.val_every": 100, "train.ckpt_every": 100}
    ref = tmp_path / "ref"
    Trainer(_cfg(scenes, ref, **over)).fit()
    run = tmp_path / "run"
    path = _yaml_config(tmp_path, _cfg(scenes, run, **over))
    proc = start_and_wait_for_step([sys.executable, "-m", "adapmtl", "train", "-c", path], run, 3,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig, err
    _, at = read_header(str(run / "latest.pt"))
    assert 3 <= at < 30 and last_logged_step(run) == at  # the step in progress finished and was saved, nothing lost
    assert f"stopped on {signal.Signals(sig).name} after iteration {at}" in err
    done = _cli(["train", "-c", path, "train.resume=auto"])
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_checkpoint_file(str(ref / "latest.pt")), load_checkpoint_file(str(run / "latest.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_second_signal_stops_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT  # the first one only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fit_raises_training_interrupted_in_python(scenes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = Trainer(_cfg(scenes, run, **{"train.iterations": 6, "train.ckpt_every": 100, "train.val_every": 100}))
    real = tr.train_step

    def step(batch):
        out = real(batch)
        if tr.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(tr, "train_step", step)
    with pytest.raises(TrainingInterrupted, match="stopped on SIGTERM after iteration 2") as info:
        tr.fit()
    assert info.value.signum == signal.SIGTERM and read_header(str(run / "latest.pt"))[1] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


# ---------------------------------------------------------------------------------------------- 5. a full disk
def test_a_full_disk_names_the_cause_and_keeps_the_last_checkpoint(scenes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = Trainer(_cfg(scenes, run, **{"train.iterations": 6, "train.keep_checkpoints": 3}))
    assert tr.fit(stop_at=3) is None
    real_fdopen = os.fdopen

    class FullDisk:  # a file on a disk that fills up after 4 KiB, as a small tmpfs does
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, b):
            if self.written + len(b) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.fh.write(b)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(checkpoint_io.os, "fdopen", lambda fd, mode="r": FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=rf"cannot write checkpoint {run}/latest.pt: No space left on device \(in {run}\)"):
        Trainer(_cfg(scenes, run, **{"train.resume": "auto"})).fit()
    monkeypatch.setattr(checkpoint_io.os, "fdopen", real_fdopen)
    assert read_header(str(run / "latest.pt"))[1] == 3  # written first, rotated after: the newest stays
    assert sorted(p.name for p in run.glob("latest*.pt")) == ["latest-00000001.pt", "latest-00000002.pt", "latest.pt"]
    assert not list(run.glob(".tmp-*"))
    assert Trainer(_cfg(scenes, run, **{"train.resume": "auto"})).iteration == 3  # no fallback needed


def test_too_little_space_is_refused_before_training(scenes, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_guard.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    from adapmtl.cli import main

    cfg = _cfg(scenes, tmp_path / "run")
    assert main(["train", "-c", _yaml_config(tmp_path, cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not enough space in" in err and "train.keep_checkpoints" in err
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------- 6. cache files
_TUNE = r"""
import sys, torch
from adapmtl import SparseWeight
from adapmtl.ops import set_cpu_autotune, sparse_conv2d
torch.manual_seed(0)
w = torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) > 0.8)
set_cpu_autotune(True, cache_file=sys.argv[1])
print(tuple(sparse_conv2d(torch.randn(1, 4, 9, 9), SparseWeight.from_dense(w), None, 1, 1, backend="cpp").shape))
"""


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge", "long_line", "directory"])
def test_a_hostile_autotune_cache_file_is_a_warning_never_a_hang(tmp_path, kind):
    from adapmtl.ops import available_backends
    if "cpp" not in available_backends("cpu"):
        pytest.skip("C++ extension not built")
    path = tmp_path / "cache"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    elif kind == "huge":
        path.write_text("x\tlayout=chan\n" * 400_000)  # 5.6 MB
    elif kind == "long_line":
        path.write_text("k" * 100_000 + "\tlayout=chan\n")
    else:
        path.mkdir()
    done = subprocess.run([sys.executable, "-c", _TUNE, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "(1, 8, 9, 9)", done.stderr[-2000:]
    says = {"fifo": "is not a regular file", "dev_zero": "is not a regular file", "huge": "only its first",
            "long_line": "malformed line", "directory": "is not a regular file"}[kind]
    assert says in done.stderr


# ---------------------------------------------------------------------------------------------- 7. environment
_ENV_PROBE = ("import torch; from adapmtl import SparseWeight; from adapmtl.ops import soft_threshold, sparse_conv2d; "
              "soft_threshold(torch.randn(2_000_000), torch.tensor(0.), backend='cpp'); "
              "sparse_conv2d(torch.randn(1, 2, 5, 5), SparseWeight.from_dense(torch.randn(2, 2, 3, 3)), None, 1, 1, "
              "backend='cpp'); print('ok')")


@pytest.mark.parametrize("name,value", [
    ("ADAPMTL_CPU_BUFFER_POOL_MB", "abc"), ("ADAPMTL_CPU_BUFFER_POOL_MB", "-5"), ("ADAPMTL_CPU_BUFFER_POOL_MB", "64abc"),
    ("ADAPMTL_CPU_BUFFER_POOL_MB", "1e3"), ("ADAPMTL_CPU_BUFFER_POOL_MB", str(2**43)),
    ("ADAPMTL_CPU_AUTOTUNE", "true"), ("ADAPMTL_CPU_AUTOTUNE", "2"),
])
def test_a_bad_environment_value_is_an_error_naming_it(name, value):
    from adapmtl.ops import available_backends
    if "cpp" not in available_backends("cpu"):
        pytest.skip("C++ extension not built")
    done = subprocess.run([sys.executable, "-c", _ENV_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, name: value})
    assert done.returncode != 0 and f"ValueError: {name} must be" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("name,value", [("ADAPMTL_CPU_BUFFER_POOL_MB", "0"), ("ADAPMTL_CPU_BUFFER_POOL_MB", "64"),
                                        ("ADAPMTL_CPU_AUTOTUNE", "0"), ("ADAPMTL_CPU_AUTOTUNE", "")])
def test_good_environment_values_run(name, value):
    done = subprocess.run([sys.executable, "-c", _ENV_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, name: value})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- 8. the CLI
def test_cli_refuses_bad_export_and_eval_arguments_first(tmp_path, monkeypatch, capsys):
    from adapmtl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "-c", "demo", *tiny_demo_overrides(tmp_path / "data")]) == 0
    ckpt = str(tmp_path / "runs" / "demo" / "latest.pt")
    capsys.readouterr()
    for argv, says in (
        (["export", "--checkpoint", ckpt, "--out", "m.pt2", "--format", "pt2", "--input-size", "-5"],
         "--input-size must be a positive number"),
        (["eval", "--checkpoint", ckpt, "--out", str(tmp_path)], "is a folder"),
        (["eval", "--checkpoint", ckpt, "--out", str(tmp_path / "no" / "ev.json")], "does not exist"),
        (["eval", "--checkpoint", ckpt, "method=snip"], "eval: method has no effect"),
    ):
        start = time.time()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
        assert time.time() - start < 5  # refused before loading or evaluating anything
    assert main(["eval", "--checkpoint", ckpt, "data.eval_batch_size=2", "--out", "ev.json"]) == 0
