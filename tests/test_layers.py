"""The package's layers (README "Layout"): every import, lazy ones included, points down or sideways."""
import ast
import os

import adapmtl

PACKAGE = os.path.dirname(os.path.abspath(adapmtl.__file__))
# lowest first; a module may import from its own layer and the ones below
LAYERS = [
    ("adapmtl._ext", "adapmtl.ops", "adapmtl.triton_kernels"),
    ("adapmtl.nn",),
    ("adapmtl.sparsify", "adapmtl.sparsity_control", "adapmtl.export", "adapmtl.export_passes", "adapmtl.export_stacking",
     "adapmtl.export_format",
     "adapmtl.interchange", "adapmtl.checkpoint_io", "adapmtl.timing", "adapmtl.distributed"),
    ("adapmtl.tasks", "adapmtl.losses", "adapmtl.metrics", "adapmtl.models", "adapmtl.data"),
    ("adapmtl.baselines",),
    ("adapmtl.train",),
    ("adapmtl.cli", "adapmtl.__main__"),
]
FACADE = 3  # `import adapmtl` (the package root re-exports everything up to the models and data)


def layer_of(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    if module == "adapmtl":
        return FACADE
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py")


def imports(source: str) -> set[str]:
    """The adapmtl modules a source imports, anywhere in it (lazy imports inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "adapmtl"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "adapmtl":
            if node.module == "adapmtl":  # `from adapmtl import models`: a submodule, or a name of the facade
                out |= {f"adapmtl.{a.name}" if os.path.exists(os.path.join(PACKAGE, a.name)) or os.path.exists(
                    os.path.join(PACKAGE, a.name + ".py")) else "adapmtl" for a in node.names}
            else:
                out.add(node.module)
    return out


def test_the_check_sees_lazy_and_facade_imports():
    source = "import adapmtl\nfrom adapmtl import models, sparsify_\ndef f():\n    from adapmtl.train.config import X\n"
    assert imports(source) == {"adapmtl", "adapmtl.models", "adapmtl.train.config"}
    assert layer_of("adapmtl.train.config") > layer_of("adapmtl.baselines.masks") > layer_of("adapmtl.models.tiny")


def test_every_import_points_down():
    wrong = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            if module == "adapmtl":
                continue  # the facade
            mine = layer_of(module)
            for target in imports(open(path).read()):
                if layer_of(target) > mine:
                    wrong.append(f"{module} (layer {mine}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))
