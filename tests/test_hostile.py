"""Hostile and careless input: crafted export files, CSR arrays, conv arguments, non-finite values, configs,
checkpoints, dataset indexes and CLI calls. Every case must give a clean error (naming what is wrong) or the
reference's answer: never code execution, a crash, a hang or a silently wrong result."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from adapmtl.export import export_sparse
from adapmtl.export_format import METADATA_KEY, load_exported, save_exported
from adapmtl.ops import SparseWeight
from adapmtl.ops.sparse_conv import available_sparse_backends, sparse_conv2d, sparse_linear
from helpers import last_logged_step, small_run_config, start_and_wait_for_step

CPU_BACKENDS = [b for b in available_sparse_backends("cpu")]
# The C++ kernel's block layouts and channel panels, forced, and its own choice ("").
CPP_CONFIGS = ["", "layout=tap", "layout=channel", "panel=4", "panel=8", "rows=8", "layout=tap,rows=5", "panel=vector",
               "panel=vector,layout=tap"]


# ---------------------------------------------------------------------------------------------- export files


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.head(torch.relu(self.bn(self.conv(x))))
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y) + y.shape[0]


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for m in (model.head[0], model.fc):  # these become sparse layers; `conv` stays a dense nn.Conv2d
            m.weight.mul_(torch.rand_like(m.weight) < 0.2)
    exported = export_sparse(model, min_sparsity=0.0, policy="crossover", fold_bn=False)  # keeps a BatchNorm to check
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    save_exported(exported, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        ref = model(x)
    return path, config, tensors, x, ref


def _write(tmp_path, config, tensors, name="bad.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(config)})
    return path


def _nodes(config, op):
    return [n for n in config["nodes"] if n["op"] == op]


def test_export_round_trip_still_exact(export_file):
    path, _, _, x, ref = export_file
    with torch.no_grad():
        torch.testing.assert_close(load_exported(path)(x), ref, rtol=1e-4, atol=1e-5)


def _payload(sentinel):
    return f"__import__('pathlib').Path({str(sentinel)!r}).write_text('pwned')"


def _code_vectors(sentinel):
    """(description, mutate(config, tensors)) pairs: each tries to run code through the file."""
    code = _payload(sentinel)

    def set_target(op, target):
        def mutate(c, t):
            _nodes(c, op)[0]["target"] = target
        return mutate

    def set_field(op, field, value, index=0):
        def mutate(c, t):
            _nodes(c, op)[index][field] = value
        return mutate

    def kwargs_key(c, t):
        _nodes(c, "call_function")[0]["kwargs"] = {f"dim=0); {code}; (_": 1}

    def add_method(name):
        def mutate(c, t):
            first = _nodes(c, "placeholder")[0]["name"]
            c["nodes"].insert(1, {"name": "evil", "op": "call_method", "target": name,
                                  "args": [{"__node__": first}], "kwargs": {}})
        return mutate

    def getattr_chain(c, t):
        first = _nodes(c, "placeholder")[0]["name"]
        c["nodes"].insert(1, {"name": "evil", "op": "call_function", "target": "builtins.getattr",
                              "args": [{"__node__": first}, "__class__"], "kwargs": {}})

    return [
        ("torch:os.system", set_target("call_function", "torch:os.system")),
        ("torch.os.system", set_target("call_function", "torch.os.system")),
        ("torch.serialization:os.system", set_target("call_function", "torch.serialization:os.system")),
        ("builtins:exec", set_target("call_function", "builtins:exec")),
        ("builtins.exec", set_target("call_function", "builtins.exec")),
        ("builtins.eval", set_target("call_function", "builtins.eval")),
        ("builtins.open", set_target("call_function", "builtins.open")),
        ("builtins.__import__", set_target("call_function", "builtins.__import__")),
        ("torch.save", set_target("call_function", "torch.save")),
        ("torch.load", set_target("call_function", "torch.load")),
        ("operator.attrgetter", set_target("call_function", "operator.attrgetter")),
        ("method system", add_method("system")),
        ("method numpy", add_method("numpy")),
        ("method tofile", add_method("tofile")),
        ("method __reduce__", add_method("__reduce__")),
        ("method with code", add_method(f"relu(); {code}; x.relu")),
        ("getattr __class__", getattr_chain),
        ("placeholder code", set_field("placeholder", "target", f"x):\n    {code}\n    def _f(x")),
        ("placeholder name code", set_field("placeholder", "name", f"x = {code}")),
        ("node name code", set_field("call_function", "name", f"y = {code}; z")),
        ("kwargs key code", kwargs_key),
        ("call_module target code", set_field("call_module", "target", f"conv(x); {code}; self.conv")),
        ("get_attr unknown", lambda c, t: c["nodes"].insert(1, {"name": "a", "op": "get_attr", "target": "os.system",
                                                                "args": [], "kwargs": {}})),
        ("module class os:system", lambda c, t: c["modules"]["conv"].__setitem__("class", "os:system")),
        ("module class subprocess", lambda c, t: c["modules"]["conv"].__setitem__("class", "subprocess.Popen")),
        ("module init code", lambda c, t: c["modules"]["conv"]["init"].__setitem__(
            "__dict__", c["modules"]["conv"]["init"]["__dict__"] + [["padding_mode", code]])),
        ("dtype tag save", lambda c, t: _nodes(c, "call_function")[0].__setitem__("args", [{"__dtype__": "save"}])),
        ("memory_format tag code", lambda c, t: _nodes(c, "call_function")[0].__setitem__(
            "args", [{"__memory_format__": code}])),
        ("float tag code", lambda c, t: _nodes(c, "call_function")[0].__setitem__("args", [{"__float__": code}])),
        ("module path code", lambda c, t: c["modules"].__setitem__(f'x"); {code}; ("', c["modules"]["fc"])),
    ]


def test_export_files_never_run_code(export_file, tmp_path):
    path, config, tensors, x, _ = export_file
    sentinel = tmp_path / "SENTINEL"
    tried = 0
    for name, mutate in _code_vectors(sentinel):
        c = copy.deepcopy(config)
        mutate(c, tensors)
        bad = _write(tmp_path, c, tensors, f"v{tried}.safetensors")
        with pytest.raises(ValueError, match=str(bad).replace(".", r"\.")):  # names the file
            gm = load_exported(bad)
            with torch.no_grad():
                gm(x)  # (not reached: loading refuses)
        assert not sentinel.exists(), name
        tried += 1
    assert tried >= 30


def test_export_malformed_files_are_value_errors(export_file, tmp_path):
    path, config, tensors, _, _ = export_file
    raw = path.read_bytes()
    cases = {
        "random.safetensors": os.urandom(4096),
        "truncated.safetensors": raw[: len(raw) // 2],
        "empty.safetensors": b"",
        "header-only.safetensors": raw[:8],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_exported(tmp_path / name)

    def no_output(c):
        c["nodes"] = [n for n in c["nodes"] if n["op"] != "output"]

    def wrong(field, value):
        return lambda c: c.__setitem__(field, value)

    def unknown_tag(c):
        _nodes(c, "call_function")[0]["args"] = [{"__pickle__": "x"}]

    def two_keys(c):
        _nodes(c, "call_function")[0]["args"] = [{"__tuple__": [], "__node__": "x"}]

    def node_not_dict(c):
        c["nodes"][1] = ["placeholder"]

    def forward_ref(c):
        _nodes(c, "call_function")[0]["args"] = [{"__node__": "defined_later"}]

    def duplicate(c):
        c["nodes"].insert(1, copy.deepcopy(c["nodes"][0]))

    def deep(c):
        v = 1
        for _ in range(200):
            v = {"__tuple__": [v]}
        _nodes(c, "call_function")[0]["args"] = [v]

    def missing_tensor(c):
        c["attrs"] = ["nothing_here"]

    def mutations():
        yield "no output", no_output
        yield "nodes not a list", wrong("nodes", {"a": 1})
        yield "modules not a dict", wrong("modules", [])
        yield "version", wrong("version", 99)
        yield "format", wrong("format", "other")
        yield "unknown tag", unknown_tag
        yield "two keys", two_keys
        yield "node not a dict", node_not_dict
        yield "forward reference", forward_ref
        yield "duplicate node", duplicate
        yield "deep nesting", deep
        yield "missing tensor", missing_tensor
        yield "unknown op", lambda c: c["nodes"][1].__setitem__("op", "exec")

    for i, (what, mutate) in enumerate(mutations()):
        c = copy.deepcopy(config)
        mutate(c)
        bad = _write(tmp_path, c, tensors, f"m{i}.safetensors")
        with pytest.raises(ValueError, match=f"m{i}"):
            load_exported(bad)
    # metadata that is not JSON, or JSON of the wrong shape
    from safetensors.torch import save_file

    for i, meta in enumerate(["{not json", "[1, 2]", '"a string"', "null"]):
        save_file(tensors, str(tmp_path / f"j{i}.safetensors"), metadata={METADATA_KEY: meta})
        with pytest.raises(ValueError, match=f"j{i}"):
            load_exported(tmp_path / f"j{i}.safetensors")


def test_export_modules_checked_against_their_tensors(export_file, tmp_path):
    _, config, tensors, _, _ = export_file

    def set_init(module, key, value):
        def mutate(c, t):
            items = c["modules"][module]["init"]["__dict__"]
            hits = [pair for pair in items if pair[0] == key]
            assert hits, (module, key)
            hits[0][1] = value
        return mutate

    cases = [
        ("kernel_size vs weight", set_init("conv", "kernel_size", {"__tuple__": [1, 1]}), "shape"),
        ("in_channels vs weight", set_init("conv", "in_channels", 5), "shape"),
        ("bad kernel type", set_init("conv", "kernel_size", "big"), "conv"),
        ("unknown ctor arg", lambda c, t: c["modules"]["conv"]["init"]["__dict__"].append(["evil", 1]), "evil"),
        ("bn features", set_init("bn", "num_features", 3), "shape"),
        ("extra tensor", lambda c, t: t.__setitem__("conv.extra", torch.zeros(1)), "extra"),
        ("missing tensor", lambda c, t: t.pop("bn.running_var"), "running_var"),
        ("float num_batches", lambda c, t: t.__setitem__("bn.num_batches_tracked", torch.zeros(())), "dtype"),
        ("training not bool", lambda c, t: c["modules"]["bn"].__setitem__("training", "yes"), "training"),
    ]
    assert config["modules"]["head.0"]["class"] == "adapmtl.SparseConv2d"
    s = "head.0"
    cases += [
        ("csr col out of range", lambda c, t: t[f"{s}.col_idx"].__setitem__(0, 10**6), "col_idx"),
        ("csr row_ptr past nnz", lambda c, t: t[f"{s}.row_ptr"].__setitem__(-1, 10**6), "row_ptr"),
        ("csr negative col", lambda c, t: t[f"{s}.col_idx"].__setitem__(0, -1), "col_idx"),
        ("sparse stride", set_init(s, "stride", {"__tuple__": [0, 1]}), "stride"),
        ("sparse weight_shape", set_init(s, "weight_shape", {"__tuple__": [9, 8, 1, 1]}), "row_ptr"),
        ("sparse backend", set_init(s, "backend", "evil"), "backend"),
    ]
    for i, (what, mutate, match) in enumerate(cases):
        c, t = copy.deepcopy(config), {k: v.clone() for k, v in tensors.items()}
        mutate(c, t)
        bad = _write(tmp_path, c, t, f"k{i}.safetensors")
        with pytest.raises(ValueError, match=match):
            load_exported(bad)


# ---------------------------------------------------------------------------------------------- SparseWeight


def _i32(v):
    return torch.tensor(v, dtype=torch.int32)


@pytest.mark.parametrize("row_ptr,col_idx,match", [
    ([0, 1, 2], [-1, 0], "col_idx"),          # negative column
    ([0, 1, 2], [0, 4], "col_idx"),           # column past the row
    ([0, 2, 1], [0], "row_ptr"),              # decreasing
    ([0, 1, 3], [0, 1], "row_ptr"),           # ends past nnz
    ([1, 1, 2], [0, 1], "row_ptr"),           # does not start at 0
    ([0, 2, 2], [1, 1], "strictly"),          # a column twice in a row
    ([0, 2, 2], [3, 1], "strictly"),          # unsorted row
    ([0, 0, 2], [2, 2], "strictly"),
])
def test_sparse_weight_rejects_inconsistent_arrays(row_ptr, col_idx, match):
    with pytest.raises(ValueError, match=match):
        SparseWeight(_i32(row_ptr), _i32(col_idx), torch.ones(len(col_idx)), (2, 4))


def test_sparse_weight_is_read_only_and_checks_shape():
    sw = SparseWeight.from_dense(torch.eye(3))
    with pytest.raises(AttributeError):
        sw.row_ptr = _i32([0, 9, 9, 9])
    with pytest.raises(ValueError, match="int32"):
        SparseWeight(_i32([0, 0]), _i32([]), torch.ones(0), (1, 2**31))
    with pytest.raises(TypeError, match="shape"):
        SparseWeight(_i32([0, 0]), _i32([]), torch.ones(0), (1, 2.5))
    with pytest.raises(TypeError, match="shape"):
        SparseWeight.from_state_tensors({"row_ptr": _i32([0, 0]), "col_idx": _i32([]), "values": torch.ones(0),
                                         "shape": torch.tensor([1.0, 2.0])})


def _dense_from_csr(row_ptr, col_idx, values, shape):
    out = np.zeros((shape[0], int(np.prod(shape[1:]))))
    for r in range(shape[0]):
        for k in range(row_ptr[r], row_ptr[r + 1]):
            out[r, col_idx[k]] = values[k]
    return out.reshape(shape)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 5), cols=st.integers(1, 6), data=st.data())
def test_fuzz_sparse_weight_arrays(rows, cols, data):
    """Random (often invalid) CSR arrays: either a clean error, or a weight whose every view agrees."""
    nnz = data.draw(st.integers(0, 8))
    row_ptr = data.draw(st.lists(st.integers(-2, 10), min_size=rows + 1, max_size=rows + 1))
    col_idx = data.draw(st.lists(st.integers(-2, cols + 1), min_size=nnz, max_size=nnz))
    values = torch.arange(1, nnz + 1, dtype=torch.float64)
    valid = (row_ptr[0] == 0 and row_ptr[-1] == nnz and all(a <= b for a, b in zip(row_ptr, row_ptr[1:]))
             and all(0 <= c < cols for c in col_idx)
             and all(col_idx[k] < col_idx[k + 1] for r in range(rows) for k in range(row_ptr[r], row_ptr[r + 1] - 1)))
    try:
        sw = SparseWeight(_i32(row_ptr), _i32(col_idx), values, (rows, cols))
    except ValueError:
        assert not valid
        return
    assert valid
    dense = _dense_from_csr(row_ptr, col_idx, values.numpy(), (rows, cols))
    np.testing.assert_array_equal(sw.to_dense().numpy(), dense)
    np.testing.assert_array_equal(sw.to_torch_csr().to_dense().numpy(), dense)
    x = torch.randn(3, cols, dtype=torch.float64)
    for backend in [b for b in CPU_BACKENDS if b != "triton"]:
        with torch.no_grad():
            torch.testing.assert_close(sparse_linear(x, sw, backend=backend), x @ torch.from_numpy(dense).T)


# ---------------------------------------------------------------------------------------------- conv arguments


_CRASH_SCRIPT = """
import sys, torch
from adapmtl.ops import SparseWeight
from adapmtl.ops.sparse_conv import sparse_conv2d
import torch.nn.functional as F
backend, kw = sys.argv[1], eval(sys.argv[2])
x = torch.randn(1, 1, 8, 4)
w = torch.ones(1, 1, 1, 3)
try:
    with torch.no_grad():
        y = sparse_conv2d(x, SparseWeight.from_dense(w), backend=backend, **kw)
    ref = F.conv2d(x, w, **kw)
    print("MATCH" if torch.allclose(y, ref) else "WRONG")
except (ValueError, TypeError) as e:
    print("CLEAN", str(e).splitlines()[0])
except RuntimeError as e:  # allowed only where F.conv2d itself fails the same way (e.g. out of memory)
    try:
        F.conv2d(x, w, **kw)
        print("WRONG: F.conv2d succeeds", e)
    except RuntimeError:
        print("CLEAN (as F.conv2d)", str(e).splitlines()[0][:100])
"""


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("kw", [
    "dict(padding=(0, 2**60), dilation=(1, 2**60))",
    "dict(padding=(2**29, 0), stride=(2**29, 1))",
    "dict(padding=(2**40, 2**40))",
    "dict(stride=(2**62, 2**62))",
    "dict(dilation=(2**62, 1))",
    "dict(padding=(2**62, 0))",
])
def test_huge_conv_arguments_never_crash(backend, kw):
    """Overflowing sizes: the answer of F.conv2d or a clean error, in a subprocess (a segfault shows as rc < 0),
    under an 8 GiB address-space limit (no allocation of many GB before the error; importing torch with CUDA
    maps a few GiB of address space by itself)."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
    proc = subprocess.run([sys.executable, "-c", limit + _CRASH_SCRIPT, backend, kw], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(("MATCH", "CLEAN")), proc.stdout + proc.stderr[-2000:]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_sparse_conv_against_f_conv2d(data):
    n, c, oc = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 4)), data.draw(st.integers(0, 9))
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    kh, kw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    stride = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    padding = (data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5)))
    dilation = (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)))
    density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    backend = data.draw(st.sampled_from([b for b in CPU_BACKENDS if b != "triton"]))
    config = data.draw(st.sampled_from(CPP_CONFIGS))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    block = data.draw(st.sampled_from([1, 1, 2, 4, 8, 16]))  # non-zeros shared by `block` output channels
    live = torch.rand(-(-oc // block), c, kh, kw, generator=g) < density
    weight = torch.randn(oc, c, kh, kw, generator=g, dtype=dtype) * live.repeat_interleave(block, 0)[:oc]
    bias = torch.randn(oc, generator=g, dtype=dtype) if data.draw(st.booleans()) else None
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    if data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        # NCHW and the bias added after: torch's CPU F.conv2d can segfault on channels-last input with a bias
        # (found by this test; adapmtl.ops.sparse_conv._dense_conv2d); and it refuses 0 output channels.
        ref = F.conv2d(x.contiguous(), weight if oc else torch.zeros(1, c, kh, kw, dtype=dtype), None,
                       stride, padding, dilation)[:, :oc]
        if bias is not None:
            ref = ref + bias.reshape(1, -1, 1, 1)
    except RuntimeError:
        ref = None  # e.g. the input is smaller than the dilated kernel
    os.environ["ADAPMTL_CPU_SPARSE_CONFIG"] = config
    try:
        with torch.no_grad():
            out = sparse_conv2d(x, SparseWeight.from_dense(weight), bias, stride, padding, dilation, backend=backend)
    except ValueError as e:
        assert ref is None, f"{backend}: {e}"
        return
    finally:
        os.environ.pop("ADAPMTL_CPU_SPARSE_CONFIG", None)
    assert ref is not None
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)


# ---------------------------------------------------------------------------------------------- NaN / inf


def _conv_backends():
    out = []
    for b in CPU_BACKENDS:
        if b == "cpp":
            out += [("cpp", config) for config in CPP_CONFIGS]
        else:
            out.append((b, ""))
    return out


@pytest.mark.parametrize("backend,config", _conv_backends())
def test_nonfinite_input_reaches_outputs_only_through_stored_weights(backend, config, monkeypatch):
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    w[:, 1] = 0  # input channel 1 is read by pruned weights only
    x = torch.randn(2, 3, 7, 6)
    x_nan = x.clone()
    x_nan[:, 1] = float("nan")
    x_nan[0, 1, 2, 3] = float("inf")
    ref = F.conv2d(x * torch.tensor([1.0, 0.0, 1.0])[None, :, None, None], w, padding=1)
    with torch.no_grad():
        out = sparse_conv2d(x_nan, SparseWeight.from_dense(w), padding=1, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # through a stored weight, NaN propagates as in F.conv2d
    x_bad = x.clone()
    x_bad[0, 0, 3, 3] = float("nan")
    with torch.no_grad():
        out = sparse_conv2d(x_bad, SparseWeight.from_dense(w), padding=1, backend=backend)
    torch.testing.assert_close(out.isnan(), F.conv2d(x_bad, w, padding=1).isnan())


@pytest.mark.parametrize("backend,config", _conv_backends())
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("uniform", [False, True])
def test_nonfinite_weight_on_padding_only_tap_matches_f_conv2d(backend, config, bad, uniform, monkeypatch):
    """A dilated conv whose corner taps read only zero padding (the C++ kernel skips such taps): an inf/NaN
    weight there gives NaN exactly where F.conv2d does (0 * inf = NaN), in every layout; `uniform`: every output
    channel holds the same columns (the channel-vector tiles' weights)."""
    monkeypatch.setenv("ADAPMTL_CPU_SPARSE_CONFIG", config)
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3) * (torch.rand(1 if uniform else 3, 2, 3, 3) < 0.5)
    if uniform:
        w[:, 0, 0, 0], w[:, 0, 1, 1] = bad, 1.0
    w[0, 0, 0, 0] = bad
    w[1, 0, 1, 1] = 1.0
    x = torch.randn(1, 2, 5, 5)
    ref = F.conv2d(x, w, padding=6, dilation=6)
    with torch.no_grad():
        out = sparse_conv2d(x, SparseWeight.from_dense(w), padding=6, dilation=6, backend=backend)
    assert out[0, 0].isnan().all()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_nonfinite_input_linear_and_grouped(backend):
    w = torch.randn(4, 6)
    w[:, 2] = 0
    x = torch.randn(3, 6)
    x[:, 2] = float("nan")
    clean = x.clone()
    clean[:, 2] = 0
    with torch.no_grad():
        torch.testing.assert_close(sparse_linear(x, SparseWeight.from_dense(w), backend=backend), clean @ w.T)
    wg = torch.randn(4, 2, 3, 3)
    wg[2:, 1] = 0  # group 1's second input channel (x channel 3) is read by pruned weights only
    xg = torch.randn(1, 4, 6, 6)
    xg[:, 3] = float("nan")
    ref = F.conv2d(torch.where(xg.isnan(), 0.0, xg), wg, padding=1, groups=2)
    with torch.no_grad():
        out = sparse_conv2d(xg, SparseWeight.from_dense(wg), padding=1, groups=2, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("override,key", [
    ("optim.lr=.inf", "optim.lr"), ("optim.gamma=.nan", "optim.gamma"), ("prune.s0=.nan", "prune.s0"),
    ("optim.gamma=-1", "optim.gamma"), ("optim.gamma=2", "optim.gamma"), ("optim.weight_decay=-.inf", "weight_decay"),
    ("loss_weights.priorities={depth: .nan}", "priorities.depth"), ("prune.target_sparsity=.nan", "target_sparsity"),
    ("model.dropout=1.5", "model.dropout"), ("optim.betas=[.nan, 0.9]", "optim.betas"),
    ("train.on_nonfinite=ignore", "on_nonfinite"), ("data.n_train=0", "data.n_train"),
    ("train.select_sparsity_tol=-1", "select_sparsity_tol"),
])
def test_config_rejects_values_that_cannot_train(override, key):
    from adapmtl.train import load_config

    with pytest.raises((ValueError, TypeError), match=key):
        load_config(None, [override])


def test_delta_t_refuses_numeric_directions():
    from adapmtl.metrics import delta_t

    res, dense = {"seg": {"miou": 0.5, "acc": 0.4}}, {"seg": {"miou": 0.4, "acc": 0.5}}
    with pytest.raises(TypeError, match="directions"):
        delta_t(res, dense, {"seg": {"miou": 1, "acc": -1}})
    with pytest.raises(TypeError, match="directions"):
        delta_t(res, dense, {"miou": -1})
    words = delta_t(res, dense, {"seg": {"miou": "higher", "acc": "lower"}})
    bools = delta_t(res, dense, {"seg": {"miou": False, "acc": True}})
    assert words == bools and words[1] == pytest.approx(25.0 + 20.0)


# ---------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def scenes(synthetic_scenes):
    return synthetic_scenes(12, 4)


_cfg = small_run_config


def test_nonfinite_loss_stops_with_last_good_checkpoint(scenes, tmp_path):
    from adapmtl.train import Trainer
    from adapmtl.train.checkpoint import load_checkpoint_file
    from adapmtl.train.trainer import NonFiniteLossError

    tr = Trainer(_cfg(scenes, tmp_path, **{"optim.lr": 1e30}))
    with pytest.raises(NonFiniteLossError, match="not finite"):
        tr.fit()
    state = load_checkpoint_file(str(tmp_path / "latest.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    skip = Trainer(_cfg(scenes, tmp_path / "skip", **{"optim.lr": 1e30, "train.on_nonfinite": "skip"}))
    assert skip.fit() is not None and skip.skipped_steps > 0


def test_synthetic_settings_are_honoured(scenes, tmp_path):
    from adapmtl.train.build import build_datasets

    base = tmp_path / "cache"
    a = build_datasets(_cfg(str(base), tmp_path, **{"data.n_train": 8, "data.n_test": 2}))
    b = build_datasets(_cfg(str(base), tmp_path, **{"data.n_train": 12, "data.n_test": 2}))
    assert len(a["train"]) + len(a["val"]) == 8 and len(b["train"]) + len(b["val"]) == 12
    same = build_datasets(_cfg(scenes, tmp_path))  # the fixture's own folder matches its parameters
    assert same["train"].root == scenes


def test_corrupt_checkpoints_fall_back_to_newest_good(scenes, tmp_path):
    from adapmtl.train import Trainer
    from adapmtl.train.checkpoint import CheckpointError, load_checkpoint_file

    tr = Trainer(_cfg(scenes, tmp_path, **{"train.keep_checkpoints": 3}))
    tr.fit(stop_at=4)
    names = sorted(os.listdir(tmp_path))
    assert {"latest.pt", "latest-00000003.pt", "latest-00000002.pt"} <= set(names)
    assert "latest-00000001.pt" not in names  # only keep_checkpoints files stay
    latest = tmp_path / "latest.pt"
    data = bytearray(latest.read_bytes())
    for i in range(64, len(data), max(1, len(data) // 4096)):
        data[i] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="latest.pt"):
        load_checkpoint_file(str(latest))
    (tmp_path / ".tmp-latest.ptabc").write_bytes(b"partial")  # a write a kill interrupted
    with pytest.warns(RuntimeWarning, match="latest-00000003.pt"):
        resumed = Trainer(_cfg(scenes, tmp_path, **{"train.resume": "auto"}))
    assert resumed.iteration == 3
    assert (tmp_path / ".tmp-latest.ptabc").exists()  # a trainer removes leftovers only once it holds the folder
    assert resumed.fit(stop_at=3) is None and not (tmp_path / ".tmp-latest.ptabc").exists()
    for name in ("latest-00000003.pt", "latest-00000002.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint could be loaded"):
        Trainer(_cfg(scenes, tmp_path, **{"train.resume": "auto"}))


_KILL_SCRIPT = """
import sys
from adapmtl.train import Trainer, load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
Trainer(cfg).fit()
"""


def test_kill9_then_resume_equals_uninterrupted_run(scenes, tmp_path):
    """A run killed with SIGKILL three times, each when its log shows it past a seeded step (so every kill lands
    mid-training, on any machine's speed), and resumed each time (train.resume=auto), ends bit for bit as an
    uninterrupted one, with every logging step recorded once."""
    import random

    import yaml

    iterations = 24
    base = _cfg(scenes, tmp_path / "ref", **{"train.iterations": iterations, "train.val_every": 8})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base.to_dict()))
    ref = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    args = [sys.executable, "-c", _KILL_SCRIPT, str(path), f"out_dir={run}", "train.resume=auto"]
    rng = random.Random(0)
    killed_at = []
    for low in (3, 9, 15):
        target = max(rng.randint(low, low + 4), last_logged_step(run) + 2)
        assert target < iterations
        proc = start_and_wait_for_step(args, run, target, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.kill()
        proc.wait()
        seen = last_logged_step(run)
        # the kill landed mid-training: past the target, before the last iteration, no results written
        assert target <= seen < iterations and not (run / "results.json").exists(), (target, seen)
        killed_at.append(seen)
    assert len(killed_at) == 3 and killed_at == sorted(killed_at)
    final = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    from adapmtl.train.checkpoint import load_checkpoint_file
    from adapmtl.train.logging import read_log

    a = load_checkpoint_file(str(tmp_path / "ref" / "latest.pt"))
    b = load_checkpoint_file(str(run / "latest.pt"))
    assert a["iteration"] == b["iteration"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra = json.loads((tmp_path / "ref" / "results.json").read_text())
    rb = json.loads((run / "results.json").read_text())
    assert ra["test"] == rb["test"]
    steps = [(r["kind"], r["step"]) for r in read_log(str(run / "log.jsonl"))]
    assert len(steps) == len(set(steps)) and steps == [(r["kind"], r["step"]) for r in read_log(
        str(tmp_path / "ref" / "log.jsonl"))]
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------- dataset indexes


def _nyu_index(root, entries):
    root.mkdir(parents=True, exist_ok=True)
    (root / "nyu_v2_3task.json").write_text(json.dumps({"train": entries, "test": entries}))


def _nyu_files(root, stem):
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "img" / f"{stem}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "img" / f"{stem}_s.png")
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(root / "img" / f"{stem}_n.png")
    np.save(root / "img" / f"{stem}_d.npy", np.ones((8, 8), np.float32))
    return [f"img/{stem}.png", f"img/{stem}_s.png", f"img/{stem}_n.png", f"img/{stem}_d.npy"]


def test_dataset_paths_are_confined_to_the_root(tmp_path):
    from adapmtl.data import DatasetError, NYUv2

    outside = tmp_path / "outside"
    files = _nyu_files(outside, "x")
    root = tmp_path / "root"
    good = _nyu_files(root, "a")
    for bad in (["../outside/" + p for p in files], [str(outside / p) for p in files],
                ["../" * 4 + "etc/passwd"] * 4):
        _nyu_index(root, [good, bad])
        with pytest.raises(DatasetError, match="outside the dataset root|absolute path"):
            NYUv2(root, "test")
    os.symlink(outside / "img", root / "link")
    _nyu_index(root, [good, ["link/" + p.split("/")[1] for p in files]])
    with pytest.raises(DatasetError, match="outside the dataset root"):
        NYUv2(root, "test")
    assert len(NYUv2(root, "test", allow_outside_root=True)) == 2  # the explicit option allows it
    _nyu_index(root, [good, ["img/missing.png"] + good[1:], ["img/gone.png"] + good[1:]])
    with pytest.raises(DatasetError, match=r"2 file\(s\).*missing.png.*gone.png"):
        NYUv2(root, "test")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from adapmtl.cli import main

    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    calls = [
        ["train", "-c", str(tmp_path / "missing.yaml")],
        ["train", "-c", str(tmp_path)],
        ["train", "-c", str(tmp_path / "bad.yaml")],
        ["train", "-c", str(tmp_path / "bad.yaml").replace("bad", "none"), "optim.lr=.inf"],
        ["eval", "--checkpoint", str(tmp_path / "bad.pt")],
        ["eval", "--checkpoint", str(tmp_path / "none.pt")],
        ["export", "--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "x.safetensors")],
        ["compare", "-c", str(tmp_path / "bad.yaml"), "--methods", "nope"],
        ["compare", "-c", str(tmp_path / "bad.yaml"), "--sparsity", "1.5"],
    ]
    for argv in calls:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"adapmtl {argv[0]}: error:"), (argv, err)
        assert "Traceback" not in err
