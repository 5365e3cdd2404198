"""Build adapmtl: the C++ CPU extension always, the CUDA extension where torch has CUDA and nvcc exists.

Environment overrides:
  ADAPMTL_FORCE_CUDA=1   build the CUDA extension (fails loudly if it cannot)
  ADAPMTL_NO_CUDA=1      never build it
  TORCH_CUDA_ARCH_LIST   architectures (default: those of this machine's GPUs; without a GPU "8.0;9.0+PTX",
                         A100 and H100 with PTX for newer GPUs)
  MAX_JOBS               parallel compile jobs (scripts/install.sh sets it to the number of cores)

Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.editable_wheel import editable_wheel

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - only hit on a misconfigured build
    sys.exit("adapmtl: torch must be installed before building; use `pip install --no-build-isolation -e .`")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _build_cuda():
    if _flag("ADAPMTL_NO_CUDA"):
        return False
    if _flag("ADAPMTL_FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit("adapmtl: ADAPMTL_FORCE_CUDA=1 but the installed torch has no CUDA (torch.version.cuda is None)")
        if CUDA_HOME is None:
            sys.exit("adapmtl: ADAPMTL_FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern):
    return sorted(glob.glob(os.path.join(CSRC, pattern)))


# The C++ standard is left to torch.utils.cpp_extension (torch >= 2.10 headers need C++20).
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
ext_modules = [
    CppExtension(
        "adapmtl._C",
        sources=[os.path.join(CSRC, "ops.cpp")] + _sources("cpu/*.cpp"),
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

cuda_sources = _sources("cuda/*.cu") + _sources("cuda/*.cpp")
def _default_arch_list() -> str:
    """The GPUs of this machine when it has any (a faster build, for where it will run); else A100 and H100
    with PTX for newer GPUs. TORCH_CUDA_ARCH_LIST overrides both."""
    if torch.cuda.is_available():
        archs = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in archs) + "+PTX"
    return "8.0;9.0+PTX"


if cuda_sources and _build_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
    ext_modules.append(
        CUDAExtension(
            "adapmtl._C_cuda",
            sources=cuda_sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", "-lineinfo"],
            },
        )
    )

class _ImportHookFirst:
    """Wraps setuptools' editable strategy: the same files, but the .pth puts its import hook first."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        for name, content in self.strategy.get_implementation():
            words = content.decode("ascii", "replace").split(";")[0].split()
            if name.endswith(".pth") and len(words) == 2 and words[0] == "import":  # "import <finder>; <finder>.install()"
                hook = words[1]
                content = (f"import {hook}, sys; {hook}.install(); sys.meta_path.insert(0, sys.meta_path.pop("
                           f"sys.meta_path.index({hook}._EditableFinder)))\n").encode("ascii")
            wheel.writestr(name, content)

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


class EditableHookFirst(editable_wheel):
    """`pip install -e .` maps triton_kernels/ to adapmtl.triton_kernels with an import hook that setuptools
    appends to sys.meta_path, after the path finder: from a folder holding a folder named adapmtl (the parent
    of a clone), `import adapmtl` then found that folder as an empty namespace package (pypa/setuptools#3557).
    The hook goes first instead; compat and strict modes (a plain .pth, no hook) are left as they are."""

    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)
        return _ImportHookFirst(strategy) if hasattr(strategy, "get_implementation") else strategy


setup(
    packages=find_packages(include=["adapmtl", "adapmtl.*"]) + ["adapmtl.triton_kernels"],
    # The Triton kernels live in the top-level triton_kernels/ folder but ship as adapmtl.triton_kernels,
    # so we never install a top-level package of that (commonly used) name.
    package_dir={"adapmtl": "adapmtl", "adapmtl.triton_kernels": "triton_kernels"},
    package_data={"adapmtl": ["configs/*.yaml"]},  # `adapmtl train -c demo` from any folder
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "editable_wheel": EditableHookFirst},
)
