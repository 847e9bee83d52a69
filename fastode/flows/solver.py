"""Solver configuration of a CNF block and the adapter to the ODE solver libraries.

A :class:`Solver` is a small immutable record (method, tolerances, options, gradient mode, backend); a
CNF holds one for training and one for evaluation. :func:`solve` runs one solve of a tuple state through
:func:`fastode.odeint` (backend ``"fastode"``) or torchdiffeq (backend ``"torchdiffeq"``, used as the
reference in tests and as a fallback while fastode's solver core is unavailable).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "Solver",
    "FIXED_GRID_METHODS",
    "solve",
    "fastode_odeint_available",
    "state_norm",
    "resolve_backend",
    "method_tableau",
    "select_initial_step",
]

FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic", "explicit_adams",
                      "implicit_adams", "fixed_adams")
_GRADIENTS = ("direct", "checkpoint", "adjoint")
_BACKENDS = ("auto", "fastode", "torchdiffeq")


@dataclass(frozen=True)
class Solver:
    """One solver configuration.

    ``method``: a fastode/torchdiffeq method name (``"dopri5"``, ``"rk4"``, ...). ``rtol``/``atol``: tolerances
    of adaptive methods (also used by the error-estimate regularisers for fixed-grid methods).
    ``step_size``: shortcut for ``options["step_size"]`` (fixed-grid methods). ``options``: solver options
    (``norm`` is set by the CNF and must not be given). ``gradient``: ``"direct"`` (discretise-optimise),
    ``"checkpoint"`` (the same gradient with less memory; fastode only) or ``"adjoint"``
    (optimise-discretise). ``backend``: ``"fastode"``, ``"torchdiffeq"`` or ``"auto"``.
    ``adjoint_rtol``/``adjoint_atol``/``adjoint_options``: for ``gradient="adjoint"`` (default: the forward ones).
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    options: dict | None = None
    gradient: str = "direct"
    backend: str = "auto"
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    adjoint_options: dict | None = None

    def __post_init__(self):
        if not isinstance(self.method, str):
            raise ValueError(f"method must be a string such as 'dopri5' or 'rk4', got {self.method!r}")
        if self.gradient not in _GRADIENTS:
            raise ValueError(f"gradient must be one of {_GRADIENTS}, got {self.gradient!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.step_size is not None and not (float(self.step_size) > 0):
            raise ValueError(f"step_size must be positive, got {self.step_size!r}")
        if self.options is not None and "norm" in self.options:
            raise ValueError("do not pass options['norm'] to a CNF solver: the CNF sets the norm itself "
                             "(it excludes the regulariser states from step-size control)")
        if not (float(self.rtol) > 0 and float(self.atol) >= 0):
            raise ValueError(f"need rtol > 0 and atol >= 0, got rtol={self.rtol!r}, atol={self.atol!r}")

    @property
    def fixed_grid(self) -> bool:
        return self.method in FIXED_GRID_METHODS

    def replace(self, **changes) -> "Solver":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def full_options(self) -> dict:
        opts = dict(self.options or {})
        if self.step_size is not None:
            opts["step_size"] = float(self.step_size)
        return opts

    def describe(self) -> str:
        if self.fixed_grid:
            h = self.full_options().get("step_size")
            return f"{self.method}(h={h})"
        return f"{self.method}(rtol={self.rtol:g}, atol={self.atol:g})"


def as_solver(spec, default: Solver | None = None) -> Solver:
    """``Solver`` from a ``Solver``, a dict of its fields, a method name, or ``None`` (-> ``default``)."""
    if spec is None:
        if default is None:
            raise ValueError("no solver given")
        return default
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, str):
        return Solver(method=spec)
    if isinstance(spec, dict):
        return Solver(**spec)
    raise ValueError(f"cannot build a Solver from {spec!r}; pass a Solver, a dict of its fields or a method name")


# --------------------------------------------------------------------------------------------------------
# backends

def fastode_odeint_available() -> bool:
    """True when :func:`fastode.odeint` (the solver core) is importable."""
    try:
        from fastode import odeint as _mod  # noqa: F401
    except Exception:
        return False
    try:
        import fastode

        return callable(getattr(fastode, "odeint", None))
    except Exception:
        return False


def _fastode_supports(gradient: str) -> bool:
    if not fastode_odeint_available():
        return False
    module = {"adjoint": "fastode.grad.adjoint", "checkpoint": "fastode.grad.checkpoint"}.get(gradient)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def resolve_backend(solver: Solver) -> str:
    """``"fastode"`` or ``"torchdiffeq"``: ``"auto"`` picks fastode when :func:`fastode.odeint` (and, for
    ``gradient="adjoint"``/``"checkpoint"``, its gradient module) is importable."""
    if solver.backend != "auto":
        if solver.backend == "fastode" and not _fastode_supports(solver.gradient):
            raise RuntimeError(f"backend='fastode' was requested but fastode.odeint with gradient={solver.gradient!r} "
                               "is not importable; use backend='torchdiffeq' or 'auto'")
        return solver.backend
    return "fastode" if _fastode_supports(solver.gradient) else "torchdiffeq"


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def state_norm(num_controlled: int) -> Callable:
    """torchdiffeq-style mixed norm (max over tensors of their RMS) over the first ``num_controlled``
    tensors of a tuple state; the remaining tensors (regulariser integrals) do not affect step sizes."""

    def norm(state):
        if isinstance(state, torch.Tensor):
            return _rms(state)
        return torch.stack([_rms(s) for s in state[:num_controlled]]).max()

    norm.num_controlled = num_controlled
    return norm


def solve(func, y0: tuple, t: torch.Tensor, solver: Solver, norm: Callable, want_stats: bool = False):
    """Integrate the tuple state ``y0`` over the times ``t`` (1-D). Returns ``(solution_tuple, stats)``;
    ``stats`` is a :class:`fastode.SolveStats` (fastode backend) or ``None``."""
    backend = resolve_backend(solver)
    options = solver.full_options()
    options["norm"] = norm
    if backend == "fastode":
        import fastode

        kwargs = {}
        if solver.gradient == "adjoint":
            for name in ("adjoint_rtol", "adjoint_atol", "adjoint_options"):
                if getattr(solver, name) is not None:
                    kwargs[name] = getattr(solver, name)
        out = fastode.odeint(func, y0, t, rtol=solver.rtol, atol=solver.atol, method=solver.method,
                             options=options, gradient=solver.gradient, return_stats=True, **kwargs)
        sol, stats = out
        return tuple(sol), stats
    import torchdiffeq

    if solver.gradient == "checkpoint":
        raise ValueError("gradient='checkpoint' needs the fastode backend (fastode.odeint); torchdiffeq has no "
                         "checkpointed discrete adjoint. Use gradient='direct' (same gradient, more memory).")
    if solver.gradient == "adjoint":
        kwargs = {}
        if solver.adjoint_rtol is not None:
            kwargs["adjoint_rtol"] = solver.adjoint_rtol
        if solver.adjoint_atol is not None:
            kwargs["adjoint_atol"] = solver.adjoint_atol
        if solver.adjoint_options is not None:
            kwargs["adjoint_options"] = dict(solver.adjoint_options)
        sol = torchdiffeq.odeint_adjoint(func, y0, t, rtol=solver.rtol, atol=solver.atol, method=solver.method,
                                         options=options, **kwargs)
    else:
        sol = torchdiffeq.odeint(func, y0, t, rtol=solver.rtol, atol=solver.atol, method=solver.method,
                                 options=options)
    return tuple(sol), None


# --------------------------------------------------------------------------------------------------------
# single embedded steps (local error regulariser)

def method_tableau(method: str):
    """``(tableau, order, backend)`` of an adaptive method with an embedded error estimate.

    Prefers :func:`fastode.tableaus.get_tableau`; falls back to torchdiffeq's tableaus (dopri5, bosh3,
    fehlberg2, adaptive_heun, dopri8) while fastode's tableaus are unavailable.
    """
    try:
        from fastode.tableaus import get_tableau

        tab = get_tableau(method)
        if getattr(tab, "b_err", None) is None:
            raise ValueError(f"method {method!r} has no embedded error estimate; the local error regulariser "
                             "needs an adaptive method such as 'dopri5' or 'tsit5'")
        return tab, int(tab.order), "fastode"
    except ImportError:
        pass
    from torchdiffeq._impl import adaptive_heun, bosh3, dopri5, dopri8, fehlberg2

    table = {
        "dopri5": (dopri5._DORMAND_PRINCE_SHAMPINE_TABLEAU, 5),
        "bosh3": (bosh3._BOGACKI_SHAMPINE_TABLEAU, 3),
        "fehlberg2": (fehlberg2._FEHLBERG2_TABLEAU, 2),
        "adaptive_heun": (adaptive_heun._ADAPTIVE_HEUN_TABLEAU, 2),
        "dopri8": (dopri8._DOPRI8_TABLEAU, 8),
    }
    if method not in table:
        raise ValueError(f"no embedded tableau for {method!r} without fastode.tableaus; use one of {sorted(table)}")
    tab, order = table[method]
    return tab, order, "torchdiffeq"


def rk_step_tuple(func, t0: torch.Tensor, y0: tuple, f0: tuple, dt: torch.Tensor, method: str):
    """One embedded RK step of ``method`` for a tuple state. Returns ``(y1, y_err)`` (tuples).

    Uses :func:`fastode.solvers.rk_step.rk_step` when available (tuple states are flattened into one
    vector around it), torchdiffeq's private ``_runge_kutta_step`` otherwise.
    """
    tab, _order, where = method_tableau(method)
    shapes = [y.shape for y in y0]
    numels = [y.numel() for y in y0]

    def flat(ts):
        return torch.cat([x.reshape(-1) for x in ts])

    def unflat(v):
        return tuple(p.reshape(s) for p, s in zip(torch.split(v, numels), shapes))

    def ffunc(t, v, perturb=None):  # torchdiffeq passes perturb=; stage times are used unperturbed
        return flat(func(t, unflat(v)))

    v0, g0 = flat(y0), flat(f0)
    if where == "fastode":
        from fastode.solvers.rk_step import rk_step

        res = rk_step(ffunc, t0, v0, g0, dt, tab)
        y1, y_err = res[0], res[1]
    else:
        from torchdiffeq._impl.rk_common import _runge_kutta_step

        y1, _f1, y_err, _k = _runge_kutta_step(ffunc, v0, g0, t0, dt, t0 + dt, tab)
    return unflat(y1), unflat(y_err)


def error_ratio(y_err: tuple, y0: tuple, y1: tuple, rtol: float, atol: float, norm: Callable) -> torch.Tensor:
    """The solver's error ratio ``norm(err / (atol + rtol * max(|y0|, |y1|)))`` on a tuple state."""
    ratios = tuple(e / (atol + rtol * torch.max(a.abs(), b.abs())) for e, a, b in zip(y_err, y0, y1))
    return norm(ratios)


@torch.no_grad()
def select_initial_step(func, t0: torch.Tensor, y0: tuple, f0: tuple, order: int, rtol: float, atol: float,
                        norm: Callable) -> torch.Tensor:
    """Hairer-Norsett-Wanner initial step (Sec. II.4), as in torchdiffeq/OrdinaryDiffEq; detached."""
    scale = tuple(atol + y.abs() * rtol for y in y0)
    d0 = norm(tuple(y / s for y, s in zip(y0, scale))).abs()
    d1 = norm(tuple(f / s for f, s in zip(f0, scale))).abs()
    if d0 < 1e-5 or d1 < 1e-5:
        h0 = torch.tensor(1e-6, dtype=t0.dtype, device=t0.device)
    else:
        h0 = (0.01 * d0 / d1).to(t0.dtype)
    y1 = tuple(y + h0 * f for y, f in zip(y0, f0))
    f1 = func(t0 + h0, y1)
    d2 = (norm(tuple((a - b) / s for a, b, s in zip(f1, f0, scale))) / h0).abs()
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = torch.max(torch.tensor(1e-6, dtype=h0.dtype, device=h0.device), h0 * 1e-3)
    else:
        h1 = (0.01 / torch.max(d1, d2)) ** (1.0 / float(order + 1))
    return torch.min(100 * h0, h1.to(h0.dtype))
