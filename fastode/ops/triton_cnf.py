"""The autograd Function of the fused Triton CNF solves: the exact gradient of the discrete solve.

Forward: the whole solve (:class:`fastode.kernels.cnf_solve.TritonCnfSolver`'s ``grid`` or ``adaptive``) with its
tape: each step's start state (and, adaptive, each accepted step's time and step and the last step's interpolation
data). Backward: the fused discrete adjoint, one launch per step in reverse, stages recomputed on chip from the
tape (:meth:`~fastode.kernels.cnf_solve.TritonCnfSolver.grid_backward` / ``adaptive_backward``). Step sizes are
constants, as in odeint's ``"direct"`` and ``"checkpoint"`` modes; the end time enters through the interpolation.
Saved: the tape and the solver (nothing else of the forward is kept). Once differentiable.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

__all__ = ["TritonCnfSolve", "SolveRunner"]


class SolveRunner:
    """What one solve needs: ``solver`` (a TritonCnfSolver), ``forward(x, q0, tape) -> (zT, qT, saved, record)``
    and whether the end time is differentiated; ``record`` is left here for the engine to read."""

    def __init__(self, solver: Any, forward: Callable, adaptive: bool, count_backward: Optional[Callable] = None):
        self.solver = solver
        self.forward = forward
        self.adaptive = adaptive
        self.count_backward = count_backward
        self.record: Optional[dict] = None


class TritonCnfSolve(torch.autograd.Function):
    """``(zT, qT) = TritonCnfSolve.apply(runner, x, q0, t, *params)`` (``t``: the two output times; ``params``: the
    MLP's, in ``[W, b, gw, gb, bw] * L`` order)."""

    @staticmethod
    def forward(ctx, runner: SolveRunner, x, q0, t, *params):
        zT, qT, saved, record = runner.forward(x.detach(), q0.detach(), True)
        runner.record = record
        ctx.runner, ctx.saved, ctx.t_dtype = runner, saved, t.dtype
        ctx.want_t = ctx.needs_input_grad[3]
        return zT, qT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gzT, gqT):
        runner, saved = ctx.runner, ctx.saved
        solver = runner.solver
        gzT = torch.zeros_like(saved["tape"][0]) if gzT is None else gzT.contiguous()
        if gqT is None:
            gqT = gzT.new_zeros(gzT.shape[0], solver.nq)
        if runner.adaptive:
            gz, gq, g_t, gp = solver.adaptive_backward(saved, gzT, gqT.contiguous(), ctx.want_t)
        else:  # (the grid engine declines a differentiable t: a learned end time moves the grid)
            gz, gq, gp = solver.grid_backward(saved, gzT, gqT.contiguous())
            g_t = None
        if runner.count_backward is not None:
            runner.count_backward(saved["steps"])
        ctx.saved = None
        if g_t is not None:
            g_t = g_t.to(ctx.t_dtype)
        return (None, gz, gq, g_t) + tuple(gp)
