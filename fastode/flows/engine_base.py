"""What CNF engines exchange: the solve they are asked to run (:class:`CnfSolve`), what they return
(:class:`EngineResult`, :class:`Skip`, :class:`Failed`), the record of who ran it (:class:`SolveRecord`), and the
:class:`Engine` base class. The registry and the generic engines are in :mod:`fastode.flows.engines`, the fused ones
in :mod:`fastode.flows.fused`.

The augmented state is ``(z, q)``: ``z (B, D)`` the sample and ``q (B, NQ)`` one tensor holding the log-density
change and then one column per integrand regulariser. It stays one tensor from :meth:`fastode.flows.CNF.forward` to
the kernels; only the ``"odeint"`` engine splits it, at its own boundary, into the tuple state its right-hand side
takes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from .solver import Solver

__all__ = ["CnfSolve", "EngineResult", "Skip", "Failed", "SolveRecord", "EngineUnavailableError", "Engine",
           "wants_grad", "PEER_ONLY", "PER_TILE_ONLY"]

PEER_ONLY = "the solver asks for the torchdiffeq peer (Solver(backend='torchdiffeq'))"
PER_TILE_ONLY = "per-tile step control runs only on the fused adaptive engines ('cpp_adaptive', 'triton_adaptive')"


class EngineUnavailableError(ValueError):
    """An explicitly requested CNF engine cannot run this solve (the message says why)."""


@dataclass(frozen=True)
class CnfSolve:
    """One CNF solve, as engines see it.

    ``func``: the augmented right-hand side ``(t, (z, logdet, *integrals)) -> (f, trace, *integrands)`` (it counts
    evaluations); ``x``: the initial sample ``(B, D)``; ``q0``: the initial ``(B, NQ)`` log-density change and
    integrals; ``t``: the output times; ``dynamics``: the network inside ``func``; ``e``: the Hutchinson probe (None
    for the exact trace); ``counter``: the CNF's NFE counter (an engine that does not call ``func`` ``add``s its
    evaluations there); ``allow_fused``: the CNF's ``fused_cpu`` switch; ``step_rows``: per-tile step control (only
    the fused adaptive engines run it).
    """

    func: Callable
    x: torch.Tensor
    q0: torch.Tensor
    t: torch.Tensor
    dynamics: Any
    e: Optional[torch.Tensor]
    trace: str
    integrands: tuple
    errors: tuple
    solver: Solver
    norm: Callable
    counter: Any
    allow_fused: bool = True
    step_rows: int = 0  # 0: one step size for the batch; k > 0: per-tile control in tiles of k rows

    @property
    def y0(self) -> tuple:
        """The initial state as ``func`` takes it: ``(z, logdet, *integrals)``."""
        return (self.x,) + tuple(self.q0.unbind(-1))


class EngineResult(NamedTuple):
    """What an engine returns: ``end``: ``(z, q)`` at the last output time; ``stats``: :class:`fastode.SolveStats`
    (None from torchdiffeq); ``mid``: ``(z, q)`` at the middle one of three output times (the unbiased local error's
    sample), else None; ``mlp_backend``: the MLP backend that evaluated the network (None if unknown)."""

    end: tuple
    stats: Any
    mid: Optional[tuple] = None
    mlp_backend: Optional[str] = None


class Skip(NamedTuple):
    """An engine cannot run this solve, and why."""

    reason: str


class Failed(NamedTuple):
    """An engine ran this solve and it stopped short (NaN/inf, step-size underflow, ``max_num_steps``):
    ``reason`` says what happened (and where, as far as the engine knows); ``error`` is the exception of that
    failure's class (:mod:`fastode.errors`), raised if the ``"odeint"`` re-run that
    :func:`~fastode.flows.engines.run_solve` makes to name the step or time finishes the solve after all (the engines
    round differently) and the engine was asked for by name."""

    reason: str
    error: Exception


@dataclass(frozen=True)
class SolveRecord:
    """What ran one CNF solve: ``engine``; ``skipped``: ``((engine, reason), ...)`` for the engines tried before
    it; ``stats``; ``mlp_backend``: the MLP backend that evaluated the network (the engine's result says)."""

    engine: str
    skipped: tuple = ()
    stats: Any = None
    mlp_backend: Optional[str] = None

    @property
    def reason(self) -> Optional[str]:
        """Why the engines before ``engine`` did not run (``"; "``-joined, each reason once), or None."""
        return "; ".join(dict.fromkeys(r for _, r in self.skipped)) or None

    def describe(self) -> str:
        if not self.skipped:
            return self.engine
        return f"{self.engine} (" + "; ".join(f"{n} not taken: {r}" for n, r in self.skipped) + ")"


class Engine:
    """Base class of CNF engines: ``plan(solve)`` returns a plan (anything) or a :class:`Skip`;
    ``run(solve, plan)`` returns an :class:`EngineResult`, a :class:`Skip` to decline at run time, or :class:`Failed`
    when its solve stopped short (re-run on ``"odeint"`` for the error naming the time)."""

    name: str = ""

    def plan(self, solve: CnfSolve):  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, solve: CnfSolve, plan):  # pragma: no cover - abstract
        raise NotImplementedError


def wants_grad(solve: CnfSolve) -> bool:
    """Whether this solve is differentiated: grad mode on and an input, the times, the probe or a parameter of the
    dynamics requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    if solve.x.requires_grad or solve.t.requires_grad or (solve.e is not None and solve.e.requires_grad):
        return True
    return any(p.requires_grad for p in solve.dynamics.parameters())
