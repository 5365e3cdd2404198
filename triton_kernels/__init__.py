"""Triton kernels of adapmtl, one kernel family per file; shipped as `adapmtl.triton_kernels`."""
