"""Solver configuration of a CNF block, its state norm and the local error regulariser's single step.

A :class:`Solver` is a small immutable record (method, tolerances, options, gradient mode, backend); a
CNF holds one for training and one for evaluation. Which engine runs a solve is decided in
:mod:`fastode.flows.engines`. ``backend="torchdiffeq"`` asks for torchdiffeq's solver: a *peer* for side-by-side
comparisons (the demo, benchmarks, tests), chosen explicitly; fastode never falls back to it.

The local error regulariser's single embedded step (:func:`local_error_step`) uses the RK spec
(:mod:`fastode.ops.rk`) on the flattened state: the same step, error ratio and initial step the solver uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..norms import rms_norm
from ..ops import rk as rk_spec
from ..solvers import SOLVERS, method_info
from ..tableaus import get_tableau

__all__ = [
    "Solver",
    "FIXED_GRID_METHODS",
    "state_norm",
    "resolve_backend",
    "method_tableau",
    "local_error_step",
]



def _is_fixed_grid(method: str) -> bool:
    try:
        return method_info(method).fixed_grid
    except Exception:       # an unknown method: odeint raises the helpful error when the solve runs
        return False


FIXED_GRID_METHODS = tuple(m for m in SOLVERS if _is_fixed_grid(m))
"""Methods that step on a grid (from their solver classes: the fixed-grid RK and Adams methods)."""
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
        return _is_fixed_grid(self.method)

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

def resolve_backend(solver: Solver) -> str:
    """``"fastode"`` (for ``"auto"`` and ``"fastode"``) or ``"torchdiffeq"`` (the explicitly chosen peer)."""
    return "torchdiffeq" if solver.backend == "torchdiffeq" else "fastode"


def state_norm(num_controlled: int) -> Callable:
    """torchdiffeq-style mixed norm (max over tensors of their RMS) over the first ``num_controlled``
    tensors of a tuple state; the remaining tensors (regulariser integrals) do not affect step sizes."""

    def norm(state):
        if isinstance(state, torch.Tensor):
            return rms_norm(state)
        return torch.stack([rms_norm(s) for s in state[:num_controlled]]).max()

    norm.num_controlled = num_controlled
    return norm


# --------------------------------------------------------------------------------------------------------
# single embedded steps (local error regulariser)

def method_tableau(method: str):
    """The tableau of an adaptive method with an embedded error estimate (the local error regulariser's step)."""
    tab = get_tableau(method)
    if tab.b_err is None:
        raise ValueError(f"method {method!r} has no embedded error estimate; the local error regulariser "
                         "needs an adaptive method such as 'dopri5' or 'tsit5'")
    return tab


def local_error_step(func, t0: torch.Tensor, y0: tuple, f0: tuple, method: str, rtol: float, atol: float,
                     norm: Callable, t_end: torch.Tensor):
    """One embedded step of ``method`` from ``(t0, y0)`` with the Hairer-Norsett-Wanner starting step, for the
    local error regulariser: ``(ratio, dt, y1)``.

    ``dt = min(initial_step, t_end - t0)`` (detached) with the exponent convention of Pal et al.'s reference
    (``order = tableau.order``, see :func:`fastode.ops.rk.initial_step`); ``ratio`` is the solver's error ratio of
    that step under ``norm`` (a tuple norm), differentiable through the stages. Tuple states are flattened into one
    vector around the spec's functions.
    """
    tab = method_tableau(method)
    shapes = [y.shape for y in y0]
    numels = [y.numel() for y in y0]

    def flat(ts):
        return torch.cat([x.reshape(-1) for x in ts])

    def unflat(v):
        return tuple(p.reshape(sh) for p, sh in zip(torch.split(v, numels), shapes))

    def ffunc(t, v):
        return flat(func(t, unflat(v)))

    def fnorm(v):
        return norm(unflat(v))

    v0, g0 = flat(y0), flat(f0)
    dt, _ = rk_spec.initial_step(ffunc, t0, v0, g0, tab.order, rtol, atol, fnorm)
    dt = torch.min(dt, (t_end - t0).clamp_min(torch.finfo(v0.dtype).tiny))
    step = rk_spec.rk_step(ffunc, t0, v0, g0, dt, tab)
    ratio = rk_spec.error_ratio(step.y_err, v0, step.y1, rtol, atol, fnorm)
    return ratio, dt, unflat(step.y1)
