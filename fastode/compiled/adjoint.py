"""The exact gradient of a compiled solve: the discrete adjoint as a second loop over the tape of accepted steps.

The forward loop (:class:`~fastode.compiled.loop.AdaptiveLoop` with ``record_states``) stores each accepted step's
start ``(t0, dt, y0, f0)``. The backward runs over that tape in reverse and, per step, recomputes the stages from
``(y0, f0)`` and applies the vector-Jacobian product (``torch.func.vjp``) of the map

    (y0, f0, parameters, s, x) -> (y1, k_last, outputs inside the step)

where ``k_last`` is the next step's first stage (FSAL), ``s`` a zero shift of every stage time (its gradient is
``d/dt[0]``: the eager loop's clock is ``t[0] + constant``) and ``x`` the interpolation coordinates of the output
times (their gradients give ``d/dt[i]``). The cotangents of ``y1`` and ``k_last`` are carried from step to step;
after the loop the initial evaluation ``f0 = func(t[0], y0)`` takes the remaining one. This is the same discrete
adjoint as ``gradient="checkpoint"`` (:mod:`fastode.grad.checkpoint`), written as a tensor loop so that it compiles
(inductor cannot yet lower autograd through a ``while_loop`` with its C++ wrapper), and it is what the forward's
``torch.autograd.Function`` returns for ``"direct"`` as well: both equal the eager modes' gradient to rounding.

Memory: two states per accepted step (``y0`` and ``f0``) plus the outputs; the stages are recomputed, one more
set of evaluations (and their VJPs) per accepted step in the backward.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn

from .loop import unaliased

__all__ = ["FuncModule", "AdjointLoop"]

_F64 = torch.float64


class FuncModule(nn.Module):
    """``base(t, y)`` (the solver's flat, forward-time view of the user's ``func``) as a module whose parameters are
    the user's module's: ``torch.func.functional_call`` can then evaluate it with parameters given as inputs."""

    def __init__(self, module: nn.Module, base: Callable):
        super().__init__()
        self.user = module
        self._base = base

    def forward(self, t, y):
        return self._base(t, y)


class AdjointLoop:
    """The reverse loop of :mod:`fastode.compiled.adjoint` over a forward loop's tape: an
    :class:`~fastode.compiled.loop.AdaptiveLoop` (which carries the first stage, ``fsal``) or a
    :class:`~fastode.compiled.grid_loop.GridLoop`. The loop supplies ``record(state, aux, j)`` (step ``j``'s start
    and end times, start state, first stage and its own record) and ``replay`` (the step map differentiated)."""

    def __init__(self, loop, module: FuncModule, names: Sequence[str], t_grad: bool):
        self.loop = loop
        self.module = module
        self.names = tuple(names)
        self.t_grad = t_grad

    def _call(self, params: Sequence[torch.Tensor]) -> Callable:
        mapping: Dict[str, torch.Tensor] = dict(zip(self.names, params))
        return lambda t, y: torch.func.functional_call(self.module, mapping, (t, y))

    def run(self, st, aux, t_out: torch.Tensor, g_ys: torch.Tensor, params: Sequence[torch.Tensor],
            loop_fn: Callable):
        """Gradients ``(y0, t_out, params)`` of ``<g_ys, ys>`` for the forward run ``st`` (its tape; ``aux``: the
        grid of a fixed-grid loop); ``loop_fn`` is ``while_loop``."""
        lp = self.loop
        t_out = t_out.to(_F64)
        y_like = st.y
        y_dim = y_like.dim()
        zero_s = torch.zeros((), dtype=lp.rdtype, device=y_like.device)
        params = tuple(params)
        fsal = lp.fsal

        def cond(j, *rest):
            return j >= 0

        def body(j, a_y, a_f, g_s, g_x, *g_p):
            t0, t1, y0, f0, rec = lp.record(st, aux, j)
            covered = (t_out > t0) & (t_out <= t1)
            width = lp.rnd(t1 - t0)
            x = lp.fraction(t_out, t0, t1)

            def g(y0, f0, s, x, *ps):
                call = self._call(ps)
                func = (lambda tt, yy: call(tt + s.to(tt.dtype), yy)) if self.t_grad else call
                y1, k_last, vals = lp.replay(rec, t0, t1, y0, f0 if fsal else None, t_out, covered, x, func)
                return y1, (k_last if fsal else torch.zeros_like(y1)), vals

            _, vjp = torch.func.vjp(g, y0, f0 if fsal else torch.zeros_like(y0), zero_s, x, *params)
            g_out = torch.where(covered.reshape((-1,) + (1,) * y_dim), g_ys, torch.zeros_like(g_ys))
            d_y0, d_f0, d_s, d_x, *d_p = vjp((a_y, a_f, g_out))
            d_x = torch.where(covered, d_x.to(_F64) / width, torch.zeros_like(g_x))
            return unaliased((j - 1, d_y0, d_f0, g_s + d_s.to(_F64), g_x + d_x,
                              *[acc + d for acc, d in zip(g_p, d_p)]), (j, a_y, a_f, g_s, g_x, *g_p))

        init = (lp.steps_taken(st) - 1, torch.zeros_like(y_like), torch.zeros_like(y_like),
                torch.zeros((), dtype=_F64, device=y_like.device), torch.zeros_like(t_out),
                *[torch.zeros_like(p) for p in params])
        j, a_y, a_f, g_s, g_x, *g_p = loop_fn(cond, body, init)
        g_y0 = a_y + g_ys[0]
        g_t0 = g_s - g_x.sum()
        if fsal:
            # the initial evaluation f0 = func(t[0], y0) takes the first step's f0 cotangent
            def f_init(y0, s, *ps):
                return self._call(ps)(lp.state_time(t_out[0]) + s, y0)

            _, vjp0 = torch.func.vjp(f_init, st.ys[0], zero_s, *params)
            d_y0, d_s0, *d_p0 = vjp0(a_f)
            g_y0 = g_y0 + d_y0
            g_t0 = g_t0 + d_s0.to(_F64)
            g_p = [a + b for a, b in zip(g_p, d_p0)]
        return g_y0, torch.cat([g_t0.reshape(1), g_x[1:]]), tuple(g_p)
