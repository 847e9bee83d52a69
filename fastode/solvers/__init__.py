"""Solver registry: ``SOLVERS[name] -> solver class``.

The Runge-Kutta solvers are imported eagerly. The Adams solvers (``explicit_adams``, ``implicit_adams``,
``fixed_adams``; module ``fastode.solvers.adams``) and ``scipy_solver`` (``fastode.solvers.scipy_solver``) are
imported on first use, so that a missing or broken module only raises (with the reason) when that method is
requested.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import NamedTuple, Optional

from .base import ODEFunc, Perturb, Solver, tableau_solver
from .fixed_grid import FixedGridSolver
from .rk_adaptive import DEFAULT_MAX_NUM_STEPS, RKAdaptiveSolver
from ..ops.rk import RKStep, combine_stages, error_ratio, rk_step
from ..tableaus import TABLEAUS

__all__ = ["SOLVERS", "RK_SOLVERS", "Solver", "ODEFunc", "Perturb", "RKAdaptiveSolver", "FixedGridSolver",
           "rk_step", "RKStep", "combine_stages", "error_ratio", "DEFAULT_MAX_NUM_STEPS", "get_solver", "MethodInfo",
           "method_info"]

# torchdiffeq's class names for its methods (its warnings name the class: "Dopri5Solver: Unexpected arguments");
# any other tableau's class is named after it ("my_rk" -> "MyRkSolver")
_TORCHDIFFEQ_CLASS_NAMES = {
    "dopri8": "Dopri8Solver", "dopri5": "Dopri5Solver", "tsit5": "Tsit5Solver", "bosh3": "Bosh3Solver",
    "fehlberg2": "Fehlberg2", "adaptive_heun": "AdaptiveHeunSolver", "euler": "Euler", "midpoint": "Midpoint",
    "heun2": "Heun2", "heun3": "Heun3", "rk4": "RK4", "rk4_classic": "RK4Classic",
}


def _rk_solvers() -> dict:
    """Every explicit Runge-Kutta method, from :data:`fastode.tableaus.TABLEAUS` alone (DESIGN.md: a new method is
    one tableau): a tableau with an embedded error estimate (``b_err``) is an adaptive method, one without a
    fixed-grid method; in the tableaus' order."""
    out = {}
    for name, tab in TABLEAUS.items():
        base = RKAdaptiveSolver if tab.b_err is not None else FixedGridSolver
        cls_name = _TORCHDIFFEQ_CLASS_NAMES.get(name) or "".join(p.capitalize() for p in name.split("_")) + "Solver"
        out[name] = tableau_solver(base, name, cls_name)
    return out


RK_SOLVERS = _rk_solvers()
globals().update({cls.__name__: cls for cls in RK_SOLVERS.values()})  # importable (and picklable) by class name

# name -> (module, class name) for solvers imported lazily
_LAZY = {
    "explicit_adams": (".adams", "AdamsBashforth"),
    "implicit_adams": (".adams", "AdamsBashforthMoulton"),
    "fixed_adams": (".adams", "AdamsBashforthMoulton"),   # torchdiffeq's backwards-compatible alias
    "scipy_solver": (".scipy_solver", "ScipyWrapperODESolver"),
}


class _SolverTable(Mapping):
    """Read-only mapping name -> solver class that imports the lazy entries on access."""

    def __init__(self):
        self._eager = dict(RK_SOLVERS)
        self._names = list(self._eager) + [n for n in _LAZY if n not in self._eager]

    def __getitem__(self, name):
        if name in self._eager:
            return self._eager[name]
        if name not in _LAZY:
            raise KeyError(name)
        mod_name, cls_name = _LAZY[name]
        try:
            mod = importlib.import_module(mod_name, __name__)
            cls = getattr(mod, cls_name)
        except Exception as exc:
            raise ImportError(f"method {name!r} is unavailable: importing {cls_name} from "
                              f"fastode.solvers{mod_name} failed ({type(exc).__name__}: {exc}). The Runge-Kutta "
                              f"methods ({', '.join(self._eager)}) do not depend on it.") from exc
        return cls

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)

    def __contains__(self, name):
        return name in self._eager or name in _LAZY


SOLVERS = _SolverTable()


def suggest_method(name) -> list:
    """The valid method name closest to ``name`` (case-insensitive: ``"RK4"`` -> ``["rk4"]``), or ``[]``."""
    import difflib

    lower = {n.lower(): n for n in SOLVERS}
    key = str(name).lower().replace("-", "_")
    if key in lower:
        return [lower[key]]
    return [lower[m] for m in difflib.get_close_matches(key, list(lower), n=1)]


def get_solver(name: str):
    """``SOLVERS[name]`` with a helpful error for unknown names."""
    from ..errors import InvalidMethodError
    if name not in SOLVERS:
        close = suggest_method(name)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InvalidMethodError('Invalid method "{}". Must be one of {}.{}'.format(
            name, '{"' + '", "'.join(SOLVERS) + '"}', hint))
    return SOLVERS[name]


class MethodInfo(NamedTuple):
    """What a method is, read from its solver class (so that engines and the CNF need no hand-kept lists).

    ``adaptive``: error-controlled step sizes. ``fixed_grid``: steps on a grid (``t``, ``step_size`` or
    ``grid_constructor``). ``rk_tableau``: the explicit Butcher tableau when every step is one step of it (None for
    multistep methods, whose start-up tableau is not the step, and for scipy). ``options``: every option the
    solver takes, with its default.
    """

    name: str
    adaptive: bool
    fixed_grid: bool
    rk_tableau: Optional[object]
    options: dict


_NOT_OPTIONS = {"self", "func", "y0", "rtol", "atol", "norm"}


_INFOS: dict = {}  # a plain dict, filled at import for the built-in methods: torch.compile traces through
                  # functools caches (and cannot trace inspect), but it reads a dict


def method_info(name: str) -> MethodInfo:
    """:class:`MethodInfo` of the method ``name`` (raises :class:`~fastode.errors.InvalidMethodError` if unknown)."""
    info = _INFOS.get(name)
    if info is None:
        info = _INFOS[name] = _read_method_info(name)
    return info


def _read_method_info(name: str) -> MethodInfo:
    cls = get_solver(name)
    options: dict = {}
    for klass in cls.__mro__:        # subclass defaults win over the base class's
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name not in _NOT_OPTIONS and p.default is not inspect.Parameter.empty:
                options.setdefault(p.name, p.default)
    tab = getattr(cls, "tableau", None)
    single_step = tab is not None and not getattr(cls, "multistep", False)
    return MethodInfo(name, bool(cls.adaptive), issubclass(cls, FixedGridSolver), tab if single_step else None,
                      options)


for _name in SOLVERS._eager:  # the built-in methods' infos, read once here (see _INFOS)
    method_info(_name)
del _name
