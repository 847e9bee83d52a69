"""Triton kernels of fastode, shipped as `fastode.kernels` (see setup.py)."""
