"""The fused CPU path of a CNF solve: a whole fixed-grid solve in one C++ call (and one for its backward).

:meth:`fastode.flows.CNF.forward` normally integrates the augmented state ``(z, logdet, *integrals)`` with
:func:`fastode.odeint`, calling the concatsquash MLP once per RK stage. When the solve is one that
:class:`fastode.cpp.CnfStepper` computes *identically* (same grid, same stage times, same probes, same
integrands), :func:`try_fused_solve` runs it with :meth:`CnfStepper.solve` instead; otherwise it returns
``None`` and the CNF takes the odeint path, unchanged. :func:`fused_plan` says which one and why.

Conditions (every one must hold; the first that fails is the reason reported in ``CNF.last_path_reason``):

* the CNF's ``fused_cpu`` switch is on and the C++ extension is built;
* ``x`` is a float32/float64 CPU tensor and every MLP parameter has its dtype and device;
* the dynamics is a plain :class:`fastode.nn.ConcatSquashMLP` (exact type: not time-varying, no subclass,
  no forward hooks) whose backend resolves to ``"cpp"`` for this call -- the per-module ``backend``,
  :func:`fastode.nn.set_backend` and ``FASTODE_NN_BACKEND`` are respected, so forcing ``"torch"`` keeps the
  odeint path;
* the solver is fastode's (``backend`` ``"auto"``/``"fastode"``) with ``gradient="direct"``,
  a fixed-grid explicit RK method (euler, midpoint, heun2, heun3, rk4, rk4_classic) with options limited
  to ``step_size``, ``check_finite``, ``interp="linear"``, ``perturb=False``;
* trace ``"hutchinson"`` or ``"exact"`` (``"none"``: odeint path);
* regularisers: kinetic energy and Jacobian-Frobenius with the Hutchinson trace, kinetic energy with the
  exact trace (the stepper's exact-trace Jacobian-Frobenius rate is the full Frobenius norm, not the
  probe estimate the odeint path integrates); no Taylor or error-estimate regularisers.

Both directions are supported (``reverse=True`` integrates ``T -> 0`` on the grid ``fastode.odeint``
builds for decreasing times). The end time ``T`` may require grad: the grid is built from ``T`` with
autograd exactly as :func:`fastode.odeint` builds it (``arange * h + t0``, last point ``= t1``) and
:meth:`CnfStepper.solve` differentiates the solve w.r.t. every grid time, so dL/dT is the same exact
derivative of the discrete solve as on the odeint path.

Not supported on this path: double backward (the fused backward is once-differentiable). The NFE counter
advances by ``stages * steps`` and ``CNF.last_stats`` is a :class:`fastode.SolveStats` with the same counts,
step times and sizes the odeint path records. ``check_finite`` (default on): a non-finite result is rejected and the
solve re-run on the odeint path, whose :class:`~fastode.errors.NonFiniteError` names the step; that fallback
is recorded in ``last_path_reason`` and warned once (:class:`~fastode.errors.FallbackWarning`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import regularizers as R

__all__ = ["FUSED_METHODS", "FusedPlan", "fused_plan", "try_fused_solve"]

FUSED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic")
"""Fixed-grid methods whose tableau the fused grid solve takes (explicit RK, no error estimate needed)."""

_OK_OPTIONS = {"step_size", "check_finite", "interp", "perturb"}


class FusedPlan(NamedTuple):
    """What :func:`try_fused_solve` needs once eligibility is settled."""

    step_size: float | None
    rates: tuple            # stepper rate names: "trace" then one per integrand regulariser
    check_finite: bool


def _reason_dynamics(dyn, x) -> str | None:
    try:
        from fastode.nn import ConcatSquashMLP
        from fastode.nn import backends as nn_backends
    except Exception as exc:  # pragma: no cover
        return f"fastode.nn is not importable ({exc})"
    if type(dyn) is not ConcatSquashMLP:
        return f"the dynamics is a {type(dyn).__name__}, not a plain ConcatSquashMLP"
    if dyn._forward_hooks or dyn._forward_pre_hooks:
        return "the dynamics has forward hooks"
    params = [p for layer in dyn.params() for p in layer]
    for p in params:
        if p.dtype != x.dtype or p.device != x.device:
            return f"an MLP parameter is {p.dtype} on {p.device}, the input {x.dtype} on {x.device}"
    t0 = torch.zeros((), dtype=x.dtype, device=x.device)
    try:
        name = nn_backends.resolve_backend_name(dyn.backend, x.device, (t0, x, dyn.params(), dyn.activation))
    except ValueError as exc:
        return f"the MLP backend cannot be resolved ({exc})"
    if name != "cpp":
        return f"the MLP backend resolves to {name!r}, not 'cpp'"
    return None


def fused_plan(cnf, x: torch.Tensor, solver, trace: str, integrands, errors) -> FusedPlan | str:
    """A :class:`FusedPlan` when this solve can run fused, else a string saying why not."""
    if not getattr(cnf, "fused_cpu", False):
        return "fused_cpu is off"
    try:
        import fastode.cpp as fc
    except Exception as exc:  # pragma: no cover
        return f"fastode.cpp is not importable ({exc})"
    if not fc.available():
        return "the C++ extension is not built"
    if x.device.type != "cpu":
        return f"the input is on {x.device}"
    if x.dtype not in (torch.float32, torch.float64):
        return f"the input is {x.dtype}"
    if trace not in ("hutchinson", "exact"):
        return f"trace={trace!r}"
    if errors:
        return "error-estimate regularisers"
    rates = ["trace"]
    for r in integrands:
        if isinstance(r, R.KineticEnergy):
            rates.append("kinetic")
        elif isinstance(r, R.JacobianFrobenius) and trace == "hutchinson":
            rates.append("jac_frob")
        else:
            return f"regulariser {r.name!r} with trace={trace!r}"
    if solver.method not in FUSED_METHODS:
        return f"method {solver.method!r} is not a fixed-grid RK method"
    if solver.gradient != "direct":
        return f"gradient={solver.gradient!r}"
    from .solver import resolve_backend

    try:
        if resolve_backend(solver) != "fastode":
            return "the solver backend is torchdiffeq"
    except RuntimeError as exc:
        return str(exc)
    opts = solver.full_options()
    extra = set(opts) - _OK_OPTIONS
    if extra:
        return f"solver options {sorted(extra)}"
    if opts.get("interp", "linear") != "linear" or opts.get("perturb", False):
        return "interp/perturb options"
    h = opts.get("step_size")
    if h is not None:
        if isinstance(h, torch.Tensor):
            h = h.item()
        try:
            h = float(h)
        except (TypeError, ValueError):
            return f"step_size {h!r}"
        if not (h > 0 and math.isfinite(h)):
            return f"step_size {h!r}"
    why = _reason_dynamics(cnf.dynamics, x)
    if why is not None:
        return why
    return FusedPlan(h, tuple(rates), bool(opts.get("check_finite", True)))


def _grid(t: torch.Tensor, h: float | None) -> torch.Tensor:
    """The time grid :func:`fastode.odeint` integrates ``t = [t0, t1]`` on (torchdiffeq's construction in the
    solve's orientation: decreasing times are negated, gridded, negated back), differentiable in ``t``."""
    if h is None:
        return t
    from fastode.solvers.fixed_grid import _grid_from_step_size

    if bool(t[1] < t[0]):
        return -_grid_from_step_size(h)(None, None, -t)
    return _grid_from_step_size(h)(None, None, t)


def try_fused_solve(cnf, x: torch.Tensor, e, t: torch.Tensor, solver, trace: str, integrands, errors):
    """Run the solve fused when :func:`fused_plan` allows: ``(out, logdet, reg, stats)``; else ``None``.

    Records ``cnf.last_path`` (``"fused_cpu"`` or ``"odeint"``) and ``cnf.last_path_reason``.
    """
    plan = fused_plan(cnf, x, solver, trace, integrands, errors)
    if isinstance(plan, str):
        cnf.last_path, cnf.last_path_reason = "odeint", plan
        return None
    import fastode.cpp as fc
    from fastode.stats import SolveStats
    from fastode.tableaus import get_tableau

    tab = get_tableau(solver.method)
    dyn = cnf.dynamics
    grid = _grid(t, plan.step_size)
    stepper = fc.CnfStepper(dyn, tab, rates=plan.rates, backend="cpp")
    B = x.shape[0]
    q0 = torch.zeros(B, len(plan.rates), dtype=x.dtype, device=x.device)
    zT, qT = stepper.solve(grid, x, q0, e if trace == "hutchinson" else None)
    if plan.check_finite and not bool(torch.isfinite(zT).all() and torch.isfinite(qT).all()):
        # Rejected. The fused solve returns only the end state, so the odeint path re-runs the solve to raise
        # the NonFiniteError that names the step; that re-run is a fallback, recorded and warned once.
        from fastode.errors import warn_fallback_once

        reason = ("the fused C++ grid solve produced NaN/inf; re-running it on the odeint path, which raises "
                  "NonFiniteError naming the step")
        warn_fallback_once("cnf-fused-cpu-nonfinite", f"CNF: {reason}")
        cnf.last_path, cnf.last_path_reason = "odeint", reason
        return None
    dyn.last_backend = "cpp"
    g = grid.detach().to("cpu", torch.float64).tolist()
    n = len(g) - 1
    cnf._counter.n += len(tab.c) * n
    stats = SolveStats(num_fevals=len(tab.c) * n, num_steps=n, num_accepted_steps=n,
                       step_ts=g[:-1], step_sizes=[b - a for a, b in zip(g[:-1], g[1:])], method=solver.method)
    reg = {r.name: qT[:, 1 + i] for i, r in enumerate(integrands)}
    cnf.last_path, cnf.last_path_reason = "fused_cpu", None
    return zT, qT[:, 0], reg, stats
