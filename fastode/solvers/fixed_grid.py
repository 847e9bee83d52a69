"""Fixed-grid explicit Runge-Kutta loop (euler, midpoint, heun2, heun3, rk4 (3/8 rule), rk4_classic).

torchdiffeq semantics: the grid is ``t`` itself unless ``step_size`` (uniform grid with a shorter last step,
computed in ``t``'s dtype exactly as torchdiffeq) or ``grid_constructor(func, y0, t) -> grid`` is given; outputs
between grid points use ``interp="linear"`` (default) or ``"cubic"`` (Hermite; one extra NFE per output);
``perturb=True`` evaluates the first stage at ``nextafter(t0, +inf)`` and stages at ``c == 1`` at
``nextafter(t1, -inf)``. Stage times are computed in the grid's dtype and cast to the state's real dtype.

fastode addition: ``check_finite=True`` (default) records per step, without host synchronisation, whether
the state stayed finite and raises :class:`~fastode.errors.NonFiniteError` naming the first step whose result is
NaN/inf (torchdiffeq propagates NaNs silently). ``check_finite=False`` turns this off.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..compiling import check, host_constant, host_floats
from ..errors import InvalidOptionError, MaxStepsExceededError, NonFiniteError
from ..events import find_event
from ..interp import hermite_cubic, linear
from ..tableaus import ButcherTableau
from .base import (Perturb, Solver, _null_callback, all_finite, number_option, real_dtype, state_time_value,
                   time_tensor)
from ..launch_count import host_read
from ..ops.rk import StepSize, resolve_rk_ops, rk_step

__all__ = ["FixedGridSolver", "MAX_EVENT_ITERS", "step_size_grid"]

MAX_EVENT_ITERS = 20000


class _GridCtx(NamedTuple):
    t: torch.Tensor
    grid: torch.Tensor
    g_host: list
    t_host: list
    rnd: object
    need_grad: bool


def _grid_count(start_time, end_time, step_size) -> float:
    """Grid points of a step-size grid, computed in the times' dtype as torchdiffeq does."""
    return torch.ceil((end_time - start_time) / step_size + 1).item()


def _grid_from_step_size(step_size):
    def _grid_constructor(func, y0, t):
        start_time = t[0]
        end_time = t[-1]
        niters = host_constant(_grid_count, start_time, end_time, step_size)
        t_infer = torch.arange(0, niters, dtype=t.dtype, device=t.device) * step_size + start_time
        t_infer[-1] = t[-1]
        return t_infer
    return _grid_constructor


def step_size_grid(t: torch.Tensor, step_size: float) -> torch.Tensor:
    """The grid a fixed-grid solve with ``step_size`` integrates the 1-D times ``t`` on, in either direction.

    odeint integrates decreasing times as increasing ones negated, so the grid is built on ``-t`` and negated
    back; differentiable in ``t`` (engines that run the grid themselves use it to match this solver exactly).
    """
    build = _grid_from_step_size(step_size)
    vals = host_floats(t.detach().reshape(-1))
    if len(vals) > 1 and vals[-1] < vals[0]:
        return -build(None, None, -t)
    return build(None, None, t)


class FixedGridSolver(Solver):
    """Fixed-grid RK solver for any tableau."""

    adaptive = False
    tableau: ButcherTableau

    def __init__(self, func, y0, rtol=None, atol=None, step_size=None, grid_constructor=None, interp="linear",
                 perturb=False, check_finite=True, norm=None, **unused_kwargs):
        super().__init__(func, y0, rtol, atol, norm=norm, **unused_kwargs)
        cls = type(self)
        self.rdtype = real_dtype(y0)
        self.order = self.tableau.order
        if step_size is not None:
            step_size = number_option(cls.__name__, "step_size", step_size)
            if not 0 < step_size < math.inf:  # comparisons (not math.isfinite) trace under torch.compile
                raise InvalidOptionError(f"{cls.__name__}: step_size must be a positive finite number (its "
                                         f"magnitude; decreasing t is handled automatically), got {step_size!r}")
        self.step_size = step_size
        if interp not in ("linear", "cubic"):
            raise ValueError(f"Unknown interpolation method {interp}; {cls.__name__} supports interp='linear' "
                             f"(default) or 'cubic'")
        self.interp = interp
        self.perturb = bool(perturb)
        self.check_finite = check_finite
        self.ops = resolve_rk_ops(y0, self.norm)   # once per solve: the stage loop calls ops.combine directly
        if step_size is None:
            self.grid_constructor = grid_constructor if grid_constructor is not None else (lambda f, y0, t: t)
        else:
            if grid_constructor is not None:
                raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
            self.grid_constructor = _grid_from_step_size(step_size)

    @classmethod
    def valid_callbacks(cls):
        return {'callback_step'}

    def _describe(self, t):
        return float(self.func.describe_time(t))

    def _rounder(self, dtype):
        if dtype == torch.float64:
            return float
        if dtype == torch.float32:
            return lambda v: float(np.float32(v))
        return lambda v: float(torch.tensor(v, dtype=dtype))

    def _stage_times(self, t0, dt, t1, rnd, grad_times=None):
        """Times ``func`` sees for each stage (grid dtype arithmetic, cast to the state dtype, perturbed).

        ``grad_times``: ``(g0, gdt, g1)`` as tensors, when the times require grad; they only add their gradient
        (:func:`~fastode.solvers.base.time_tensor`), the values are the host arithmetic's either way."""
        out = []
        for i, c in enumerate(self.tableau.c):
            p = Perturb.NONE
            if self.perturb:
                if i == 0:
                    p = Perturb.NEXT
                elif c == 1.0:
                    p = Perturb.PREV
            v = t0 if c == 0 else (t1 if c == 1.0 else rnd(t0 + rnd(c * dt)))
            d = None
            if grad_times is not None:
                g0, gdt, g1 = grad_times
                d = g0 if c == 0 else (g1 if c == 1.0 else g0 + gdt * c)
            out.append(time_tensor(v, self.y0, p, d))
        return out

    @staticmethod
    def _fraction(rnd, tj, t0, t1) -> float:
        """``(tj - t0) / (t1 - t0)`` in the grid's dtype, each operation rounded (as torchdiffeq's tensors)."""
        return rnd(rnd(tj - t0) / rnd(t1 - t0))

    def _grid(self, t):
        grid = self.grid_constructor(self.func, self.y0, t)
        if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or len(grid) < 1:
            raise InvalidOptionError(f"{type(self).__name__}: the time grid must be a 1-D tensor, got "
                                     f"{type(grid).__name__}{'' if not isinstance(grid, torch.Tensor) else tuple(grid.shape)}")
        g_host, t_host = host_floats(grid), host_floats(t)
        if not (g_host[0] == t_host[0] and g_host[-1] == t_host[-1]):
            raise InvalidOptionError(
                f"{type(self).__name__}: the time grid must start at t[0] and end at t[-1] (grid[0]={g_host[0]}, "
                f"grid[-1]={g_host[-1]}, t[0]={t_host[0]}, t[-1]={t_host[-1]}); fix grid_constructor")
        if any(b < a for a, b in zip(g_host[:-1], g_host[1:])):
            raise InvalidOptionError(f"{type(self).__name__}: the time grid must be non-decreasing (in the "
                                     f"integration direction); fix grid_constructor")
        return grid, g_host, t_host

    def prepare(self, t, grid=None):
        """Grid and host copies for a solve over ``t`` (also used by the checkpointed backward)."""
        if grid is None:
            grid, g_host, t_host = self._grid(t)
        else:
            g_host, t_host = host_floats(grid), host_floats(t)
        need_grad = torch.is_grad_enabled() and (grid.requires_grad or t.requires_grad)
        return _GridCtx(t, grid, g_host, t_host, self._rounder(grid.dtype), need_grad)

    def integrate(self, t, grid=None):
        """Solve over ``t`` (``grid``: a precomputed time grid, e.g. built with autograd by the checkpoint mode)."""
        ctx = self.prepare(t, grid)
        stats = self.stats
        solution = [self.y0]
        n_steps = len(ctx.g_host) - 1
        # index of the first step whose result is not finite (n_steps: none), kept on the device so the loop
        # never synchronises; one running scalar rather than a flag per step keeps memory flat in the steps
        first_bad = torch.full((), n_steps, dtype=torch.int64, device=self.y0.device) if self.check_finite else None
        j = 1
        y0 = self.y0
        g_host, t_host = ctx.g_host, ctx.t_host
        n_t = len(t_host)
        for i in range(n_steps):
            t0, t1 = g_host[i], g_host[i + 1]
            if self.func.callback_step is not _null_callback:
                self.func.callback_step(ctx.grid[i], y0, ctx.grid[i + 1] - ctx.grid[i])
            step = self.grid_step(ctx, i, y0)
            if first_bad is not None:
                bad = all_finite(step.y1.detach()).logical_not_()
                first_bad = torch.where(bad & (first_bad == n_steps), i, first_bad)
            stats.num_steps += 1
            stats.num_accepted_steps += 1
            stats.step_ts.append(t0)
            stats.step_sizes.append(t1 - t0)
            self._notify_accepted(y0.detach() if self.observers else None)
            while j < n_t and t1 >= t_host[j]:
                solution.append(self.grid_output(ctx, j, i, y0, step))
                self._notify_output(j)
                j += 1
            y0 = step.y1
        if first_bad is not None:
            if torch.compiler.is_compiling():  # no host read in a compiled graph: an in-graph assertion, no step index
                check(first_bad == n_steps, lambda: self._first_bad_error(None, g_host))
            else:
                host_read("finite check")
                self._check_first_bad(int(first_bad), g_host)
        return torch.stack(solution)

    def step_times(self, ctx, i):
        """``(tc, dt)`` of grid step ``i``: the stage times ``func`` sees and the step size (a float, or when the times
        require grad a :class:`~fastode.ops.rk.StepSize`: the same float with the grid's gradient)."""
        t0, t1 = ctx.g_host[i], ctx.g_host[i + 1]
        dt = ctx.rnd(t1 - t0)
        dt_value = state_time_value(dt, self.rdtype) if ctx.grid.dtype != self.rdtype else dt
        if ctx.need_grad:
            g0, g1 = ctx.grid[i], ctx.grid[i + 1]
            gdt = g1 - g0
            return (self._stage_times(t0, dt, t1, ctx.rnd, (g0, gdt, g1)),
                    StepSize(dt_value, time_tensor(dt_value, self.y0, anchor=gdt)))
        return self._stage_times(t0, dt, t1, ctx.rnd), dt_value

    def grid_step(self, ctx, i, y0):
        """Step ``i`` of the grid from ``y0`` (shared by the solve and :meth:`replay`)."""
        tc, dt_arg = self.step_times(ctx, i)
        return rk_step(self.func, ctx.g_host[i], y0, None, dt_arg, self.tableau, tc=tc, combine=self.ops.combine)

    def replay(self, ctx, i, y0):
        """Recompute grid step ``i`` from its recorded start state ``y0`` (``ctx`` from :meth:`prepare` over the
        same times, built with autograd when time gradients are wanted): the :data:`~fastode.ops.rk.RKStep`."""
        return self.grid_step(ctx, i, y0)

    def output(self, ctx, j, i, y0, step):
        """Output ``j`` inside the replayed step ``i`` (the solve's interpolation)."""
        return self.grid_output(ctx, j, i, y0, step)

    def grid_output(self, ctx, j, i, y0, step):
        """Output ``j`` (inside grid step ``i``) by linear or cubic Hermite interpolation."""
        t, grid, need_grad, rnd = ctx.t, ctx.grid, ctx.need_grad, ctx.rnd
        tj, t0, t1 = ctx.t_host[j], ctx.g_host[i], ctx.g_host[i + 1]
        y1 = step.y1
        if self.interp == "linear" and (tj == t0 or tj == t1) and not need_grad:
            return y0 if tj == t0 else y1   # exactly y0 / y1, as torchdiffeq
        # the interpolants' scalars are 0-dim tensors, as torchdiffeq's (a Python float would take the polynomial's
        # powers in float64); with time gradients they carry them, with the same values
        h = time_tensor(self._fraction(rnd, tj, t0, t1), self.y0,
                        anchor=(t[j] - grid[i]) / (grid[i + 1] - grid[i]) if need_grad else None)
        if self.interp == "linear":
            if tj == t0 or tj == t1:
                # the value is exactly y0 / y1; the derivative w.r.t. the times is that of the linear interpolant
                # inside this step (torchdiffeq's branch would give the output time none)
                return (y0 if tj == t0 else y1) + (h - h.detach()) * (y1 - y0)
            return linear(y0, y1, h)
        # cubic Hermite: one more evaluation of func at the end of the step, per output (torchdiffeq)
        f1 = self.func(time_tensor(t1, self.y0, anchor=grid[i + 1] if need_grad else None), y1)
        dt = time_tensor(rnd(t1 - t0), self.y0, anchor=grid[i + 1] - grid[i] if need_grad else None)
        return hermite_cubic(y0, step.k[0], y1, f1, dt, h)

    def _check_first_bad(self, first, g_host):
        if first != len(g_host) - 1:
            raise self._first_bad_error(first, g_host)

    def _first_bad_error(self, first, g_host):
        if first is None:
            where = f"a step of the grid from t={self._describe(g_host[0])} to t={self._describe(g_host[-1])}"
        else:
            where = (f"the step from t={self._describe(g_host[first])} to t={self._describe(g_host[first + 1])} "
                     f"({type(self).__name__}, step {first} of the grid)")
        return NonFiniteError(
            f"the solution became NaN/inf in {where}. func may return NaN/inf there, or the step is too large for a "
            f"stable explicit method: reduce step_size, use an adaptive method (e.g. method='dopri5'), or regularise "
            f"the dynamics. Pass options={{'check_finite': False}} to skip this check.")

    def _event_step(self, t0, y0, dt, tc):
        """One step of the event search: ``(y1, f(t0, y0))``."""
        step = rk_step(self.func, t0, y0, None, dt, self.tableau, tc=tc, combine=self.ops.combine)
        return step.y1, step.k[0]

    def integrate_until_event(self, t0, event_fn):
        if self.step_size is None:
            raise InvalidOptionError("Event handling for fixed step solvers currently requires `step_size` to be "
                                     "provided in options.")
        t0 = t0.reshape(()).to(self.rdtype)
        y0 = self.y0
        dt = float(self.step_size)
        sign0 = torch.sign(event_fn(t0, y0))
        itr = 0
        while True:
            itr += 1
            t1 = t0 + dt
            tc = self._stage_times(float(t0.detach()), dt, float(t1.detach()), self._rounder(self.rdtype),
                                   (t0, torch.as_tensor(dt, dtype=self.rdtype, device=y0.device), t1))
            y1, f0 = self._event_step(t0, y0, dt, tc)
            self.stats.num_steps += 1
            self.stats.num_accepted_steps += 1
            sign1 = torch.sign(event_fn(t1, y1))
            if sign0 != sign1:
                if self.interp == "linear":
                    interp_fn = lambda t, t0=t0, t1=t1, y0=y0, y1=y1: linear(y0, y1, (t - t0) / (t1 - t0))
                else:
                    f1 = self.func(t1, y1)
                    interp_fn = lambda t, t0=t0, t1=t1, y0=y0, y1=y1, f0=f0, f1=f1: hermite_cubic(
                        y0, f0, y1, f1, t1 - t0, (t - t0) / (t1 - t0))
                atol = self.atol if not isinstance(self.atol, torch.Tensor) else self.atol.min()
                event_time, y1 = find_event(interp_fn, sign0, t0, t1, event_fn, float(atol))
                break
            t0, y0 = t1, y1
            if itr >= MAX_EVENT_ITERS:
                raise MaxStepsExceededError(
                    f"Reached maximum number of iterations {MAX_EVENT_ITERS}: the event did not occur within "
                    f"{MAX_EVENT_ITERS} steps of size {dt} (the solver reached t={self._describe(float(t1))}). "
                    f"Check that event_fn changes sign at the event, or use a larger step_size.")
        return event_time, torch.stack([self.y0, y1], dim=0)
