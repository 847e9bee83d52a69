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

Under ``torch.compile`` the same kernels run as the custom ops ``fastode::triton_rk_stage``,
``triton_rk_epilogue`` and ``triton_rk_error_ratio`` (each with a fake implementation and an autograd formula that
calls its backward op), so that a compiled solve sees one graph node per call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from fastode.kernels import rk as _K

from ..norms import max_norm, rms_norm
from ..ops import registry
from ..ops.reference_grad import reference_backward
from ..ops.rk import StepSize, combine_stages, error_ratio, sample_error_ratios

__all__ = ["rk_stage", "rk_epilogue", "rk_error_ratio", "triton_rk_stage_op", "triton_rk_epilogue_op",
           "triton_rk_error_ratio_op"]


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
            return (None, gy) + reference_backward(_stage_spec(ctx.coefs), [dt, *ks], (g,), ctx.needs_input_grad[2:])
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
            gs = (g1,) if ctx.b_err is None else (g1, ge, grb, grs)
            ref = _epilogue_spec(ctx.b, ctx.b_err, ctx.atol, ctx.rtol)
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
            return (None, None) + reference_backward(_ratio_spec(ctx.atol, ctx.rtol), [y_err, y0, y1], (grb, grs),
                                                     ctx.needs_input_grad[2:])
        ge, g0, g1 = _K.rk_error_ratio_backward(y_err, y0, y1, ctx.atol, ctx.rtol, rms_b, rms_s, grb=grb, grs=grs)
        n = ctx.needs_input_grad
        return None, None, ge if n[2] else None, g0 if n[3] else None, g1 if n[4] else None


def _rms_ratios(err, y0, y1, atol, rtol):
    """The differentiable outputs of the fused ratio (batch RMS, per-sample RMS) from the spec (double backward)."""
    return (error_ratio(err, y0, y1, rtol, atol, rms_norm),
            sample_error_ratios(err, y0, y1, rtol, atol, "rms"))


# The spec's formula of each kernel's differentiable outputs, what a backward with create_graph=True differentiates
# (the eager Functions and the custom ops alike).
def _stage_spec(coefs):
    return lambda dt, *ks: (combine_stages(None, dt, coefs, ks),)


def _epilogue_spec(b, b_err, atol, rtol):
    def ref(y0, dt, *ks):
        y1 = combine_stages(y0, dt, b, ks)
        if b_err is None:
            return (y1,)
        err = combine_stages(None, dt, b_err, ks)
        return y1, err, *_rms_ratios(err, y0, y1, atol, rtol)
    return ref


def _ratio_spec(atol, rtol):
    return lambda y_err, y0, y1: _rms_ratios(y_err, y0, y1, atol, rtol)


def _tensor_arg(dt, like):
    """``dt`` (or a tolerance: a number or a tensor) as a tensor argument in ``like``'s dtype and device."""
    if isinstance(dt, torch.Tensor):
        return dt if dt.dtype == like.dtype and dt.device == like.device else dt.to(like)
    if torch.compiler.is_compiling():  # a constant of the graph, not the eager launchers' cache
        return torch.full((), float(dt), dtype=like.dtype, device=like.device)
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
    if torch.compiler.is_compiling():
        return triton_rk_stage_op(y, list(ks), list(coefs), _tensor_arg(dt, ks[0]))
    return _Stage.apply(coefs, y, _tensor_arg(dt, ks[0]), *ks)


def rk_error_ratio(y_err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, atol=0.0, rtol=0.0):
    """``r = y_err / (atol + rtol * max(|y0|, |y1|))`` reduced in one launch to ``(rms, max, rms per sample,
    max per sample)``; the RMS values are differentiable w.r.t. ``y_err``, ``y0``, ``y1``."""
    if torch.compiler.is_compiling():
        return triton_rk_error_ratio_op(y_err, y0, y1, _tensor_arg(atol, y0), _tensor_arg(rtol, y0))
    return _ErrorRatio.apply(atol, rtol, y_err, y0, y1)


def rk_epilogue(y0: torch.Tensor, ks: Sequence[torch.Tensor], b: Sequence[float], b_err, dt, atol=0.0, rtol=0.0):
    """Fused step epilogue (differentiable); see the module docstring. ``b_err=None`` returns only ``y1``."""
    b = tuple(float(x) for x in b)
    b_err = tuple(float(x) for x in b_err) if b_err is not None else None
    if torch.compiler.is_compiling():
        if b_err is None:  # the solution alone is a stage combination with the weights b
            return triton_rk_stage_op(y0, list(ks), list(b), _tensor_arg(dt, y0))
        return triton_rk_epilogue_op(y0, list(ks), list(b), list(b_err), _tensor_arg(dt, y0),
                                     _tensor_arg(atol, y0), _tensor_arg(rtol, y0))
    return _Epilogue.apply(b, b_err, atol, rtol, y0, _tensor_arg(dt, y0), *ks)


# ---------------------------------------------------------------------------------------------- custom ops
# The same kernels as torch.library custom ops, so that torch.compile sees one node per call (dynamo cannot trace
# the launchers' Python); eager calls keep the Functions above. Tolerances enter as tensors (0-dim or the state's
# shape). A backward asked for with create_graph=True differentiates the spec instead, as the Functions do.
Tensor = torch.Tensor


@torch.library.custom_op("fastode::triton_rk_stage", mutates_args=())
def triton_rk_stage_op(y: Optional[Tensor], ks: List[Tensor], coefs: List[float], dt: Tensor) -> Tensor:
    """``y + dt * sum_j coefs[j] * ks[j]`` (``y`` None: without it)."""
    return _K.rk_stage(y, ks, coefs, dt)


@triton_rk_stage_op.register_fake
def _(y, ks, coefs, dt):
    return torch.empty_like(ks[0] if y is None else y)


@torch.library.custom_op("fastode::triton_rk_stage_backward", mutates_args=())
def triton_rk_stage_backward_op(g: Tensor, ks: List[Tensor], coefs: List[float], dt: Tensor
                                ) -> Tuple[List[Tensor], Tensor]:
    """``([dt c_j g], sum_j c_j <g, k_j>)``: the gradients of every stage derivative and of ``dt``."""
    gks, gdt = _K.rk_stage_backward(g, ks, coefs, dt, True)
    return gks, gdt.reshape(dt.shape).to(dt.dtype)


@triton_rk_stage_backward_op.register_fake
def _(g, ks, coefs, dt):
    return [torch.empty_like(g) for _ in ks], torch.empty_like(dt)


def _setup_stage_op(ctx, inputs, output):
    y, ks, coefs, dt = inputs
    ctx.coefs, ctx.has_y = list(coefs), y is not None
    ctx.save_for_backward(dt, *ks)


def _backward_stage_op(ctx, g):
    dt, *ks = ctx.saved_tensors
    gy = g if ctx.has_y else None
    if torch.is_grad_enabled():  # a graph of the backward: the spec's formula, differentiable
        gdt, *gks = reference_backward(_stage_spec(ctx.coefs), [dt, *ks], (g,), [True] * (1 + len(ks)))
    else:
        gks, gdt = triton_rk_stage_backward_op(g, ks, ctx.coefs, dt)
    return gy, list(gks), None, gdt


torch.library.register_autograd("fastode::triton_rk_stage", _backward_stage_op, setup_context=_setup_stage_op)


@torch.library.custom_op("fastode::triton_rk_epilogue", mutates_args=())
def triton_rk_epilogue_op(y0: Tensor, ks: List[Tensor], b: List[float], b_err: List[float], dt: Tensor, atol: Tensor,
                          rtol: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y1, err, ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)`` of :func:`rk_epilogue`."""
    return _K.rk_epilogue(y0, ks, b, b_err, dt, atol, rtol)


def _ratio_fakes(y0):
    B = 1 if y0.dim() <= 1 else y0.shape[0]
    return y0.new_empty(()), y0.new_empty(()), y0.new_empty(B), y0.new_empty(B)


@triton_rk_epilogue_op.register_fake
def _(y0, ks, b, b_err, dt, atol, rtol):
    return (torch.empty_like(y0), torch.empty_like(y0)) + _ratio_fakes(y0)


@torch.library.custom_op("fastode::triton_rk_epilogue_backward", mutates_args=())
def triton_rk_epilogue_backward_op(y0: Tensor, ks: List[Tensor], b: List[float], b_err: List[float], dt: Tensor,
                                   atol: Tensor, rtol: Tensor, rms_b: Tensor, rms_s: Tensor, g1: Optional[Tensor],
                                   ge: Optional[Tensor], grb: Optional[Tensor], grs: Optional[Tensor]
                                   ) -> Tuple[Tensor, List[Tensor], Tensor]:
    """``(g_y0, [g_k], g_dt)`` through ``y1``, ``err`` and the RMS ratios (absent gradients are None)."""
    gy0, gks, gdt = _K.rk_epilogue_backward(y0, ks, b, b_err, dt, atol, rtol, rms_b, rms_s, g1=g1, ge=ge, grb=grb,
                                            grs=grs, need_dt=True)
    return gy0, gks, gdt.reshape(dt.shape).to(dt.dtype)


@triton_rk_epilogue_backward_op.register_fake
def _(y0, ks, b, b_err, dt, atol, rtol, rms_b, rms_s, g1, ge, grb, grs):
    return torch.empty_like(y0), [torch.empty_like(y0) for _ in ks], torch.empty_like(dt)


def _setup_epilogue_op(ctx, inputs, output):
    y0, ks, b, b_err, dt, atol, rtol = inputs
    ctx.b, ctx.b_err = list(b), list(b_err)
    ctx.save_for_backward(y0, dt, atol, rtol, output[2], output[4], *ks)


def _backward_epilogue_op(ctx, g1, ge, grb, _gmb, grs, _gms):
    y0, dt, atol, rtol, rms_b, rms_s, *ks = ctx.saved_tensors
    if torch.is_grad_enabled():
        ref = _epilogue_spec(ctx.b, ctx.b_err, atol, rtol)
        gy0, gdt, *gks = reference_backward(ref, [y0, dt, *ks], (g1, ge, grb, grs), [True] * (2 + len(ks)))
    else:
        gy0, gks, gdt = triton_rk_epilogue_backward_op(y0, ks, ctx.b, ctx.b_err, dt, atol, rtol, rms_b, rms_s,
                                                       g1, ge, grb, grs)
    return gy0, list(gks), None, None, gdt, None, None


torch.library.register_autograd("fastode::triton_rk_epilogue", _backward_epilogue_op,
                                setup_context=_setup_epilogue_op)


@torch.library.custom_op("fastode::triton_rk_error_ratio", mutates_args=())
def triton_rk_error_ratio_op(y_err: Tensor, y0: Tensor, y1: Tensor, atol: Tensor, rtol: Tensor
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)`` of :func:`rk_error_ratio`."""
    return _K.rk_error_ratio(y_err, y0, y1, atol, rtol)


@triton_rk_error_ratio_op.register_fake
def _(y_err, y0, y1, atol, rtol):
    return _ratio_fakes(y0)


@torch.library.custom_op("fastode::triton_rk_error_ratio_backward", mutates_args=())
def triton_rk_error_ratio_backward_op(y_err: Tensor, y0: Tensor, y1: Tensor, atol: Tensor, rtol: Tensor,
                                      rms_b: Tensor, rms_s: Tensor, grb: Optional[Tensor], grs: Optional[Tensor]
                                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(g_y_err, g_y0, g_y1)`` through the RMS ratios."""
    return _K.rk_error_ratio_backward(y_err, y0, y1, atol, rtol, rms_b, rms_s, grb=grb, grs=grs)


@triton_rk_error_ratio_backward_op.register_fake
def _(y_err, y0, y1, atol, rtol, rms_b, rms_s, grb, grs):
    return torch.empty_like(y0), torch.empty_like(y0), torch.empty_like(y0)


def _setup_ratio_op(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[0], output[2])


def _backward_ratio_op(ctx, grb, _gmb, grs, _gms):
    y_err, y0, y1, atol, rtol, rms_b, rms_s = ctx.saved_tensors
    if torch.is_grad_enabled():
        ge, g0, g1 = reference_backward(_ratio_spec(atol, rtol), [y_err, y0, y1], (grb, grs), [True] * 3)
    else:
        ge, g0, g1 = triton_rk_error_ratio_backward_op(y_err, y0, y1, atol, rtol, rms_b, rms_s, grb, grs)
    return ge, g0, g1, None, None


torch.library.register_autograd("fastode::triton_rk_error_ratio", _backward_ratio_op, setup_context=_setup_ratio_op)



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
    if isinstance(dt, StepSize):  # the kernel takes the step as a device scalar either way: the tensor carries the grad
        dt = dt.grad
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
