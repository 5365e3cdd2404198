import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The flag must be set before any kernel is
# defined (decorated), i.e. before adapmtl.triton_kernels is imported, which only happens on first use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
