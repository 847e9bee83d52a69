"""A fixed-grid solve of any traceable ``func`` as a static graph: ``torch.export`` (strict and non-strict) and ONNX.

:func:`fastode.odeint` reads its time grid on the host and checks for NaN/inf after the solve, which a static
graph cannot hold (non-strict export fails on the host read). :class:`FixedGridODE` reads the grid once, when it
is made (the grid ``odeint`` would build from ``t``, ``step_size`` or ``grid_constructor``), and unrolls the
solve: each step is :class:`fastode.compiled.grid_loop.GridLoop`'s step (the RK spec, the same stage times and
rounding as ``odeint``'s fixed-grid loop) and each output the same linear or cubic interpolant, so it gives what
``odeint`` gives, to rounding. Adaptive methods cannot be exported: their number of steps depends on the data.

    model = FixedGridODE(func, y0, t, method="rk4", options={"step_size": 0.05})
    ys = model(y0)                                  # = fastode.odeint(func, y0, t, method="rk4", options=...)
    export_odeint(func, y0, t, "ode.onnx", method="rk4", options={"step_size": 0.05})
"""
from __future__ import annotations

import torch
from torch import nn

from .compiled.grid_loop import GridLoop
from .driver import build_solver
from .inputs import check_inputs
from .solvers import SOLVERS, method_info

__all__ = ["FixedGridODE", "export_odeint"]


class FixedGridODE(nn.Module):
    """``forward(y0) -> ys``: ``odeint(func, y0, t, method=method, options=options)`` for the times ``t`` given
    here, as a static graph (see the module docstring). ``y0`` here is an example: its shape and dtype are fixed
    (the batch dimension stays free when exported with :func:`export_odeint`). Tensor states only; ``func``'s
    parameters are shared (an ``nn.Module`` func is a submodule)."""

    def __init__(self, func, y0: torch.Tensor, t: torch.Tensor, *, method: str = "rk4", options=None):
        super().__init__()
        info = method_info(method)
        if info.adaptive or info.rk_tableau is None:
            raise ValueError(f"method {method!r} cannot be exported: an adaptive solve's number of steps depends on "
                             "the data, which a static graph cannot hold; use a fixed-grid method, e.g. "
                             "FixedGridODE(func, y0, t, method='rk4', options={'step_size': 0.05})")
        if not isinstance(y0, torch.Tensor):
            raise ValueError("FixedGridODE takes a tensor state; concatenate a tuple state into one tensor")
        norm = check_inputs(func, y0, t, 1e-7, 1e-9, method, options, None, SOLVERS)
        solver = build_solver(norm)
        ctx = solver.prepare(norm.t.detach())
        self.func = func if isinstance(func, nn.Module) else None   # (registers its parameters)
        self._loop = GridLoop(solver, norm.func.base, ctx.grid.dtype, len(ctx.g_host) - 1)
        self._grid, self._times = list(ctx.g_host), list(ctx.t_host)
        self._plan = self._outputs_per_step()

    def _outputs_per_step(self) -> list:
        """For each grid step, the output indices it produces (``odeint``'s rule: the first step whose end
        reaches the output time)."""
        plan, j = [], 1
        for t1 in self._grid[1:]:
            here = []
            while j < len(self._times) and t1 >= self._times[j]:
                here.append(j)
                j += 1
            plan.append(here)
        return plan

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        lp, dev = self._loop, y0.device
        f64 = lambda v: torch.tensor(v, dtype=torch.float64, device=dev)  # noqa: E731
        outs, y = [y0], y0
        for i, here in enumerate(self._plan):
            t0, t1 = f64(self._grid[i]), f64(self._grid[i + 1])
            step, _ = lp.step(t0, t1, y)
            if here:
                t_sel = f64([self._times[j] for j in here])
                covered = torch.ones(len(here), dtype=torch.bool, device=dev)
                vals = lp.outputs(t0, t1, y, step, t_sel, covered, lp.fraction(t_sel, t0, t1), func=lp.base)
                outs.extend(vals.unbind(0))
            y = step.y1
        return torch.stack(outs)


def export_odeint(func, y0: torch.Tensor, t: torch.Tensor, path, *, method: str = "rk4", options=None,
                  strict: bool = False):
    """Write ``FixedGridODE(func, y0, t, method=method, options=options)`` as a deployable model: ``path`` ending
    in ``.onnx`` -> ONNX (``torch.onnx.export``; ``pip install fastode[export]``), else a ``torch.export`` program
    (``torch.export.save``; load with ``torch.export.load``). A batched state's leading dimension stays dynamic.
    Returns the exported program."""
    module = FixedGridODE(func, y0, t, method=method, options=options).eval()
    dynamic = {"y0": {0: torch.export.Dim("batch", min=1)}} if y0.dim() >= 2 else None
    path = str(path)
    with torch.no_grad():
        if path.endswith(".onnx"):
            program = torch.onnx.export(module, (y0,), dynamo=True, dynamic_shapes=dynamic)
            program.save(path)
        else:
            program = torch.export.export(module, (y0,), dynamic_shapes=dynamic, strict=strict)
            torch.export.save(program, path)
    return program
