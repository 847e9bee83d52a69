"""The fused-CNF backend interface, the plans the fused engines hand to a backend, and what a backend returns.

A backend (:class:`FusedBackend`: C++ in :mod:`.cpp`, Triton in :mod:`.triton`) runs whole CNF solves of a plain
concatsquash MLP -- a fixed grid, a batch-global adaptive solve, a per-tile adaptive solve -- each differentiable by
its own autograd Function (the exact gradient of the discrete solve). What every backend needs of a solve (the
method, its options, the integrands, the gradient mode) is checked once, by the engines (:mod:`.engines`); a backend
says only what it cannot take beyond that (:meth:`FusedBackend.available`, :meth:`FusedBackend.supports`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from ...codes import Status
from ..engine_base import CnfSolve

__all__ = ["FusedBackend", "GridPlan", "AdaptivePlan", "FusedRun", "mean_tile_counts", "tile_failure"]


class GridPlan(NamedTuple):
    """A fixed-grid solve: ``tableau``; ``step_size`` (None: the output times are the grid); ``rates``: the ``q``
    rate names ("trace" unless the trace is off, then "kinetic" / "jac_frob" per integrand); ``nq_norm``: the ``q``
    columns in the step norm; ``check_finite``."""

    tableau: Any
    step_size: Optional[float]
    rates: tuple
    nq_norm: int
    check_finite: bool


class AdaptivePlan(NamedTuple):
    """An adaptive solve: ``tableau`` (FSAL, an error estimate, midpoint weights), ``rates``, ``nq_norm`` and the
    controller's settings ``ctl`` as host numbers (``rtol``, ``atol``, ``safety``, ``ifactor``, ``dfactor``,
    ``min_step``, ``max_step``, ``first_step`` or None, ``max_num_steps``)."""

    tableau: Any
    rates: tuple
    nq_norm: int
    ctl: dict


class FusedRun(NamedTuple):
    """What a backend's solve returns: ``z (B, D)`` and ``q (B, len(rates))`` at the end time, and its ``record``:
    a dict of counts (``status``, ``t_status``, ``nfe``, ``steps``, ``accepted``, ``rejected``, ``step_ts``,
    ``step_sizes``; optional ``launches``, ``counts`` (in-graph counts of a compiled solve)), or for a per-tile solve a
    list of such dicts, one per tile."""

    z: torch.Tensor
    q: torch.Tensor
    record: Any


class FusedBackend:
    """One native implementation of the fused CNF solves.

    ``name``: the MLP backend the dynamics must resolve to (the engines are ``f"{name}_grid"`` and
    ``f"{name}_adaptive"``). ``grid_traces``: the traces its grid solve integrates. ``grid_gradients``: the gradient
    modes its grid solve differentiates (the adaptive solves: ``"direct"`` and ``"checkpoint"``, the same exact
    gradient). ``count_backward`` (the solves' last argument): None, or ``f(n)`` that the backward calls with the
    network evaluations it recomputed (odeint's checkpoint mode counts them).
    """

    name: str = ""
    title: str = ""  # for messages: "C++", "Triton"
    grid_traces: tuple = ("hutchinson", "exact", "none")
    grid_gradients: tuple = ("direct", "checkpoint")

    def available(self, solve: CnfSolve) -> Optional[str]:
        """The cheap first checks (built or importable, the input's device, the CNF's switch): why not, or None."""
        raise NotImplementedError

    def supports(self, solve: CnfSolve, kind: str) -> Optional[str]:
        """Why this backend cannot run ``solve`` as a ``kind`` solve ("grid", "adaptive", "per_tile") although the
        engine's own checks passed, or None."""
        return None

    def grid(self, solve: CnfSolve, plan: GridPlan, grid: torch.Tensor, count_backward: Optional[Callable]) -> FusedRun:
        raise NotImplementedError

    def adaptive(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]) -> FusedRun:
        raise NotImplementedError

    def per_tile(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]) -> FusedRun:
        raise NotImplementedError


def mean_tile_counts(tiles, B: int, rows: int) -> dict:
    """Per-tile counts as one record: the row-weighted mean NFE / steps (what a row costs on average), no step grid
    (each tile has its own)."""
    weights = [min(rows, B - i * rows) / B for i in range(len(tiles))]
    mean = {k: int(round(sum(w * t_[k] for w, t_ in zip(weights, tiles)))) for k in ("nfe", "steps", "accepted",
                                                                                    "rejected")}
    return {"status": 0, "t_status": 0.0, **mean, "step_ts": [], "step_sizes": []}


def tile_failure(st: dict, tile: int, rows: int, B: int, ctl: dict) -> Exception:
    """The error ``odeint`` raises for the same failure (its class, the time, the remedies), for tile ``tile`` of a
    per-tile solve: each tile is its own batch-global problem, so this is what ``odeint`` on its rows would raise."""
    where = (f"at t={st['t_status']:.6g} in tile {tile} (rows {tile * rows}..{min(B, (tile + 1) * rows) - 1}) of the "
             "per-tile solve")
    return Status(st["status"]).error(where, ctl["rtol"], ctl["atol"], ctl["max_num_steps"])
