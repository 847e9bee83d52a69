"""CNF engines: who runs one CNF solve, chosen once per solve from an ordered registry.

A CNF solve (:class:`CnfSolve`) integrates the augmented state ``(z, log-density change, *regulariser
integrals)`` over the output times ``t``. Several engines can run it; each one says whether it can run a given
solve and, if not, why:

* ``"cpp_grid"``: the whole fixed-grid solve in one C++ call and one backward (:class:`fastode.cpp.CnfStepper`),
  for solves it computes identically to ``"odeint"`` (see :class:`CppGridEngine`);
* ``"cpp_adaptive"``: a whole adaptive solve (dopri5, tsit5, bosh3) in one C++ call with batch-global step control,
  with its exact discrete gradient (a checkpointed discrete adjoint; see :class:`CppAdaptiveEngine`);
* ``"triton_grid"`` / ``"triton_adaptive"``: on CUDA, one fused Triton launch per step (attempt) -- every stage's
  MLP and trace, the step's end and error norm, and (adaptive) the step-size controller on the device, so a solve
  reads nothing back but its record at the end, and the fused discrete adjoint as its gradient (see
  :class:`TritonAdaptiveEngine`); per-tile control in one launch;
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

Each solve leaves one :class:`SolveRecord` (``CNF.last_solve``): the engine that ran, why the earlier ones did
not, the :class:`fastode.SolveStats` and the MLP backend. New engines (fused whole-step / whole-solve engines on
CUDA and CPU) plug in with :func:`register_engine`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from ..codes import ACTIVATION_CODES, RATE_CODES, Status
from ..compiling import check, host_floats
from . import regularizers as R
from .solver import Solver

__all__ = [
    "CnfSolve",
    "EngineResult",
    "Skip",
    "Failed",
    "SolveRecord",
    "EngineUnavailableError",
    "Engine",
    "CppGridEngine",
    "CppAdaptiveEngine",
    "TritonGridEngine",
    "TritonAdaptiveEngine",
    "OdeintEngine",
    "TorchdiffeqEngine",
    "register_engine",
    "engine_names",
    "get_engine",
    "run_solve",
    "integrate",
]


class EngineUnavailableError(ValueError):
    """An explicitly requested CNF engine cannot run this solve (the message says why)."""


@dataclass(frozen=True)
class CnfSolve:
    """One CNF solve, as engines see it.

    ``func``: the augmented right-hand side ``(t, state) -> (f, trace, *integrands)`` (it counts evaluations);
    ``y0``: the initial augmented state; ``dynamics``: the network inside ``func``; ``e``: the Hutchinson probe
    (None for the exact trace); ``counter``: the CNF's NFE counter (an engine that does not call ``func`` ``add``s its
    evaluations there); ``allow_fused``: the CNF's ``fused_cpu`` switch; ``step_rows``: per-tile step control (only the
    fused adaptive engine runs it).
    """

    func: Callable
    y0: tuple
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
    step_rows: int = 0  # 0: one step size for the batch; k > 0: per-tile control, tiles of k rows (the CNF's step_control)

    @property
    def x(self) -> torch.Tensor:
        return self.y0[0]


class EngineResult(NamedTuple):
    """``trajectory``: the augmented state at every output time (tuple of ``(len(t), ...)`` tensors); ``stats``:
    :class:`fastode.SolveStats` (None from torchdiffeq)."""

    trajectory: tuple
    stats: Any


class Skip(NamedTuple):
    """An engine cannot run this solve, and why."""

    reason: str


class Failed(NamedTuple):
    """An engine ran this solve and it stopped short (NaN/inf, step-size underflow, ``max_num_steps``):
    ``reason`` says what happened (and where, as far as the engine knows); ``error`` is the exception of that
    failure's class (:mod:`fastode.errors`), raised if the ``"odeint"`` re-run that :func:`run_solve` makes to name
    the step or time finishes the solve after all (the engines round differently) and the engine was asked for by
    name."""

    reason: str
    error: Exception


@dataclass(frozen=True)
class SolveRecord:
    """What ran one CNF solve: ``engine``; ``skipped``: ``((engine, reason), ...)`` for the engines tried before
    it; ``stats``; ``mlp_backend``: the dynamics' ``last_backend`` after the solve (None if it has none)."""

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


_PEER_ONLY = "the solver asks for the torchdiffeq peer (Solver(backend='torchdiffeq'))"
_PER_TILE = "per-tile step control runs only on the fused adaptive engines ('cpp_adaptive', 'triton_adaptive')"


class OdeintEngine(Engine):
    """:func:`fastode.odeint` on the augmented state: any method, gradient mode, trace and regulariser."""

    name = "odeint"

    def plan(self, solve):
        if solve.step_rows:
            return Skip(_PER_TILE)
        return Skip(_PEER_ONLY) if solve.solver.backend == "torchdiffeq" else None

    def run(self, solve, plan):
        return EngineResult(*_fastode_integrate(solve.func, solve.y0, solve.t, solve.solver, solve.norm))


class TorchdiffeqEngine(Engine):
    """torchdiffeq's solver: a peer for comparisons, only when chosen (``Solver(backend="torchdiffeq")``)."""

    name = "torchdiffeq"

    def plan(self, solve):
        if solve.solver.backend != "torchdiffeq":
            return Skip("torchdiffeq runs only when the solver asks for it (Solver(backend='torchdiffeq'))")
        return Skip(_PER_TILE) if solve.step_rows else None

    def run(self, solve, plan):
        return EngineResult(*_torchdiffeq_integrate(solve.func, solve.y0, solve.t, solve.solver, solve.norm))


# --------------------------------------------------------------------------------------------------------
# the fused C++ grid solve

class _GridPlan(NamedTuple):
    tableau: Any
    step_size: Optional[float]
    rates: tuple            # stepper rate names: "trace", then one per integrand regulariser
    check_finite: bool


def _same_option(value, default) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:
        return False


def _fused_cpp_common(solve: CnfSolve, allow_no_trace: bool = False):
    """What both fused C++ engines need of a solve: the C++ extension, a float CPU input, a trace (or, with
    ``allow_no_trace``, none), no error regularisers, kinetic / Jacobian-Frobenius integrands only, not the
    torchdiffeq peer, a plain C++-backed ``ConcatSquashMLP``. Returns the stepper's rate names or a :class:`Skip`."""
    if not solve.allow_fused:
        return Skip("fused_cpu is off")
    try:
        import fastode.cpp as fc
    except Exception as exc:  # pragma: no cover
        return Skip(f"fastode.cpp is not importable ({exc})")
    if not fc.available():
        return Skip("the C++ extension is not built")
    x = solve.x
    if x.device.type != "cpu":
        return Skip(f"the input is on {x.device}")
    if x.dtype not in (torch.float32, torch.float64):
        return Skip(f"the input is {x.dtype}")
    if solve.trace not in ("hutchinson", "exact") and not (allow_no_trace and solve.trace == "none"):
        return Skip(f"trace={solve.trace!r}")
    rates = _fused_rates(solve)
    if isinstance(rates, Skip):
        return rates
    why = _why_not_fused_dynamics(solve.dynamics, x, "cpp")
    return Skip(why) if why is not None else rates


def _fused_rates(solve: CnfSolve):
    """The fused steppers' q rate names for a solve ("trace" unless trace="none", then "kinetic" / "jac_frob" per
    integrand), or a :class:`Skip`: error regularisers, another integrand, the torchdiffeq peer."""
    if solve.errors:
        return Skip("error-estimate regularisers")
    rates = [] if solve.trace == "none" else ["trace"]
    for r in solve.integrands:
        if isinstance(r, R.KineticEnergy):
            rates.append("kinetic")
        elif isinstance(r, R.JacobianFrobenius) and solve.trace == "hutchinson":
            rates.append("jac_frob")
        else:
            return Skip(f"regulariser {r.name!r} with trace={solve.trace!r}")
    if solve.solver.backend == "torchdiffeq":
        return Skip(_PEER_ONLY)
    return tuple(rates)


def _why_not_fused_dynamics(dyn, x, backend: str) -> Optional[str]:
    """Why a fused engine of MLP backend ``backend`` cannot evaluate ``dyn`` on ``x`` (None if it can)."""
    from fastode.nn import ConcatSquashMLP
    from fastode.nn import backends as nn_backends

    if type(dyn) is not ConcatSquashMLP:
        return f"the dynamics is a {type(dyn).__name__}, not a plain ConcatSquashMLP"
    if dyn._forward_hooks or dyn._forward_pre_hooks:
        return "the dynamics has forward hooks"
    for layer in dyn.params():
        for p in layer:
            if p.dtype != x.dtype or p.device != x.device:
                return f"an MLP parameter is {p.dtype} on {p.device}, the input {x.dtype} on {x.device}"
    t0 = torch.zeros((), dtype=x.dtype, device=x.device)
    try:
        name = nn_backends.resolve_backend_name(dyn.backend, x.device, (t0, x, dyn.params(), dyn.activation))
    except ValueError as exc:
        return f"the MLP backend cannot be resolved ({exc})"
    if name != backend:
        return f"the MLP backend resolves to {name!r}, not {backend!r}"
    return None


def _grid_options(solver: Solver, info, handled):
    """``(step_size or None, check_finite)`` of a fixed-grid solve, or a :class:`Skip` (an option other than
    ``handled`` off its default, a step size that is not a positive finite number)."""
    why = _options_at_defaults(solver, info, handled)
    if why is not None:
        return Skip(why)
    opts = solver.full_options()
    h = opts.get("step_size")
    if h is not None:
        try:
            h = float(h.item() if isinstance(h, torch.Tensor) else h)
        except (TypeError, ValueError, RuntimeError):
            return Skip(f"step_size {h!r}")
        if not (h > 0 and math.isfinite(h)):
            return Skip(f"step_size {h!r}")
    return h, bool(opts.get("check_finite", True))


def _fsal_tableau(solver: Solver, info):
    """The tableau the fused adaptive engines run (explicit, FSAL, an error estimate and torchdiffeq's midpoint
    weights: dopri5, tsit5, bosh3), or a :class:`Skip`."""
    tab = info.rk_tableau
    if not info.adaptive or tab is None:
        return Skip(f"method {solver.method!r} is not an adaptive one-step RK method")
    if not tab.fsal or tab.b_err is None or tab.c_mid is None:
        return Skip(f"method {solver.method!r}: this engine runs FSAL tableaus with an error estimate and "
                    "midpoint weights (dopri5, tsit5, bosh3)")
    return tab


def _controller_options(solver: Solver, info, handled):
    """The fused adaptive engines' controller settings as floats (``rtol``, ``atol``, ``safety``, ``ifactor``,
    ``dfactor``, ``min_step``, ``max_step``, ``first_step`` or None, ``max_num_steps``), or a :class:`Skip` (an option
    other than ``handled`` off its default, a value that is not a number)."""
    why = _options_at_defaults(solver, info, handled)
    if why is not None:
        return Skip(why)
    opts = {**info.options, **solver.full_options()}
    try:
        return dict(rtol=float(solver.rtol), atol=float(solver.atol),
                    **{k: float(opts[k]) for k in ("safety", "ifactor", "dfactor", "min_step", "max_step")},
                    first_step=None if opts["first_step"] is None else float(opts["first_step"]),
                    max_num_steps=int(opts["max_num_steps"]))
    except (TypeError, ValueError) as exc:
        return Skip(f"solver options ({exc})")


def _options_at_defaults(solver: Solver, info, handled) -> Optional[str]:
    """Why not, if a solver option outside ``handled`` differs from the method's default."""
    for key, value in solver.full_options().items():
        if key in handled:
            continue
        if key not in info.options:
            return f"solver option {key!r} (not an option of {solver.method!r})"
        if not _same_option(value, info.options[key]):
            return f"solver option {key}={value!r} (this engine runs {key}={info.options[key]!r})"
    return None


_UNDER_COMPILE = ("under torch.compile with a gradient (the fused adaptive solve's tape has a data-dependent length; "
                  "without a gradient it is one custom op): odeint's per-stage path traces, one custom op per "
                  "network evaluation, a graph break per step attempt")


def _fused_method_info(solve: CnfSolve):
    """The solver's :class:`~fastode.solvers.MethodInfo`, or a :class:`Skip` (fused CPU engines off, unknown method):
    the cheap checks a fused C++ engine makes first."""
    if not solve.allow_fused:
        return Skip("fused_cpu is off")
    return _method_info(solve)


def _method_info(solve: CnfSolve):
    """The solver's :class:`~fastode.solvers.MethodInfo`, or a :class:`Skip` naming why not."""
    from fastode.solvers import method_info

    try:
        return method_info(solve.solver.method)
    except Exception as exc:
        return Skip(f"method {solve.solver.method!r}: {exc}")


class CppGridEngine(Engine):
    """A whole fixed-grid solve in one C++ call (:meth:`fastode.cpp.CnfStepper.solve`) and one backward.

    It runs exactly the solves it computes identically to ``"odeint"`` (same grid, stage times, probes and
    integrands; values, gradients incl. dL/dT, NFE and stats agree): the CNF's ``fused_cpu`` switch on and the
    C++ extension built; a float32/float64 CPU input; a plain :class:`fastode.nn.ConcatSquashMLP` (exact type, no
    forward hooks, parameters of the input's dtype and device) whose backend resolves to ``"cpp"``; a fixed-grid
    method whose every step is one explicit RK step (its solver class has a tableau and is not multistep),
    ``gradient="direct"``, every option but ``step_size``/``check_finite`` at its default; the Hutchinson or exact
    trace; kinetic energy and (Hutchinson trace only: with the exact trace the stepper's rate is the full
    Frobenius norm, not the probe estimate odeint integrates) Jacobian-Frobenius integrands; no error
    regularisers. The fused backward is once-differentiable (no double backward).

    ``check_finite`` (default on): a non-finite result is a :class:`Failed` solve: ``"odeint"`` re-runs it and
    raises :class:`~fastode.errors.NonFiniteError` naming the step; the re-run is warned once
    (:class:`~fastode.errors.FallbackWarning`) and recorded.
    """

    name = "cpp_grid"
    _HANDLED_OPTIONS = ("step_size", "check_finite")

    def plan(self, solve):
        solver = solve.solver
        info = _fused_method_info(solve)
        if isinstance(info, Skip):
            return info
        if info.adaptive or not info.fixed_grid:
            return Skip(f"method {solver.method!r} is adaptive; this engine runs fixed grids")
        if solve.step_rows:
            return Skip(_PER_TILE)
        if info.rk_tableau is None:
            return Skip(f"method {solver.method!r} is not a one-step explicit RK method")
        rates = _fused_cpp_common(solve)
        if isinstance(rates, Skip):
            return rates
        if solver.gradient != "direct":
            return Skip(f"gradient={solver.gradient!r}")
        grid = _grid_options(solver, info, self._HANDLED_OPTIONS)
        if isinstance(grid, Skip):
            return grid
        h, check_finite = grid
        return _GridPlan(info.rk_tableau, h, rates, check_finite)

    def run(self, solve, plan: _GridPlan):
        import fastode.cpp as fc
        from fastode.solvers.fixed_grid import step_size_grid
        from fastode.stats import SolveStats

        x, t, dyn = solve.x, solve.t, solve.dynamics
        grid = t if plan.step_size is None else step_size_grid(t, plan.step_size)
        stepper = fc.CnfStepper(dyn, plan.tableau, rates=plan.rates, backend="cpp")
        q0 = torch.stack(solve.y0[1:], -1)       # (B, 1 + integrands) initial log-density and integrals
        zT, qT = stepper.solve(grid, x, q0, solve.e if solve.trace == "hutchinson" else None)
        if plan.check_finite and torch.compiler.is_compiling():  # no re-run inside a graph: an in-graph check
            from fastode.errors import NonFiniteError

            check(torch.isfinite(zT).all() & torch.isfinite(qT).all(), lambda: NonFiniteError(
                "the fused C++ grid solve produced NaN/inf (run it eagerly to have the step named)"))
        elif plan.check_finite and not bool(torch.isfinite(zT).all() and torch.isfinite(qT).all()):
            return _grid_failure("the fused C++ grid solve")
        dyn.last_backend = "cpp"
        g = host_floats(grid.detach())
        n = len(g) - 1
        nfe = len(plan.tableau.c) * n
        solve.counter.add(nfe)
        stats = SolveStats(num_fevals=nfe, num_steps=n, num_accepted_steps=n, step_ts=g[:-1],
                           step_sizes=[b - a for a, b in zip(g[:-1], g[1:])], method=solve.solver.method)
        ends = (zT,) + tuple(qT.unbind(-1))
        trajectory = tuple(torch.stack([a, b]) for a, b in zip(solve.y0, ends))
        return EngineResult(trajectory, stats)


# --------------------------------------------------------------------------------------------------------
# the fused C++ adaptive solve

class _AdaptivePlan(NamedTuple):
    tableau: Any
    rates: tuple
    ctl: list               # rtol, atol, safety, ifactor, dfactor, min_step, max_step, first_step (0: heuristic)
    max_num_steps: int


#: gradient="direct" on the fused adaptive engine keeps each accepted step's activations (up to this many bytes per
#: solve; later steps are recomputed as with "checkpoint"): the same gradient without the backward's recomputation
#: of the forward (1.1-1.2x a training iteration). "checkpoint" keeps only the step starts. The buffers come from the
#: C++ core's buffer pool, reused between solves (fresh pages cost as much as the saving; ``fastode.cpp.empty_cache``).
STORED_STEPS_BYTES = 1 << 30


def _tile_failure(st: dict, tile: int, rows: int, B: int, rtol: float, atol: float, max_num_steps: int) -> Exception:
    """The error ``odeint`` raises for the same failure (its class, the time, the remedies), for tile ``tile`` of a
    per-tile solve: each tile is its own batch-global problem, so this is what ``odeint`` on its rows would raise."""
    where = (f"at t={st['t_status']:.6g} in tile {tile} (rows {tile * rows}..{min(B, (tile + 1) * rows) - 1}) of the "
             "per-tile solve")
    return Status(st["status"]).error(where, rtol, atol, max_num_steps)


def _adaptive_failure(what: str, status: int, t_status: float, rtol: float, atol: float,
                      max_num_steps: int) -> Failed:
    """:class:`Failed` for a batch-global fused adaptive solve (``what``: "the fused adaptive C++ solve") that
    stopped with ``status`` at ``t_status``."""
    st = Status(status)
    return Failed(f"{what} stopped at t={t_status:.6g} ({st.message})",
                  st.error(f"at t={t_status:.6g} in {what}", rtol, atol, max_num_steps))


def _grid_failure(what: str) -> Failed:
    """:class:`Failed` for a fused grid solve (``what``: "the fused C++ grid solve") whose result is NaN/inf; it does
    not know the step (the ``"odeint"`` re-run names it)."""
    from fastode.errors import NonFiniteError

    reason = f"{what} produced NaN/inf"
    return Failed(reason, NonFiniteError(f"{reason} (a grid solve does not record which step; the odeint engine "
                                         "finished the same solve: the engines round differently)"))


def _wants_grad(solve: CnfSolve) -> bool:
    if not torch.is_grad_enabled():
        return False
    if solve.x.requires_grad or solve.t.requires_grad or (solve.e is not None and solve.e.requires_grad):
        return True
    return any(p.requires_grad for p in solve.dynamics.parameters())


def _mean_tile_stats(tiles, B: int, rows: int) -> dict:
    """Per-tile counts as one record: the row-weighted mean NFE / steps (what a row costs on average), no step grid
    (each tile has its own)."""
    weights = [min(rows, B - i * rows) / B for i in range(len(tiles))]
    mean = {k: int(round(sum(w * t_[k] for w, t_ in zip(weights, tiles)))) for k in ("nfe", "steps", "accepted",
                                                                                    "rejected")}
    return {"status": 0, "t_status": 0.0, **mean, "step_ts": [], "step_sizes": []}


class CppAdaptiveEngine(Engine):
    """A whole adaptive solve in one C++ call (``fastode._C.cnf_adaptive_forward``), batch-global step control.

    torchdiffeq's semantics, as the ``odeint`` engine: the Hairer-Norsett-Wanner first step, the integral controller
    (``safety``, ``ifactor``, ``dfactor``, ``min_step``, ``max_step``, ``first_step``, ``max_num_steps`` honoured), the
    CNF's norm (max of the RMS of ``z`` and of the log-density; integrals do not steer), overshoot and the quartic
    interpolation at the end time. Same steps and NFE as ``odeint`` (float64: the same values to rounding; float32:
    the C++ sums round differently, so values agree to the solve's tolerance and a borderline step could go the other
    way). Gradients: the exact gradient of the discrete solve (``gradient="direct"`` or ``"checkpoint"``, the same
    gradient; step sizes are constants) as a discrete adjoint in C++ -- the forward records each accepted step's
    start, the backward walks the steps in reverse (incl. dL/dT, the probes and every parameter); once
    differentiable. With ``"checkpoint"`` it recomputes each step's stages from its start (memory: the step starts
    and one step's working set); with ``"direct"`` the forward also keeps each step's activations (up to
    :data:`STORED_STEPS_BYTES`), so the backward skips that recomputation -- the same gradient, bitwise.
    Eligible: what the grid engine needs of the dynamics, an FSAL tableau with an error estimate and
    torchdiffeq's midpoint weights (dopri5, tsit5, bosh3), the other options at their defaults, two output times,
    ``gradient="direct"`` or ``"checkpoint"`` when a gradient is wanted. With ``"checkpoint"`` the backward's
    network evaluations are counted as odeint's checkpoint mode counts them (``nfe``, ``num_fevals_backward``):
    ``s - 1`` per accepted step and one for the first stage (odeint's checkpoint recomputes ``s`` per step).
    Per-tile step control (``CNF(step_control="per_tile", step_rows=k)``; ``k = 1``: every row; opt-in and not
    bit-identical to torchdiffeq): each tile of ``k`` rows is solved as its own batch-global problem (its own step
    size, accept/reject, status and norm over its rows) in parallel over the threads, one thread per tile (the result
    does not depend on the thread count), and differentiated the same way (parameter gradients summed in tile
    order). Its stats are the row-weighted mean counts; ``stats.tiles`` holds each tile's.
    A solve the C++ loop cannot finish (``max_num_steps``, step-size underflow, NaN/inf) is :class:`Failed`: ``odeint``
    re-runs it (forced or automatic) and raises its error naming the time; that re-run is warned once. Per tile (no
    other engine can re-run it) the engine raises the error class ``odeint`` raises (``MaxStepsExceededError``,
    ``StepSizeUnderflowError``, ``NonFiniteError``) naming the time, the tile and its rows.
    """

    name = "cpp_adaptive"
    _HANDLED_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "max_num_steps")

    def plan(self, solve):
        solver = solve.solver
        info = _fused_method_info(solve)
        if isinstance(info, Skip):
            return info
        if torch.compiler.is_compiling() and _wants_grad(solve):  # the tape's length is data-dependent
            return Skip(_UNDER_COMPILE)
        tab = _fsal_tableau(solver, info)
        if isinstance(tab, Skip):
            return tab
        rates = _fused_cpp_common(solve, allow_no_trace=True)
        if isinstance(rates, Skip):
            return rates
        if len(solve.t) != 2:
            return Skip("more than two output times")
        if _wants_grad(solve) and solver.gradient not in ("direct", "checkpoint"):
            return Skip(f"gradient={solver.gradient!r} (the fused adaptive solve's gradient is the discrete one)")
        opts = _controller_options(solver, info, self._HANDLED_OPTIONS)
        if isinstance(opts, Skip):
            return opts
        ctl = [opts[k] for k in ("rtol", "atol", "safety", "ifactor", "dfactor", "min_step", "max_step")]
        ctl.append(0.0 if opts["first_step"] is None else opts["first_step"])
        return _AdaptivePlan(tab, rates, ctl, opts["max_num_steps"])

    def run(self, solve, plan: _AdaptivePlan):
        from fastode.cpp import _dispatch
        from fastode.cpp._rk import _tableau_lists, cnf_adaptive_solve
        from fastode.stats import SolveStats

        x, t, dyn = solve.x, solve.t, solve.dynamics
        tab = plan.tableau
        with torch.enable_grad():  # views that carry the parameters' gradients
            layers = dyn.params()
        params = [p for layer in layers for p in layer]
        B = x.shape[0]
        if plan.rates:
            q0, e = torch.stack(solve.y0[1:], -1), solve.e if solve.trace == "hutchinson" else None
        else:  # trace "none" (sampling): no q columns; the kernels still take a probe, a zero one is the cheapest
            q0, e = x.new_zeros(B, 0), x.new_zeros(x.shape)
        ctl = list(plan.ctl)
        if solve.solver.gradient == "direct" and _wants_grad(solve):  # keep step activations: no recomputation
            tiles = -(-B // solve.step_rows) if solve.step_rows else 1
            ctl.append(float(STORED_STEPS_BYTES // x.element_size() // tiles))
        run = {"act": ACTIVATION_CODES[dyn.activation], "rates": [RATE_CODES[r] for r in plan.rates],
               "tableau": _tableau_lists(tab), "c_mid": [float(v) for v in tab.c_mid], "ctl": ctl,
               "max_num_steps": plan.max_num_steps, "order": int(tab.order), "time_f32": t.dtype == torch.float32,
               "tile": _dispatch.mlp_tile_rows(B, layers), "step_rows": int(solve.step_rows)}
        if torch.compiler.is_compiling():  # no gradient (plan): one custom op, its counts stay in the graph
            return self._run_compiled(solve, plan, run, t, x, q0, e, params)
        zT, qT = cnf_adaptive_solve(t, x, q0, e, params, run)
        st = run["stats"]
        tiles = None
        if isinstance(st, list):  # per tile: a failed tile fails the solve; the counts are per row on average
            tiles = st
            st = next((s_ for s_ in tiles if s_["status"]), None) or _mean_tile_stats(tiles, B, solve.step_rows)
        if st["status"] and tiles is not None:  # no other engine runs per-tile control: raise odeint's error here
            i = next(k for k, s_ in enumerate(tiles) if s_["status"])
            raise _tile_failure(st, i, solve.step_rows, B, plan.ctl[0], plan.ctl[1], plan.max_num_steps)
        if st["status"]:
            return _adaptive_failure("the fused adaptive C++ solve", st["status"], st["t_status"], plan.ctl[0],
                                     plan.ctl[1], plan.max_num_steps)
        dyn.last_backend = "cpp"
        solve.counter.add(st["nfe"])
        stats = SolveStats(num_fevals=st["nfe"], num_steps=st["steps"], num_accepted_steps=st["accepted"],
                           num_rejected_steps=st["rejected"], step_ts=list(st["step_ts"]),
                           step_sizes=list(st["step_sizes"]), method=solve.solver.method)
        if tiles is not None:
            stats.tiles = tiles  # every tile's own counts, steps and status
        if solve.solver.gradient == "checkpoint":  # as odeint's checkpoint mode: the backward's evaluations count
            def count_backward(n, counter=solve.counter, stats=stats):
                counter.add(n)
                stats.num_fevals_backward += n
            run["count_backward"] = count_backward
        ends = (zT,) + (tuple(qT.unbind(-1)) if plan.rates else (solve.y0[1],))
        trajectory = tuple(torch.stack([a0, b1]) for a0, b1 in zip(solve.y0, ends))
        return EngineResult(trajectory, stats)

    def _run_compiled(self, solve, plan, run, t, x, q0, e, params):
        from fastode.cpp import _ops
        from fastode.stats import SolveStats

        t0, t1 = host_floats(t.detach())
        c, a, b, b_err = run["tableau"]
        zT, qT, counts = _ops.cpp_cnf_adaptive(x, q0, e, params, t0, t1, run["act"], run["rates"], c, a, b, b_err,
                                               run["c_mid"], run["ctl"], run["max_num_steps"], run["order"],
                                               run["time_f32"], run["step_rows"], run["tile"])
        check(counts[0] == 0, lambda: RuntimeError(
            "the fused adaptive CNF solve stopped (max_num_steps exceeded, step-size underflow or NaN/inf); call it "
            "eagerly for the error naming the time"))
        solve.dynamics.last_backend = "cpp"
        # the counts are data-dependent: they stay in the graph (stats.counts), not in SolveStats' integers
        stats = SolveStats(method=solve.solver.method)
        stats.counts = dict(zip(_ops._COUNTS, counts.unbind()))
        ends = (zT,) + (tuple(qT.unbind(-1)) if plan.rates else (solve.y0[1],))
        return EngineResult(tuple(torch.stack([a0, b1]) for a0, b1 in zip(solve.y0, ends)), stats)


# --------------------------------------------------------------------------------------------------------
# the fused Triton solves (CUDA; the CPU under TRITON_INTERPRET=1 when the MLP backend is "triton" explicitly)

def _fused_triton_common(solve: CnfSolve):
    """What both fused Triton engines need of a solve: a float CUDA input (or the CPU under the Triton interpreter),
    Triton importable, a trace or none, kinetic / Jacobian-Frobenius integrands only, no error regularisers, the
    CNF's state norm, a plain ConcatSquashMLP whose backend resolves to "triton"; with a gradient ``"direct"`` or
    ``"checkpoint"`` (the fused discrete adjoint), no gradient w.r.t. the probe, not under torch.compile. Returns
    ``(rates, nq_norm)`` or a :class:`Skip`."""
    x = solve.x
    if x.dtype not in (torch.float32, torch.float64):
        return Skip(f"the input is {x.dtype}")
    interpreted = x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if x.device.type != "cuda" and not interpreted:  # (checked first: CPU solves never import Triton here)
        return Skip(f"the input is on {x.device} (the fused Triton solves run on CUDA)")
    try:
        import fastode.kernels.cnf_solve  # noqa: F401
    except Exception as exc:  # triton is optional
        return Skip(f"the Triton kernels are not importable ({exc})")
    if solve.trace not in ("hutchinson", "exact", "none"):
        return Skip(f"trace={solve.trace!r}")
    rates = _fused_rates(solve)
    if isinstance(rates, Skip):
        return rates
    controlled = getattr(solve.norm, "num_controlled", None)
    if controlled is None:
        return Skip("the norm is not the CNF's state norm")
    why = _why_not_fused_dynamics(solve.dynamics, x, "triton")
    if why is not None:
        return Skip(why)
    if _wants_grad(solve):
        if solve.solver.gradient not in ("direct", "checkpoint"):
            return Skip(f"gradient={solve.solver.gradient!r} (the fused Triton solves' gradient is the discrete one: "
                        "'direct' or 'checkpoint')")
        if solve.e is not None and solve.e.requires_grad:
            return Skip("the Hutchinson probe requires a gradient")
        if torch.compiler.is_compiling():
            return Skip("under torch.compile with a gradient (the fused solve's tape has a data-dependent length)")
    return rates, max(0, int(controlled) - 1)


class _TritonGridPlan(NamedTuple):
    tableau: Any
    step_size: Optional[float]
    rates: tuple            # q rate names: "trace", then one per integrand regulariser
    nq_norm: int            # q columns in the step norm
    check_finite: bool


def _triton_solver(solve: CnfSolve, tableau, rates, nq_norm, adaptive: bool, rows: Optional[int] = None):
    """The launcher of this solve's fused kernels; ``rows``: the tile height (per-tile control), else the MLP
    kernels' tile."""
    from fastode.kernels.cnf_solve import TritonCnfSolver
    from fastode.ops import triton_mlp as TB

    x, dyn = solve.x, solve.dynamics
    with torch.no_grad():
        layers = [tuple(p.detach() for p in layer) for layer in dyn.params()]
    widths = [layers[0][0].shape[1]] + [layer[0].shape[0] for layer in layers]
    cfg = TB._config(x.shape[1], widths, x.dtype)
    packed = TB._packed(layers, cfg["CH"], cfg["CD"])
    return TritonCnfSolver(packed, dyn.activation, solve.trace, rates, nq_norm, tableau, adaptive=adaptive,
                           BM=rows or cfg["BM"], max_programs=TB.CONFIG["max_programs"],
                           num_warps=TB.CONFIG["num_warps"])


def _mlp_params(solve: CnfSolve) -> list:
    """The dynamics' parameters as views that carry gradients, in the kernels' ``[W, b, gw, gb, bw] * L`` order."""
    with torch.enable_grad():
        return [p for layer in solve.dynamics.params() for p in layer]


def _backward_counter(solve: CnfSolve, stats, per_step: int, extra: int):
    """With ``gradient="checkpoint"``, the backward's network evaluations are counted as odeint's checkpoint mode
    counts them (``per_step`` per step and ``extra`` once); "direct" counts none (odeint's direct mode neither)."""
    if solve.solver.gradient != "checkpoint":
        return None

    def count(n_steps, counter=solve.counter, stats=stats):
        n = per_step * n_steps + extra
        counter.add(n)
        stats.num_fevals_backward += n
    return count


def _q0(solve: CnfSolve, rates) -> torch.Tensor:
    x = solve.x
    return torch.stack(solve.y0[1:], -1) if rates else x.new_zeros(x.shape[0], 0)


def _ends(solve: CnfSolve, zT, qT, rates) -> tuple:
    ends = (zT,) + (tuple(qT.unbind(-1)) if rates else (solve.y0[1],))
    return tuple(torch.stack([a0, b1]) for a0, b1 in zip(solve.y0, ends))


class TritonGridEngine(Engine):
    """A fixed-grid solve as one fused Triton launch per step (:meth:`fastode.kernels.cnf_solve.TritonCnfSolver.
    grid`): every stage's MLP and trace, the stage combinations and the step's end in one kernel; no host read
    inside the solve, so the launch sequence can be captured in a CUDA graph.

    Eligible: what :func:`_fused_triton_common` checks, a fixed-grid one-step explicit RK method (rk4, rk4_classic,
    euler, midpoint, heun...), every option but ``step_size`` / ``check_finite`` at its default, output times
    without a gradient (a learned end time moves the grid). Gradient (``"direct"`` or ``"checkpoint"``, the same):
    the fused discrete adjoint, one launch per step in reverse from the stored step starts
    (:class:`fastode.ops.triton_cnf.TritonCnfSolve`); once differentiable. ``check_finite`` (default on) reads the
    result's finiteness once after the solve; a non-finite result is :class:`Failed`: ``"odeint"`` re-runs the solve
    and raises the error naming the step.
    """

    name = "triton_grid"
    _HANDLED_OPTIONS = ("step_size", "check_finite")

    def plan(self, solve):
        solver = solve.solver
        info = _method_info(solve)
        if isinstance(info, Skip):
            return info
        if info.adaptive or not info.fixed_grid or info.rk_tableau is None:
            return Skip(f"method {solver.method!r} is not a fixed-grid one-step RK method")
        if solve.step_rows:
            return Skip(_PER_TILE)
        common = _fused_triton_common(solve)
        if isinstance(common, Skip):
            return common
        if solve.t.requires_grad and _wants_grad(solve):
            return Skip("the output times require a gradient (a learned end time moves the fixed grid)")
        grid = _grid_options(solver, info, self._HANDLED_OPTIONS)
        if isinstance(grid, Skip):
            return grid
        h, check_finite = grid
        return _TritonGridPlan(info.rk_tableau, h, common[0], common[1], check_finite)

    def run(self, solve, plan: "_TritonGridPlan"):
        from fastode.ops.launch_count import host_read
        from fastode.solvers.fixed_grid import step_size_grid
        from fastode.stats import SolveStats

        rates, nq_norm = plan.rates, plan.nq_norm
        t = solve.t
        grid = t if plan.step_size is None else step_size_grid(t, plan.step_size)
        stepper = _triton_solver(solve, plan.tableau, rates, nq_norm, adaptive=False)
        e = solve.e.detach() if solve.trace == "hutchinson" else None
        g = host_floats(grid.detach())
        n = len(g) - 1
        nfe = len(plan.tableau.c) * n
        stats = SolveStats(num_fevals=nfe, num_steps=n, num_accepted_steps=n, step_ts=g[:-1],
                           step_sizes=[b - a for a, b in zip(g[:-1], g[1:])], method=solve.solver.method)
        stats.launches = n
        if _wants_grad(solve):
            from fastode.ops.triton_cnf import SolveRunner, TritonCnfSolve

            def forward(x, q0, tape):
                zT, qT, saved = stepper.grid(grid.detach(), x, q0, e, tape=tape)
                return zT, qT, saved, None

            runner = SolveRunner(forward, stepper.grid_backward,
                                 count_backward=_backward_counter(solve, stats, len(plan.tableau.c), 0))
            zT, qT = TritonCnfSolve.apply(runner, solve.x, _q0(solve, rates), t, *_mlp_params(solve))
        else:
            zT, qT, _ = stepper.grid(grid.detach(), solve.x.detach(), _q0(solve, rates).detach(), e)
        if plan.check_finite:
            host_read("finite check")
            if not bool(torch.isfinite(zT).all() and torch.isfinite(qT).all()):
                return _grid_failure("the fused Triton grid solve")
        solve.dynamics.last_backend = "triton"
        solve.counter.add(nfe)
        return EngineResult(_ends(solve, zT, qT, rates), stats)


class TritonAdaptiveEngine(Engine):
    """A batch-global adaptive solve with one fused Triton launch per step attempt and the step-size controller on
    the device (:meth:`fastode.kernels.cnf_solve.TritonCnfSolver.adaptive`): torchdiffeq's semantics as the
    ``"odeint"`` and ``"cpp_adaptive"`` engines (the first step by the RK spec's heuristic, the integral controller
    with ``safety``, ``ifactor``, ``dfactor``, ``min_step``, ``max_step``, ``first_step``, ``max_num_steps``, the CNF's
    norm, overshoot and the quartic interpolation at the end time). float64: the same steps, NFE and values (to
    rounding) as ``"odeint"``; float32: the kernels sum in their own order, so values agree to the solve's
    tolerance and a borderline step can go the other way.

    The host reads the device's control block every :attr:`sync_every` launches (0, the default: once at the end --
    it launches as many attempts as the previous solve of this configuration needed, launches after the end are
    no-ops, and it reads again only if those did not suffice). Eligible: :func:`_fused_triton_common`, an FSAL
    tableau with an error estimate and midpoint weights (dopri5, tsit5, bosh3), two output times, the other options
    at their defaults. Gradient (``"direct"`` or ``"checkpoint"``, the same): the fused discrete adjoint
    (:class:`fastode.ops.triton_cnf.TritonCnfSolve`): the forward keeps each accepted step's start, the backward
    walks the steps in reverse, one launch per step, recomputing the stages on chip (z, log p, the end time and
    every parameter, through the trace and the RNODE terms); once differentiable. A solve the device loop cannot
    finish (``max_num_steps``, step-size underflow, NaN/inf) is :class:`Failed`: ``"odeint"`` re-runs it and raises
    its error naming the time.
    """

    name = "triton_adaptive"
    sync_every = 0
    _HANDLED_OPTIONS = CppAdaptiveEngine._HANDLED_OPTIONS

    def plan(self, solve):
        solver = solve.solver
        info = _method_info(solve)
        if isinstance(info, Skip):
            return info
        tab = _fsal_tableau(solver, info)
        if isinstance(tab, Skip):
            return tab
        if len(solve.t) != 2:
            return Skip("more than two output times")
        common = _fused_triton_common(solve)
        if isinstance(common, Skip):
            return common
        if solve.step_rows:
            rows = solve.step_rows
            if rows not in (16, 32, 64, 128):
                return Skip(f"step_rows={rows} (the per-tile Triton solve runs tiles of 16, 32, 64 or 128 rows)")
        ctl = _controller_options(solver, info, self._HANDLED_OPTIONS)
        return ctl if isinstance(ctl, Skip) else (tab, common, ctl)

    def run(self, solve, plan):
        from fastode.stats import SolveStats

        tab, (rates, nq_norm), ctl = plan
        e = solve.e.detach() if solve.trace == "hutchinson" else None
        if solve.step_rows:
            return self._run_per_tile(solve, tab, rates, nq_norm, ctl, e)
        t = solve.t
        stepper = _triton_solver(solve, tab, rates, nq_norm, adaptive=True)
        td = t.detach()
        runner = None
        if _wants_grad(solve):
            from fastode.ops.triton_cnf import SolveRunner, TritonCnfSolve

            def forward(x, q0, tape):
                zT, qT, rec = stepper.adaptive(td[0], td[1], x, q0, e, time_dtype=t.dtype, sync_every=self.sync_every,
                                               tape=tape, **ctl)
                return zT, qT, rec.get("saved"), rec

            runner = SolveRunner(forward, stepper.adaptive_backward)
            zT, qT = TritonCnfSolve.apply(runner, solve.x, _q0(solve, rates), t, *_mlp_params(solve))
            rec = runner.record
        else:
            zT, qT, rec = stepper.adaptive(td[0], td[1], solve.x.detach(), _q0(solve, rates).detach(), e,
                                           time_dtype=t.dtype, sync_every=self.sync_every, **ctl)
        if rec["status"] or not rec["finite"]:
            return _adaptive_failure("the fused Triton adaptive solve", rec["status"] or Status.NONFINITE,
                                     rec["t_status"], ctl["rtol"], ctl["atol"], ctl["max_num_steps"])
        solve.dynamics.last_backend = "triton"
        solve.counter.add(rec["nfe"])
        stats = SolveStats(num_fevals=rec["nfe"], num_steps=rec["steps"], num_accepted_steps=rec["accepted"],
                           num_rejected_steps=rec["rejected"], step_ts=rec["step_ts"], step_sizes=rec["step_sizes"],
                           method=solve.solver.method)
        stats.launches = rec["launches"]
        if runner is not None:  # checkpoint-mode counting, as odeint's checkpoint mode: s per accepted step
            runner.count_backward = _backward_counter(solve, stats, len(tab.c), 0)
        return EngineResult(_ends(solve, zT, qT, rates), stats)

    def _run_per_tile(self, solve, tab, rates, nq_norm, ctl, e):
        """Per-tile control (``CNF(step_control="per_tile", step_rows=k)``), one launch: each tile of ``k`` rows is
        its own batch-global problem (as ``cpp_adaptive``'s per-tile mode: the same steps per tile as ``odeint`` on
        the tile's rows); stats are the row-weighted mean counts, ``stats.tiles`` each tile's. Gradient: the fused
        discrete adjoint of every tile in one launch. A failed tile raises the error class ``odeint`` raises, naming
        the time, the tile and its rows."""
        from fastode.stats import SolveStats

        stepper = _triton_solver(solve, tab, rates, nq_norm, adaptive=True, rows=solve.step_rows)
        td = solve.t.detach()
        runner = None

        def forward(x, q0, tape):
            zT, qT, tiles, saved = stepper.per_tile(td[0], td[1], x, q0, e, time_dtype=solve.t.dtype, tape=tape, **ctl)
            return zT, qT, saved, tiles

        if _wants_grad(solve):
            from fastode.ops.triton_cnf import SolveRunner, TritonCnfSolve

            runner = SolveRunner(forward, stepper.per_tile_backward)
            zT, qT = TritonCnfSolve.apply(runner, solve.x, _q0(solve, rates), solve.t, *_mlp_params(solve))
            tiles = runner.record
        else:
            zT, qT, _, tiles = forward(solve.x.detach(), _q0(solve, rates).detach(), False)
        B = solve.x.shape[0]
        bad = next((i for i, s_ in enumerate(tiles) if s_["status"]), None)
        if bad is not None:
            raise _tile_failure(tiles[bad], bad, solve.step_rows, B, ctl["rtol"], ctl["atol"], ctl["max_num_steps"])
        st = _mean_tile_stats(tiles, B, solve.step_rows)
        solve.dynamics.last_backend = "triton"
        solve.counter.add(st["nfe"])
        stats = SolveStats(num_fevals=st["nfe"], num_steps=st["steps"], num_accepted_steps=st["accepted"],
                           num_rejected_steps=st["rejected"], method=solve.solver.method)
        stats.tiles = tiles
        stats.launches = 1
        if runner is not None:  # checkpoint-mode counting as the batch solve's, with each row's tile's steps
            runner.count_backward = _backward_counter(solve, stats, 0, len(tab.c) * st["accepted"])
        return EngineResult(_ends(solve, zT, qT, rates), stats)


# --------------------------------------------------------------------------------------------------------
# the registry

_ENGINES: list = [CppGridEngine(), CppAdaptiveEngine(), TritonGridEngine(), TritonAdaptiveEngine(), OdeintEngine(),
                  TorchdiffeqEngine()]


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
        record = SolveRecord(eng.name, tuple(skipped), result.stats, getattr(solve.dynamics, "last_backend", None))
        return result, record
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
    return result, SolveRecord(odeint.name, skipped, result.stats, getattr(solve.dynamics, "last_backend", None))
