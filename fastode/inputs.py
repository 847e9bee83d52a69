"""Input validation and normalisation (torchdiffeq's ``_check_inputs``, with errors that explain themselves).

:func:`check_inputs` turns the user's ``(func, y0, t, rtol, atol, method, options, event_fn)`` into what a
solver integrates: a flat tensor state (tuple states are concatenated), increasing time (decreasing ``t`` is
negated and ``func`` becomes ``-func(-t, y)``), tolerances matching the flat state, a copied options dict with
``norm`` set, and an :class:`~fastode.solvers.base.ODEFunc` that counts evaluations into a fresh
:class:`~fastode.stats.SolveStats`. The order of operations is torchdiffeq's.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import namedtuple

import torch

from .compiling import check, host_floats
from .errors import (InvalidOptionError, InvalidStateError, InvalidTimeError, FuncOutputError, NonFiniteStateError,
                     TimeDtypeError)
from .events import combine_event_functions
from .norms import mixed_norm, rms_norm
from .solvers import SOLVERS, get_solver
from .solvers.base import ODEFunc, _null_callback
from .stats import SolveStats

__all__ = ["check_inputs", "Normalized", "flat_to_shape", "check_time", "ALL_CALLBACK_NAMES"]

ALL_CALLBACK_NAMES = ['callback_step', 'callback_accept_step', 'callback_reject_step']
ALL_ADJOINT_CALLBACK_NAMES = [name + '_adjoint' for name in ALL_CALLBACK_NAMES]

Normalized = namedtuple("Normalized", "shapes func y0 t rtol atol method options event_fn t_is_reversed stats")
Normalized.__doc__ = """Result of :func:`check_inputs` (the first ten fields are torchdiffeq's ``_check_inputs``
return values, in the same order; ``stats`` is the SolveStats that ``func`` counts into)."""


def flat_to_shape(tensor, length, shapes):
    """Split the last dimension of ``tensor`` into views shaped ``(*length, *shape_i)`` (torchdiffeq)."""
    tensor_list = []
    total = 0
    for shape in shapes:
        next_total = total + shape.numel()
        tensor_list.append(tensor[..., total:next_total].view((*length, *shape)))
        total = next_total
    return tuple(tensor_list)


def _tuple_tol(name, tol, shapes):
    try:
        iter(tol)
    except TypeError:
        return tol
    if isinstance(tol, torch.Tensor) and tol.dim() == 0:
        return tol
    tol = tuple(tol)
    if len(tol) != len(shapes):
        raise InvalidStateError(f"If using tupled {name} it must have the same length as the tuple y0 "
                                f"(got {len(tol)} tolerances for {len(shapes)} components)")
    out = []
    for tol_, shape in zip(tol, shapes):
        tol_ = torch.as_tensor(tol_)
        if tol_.dim() > 1 and tol_.shape == shape:
            tol_ = tol_.reshape(-1)
        try:
            out.append(tol_.expand(shape.numel()))
        except RuntimeError:
            raise InvalidStateError(f"each entry of a tupled {name} must be a scalar, a 1-D tensor with one value "
                                    f"per element of its component, or a tensor shaped like the component; got "
                                    f"shape {tuple(tol_.shape)} for a component of shape {tuple(shape)}") from None
    return torch.cat(out)


def _check_tol(name, tol):
    if isinstance(tol, torch.Tensor):
        if tol.requires_grad:
            raise InvalidStateError(f"{name} cannot require gradient")
        bad = not bool(torch.isfinite(tol).all()) or bool((tol < 0).any())
    else:
        try:
            v = float(tol)
        except (TypeError, ValueError):
            raise InvalidStateError(f"{name} must be a number or a tensor, got {tol!r}") from None
        bad = not -math.inf < v < math.inf or v < 0  # comparisons (not math.isfinite) trace under torch.compile
    if bad:
        raise InvalidStateError(f"{name} must be finite and non-negative, got {tol!r}")


def check_time(name, t, can_grad=True):
    """Validate a time tensor (1-D, floating, finite, strictly monotone)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidTimeError(f"{name} must be a torch.Tensor (1-D, floating point), got {type(t).__name__}; e.g. "
                               f"{name} = torch.linspace(0., 1., 10)")
    if not torch.is_floating_point(t):
        raise TimeDtypeError(f"`{name}` must be a floating point Tensor but is a {t.type()}; e.g. use "
                             f"{name}.float() or torch.tensor([0., 1.])")
    if t.ndimension() != 1:
        raise InvalidTimeError(f"{name} must be one dimensional, got shape {tuple(t.shape)}; use {name}.reshape(-1) "
                               f"for a single time series (all batch elements share the same times)")
    if len(t) == 0:
        raise InvalidTimeError(f"{name} must contain at least one time point (the initial time)")
    if not can_grad and t.requires_grad:
        raise InvalidTimeError(f"{name} cannot require gradient")
    vals = host_floats(t)  # one host read (under torch.compile: read while tracing, guarded in the graph)
    if not all(-math.inf < v < math.inf for v in vals):  # comparisons, not math.isfinite: they trace
        raise InvalidTimeError(f"{name} must be finite, got {vals if len(vals) <= 10 else t.detach()}")
    if len(vals) > 1:
        up = all(b > a for a, b in zip(vals[:-1], vals[1:]))
        if not (up or all(b < a for a, b in zip(vals[:-1], vals[1:]))):
            inc = vals[1] > vals[0]
            i = next((k for k, (a, b) in enumerate(zip(vals[:-1], vals[1:])) if (b <= a if inc else b >= a)), 0)
            raise InvalidTimeError(
                f"{name} must be strictly increasing or decreasing: {name}[{i}]={_as_t(t, vals[i])} and "
                f"{name}[{i + 1}]={_as_t(t, vals[i + 1])} break the order. Sort the times (and remove duplicates) "
                f"before calling odeint.")
    return vals


def _as_t(t, v):
    """``v`` as ``t``'s dtype prints it (float32 times are not shown with float64 digits)."""
    return torch.tensor(v, dtype=t.dtype).item()


def _flip_option(options, option_name):
    if option_name in options and options[option_name] is not None:
        value = options[option_name]
        if isinstance(value, torch.Tensor):
            options[option_name] = -value
        else:
            try:
                options[option_name] = -torch.as_tensor(value, dtype=torch.float64)
            except Exception:
                pass  # the solver raises a clear error for a bad value


def _accepted_options(cls):
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    return names - {"self", "func", "y0", "rtol", "atol"}


def check_inputs(func, y0, t, rtol, atol, method, options, event_fn, solvers=SOLVERS, *, stats=None,
                 check_y0=True) -> Normalized:
    """Validate and normalise odeint's inputs (see the module docstring)."""
    if stats is None:
        stats = SolveStats()

    # ---- time first (so messages about t come before anything that indexes it)
    t_vals = check_time('t', t, True)
    if not callable(func):
        raise InvalidOptionError(f"func must be callable as func(t, y), got {type(func).__name__}")

    # ---- y0
    is_tuple = not isinstance(y0, torch.Tensor)
    if is_tuple:
        if not isinstance(y0, tuple):
            raise InvalidStateError(f"y0 must be either a torch.Tensor or a tuple of tensors, got "
                                    f"{type(y0).__name__}" + (" (convert the list with tuple(y0))"
                                                              if isinstance(y0, list) else ""))
        if len(y0) == 0:
            raise InvalidStateError("y0 is an empty tuple; give at least one tensor")
        for i, y0_ in enumerate(y0):
            if not isinstance(y0_, torch.Tensor):
                raise InvalidStateError(f"y0[{i}] must be a torch.Tensor, got {type(y0_).__name__}")
    for i, y0_ in enumerate(y0 if is_tuple else (y0,)):
        if not (y0_.is_floating_point() or y0_.is_complex()):
            which = f"y0[{i}]" if is_tuple else "y0"
            raise InvalidStateError(f"{which} must be a floating point (or complex) tensor, got {y0_.dtype}; "
                                    f"e.g. {which}.float()")

    if event_fn is not None:
        if len(t) != 2:
            raise ValueError(f"We require len(t) == 2 when in event handling mode, but got len(t)={len(t)}.")
        event_fn = combine_event_functions(event_fn, t[0], y0)

    original_func = func
    shapes = None
    if is_tuple:
        shapes = [y0_.shape for y0_ in y0]
        rtol = _tuple_tol('rtol', rtol, shapes)
        atol = _tuple_tol('atol', atol, shapes)
        y0 = torch.cat([y0_.reshape(-1) for y0_ in y0])
        if event_fn is not None:
            _ev = event_fn
            event_fn = lambda t_, y_: _ev(t_, flat_to_shape(y_, (), shapes))

    # ---- method and options
    options = {} if options is None else dict(options)
    method_given = method is not None
    if method is None:
        method = 'dopri5'
    solver_cls = get_solver(method)
    if not method_given and options:
        unknown = set(options) - _accepted_options(solver_cls) - {"norm"}
        if unknown:
            warnings.warn(f"options {sorted(unknown)} were given without `method`, so the default method "
                          f"'dopri5' is used and will ignore them. Pass method= explicitly (e.g. method='rk4' for "
                          f"step_size/grid_constructor/interp/perturb).")

    if is_tuple:
        norm = options.get('norm', mixed_norm)

        def _norm(tensor, _norm_=norm):
            return _norm_(flat_to_shape(tensor, (), shapes))
        options['norm'] = _norm
    elif 'norm' not in options:
        options['norm'] = rms_norm

    # ---- time direction
    t_is_reversed = len(t_vals) > 1 and t_vals[0] > t_vals[1]
    if t_is_reversed:
        t = -t
        if event_fn is not None:
            _ev2 = event_fn
            event_fn = lambda t_, y_: _ev2(-t_, y_)
        if options.get('grid_constructor') is not None:
            _gc = options['grid_constructor']
            options['grid_constructor'] = lambda func_, y0_, t_: -_gc(func_, y0_, -t_)
        _flip_option(options, 'step_t')
        _flip_option(options, 'jump_t')

    # ---- tolerances
    _check_tol('rtol', rtol)
    _check_tol('atol', atol)

    if t.device != y0.device:
        warnings.warn("t is not on the same device as y0. Coercing to y0.device.")
        t = t.to(y0.device)

    if check_y0:
        check(torch.isfinite(y0).all(), lambda: NonFiniteStateError(
            f"y0 contains NaN or inf values (the solution at the initial time t={t_vals[0]:.6g}); the initial state "
            "must be finite"))

    # ---- the function the solver calls
    base = _make_base(func, shapes, t_is_reversed)
    describe = (lambda v: -v) if t_is_reversed else (lambda v: v)
    wrapped = ODEFunc(base, stats=stats, shape=y0.shape, dtype=y0.dtype, describe_time=describe)

    callback_names = set()
    for callback_name in ALL_CALLBACK_NAMES:
        callback = getattr(original_func, callback_name, None)
        if callback is None or callback is _null_callback:
            continue
        callback_names.add(callback_name)
        if is_tuple:
            def callback(t0, y0_, dt, _callback=callback):
                return _callback(t0, flat_to_shape(y0_, (), shapes), dt)
        if t_is_reversed:
            def callback(t0, y0_, dt, _callback=callback):
                return _callback(-t0, y0_, dt)
        setattr(wrapped, callback_name, callback)
    for callback_name in ALL_ADJOINT_CALLBACK_NAMES:
        callback = getattr(original_func, callback_name, None)
        if callback is not None:
            setattr(wrapped, callback_name, callback)
    invalid_callbacks = callback_names - solver_cls.valid_callbacks()
    if invalid_callbacks:
        warnings.warn("Solver '{}' does not support callbacks {}".format(method, invalid_callbacks))

    return Normalized(shapes, wrapped, y0, t, rtol, atol, method, options, event_fn, t_is_reversed, stats)


def _shape_text(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _bad_tuple_output(f, shapes, t):
    want = [tuple(s) for s in shapes]
    t = float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
    if not isinstance(f, (tuple, list)):
        what = f"a {type(f).__name__}"
    elif len(f) != len(shapes):
        what = f"{len(f)} components with shapes ({', '.join(map(_shape_text, f))})"
    else:
        bad = next((i for i, (x, s) in enumerate(zip(f, want))
                    if not isinstance(x, torch.Tensor) or tuple(x.shape) != s), 0)
        what = (f"component {bad} with shape {_shape_text(f[bad])} where y[{bad}] has shape {want[bad]} "
                f"(all shapes returned: ({', '.join(map(_shape_text, f))}))")
    raise FuncOutputError(f"func(t, y) returned {what} at t={t}, but for a tuple state it must return a tuple of "
                          f"{len(shapes)} tensors with the shapes of y: ({', '.join(map(str, want))})")


def _make_base(func, shapes, reversed_):
    if shapes is None:
        if not reversed_:
            def base(t, y):
                return func(t, y)
        else:
            def base(t, y):
                return -func(-t, y)
        return base

    def base(t, y):
        tt = -t if reversed_ else t
        f = func(tt, flat_to_shape(y, (), shapes))
        if not isinstance(f, (tuple, list)) or len(f) != len(shapes) or any(
                not isinstance(f_, torch.Tensor) or f_.shape != s for f_, s in zip(f, shapes)):
            _bad_tuple_output(f, shapes, tt)
        out = torch.cat([f_.reshape(-1) for f_ in f])
        return -out if reversed_ else out
    return base
