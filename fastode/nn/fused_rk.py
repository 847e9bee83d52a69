"""CUDA-only dispatch of the solver's two hot RK pieces to the fused Triton kernels.

``fastode.solvers.rk_step.combine_stages`` / ``error_ratio`` call :func:`combine_stages` / :func:`error_ratio`
here first; these return None (and the solver runs its PyTorch code) unless the call can use the fused
kernels: CUDA float32/float64 tensors, Python-float coefficients, Triton importable, and the RMS or max
norm. CPU tensors never import Triton. ``FASTODE_FUSED_RK=0`` (read per call) turns the dispatch off, e.g.
to reproduce torchdiffeq's CUDA rounding bit for bit (the kernels use torchdiffeq's weights
``fl(c_j * dt)`` but sum the stages in their own order).
"""
from __future__ import annotations

import os

import torch

__all__ = ["combine_stages", "error_ratio", "enabled"]

_impl = None
_failed = False


def enabled() -> bool:
    return os.environ.get("FASTODE_FUSED_RK", "1") not in ("0", "")


def _kernels():
    global _impl, _failed
    if _impl is None and not _failed:
        try:
            from . import triton_rk

            _impl = triton_rk
        except Exception:  # Triton missing or broken: keep the PyTorch path
            _failed = True
    return _impl


def _eligible(tensors) -> bool:
    t0 = tensors[0]
    if not (t0.is_cuda and t0.dtype in (torch.float32, torch.float64)):
        return False
    return all(t.device == t0.device and t.dtype == t0.dtype and t.shape == t0.shape for t in tensors)


def combine_stages(y0, dt, coeffs, k):
    """Fused ``y0 + dt * sum_j coeffs[j] * k[j]`` or None when not applicable."""
    n = len(coeffs)
    if n == 0 or not k[0].is_cuda or not enabled():
        return None
    if not all(isinstance(a, (float, int)) for a in coeffs):
        return None
    if not _eligible(list(k[:n]) + ([y0] if y0 is not None else [])):
        return None
    impl = _kernels()
    return None if impl is None else impl.rk_stage(y0, k[:n], coeffs, dt)


def error_ratio(y_err, y0, y1, rtol, atol, norm):
    """Fused ``norm(y_err / (atol + rtol * max(|y0|, |y1|)))`` for the RMS / max norms, or None."""
    if not isinstance(y_err, torch.Tensor) or not y_err.is_cuda or not enabled():
        return None
    from ..norms import max_norm, rms_norm

    if norm is not rms_norm and norm is not max_norm:
        return None
    if not _eligible([y_err, y0, y1]):
        return None
    impl = _kernels()
    if impl is None:
        return None
    rms, mx, _, _ = impl.rk_error_ratio(y_err, y0, y1, atol, rtol)
    return rms if norm is rms_norm else mx
