"""Autograd Functions over the fused RK kernels of ``fastode.kernels.rk`` (kernel -> launcher -> Function).

* :func:`rk_stage(y, ks, coefs, dt)` = ``y + dt * sum_j coefs[j] * ks[j]``
* :func:`rk_epilogue(y0, ks, b, b_err, dt, atol, rtol)` =
  ``(y1, err, ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)``
* :func:`rk_error_ratio(y_err, y0, y1, atol, rtol)` = ``(ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)``

All are differentiable w.r.t. ``y``/``y0``, every ``k`` and a tensor ``dt`` (the backward passes are Triton
kernels too; with ``create_graph=True`` the backward differentiates the equivalent torch formulas instead,
so higher derivatives work). The RMS ratios are differentiable (for error regularisers); the max ratios
and ``atol``/``rtol`` are treated as constants. The coefficients are Python floats taken from
:mod:`fastode.tableaus` by the caller.

CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) only. Importing this module registers the backend
"triton" of the ops ``rk.combine`` and ``rk.error_ratio`` (:mod:`fastode.ops.rk`), which solvers resolve once
per solve; the double-backward references are the spec's own functions.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastode.kernels import rk as _K

from ..norms import max_norm, rms_norm
from . import registry
from .reference_grad import reference_backward
from .rk import combine_stages, error_ratio, sample_error_ratios

__all__ = ["rk_stage", "rk_epilogue", "rk_error_ratio"]


class _Stage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefs, y, dt, *ks):
        ctx.coefs = coefs
        ctx.save_for_backward(dt, *ks)
        return _K.rk_stage(y, ks, coefs, dt)

    @staticmethod
    def backward(ctx, g):
        dt, *ks = ctx.saved_tensors
        if torch.is_grad_enabled():
            gy = g if ctx.needs_input_grad[1] else None
            ref = lambda dt, *ks: (combine_stages(None, dt, ctx.coefs, ks),)  # noqa: E731
            return (None, gy) + reference_backward(ref, [dt, *ks], (g,), ctx.needs_input_grad[2:])
        need_k = any(ctx.needs_input_grad[3:])
        need_dt = ctx.needs_input_grad[2]
        g_y = g if ctx.needs_input_grad[1] else None
        if not (need_k or need_dt):
            return (None, g_y, None) + (None,) * len(ks)
        gks, gdt = _K.rk_stage_backward(g, ks, ctx.coefs, dt, need_dt)
        gks = [gk if n else None for gk, n in zip(gks, ctx.needs_input_grad[3:])]
        return (None, g_y, gdt.reshape(dt.shape) if gdt is not None else None, *gks)


class _Epilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, b_err, atol, rtol, y0, dt, *ks):
        y1, err, rms_b, max_b, rms_s, max_s = _K.rk_epilogue(y0, ks, b, b_err, dt, atol, rtol)
        ctx.b, ctx.b_err, ctx.atol, ctx.rtol = b, b_err, atol, rtol
        ctx.set_materialize_grads(False)
        if b_err is None:
            ctx.save_for_backward(y0, dt, *ks)
            ctx.n_saved = 0
            return y1
        ctx.mark_non_differentiable(max_b, max_s)
        ctx.save_for_backward(rms_b, rms_s, y0, dt, *ks)
        ctx.n_saved = 2
        return y1, err, rms_b, max_b, rms_s, max_s

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        if ctx.n_saved:
            rms_b, rms_s, y0, dt, *ks = saved
            g1, ge, grb, _gmb, grs, _gms = grads
        else:
            y0, dt, *ks = saved
            rms_b = rms_s = ge = grb = grs = None
            (g1,) = grads
        none = (None,) * (4 + 2 + len(ks))
        if torch.is_grad_enabled():
            def ref(y0, dt, *ks):
                y1 = combine_stages(y0, dt, ctx.b, ks)
                if ctx.b_err is None:
                    return (y1,)
                err = combine_stages(None, dt, ctx.b_err, ks)
                return y1, err, *_rms_ratios(err, y0, y1, ctx.atol, ctx.rtol)
            gs = (g1,) if ctx.b_err is None else (g1, ge, grb, grs)
            return (None,) * 4 + reference_backward(ref, [y0, dt, *ks], gs, ctx.needs_input_grad[4:])
        if all(g is None for g in (g1, ge, grb, grs)):
            return none
        need_dt = ctx.needs_input_grad[5]
        gy0, gks, gdt = _K.rk_epilogue_backward(
            y0, ks, ctx.b, ctx.b_err, dt, ctx.atol, ctx.rtol, rms_b, rms_s, g1=g1, ge=ge, grb=grb, grs=grs,
            need_dt=need_dt)
        gks = [gk if n else None for gk, n in zip(gks, ctx.needs_input_grad[6:])]
        return (None, None, None, None, gy0 if ctx.needs_input_grad[4] else None,
                gdt.reshape(dt.shape) if gdt is not None else None, *gks)


class _ErrorRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, atol, rtol, y_err, y0, y1):
        rms_b, max_b, rms_s, max_s = _K.rk_error_ratio(y_err, y0, y1, atol, rtol)
        ctx.atol, ctx.rtol = atol, rtol
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(max_b, max_s)
        ctx.save_for_backward(y_err, y0, y1, rms_b, rms_s)
        return rms_b, max_b, rms_s, max_s

    @staticmethod
    def backward(ctx, grb, _gmb, grs, _gms):
        if grb is None and grs is None:
            return (None,) * 5
        y_err, y0, y1, rms_b, rms_s = ctx.saved_tensors
        if torch.is_grad_enabled():
            def ref(y_err, y0, y1):
                return _rms_ratios(y_err, y0, y1, ctx.atol, ctx.rtol)
            return (None, None) + reference_backward(ref, [y_err, y0, y1], (grb, grs), ctx.needs_input_grad[2:])
        ge, g0, g1 = _K.rk_error_ratio_backward(y_err, y0, y1, ctx.atol, ctx.rtol, rms_b, rms_s, grb=grb, grs=grs)
        n = ctx.needs_input_grad
        return None, None, ge if n[2] else None, g0 if n[3] else None, g1 if n[4] else None


def _rms_ratios(err, y0, y1, atol, rtol):
    """The differentiable outputs of the fused ratio (batch RMS, per-sample RMS) from the spec (double backward)."""
    return (error_ratio(err, y0, y1, rtol, atol, rms_norm),
            sample_error_ratios(err, y0, y1, rtol, atol, "rms"))


def _dt_tensor(dt, like):
    if isinstance(dt, torch.Tensor):
        return dt if dt.dtype == like.dtype and dt.device == like.device else dt.to(like)
    return _K.as_device_scalar(dt, like)


def rk_stage(y, ks: Sequence[torch.Tensor], coefs: Sequence[float], dt) -> torch.Tensor:
    """``y + dt * sum_j coefs[j] * ks[j]`` fused into one kernel (differentiable). ``coefs`` may be shorter
    than ``ks`` (the first ``len(coefs)`` stages are used); ``y=None`` gives ``dt * sum_j coefs[j] * ks[j]``."""
    coefs = tuple(float(c) for c in coefs)
    if len(coefs) > len(ks):
        raise ValueError(f"{len(coefs)} coefficients but only {len(ks)} stage derivatives")
    ks = tuple(ks[:len(coefs)])
    if all(c == 0.0 for c in coefs):
        return y if y is not None else torch.zeros_like(ks[0])
    return _Stage.apply(coefs, y, _dt_tensor(dt, ks[0]), *ks)


def rk_error_ratio(y_err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, atol=0.0, rtol=0.0):
    """``r = y_err / (atol + rtol * max(|y0|, |y1|))`` reduced in one launch to ``(rms, max, rms per sample,
    max per sample)``; the RMS values are differentiable w.r.t. ``y_err``, ``y0``, ``y1``."""
    return _ErrorRatio.apply(atol, rtol, y_err, y0, y1)


def rk_epilogue(y0: torch.Tensor, ks: Sequence[torch.Tensor], b: Sequence[float], b_err, dt, atol=0.0, rtol=0.0):
    """Fused step epilogue (differentiable); see the module docstring. ``b_err=None`` returns only ``y1``."""
    b = tuple(float(x) for x in b)
    b_err = tuple(float(x) for x in b_err) if b_err is not None else None
    return _Epilogue.apply(b, b_err, atol, rtol, y0, _dt_tensor(dt, y0), *ks)


# ------------------------------------------------------------------------------------------ registration
def _same_layout(tensors) -> bool:
    t0 = tensors[0]
    return all(t.device == t0.device and t.dtype == t0.dtype and t.shape == t0.shape for t in tensors)


def _combine(y0, dt, coeffs, k):
    """Backend "triton" of ``rk.combine``; calls it cannot fuse (tensor coefficients such as dense-output
    weights at a differentiable time, mixed shapes) take the spec, per call and without a host read."""
    n = len(coeffs)
    if n == 0 or not all(isinstance(a, (float, int)) for a in coeffs) or \
            not _same_layout(list(k[:n]) + ([y0] if y0 is not None else [])):
        return combine_stages(y0, dt, coeffs, k)
    return rk_stage(y0, k[:n], coeffs, dt)


def _error_ratio(y_err, y0, y1, rtol, atol, norm):
    """Backend "triton" of ``rk.error_ratio`` (RMS and max norms; resolution checks the norm once)."""
    if not _same_layout([y_err, y0, y1]):
        return error_ratio(y_err, y0, y1, rtol, atol, norm)
    rms, mx, _, _ = rk_error_ratio(y_err, y0, y1, atol, rtol)
    return rms if norm is rms_norm else mx


def _ratio_supports(norm):
    if norm is rms_norm or norm is max_norm:
        return None
    return f"the fused error ratio implements the RMS and max norms, not {getattr(norm, '__name__', norm)!r}"


def _devices():
    import os

    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else ("cuda",)


registry.register("rk.combine", "triton", _combine, devices=_devices())
registry.register("rk.error_ratio", "triton", _error_ratio, devices=_devices(), supports=_ratio_supports)
