"""The fixed-grid RK solve as one pure tensor loop (the fixed-grid half of :mod:`fastode.compiled.loop`).

:class:`GridLoop` restates :class:`~fastode.solvers.fixed_grid.FixedGridSolver`'s step over a grid the solver
built on the host (``step_size``, ``grid_constructor`` or ``t`` itself: its number of steps is part of the
compiled program, its values an input): the stage times in the grid's dtype (``perturb`` included), the step by
:func:`fastode.ops.rk.rk_step`, outputs by the same linear or cubic Hermite interpolants (the cubic one evaluates
``func`` at the end of a step once per step that holds outputs, where the eager loop does once per output), and
``check_finite`` as the index of the first non-finite step, read once at the end.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ..interp import hermite_cubic, linear
from ..ops.rk import rk_step
from .loop import state_time, unaliased

__all__ = ["GridLoop", "GridState"]

_F64 = torch.float64


class GridState(NamedTuple):
    i: torch.Tensor           # steps taken
    y: torch.Tensor
    ys: torch.Tensor          # (len(t_out), *y.shape)
    first_bad: torch.Tensor   # index of the first step whose result is NaN/inf (n_steps: none)
    n_end_evals: torch.Tensor  # cubic interpolation's evaluations at step ends
    tape_y: torch.Tensor      # (n_steps, *y.shape) every step's start state when recording, else one scratch row


class GridLoop:
    """The grid step of a :class:`~fastode.solvers.fixed_grid.FixedGridSolver` as tensor functions."""

    fsal = False

    def __init__(self, solver, base: Callable, grid_dtype: torch.dtype, n_steps: int, *, record_states: bool = False):
        self.s, self.base, self.tab = solver, base, solver.tableau
        self.rdtype, self.gdtype, self.n_steps = solver.rdtype, grid_dtype, int(n_steps)
        self.record_states = bool(record_states)

    def rnd(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.gdtype == _F64 else v.to(self.gdtype).to(_F64)

    def step(self, t0, t1, y0, *, func=None):
        """The grid step from ``(t0, y0)`` to ``t1`` (``FixedGridSolver.step_times`` + ``grid_step``)."""
        dt = self.rnd(t1 - t0)
        tc = []
        for i, c in enumerate(self.tab.c):
            p = 0
            if self.s.perturb:
                p = 1 if i == 0 else (-1 if c == 1.0 else 0)
            v = t0 if c == 0 else (t1 if c == 1.0 else self.rnd(t0 + self.rnd(c * dt)))
            tc.append(state_time(v, self.rdtype, p))
        dt_arg = dt.to(self.rdtype)
        return rk_step(func or self.base, None, y0, None, dt_arg, self.tab, tc=tc), dt_arg

    def fraction(self, t_out, t0, t1) -> torch.Tensor:
        """Where each output time lies in the step, ``(t - t0) / (t1 - t0)`` rounded as the grid's dtype."""
        return self.rnd(self.rnd(t_out - t0) / self.rnd(t1 - t0)).to(self.rdtype)

    def outputs(self, t0, t1, y0, step, t_out, covered, x, func=None):
        """Outputs at ``t_out`` (fractions ``x`` of the step) inside the step (only ``covered`` ones are used)."""
        h = x.reshape((-1,) + (1,) * y0.dim())
        at_end = (t_out == t1).reshape(h.shape)
        if self.s.interp == "linear":
            return torch.where(at_end, step.y1[None], linear(y0, step.y1, h))
        if func is None:   # the forward loop: evaluate the end only in a step that holds outputs
            f1 = torch.cond(covered.any(), lambda y1, tt: self.base(tt, y1), lambda y1, tt: torch.zeros_like(y1),
                            (step.y1, t1.to(self.rdtype)))
        else:              # the adjoint's replay (a cond does not trace under torch.func.vjp): always
            f1 = func(t1.to(self.rdtype), step.y1)
        return hermite_cubic(y0, step.k[0], step.y1, f1, self.rnd(t1 - t0).to(self.rdtype), h)

    def solve(self, y0: torch.Tensor, t_out: torch.Tensor, grid: torch.Tensor, loop: Callable) -> GridState:
        dev = y0.device
        t_out, grid = t_out.to(_F64), grid.to(_F64)
        n = self.n_steps
        i64 = lambda v: torch.full((), v, dtype=torch.int64, device=dev)  # noqa: E731
        ys = torch.full((t_out.shape[0],) + tuple(y0.shape), math.nan, dtype=y0.dtype, device=dev)
        ys = torch.cat([y0[None], ys[1:]])
        rows = n if self.record_states else 1
        state = GridState(i=i64(0), y=y0.clone(), ys=ys, first_bad=i64(n), n_end_evals=i64(0),
                          tape_y=y0.new_zeros((rows,) + tuple(y0.shape)))
        if n == 0 or t_out.shape[0] == 1:
            return state

        def cond(*s):
            return s[0] < n

        def body(*s):
            st = GridState(*s)
            t0 = grid.index_select(0, st.i.reshape(1))[0]
            t1 = grid.index_select(0, (st.i + 1).reshape(1))[0]
            step, _ = self.step(t0, t1, st.y)
            covered = (t_out > t0) & (t_out <= t1)
            vals = self.outputs(t0, t1, st.y, step, t_out, covered, self.fraction(t_out, t0, t1))
            ys = torch.where(covered.reshape((-1,) + (1,) * st.y.dim()), vals, st.ys)
            first_bad = st.first_bad
            if self.s.check_finite:
                bad = ~torch.isfinite(step.y1).all()
                first_bad = torch.where(bad & (first_bad == n), st.i, first_bad)
            n_end = st.n_end_evals
            if self.s.interp == "cubic":
                n_end = n_end + covered.any().to(torch.int64)
            tape_y = st.tape_y
            if self.record_states:
                tape_y = tape_y.index_copy(0, st.i.reshape(1), st.y[None])
            out = GridState(st.i + 1, step.y1, ys, first_bad, n_end, tape_y)
            return unaliased(out, s)

        return GridState(*loop(cond, body, tuple(state)))

    def num_fevals(self, st: GridState) -> torch.Tensor:
        return st.i * self.tab.stages + st.n_end_evals

    # ------------------------------------------------------------------------------------------ for the adjoint
    def record(self, st: GridState, grid: torch.Tensor, j: torch.Tensor):
        """Step ``j`` from the tape: ``(t0, t1, y0, f0=None, rec=None)``."""
        idx = j.reshape(1)
        g = grid.to(_F64)
        return (g.index_select(0, idx)[0], g.index_select(0, (j + 1).reshape(1))[0],
                st.tape_y.index_select(0, idx)[0], None, None)

    def steps_taken(self, st: GridState) -> torch.Tensor:
        return st.i

    def replay(self, rec, t0, t1, y0, f0, t_out, covered, x, func):
        """``(y1, None, outputs)`` of step ``(t0, t1)`` from ``y0``: the map the adjoint differentiates."""
        step, _ = self.step(t0, t1, y0, func=func)
        return step.y1, None, self.outputs(t0, t1, y0, step, t_out, covered, x, func=func)
