"""The integer codes that Python, the Triton kernels and the C++ core exchange: each defined once, here.

* :class:`Status` -- how a fused solve stopped, each with its message and the error class ``odeint`` raises for it
  (:meth:`Status.error`);
* :data:`ACTIVATION_CODES` -- the concatsquash activations;
* :data:`RATE_CODES` -- the integrands of a CNF's extra states ``q``.

The Triton kernels and every launcher take their values from this module. The C++ core (``csrc/fastode.h``) cannot
import Python, so its enums repeat the numbers and ``tests/test_codes.py`` pins them to these through the extension
(``fastode._C.codes()``). The bottom layer: imports nothing from fastode but :mod:`fastode.errors`.
"""
from __future__ import annotations

from enum import IntEnum

from .errors import MaxStepsExceededError, NonFiniteError, STEP_FAILURE_REMEDIES, StepSizeUnderflowError

__all__ = ["Status", "ACTIVATION_CODES", "ACTIVATION_NAMES", "RATE_CODES"]


class Status(IntEnum):
    """How a fused solve (a tile of one) stopped: 0 solved; otherwise the reason it could not finish."""

    SOLVED = 0
    MAX_STEPS = 1      # max_num_steps attempts did not reach the end time
    UNDERFLOW = 2      # the step size became too small to advance time
    NONFINITE = 3      # NaN/inf: a forced step at min_step, or an underflow after a non-finite attempt
    TAPE_FULL = 4      # (per-tile Triton solve) a tile's tape of accepted steps is full: the launcher re-runs it

    @property
    def message(self) -> str:
        """What happened, as the failure messages and records say it."""
        return _MESSAGES[self]

    def error(self, where: str, rtol: float, atol: float, max_num_steps: int) -> Exception:
        """The exception ``odeint`` raises for this stop (its class, what happened, the remedies), stopped ``where``
        (e.g. "at t=0.25 in tile 1 (rows 64..127) of the per-tile solve")."""
        if self is Status.MAX_STEPS:
            return MaxStepsExceededError(
                f"max_num_steps exceeded ({max_num_steps}): {max_num_steps} step attempts did not reach the "
                f"end time; stopped {where}. If the problem genuinely needs more steps, raise "
                "options={'max_num_steps': ...}. " + STEP_FAILURE_REMEDIES)
        if self is Status.UNDERFLOW:
            return StepSizeUnderflowError(f"underflow in dt: the adaptive step size became too small to advance "
                                          f"time {where} (rtol={rtol}, atol={atol}). " + STEP_FAILURE_REMEDIES)
        if self is Status.NONFINITE:
            return NonFiniteError(f"the solution became NaN/inf {where}. " + STEP_FAILURE_REMEDIES)
        return RuntimeError(f"the fused solve stopped {where} with status {int(self)} ({self.message}; a fastode "
                            "bug: please report it)")


_MESSAGES = {
    Status.SOLVED: "solved",
    Status.MAX_STEPS: "max_num_steps was exceeded",
    Status.UNDERFLOW: "the step size underflowed",
    Status.NONFINITE: "the solution became NaN/inf",
    Status.TAPE_FULL: "the tape of accepted steps is full",
}

ACTIVATION_NAMES = ("tanh", "softplus", "elu", "swish", "identity")
"""The concatsquash activations in code order (``ACTIVATION_CODES[name]`` is the index)."""

ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATION_NAMES)}

RATE_CODES = {"-trace": 0, "trace": 1, "kinetic": 2, "jac_frob": 3}
"""Integrands of a CNF's extra states ``q``: ``"-trace"`` (the log-density change, FFJORD's sign), ``"trace"``,
``"kinetic"`` (``|f|^2``) and ``"jac_frob"`` (``sum_k |e_k^T df/dz|^2``)."""
