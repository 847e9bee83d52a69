"""``gradient="checkpoint"``: a discrete adjoint that stores one state per accepted step and recomputes stages.

The forward solve runs without building an autograd graph and records, for every accepted step, its start state
``y_k`` and its (host-side) clock ``t0, t1, dt`` (plus how the step was shortened, if it was). The backward pass
walks the steps in reverse: it recomputes step ``k`` from ``y_k`` with autograd enabled inside the step
(``torch.enable_grad``), evaluates the outputs that fall in that step, and pulls the incoming cotangents back
through it with one ``torch.autograd.grad`` call. Memory is one state per step (independent of the number of
stages); cost is one re-evaluation of every stage (plus, for FSAL methods, the reused first stage, recomputed from
``y_k`` rather than stored) and one VJP per stage.

What is equal to ``gradient="direct"`` (tested to rounding, ``tests/test_checkpoint.py``):

* fixed-grid methods: the gradients with respect to ``y0``, ``t`` (through the grid and the output times) and the
  parameters of ``func`` -- the same computation graph is replayed.
* adaptive methods: the same, for the same accepted step sequence. Both modes treat step sizes chosen by the
  controller as constants (fastode's "direct" mode does not differentiate through the step-size controller; the
  clock is ``t[0] + constant`` and a step shortened to land on an output time is differentiable w.r.t. that time).
  torchdiffeq's direct mode additionally differentiates the *first* step size through its initial-step heuristic
  (a derivative of the size of the local error, not of the solution); that term is absent in both fastode modes.
* fehlberg2 / adaptive_heun reuse a last stage that is not ``f(t1, y1)``: their recorded steps also store that
  stage (two tensors per step), and its cotangent is carried to the previous step.

Parameters: ``func.parameters()`` when ``func`` is an ``nn.Module``, or the ``adjoint_params`` keyword (a sequence
of tensors; required when ``func`` is not an ``nn.Module``; ``()`` when there are none) -- the same rule as
``odeint_adjoint``. Tensors that ``func`` reaches otherwise (e.g. through a closure) receive no gradient.

Not supported: ``event_fn`` (use gradient="direct"), non-RK methods (Adams, scipy), double backward.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd.function import once_differentiable

from ..driver import build_solver, finish, gradient_parameters
from ..errors import InvalidOptionError
from ..inputs import check_inputs
from ..solvers import SOLVERS
from ..solvers.fixed_grid import FixedGridSolver
from ..solvers.observers import Tape
from ..solvers.rk_adaptive import RKAdaptiveSolver

__all__ = ["odeint_checkpoint"]


def odeint_checkpoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                      return_stats=False, adjoint_params=None):
    """:func:`fastode.odeint` with ``gradient="checkpoint"`` (see the module docstring)."""
    if event_fn is not None:
        raise InvalidOptionError('gradient="checkpoint" does not support event_fn; use gradient="direct" (or '
                                 '"adjoint") for event handling')
    params = tuple(p for p in gradient_parameters(func, adjoint_params, 'gradient="checkpoint": ') if p.requires_grad)
    norm = check_inputs(func, y0, t, rtol, atol, method, options, None, SOLVERS)
    solver = build_solver(norm)
    if not isinstance(solver, (RKAdaptiveSolver, FixedGridSolver)) or getattr(solver, "multistep", False):
        raise InvalidOptionError(f'gradient="checkpoint" supports the Runge-Kutta methods; method {norm.method!r} is '
                                 f'not one. Use gradient="direct" or gradient="adjoint".')
    tt = norm.t
    grid = None
    if isinstance(solver, FixedGridSolver):
        # built with autograd on, so that a grid derived from t passes its gradient back to t
        grid = solver.prepare(tt).grid
    if grid is None:
        grid = torch.empty(0)
    solution = _CheckpointFn.apply(solver, norm.y0, tt, grid, *params)
    return finish(norm, solution, return_stats=return_stats)


class _CheckpointFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, solver, y0, t, grid, *params):
        tape = Tape()
        solver.observe(tape)
        try:
            if isinstance(solver, FixedGridSolver):
                solution = solver.integrate(t, grid)
            else:
                solution = solver.integrate(t)
        finally:
            solver.observers.remove(tape)
        ctx.solver = solver
        ctx.tape = tape
        ctx.save_for_backward(t, grid)
        ctx.n_params = len(params)
        ctx.params = params
        return solution

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sol):
        solver = ctx.solver
        t, grid = ctx.saved_tensors
        params = ctx.params
        tape, out_map = ctx.tape.records, ctx.tape.outputs
        need_t = ctx.needs_input_grad[2]
        need_grid = ctx.needs_input_grad[3]
        outputs_in_step = defaultdict(list)
        for j, k in out_map:
            outputs_in_step[k].append(j)
        grad_params = [None] * len(params)
        solver.func.backward = True
        try:
            with torch.enable_grad():
                if isinstance(solver, FixedGridSolver):
                    a_y, g_t, g_grid = _backward_fixed(solver, tape, outputs_in_step, grad_sol, t, grid, params,
                                                       grad_params, need_t, need_grid)
                else:
                    a_y, g_t = _backward_adaptive(solver, tape, outputs_in_step, grad_sol, t, params, grad_params,
                                                  need_t)
                    g_grid = None
        finally:
            solver.func.backward = False
        grad_y0 = grad_sol[0] if a_y is None else grad_sol[0] + a_y
        return (None, grad_y0, g_t, g_grid, *grad_params)


def _accumulate(acc, grads):
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g


def _vjp(outputs, cotangents, inputs):
    outs, cots = [], []
    for o, c in zip(outputs, cotangents):
        if c is not None and o.requires_grad:
            outs.append(o)
            cots.append(c)
    if not outs:
        return [None] * len(inputs)
    want = [x for x in inputs if x is not None and x.requires_grad]
    got = torch.autograd.grad(outs, want, cots, allow_unused=True)
    it = iter(got)
    return [next(it) if (x is not None and x.requires_grad) else None for x in inputs]


def _backward_adaptive(solver, tape, outputs_in_step, grad_sol, t, params, grad_params, need_t):
    t_leaf = t.detach().requires_grad_(True) if need_t else t.detach()
    t_host = solver.begin_replay(t_leaf)
    a_y = a_f = None
    g_t = None
    for k in range(len(tape) - 1, -1, -1):
        rec = tape[k]
        y0 = rec.y0.detach().requires_grad_(True)
        step, f0 = solver.replay(rec, y0)
        js = outputs_in_step.get(k, [])
        outs = [solver.output(t_host, j) for j in js]
        outputs = [step.y1, step.k[-1]] + outs
        cots = [a_y, a_f] + [grad_sol[j] for j in js]
        stored = rec.f0_kind[0] == "stored"
        inputs = [y0, f0 if stored else None, t_leaf if need_t else None] + list(params)
        grads = _vjp(outputs, cots, inputs)
        a_y, a_f = grads[0], grads[1]
        if grads[2] is not None:
            g_t = grads[2] if g_t is None else g_t + grads[2]
        _accumulate(grad_params, grads[3:])
        if a_y is None:
            a_y = torch.zeros_like(y0)
    return a_y, (g_t.to(t.dtype) if g_t is not None else None)


def _backward_fixed(solver, tape, outputs_in_step, grad_sol, t, grid, params, grad_params, need_t, need_grid):
    t_leaf = t.detach().requires_grad_(True) if need_t else t.detach()
    g_leaf = grid.detach().requires_grad_(True) if need_grid else grid.detach()
    gctx = solver.prepare(t_leaf, g_leaf)
    a_y = None
    g_t = g_grid = None
    for i in range(len(tape) - 1, -1, -1):
        y0 = tape[i].detach().requires_grad_(True)
        step = solver.replay(gctx, i, y0)
        js = outputs_in_step.get(i, [])
        outs = [solver.output(gctx, j, i, y0, step) for j in js]
        outputs = [step.y1] + outs
        cots = [a_y] + [grad_sol[j] for j in js]
        inputs = [y0, t_leaf if need_t else None, g_leaf if need_grid else None] + list(params)
        grads = _vjp(outputs, cots, inputs)
        a_y = grads[0] if grads[0] is not None else torch.zeros_like(y0)
        if grads[1] is not None:
            g_t = grads[1] if g_t is None else g_t + grads[1]
        if grads[2] is not None:
            g_grid = grads[2] if g_grid is None else g_grid + grads[2]
        _accumulate(grad_params, grads[3:])
    return a_y, g_t, g_grid
