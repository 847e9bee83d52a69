"""CNF engines: who runs one CNF solve, chosen once per solve from an ordered registry.

A CNF solve (:class:`CnfSolve`) integrates the augmented state ``(z, log-density change, *regulariser
integrals)`` over the output times ``t``. Several engines can run it; each one says whether it can run a given
solve and, if not, why:

* ``"cpp_grid"`` / ``"cpp_adaptive"``: on the CPU, a whole fixed-grid or adaptive solve (dopri5, tsit5, bosh3;
  batch-global or per-tile step control) in one C++ call, with its exact discrete gradient;
* ``"triton_grid"`` / ``"triton_adaptive"``: on CUDA, one fused Triton launch per step (attempt) -- every stage's
  MLP and trace, the step's end and error norm, and (adaptive) the step-size controller on the device, so a solve
  reads nothing back but its record at the end, and the fused discrete adjoint as its gradient; per-tile control
  in one launch. These four are two engines (:class:`~fastode.flows.fused.FusedGridEngine`,
  :class:`~fastode.flows.fused.FusedAdaptiveEngine`) over two backends of one interface (:mod:`fastode.flows.fused`);
* ``"odeint"``: :func:`fastode.odeint` with one dynamics call per RK stage (every solve fastode supports);
* ``"torchdiffeq"``: torchdiffeq's solver, a peer for side-by-side comparisons that runs only when the solver
  asks for it (``Solver(backend="torchdiffeq")``); fastode never falls back to it.

Rules (the same as the ops layer's, :mod:`fastode.ops.registry`): with ``engine="auto"`` the engines are tried
in registry order and the first that can run, runs; one that declines at run time falls through to the next one.
Every skipped engine's reason is kept. An explicitly requested engine that cannot run raises
:class:`EngineUnavailableError` with the reason. A fused solve that stops short (NaN/inf, step-size underflow,
``max_num_steps``: :class:`Failed`) is re-run on ``"odeint"``, forced or automatic, so that the error raised is
``odeint``'s own, naming the step or time (a fused grid solve does not know its failing step). Eligibility is
derived from the method's solver class (:func:`fastode.solvers.method_info`: adaptive or not, its tableau, its
options and their defaults), never from lists of method names.

An engine returns its result as a value (:class:`EngineResult`: the end state ``(z, q)``, the middle one of three
output times when asked, the stats and the MLP backend that ran). Each solve leaves one :class:`SolveRecord`
(``CNF.last_solve``): the engine that ran, why the earlier ones did not, the :class:`fastode.SolveStats` and the MLP
backend. New engines (fused whole-step / whole-solve engines on
CUDA and CPU) plug in with :func:`register_engine`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .engine_base import (PEER_ONLY, PER_TILE_ONLY, CnfSolve, Engine, EngineResult, EngineUnavailableError, Failed,
                          Skip, SolveRecord, wants_grad)
from .fused import CppBackend, FusedAdaptiveEngine, FusedGridEngine, TritonBackend
from .solver import Solver

__all__ = [
    "CnfSolve",
    "EngineResult",
    "Skip",
    "Failed",
    "SolveRecord",
    "EngineUnavailableError",
    "Engine",
    "FusedGridEngine",
    "FusedAdaptiveEngine",
    "OdeintEngine",
    "TorchdiffeqEngine",
    "register_engine",
    "engine_names",
    "get_engine",
    "run_solve",
    "integrate",
    "wants_grad",
]


# --------------------------------------------------------------------------------------------------------
# the generic solves (also used directly for auxiliary solves, e.g. the biased local error's)

def _fastode_integrate(func, y0, t, solver: Solver, norm):
    import fastode

    options = solver.full_options()
    options["norm"] = norm
    kwargs = {}
    if solver.gradient == "adjoint":
        for name in ("adjoint_rtol", "adjoint_atol", "adjoint_options"):
            if getattr(solver, name) is not None:
                kwargs[name] = getattr(solver, name)
    sol, stats = fastode.odeint(func, y0, t, rtol=solver.rtol, atol=solver.atol, method=solver.method,
                                options=options, gradient=solver.gradient, return_stats=True, **kwargs)
    return tuple(sol), stats


def _torchdiffeq_integrate(func, y0, t, solver: Solver, norm):
    import torchdiffeq

    if solver.gradient == "checkpoint":
        raise ValueError("gradient='checkpoint' needs the fastode backend (fastode.odeint); torchdiffeq has no "
                         "checkpointed discrete adjoint. Use gradient='direct' (same gradient, more memory).")
    options = solver.full_options()
    options["norm"] = norm
    common = dict(rtol=solver.rtol, atol=solver.atol, method=solver.method, options=options)
    if solver.gradient == "adjoint":
        kwargs = {}
        if solver.adjoint_rtol is not None:
            kwargs["adjoint_rtol"] = solver.adjoint_rtol
        if solver.adjoint_atol is not None:
            kwargs["adjoint_atol"] = solver.adjoint_atol
        if solver.adjoint_options is not None:
            kwargs["adjoint_options"] = dict(solver.adjoint_options)
        sol = torchdiffeq.odeint_adjoint(func, y0, t, **common, **kwargs)
    else:
        sol = torchdiffeq.odeint(func, y0, t, **common)
    return tuple(sol), None


def integrate(func, y0: tuple, t: torch.Tensor, solver: Solver, norm: Callable):
    """Integrate the tuple state ``y0`` over the 1-D times ``t`` with the generic engine the solver names
    (``"odeint"``, or the ``"torchdiffeq"`` peer). Returns ``(trajectory, stats)``."""
    run = _torchdiffeq_integrate if solver.backend == "torchdiffeq" else _fastode_integrate
    return run(func, y0, t, solver, norm)


def _trajectory_result(solve: CnfSolve, trajectory: tuple, stats) -> EngineResult:
    """An :class:`EngineResult` from a generic engine's trajectory of the tuple state ``(z, logdet, *integrals)``:
    ``q`` stacked back into one tensor at the end (and at the middle one of three output times)."""
    def at(i):
        return trajectory[0][i], torch.stack([s[i] for s in trajectory[1:]], -1)

    mid = at(1) if len(solve.t) == 3 else None
    return EngineResult(at(-1), stats, mid, getattr(solve.func, "mlp_backend", None))


class OdeintEngine(Engine):
    """:func:`fastode.odeint` on the augmented state: any method, gradient mode, trace and regulariser."""

    name = "odeint"

    def plan(self, solve):
        if solve.step_rows:
            return Skip(PER_TILE_ONLY)
        return Skip(PEER_ONLY) if solve.solver.backend == "torchdiffeq" else None

    def run(self, solve, plan):
        return _trajectory_result(solve, *_fastode_integrate(solve.func, solve.y0, solve.t, solve.solver, solve.norm))


class TorchdiffeqEngine(Engine):
    """torchdiffeq's solver: a peer for comparisons, only when chosen (``Solver(backend="torchdiffeq")``)."""

    name = "torchdiffeq"

    def plan(self, solve):
        if solve.solver.backend != "torchdiffeq":
            return Skip("torchdiffeq runs only when the solver asks for it (Solver(backend='torchdiffeq'))")
        return Skip(PER_TILE_ONLY) if solve.step_rows else None

    def run(self, solve, plan):
        return _trajectory_result(solve, *_torchdiffeq_integrate(solve.func, solve.y0, solve.t, solve.solver,
                                                                 solve.norm))


# --------------------------------------------------------------------------------------------------------
# the registry

_CPP, _TRITON = CppBackend(), TritonBackend()
_ENGINES: list = [FusedGridEngine(_CPP), FusedAdaptiveEngine(_CPP), FusedGridEngine(_TRITON),
                  FusedAdaptiveEngine(_TRITON), OdeintEngine(), TorchdiffeqEngine()]


def register_engine(engine: Engine, before: Optional[str] = None) -> None:
    """Add ``engine`` to the registry (replacing one of the same name), ahead of ``before`` or last."""
    if not engine.name:
        raise ValueError("an engine needs a name")
    _ENGINES[:] = [e for e in _ENGINES if e.name != engine.name]
    names = [e.name for e in _ENGINES]
    if before is None:
        _ENGINES.append(engine)
    elif before not in names:
        raise ValueError(f"unknown engine {before!r}; registered: {names}")
    else:
        _ENGINES.insert(names.index(before), engine)


def engine_names() -> tuple:
    """Registered engine names in the order ``engine="auto"`` tries them."""
    return tuple(e.name for e in _ENGINES)


def get_engine(name: str) -> Engine:
    for e in _ENGINES:
        if e.name == name:
            return e
    raise ValueError(f"unknown CNF engine {name!r}; choose 'auto' or one of {list(engine_names())}")


def run_solve(solve: CnfSolve, engine: str = "auto", started: Optional[Callable] = None):
    """Run ``solve`` on ``engine`` (a name, or ``"auto"``: the first eligible one). ``(EngineResult, SolveRecord)``.

    ``started(record)`` is called before an engine runs, so that a solve that raises still says who ran it.
    """
    candidates = list(_ENGINES) if engine == "auto" else [get_engine(engine)]
    skipped = []
    for eng in candidates:
        plan = eng.plan(solve)
        if not isinstance(plan, Skip) and started is not None:
            started(SolveRecord(eng.name, tuple(skipped)))
        result = plan if isinstance(plan, Skip) else eng.run(solve, plan)
        if isinstance(result, Failed):
            return _rerun_failed(solve, eng.name, result, tuple(skipped), engine == "auto", started)
        if isinstance(result, Skip):
            if engine != "auto":
                raise EngineUnavailableError(f"CNF engine {eng.name!r} cannot run this solve: {result.reason}. "
                                             f"Use engine='auto' to let an eligible engine run it.")
            skipped.append((eng.name, result.reason))
            continue
        return result, SolveRecord(eng.name, tuple(skipped), result.stats, result.mlp_backend)
    raise EngineUnavailableError("no CNF engine can run this solve: "
                                 + "; ".join(f"{n}: {r}" for n, r in skipped))


def _rerun_failed(solve: CnfSolve, name: str, failed: Failed, skipped: tuple, auto: bool,
                  started: Optional[Callable]):
    """Engine ``name``'s solve stopped short: re-run it on ``"odeint"``, whose own error (the same class) names the
    step or time, whether the engine was chosen automatically or by name. Should ``"odeint"`` finish it (the engines
    round differently), ``engine="auto"`` takes its result and a named engine raises ``failed.error``."""
    from fastode.errors import warn_fallback_once

    warn_fallback_once(f"cnf-{name}-failed", f"CNF: {failed.reason}; re-running the solve on the odeint engine, "
                       "whose error names the step or time")
    skipped = skipped + ((name, failed.reason),)
    odeint = get_engine("odeint")
    plan = odeint.plan(solve)
    if isinstance(plan, Skip):
        raise failed.error
    if started is not None:
        started(SolveRecord(odeint.name, skipped))
    result = odeint.run(solve, plan)
    if not auto:
        raise failed.error
    return result, SolveRecord(odeint.name, skipped, result.stats, result.mlp_backend)
