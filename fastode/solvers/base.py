"""Solver base class: the interface every fastode solver implements.

Interface (stable; the Adams and scipy solvers are written against it)
---------------------------------------------------------------------

``solver = Cls(func, y0, rtol, atol, **options)``

* ``func``: an :class:`ODEFunc` (built by ``fastode.inputs``) or any callable ``func(t, y) -> dy/dt``; a plain
  callable is wrapped into an :class:`ODEFunc` by the base class. ``t`` handed to ``func`` is a 0-dim tensor of
  the state's real dtype on the state's device. ``ODEFunc`` counts every call into ``func.stats.num_fevals``
  (this is how NFE is counted: solvers never count evaluations themselves), checks the output's shape and
  carries the callbacks ``callback_step(t0, y0, dt)``, ``callback_accept_step``, ``callback_reject_step``
  (no-ops unless the user's func defines them).
* ``y0``: 1 tensor (tuple states and reversed time are normalised away by ``fastode.inputs`` before a solver
  sees them: the solver always integrates forwards in time over a flat/any-shaped tensor state).
* ``rtol``, ``atol``: floats or tensors broadcastable to ``y0``.
* ``options``: keyword arguments; each solver class declares the ones it understands as keyword parameters of
  its ``__init__`` and passes the rest to ``Solver.__init__``, which warns
  ``UserWarning("<Class>: Unexpected arguments {...}")`` (torchdiffeq's wording) for anything left over.
  ``norm`` is always passed by ``odeint`` (solvers that do not use it accept and ignore it).

Class attributes: ``order`` (int, used by step-size control), ``adaptive`` (bool), ``name`` (str or None).

Instance attributes set by ``Solver.__init__``: ``func`` (the ODEFunc), ``y0``, ``rtol``, ``atol``, ``norm``,
``stats`` (a :class:`~fastode.stats.SolveStats`, shared with ``func.stats``).

Methods:

* ``integrate(t) -> Tensor`` of shape ``(len(t), *y0.shape)``: ``t`` is a strictly increasing 1-D tensor
  (``len(t) >= 1``) on ``y0``'s device; ``solution[0]`` is ``y0``. The solver increments
  ``self.stats.num_steps / num_accepted_steps / num_rejected_steps`` and appends accepted steps to
  ``step_ts`` / ``step_sizes`` (internal, increasing-time orientation; ``odeint`` flips them for reversed time).
* ``integrate_until_event(t0, event_fn) -> (event_t, solution)`` (optional; ``solution`` has length 2:
  ``[y0, y(event_t)]``). ``event_fn(t, y)`` returns a 0-dim tensor that changes sign at the event
  (already combined by ``fastode.events.combine_event_functions``).
* ``valid_callbacks() -> set`` (classmethod): names of the callbacks the solver calls.

Helpers here: :func:`handle_unused_kwargs`, :func:`time_tensor` (a clock value as the tensor ``func`` sees,
optionally nudged with ``nextafter`` like torchdiffeq's ``Perturb``), :class:`Perturb`.
"""
from __future__ import annotations

import enum
import math
import numbers
import warnings
from typing import Optional

import numpy as np
import torch

from ..errors import FuncOutputError
from ..stats import SolveStats
from .observers import AcceptedStep

__all__ = ["Solver", "ODEFunc", "Perturb", "handle_unused_kwargs", "time_tensor", "state_time_value",
           "real_dtype", "tableau_solver", "all_finite"]


class Perturb(enum.IntEnum):
    """Which side of a time point ``func`` should see (torchdiffeq's ``Perturb``)."""
    NONE = 0
    PREV = -1   # nextafter(t, -inf)
    NEXT = 1    # nextafter(t, +inf)


def real_dtype(y: torch.Tensor) -> torch.dtype:
    """The real dtype of a (possibly complex) tensor: the dtype ``func`` receives its time in."""
    return y.real.dtype if y.is_complex() else y.dtype


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def state_time_value(value: float, dtype: torch.dtype, perturb: int = 0) -> float:
    """``value`` rounded to ``dtype`` and, if ``perturb``, moved one ulp towards +-inf (as a Python float)."""
    np_t = _NP.get(dtype)
    if np_t is not None:
        v = np_t(value)
        if perturb:
            v = np.nextafter(v, np_t(math.inf if perturb > 0 else -math.inf))
        return float(v)
    v = torch.tensor(value, dtype=dtype)
    if perturb:
        v = torch.nextafter(v, torch.tensor(math.inf if perturb > 0 else -math.inf, dtype=dtype))
    return float(v)


def time_tensor(value: float, like: torch.Tensor, perturb: int = 0,
                anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The 0-dim time tensor ``func`` receives for clock value ``value`` (a Python float).

    The value is rounded to ``like``'s real dtype (and nudged one ulp for ``perturb``), placed on ``like``'s
    device without a host->device copy. If ``anchor`` (a 0-dim tensor: ``t[0]``, or the same time computed from
    times that require grad) is given, the result carries its gradient (``value + (anchor - anchor.detach())``):
    the value never comes from the anchor's tensor arithmetic, so a solve's values do not depend on whether the
    times require grad.
    """
    dtype = real_dtype(like)
    out = torch.full((), state_time_value(value, dtype, perturb), dtype=dtype, device=like.device)
    if anchor is not None:
        out = out + (anchor - anchor.detach()).to(dtype)
    return out


def number_option(owner: str, name: str, value) -> float:
    """A numeric option (``step_size``, ``first_step``, ...) as a float, or :class:`InvalidOptionError` that names
    the option and what was passed. Strings are refused even when they look like numbers (``"0.1"``): they are
    usually a config-file value that was never converted, and torchdiffeq fails on them with a bare TypeError."""
    from ..errors import InvalidOptionError

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InvalidOptionError(f"{owner}: option {name!r} must be a scalar, got a tensor of shape "
                                     f"{tuple(value.shape)}")
        value = value.detach().item()
    if isinstance(value, (str, bytes, bool)) or not isinstance(value, numbers.Real):
        hint = f" (pass {name}={value.strip()})" if isinstance(value, str) and _is_number(value) else ""
        raise InvalidOptionError(f"{owner}: option {name!r} must be a number, got {value!r} of type "
                                 f"{type(value).__name__}{hint}")
    return float(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def handle_unused_kwargs(solver, unused_kwargs) -> None:
    """torchdiffeq's warning for options a solver does not understand (its wording first, so that filters
    written for torchdiffeq still match), saying that they are ignored."""
    if len(unused_kwargs) > 0:
        warnings.warn('{}: Unexpected arguments {}: this method does not use them, so they are ignored.'.format(
            solver.__class__.__name__, unused_kwargs))


def _null_callback(*args, **kwargs):
    return None


class ODEFunc:
    """``func(t, y)`` as solvers see it: counts evaluations, checks outputs, carries callbacks.

    ``base(t, y)`` must already work on the solver's (flat, forward-time) state; ``fastode.inputs`` composes
    the tuple-flattening and time-reversal wrappers into ``base``. Output checks are host-side only (type,
    shape, dtype), so they cost no device synchronisation.
    """

    def __init__(self, base, stats: Optional[SolveStats] = None, shape=None, dtype=None, describe_time=None):
        self.base = base
        self.stats = stats if stats is not None else SolveStats()
        self.shape = shape
        self.dtype = dtype
        # maps an internal time value to the user's (for messages): reversed solves negate it
        self.describe_time = describe_time if describe_time is not None else (lambda t: t)
        self.backward = False   # when True evaluations are counted as num_fevals_backward
        self.callback_step = _null_callback
        self.callback_accept_step = _null_callback
        self.callback_reject_step = _null_callback

    def __call__(self, t, y):
        if self.backward:
            self.stats.num_fevals_backward += 1
        else:
            self.stats.num_fevals += 1
        f = self.base(t, y)
        if self.shape is not None:
            if not isinstance(f, torch.Tensor) or f.shape != self.shape:
                self._bad_output(t, f)
        if self.dtype is not None and f.dtype != self.dtype:
            f = f.to(self.dtype)
        return f

    def call_raw(self, t, y):
        """Evaluate (and count) without casting the output to the state dtype."""
        if self.backward:
            self.stats.num_fevals_backward += 1
        else:
            self.stats.num_fevals += 1
        return self.base(t, y)

    def _bad_output(self, t, f):
        try:
            tv = float(self.describe_time(float(t)))
        except Exception:  # pragma: no cover - t not convertible
            tv = t
        got = f"a {type(f).__name__}" if not isinstance(f, torch.Tensor) else f"a tensor of shape {tuple(f.shape)}"
        raise FuncOutputError(
            f"func(t, y) returned {got} at t={tv}, but it must return a tensor with the same shape as y, "
            f"{tuple(self.shape)} (for tuple states: a tuple of tensors shaped like the components of y0). "
            f"Check the output of func: e.g. a missing/extra batch dimension or a reduction over the wrong axis.")


class Solver:
    """Base class of every solver (see the module docstring for the interface)."""

    order: int = 0
    adaptive: bool = False
    name: Optional[str] = None

    def __init__(self, func, y0, rtol, atol, norm=None, **unused_kwargs):
        handle_unused_kwargs(self, unused_kwargs)
        if not isinstance(func, ODEFunc):
            func = ODEFunc(func, shape=y0.shape)
        self.func = func
        self.stats: SolveStats = func.stats
        self.y0 = y0
        self.rtol = rtol
        self.atol = atol
        if norm is None:
            from ..norms import rms_norm
            norm = rms_norm
        self.norm = norm
        self.observers: list = []   # StepObserver instances (fastode/solvers/observers.py)
        self._n_accepted = 0

    def observe(self, *observers) -> "Solver":
        """Attach step observers (:mod:`fastode.solvers.observers`); returns the solver."""
        self.observers.extend(observers)
        return self

    def _notify_accepted(self, record, dense=None, ratio=None) -> None:
        if self.observers:
            step = AcceptedStep(self._n_accepted, record, dense, ratio)
            for obs in self.observers:
                obs.accepted(self, step)
        self._n_accepted += 1

    def _notify_output(self, index: int) -> None:
        """Output ``index`` falls in the latest accepted step."""
        for obs in self.observers:
            obs.output(self, index, self._n_accepted - 1)

    @classmethod
    def valid_callbacks(cls) -> set:
        return set()

    def integrate(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def integrate_until_event(self, t0, event_fn):
        raise NotImplementedError(f"{self.__class__.__name__} does not support event handling (event_fn); use "
                                  "an adaptive Runge-Kutta method (e.g. 'dopri5') or a fixed-grid method with "
                                  "options={'step_size': ...}.")


def all_finite(y: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``y``'s device: no NaN/inf in ``y`` (no host synchronisation).

    Reads the min and max (``aminmax`` propagates NaN) instead of materialising ``isfinite(y)``: a full-size
    boolean temporary per step fragments glibc's heap on the CPU, so resident memory grew with the number of steps.
    """
    if y.is_complex():
        y = torch.view_as_real(y)
    if y.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=y.device)
    return torch.isfinite(torch.stack(torch.aminmax(y))).all()


def tableau_solver(base_cls, tableau_name: str, cls_name: str, module: str = __name__.rsplit(".", 1)[0]):
    """A named subclass of ``base_cls`` (a Runge-Kutta loop) bound to the tableau ``tableau_name``, defined in
    ``module`` (the solver table's package, where :mod:`fastode.solvers` also binds it by ``cls_name``)."""
    from ..tableaus import TABLEAUS
    tab = TABLEAUS[tableau_name]
    return type(cls_name, (base_cls,), {"tableau": tab, "order": tab.order, "name": tableau_name,
                                        "__module__": module, "__qualname__": cls_name,
                                        "__doc__": f"{base_cls.__name__} for the '{tableau_name}' tableau."})
