"""The C++ backend of the fused CNF engines (``"cpp_grid"``, ``"cpp_adaptive"``): float32/float64 CPU solves.

Kernel: ``csrc/cnf_step.cpp`` (one fused step), ``csrc/cnf_grid.cpp`` and ``csrc/cnf_adaptive.cpp`` (whole solves,
the adaptive loop with its controller and tape in C++). Launcher: ``csrc/bindings.cpp`` (and the custom ops of
:mod:`fastode.cpp._ops`, what compiled graphs call). Function: :mod:`fastode.cpp._rk` (``CnfStepper.solve``'s grid
Function, ``cnf_adaptive_solve``). This module: the backend, which turns a plan into one call.

The grid solve is differentiated as ``gradient="direct"`` only (its Function keeps the whole grid). The adaptive
solve's gradient is a discrete adjoint in C++: the forward records each accepted step's start, the backward walks
the steps in reverse; with ``"direct"`` the forward also keeps each step's activations (up to
:data:`STORED_STEPS_BYTES`), so the backward skips that recomputation -- the same gradient, bitwise. Per-tile control
runs the tiles in parallel over the threads, one thread per tile (the result does not depend on the thread count).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...codes import ACTIVATION_CODES, RATE_CODES
from ..engine_base import CnfSolve, wants_grad
from .base import AdaptivePlan, FusedBackend, FusedRun, GridPlan

__all__ = ["CppBackend", "STORED_STEPS_BYTES"]

#: gradient="direct" on the fused adaptive engine keeps each accepted step's activations (up to this many bytes per
#: solve; later steps are recomputed as with "checkpoint"): the same gradient without the backward's recomputation
#: of the forward (1.1-1.2x a training iteration). "checkpoint" keeps only the step starts. The buffers come from the
#: C++ core's buffer pool, reused between solves (fresh pages cost as much as the saving; ``fastode.cpp.empty_cache``).
STORED_STEPS_BYTES = 1 << 30

_UNDER_COMPILE = ("under torch.compile with a gradient (the fused adaptive solve's tape has a data-dependent length; "
                  "without a gradient it is one custom op): odeint's per-stage path traces, one custom op per "
                  "network evaluation, a graph break per step attempt")


class CppBackend(FusedBackend):
    """Fused CNF solves in the C++ extension (``fastode._C``), on CPU tensors, with the CNF's ``fused_cpu`` on."""

    name = "cpp"
    title = "C++"
    grid_traces = ("hutchinson", "exact")
    grid_gradients = ("direct",)

    def available(self, solve: CnfSolve) -> Optional[str]:
        if not solve.allow_fused:
            return "fused_cpu is off"
        try:
            import fastode.cpp as fc
        except Exception as exc:  # pragma: no cover
            return f"fastode.cpp is not importable ({exc})"
        if not fc.available():
            return "the C++ extension is not built"
        if solve.x.device.type != "cpu":
            return f"the input is on {solve.x.device}"
        return None

    def supports(self, solve: CnfSolve, kind: str) -> Optional[str]:
        if kind != "grid" and torch.compiler.is_compiling() and wants_grad(solve):
            return _UNDER_COMPILE  # the tape's length is data-dependent
        return None

    def grid(self, solve: CnfSolve, plan: GridPlan, grid: torch.Tensor, count_backward: Optional[Callable]):
        import fastode.cpp as fc

        stepper = fc.CnfStepper(solve.dynamics, plan.tableau, rates=plan.rates, backend="cpp")
        zT, qT = stepper.solve(grid, solve.x, solve.q0, solve.e if solve.trace == "hutchinson" else None)
        return FusedRun(zT, qT, {})

    def adaptive(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]):
        return self._solve(solve, plan, count_backward)

    def per_tile(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]):
        return self._solve(solve, plan, count_backward)

    def _solve(self, solve: CnfSolve, plan: AdaptivePlan, count_backward: Optional[Callable]) -> FusedRun:
        import fastode.cpp as fc

        x, t, dyn, tab = solve.x, solve.t, solve.dynamics, plan.tableau
        with torch.enable_grad():  # views that carry the parameters' gradients
            layers = dyn.params()
        params = [p for layer in layers for p in layer]
        B = x.shape[0]
        if plan.rates:
            q0, e = solve.q0, solve.e if solve.trace == "hutchinson" else None
        else:  # trace "none" (sampling): no q columns; the kernels still take a probe, a zero one is the cheapest
            q0, e = x.new_zeros(B, 0), x.new_zeros(x.shape)
        c = plan.ctl
        ctl = [c[k] for k in ("rtol", "atol", "safety", "ifactor", "dfactor", "min_step", "max_step")]
        ctl.append(0.0 if c["first_step"] is None else c["first_step"])  # 0: the first-step heuristic
        if solve.solver.gradient == "direct" and wants_grad(solve):  # keep step activations: no recomputation
            tiles = -(-B // solve.step_rows) if solve.step_rows else 1
            ctl.append(float(STORED_STEPS_BYTES // x.element_size() // tiles))
        # under torch.compile (no gradient: supports) the solve is one custom op whose counts stay in the graph
        run = {"act": ACTIVATION_CODES[dyn.activation], "rates": [RATE_CODES[r] for r in plan.rates],
               "tableau": fc.tableau_lists(tab), "c_mid": [float(v) for v in tab.c_mid], "ctl": ctl,
               "max_num_steps": c["max_num_steps"], "order": int(tab.order), "time_f32": t.dtype == torch.float32,
               "tile": fc.mlp_tile_rows(B, layers), "step_rows": int(solve.step_rows),
               "count_backward": count_backward}
        zT, qT, record = fc.cnf_adaptive_solve(t, x, q0, e, params, run)
        return FusedRun(zT, qT, record)
