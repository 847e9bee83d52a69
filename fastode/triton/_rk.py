"""The fused RK kernels of ``fastode.kernels.rk`` as fused ops (kernel -> launcher -> Function / custom op).

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

Each is declared once (:class:`fastode.ops.fused_op.FusedOp`): eagerly an autograd Function, under
``torch.compile`` the custom ops ``fastode::triton_rk_stage``, ``triton_rk_epilogue`` and ``triton_rk_error_ratio``
(each with a fake implementation and an autograd formula that calls its backward op), so that a compiled solve sees
one graph node per call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from fastode.kernels import rk as _K
from fastode.kernels._common import interpreter_active

from ..norms import max_norm, rms_norm
from ..ops import registry
from ..ops.fused_op import FusedOp, any_need, masked_grads
from ..ops.rk import StepSize, combine_stages, error_ratio, sample_error_ratios

__all__ = ["rk_stage", "rk_epilogue", "rk_error_ratio", "triton_rk_stage_op", "triton_rk_epilogue_op",
           "triton_rk_error_ratio_op"]


def _rms_ratios(err, y0, y1, atol, rtol):
    """The differentiable outputs of the fused ratio (batch RMS, per-sample RMS) from the spec (double backward)."""
    return (error_ratio(err, y0, y1, rtol, atol, rms_norm),
            sample_error_ratios(err, y0, y1, rtol, atol, "rms"))


# The spec's formula of the epilogue's differentiable outputs, what a backward with create_graph=True differentiates.
def _epilogue_spec(b, b_err, atol, rtol):
    def ref(y0, dt, *ks):
        y1 = combine_stages(y0, dt, b, ks)
        if b_err is None:
            return (y1,)
        err = combine_stages(None, dt, b_err, ks)
        return y1, err, *_rms_ratios(err, y0, y1, atol, rtol)
    return ref


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
    return TRITON_RK_STAGE(y, list(ks), list(coefs), _tensor_arg(dt, ks[0]))


def rk_error_ratio(y_err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, atol=0.0, rtol=0.0):
    """``r = y_err / (atol + rtol * max(|y0|, |y1|))`` reduced in one launch to ``(rms, max, rms per sample,
    max per sample)``; the RMS values are differentiable w.r.t. ``y_err``, ``y0``, ``y1``."""
    return TRITON_RK_ERROR_RATIO(y_err, y0, y1, _tensor_arg(atol, y0), _tensor_arg(rtol, y0))


def rk_epilogue(y0: torch.Tensor, ks: Sequence[torch.Tensor], b: Sequence[float], b_err, dt, atol=0.0, rtol=0.0):
    """Fused step epilogue (differentiable); see the module docstring. ``b_err=None`` returns only ``y1``."""
    b = tuple(float(x) for x in b)
    b_err = tuple(float(x) for x in b_err) if b_err is not None else None
    if b_err is None:  # the solution alone is a stage combination with the weights b
        return TRITON_RK_STAGE(y0, list(ks), list(b), _tensor_arg(dt, y0))
    return TRITON_RK_EPILOGUE(y0, list(ks), list(b), list(b_err), _tensor_arg(dt, y0), _tensor_arg(atol, y0),
                              _tensor_arg(rtol, y0))


# ---------------------------------------------------------------------------------------------- fused ops
# Each kernel declared once (fastode.ops.fused_op): its eager Function and its custom op (what torch.compile sees,
# one node per call) run the same launcher calls. Tolerances enter as tensors (0-dim or the state's shape). A
# backward asked for with create_graph=True differentiates the spec instead.
Tensor = torch.Tensor


def _stage_forward(y: Optional[Tensor], ks: List[Tensor], coefs: List[float], dt: Tensor) -> Tensor:
    """``y + dt * sum_j coefs[j] * ks[j]`` (``y`` None: without it)."""
    return _K.rk_stage(y, ks, coefs, dt)


def _stage_backward(g: Tensor, ks: List[Tensor], coefs: List[float], dt: Tensor, need_dt: bool
                    ) -> Tuple[List[Tensor], Tensor]:
    """``([dt c_j g], sum_j c_j <g, k_j>)``: the gradients of every stage derivative and (``need_dt``) of ``dt``."""
    gks, gdt = _K.rk_stage_backward(g, ks, coefs, dt, need_dt)
    return gks, (gdt.reshape(dt.shape).to(dt.dtype) if need_dt else dt.new_empty(0))


def _stage_grads(args, extra, attrs, gouts, needs, backward):
    y, ks, coefs, dt = args
    g = gouts[0]
    gy = g if y is not None and needs[0] else None
    need_k, need_dt = needs[1], bool(needs[3])
    if not (any_need(need_k) or need_dt):
        return gy, None, None, None
    gks, gdt = backward(g, ks, coefs, dt, need_dt)
    return gy, masked_grads(gks, need_k), None, (gdt if need_dt else None)


TRITON_RK_STAGE = FusedOp(
    "triton_rk_stage", forward=_stage_forward,
    fake=lambda y, ks, coefs, dt: torch.empty_like(ks[0] if y is None else y), backward=_stage_backward,
    backward_fake=lambda g, ks, coefs, dt, need_dt: ([torch.empty_like(g) for _ in ks],
                                                     torch.empty_like(dt) if need_dt else dt.new_empty(0)),
    setup=lambda args, out: ([], None), grads=_stage_grads,
    reference=lambda y, ks, coefs, dt: (combine_stages(y, dt, coefs, ks),))


def _epilogue_forward(y0: Tensor, ks: List[Tensor], b: List[float], b_err: List[float], dt: Tensor, atol: Tensor,
                      rtol: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y1, err, ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)`` of :func:`rk_epilogue`."""
    return _K.rk_epilogue(y0, ks, b, b_err, dt, atol, rtol)


def _ratio_fakes(y0):
    B = 1 if y0.dim() <= 1 else y0.shape[0]
    return y0.new_empty(()), y0.new_empty(()), y0.new_empty(B), y0.new_empty(B)


def _epilogue_backward(y0: Tensor, ks: List[Tensor], b: List[float], b_err: List[float], dt: Tensor, atol: Tensor,
                       rtol: Tensor, rms_b: Tensor, rms_s: Tensor, g1: Optional[Tensor], ge: Optional[Tensor],
                       grb: Optional[Tensor], grs: Optional[Tensor], need_dt: bool
                       ) -> Tuple[Tensor, List[Tensor], Tensor]:
    """``(g_y0, [g_k], g_dt)`` through ``y1``, ``err`` and the RMS ratios (absent gradients are None)."""
    gy0, gks, gdt = _K.rk_epilogue_backward(y0, ks, b, b_err, dt, atol, rtol, rms_b, rms_s, g1=g1, ge=ge, grb=grb,
                                            grs=grs, need_dt=need_dt)
    return gy0, gks, (gdt.reshape(dt.shape).to(dt.dtype) if need_dt else dt.new_empty(0))


def _epilogue_grads(args, extra, attrs, gouts, needs, backward):
    y0, ks, b, b_err, dt, atol, rtol = args
    rms_b, rms_s = extra
    g1, ge, grb, _gmb, grs, _gms = gouts
    need_dt = bool(needs[4])
    gy0, gks, gdt = backward(y0, ks, b, b_err, dt, atol, rtol, rms_b, rms_s, g1, ge, grb, grs, need_dt)
    return gy0 if needs[0] else None, masked_grads(gks, needs[1]), None, None, (gdt if need_dt else None), None, None


TRITON_RK_EPILOGUE = FusedOp(
    "triton_rk_epilogue", forward=_epilogue_forward,
    fake=lambda y0, ks, b, b_err, dt, atol, rtol: (torch.empty_like(y0), torch.empty_like(y0)) + _ratio_fakes(y0),
    backward=_epilogue_backward,
    backward_fake=lambda y0, ks, b, b_err, dt, atol, rtol, rms_b, rms_s, g1, ge, grb, grs, need_dt: (
        torch.empty_like(y0), [torch.empty_like(y0) for _ in ks], torch.empty_like(dt) if need_dt else dt.new_empty(0)),
    setup=lambda args, out: ([out[2], out[4]], None), grads=_epilogue_grads,
    reference=lambda y0, ks, b, b_err, dt, atol, rtol: _epilogue_spec(b, b_err, atol, rtol)(y0, dt, *ks),
    differentiable_outputs=(0, 1, 2, 4), non_differentiable=(3, 5))


def _ratio_forward(y_err: Tensor, y0: Tensor, y1: Tensor, atol: Tensor, rtol: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)`` of :func:`rk_error_ratio`."""
    return _K.rk_error_ratio(y_err, y0, y1, atol, rtol)


def _ratio_backward(y_err: Tensor, y0: Tensor, y1: Tensor, atol: Tensor, rtol: Tensor, rms_b: Tensor, rms_s: Tensor,
                    grb: Optional[Tensor], grs: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(g_y_err, g_y0, g_y1)`` through the RMS ratios."""
    return _K.rk_error_ratio_backward(y_err, y0, y1, atol, rtol, rms_b, rms_s, grb=grb, grs=grs)


def _ratio_grads(args, extra, attrs, gouts, needs, backward):
    y_err, y0, y1, atol, rtol = args
    rms_b, rms_s = extra
    ge, g0, g1 = backward(y_err, y0, y1, atol, rtol, rms_b, rms_s, gouts[0], gouts[2])
    return ge if needs[0] else None, g0 if needs[1] else None, g1 if needs[2] else None, None, None


TRITON_RK_ERROR_RATIO = FusedOp(
    "triton_rk_error_ratio", forward=_ratio_forward, fake=lambda y_err, y0, y1, atol, rtol: _ratio_fakes(y0),
    backward=_ratio_backward,
    backward_fake=lambda y_err, y0, y1, atol, rtol, rms_b, rms_s, grb, grs: (
        torch.empty_like(y0), torch.empty_like(y0), torch.empty_like(y0)),
    setup=lambda args, out: ([out[0], out[2]], None), grads=_ratio_grads,
    reference=lambda y_err, y0, y1, atol, rtol: _rms_ratios(y_err, y0, y1, atol, rtol),
    differentiable_outputs=(0, 2), non_differentiable=(1, 3))

# the custom ops themselves (opcheck, graphs)
triton_rk_stage_op = TRITON_RK_STAGE.op
triton_rk_epilogue_op = TRITON_RK_EPILOGUE.op
triton_rk_error_ratio_op = TRITON_RK_ERROR_RATIO.op


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
    return ("cuda", "cpu") if interpreter_active() else ("cuda",)


registry.register("rk.combine", "triton", _combine, devices=_devices())
registry.register("rk.error_ratio", "triton", _error_ratio, devices=_devices(), supports=_ratio_supports)
