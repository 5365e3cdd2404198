"""Standard formats: torch.export .pt2 of the sparse export (custom ops, loadable in a fresh process after
`import adapmtl`), ONNX of the finalized dense model checked with onnxruntime, and the CLI's --format."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import adapmtl
from adapmtl.interchange import export_onnx, export_pt2
from adapmtl.models import build_model
from helpers import tiny_demo_overrides

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _str_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("tiny", tasks=["segment_semantic", "normal", "depth"], dataset="nyuv2")
    adapmtl.sparsify(model, init=-2.5)  # prunes a good share of the random init
    return model.eval()


def test_pt2_keeps_sparse_layers_as_custom_ops_and_runs_after_reload(tmp_path):
    model = _str_model()
    fast = adapmtl.export_sparse(model, min_sparsity=0.0, policy="crossover")
    assert any(isinstance(m, adapmtl.nn.SparseConv2d) for m in fast.modules())
    x = torch.randn(2, 3, 40, 40)
    program = export_pt2(fast, x, tmp_path / "m.pt2")
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # the sparse convs, with their fused epilogue (export_passes.fuse_epilogues) where a ReLU follows
    assert ops & {"adapmtl.sparse_conv2d.default", "adapmtl.sparse_conv2d_fused.default"}
    from adapmtl.checkpoint_io import output_mode
    assert os.stat(tmp_path / "m.pt2").st_mode & 0o777 == output_mode()  # an ordinary file, not 0600
    with torch.no_grad():
        want = fast(x)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, adapmtl\n"
              "p = torch.export.load(sys.argv[1]); x = torch.load(sys.argv[2])\n"
              "with torch.no_grad():\n    out = p.module()(x)\n"
              "torch.save({k: v for k, v in out.items()}, sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True)
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == set(want)
    for task in want:
        torch.testing.assert_close(got[task], want[task])


def test_pt2_refuses_training_layers(tmp_path):
    with pytest.raises(ValueError, match="STR layers"):
        export_pt2(_str_model(), torch.randn(1, 3, 32, 32), tmp_path / "m.pt2")
    with pytest.raises(TypeError, match="example_input"):
        export_pt2(nn.Linear(2, 2), [1, 2], tmp_path / "m.pt2")


@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime")
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_of_the_finalized_model_matches_in_onnxruntime(tmp_path, exporter):
    import onnxruntime as ort

    model = _str_model(1)
    x = torch.randn(1, 3, 48, 48)
    export_onnx(model, x, tmp_path / "m.onnx", exporter=exporter)
    assert adapmtl.str_layers(model)  # the caller's model is left as it was
    with torch.no_grad():
        want = adapmtl.finalize(model)(x)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert [o.name for o in session.get_outputs()] == list(want)
    for (task, ref), got in zip(want.items(), outs):
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)


def test_onnx_exporter_is_checked(tmp_path):
    with pytest.raises(ValueError, match="argument 'exporter'"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.onnx", exporter="jit")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_formats(tmp_path, monkeypatch):
    from adapmtl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "-c", "demo", *tiny_demo_overrides(tmp_path / "data"), "prune.s0=-3"]) == 0
    ckpt = str(tmp_path / "runs" / "demo" / "latest.pt")
    from adapmtl.train import load_trained
    with torch.no_grad():  # what the exported files must compute: the trained model, thresholds applied
        x = torch.randn(1, 3, 32, 32)
        want = adapmtl.finalize(load_trained(ckpt).model)(x)
    assert set(want) == {"segment_semantic", "normal", "depth"}
    assert main(["export", "--checkpoint", ckpt, "--out", "m.pt2", "--format", "pt2", "--min-sparsity", "0"]) == 0
    program = torch.export.load("m.pt2")
    assert {"adapmtl.sparse_conv2d.default", "adapmtl.sparse_conv2d_fused.default"} & {
        str(n.target) for n in program.graph.nodes}  # the sparse layers
    with torch.no_grad():
        got = program.module()(x)
    assert set(got) == set(want)
    for task in want:
        torch.testing.assert_close(got[task], want[task], rtol=1e-4, atol=1e-5, msg=task)
    if HAS_ONNX:
        import onnxruntime as ort

        assert main(["export", "--checkpoint", ckpt, "--out", "m.onnx", "--format", "onnx"]) == 0
        session = ort.InferenceSession(str(tmp_path / "m.onnx"))
        outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert [o.name for o in session.get_outputs()] == list(want)
        for (task, ref), out in zip(want.items(), outs):
            torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5, msg=task)
    assert json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())["iterations"] == 2
