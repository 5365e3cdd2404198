"""CLI: train / eval / export / compare / bench on a tiny synthetic setup, and error reporting."""
import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import adapmtl
from adapmtl.cli import _model_from_checkpoint, build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    from adapmtl.data import make_synthetic_scenes

    d = tmp_path_factory.mktemp("cli")
    root = d / "scenes"
    make_synthetic_scenes(str(root), n_train=12, n_test=4, size=32, seed=0)
    path = d / "tiny.yaml"
    path.write_text(f"""
method: adapmtl
seed: 0
out_dir: {d / 'run'}
data: {{dataset: synthetic, root: {root}, n_train: 12, n_test: 4, image_size: 32, crop_size: 32, batch_size: 4, eval_batch_size: 4, val_fraction: 0.25}}
model: {{backbone: tiny, head_channels: 4}}
prune: {{s0: -4.0, target_sparsity: 0.5, prune_start: 0.25, prune_end: 0.75, rounds: 2, score_batches: 1,
        update_every: 2}}
optim: {{lr: 0.002, weight_decay: 0.001}}
loss_weights: {{start: 1, window: 2}}
train: {{iterations: 4, log_every: 2, val_every: 2, ckpt_every: 2, progress: false, tensorboard: false,
        plots: false}}
""")
    return str(path), d


def test_parser_has_all_commands():
    p = build_parser()
    for cmd in (["train", "-c", "x.yaml"], ["eval", "--checkpoint", "c.pt"], ["export", "--checkpoint", "c", "--out", "o"],
                ["bench", "soft_threshold"], ["compare", "-c", "x.yaml"]):
        assert p.parse_args(cmd).command == cmd[0]


def test_train_eval_export(cfg_file, capsys):
    path, d = cfg_file
    out = d / "run"
    assert main(["train", "-c", path, "--set", "train.iterations=4", f"out_dir={out}"]) == 0
    assert (out / "latest.pt").exists() and (out / "results.json").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "adapmtl" and res["iterations"] == 4
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "latest.pt"), "--split", "test", "--out", str(d / "ev.json")]) == 0
    ev = json.loads((d / "ev.json").read_text())
    assert set(ev["metrics"]) == {"segment_semantic", "normal", "depth"} and 0 <= ev["sparsity"] <= 1
    assert main(["export", "--checkpoint", str(out / "latest.pt"), "--out", str(d / "model.safetensors"),
                 "--min-sparsity", "0"]) == 0
    exported = adapmtl.load_exported(d / "model.safetensors")  # no training code or model classes needed
    # the exported model computes what the finalized (soft-thresholded, dense) checkpoint computes
    _, model, _ = _model_from_checkpoint(str(out / "latest.pt"))
    adapmtl.finalize(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), exported(x)
    assert set(got) == set(want)
    for task in want:
        torch.testing.assert_close(got[task], want[task], rtol=1e-4, atol=1e-5)


def test_bad_config_key_is_reported(cfg_file, capsys):
    path, _ = cfg_file
    assert main(["train", "-c", path, "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate" in err
    assert main(["train", "-c", path, "train.iterations=lots"]) == 2
    assert "train.iterations" in capsys.readouterr().err


def test_compare_writes_table(cfg_file):
    path, d = cfg_file
    out = d / "cmp"
    argv = ["compare", "-c", path, "--sparsity", "0.5", "--methods", "snip,adapmtl", "--out", str(out),
            "--start-iterations", "2", "train.select_sparsity_tol=1"]
    assert main(argv) == 0
    md = (out / "table.md").read_text()
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("dense", "0"), ("snip", "0"), ("adapmtl", "0")]
    for col in ("segment_semantic/mIoU", "segment_semantic/mIoU_all", "normal/angle_mean", "depth/abs_err",
                "sparsity", "delta_t_segment_semantic", "delta_t", "selected", "at_target"):
        assert col in rows[0], col
    assert float(rows[0]["delta_t"]) == 0.0
    assert float(rows[1]["sparsity"]) == pytest.approx(0.5, abs=1e-4) and rows[1]["at_target"] == "True"
    assert "| method |" in md and "| snip | 1 |" in md
    # ΔT is the mean of the ΔT_i
    dts = [float(rows[1][f"delta_t_{t}"]) for t in ("segment_semantic", "normal", "depth") if rows[1][f"delta_t_{t}"]]
    assert dts and float(rows[1]["delta_t"]) == pytest.approx(sum(dts) / len(dts), abs=1e-9)
    # --reuse does not retrain
    done = out / "seed0" / "sparsity50" / "snip" / "results.json"
    mtime = os.path.getmtime(done)
    assert main(argv + ["--reuse"]) == 0
    assert os.path.getmtime(done) == mtime


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "adapmtl", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "compare" in r.stdout
    r = subprocess.run([sys.executable, "-m", "adapmtl", "bench", "no_such_bench"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2 and "soft_threshold" in r.stderr


def test_version_and_every_option_documented(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"adapmtl {adapmtl.__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"adapmtl {name} {action.option_strings or action.dest}: no help text"
        text = command.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: 1)" in sub.choices["compare"].format_help()


def test_bench_smoke_runs_never_write_into_the_committed_results(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(REPO, "benchmarks", "common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(common.RESULTS_DIR))
    info = {"kind": "cpu", "device": "Test CPU (2 cores)"}
    path = common.write_results("soft_threshold", info, {"rows": []}, smoke=True)
    assert path.resolve().parent == (tmp_path / "runs" / "bench").resolve()
    assert sorted(os.listdir(common.RESULTS_DIR)) == before
    assert common.write_results("x", info, {}, out_dir=tmp_path / "o").parent == tmp_path / "o"


def test_result_files_name_the_cpu_and_record_its_caches_and_isa():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(REPO, "benchmarks", "common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    zen4 = {"kind": "cpu", "device": "AMD EPYC (2 cores)", "cpu": {"family": "25", "model_number": "17"}}
    zen5 = {"kind": "cpu", "device": "AMD EPYC (2 cores)", "cpu": {"family": "26", "model_number": "2"}}
    assert common.device_tag(zen4) != common.device_tag(zen5)
    assert common.device_tag(zen5).startswith("cpu-AMD-EPYC-f26m2-")
    xeon = {"kind": "cpu", "device": "Intel(R) Xeon(R) Processor (2 cores)", "cpu": {"family": "6", "model_number": "167"}}
    assert common.device_tag(xeon).startswith("cpu-Intel-Xeon-Processor-f6m167-")
    here = common.device_description("cpu")["cpu"]
    assert here["model"] and isinstance(here.get("isa", []), list)
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        assert "L1d" in here["caches_per_core"] and "L2" in here["caches_per_core"]


def test_load_trained_returns_the_model_as_trained(cfg_file):
    from adapmtl.train import TrainedModel, Trainer, load_config, load_trained

    path, d = cfg_file
    trainer = Trainer(load_config(path, ["train.iterations=3", f"out_dir={d / 'lt'}"]))
    trainer.fit()
    trained = load_trained(str(d / "lt" / "latest.pt"))
    assert isinstance(trained, TrainedModel) and trained.method == "adapmtl" and trained.iteration == 3
    assert trained.config.to_dict() == trainer.cfg.to_dict()
    assert not trained.model.training and adapmtl.str_layers(trained.model)  # STR layers and thresholds back
    want = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    got = trained.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.randn(1, 3, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        a, b = trainer.model(x), trained.model(x)
    assert all(torch.equal(a[t], b[t]) for t in a)
    (d / "not_a_checkpoint.pt").write_bytes(b"junk")
    with pytest.raises(Exception, match="not_a_checkpoint"):
        load_trained(str(d / "not_a_checkpoint.pt"))


def _bench_module(name):
    import importlib.util
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # the scripts import their `common` beside them
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    return module


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_soft_threshold_and_str_step_benchmarks_run_and_record_their_setting(tmp_path):
    """Smoke runs of the two benchmarks issue 14 reports from: the copy floor is timed in the same alternation,
    the STR step reports per-round quartiles, and both record whether freed host memory was kept."""
    st = _bench_module("bench_soft_threshold")
    st.main(["--quick", "--backends", "torch", "cpp", "--out-dir", str(tmp_path / "st")])
    (st_file,) = (tmp_path / "st").iterdir()
    st_json = json.loads(st_file.read_text())
    assert set(st_json["copy_bandwidth_gbps"]) == {r["case"] for r in st_json["rows"]}
    assert all(v > 0 for v in st_json["copy_bandwidth_gbps"].values())
    assert {(r["backend"], r["pass_"]) for r in st_json["rows"]} == {
        (b, p) for b in ("torch", "cpp") for p in ("fwd", "bwd", "fwd+bwd")}
    assert isinstance(st_json["retain_host_memory"], bool)
    assert all(r["speedup"] > 0 for r in st_json["rows"])
    # without the eager reference among the backends there is no ratio to it, and no KeyError
    st.main(["--quick", "--backends", "cpp", "--out-dir", str(tmp_path / "st_cpp")])
    (cpp_file,) = (tmp_path / "st_cpp").iterdir()
    assert {r["speedup"] for r in json.loads(cpp_file.read_text())["rows"]} == {None}
    step = _bench_module("bench_str_step")
    step.main(["--quick", "--out", str(tmp_path / "step")])
    (step_file,) = (tmp_path / "step").iterdir()
    rows = {r["variant"]: r for r in json.loads(step_file.read_text())["rows"]}
    assert rows["dense step"]["over_dense"] == 0 and rows["STR step"]["ms"] > 0
    assert all(r["over_dense_q1"] <= r["over_dense"] <= r["over_dense_q3"] for r in rows.values())


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_kernel_roofline_benchmark_runs(tmp_path):
    """A smoke run of benchmarks/bench_kernel_roofline.py: the inner-loop microbenchmark in units of the core's
    FMA peak (where g++ is found) and the real kernel's one-channel / panel / auto timings, into --out-dir."""
    import shutil
    roof = _bench_module("bench_kernel_roofline")
    loop, rows = roof.main(["--quick", "--out-dir", str(tmp_path)])
    assert len(rows) == 2 * 2 * 5 and all(set(r["ms"]) == set(roof.CONFIGS) for r in rows)
    assert all(t > 0 for r in rows for t in r["ms"].values())
    if shutil.which("g++"):
        (line,) = loop
        assert line["peak_vfma_per_s"] > 0 and line["block_4"]["loads_per_fma"] < line["single_2x3"]["loads_per_fma"]
        # the scatter and generated variants compute what today's loop does (same non-zeros, same order)
        checked = [k for k in line if k.startswith(("scatter_", "generated_"))]
        assert len(checked) == 2 + len(roof.GENERATED)
        assert all(line[k]["max_error"] <= 1e-4 and line[k]["vfma_per_peak"] > 0 for k in checked)
        assert line["generated_24x1"]["input_loads_per_fma"] < line["generated_1x3"]["input_loads_per_fma"] == 1
    saved = json.loads(next(tmp_path.glob("kernel_roofline_*.json")).read_text())
    assert saved["quick"] and saved["real_kernel"] == rows


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_tile_rows_benchmark_runs(tmp_path):
    """A smoke run of bench_kernel_roofline.py --tile-rows-only: every tile height on each narrow map, checked
    against F.conv2d before it is timed, into its own JSON."""
    roof = _bench_module("bench_kernel_roofline")
    rows = roof.main(["--quick", "--tile-rows-only", "--out-dir", str(tmp_path)])
    assert len(rows) == len(roof.TALL_CONVS) and all(set(r["ms"]) == set(roof.TALL_CONFIGS) for r in rows)
    assert all(t > 0 for r in rows for t in r["ms"].values())
    assert json.loads(next(tmp_path.glob("kernel_tile_rows_*.json")).read_text())["rows"] == rows



@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_block_holes_benchmark_runs(tmp_path):
    """A smoke run of bench_kernel_roofline.py --block-holes-only: 16 x 1 block weights with holes under each
    configuration, checked against F.conv2d before they are timed, their padding counted, into their own JSON."""
    roof = _bench_module("bench_kernel_roofline")
    rows = roof.main(["--quick", "--block-holes-only", "--out-dir", str(tmp_path)])
    assert len(rows) == 2 * len(roof.HOLE_CONVS) and all(set(r["ms"]) == set(roof.HOLE_CONFIGS) for r in rows)
    assert all(t > 0 for r in rows for t in r["ms"].values()) and all(r["padding"] >= 1 for r in rows)
    assert rows[0]["hole"] == 0 and rows[0]["padding"] == 1  # no holes: nothing padded
    assert json.loads(next(tmp_path.glob("kernel_block_holes_*.json")).read_text())["rows"] == rows


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_one_tap_benchmark_runs(tmp_path):
    """A smoke run of bench_kernel_roofline.py --one-tap-only: 1x1 convs and a linear layer in 16 x 1 blocks under
    each configuration, checked against F.conv2d / F.linear before they are timed, into their own JSON."""
    roof = _bench_module("bench_kernel_roofline")
    rows = roof.main(["--quick", "--one-tap-only", "--out-dir", str(tmp_path)])
    assert len(rows) == len(roof.ONE_TAP_CASES[::6]) and all(set(r["ms"]) == set(roof.ONE_TAP_CONFIGS) for r in rows)
    assert all(t > 0 for r in rows for t in r["ms"].values()) and any(r["case"].startswith("linear") for r in rows)
    assert json.loads(next(tmp_path.glob("kernel_one_tap_*.json")).read_text())["rows"] == rows


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_capabilities_benchmark_runs(tmp_path):
    """A smoke run of bench_kernel_roofline.py --capabilities-only: the kernels at this CPU's capability and each one
    below it, a process each, every tile checked against F.conv2d before it is timed, into their own JSON."""
    roof = _bench_module("bench_kernel_roofline")
    rows = roof.main(["--quick", "--capabilities-only", "--out-dir", str(tmp_path)])
    own = torch.backends.cpu.get_cpu_capability()
    if own not in roof.CAPABILITIES:
        assert rows == []
        return
    levels = list(roof.CAPABILITIES)[list(roof.CAPABILITIES).index(own):]
    assert [r["capability"] for r in rows] == [c for c in levels for _ in range(2 * len(roof.CONVS))]
    assert all(set(r["ms"]) == set(roof.CAPABILITY_CONFIGS) and min(r["ms"].values()) > 0 for r in rows)
    assert json.loads(next(tmp_path.glob("kernel_capabilities_*.json")).read_text())["rows"] == rows


def test_the_memory_latency_benchmark_runs(tmp_path):
    """A smoke run of benchmarks/bench_memory_latency.py: pointer-chase latency per buffer size, into --out-dir."""
    import shutil
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    bench = _bench_module("bench_memory_latency")
    rows = bench.main(["--quick", "--out-dir", str(tmp_path)])
    assert [r["mb"] for r in rows] == [1, 4]
    assert all(0 < r["min"] <= r["p10"] <= r["median"] <= r["p90"] <= r["max"] and r["samples"] >= 1 for r in rows)
    saved = json.loads(next(tmp_path.glob("memory_latency_*.json")).read_text())
    assert saved["quick"] and saved["rows"] == rows


def test_the_build_ab_benchmark_pairs_two_builds_process_by_process(tmp_path, monkeypatch):
    """bench_build_ab.py --quick with the installed build as both builds: one process per build and round, each
    importing adapmtl from its own folder, every row's paired ratio and verdict, the JSON; a folder without adapmtl
    and bad numbers are refused, and a process that imported adapmtl from elsewhere, or two builds on different
    sparse backends, are errors, not results."""
    ab = _bench_module("bench_build_ab")
    root = str(pathlib.Path(adapmtl.__file__).resolve().parents[1])
    out = ab.main(["--quick", "--before", root, "--after", root, "--out-dir", str(tmp_path)])
    assert len(out["rows"]) == 2 and sum(out["counts"].values()) == 2
    for row in out["rows"]:
        assert len(row["paired_ratios"]) == 1 and row["ratio"] == row["paired_ratios"][0] > 0
        assert row["verdict"] in ("slower", "same", "faster") and row["max_rel_err"] < 1e-4
        assert row["before_sparse"] > 0 and row["after_dense"] > 0
    saved = json.loads(next(tmp_path.glob("build_ab_*.json")).read_text())
    assert saved["rows"][0]["paired_ratios"] == out["rows"][0]["paired_ratios"] and saved["device"]["kind"] == "cpu"
    assert next(tmp_path.glob("build_ab_*.png")).stat().st_size > 0
    for bad in (["--before", str(tmp_path)], ["--before", root, "--tolerance", "-0.1"],
                ["--before", root, "--rounds", "0"]):
        with pytest.raises(SystemExit):
            ab.main(["--quick", "--after", root, "--out-dir", str(tmp_path), *bad])
    elsewhere = 'BUILD_AB_RESULT {"module": "/elsewhere/adapmtl/__init__.py", "cases": []}'
    monkeypatch.setattr(ab.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, elsewhere, ""))
    with pytest.raises(RuntimeError, match="imported adapmtl from /elsewhere"):
        ab.run_build(pathlib.Path(root), {})
    assert out["backend"] == adapmtl.ops.resolve_sparse_backend("auto", torch.empty(0))
    with pytest.raises(RuntimeError, match="different sparse backends"):
        ab.check_same_backend({"before": [{"backend": "torch"}], "after": [{"backend": "cpp"}]})
    assert ab.sign_test_p([1.1] * 6) == pytest.approx(2 / 64)
    assert ab.sign_test_p([1.1] * 7 + [0.9]) == pytest.approx(18 / 256)
    assert ab.sign_test_p([1.1, 0.9] * 4) == 1.0
    slow, fast = [1.2, 1.1, 1.3, 1.15, 1.2, 1.25], [0.8, 0.85, 0.9, 0.7, 0.8, 0.75]
    assert ab.verdict(slow, slow, 0.05) == "slower" and ab.verdict(fast, fast, 0.05) == "faster"
    assert ab.verdict(slow, [1.0, 1.02, 0.98, 1.0, 1.0, 1.01], 0.05) == "same"  # the dense conv slowed down as much
    assert ab.verdict(slow[:4], slow[:4], 0.05) == "same"  # 4 pairs one way: p = 0.125, not enough
    assert ab.verdict([1.2, 0.9, 1.3, 1.4, 1.2, 1.3], [1.2, 0.9, 1.3, 1.4, 1.2, 1.3], 0.05) == "same"  # 5 of 6
    assert ab.verdict([1.04, 1.03, 1.04, 1.02, 1.03, 1.04], [1.04, 1.03, 1.04, 1.02, 1.03, 1.04], 0.05) == "same"


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_runs_and_names_the_best_dense_runtime(tmp_path):
    """A smoke run of benchmarks/bench_peer.py (the compiled variants skipped: their compilation takes minutes):
    every variant in one alternation, the ratio to the fastest dense runtime, a missing peer reported."""
    peer = _bench_module("bench_peer")
    rows = peer.main(["--quick", "--rows", "conv1x1_90", "--skip", "torch_compile", "aoti_frozen", "ours_aoti",
                      "--out-dir", str(tmp_path)])
    (row,) = rows
    assert {"torch_eager", "ours_eager"} <= set(row["ms"]) and "torch_compile" not in row["ms"]
    dense = {k: v for k, v in row["ms"].items() if k in ("torch_eager", "onnxruntime")}
    assert row["best_dense"] == min(dense, key=dense.get)
    assert row["vs_best_dense"] == pytest.approx(dense[row["best_dense"]] / row["ms"]["ours_eager"])
    assert set(row["round_ms"]) == set(row["ms"]) and all(len(t) == 2 for t in row["round_ms"].values())
    assert all(row["ms"][k] == pytest.approx(sum(t) / 2) for k, t in row["round_ms"].items())  # 2 rounds: the mean
    # per round: that round's fastest dense runtime over ours
    for i, ratio in enumerate(row["round_vs_best_dense"]):
        assert ratio == pytest.approx(min(row["round_ms"][k][i] for k in dense) / row["round_ms"]["ours_eager"][i])
    assert len(row["round_vs_best_dense"]) == 2
    saved = json.loads(next(tmp_path.glob("peer_*.json")).read_text())
    assert saved["rows"][0]["ms"] == row["ms"] and saved["device"]["kind"] == "cpu"
    assert next(tmp_path.glob("peer_*.png")).stat().st_size > 0
    if "deepsparse" not in row["ms"]:
        assert "deepsparse" in row["errors"]


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_times_no_runtime_that_computes_something_else(tmp_path, monkeypatch):
    """A runtime whose output is not torch eager's is reported and not timed (DeepSparse under numpy 2 returned
    garbage silently); the file DeepSparse's venv gets from the TorchScript exporter runs right in onnxruntime."""
    peer = _bench_module("bench_peer")
    monkeypatch.setattr(peer, "_deepsparse", lambda path, x: (lambda: [x.new_ones(1, 128, 10, 10).numpy()]))
    monkeypatch.setattr(peer, "_onnx_exporter", lambda: "torchscript")
    (row,) = peer.main(["--quick", "--rows", "conv1x1_90", "--skip", "torch_compile", "aoti_frozen", "ours_aoti",
                        "--out-dir", str(tmp_path)])
    assert "deepsparse" not in row["ms"] and row["errors"]["deepsparse"].startswith("wrong result")
    assert row["result_errors"]["deepsparse"] > peer.WRONG_RESULT and row["onnx_exporter"] == "torchscript"
    timed = {k: v for k, v in row["result_errors"].items() if k in row["ms"]}
    assert {"ours_eager"} <= set(timed) and max(timed.values()) <= peer.WRONG_RESULT
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "onnxruntime" in timed


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_splits_a_model_into_its_components(tmp_path):
    """bench_peer.py --components (smoke): the backbone on the image and each head on the backbone's features, every
    variant checked and timed; ours split into its sparse layers, its dense layers and the rest."""
    peer = _bench_module("bench_peer")
    rows = peer.main(["--quick", "--components", "--rows", "mobilenetv2", "conv1x1_90", "--skip", "torch_compile",
                      "aoti_frozen", "ours_aoti", "--out-dir", str(tmp_path)])
    assert [r["component"] for r in rows] == ["backbone", *peer.TASKS]  # the conv row has no components
    for r in rows:
        assert {"torch_eager", "ours_eager"} <= set(r["ms"]) and max(r["result_errors"].values()) <= peer.WRONG_RESULT
        split, layers = r["split"], r["layers"]
        assert split["sparse_of_layers"] == f"{sum(e['sparse'] for e in layers)}/{len(layers)}"
        assert split["sparse_layers_ms"] == pytest.approx(sum(e["sparse_ms"] for e in layers if e["sparse"]))
        assert split["rest_ms"] == pytest.approx(r["ms"]["ours_eager"] - split["sparse_layers_ms"]
                                                 - split["dense_layers_ms"])
    assert any(r["split"]["sparse_layers_ms"] > 0 for r in rows)
    saved = json.loads(next(tmp_path.glob("peer_components_*.json")).read_text())
    (summary,) = saved["summary"].values()
    parts = {r["component"]: r["ms"]["ours_eager"] for r in rows}
    assert summary["ours_sum_ms"] == pytest.approx(sum(parts.values()))
    assert summary["ratio_if_heads_free"] == pytest.approx(summary["best_dense_sum_ms"] / parts["backbone"])
    assert next(tmp_path.glob("peer_components_*.png")).stat().st_size > 0


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_measures_the_plan_cache(tmp_path, monkeypatch):
    """bench_peer.py --plan-cache-ab (smoke): the same outputs with the plans kept or encoded every call, and the
    budget variable restored afterwards."""
    monkeypatch.setenv("ADAPMTL_CPU_PLAN_CACHE_MB", "17")
    peer = _bench_module("bench_peer")
    ab = peer.main(["--quick", "--plan-cache-ab", "--rows", "aspp_d6_90", "--out-dir", str(tmp_path)])
    (entry,) = ab.values()
    assert entry["identical_outputs"] and entry["plans_kept"] >= 1 and entry["cache_on_ms"] > 0
    assert os.environ["ADAPMTL_CPU_PLAN_CACHE_MB"] == "17"
    assert json.loads(next(tmp_path.glob("peer_plan_cache_*.json")).read_text())["rows"] == json.loads(json.dumps(ab))


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_measures_the_tile_rows(tmp_path, monkeypatch):
    """bench_peer.py --tile-rows-ab (smoke): the model row with 2-row tiles and with the default, outputs within
    float32 rounding of each other, the configuration variable restored afterwards."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", "min_segment=40")
    peer = _bench_module("bench_peer")
    ab = peer.main(["--quick", "--tile-rows-ab", "--rows", "mobilenetv2", "--out-dir", str(tmp_path)])
    (entry,) = ab.values()
    assert entry["rows2_ms"] > 0 and entry["default_ms"] > 0 and entry["max_rel_diff"] < 1e-5
    assert entry["settings"] == {"rows2": "ADAPMTL_CPU_SPARSE_CONFIG=rows=2", "default": "ADAPMTL_CPU_SPARSE_CONFIG="}
    assert os.environ["ADAPMTL_CPU_SPARSE_CONFIG"] == "min_segment=40"
    assert json.loads(next(tmp_path.glob("peer_tile_rows_*.json")).read_text())["rows"] == json.loads(json.dumps(ab))


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_measures_the_fused_epilogues(tmp_path):
    """bench_peer.py --fuse-ab (smoke): the export with and without fused epilogues, identical outputs."""
    peer = _bench_module("bench_peer")
    ab = peer.main(["--quick", "--fuse-ab", "--rows", "mobilenetv2", "--out-dir", str(tmp_path)])
    (entry,) = ab.values()
    assert entry["identical_outputs"] and entry["fused"] and entry["fused_ms"] > 0
    assert json.loads(next(tmp_path.glob("peer_fuse_*.json")).read_text())["rows"] == json.loads(json.dumps(ab))


@pytest.mark.skipif("cpp" not in adapmtl.ops.available_backends("cpu"), reason="C++ extension not built")
def test_the_peer_benchmark_measures_the_stacked_convs(tmp_path):
    """bench_peer.py --stack-ab (smoke): the export with and without its heads' convs stacked, the groups found
    (three heads read one feature map) with what was timed, outputs within float32 rounding."""
    peer = _bench_module("bench_peer")
    ab = peer.main(["--quick", "--stack-ab", "--block", "4", "--rows", "mobilenetv2", "--out-dir", str(tmp_path)])
    (entry,) = ab.values()
    assert entry["groups"] and entry["max_rel_diff"] < 1e-5 and entry["stacked_ms"] > 0 and entry["block"] == 4
    assert all(g["stacked"] == (g["stacked_s"] < g["separate_s"]) for g in entry["groups"])
    assert json.loads(next(tmp_path.glob("peer_stack_block4_*.json")).read_text())["rows"] == json.loads(json.dumps(ab))
