"""Backend choice for the functions of :mod:`fastode.cpp` ("cpp" or the PyTorch reference "torch")."""
from __future__ import annotations

import os

import torch

from ..ops.mlp import get_preference
from ._loader import available, error

_DTYPES = (torch.float32, torch.float64)

WIDE_LAYER = 256
"""Layers with at least this many units are "wide": the C++ kernels use 128-row tiles for them (tile_rows)."""


def tile_rows(batch: int | None = None, width: int | None = None) -> int:
    """Rows per tile of the C++ kernels: ``FASTODE_CPP_TILE`` if set, else 128 from a batch of 512 on or when
    the widest layer (``width``) has 256 units or more, otherwise 64 (small batches still split across threads).

    Why 128 for wide layers: each tile adds its weight gradient ``W (m x n)`` into a per-chunk accumulator and
    runs its GEMMs with only ``tile`` rows; at 256+ units that read-modify-write of ``W`` and the short GEMMs
    dominate over the tile's arithmetic, and 128 rows halve both (bench/results/cpp_width.md). It depends
    only on the shapes, never on the thread count, so results do not depend on the number of threads."""
    env = os.environ.get("FASTODE_CPP_TILE")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    if batch is not None and batch >= 512:
        return 128
    if width is not None and width >= WIDE_LAYER:
        return 128
    return 64


def mlp_tile_rows(batch: int, params) -> int:
    """:func:`tile_rows` for a call on the MLP with per-layer ``(W, b, gw, gb, bw)`` tuples ``params`` (its
    widest layer counts); every C++ entry point (the MLP ops and :class:`fastode.cpp.CnfStepper`) tiles this way."""
    return tile_rows(batch, max(layer[0].shape[0] for layer in params))


def cpp_unsupported(*tensors) -> str | None:
    """Why the C++ kernels cannot take these tensors (None when they can)."""
    if not available():
        return error()
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
    """Resolve ``backend`` ("auto", "cpp" or "torch") for a call on ``tensors``: the backend that runs it."""
    name = (backend or "auto").lower()
    if name == "auto":
        name = get_preference()
    if name not in ("auto", "cpp", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'cpp' or 'torch'")
    reason = cpp_unsupported(*tensors)
    if name == "cpp":
        if reason is not None:
            raise ValueError(f"backend 'cpp' cannot run this call: {reason}")
    elif name != "torch":  # auto (a global "triton" means: no preference among CPU backends)
        name = "cpp" if reason is None else "torch"
    return name


def prefer_cpp(*tensors) -> str:
    """"cpp" when the C++ kernels can take ``tensors``, else "torch" (no global override: used by the
    registered MLP backend, whose selection the registry already made)."""
    return "cpp" if cpp_unsupported(*tensors) is None else "torch"
