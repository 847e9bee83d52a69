"""One explicit Runge-Kutta step from a tableau (DESIGN.md, "Contract: one RK step").

``rk_step`` is used by the adaptive loop, the fixed-grid loop, the checkpointed backward pass and the local
error regulariser in ``fastode.flows``. It is plain, differentiable PyTorch; the two hot pieces are small,
separately named functions so that fused kernels can replace them:

* :func:`combine_stages` -- ``y0 + dt * sum_j coeffs[j] * k[j]`` (stage inputs, the solution, the error
  estimate (with ``y0=None``) and dense output are all this one operation); :func:`combine_stages_exact` is the
  same operation with torchdiffeq's exact arithmetic (stack + ``torch.sum``), which the adaptive loop uses so
  that float32 accept/reject decisions match torchdiffeq bit for bit;
* :func:`error_ratio` -- ``norm(y_err / (atol + rtol * max(|y0|, |y1|)))`` (the step-size controller's input).
"""
from __future__ import annotations

import functools
from collections import namedtuple
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..nn import fused_rk as _fused  # CUDA-only Triton dispatch; returns None when not applicable
from ..tableaus import ButcherTableau
from .base import time_tensor

__all__ = ["RKStep", "rk_step", "combine_stages", "combine_stages_exact", "error_ratio", "stage_times"]

RKStep = namedtuple("RKStep", "y1 y_err k f1")
RKStep.__doc__ = """Result of :func:`rk_step`.

y1: the propagated solution at t0 + dt. y_err: dt * sum_i b_err_i k_i (None for fixed-step tableaus).
k: list of the s stage derivatives (k[0] = f0). f1: k[-1] for FSAL tableaus (= f(t1, y1)), else None.
"""

Scalar = Union[float, torch.Tensor]


def combine_stages(y0: Optional[torch.Tensor], dt: Scalar, coeffs: Sequence, k: Sequence[torch.Tensor]
                   ) -> torch.Tensor:
    """``y0 + dt * sum_j coeffs[j] * k[j]`` over ``j < len(coeffs)`` (zero coefficients skipped).

    ``dt`` is a Python float or a 0-dim tensor (differentiable step size); ``coeffs`` are Python floats or 0-dim
    tensors (e.g. dense-output weights at a differentiable ``theta``). ``y0=None`` returns just
    ``dt * sum_j coeffs[j] * k[j]`` (e.g. an error estimate). One fused multiply-add per non-zero coefficient,
    then one add of ``y0``.
    """
    fused = _fused.combine_stages(y0, dt, coeffs, k)
    if fused is not None:
        return fused
    # The increment is summed first and added to y0 once: adding each small term to a large y0 rounds once per
    # stage, which over many float32 steps costs about a digit (torchdiffeq also forms the increment first).
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


def error_ratio(y_err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol, atol,
                norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``norm(y_err / (atol + rtol * max(|y0|, |y1|)))`` as a non-negative 0-dim tensor (torchdiffeq's
    ``_compute_error_ratio``)."""
    fused = _fused.error_ratio(y_err, y0, y1, rtol, atol, norm)
    if fused is not None:
        return fused
    error_tol = atol + rtol * torch.max(y0.abs(), y1.abs())
    r = norm(y_err / error_tol)
    return r.abs() if isinstance(r, torch.Tensor) else torch.as_tensor(abs(r), device=y0.device)


def stage_times(t0: float, dt: float, like: torch.Tensor, tableau: ButcherTableau) -> List[torch.Tensor]:
    """Unperturbed stage times ``t0 + c_i * dt`` as the 0-dim tensors ``func`` receives."""
    return [time_tensor(t0 + c * dt, like) for c in tableau.c]


def rk_step(func: Callable, t0: Scalar, y0: torch.Tensor, f0: Optional[torch.Tensor], dt: Scalar,
            tableau: ButcherTableau, *, tc: Optional[Sequence[torch.Tensor]] = None,
            combine: Callable = combine_stages) -> RKStep:
    """Take one explicit RK step of size ``dt`` from ``(t0, y0)``.

    Args:
        func: ``func(t, y) -> dy/dt``.
        t0: start time (float or 0-dim tensor); only used when ``tc`` is None.
        y0: state at ``t0``.
        f0: ``func(t0, y0)`` if already known (FSAL reuse), else None (then evaluated at ``tc[0]``).
        dt: step size (float or 0-dim tensor; a tensor makes the step differentiable w.r.t. it).
        tableau: the method.
        tc: optional stage times (one 0-dim tensor per stage, exactly what ``func`` is called with); the
            solver loops pass these to apply torchdiffeq's time conventions (``nextafter`` at c=1, time dtype).
    Returns:
        :data:`RKStep` ``(y1, y_err, k, f1)``.
    """
    if tc is None:
        if isinstance(t0, torch.Tensor) or isinstance(dt, torch.Tensor):
            tc = [(t0 + c * dt) for c in tableau.c]
        else:
            tc = stage_times(float(t0), float(dt), y0, tableau)
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
