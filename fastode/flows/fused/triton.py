"""The Triton backend of the fused CNF engines (``"triton_grid"``, ``"triton_adaptive"``): CUDA solves (the CPU
under ``TRITON_INTERPRET=1`` when the MLP backend is ``"triton"`` explicitly), and its solve driver.

Kernel: :mod:`fastode.kernels.cnf_step` (one fused step or step attempt, the per-tile solve, their backward).
Launcher: :mod:`fastode.kernels.cnf_solve` (:class:`~fastode.kernels.cnf_solve.CnfLauncher`: one call, one launch).
Function: :mod:`fastode.triton._cnf` (the tape and the fused discrete adjoint). Solve driver (what the C++
backend does inside ``csrc/cnf_adaptive.cpp``): :mod:`.triton_solve`. This module: the backend, which turns a plan
into one driver call (through the Function when a gradient is wanted). It imports no Triton itself: a CPU solve
never loads it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...codes import Status
from ..engine_base import CnfSolve, wants_grad
from .base import AdaptivePlan, FusedBackend, FusedRun, GridPlan

__all__ = ["TritonBackend"]


class TritonBackend(FusedBackend):
    """Fused CNF solves as Triton launches. :attr:`sync_every`: how often the adaptive solve's host reads the
    device's control block (0, the default: once at the end -- it launches as many attempts as the previous solve of
    this configuration needed, launches after the end are no-ops, and it reads again only if those did not
    suffice)."""

    name = "triton"
    title = "Triton"
    sync_every = 0

    def available(self, solve: CnfSolve) -> Optional[str]:
        x = solve.x
        interpreted = x.device.type == "cpu" and _interpreter_requested()
        if x.device.type != "cuda" and not interpreted:  # (checked first: CPU solves never import Triton here)
            return f"the input is on {x.device} (the fused Triton solves run on CUDA)"
        try:
            import fastode.kernels.cnf_solve  # noqa: F401  (Triton is optional: can the kernels load?)
        except Exception as exc:  # triton is optional
            return f"the Triton kernels are not importable ({exc})"
        return None

    def supports(self, solve: CnfSolve, kind: str) -> Optional[str]:
        if kind == "per_tile" and solve.step_rows not in (16, 32, 64, 128):
            return f"step_rows={solve.step_rows} (the per-tile Triton solve runs tiles of 16, 32, 64 or 128 rows)"
        if not wants_grad(solve):
            return None
        if solve.e is not None and solve.e.requires_grad:
            return "the Hutchinson probe requires a gradient"
        if torch.compiler.is_compiling():
            return "under torch.compile with a gradient (the fused solve's tape has a data-dependent length)"
        if kind == "grid" and solve.t.requires_grad:
            return "the output times require a gradient (a learned end time moves the fixed grid)"
        return None

    def grid(self, solve: CnfSolve, plan: GridPlan, grid: torch.Tensor, count_backward: Optional[Callable]):
        stepper = _solver(solve, plan.tableau, plan.rates, plan.nq_norm, adaptive=False)
        e = _probe(solve)
        g = grid.detach()

        def forward(x, q0, tape):
            zT, qT, saved = stepper.grid(g, x, q0, e, tape=tape)
            return zT, qT, saved, {"launches": g.numel() - 1}

        return _run(solve, plan.rates, forward, stepper.grid_backward, count_backward)

    def adaptive(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]):
        stepper = _solver(solve, plan.tableau, plan.rates, plan.nq_norm, adaptive=True)
        e, td, sync = _probe(solve), solve.t.detach(), self.sync_every

        def forward(x, q0, tape):
            zT, qT, rec = stepper.adaptive(td[0], td[1], x, q0, e, time_dtype=solve.t.dtype, sync_every=sync,
                                           tape=tape, **plan.ctl)
            if not rec.pop("finite"):
                rec["status"] = rec["status"] or int(Status.NONFINITE)
            return zT, qT, rec.pop("saved", None), rec

        return _run(solve, plan.rates, forward, stepper.adaptive_backward, count_backward)

    def per_tile(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]):
        stepper = _solver(solve, plan.tableau, plan.rates, plan.nq_norm, adaptive=True, rows=solve.step_rows)
        e, td = _probe(solve), solve.t.detach()

        def forward(x, q0, tape):
            zT, qT, tiles, saved = stepper.per_tile(td[0], td[1], x, q0, e, time_dtype=solve.t.dtype, tape=tape,
                                                    **plan.ctl)
            return zT, qT, saved, tiles

        return _run(solve, plan.rates, forward, stepper.per_tile_backward, count_backward)


def _interpreter_requested() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe(solve: CnfSolve):
    return solve.e.detach() if solve.trace == "hutchinson" else None


def _run(solve: CnfSolve, rates, forward, backward, count_backward) -> FusedRun:
    """One solve through the Function (its exact gradient) when a gradient is wanted, else the forward alone."""
    x = solve.x
    q0 = solve.q0 if rates else x.new_zeros(x.shape[0], 0)
    if wants_grad(solve):
        from fastode.triton._cnf import SolveRunner, TritonCnfSolve

        with torch.enable_grad():  # views that carry the parameters' gradients, in the kernels' order
            params = [p for layer in solve.dynamics.params() for p in layer]
        zT, qT, record = TritonCnfSolve.apply(SolveRunner(forward, backward, count_backward), x, q0, solve.t, *params)
    else:
        zT, qT, _, record = forward(x.detach(), q0.detach(), False)
    return FusedRun(zT, qT, record)


def _solver(solve: CnfSolve, tableau, rates, nq_norm, adaptive: bool, rows: Optional[int] = None):
    """The driver of this solve's fused kernels; ``rows``: the tile height (per-tile control), else the MLP
    kernels' tile."""
    from fastode.kernels.cnf_solve import CnfLauncher
    from fastode.triton import _mlp as TB

    from .triton_solve import TritonCnfSolver

    x, dyn = solve.x, solve.dynamics
    with torch.no_grad():
        layers = [tuple(p.detach() for p in layer) for layer in dyn.params()]
    widths = [layers[0][0].shape[1]] + [layer[0].shape[0] for layer in layers]
    cfg = TB.launch_config(x.shape[1], widths, x.dtype)
    packed = TB.packed_params(layers, cfg["CH"], cfg["CD"])
    return TritonCnfSolver(CnfLauncher(packed, dyn.activation, solve.trace, rates, nq_norm, tableau,
                                       adaptive=adaptive, BM=rows or cfg["BM"], max_programs=TB.CONFIG["max_programs"],
                                       num_warps=TB.CONFIG["num_warps"]))
