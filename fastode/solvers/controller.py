"""Step-size control as pure functions: torchdiffeq's integral controller, on Python floats or 0-dim tensors.

:class:`IntegralController` holds the options (``safety``, ``ifactor``, ``dfactor``, ``min_step``, ``max_step``)
and the method's order; its two functions are the whole contract a loop needs:

* :meth:`~IntegralController.init` -- the first step (Hairer, Norsett & Wanner via
  :func:`fastode.ops.rk.initial_step`, in torchdiffeq's convention: exponent ``1/order``);
* :meth:`~IntegralController.adapt` -- ``(dt, ratio) -> (accept, dt_next)``:
  ``accept = ratio <= 1`` (forced when ``dt <= min_step``; refused when ``dt > max_step``), and
  ``dt_next = clamp(dt * min(ifactor, max(safety / ratio**(1/order), 1 if ratio < 1 else dfactor)))`` into
  ``[min_step, max_step]``, with ``ifactor`` for a zero ratio and a shrink for a NaN/inf one.

Given Python floats (the host loop of :class:`~fastode.solvers.rk_adaptive.RKAdaptiveSolver`), ``adapt`` returns
floats computed exactly as torchdiffeq does, so solves take its steps. Given 0-dim tensors it returns 0-dim
tensors built with ``torch.where`` only (no host read, no Python branch on values): the form a device-resident
loop (a CUDA graph, a fused solve) needs. ``tests/test_rk_spec.py`` checks that both forms agree, NaN and inf
included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import torch

from ..ops.rk import initial_step

__all__ = ["IntegralController"]

Scalar = Union[float, torch.Tensor]


@dataclass(frozen=True)
class IntegralController:
    """torchdiffeq's step-size controller (see the module docstring)."""

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = math.inf

    def init(self, call: Callable, t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor, rtol, atol,
             norm: Callable, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """First step ``(dt, f1)`` as 0-dim tensors (``f1``: the trial evaluation, for error messages)."""
        return initial_step(call, t0, y0, f0, self.order - 1, rtol, atol, norm, **kwargs)

    def factor(self, ratio: Scalar) -> Scalar:
        """The step-size factor for an error ratio (before the ``min_step``/``max_step`` clamp)."""
        if isinstance(ratio, torch.Tensor):
            return self._factor_tensor(ratio)
        return self._factor_host(ratio)

    def _factor_host(self, r: float) -> float:
        if r == 0:
            return self.ifactor
        if not math.isfinite(r):
            return min(self.dfactor, 1.0) if r != r else min(self.ifactor, max(0.0, self.dfactor))
        dfactor = 1.0 if r < 1 else self.dfactor
        return min(self.ifactor, max(self.safety / r ** (1. / self.order), dfactor))

    def _factor_tensor(self, r: torch.Tensor) -> torch.Tensor:
        one = torch.ones_like(r)
        finite = torch.isfinite(r)
        safe = torch.where(finite & (r > 0), r, one)
        dfactor = torch.where(r < 1, one, one * self.dfactor)
        f = torch.clamp(torch.maximum(self.safety / safe ** (1. / self.order), dfactor), max=self.ifactor)
        f = torch.where(r == 0, one * self.ifactor, f)
        f = torch.where(torch.isinf(r), one * min(self.ifactor, max(0.0, self.dfactor)), f)
        return torch.where(torch.isnan(r), one * min(self.dfactor, 1.0), f)

    def clamp(self, dt: Scalar) -> Scalar:
        """``dt`` limited to ``[min_step, max_step]``."""
        if isinstance(dt, torch.Tensor):
            return torch.clamp(dt, min=self.min_step, max=self.max_step)
        return min(max(dt, self.min_step), self.max_step)

    def adapt(self, dt: Scalar, ratio: Scalar, *, landed: bool = False) -> Tuple[Scalar, Scalar]:
        """``(accept, dt_next)`` after a step of size ``dt`` with error ratio ``ratio``.

        ``landed``: the step was shortened to land on a time point, so ``dt > max_step`` by an ulp of rounding
        does not reject it (the host loop's case; a device loop passes ``False``)."""
        if not (isinstance(dt, torch.Tensor) or isinstance(ratio, torch.Tensor)):
            return self.adapt_host(dt, ratio, landed=landed)
        r = torch.as_tensor(ratio)
        dt = torch.as_tensor(dt, dtype=r.dtype if r.is_floating_point() else None, device=r.device)
        accept = r <= 1
        if not landed:
            accept = accept & (dt <= self.max_step)
        accept = accept | (dt <= self.min_step)
        return accept, self.clamp(dt * self.factor(r))

    def adapt_host(self, dt: float, ratio: float, *, landed: bool = False) -> Tuple[bool, float]:
        """:meth:`adapt` for Python floats (the host loop calls it every step, so it skips the type checks)."""
        accept = ratio <= 1
        if dt > self.max_step and not landed:
            accept = False
        if dt <= self.min_step:
            accept = True
        return accept, min(max(dt * self._factor_host(ratio), self.min_step), self.max_step)
