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
    """One solve: ``forward(x, q0, tape) -> (zT, qT, saved, record)`` and ``backward(saved, gzT, gqT, want_t) ->
    (gz0, gq0, g_t or None, param grads)`` (a TritonCnfSolver's ``grid`` / ``adaptive`` / ``per_tile`` and their
    backward); ``record`` is left here for the engine to read; ``count_backward(n_steps)``: optional NFE counting."""

    def __init__(self, forward: Callable, backward: Callable, count_backward: Optional[Callable] = None):
        self.forward = forward
        self.backward = backward
        self.count_backward = count_backward
        self.record: Any = None


class TritonCnfSolve(torch.autograd.Function):
    """``(zT, qT) = TritonCnfSolve.apply(runner, x, q0, t, *params)`` (``t``: the two output times; ``params``: the
    MLP's, in ``[W, b, gw, gb, bw] * L`` order)."""

    @staticmethod
    def forward(ctx, runner: SolveRunner, x, q0, t, *params):
        zT, qT, saved, record = runner.forward(x.detach(), q0.detach(), True)
        runner.record = record
        ctx.runner, ctx.saved, ctx.t_dtype, ctx.q_like = runner, saved, t.dtype, qT.detach()
        ctx.want_t = ctx.needs_input_grad[3]
        return zT, qT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gzT, gqT):
        runner, saved = ctx.runner, ctx.saved
        gzT = torch.zeros_like(saved["tape"][0]) if gzT is None else gzT.contiguous()
        gqT = torch.zeros_like(ctx.q_like) if gqT is None else gqT.contiguous()
        gz, gq, g_t, gp = runner.backward(saved, gzT, gqT, ctx.want_t)
        if runner.count_backward is not None:
            runner.count_backward(saved["steps"])
        ctx.saved = None
        if g_t is not None:
            g_t = g_t.to(ctx.t_dtype)
        return (None, gz, gq, g_t) + tuple(gp)
