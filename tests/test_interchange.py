"""Standard formats: torch.export .pt2 of the sparse export (custom ops, loadable in a fresh process after
`import adapmtl`), ONNX of the finalized dense model checked with onnxruntime, and the CLI's --format."""
import copy
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


class _Dilated(nn.Module):
    """A dilated conv whose outer taps read only padding on a 5x5 map (a 1x1 in disguise), then a plain one;
    `sparse()`: both as SparseConv2d, as export_sparse leaves them."""

    def __init__(self, weight):
        super().__init__()
        self.far = nn.Conv2d(3, 8, 3, padding=6, dilation=6)
        self.near = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.far.weight.copy_(weight)

    def forward(self, x):
        return self.near(torch.relu(self.far(x)))

    def sparse(self):
        from adapmtl.nn import SparseConv2d

        self.far, self.near = SparseConv2d.from_dense(self.far), SparseConv2d.from_dense(self.near)
        return self.eval()


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_pt2_traces_dilated_convs_without_their_dead_taps(tmp_path, dynamic_batch):
    from adapmtl.nn import SparseConv2d

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 3, 3, 3, generator=g) * (torch.rand(8, 3, 3, 3, generator=g) > 0.5)
    dense = _Dilated(w).eval()
    fast = copy.deepcopy(dense).sparse()
    x = torch.randn(1, 3, 5, 5, generator=g)
    program = export_pt2(fast, x, tmp_path / "m.pt2", dynamic_batch=dynamic_batch)
    shapes = [n.args[5] for n in program.graph.nodes if "sparse_conv2d" in str(n.target)]
    assert shapes == [[8, 3, 1, 1], [4, 8, 3, 3]]  # the far conv as the 1x1 it is at 5x5, the near one whole
    assert all("_static_taps" not in m.__dict__ for m in fast.modules() if isinstance(m, SparseConv2d))
    with torch.no_grad():
        want = fast(x)
        assert torch.equal(program.module()(x), want)  # the same kernel on the same trimmed weight as eager
        assert torch.equal(torch.export.load(tmp_path / "m.pt2").module()(x), want)
        with pytest.raises(Exception, match="(?i)shape|size|guard|expected"):  # its only size is the example's
            program.module()(torch.randn(1, 3, 7, 7))
        # eager keeps every size: at 13x13 the far conv's whole kernel reads the input
        wide = torch.randn(1, 3, 13, 13, generator=g)
        torch.testing.assert_close(fast(wide), dense(wide), rtol=1e-5, atol=1e-5)


def test_pt2_keeps_dead_taps_that_hold_a_non_finite_weight(tmp_path):
    w = torch.zeros(8, 3, 3, 3)
    w[:, :, 1, 1] = 1.0
    w[0, 0, 0, 0] = float("inf")  # on a dead tap: its NaN on the padding must reach the output
    fast = _Dilated(w).sparse()
    x = torch.randn(1, 3, 5, 5)
    program = export_pt2(fast, x, tmp_path / "m.pt2", dynamic_batch=False)
    shapes = [n.args[5] for n in program.graph.nodes if "sparse_conv2d" in str(n.target)]
    assert shapes[0] == [8, 3, 3, 3]
    with torch.no_grad():
        out, want = program.module()(x), fast(x)
    assert torch.isnan(out).all() and torch.equal(torch.isnan(out), torch.isnan(want))


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
