"""A trained flow frozen for deployment: standard operators only, so that ``torch.export`` and the ONNX exporter take
it whole.

:class:`DeployedFlow` solves every CNF block on a fixed grid (``steps`` steps of an explicit RK ``method`` over
``[0, T]``, the grid and the tableau baked in as constants when it is made), evaluates the network with the PyTorch
reference of the concatsquash MLP (:mod:`fastode.ops.concatsquash`: its exact trace is closed-form, so no autograd
runs inside the graph) and takes each step with the RK spec (:func:`fastode.ops.rk.rk_step`). ``what="log_prob"``:
``forward(x) -> log p(x)`` (exact trace); ``what="sample"``: ``forward(z) -> x`` (the inverse map, no divergence).
It shares the flow's parameters; it gives what the flow gives with the same fixed-grid evaluation solver
(``flow.using_solver(method, step_size=T / steps)``), to rounding.

Why a separate module: the flow's own solve reads its end time and grid on the host and picks an engine per call,
which export cannot trace; an adaptive solve's step count depends on the data, which a static graph cannot hold
(asking for one raises, naming the fixed-grid alternative).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import concatsquash as _ref
from ..ops.rk import combine_stages, rk_step
from .batchnorm import MovingBatchNorm1d
from .cnf import CNF, Flow, SequentialFlow

__all__ = ["DeployedFlow", "export_flow"]


class DeployedFlow(nn.Module):
    """``flow`` (a :class:`~fastode.flows.SequentialFlow` of CNF and :class:`~fastode.flows.MovingBatchNorm1d`
    blocks, or one CNF) as a static graph: see the module docstring. ``steps``: RK steps per CNF block (default:
    ``ceil(T / step_size)`` with ``step_size`` when given, else 8)."""

    def __init__(self, flow: Flow, what: str = "log_prob", method: str = "rk4", steps: int | None = None,
                 step_size: float | None = None):
        super().__init__()
        from fastode.nn import ConcatSquashMLP
        from fastode.solvers import method_info

        if what not in ("log_prob", "sample"):
            raise ValueError(f"what must be 'log_prob' or 'sample', got {what!r}")
        info = method_info(method)
        if info.adaptive or info.rk_tableau is None:
            raise ValueError(f"method {method!r} cannot be exported: an adaptive solve's number of steps depends on "
                             "the data, which a static graph cannot hold; use a fixed-grid method, e.g. "
                             "DeployedFlow(flow, method='rk4', steps=8)")
        self.what, self.method, self.tableau = what, method, info.rk_tableau
        blocks = list(flow.blocks) if isinstance(flow, SequentialFlow) else [flow]
        self.flow = flow  # (its parameters and buffers, shared)
        self.base = flow.base
        self._plan = []
        for i, b in enumerate(blocks):
            if isinstance(b, MovingBatchNorm1d):
                self._plan.append(("bn", b, None, None))
            elif isinstance(b, CNF):
                if type(b.dynamics) is not ConcatSquashMLP:
                    raise ValueError(f"block {i}: the dynamics is a {type(b.dynamics).__name__}; DeployedFlow exports "
                                     "plain ConcatSquashMLP dynamics")
                T = float(b.T.detach())
                n = int(steps) if steps is not None else (max(1, math.ceil(T / float(step_size) - 1e-12))
                                                          if step_size else 8)
                if n < 1:
                    raise ValueError(f"steps must be at least 1, got {n}")
                self._plan.append(("cnf", b, [T * k / n for k in range(n + 1)], b.dynamics.activation))
            else:
                raise ValueError(f"block {i}: a {type(b).__name__} cannot be exported; DeployedFlow takes CNF and "
                                 "MovingBatchNorm1d blocks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.what == "sample":
            for kind, block, grid, act in reversed(self._plan):
                x = block(x, reverse=True).out if kind == "bn" else self._solve(block, grid[::-1], act, x, False)[0]
            return x
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for kind, block, grid, act in self._plan:
            if kind == "bn":
                o = block(x)
                x, logdet = o.out, logdet + o.logdet
            else:
                x, d = self._solve(block, grid, act, x, True)
                logdet = logdet + d
        return self.base.log_prob(x) + logdet

    def _solve(self, cnf: CNF, grid, act, z, with_trace: bool):
        params = cnf.dynamics.params()
        D = z.shape[1]

        def func(t, y):
            if not with_trace:
                return _ref.concatsquash_mlp(t, y, params, act)
            f, trace = _ref.concatsquash_mlp_exact_trace(t, y[:, :D], params, act)
            return torch.cat([f, trace[:, None]], 1)

        y = torch.cat([z, z.new_zeros(z.shape[0], 1)], 1) if with_trace else z
        for t0, t1 in zip(grid[:-1], grid[1:]):
            y = rk_step(func, t0, y, None, t1 - t0, self.tableau, combine=combine_stages).y1
        return (y[:, :D], y[:, D]) if with_trace else (y, None)


def export_flow(flow: Flow, path, what: str = "log_prob", method: str = "rk4", steps: int | None = None,
                step_size: float | None = None, example=None, strict: bool = False):
    """Write ``flow`` as a deployable model: ``path`` ending in ``.onnx`` -> ONNX (``torch.onnx.export``, the batch
    dimension dynamic; needs ``pip install fastode[export]``), else a ``torch.export`` program (``.pt2``,
    ``torch.export.save``; load with ``torch.export.load``). ``what``, ``method``, ``steps``, ``step_size``: as
    :class:`DeployedFlow`. ``example``: an input batch to trace with (default: 4 standard-normal rows in the flow's
    dtype). Returns the exported program (``torch.export.ExportedProgram`` or ``torch.onnx.ONNXProgram``)."""
    module = DeployedFlow(flow, what=what, method=method, steps=steps, step_size=step_size).eval()
    if example is None:
        dim = flow.dim
        p = next(iter(flow.parameters()))
        example = torch.randn(4, dim, dtype=p.dtype, device=p.device)
    batch = {0: torch.export.Dim("batch", min=1)}
    path = str(path)
    with torch.no_grad():
        if path.endswith(".onnx"):
            program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes={"x": batch})
            program.save(path)
        else:
            program = torch.export.export(module, (example,), dynamic_shapes={"x": batch}, strict=strict)
            torch.export.save(program, path)
    return program
