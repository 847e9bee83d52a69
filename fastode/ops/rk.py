"""The executable specification of one explicit Runge-Kutta step (DESIGN.md, "Contract: the RK spec").

Everything a solver needs from a tableau, as plain differentiable PyTorch functions of tensors, Python floats or
0-dim tensors. Every other implementation (the Triton kernels, the C++ step and grid solve, the CNF stepper's
PyTorch path, the local error regulariser) is tested against these functions; the solver loops call them.

* :func:`stage_times` -- ``t0 + c_i * dt``;
* :func:`combine_stages` -- ``y0 + dt * sum_j coeffs[j] * k[j]``: stage inputs, the solution, the embedded
  error (``y0=None``) and dense output are all this one operation; :func:`combine_stages_exact` is the same
  with torchdiffeq's arithmetic (stack + ``torch.sum``), which the adaptive loop uses so that float32
  accept/reject decisions match torchdiffeq bit for bit;
* :func:`rk_step` -- the stages, solution, embedded error and FSAL stage of one step;
* :func:`error_tolerance` / :func:`error_ratio` -- ``norm(y_err / (atol + rtol * max(|y0|, |y1|)))``, the
  controller's input, under any norm of :mod:`fastode.norms` (or a user's);
* :func:`initial_step` -- Hairer, Norsett & Wanner's starting step (Solving ODEs I, II.4).

The step-size controller (accept / reject and the next step from the error ratio) is
:mod:`fastode.solvers.controller`.

The ops ``rk.combine`` and ``rk.error_ratio`` are registered here with these functions as their reference
backend (``"torch"``); :mod:`fastode.triton._rk` registers the fused CUDA kernels. A solver resolves them
once per solve with :func:`resolve_rk_ops`.
"""
from __future__ import annotations

import functools
import os
from collections import namedtuple
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch

from ..tableaus import ButcherTableau
from . import registry

__all__ = ["RKStep", "rk_step", "stage_times", "StepSize", "combine_stages", "combine_stages_exact",
           "error_tolerance", "error_ratio", "sample_error_ratios", "safe_sqrt", "initial_step", "RKOps",
           "resolve_rk_ops"]

Scalar = Union[float, torch.Tensor]

RKStep = namedtuple("RKStep", "y1 y_err k f1")
RKStep.__doc__ = """Result of :func:`rk_step`.

y1: the propagated solution at t0 + dt. y_err: dt * sum_i b_err_i k_i (None for fixed-step tableaus).
k: list of the s stage derivatives (k[0] = f0). f1: k[-1] for FSAL tableaus (= f(t1, y1)), else None.
"""


def stage_times(t0: Scalar, dt: Scalar, tableau: ButcherTableau) -> list:
    """``t0 + c_i * dt`` for every stage: floats for float arguments, tensors (differentiable) otherwise."""
    return [t0 + c * dt for c in tableau.c]


class StepSize(NamedTuple):
    """A step size whose value and gradient come from two places: ``value``, the Python float every stage
    combination computes with, and ``grad``, a 0-dim tensor holding the same value that carries its gradient (a
    fixed grid over times that require grad). The values of a solve then never depend on which inputs require
    grad: :func:`combine_stages` takes the float path and adds ``(grad - grad.detach()) * sum_j c_j k_j``, which
    is zero in value and gives the exact derivative w.r.t. ``grad``."""

    value: float
    grad: torch.Tensor


def combine_stages(y0: Optional[torch.Tensor], dt: Union[Scalar, StepSize], coeffs: Sequence,
                   k: Sequence[torch.Tensor]) -> torch.Tensor:
    """``y0 + dt * sum_j coeffs[j] * k[j]`` over ``j < len(coeffs)`` (zero coefficients skipped).

    ``dt`` is a Python float, a 0-dim tensor (differentiable step size) or a :class:`StepSize` (the float's value
    with a tensor's gradient); ``coeffs`` are Python floats or 0-dim tensors (e.g. dense-output weights at a
    differentiable ``theta``). ``y0=None`` returns just ``dt * sum_j coeffs[j] * k[j]`` (e.g. an error estimate).
    The increment is summed first and added to ``y0`` once: adding each small term to a large ``y0`` rounds once
    per stage, which over many float32 steps costs about a digit (torchdiffeq also forms the increment first).
    """
    grad = None
    if isinstance(dt, StepSize):
        dt, grad = dt.value, (dt.grad if dt.grad.requires_grad and torch.is_grad_enabled() else None)
    acc = None
    python_dt = isinstance(dt, (float, int))
    for j, a in enumerate(coeffs):
        if isinstance(a, (float, int)):
            if a == 0:
                continue
            if python_dt:
                acc = k[j] * (a * dt) if acc is None else torch.add(acc, k[j], alpha=a * dt)
                continue
        term = k[j] * (a * dt)
        acc = term if acc is None else acc + term
    if acc is None:
        return torch.zeros_like(k[0]) if y0 is None else y0
    if grad is not None:  # zero in value: the float path's bits, with d/d(grad) = sum_j c_j k_j
        acc = acc + (grad - grad.detach()) * combine_stages(None, 1.0, coeffs, k)
    return acc if y0 is None else y0 + acc


@functools.lru_cache(maxsize=512)
def _coef_tensor(coeffs: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(coeffs, dtype=torch.float64).to(dtype=dtype, device=device)


def combine_stages_exact(y0: Optional[torch.Tensor], dt: Scalar, coeffs: Sequence, k: Sequence[torch.Tensor]
                         ) -> torch.Tensor:
    """:func:`combine_stages` with torchdiffeq's exact arithmetic (used by the adaptive loop).

    Computed as ``y0 + torch.sum(stack(k, -1) * (coeffs * dt), dim=-1)`` with the coefficients and ``dt`` rounded
    to the state's real dtype, zero coefficients included: the same operations as torchdiffeq, so adaptive solves
    reproduce its accept/reject decisions bit for bit (float32 error estimates are sensitive to the reduction
    order). The stacked copy is a temporary: autograd does not keep it.
    """
    n = len(coeffs)
    if n == 0:
        return torch.zeros_like(k[0]) if y0 is None else y0
    ref = k[0]
    rdtype = ref.real.dtype if ref.is_complex() else ref.dtype
    if all(isinstance(a, (float, int)) for a in coeffs):
        if torch.compiler.is_compiling():   # (a traced constant; dynamo does not trace through the cache)
            w = torch.tensor([float(a) for a in coeffs], dtype=torch.float64).to(dtype=rdtype, device=ref.device)
        else:
            w = _coef_tensor(tuple(float(a) for a in coeffs), rdtype, ref.device)
    else:
        w = torch.stack([torch.as_tensor(a, dtype=rdtype, device=ref.device).reshape(()) for a in coeffs])
    if isinstance(dt, torch.Tensor):
        w = w * dt.to(rdtype)
    else:
        w = w * torch.full((), float(dt), dtype=rdtype, device=ref.device)
    if n == 1:
        acc = k[0] * w[0]
    else:
        acc = torch.sum(torch.stack(list(k[:n]), dim=-1) * w, dim=-1)
    return acc if y0 is None else y0 + acc


def rk_step(func: Callable, t0: Scalar, y0: torch.Tensor, f0: Optional[torch.Tensor], dt: Scalar,
            tableau: ButcherTableau, *, tc: Optional[Sequence] = None,
            combine: Callable = combine_stages) -> RKStep:
    """Take one explicit RK step of size ``dt`` from ``(t0, y0)``.

    Args:
        func: ``func(t, y) -> dy/dt``.
        t0: start time (float or 0-dim tensor); only used when ``tc`` is None.
        y0: state at ``t0``.
        f0: ``func(t0, y0)`` if already known (FSAL reuse), else None (then evaluated at ``tc[0]``).
        dt: step size (float or 0-dim tensor; a tensor makes the step differentiable w.r.t. it).
        tableau: the method.
        tc: optional stage times (exactly what ``func`` is called with, ``tc[0]`` unused when ``f0`` is given);
            the solver loops pass these to apply torchdiffeq's time conventions (``nextafter`` at c=1, dtype).
        combine: the stage combination (:func:`combine_stages`, :func:`combine_stages_exact` or a fused
            backend of the ``rk.combine`` op with the same signature).
    Returns:
        :data:`RKStep` ``(y1, y_err, k, f1)``.
    """
    if tc is None:
        if isinstance(t0, torch.Tensor) or isinstance(dt, torch.Tensor):
            tc = stage_times(t0, dt, tableau)
        else:
            rdtype = y0.real.dtype if y0.is_complex() else y0.dtype
            tc = [torch.full((), v, dtype=rdtype, device=y0.device) for v in stage_times(float(t0), float(dt), tableau)]
    k = [func(tc[0], y0) if f0 is None else f0]
    yi = y0
    for i in range(1, tableau.stages):
        yi = combine(y0, dt, tableau.a[i], k)
        k.append(func(tc[i], yi))
    if tableau.fsal:
        y1 = yi  # the last stage is evaluated at y1 (its row of a equals b)
        f1 = k[-1]
    else:
        y1 = combine(y0, dt, tableau.b, k)
        f1 = None
    y_err = None if tableau.b_err is None else combine(None, dt, tableau.b_err, k)
    return RKStep(y1, y_err, k, f1)


def error_tolerance(y0: torch.Tensor, y1: torch.Tensor, rtol, atol) -> torch.Tensor:
    """``atol + rtol * max(|y0|, |y1|)``: the per-element scale of the embedded error."""
    return atol + rtol * torch.max(y0.abs(), y1.abs())


def error_ratio(y_err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol, atol,
                norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``norm(y_err / (atol + rtol * max(|y0|, |y1|)))`` as a non-negative 0-dim tensor (torchdiffeq's
    ``_compute_error_ratio``); ``<= 1`` accepts a step. NaN stays NaN (never read as a small error)."""
    r = norm(y_err / error_tolerance(y0, y1, rtol, atol))
    return r.abs() if isinstance(r, torch.Tensor) else torch.as_tensor(abs(r), device=y0.device)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt`` with value and gradient 0 at 0 (as the fused kernels compute it) instead of an infinite gradient.
    Tested as ``x == 0`` (not ``x > 0``) so that NaN stays NaN: a dropped NaN would accept a bad step."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


def sample_error_ratios(y_err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol, atol,
                        norm: str = "rms") -> torch.Tensor:
    """The error ratio of each row of the leading (batch) dimension: ``(B,)``; ``norm`` ``"rms"`` or ``"max"``.

    What per-sample (per-tile) step control and the fused epilogues' per-sample outputs compute. A 0-/1-dim
    state is one sample. The RMS is differentiable (gradient 0 at a zero error); the max is not."""
    r = y_err / error_tolerance(y0, y1, rtol, atol)
    rows = r.reshape(1 if r.dim() <= 1 else r.shape[0], -1)
    if norm == "rms":
        return safe_sqrt(rows.pow(2).mean(1))
    if norm == "max":
        return rows.detach().abs().amax(1)
    raise ValueError(f"norm must be 'rms' or 'max', got {norm!r}")


def initial_step(call: Callable, t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor, order: int, rtol, atol,
                 norm: Callable, *, step_dtype: Optional[torch.dtype] = None):
    """Hairer, Norsett & Wanner's starting step (II.4): ``(dt, f1)`` as 0-dim tensors, no gradient.

    ``d0 = |y0/s|``, ``d1 = |f0/s|`` (``s = atol + rtol |y0|``, norms by ``norm``); ``h0 = 0.01 d0/d1`` (``1e-6``
    when either is below ``1e-5``); one explicit Euler step of ``h0`` gives ``f1 = call(t0 + h0, y0 + h0 f0)`` and
    ``d2 = |(f1 - f0)/s| / h0``; ``h1 = (0.01 / max(d1, d2)) ** (1 / (order + 1))`` (``max(1e-6, 1e-3 h0)`` when
    both are below ``1e-15``); ``dt = min(100 h0, h1)``.

    ``order`` is the ``p`` of that formula. Callers choose it, and two conventions are in use: the adaptive
    solver passes ``tableau.order - 1`` as torchdiffeq does (so dopri5's exponent is 1/5 and its steps match
    torchdiffeq's), the local error regulariser passes ``tableau.order`` as Pal et al.'s reference code
    (OrdinaryDiffEq's ``ode_determine_initdt``) does. ``call(t, y)`` evaluates the right-hand side (``t`` is
    ``t0 + h0`` in ``t0``'s dtype; the caller converts it as its ``func`` expects). ``step_dtype``: the dtype
    ``h0`` is rounded to before the trial step (default: ``y0``'s real dtype).
    """
    with torch.no_grad():
        y0, f0 = y0.detach(), f0.detach()
        device = y0.device
        scale = atol + torch.abs(y0) * rtol
        nrm = lambda x: torch.as_tensor(norm(x), device=device)  # noqa: E731 (norms may return floats)
        d0 = nrm(y0 / scale).abs()
        d1 = nrm(f0 / scale).abs()
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.tensor(1e-6, dtype=d0.dtype, device=device), 0.01 * d0 / d1).abs()
        if not y0.dtype.is_complex:
            h0 = h0.to(step_dtype or y0.dtype)
        y1 = y0 + h0 * f0
        f1 = call(t0 + h0, y1).detach()
        d2 = torch.abs(nrm((f1 - f0) / scale) / h0)
        tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
        h1 = torch.where(tiny, torch.maximum(torch.tensor(1e-6, dtype=h0.dtype, device=device), h0 * 1e-3),
                         (0.01 / torch.maximum(d1, d2)) ** (1. / float(order + 1)))
        dt = torch.minimum(100 * h0, h1.abs().to(h0.dtype))
    return dt, f1


# ------------------------------------------------------------------------------------------------ ops
def _fused_rk_enabled() -> bool:
    """``FASTODE_FUSED_RK=0`` turns the fused RK backends off (read once per solve), e.g. to reproduce
    torchdiffeq's CUDA rounding bit for bit (the kernels sum the stages in their own order)."""
    return os.environ.get("FASTODE_FUSED_RK", "1") not in ("0", "")


registry.register("rk.combine", registry.REFERENCE, combine_stages, devices=("*",),
                  auto={"cuda": ("triton", registry.REFERENCE), "cpu": (registry.REFERENCE,)})
registry.register("rk.error_ratio", registry.REFERENCE, error_ratio, devices=("*",),
                  auto={"cuda": ("triton", registry.REFERENCE), "cpu": (registry.REFERENCE,)})
registry.register_lazy("triton", "fastode.triton._rk")


class RKOps(NamedTuple):
    """The RK ops of one solve, resolved once (:func:`resolve_rk_ops`), called directly in the stage loop."""

    combine: Callable          # rk.combine: y0 + dt * sum_j c_j k_j
    combine_exact: Callable    # torchdiffeq's arithmetic (adaptive loop); the reference only
    error_ratio: Callable      # rk.error_ratio
    backend: str               # "torch" or the fused backend that serves rk.combine
    reason: Optional[str]      # why a faster backend was passed over (None if none was)


def resolve_rk_ops(like: torch.Tensor, norm: Callable, backend: str = "auto") -> RKOps:
    """The RK ops for states like ``like`` under ``norm``: fused kernels where they apply (CUDA float32/64 with
    Triton, ``FASTODE_FUSED_RK`` not 0; the fused ratio for the RMS/max norms), the reference otherwise."""
    dev = like.device.type
    if backend == "auto" and not (_fused_rk_enabled() and like.dtype in (torch.float32, torch.float64)):
        backend = registry.REFERENCE
    comb = registry.resolve("rk.combine", backend, device_type=dev)
    ratio = registry.resolve("rk.error_ratio", backend, device_type=dev, call=(norm,))
    return RKOps(comb.impl, combine_stages_exact, ratio.impl, comb.backend, comb.reason or ratio.reason)
