"""export_sparse (layer replacement policy, outputs vs the finalized dense model) and save/load."""
import copy
import os
import json

import pytest
import torch
from torch import nn

import adapmtl
from adapmtl.export import CROSSOVER, export_sparse
from adapmtl.export_format import METADATA_KEY, load_exported, save_exported
from adapmtl.models import build_model
from adapmtl.nn.sparse_layers import SparseConv2d, SparseLinear

# Exported (sparse kernels) vs finalized dense model, float32: only the summation order differs.
RTOL, ATOL = 1e-4, 1e-5


def _prune_(model, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.dim() > 1:
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < density)
    return model


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = build_model("tiny", tasks={"segment_semantic": 5, "normal": 3, "depth": 1})
    # a few BN statistics off their defaults so that eval mode is non-trivial
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                                      nn.Conv2d(8, 8, 3, groups=4))
        self.fc = nn.Linear(8 * 2 * 2, 6)

    def forward(self, x):
        y = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 2)
        return self.fc(torch.flatten(y, 1)) * 2.0


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL)
    else:
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_export_str_model_matches_finalized_and_round_trips(tmp_path):
    model = _tiny()
    adapmtl.sparsify(model, init=-3.0)  # sigmoid(-3) = 0.047: prunes a large share of the weights
    x = torch.randn(2, 3, 64, 64)
    dense = adapmtl.finalize(copy.deepcopy(model)).eval()
    exported = export_sparse(model, min_sparsity=0.0, policy="crossover")
    assert any(isinstance(m, adapmtl.nn.STRConv2d) for m in model.modules())  # the input model is untouched
    assert not any(isinstance(m, adapmtl.nn.STRConv2d) for m in exported.modules())
    report = exported.sparse_export_report
    n_sparse = sum(isinstance(m, SparseConv2d) for m in exported.modules())
    assert n_sparse == sum(r["sparse"] for r in report) > 0
    for r in report:  # crossover policy: sparse exactly where sparsity >= crossover
        assert r["sparse"] == (r["sparsity"] >= CROSSOVER["cpu"][r["kind"]])
    with torch.no_grad():
        ref = dense(x)
        out = exported(x)
        _close(out, ref)
        path = tmp_path / "model.safetensors"
        save_exported(exported, path)
        loaded = load_exported(path)
        assert sum(isinstance(m, SparseConv2d) for m in loaded.modules()) == n_sparse
        _close(loaded(x), ref)
        _close(loaded(x[:1]), dense(x[:1]))  # other batch sizes work too
    _close(exported(x), ref)  # frozen parameters: callable outside no_grad as well
    _close(loaded(x), ref)


def test_export_time_policy_and_min_sparsity():
    model = _prune_(_tiny(1), 0.1)
    x = torch.randn(1, 3, 64, 64)
    exported = export_sparse(model, example_input=x, repeats=1)
    report = exported.sparse_export_report
    assert all("dense_s" in r and "sparse_s" in r for r in report)
    near = exported.sparse_export_near
    for r in report:  # a layer is sparse exactly when it timed faster, alone or (near the crossover) in the model
        if r.get("decided_in_model"):
            assert r["layer"] in near["layers"] and r["sparse"] == near["sparse"]
        else:
            assert r["sparse"] == (r["sparse_s"] < r["dense_s"])
    with torch.no_grad():
        _close(exported(x), model(x))
    none = export_sparse(model, min_sparsity=1.0, policy="crossover")
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in none.modules())
    forced = export_sparse(_prune_(_tiny(1), 0.03), min_sparsity=0.0, policy="crossover")
    for r in forced.sparse_export_report:
        assert r["sparse"] == (r["sparsity"] >= CROSSOVER["cpu"][r["kind"]])
    assert sum(r["sparse"] for r in forced.sparse_export_report) >= len(forced.sparse_export_report) // 2


@pytest.mark.parametrize("alone,in_model,expect", [
    ((1.0, 1.1), (2.0, 1.0), True),    # near the crossover alone; all sparse faster in the model
    ((1.1, 1.0), (1.0, 2.0), False),   # near, the other way round: all dense
    ((1.0, 2.0), None, False),         # far from it: each layer decided alone, no model timing
])
def test_time_policy_decides_layers_near_the_crossover_inside_the_model(alone, in_model, expect, monkeypatch):
    import adapmtl.export as export_module

    model_timings = []

    def fake_timing(fns, device, *, warmup=1, reps=10):
        for fn in fns:  # run every variant, as the real timer does (the model variants swap layers)
            fn()
        if reps == 1:  # a layer alone (repeats=1 below)
            return list(alone)
        model_timings.append(reps)  # the whole model (at least 3 rounds)
        return list(in_model)

    monkeypatch.setattr(export_module, "interleaved_median_ms", fake_timing)
    model = _prune_(_tiny(1), 0.1)
    x = torch.randn(1, 3, 32, 32)
    exported = export_sparse(model, example_input=x, repeats=1, stack=False)  # the heads' convs stay apart
    timed = [r for r in exported.sparse_export_report if "dense_s" in r]
    assert timed and all(r["sparse"] == expect for r in timed)
    assert sum(isinstance(m, SparseConv2d) for m in exported.modules()) == (len(timed) if expect else 0)
    if in_model is None:
        assert exported.sparse_export_near is None and not model_timings
    else:
        near = exported.sparse_export_near
        assert model_timings == [3] and near["sparse"] == expect and set(near["layers"]) == {r["layer"] for r in timed}
        assert all(r["decided_in_model"] for r in timed)
    with torch.no_grad():
        _close(exported(x), model(x))


def test_linear_and_grouped_layers_round_trip(tmp_path):
    model = _prune_(Classifier(), 0.02, seed=2).eval()
    x = torch.randn(3, 3, 11, 10)
    exported = export_sparse(model, min_sparsity=0.5, policy="crossover")
    assert isinstance(exported.fc, SparseLinear)
    assert isinstance(exported.features[3], nn.Conv2d)  # grouped conv stays dense
    with torch.no_grad():
        ref = model(x)
        _close(exported(x), ref)
        save_exported(exported, tmp_path / "c.safetensors")
        _close(load_exported(tmp_path / "c.safetensors")(x), ref)


def test_saved_file_is_safetensors_with_json_config(tmp_path):
    from safetensors import safe_open

    model = export_sparse(_prune_(Classifier(), 0.02), min_sparsity=0.0, policy="crossover")
    path = tmp_path / "c.safetensors"
    save_exported(model, path)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
        keys = set(f.keys())
    assert config["format"] == "adapmtl-sparse-export"
    assert {"fc.row_ptr", "fc.col_idx", "fc.values", "fc.bias"} <= keys
    assert config["modules"]["fc"]["class"] == "adapmtl.SparseLinear"


def test_load_refuses_unknown_classes_and_functions(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = export_sparse(_prune_(Classifier(), 0.02), min_sparsity=0.0, policy="crossover")
    path = tmp_path / "c.safetensors"
    save_exported(model, path)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = copy.deepcopy(config)
    bad["modules"]["fc"]["class"] = "os:system"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={METADATA_KEY: json.dumps(bad)})
    with pytest.raises(ValueError, match="refusing"):
        load_exported(tmp_path / "bad.safetensors")
    bad = copy.deepcopy(config)
    for node in bad["nodes"]:
        if node["op"] == "call_function":
            node["target"] = "os:system"
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata={METADATA_KEY: json.dumps(bad)})
    with pytest.raises(ValueError, match="refusing"):
        load_exported(tmp_path / "bad2.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an adapmtl export"):
        load_exported(tmp_path / "plain.safetensors")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: not traceable
            return self.conv(x)
        return x


def test_export_bad_arguments(tmp_path):
    model = Classifier()
    with pytest.raises(TypeError, match="'model'"):
        export_sparse("model")
    with pytest.raises(ValueError, match="'min_sparsity'"):
        export_sparse(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="'policy'"):
        export_sparse(model, policy="guess")
    with pytest.raises(ValueError, match="example_input"):
        export_sparse(model, policy="time")
    with pytest.raises(ValueError, match="'backend'"):
        export_sparse(model, backend="fast")
    with pytest.raises(ValueError, match="cannot be traced"):
        save_exported(Branchy(), tmp_path / "b.safetensors")


def test_backend_is_checked_at_export_and_chosen_per_device_at_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from adapmtl.ops.sparse_conv import available_sparse_backends

    model = _prune_(Classifier(), 0.02, seed=3).eval()
    missing = [b for b in ("cuda", "triton", "cpp") if b not in available_sparse_backends("cpu")]
    for backend in missing:  # e.g. cuda on a CPU-only machine: refused before a file exists
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot run on cpu"):
            export_sparse(model, min_sparsity=0.0, policy="crossover", backend=backend)
    exported = export_sparse(model, min_sparsity=0.0, policy="crossover", backend="torch")
    path = tmp_path / "c.safetensors"
    save_exported(exported, path)
    # the same file as if it had been exported for CUDA elsewhere
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    for record in config["modules"].values():
        if record["class"].startswith("adapmtl.Sparse"):  # init is a tagged dict: {"__dict__": [[key, value]]}
            record["init"]["__dict__"] = [[k, "cuda" if k == "backend" else v] for k, v in record["init"]["__dict__"]]
    cuda_path = tmp_path / "cuda.safetensors"
    save_file(load_file(str(path)), str(cuda_path), metadata={METADATA_KEY: json.dumps(config)})
    x = torch.randn(2, 3, 11, 10)
    with torch.no_grad():
        ref = model(x)
        loaded = load_exported(cuda_path)
        backends = {m.backend for m in loaded.modules() if isinstance(m, (SparseConv2d, SparseLinear))}
        assert backends == ({"cuda"} if torch.cuda.is_available() else {"auto"})
        _close(loaded(x.to(next(loaded.parameters(), torch.empty(0)).device)).cpu(), ref)
        forced = load_exported(path, backend="torch_csr")
        assert {m.backend for m in forced.modules() if isinstance(m, (SparseConv2d, SparseLinear))} == {"torch_csr"}
        _close(forced(x), ref)
    with pytest.raises(ValueError, match="argument 'backend'"):
        load_exported(path, backend="gpu")


def test_written_files_have_ordinary_permissions(tmp_path):
    from adapmtl.checkpoint_io import atomic_save

    old = os.umask(0o022)
    try:
        save_exported(export_sparse(_prune_(Classifier(), 0.02), min_sparsity=0.0, policy="crossover"),
                      tmp_path / "m.safetensors")
        atomic_save({"x": 1}, str(tmp_path / "latest.pt"))
        os.umask(0o077)
        atomic_save({"x": 1}, str(tmp_path / "private.pt"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "latest.pt").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "private.pt").st_mode & 0o777 == 0o600  # the umask is respected
