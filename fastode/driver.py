"""The one solve driver shared by every gradient mode: ``odeint`` (``"direct"``), ``gradient="checkpoint"`` and
``odeint_adjoint`` (``"adjoint"``).

A solve is always the same four steps; the modes differ only in what wraps step 3:

1. :func:`fastode.inputs.check_inputs` -- validation and normalisation (tuple flattening, reversed time,
   tolerances, the norm);
2. :func:`build_solver` -- the solver of the method, with its step observers (the checkpoint tape, dense output,
   per-step errors for ``return_stats``);
3. ``solver.integrate(t)`` or ``solver.integrate_until_event(t0, event_fn)`` -- plain (``"direct"``), inside the
   checkpoint Function, or inside the adjoint Function;
4. :func:`finish` -- the user's shapes and time orientation back, and the statistics.

:func:`gradient_parameters` is the rule both adjoint-style modes use to find the tensors to differentiate.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .inputs import check_inputs, flat_to_shape
from .solvers import SOLVERS
from .solvers.observers import ErrorRecorder

__all__ = ["solve", "build_solver", "finish", "gradient_parameters", "find_parameters"]


def solve(func, y0, t, *, rtol, atol, method, options, event_fn=None, return_stats=False):
    """A ``gradient="direct"`` solve (plain autograd through the steps): the body of :func:`fastode.odeint`, also
    what the continuous adjoint's backward pass integrates its augmented system with."""
    norm = check_inputs(func, y0, t, rtol, atol, method, options, event_fn, SOLVERS)
    solver = build_solver(norm, record_errors=return_stats)
    if norm.event_fn is None:
        return finish(norm, solver.integrate(norm.t), return_stats=return_stats)
    event_t, solution = solver.integrate_until_event(norm.t[0], norm.event_fn)
    return finish(norm, solution, event_t, return_stats=return_stats)


def build_solver(norm, *observers, record_errors: bool = False):
    """The solver for normalised inputs ``norm`` (a :class:`fastode.inputs.Normalized`) with ``observers``;
    ``record_errors`` adds the :class:`~fastode.solvers.observers.ErrorRecorder` that fills
    ``SolveStats.step_errors`` (adaptive methods)."""
    solver = SOLVERS[norm.method](func=norm.func, y0=norm.y0, rtol=norm.rtol, atol=norm.atol, **norm.options)
    if record_errors:
        solver.observe(ErrorRecorder())
    return solver.observe(*observers)


def finish(norm, solution, event_t: Optional[torch.Tensor] = None, *, return_stats: bool = False):
    """What the user gets back: the solution in ``y0``'s structure (a tuple for tuple states), the event time in
    ``t``'s dtype and orientation, and with ``return_stats`` the :class:`~fastode.stats.SolveStats` last."""
    if event_t is not None:
        event_t = event_t.to(norm.t)
        if norm.t_is_reversed:
            event_t = -event_t
    if norm.shapes is not None:
        solution = flat_to_shape(solution, (len(solution),), norm.shapes)
    out = (solution,) if event_t is None else (event_t, solution)
    if return_stats:
        stats = norm.stats
        stats.method = norm.method
        if norm.t_is_reversed:
            stats.step_ts = [-x for x in stats.step_ts]
            stats.step_sizes = [-x for x in stats.step_sizes]
        out = out + (stats,)
    return out[0] if len(out) == 1 else out


def find_parameters(module):
    """``module.parameters()``, or for a ``DataParallel`` replica the tensor attributes that require grad."""
    if not isinstance(module, nn.Module):
        raise ValueError("find_parameters needs an nn.Module")
    if getattr(module, '_is_replica', False):
        # a DataParallel replica holds its parameters as plain tensor attributes
        def find_tensor_attributes(m):
            return [(k, v) for k, v in m.__dict__.items() if torch.is_tensor(v) and v.requires_grad]

        gen = module._named_members(get_members_fn=find_tensor_attributes)
        return [param for _, param in gen]
    return list(module.parameters())


def gradient_parameters(func, adjoint_params, who: str) -> tuple:
    """The tensors a discrete or continuous adjoint differentiates: ``adjoint_params`` if given, else
    ``func``'s parameters (``func`` must then be an ``nn.Module``). ``who`` prefixes the error message."""
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ValueError(f'{who}func must be an instance of nn.Module to specify the adjoint parameters; '
                             'alternatively they can be specified explicitly via the `adjoint_params` argument. If '
                             'there are no parameters then it is allowable to set `adjoint_params=()`.')
        return tuple(find_parameters(func))
    params = tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"adjoint_params must be tensors; entry {i} is a {type(p).__name__}")
    return params
