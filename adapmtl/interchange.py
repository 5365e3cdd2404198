"""The ecosystem's model formats, beside our own safetensors export (adapmtl.export_format):

- **pt2** (`export_pt2`): a `torch.export` ExportedProgram (`torch.export.save`). Sparse layers stay sparse:
  they are calls of the registered `torch.ops.adapmtl.sparse_conv2d` / `sparse_linear` ops (with fake
  kernels, so tracing needs no data), which run after `import adapmtl` on whatever device the program
  is moved to. It is the input of AOTInductor (`torch._inductor.aoti_compile_and_package`), which
  compiles it to a shared library with the same custom-op calls (benchmarks/bench_export.py).
  Loading a .pt2 uses torch's own deserializer: treat it as trusted input.
- **onnx** (`export_onnx`): the finalized dense model (soft thresholds baked into plain Conv2d /
  Linear weights: ONNX has no sparse convolution), via `torch.onnx.export(dynamo=True)` (or the legacy
  TorchScript exporter, `exporter="torchscript"`, for runtimes that read only older ONNX IR), for
  onnxruntime and other runtimes. Needs `pip install onnx onnxscript`.

Which to use: safetensors (`adapmtl export`, the default) for our sparse kernels from eager PyTorch on
untrusted files; pt2 to deploy through torch.export / AOTInductor; onnx for runtimes outside PyTorch.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from adapmtl.checkpoint_io import output_mode
from adapmtl.nn.sparse_layers import traced_at_static_sizes
from adapmtl.nn.str_layers import STR_LAYER_TYPES, SoftThreshold

FORMATS = ("safetensors", "pt2", "onnx")


def _example_args(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, tuple) and all(isinstance(t, torch.Tensor) for t in example_input):
        return example_input
    raise TypeError("argument 'example_input' must be a tensor or a tuple of tensors, got "
                    f"{type(example_input).__name__}")


def export_pt2(model: nn.Module, example_input: Any, path, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """Trace `model` (eval mode; e.g. the result of `adapmtl.export_sparse`) with `torch.export` on
    `example_input` and save the ExportedProgram to `path`. Load it with `torch.export.load(path)` after
    `import adapmtl` (which registers the sparse ops); `torch._inductor.aoti_compile_and_package(program)`
    compiles it ahead of time. This is the way to compile an exported sparse model (`torch.compile` of it works
    too, `fullgraph=True` included).

    With `dynamic_batch` (default) the program takes any batch size (dim 0 of every input; an example of batch 1
    is traced as two copies, since torch.export fixes a size-1 dimension); without it, only the example's."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_pt2: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"export_pt2: argument 'dynamic_batch' must be a bool, got {type(dynamic_batch).__name__}")
    if any(isinstance(m, (*STR_LAYER_TYPES, SoftThreshold)) for m in model.modules()):
        raise ValueError("export_pt2: the model still has training-time STR layers or soft thresholds; export "
                         "adapmtl.export_sparse(model) (sparse) or adapmtl.finalize(model) (dense) instead")
    args, dynamic = _example_args(example_input), None
    if dynamic_batch:
        if any(a.dim() == 0 for a in args):
            raise ValueError("export_pt2: dynamic_batch needs every input to have a batch dimension (dim 0); pass "
                             "dynamic_batch=False")
        args = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in args)
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    was = model.training
    model.eval()
    try:
        # height and width are static in the program: dilated sparse convs trace without their dead taps
        with torch.no_grad(), traced_at_static_sizes(model, args):
            program = torch.export.export(model, args, dynamic_shapes=dynamic)
    finally:
        model.train(was)
    torch.export.save(program, os.fspath(path))
    os.chmod(path, output_mode())
    return program


ONNX_EXPORTERS = ("dynamo", "torchscript")


def export_onnx(model: nn.Module, example_input: Any, path, output_names: list[str] | None = None,
                exporter: str = "dynamo") -> None:
    """Write the dense, finalized form of `model` (a copy: STR layers baked into plain layers) as ONNX.
    Outputs are named `output_names`, default the keys of a dict-returning model (its tasks).
    exporter: "dynamo" (torch.onnx's default, needs onnxscript) or "torchscript" (the legacy exporter, opset 17,
    ONNX IR 8: the file older runtimes such as DeepSparse 1.8 read; needs only onnx)."""
    from adapmtl.sparsify import finalize

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"export_onnx: argument 'exporter' must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    try:
        import onnx  # noqa: F401
        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError("export_onnx needs `pip install onnx onnxscript` (onnxruntime to run the file)") from exc
    dense = finalize(copy.deepcopy(model)).eval()
    args = _example_args(example_input)
    with torch.no_grad():
        out = dense(*args)
    if output_names is None and isinstance(out, dict):
        output_names = list(out)
    if exporter == "dynamo":
        torch.onnx.export(dense, args, os.fspath(path), dynamo=True, output_names=output_names)
    else:
        torch.onnx.export(dense, args, os.fspath(path), dynamo=False, opset_version=17, output_names=output_names)
    os.chmod(path, output_mode())
