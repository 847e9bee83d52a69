"""The autograd Function of the fused Triton CNF solves: the exact gradient of the discrete solve.

Forward: the whole solve (the Triton backend's driver, :class:`fastode.flows.fused.triton.TritonCnfSolver`: ``grid``,
``adaptive`` or ``per_tile``) with its tape: each step's start state (and, adaptive, each accepted step's time and
step and the last step's interpolation data). Backward: the fused discrete adjoint, one launch per step in reverse
(per tile: one launch), stages recomputed on chip from the tape. Step sizes are constants, as in odeint's
``"direct"`` and ``"checkpoint"`` modes; the end time enters through the interpolation. Saved: the tape and the
solver (nothing else of the forward is kept). Once differentiable. C++: :mod:`fastode.cpp._rk`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

__all__ = ["TritonCnfSolve", "SolveRunner"]


class SolveRunner(NamedTuple):
    """One solve: ``forward(x, q0, tape) -> (zT, qT, saved, record)`` and ``backward(saved, gzT, gqT, want_t) ->
    (gz0, gq0, g_t or None, param grads, evaluations)``; ``count_backward``: None or ``f(n)``, called with the
    backward's network evaluations."""

    forward: Callable
    backward: Callable
    count_backward: Optional[Callable] = None


class TritonCnfSolve(torch.autograd.Function):
    """``(zT, qT, record) = TritonCnfSolve.apply(runner, x, q0, t, *params)`` (``t``: the two output times;
    ``params``: the MLP's, in ``[W, b, gw, gb, bw] * L`` order; ``record``: the forward's, not differentiable)."""

    @staticmethod
    def forward(ctx, runner: SolveRunner, x, q0, t, *params):
        zT, qT, saved, record = runner.forward(x.detach(), q0.detach(), True)
        ctx.runner, ctx.saved, ctx.t_dtype, ctx.q_like = runner, saved, t.dtype, qT.detach()
        ctx.want_t = ctx.needs_input_grad[3]
        return zT, qT, record

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gzT, gqT, _grecord):
        runner, saved = ctx.runner, ctx.saved
        gzT = torch.zeros_like(saved["tape"][0]) if gzT is None else gzT.contiguous()
        gqT = torch.zeros_like(ctx.q_like) if gqT is None else gqT.contiguous()
        gz, gq, g_t, gp, evaluations = runner.backward(saved, gzT, gqT, ctx.want_t)
        if runner.count_backward is not None:
            runner.count_backward(evaluations)
        ctx.saved = None
        if g_t is not None:
            g_t = g_t.to(ctx.t_dtype)
        return (None, gz, gq, g_t) + tuple(gp)
