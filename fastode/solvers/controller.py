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

:class:`ClipController` wraps it as diffrax wraps its controllers: where an attempt ends, given ``step_t`` /
``jump_t`` points and a landing target.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch

from ..ops.rk import initial_step

__all__ = ["IntegralController", "ClipController", "Clip"]

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
        does not reject it (a bool, or with tensors a 0-dim bool tensor: the compiled loop's case)."""
        if not (isinstance(dt, torch.Tensor) or isinstance(ratio, torch.Tensor)):
            return self.adapt_host(dt, ratio, landed=landed)
        r = torch.as_tensor(ratio)
        dt = torch.as_tensor(dt, dtype=r.dtype if r.is_floating_point() else None, device=r.device)
        accept = r <= 1
        if isinstance(landed, torch.Tensor):
            accept = accept & ((dt <= self.max_step) | landed)
        elif not landed:
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


class Clip(NamedTuple):
    """An attempt's end after clipping (:meth:`ClipController.propose`)."""

    t1: float                 # where the attempt ends
    dt: float                 # its size (rounded as the clock)
    dt_unclipped: float       # the size before landing on a target (a landed, accepted step grows from this)
    why: Optional[tuple]      # None | ("target", output index) | ("const",): why the step was shortened
    landed: bool              # shortened to land on the output time ``target``
    on_step_t: bool           # ends on the next step_t point
    on_jump_t: bool           # ends on the next jump_t point (f is discontinuous there)


class ClipController:
    """Where an attempt of the integral controller's size ends: torchdiffeq's ``step_t`` / ``jump_t`` clipping and
    fastode's landing on output times (``land_on``), as diffrax wraps its controllers with a clipping one. Host
    floats; ``rnd`` rounds a time as the solver's clock does. :meth:`reset` at the start of a solve,
    :meth:`propose` for each attempt, :meth:`advance` after an accepted one."""

    def __init__(self, step_t, jump_t, max_step: float, rnd: Callable[[float], float]):
        self.step_t, self.jump_t, self.max_step, self.rnd = step_t, jump_t, max_step, rnd
        self._step_ts, self._jump_ts, self._next_step, self._next_jump = [], [], 0, 0

    def reset(self, t0: float) -> None:
        """The points still ahead of ``t0``, sorted (each list's pointer at the first one after ``t0``)."""
        def ahead(vals):
            return [] if vals is None else sorted(self.rnd(v) for v in vals if v >= t0)

        self._step_ts, self._jump_ts = ahead(self.step_t), ahead(self.jump_t)
        if set(self._step_ts) & set(self._jump_ts):
            raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")
        self._next_step = min(bisect.bisect(self._step_ts, t0), len(self._step_ts) - 1)
        self._next_jump = min(bisect.bisect(self._jump_ts, t0), len(self._jump_ts) - 1)

    def propose(self, t0: float, t1: float, dt: float, target: Optional[Tuple[int, float]] = None) -> Clip:
        """The attempt from ``t0`` of size ``dt`` (ending at ``t1``), shortened to the next ``step_t`` point inside
        it, else to the next ``jump_t`` point inside ``[t0, t0 + dt)`` (torchdiffeq's rules), then, for a
        ``target = (output index, time)``, stretched or shortened onto that time when it is passed or within 1% of
        the step ahead (and at most ``max_step`` from ``t0``)."""
        clipped = on_step_t = on_jump_t = landed = False
        if self._step_ts:
            nst = self._step_ts[self._next_step]
            on_step_t = t0 < nst < t1
            if on_step_t:
                t1, dt, clipped = nst, self.rnd(nst - t0), True
        if self._jump_ts:
            njt = self._jump_ts[self._next_jump]
            on_jump_t = t0 < njt < t0 + dt
            if on_jump_t:
                on_step_t = False
                t1, dt, clipped = njt, self.rnd(njt - t0), True
        dt_unclipped = dt
        if target is not None:
            tt = target[1]
            if t1 >= tt or (tt - t1 <= 0.01 * dt and tt - t0 <= self.max_step):
                t1, dt = tt, self.rnd(tt - t0)
                landed = clipped = True
        why = None if not clipped else (("target", target[0]) if landed else ("const",))
        return Clip(t1, dt, dt_unclipped, why, landed, on_step_t, on_jump_t)

    def advance(self, clip: Clip) -> None:
        """After an accepted attempt ``clip``: move past the ``step_t`` / ``jump_t`` point it ended on."""
        if clip.on_step_t and self._next_step != len(self._step_ts) - 1:
            self._next_step += 1
        if clip.on_jump_t and self._next_jump != len(self._jump_ts) - 1:
            self._next_jump += 1
