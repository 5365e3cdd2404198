import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The flag must be set before any kernel is
# defined (decorated), i.e. before adapmtl.triton_kernels is imported, which only happens on first use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def synthetic_scenes(tmp_path_factory):
    """`make(n_train, n_test)`: the folder of 32-px synthetic scenes (seed 0) of that size, made once per
    session and shared by the test files that train on them (read only)."""
    made = {}

    def make(n_train: int, n_test: int) -> str:
        if (n_train, n_test) not in made:
            from adapmtl.data import make_synthetic_scenes

            root = tmp_path_factory.mktemp(f"scenes_{n_train}_{n_test}") / "scenes"
            make_synthetic_scenes(str(root), n_train=n_train, n_test=n_test, size=32, seed=0)
            made[(n_train, n_test)] = str(root)
        return made[(n_train, n_test)]

    return make
