"""Public entry points: :func:`odeint`, :func:`odeint_event`, :func:`odeint_dense` (torchdiffeq 0.2.5's
signatures and defaults; fastode additions are keyword arguments with torchdiffeq-compatible defaults)."""
from __future__ import annotations

import torch
from torch.autograd.functional import vjp

from .compiled import compile_requested
from .driver import build_solver, solve
from .errors import InvalidOptionError
from .grad.adjoint import odeint_adjoint
from .grad.checkpoint import odeint_checkpoint
from .inputs import check_inputs, flat_to_shape
from .solvers import SOLVERS
from .solvers.observers import DenseRecorder
from .solvers.rk_adaptive import RKAdaptiveSolver

__all__ = ["odeint", "odeint_event", "odeint_dense", "GRADIENT_MODES"]

GRADIENT_MODES = ("direct", "checkpoint", "adjoint")
_ADJOINT_KWARGS = {"adjoint_params", "adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options"}


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
           gradient="direct", return_stats=False, compile=None, **kwargs):
    """Integrate ``dy/dt = func(t, y), y(t[0]) = y0`` (torchdiffeq-compatible).

    Args:
        func: callable ``func(t, y) -> dy/dt``; ``t`` is a 0-dim tensor in the state's real dtype, ``y`` has
            ``y0``'s shape (a tuple of tensors for tuple states).
        y0: tensor of any shape, or a tuple of tensors.
        t: 1-D floating tensor, strictly increasing or decreasing; ``t[0]`` is the initial time.
        rtol, atol: relative/absolute tolerances (floats, tensors broadcastable to the state, or for tuple states
            a sequence with one entry per component).
        method: ``None`` -> ``"dopri5"``. Adaptive: dopri8, dopri5, tsit5, bosh3, fehlberg2, adaptive_heun. Fixed
            grid: euler, midpoint, heun2, heun3, rk4 (3/8 rule), rk4_classic, explicit_adams, implicit_adams,
            fixed_adams. Other: scipy_solver.
        options: dict of solver options (copied, never mutated). Unknown keys warn
            ``"<Solver>: Unexpected arguments {...}"``. Options given without ``method`` go to the default
            'dopri5'; keys dopri5 does not understand additionally trigger a warning that names them.
            Adaptive RK: ``first_step, safety, ifactor, dfactor, min_step, max_step, step_t, jump_t, dtype,
            norm, max_num_steps`` (default 10000 attempts per output interval, then
            :class:`~fastode.errors.MaxStepsExceededError`) and the opt-in ``interp="dense"`` (the method's own
            continuous extension; tsit5/dopri5/dopri8) and ``land_on="end"|"all"`` (land exactly on ``t[-1]`` /
            on every output time instead of overshooting and interpolating).
            Fixed grid: ``step_size, grid_constructor, interp ("linear"|"cubic"), perturb`` and
            ``check_finite`` (default True: NaN/inf states raise :class:`~fastode.errors.NonFiniteError`).
        event_fn: ``event_fn(t, y) -> Tensor``; if given, ``len(t)`` must be 2, the solve stops at the first sign
            change and ``(event_t, solution)`` is returned with ``solution`` of length 2.
        gradient: ``"direct"`` (default): plain autograd through the discrete solve.
            ``"checkpoint"``: discrete adjoint storing one state per accepted step and recomputing the stages
            in backward (same gradient as "direct" to rounding; see :mod:`fastode.grad.checkpoint`).
            ``"adjoint"``: the continuous adjoint, i.e. :func:`fastode.odeint_adjoint` with its defaults.
            The keywords ``adjoint_params, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options`` are
            passed to ``odeint_adjoint`` for "adjoint"; "checkpoint" uses ``adjoint_params`` (the tensors to
            differentiate when ``func`` is not an ``nn.Module``); "direct" ignores them, so that switching modes
            needs no other change.
        return_stats: if True, also return a :class:`~fastode.stats.SolveStats` as the last element of the result:
            ``(solution, stats)`` or ``(event_t, solution, stats)``.
        compile: ``True`` runs the whole adaptive solve (and, for ``"direct"`` / ``"checkpoint"``, its exact
            gradient) as one program compiled by ``torch.compile``: the same steps and values as the eager loop,
            without the interpreter between stages (:mod:`fastode.compiled`; the first call of each shape
            compiles, for tens of seconds). What cannot be compiled raises
            :class:`~fastode.compiled.engine.CompileError` naming the reason. ``None`` (default): the environment
            variable ``FASTODE_COMPILE=1`` turns it on, falling back to the eager loop with one warning where it
            cannot. For a training loop, :func:`fastode.compiled_odeint` returns the reusable handle.

    Returns:
        ``solution`` of shape ``(len(t), *y0.shape)`` (a tuple for tuple states), dtype of ``y0``; with
        ``event_fn``: ``(event_t, solution)``; plus ``stats`` if ``return_stats``.
    """
    unknown = set(kwargs) - _ADJOINT_KWARGS
    if unknown:
        raise TypeError(f"odeint() got unexpected keyword arguments {sorted(unknown)}")
    if compile_requested(compile):
        from .compiled import engine

        if gradient == "adjoint" and torch.is_grad_enabled():
            engine.decline_adjoint()
        elif event_fn is None and not torch.compiler.is_compiling():
            return engine.solve(func, y0, t, fallback=compile is None, return_stats=return_stats, rtol=rtol,
                                atol=atol, method=method, options=options,
                                gradient="direct" if gradient == "adjoint" else gradient,
                                adjoint_params=kwargs.get("adjoint_params"))
        elif compile:
            raise engine.CompileError("fastode: odeint(compile=True) cannot compile a solve with event_fn (events "
                                      "are located on the host) or one inside an outer torch.compile (which "
                                      "compiles the eager loop itself); call without compile=True")
    if gradient == "direct":
        # adjoint-only keywords are accepted (and ignored) so that switching `gradient` needs no other change
        return solve(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
                     return_stats=return_stats)
    if gradient == "checkpoint":
        return odeint_checkpoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                                 event_fn=event_fn, return_stats=return_stats,
                                 adjoint_params=kwargs.get("adjoint_params"))
    if gradient == "adjoint":
        if return_stats:
            kwargs["return_stats"] = True
        return odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                              event_fn=event_fn, **kwargs)
    raise InvalidOptionError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """Solve on ``[t0, t1]`` and return ``dense_output_fn(t_eval)`` evaluating the solution anywhere in between.

    torchdiffeq 0.2.5 only allows ``method="dopri5"`` and a tensor ``y0``; fastode accepts any adaptive RK method
    (dopri8, dopri5, tsit5, bosh3, fehlberg2, adaptive_heun), tuple states and ``t1 < t0``, and ``t_eval`` may be
    a 0-dim tensor (result shaped like ``y0``) or a 1-D tensor (result ``(len(t_eval), *y0.shape)``). The
    interpolant is the solver's (quartic by default, ``options={"interp": "dense"}`` for the method's own).
    """
    if not isinstance(t0, torch.Tensor):
        t0 = torch.tensor(float(t0), dtype=torch.float64)
    t = torch.stack([t0.reshape(()), torch.as_tensor(t1, dtype=t0.dtype, device=t0.device).reshape(())])
    norm = check_inputs(func, y0, t, rtol, atol, method, options, None, SOLVERS)
    recorder = DenseRecorder()
    solver = build_solver(norm, recorder)
    if not isinstance(solver, RKAdaptiveSolver):
        raise InvalidOptionError(f"odeint_dense needs an adaptive Runge-Kutta method (dopri8, dopri5, tsit5, bosh3, "
                                 f"fehlberg2, adaptive_heun), got {norm.method!r}")
    solver.integrate(norm.t)
    steps = list(recorder.steps)
    if not steps:
        raise InvalidOptionError("odeint_dense needs t1 != t0")
    times = torch.tensor([steps[0].t0] + [s.t1 for s in steps], dtype=torch.float64)
    shapes, reversed_ = norm.shapes, norm.t_is_reversed

    def dense_output_fn(t_eval):
        te = torch.as_tensor(t_eval)
        scalar = te.dim() == 0
        te_flat = te.reshape(-1)
        ti = (-te_flat if reversed_ else te_flat).detach().to("cpu", torch.float64)
        if bool((ti < times[0]).any()) or bool((ti > times[-1]).any()):
            raise InvalidOptionError(f"dense output requested outside the solved interval "
                                     f"[{float(t[0])}, {float(t[1])}]: {te.tolist()}")
        idx = torch.searchsorted(times, ti, side="right").clamp(1, len(steps))
        outs = []
        for k in range(len(ti)):
            step = steps[int(idx[k]) - 1]
            tv = te_flat[k].to(torch.float64)
            tv = -tv if reversed_ else tv
            x = ((tv - step.t0) / (step.t1 - step.t0)).to(solver.rdtype).to(step.y0.device)
            outs.append(solver.evaluate(step, x))
        out = torch.stack(outs)
        if shapes is not None:
            out = flat_to_shape(out, (len(outs),), shapes)
            return tuple(o[0] for o in out) if scalar else out
        return out[0] if scalar else out

    dense_output_fn.times = (-times if reversed_ else times)
    return dense_output_fn


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """Solve until ``event_fn(t, y) == 0``; the gradient of the event time follows the implicit function theorem.

    Same as torchdiffeq: returns ``(event_t, solution)`` with ``solution`` of length 2 (``[y0, y(event_t)]``).
    ``odeint_interface`` may be :func:`odeint` or :func:`fastode.odeint_adjoint`; keyword arguments go to it.
    """
    if reverse_time:
        t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() - 1.0])
    else:
        t = torch.cat([t0.reshape(-1), t0.reshape(-1).detach() + 1.0])

    result = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    stats = None
    if len(result) == 3:
        event_t, solution, stats = result
    else:
        event_t, solution = result

    norm = check_inputs(func, y0, t, 0.0, 0.0, None, None, event_fn, SOLVERS, check_y0=False)
    shapes, _func, _event_fn = norm.shapes, norm.func, norm.event_fn

    if shapes is not None:
        state_t = torch.cat([s[-1].reshape(-1) for s in solution])
    else:
        state_t = solution[-1]

    if reverse_time:
        event_t = -event_t
    event_t, state_t = _ImplicitFnGradientRerouting.apply(_func, _event_fn, event_t, state_t)
    if reverse_time:
        event_t = -event_t

    if shapes is not None:
        state_t = flat_to_shape(state_t, (), shapes)
        solution = tuple(torch.cat([s[:-1], s_t[None]], dim=0) for s, s_t in zip(solution, state_t))
    else:
        solution = torch.cat([solution[:-1], state_t[None]], dim=0)
    if stats is not None:
        return event_t, solution, stats
    return event_t, solution


class _ImplicitFnGradientRerouting(torch.autograd.Function):
    """Routes the event time's gradient into the state through ``d event_fn = 0`` (torchdiffeq)."""

    @staticmethod
    def forward(ctx, func, event_fn, event_t, state_t):
        ctx.func = func
        ctx.event_fn = event_fn
        ctx.save_for_backward(event_t, state_t)
        return event_t.detach(), state_t.detach()

    @staticmethod
    def backward(ctx, grad_t, grad_state):
        func = ctx.func
        event_fn = ctx.event_fn
        event_t, state_t = ctx.saved_tensors
        event_t = event_t.detach().clone().requires_grad_(True)
        state_t = state_t.detach().clone().requires_grad_(True)
        with torch.no_grad():
            f_val = func(event_t.to(state_t.real.dtype if state_t.is_complex() else state_t.dtype), state_t)
        with torch.enable_grad():
            c, (par_dt, dstate) = vjp(event_fn, (event_t, state_t))
        dcdt = par_dt + torch.sum(dstate * f_val)
        grad_t = grad_t + torch.sum(grad_state * f_val)
        dstate = dstate * (-grad_t / (dcdt + 1e-12)).reshape_as(c)
        grad_state = grad_state + dstate
        return None, None, None, grad_state
