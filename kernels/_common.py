"""Shared Triton device helpers and launch utilities (no autograd, no solver knowledge).

Every helper here is written so that the *same code* runs under ``TRITON_INTERPRET=1`` and on the GPU:
no libdevice, no inline asm, no ``break``/``return`` inside loops, explicit dot precision.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastode.codes import ACTIVATION_CODES as ACT_CODES

# the activation codes as constexprs, for the kernels' compile-time branches
ACT_TANH = tl.constexpr(ACT_CODES["tanh"])
ACT_SOFTPLUS = tl.constexpr(ACT_CODES["softplus"])
ACT_ELU = tl.constexpr(ACT_CODES["elu"])
ACT_SWISH = tl.constexpr(ACT_CODES["swish"])

# FP32-accurate matmuls: TF32 noise (~1e-3 relative) would corrupt adaptive-step error estimates.
DOT_PRECISION = "ieee"


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_POISON = os.environ.get("FASTODE_KERNEL_POISON", "0") not in ("", "0")


def set_poison(flag: bool) -> None:
    """Debug/test aid: launchers fill outputs and scratch buffers with NaN before the kernels write them."""
    global _POISON
    _POISON = bool(flag)


def empty(shape, like: torch.Tensor) -> torch.Tensor:
    """``torch.empty`` with ``like``'s dtype/device (NaN-filled when poisoning is on)."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if _POISON:
        out.fill_(float("nan"))
    return out


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return empty(x.shape, x)


_SM_COUNT: dict = {}


def max_programs(device: torch.device) -> int:
    """Default number of persistent programs for ``device``."""
    if device.type != "cuda":
        return 1 << 30
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@triton.jit
def _tanh(x):
    # exp form (interpreter-safe; tl.math has no tanh): |error| <= a few ulp of 1
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """Activation ``ACT`` (code from ACT_CODES) of ``x``."""
    if ACT == ACT_TANH:
        y = _tanh(x)
    elif ACT == ACT_SOFTPLUS:
        # torch.nn.functional.softplus (beta=1, threshold=20)
        sp = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        y = tl.where(x > 20.0, x, sp)
    elif ACT == ACT_ELU:
        y = tl.where(x > 0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)
    elif ACT == ACT_SWISH:
        y = x * tl.sigmoid(x)
    else:
        y = x
    return y


@triton.jit
def act_d1(x, ACT: tl.constexpr):
    """First derivative of the activation at ``x``."""
    if ACT == ACT_TANH:
        y = _tanh(x)
        d = 1.0 - y * y
    elif ACT == ACT_SOFTPLUS:
        d = tl.where(x > 20.0, 1.0, tl.sigmoid(x))
    elif ACT == ACT_ELU:
        d = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif ACT == ACT_SWISH:
        s = tl.sigmoid(x)
        d = s + x * s * (1.0 - s)
    else:
        d = x * 0.0 + 1.0
    return d


@triton.jit
def act_d2(x, ACT: tl.constexpr):
    """Second derivative of the activation at ``x``."""
    if ACT == ACT_TANH:
        y = _tanh(x)
        d = -2.0 * y * (1.0 - y * y)
    elif ACT == ACT_SOFTPLUS:
        s = tl.sigmoid(x)
        d = tl.where(x > 20.0, 0.0, s * (1.0 - s))
    elif ACT == ACT_ELU:
        d = tl.where(x > 0, 0.0, tl.exp(tl.minimum(x, 0.0)))
    elif ACT == ACT_SWISH:
        s = tl.sigmoid(x)
        d = s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
    else:
        d = x * 0.0
    return d
