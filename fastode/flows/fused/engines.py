"""The two fused CNF engines, each over a :class:`~fastode.flows.fused.base.FusedBackend`: a fixed grid
(:class:`FusedGridEngine`) and an adaptive solve (:class:`FusedAdaptiveEngine`, batch-global or per tile).

What a fused solve needs of the CNF is written here once, for every backend: an explicit one-step RK method of the
right kind (read from the solver class, never from name lists), every option the engine does not handle at its
default, the Hutchinson or exact trace (or none), kinetic / Jacobian-Frobenius integrands only, no error
regularisers, the CNF's state norm, a plain :class:`~fastode.nn.ConcatSquashMLP` whose MLP backend resolves to the
engine's backend, and (when a gradient is wanted) a gradient mode the backend differentiates exactly. The backend adds
what it cannot take beyond that (:meth:`~fastode.flows.fused.base.FusedBackend.supports`). The engines build the
statistics, count the evaluations, and turn a solve that stopped short into :class:`Failed` (re-run on ``"odeint"``
for the error naming the step or time) or, per tile, into ``odeint``'s error naming the tile.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...codes import Status
from ...compiling import check, host_floats
from ...launch_count import host_read
from .. import regularizers as R
from ..engine_base import PEER_ONLY, PER_TILE_ONLY, CnfSolve, Engine, EngineResult, Failed, Skip, wants_grad
from ..solver import Solver
from .base import AdaptivePlan, FusedBackend, GridPlan, mean_tile_counts, tile_failure

__all__ = ["FusedGridEngine", "FusedAdaptiveEngine"]


class _FusedEngine(Engine):
    """A fused engine over ``backend``, named ``f"{backend.name}_{kind}"``."""

    kind = ""

    def __init__(self, backend: FusedBackend):
        self.backend = backend
        self.name = f"{backend.name}_{self.kind}"


class FusedGridEngine(_FusedEngine):
    """A whole fixed-grid solve on a fused backend: ``"cpp_grid"`` (one C++ call and one backward,
    :meth:`fastode.cpp.CnfStepper.solve`) or ``"triton_grid"`` (one fused launch per step, no host read inside the
    solve, so a CUDA graph can capture it).

    It runs exactly the solves it computes identically to ``"odeint"`` (same grid, stage times, probes and
    integrands; values, gradients, NFE and stats agree): a fixed-grid method whose every step is one explicit RK step
    (rk4, rk4_classic, euler, midpoint, heun...), every option but ``step_size`` / ``check_finite`` at its default,
    and the rest of the module docstring's rules. With the exact trace the Jacobian-Frobenius integrand is refused
    (the kernels' rate is the full Frobenius norm, not the probe estimate odeint integrates). Gradient: the backend's
    exact discrete gradient, once differentiable. ``check_finite`` (default on) reads the result's finiteness once;
    a non-finite result is :class:`Failed`: ``"odeint"`` re-runs the solve and raises the error naming the step.
    """

    kind = "grid"
    _HANDLED_OPTIONS = ("step_size", "check_finite")

    def plan(self, solve: CnfSolve):
        be, solver = self.backend, solve.solver
        info = _method_info(solve, be)
        if isinstance(info, Skip):
            return info
        if info.adaptive or not info.fixed_grid:
            return Skip(f"method {solver.method!r} is adaptive; this engine runs fixed grids")
        if info.rk_tableau is None:
            return Skip(f"method {solver.method!r} is not a one-step explicit RK method")
        if solve.step_rows:
            return Skip(PER_TILE_ONLY)
        common = _common(solve, be, be.grid_traces, be.grid_gradients)
        if isinstance(common, Skip):
            return common
        why = be.supports(solve, "grid")
        if why is not None:
            return Skip(why)
        why = _options_at_defaults(solver, info, self._HANDLED_OPTIONS)
        if why is not None:
            return Skip(why)
        h = solver.full_options().get("step_size")
        if h is not None:
            try:
                h = float(h.item() if isinstance(h, torch.Tensor) else h)
            except (TypeError, ValueError, RuntimeError):
                return Skip(f"step_size {h!r}")
            if not (h > 0 and math.isfinite(h)):
                return Skip(f"step_size {h!r}")
        return GridPlan(info.rk_tableau, h, *common, bool(solver.full_options().get("check_finite", True)))

    def run(self, solve: CnfSolve, plan: GridPlan):
        from fastode.solvers.fixed_grid import step_size_grid
        from fastode.stats import SolveStats

        grid = solve.t if plan.step_size is None else step_size_grid(solve.t, plan.step_size)
        g = host_floats(grid.detach())
        n = len(g) - 1
        s = len(plan.tableau.c)
        stats = SolveStats(num_fevals=s * n, num_steps=n, num_accepted_steps=n, step_ts=g[:-1],
                           step_sizes=[b - a for a, b in zip(g[:-1], g[1:])], method=solve.solver.method)
        out = self.backend.grid(solve, plan, grid, _backward_counter(solve, stats))
        zT, qT = out.z, out.q
        if plan.check_finite and torch.compiler.is_compiling():  # no re-run inside a graph: an in-graph check
            from fastode.errors import NonFiniteError

            check(torch.isfinite(zT).all() & torch.isfinite(qT).all(), lambda: NonFiniteError(
                f"the fused {self.backend.title} grid solve produced NaN/inf (run it eagerly to have the step named)"))
        elif plan.check_finite:
            host_read("finite check")
            if not bool(torch.isfinite(zT).all() and torch.isfinite(qT).all()):
                return _grid_failure(f"the fused {self.backend.title} grid solve")
        if "launches" in out.record:
            stats.launches = out.record["launches"]
        solve.counter.add(s * n)
        return _result(solve, plan.rates, out, stats, self.backend.name)


class FusedAdaptiveEngine(_FusedEngine):
    """A whole adaptive solve on a fused backend with torchdiffeq's semantics, as the ``"odeint"`` engine: the
    Hairer-Norsett-Wanner first step, the integral controller (``safety``, ``ifactor``, ``dfactor``, ``min_step``,
    ``max_step``, ``first_step``, ``max_num_steps`` honoured), the CNF's norm, overshoot and the quartic interpolation
    at the end time. ``"cpp_adaptive"``: the whole loop in one C++ call; ``"triton_adaptive"``: one fused launch per
    step attempt with the controller on the device, the host reading the control block once at the end. float64: the
    same steps, NFE and values (to rounding) as ``"odeint"``; float32: the native sums round differently, so values
    agree to the solve's tolerance and a borderline step can go the other way.

    Eligible: an FSAL tableau with an error estimate and torchdiffeq's midpoint weights (dopri5, tsit5, bosh3), two
    output times, the other options at their defaults, ``gradient="direct"`` or ``"checkpoint"`` when a gradient is
    wanted (the same exact gradient of the discrete solve, a discrete adjoint over the accepted steps; with
    ``"checkpoint"`` the backward's network evaluations are counted as odeint's checkpoint mode counts them).
    Per-tile step control (``CNF(step_control="per_tile", step_rows=k)``; opt-in, not bit-identical to torchdiffeq):
    each tile of ``k`` rows is its own batch-global problem (its own step size, accept/reject, status and norm over
    its rows); its stats are the row-weighted mean counts and ``stats.tiles`` holds each tile's. A solve that stops
    short (``max_num_steps``, step-size underflow, NaN/inf) is :class:`Failed` (``"odeint"`` re-runs it and raises its
    error naming the time); per tile, which no other engine runs, the engine raises the error class ``odeint`` raises
    naming the time, the tile and its rows.
    """

    kind = "adaptive"
    _HANDLED_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "max_num_steps")

    def plan(self, solve: CnfSolve):
        be, solver = self.backend, solve.solver
        info = _method_info(solve, be)
        if isinstance(info, Skip):
            return info
        tab = info.rk_tableau
        if not info.adaptive or tab is None:
            return Skip(f"method {solver.method!r} is not an adaptive one-step RK method")
        if not tab.fsal or tab.b_err is None or tab.c_mid is None:
            return Skip(f"method {solver.method!r}: this engine runs FSAL tableaus with an error estimate and "
                        "midpoint weights (dopri5, tsit5, bosh3)")
        if len(solve.t) != 2:
            return Skip("more than two output times")
        common = _common(solve, be, ("hutchinson", "exact", "none"), ("direct", "checkpoint"))
        if isinstance(common, Skip):
            return common
        why = be.supports(solve, "per_tile" if solve.step_rows else "adaptive")
        if why is not None:
            return Skip(why)
        why = _options_at_defaults(solver, info, self._HANDLED_OPTIONS)
        if why is not None:
            return Skip(why)
        opts = {**info.options, **solver.full_options()}
        try:
            ctl = dict(rtol=float(solver.rtol), atol=float(solver.atol),
                       **{k: float(opts[k]) for k in ("safety", "ifactor", "dfactor", "min_step", "max_step")},
                       first_step=None if opts["first_step"] is None else float(opts["first_step"]),
                       max_num_steps=int(opts["max_num_steps"]))
        except (TypeError, ValueError) as exc:
            return Skip(f"solver options ({exc})")
        return AdaptivePlan(tab, *common, ctl)

    def run(self, solve: CnfSolve, plan: AdaptivePlan):
        from fastode.stats import SolveStats

        stats = SolveStats(method=solve.solver.method)
        count = _backward_counter(solve, stats)
        run = self.backend.per_tile if solve.step_rows else self.backend.adaptive
        out = run(solve, plan, count)
        rec = out.record
        if isinstance(rec, dict) and "counts" in rec:  # compiled: data-dependent counts stay in the graph (checked)
            stats.counts = rec["counts"]
            return _result(solve, plan.rates, out, stats, self.backend.name)
        if solve.step_rows:
            tiles, B = rec, solve.x.shape[0]
            bad = next((i for i, s_ in enumerate(tiles) if s_["status"]), None)
            if bad is not None:  # no other engine runs per-tile control: raise odeint's error here
                raise tile_failure(tiles[bad], bad, solve.step_rows, B, plan.ctl)
            rec = mean_tile_counts(tiles, B, solve.step_rows)
            stats.tiles = tiles  # every tile's own counts and status
        else:
            if rec["status"]:
                return _adaptive_failure(f"the fused {self.backend.title} adaptive solve", rec["status"],
                                         rec["t_status"], plan.ctl)
        stats.num_fevals, stats.num_steps = rec["nfe"], rec["steps"]
        stats.num_accepted_steps, stats.num_rejected_steps = rec["accepted"], rec["rejected"]
        stats.step_ts, stats.step_sizes = list(rec["step_ts"]), list(rec["step_sizes"])
        if "launches" in rec:
            stats.launches = rec["launches"]
        solve.counter.add(rec["nfe"])
        return _result(solve, plan.rates, out, stats, self.backend.name)


# --------------------------------------------------------------------------------------------------------
# what every fused solve needs (written once)

def _common(solve: CnfSolve, be: FusedBackend, traces: tuple, gradients: tuple):
    """``(rates, nq_norm)`` of a solve every fused backend can take with these traces and gradient modes, or a
    :class:`Skip`."""
    x = solve.x
    if x.dtype not in (torch.float32, torch.float64):
        return Skip(f"the input is {x.dtype}")
    if solve.trace not in traces:
        return Skip(f"trace={solve.trace!r}")
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
        return Skip(PEER_ONLY)
    controlled = getattr(solve.norm, "num_controlled", None)
    if controlled is None:
        return Skip("the norm is not the CNF's state norm")
    why = _why_not_dynamics(solve.dynamics, x, be.name)
    if why is not None:
        return Skip(why)
    if wants_grad(solve) and solve.solver.gradient not in gradients:
        return Skip(f"gradient={solve.solver.gradient!r} (the fused {be.title} solve's gradient is the exact discrete "
                    f"one: {' or '.join(repr(g) for g in gradients)})")
    return tuple(rates), max(0, int(controlled) - 1)


def _why_not_dynamics(dyn, x, backend: str) -> Optional[str]:
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


def _method_info(solve: CnfSolve, be: FusedBackend):
    """The solver's :class:`~fastode.solvers.MethodInfo`, or a :class:`Skip` naming why not: the backend's cheap
    first checks (:meth:`~fastode.flows.fused.base.FusedBackend.available`), then the method."""
    from fastode.solvers import method_info

    why = be.available(solve)
    if why is not None:
        return Skip(why)
    try:
        return method_info(solve.solver.method)
    except Exception as exc:
        return Skip(f"method {solve.solver.method!r}: {exc}")


def _same_option(value, default) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:
        return False


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


def _backward_counter(solve: CnfSolve, stats):
    """With ``gradient="checkpoint"``, ``f(n)`` counting the backward's ``n`` network evaluations as odeint's
    checkpoint mode counts them (into the CNF's counter and ``stats.num_fevals_backward``); "direct" counts none
    (odeint's direct mode neither)."""
    if solve.solver.gradient != "checkpoint":
        return None

    def count(n, counter=solve.counter, stats=stats):
        counter.add(n)
        stats.num_fevals_backward += n
    return count


def _result(solve: CnfSolve, rates, out, stats, backend: str) -> EngineResult:
    """The engine result of a backend run: with the trace off the kernels integrate no ``q`` column, and ``q``
    keeps its start."""
    return EngineResult((out.z, out.q if rates else solve.q0), stats, mlp_backend=backend)


def _adaptive_failure(what: str, status: int, t_status: float, ctl: dict) -> Failed:
    """:class:`Failed` for a batch-global fused adaptive solve (``what``: "the fused C++ adaptive solve") that stopped
    with ``status`` at ``t_status``."""
    st = Status(status)
    return Failed(f"{what} stopped at t={t_status:.6g} ({st.message})",
                  st.error(f"at t={t_status:.6g} in {what}", ctl["rtol"], ctl["atol"], ctl["max_num_steps"]))


def _grid_failure(what: str) -> Failed:
    """:class:`Failed` for a fused grid solve (``what``: "the fused C++ grid solve") whose result is NaN/inf; it does
    not know the step (the ``"odeint"`` re-run names it)."""
    from fastode.errors import NonFiniteError

    reason = f"{what} produced NaN/inf"
    return Failed(reason, NonFiniteError(f"{reason} (a grid solve does not record which step; the odeint engine "
                                         "finished the same solve: the engines round differently)"))
