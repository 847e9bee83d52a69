"""Exception classes of fastode.

Every error says what was wrong and what to do about it. torchdiffeq signals most bad input with
``AssertionError`` (and a few cases with ``ValueError``/``TypeError``); each fastode class subclasses the
matching built-in *and* ``AssertionError`` where torchdiffeq used an ``assert``, so code written for
torchdiffeq (``except AssertionError`` / ``except ValueError``) keeps catching them.

================================  ======================================  ==================================
class                              bases                                   raised for
================================  ======================================  ==================================
``FastodeError``                   ``Exception``                           (common base, never raised alone)
``InvalidTimeError``               ``ValueError``, ``AssertionError``      ``t`` not 1-D, not strictly monotone,
                                                                           not a tensor, non-finite
``TimeDtypeError``                 ``TypeError``                           ``t`` not floating point
``InvalidMethodError``             ``ValueError``                          unknown ``method``
``InvalidOptionError``             ``ValueError``, ``AssertionError``      bad option values / combinations
``InvalidStateError``              ``ValueError``, ``AssertionError``      ``y0`` of the wrong type, non-finite
                                                                           ``y0``, bad tolerances
``FuncOutputError``                ``RuntimeError``, ``AssertionError``    ``func`` returned the wrong type,
                                                                           shape or dtype
``NonFiniteError``                 ``RuntimeError``, ``AssertionError``    NaN/inf in the state or in ``func``'s
                                                                           output during the solve
``NonFiniteStateError``            ``InvalidStateError``,                  NaN/inf in ``y0``: bad input, and the
                                   ``NonFiniteError``                      solve's NaN/inf at its initial time
``StepSizeUnderflowError``         ``RuntimeError``, ``AssertionError``    adaptive step size underflow
``MaxStepsExceededError``          ``RuntimeError``, ``AssertionError``    ``max_num_steps`` reached
================================  ======================================  ==================================

``FallbackWarning`` (a ``UserWarning``) is issued, once per kind of fallback and process, when fastode
re-runs work on a slower path than the one it chose (say, a fused solve that met NaN/inf re-run on the
per-stage path so that the error can name the step); the object that ran records the same reason.
"""
from __future__ import annotations

__all__ = [
    "FastodeError", "InvalidTimeError", "TimeDtypeError", "InvalidMethodError", "InvalidOptionError",
    "InvalidStateError", "FuncOutputError", "NonFiniteError", "NonFiniteStateError", "StepSizeUnderflowError",
    "MaxStepsExceededError", "FallbackWarning", "warn_fallback_once", "STEP_FAILURE_REMEDIES",
    "STIFF_REMEDIES",
]


class FastodeError(Exception):
    """Base class of every fastode exception."""


class InvalidTimeError(FastodeError, ValueError, AssertionError):
    """The time argument ``t`` is malformed (not a 1-D tensor, not strictly monotone, non-finite)."""


class TimeDtypeError(FastodeError, TypeError):
    """``t`` is not a floating-point tensor (torchdiffeq raises ``TypeError`` here too)."""


class InvalidMethodError(FastodeError, ValueError):
    """Unknown ``method`` name."""


class InvalidOptionError(FastodeError, ValueError, AssertionError):
    """An option has a bad value, or options conflict."""


class InvalidStateError(FastodeError, ValueError, AssertionError):
    """``y0`` (or the tolerances that go with it) is malformed or non-finite."""


class FuncOutputError(FastodeError, RuntimeError, AssertionError):
    """``func(t, y)`` returned something that is not a tensor shaped like ``y``."""


class NonFiniteError(FastodeError, RuntimeError, AssertionError):
    """The state or ``func``'s output became NaN/inf during the solve."""


class NonFiniteStateError(InvalidStateError, NonFiniteError):
    """``y0`` holds NaN/inf: malformed input (``except InvalidStateError`` / ``ValueError``, as before) and the
    solution's NaN/inf at the initial time (``except NonFiniteError``, as a solve that meets NaN/inf later; a fused
    CNF engine that meets a NaN input row raises it too, through the odeint re-run)."""


class StepSizeUnderflowError(FastodeError, RuntimeError, AssertionError):
    """The adaptive step size became too small to advance time (torchdiffeq: 'underflow in dt')."""


class MaxStepsExceededError(FastodeError, RuntimeError, AssertionError):
    """The solver hit ``max_num_steps`` (torchdiffeq: 'max_num_steps exceeded')."""


class FallbackWarning(UserWarning):
    """fastode re-ran work on another path than the one it chose (see :func:`warn_fallback_once`)."""


_WARNED: set = set()


def warn_fallback_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Warn with :class:`FallbackWarning` the first time fallback ``key`` happens in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    import warnings

    warnings.warn(message + " (warned once per process)", FallbackWarning, stacklevel=stacklevel)


STEP_FAILURE_REMEDIES = (
    "Possible remedies: (1) the problem may be stiff or the vector field rough: use smoother activations "
    "(softplus/tanh/swish instead of ReLU), weight decay or a kinetic/Jacobian regulariser; (2) loosen rtol/atol; "
    "(3) set options={'min_step': ...} to force progress with a minimum step size; (4) use a fixed-step solver "
    "(method='rk4', options={'step_size': ...}); (5) check func for NaN/inf or discontinuities (use step_t/jump_t "
    "for known kinks and jumps)."
)

STIFF_REMEDIES = (
    "If the ODE is stiff (fast and slow time scales: chemical kinetics, stiff springs, large negative "
    "eigenvalues), an explicit method needs tiny steps: use an implicit solver instead, "
    "method='scipy_solver' with options={'solver': 'LSODA'} (or 'BDF', 'Radau'; gradients through gradient='adjoint')."
)
