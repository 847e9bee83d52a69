"""Backend choice for the functions of :mod:`fastode.cpp` ("cpp" or the PyTorch reference "torch")."""
from __future__ import annotations

import os

import torch

from ._loader import _error, available

last_backend: str | None = None
"""Backend that ran the latest call of a :mod:`fastode.cpp` function ("cpp" or "torch")."""

_DTYPES = (torch.float32, torch.float64)


def tile_rows(batch: int | None = None) -> int:
    """Rows per tile of the C++ kernels: ``FASTODE_CPP_TILE`` if set, else 64 below a batch of 512 (small
    batches still split across threads) and 128 from 512 rows on (fewer per-tile costs). It depends only on
    the batch, never on the thread count, so results do not depend on the number of threads."""
    env = os.environ.get("FASTODE_CPP_TILE")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return 128 if batch is not None and batch >= 512 else 64


def cpp_unsupported(*tensors) -> str | None:
    """Why the C++ kernels cannot take these tensors (None when they can)."""
    if not available():
        return _error
    dtype = None
    for x in tensors:
        if x is None:
            continue
        if x.device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got a {x.device} tensor"
        if x.dtype not in _DTYPES:
            return f"the C++ backend supports float32 and float64, got {x.dtype}"
        if dtype is None:
            dtype = x.dtype
        elif x.dtype != dtype:
            return f"the C++ backend needs one dtype for all tensors, got {dtype} and {x.dtype}"
    return None


def choose(backend: str, *tensors) -> str:
    """Resolve ``backend`` ("auto", "cpp" or "torch") for a call on ``tensors``; records it."""
    global last_backend
    from ..nn.backends import get_global_backend

    name = (backend or "auto").lower()
    if name == "auto":
        name = get_global_backend()
    if name not in ("auto", "cpp", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'cpp' or 'torch'")
    reason = cpp_unsupported(*tensors)
    if name == "cpp":
        if reason is not None:
            raise ValueError(f"backend 'cpp' cannot run this call: {reason}")
    elif name != "torch":  # auto (a global "triton" means: no preference among CPU backends)
        name = "cpp" if reason is None else "torch"
    last_backend = name
    return name


def prefer_cpp(*tensors) -> str:
    """"cpp" when the C++ kernels can take ``tensors``, else "torch" (no global override: used by the
    registered MLP backend, whose selection the registry already made); records it."""
    global last_backend
    last_backend = "cpp" if cpp_unsupported(*tensors) is None else "torch"
    return last_backend
