"""Step observers: how gradient modes and dense output learn what a solve did, without reaching into it.

A solver calls every observer attached with :meth:`fastode.solvers.base.Solver.observe`:

* ``accepted(solver, step)`` after each accepted step, with an :class:`AcceptedStep`;
* ``output(solver, index, step_index)`` when output ``index`` is produced inside accepted step ``step_index``.

An observer with ``wants_error_graph = True`` makes an adaptive solver compute the error ratio with autograd on
(the global error regulariser differentiates it); otherwise the ratio is computed under ``no_grad``.

The records are what :meth:`replay` (``RKAdaptiveSolver.replay`` / ``FixedGridSolver.replay``) takes to recompute
a step exactly, so the checkpointed discrete adjoint (:mod:`fastode.grad.checkpoint`) and
:func:`fastode.odeint_dense` use the solver's own integration loop and nothing private.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

__all__ = ["AcceptedStep", "StepObserver", "Tape", "DenseRecorder", "ErrorRecorder"]


class AcceptedStep(NamedTuple):
    """One accepted step, as observers see it."""

    index: int                       # 0, 1, ... over the accepted steps of this solve
    record: object                   # replayable: a StepRecord (adaptive) or the start state (fixed grid)
    dense: object = None             # what dense output of this step needs (adaptive: a DenseStep)
    ratio: Optional[torch.Tensor] = None  # the step's error ratio (adaptive)


class StepObserver:
    """No-op base: override what you need."""

    wants_error_graph = False

    def accepted(self, solver, step: AcceptedStep) -> None:
        pass

    def output(self, solver, index: int, step_index: int) -> None:
        pass


class Tape(StepObserver):
    """Records every accepted step's replay record and which step each output fell in (checkpoint mode)."""

    def __init__(self):
        self.records: List[object] = []
        self.outputs: List[Tuple[int, int]] = []   # (output index, step index)

    def accepted(self, solver, step):
        self.records.append(step.record)

    def output(self, solver, index, step_index):
        self.outputs.append((index, step_index))


class DenseRecorder(StepObserver):
    """Keeps the dense-output data of every accepted step (:func:`fastode.odeint_dense`)."""

    def __init__(self):
        self.steps: list = []

    def accepted(self, solver, step):
        self.steps.append(step.dense)


class ErrorRecorder(StepObserver):
    """Appends each accepted step's (differentiable) error ratio to ``solver.stats.step_errors``."""

    wants_error_graph = True

    def accepted(self, solver, step):
        if step.ratio is not None:
            solver.stats.step_errors.append(step.ratio)
