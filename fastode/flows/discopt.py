"""Onken & Ruthotto's Disc-Opt setting: time-varying weights and multilevel (coarse-to-fine) training.

Choices where the paper is ambiguous (tested in ``tests/test_flows_discopt.py``):

* The control times are absolute times (default: ``num_controls`` evenly spaced points on ``[0, T]``,
  ends included). ``theta(t)`` is the piecewise-linear interpolant of the control values; outside
  ``[c_0, c_{K-1}]`` it is held constant (a learnable ``T`` may move past the last control time).
* All control layers start as copies of one FFJORD-initialised layer (``init="copy"``), so at
  initialisation the model equals the stationary concatsquash MLP; ``init="independent"`` draws each
  control layer separately.
* Multilevel training changes the *state* grid (the training solver: RK4 step ``h`` halved, or adaptive
  tolerances tightened, as in the paper's MINIBOONE experiment: rk4 h=0.5 -> 0.25 with lr 1e-3 -> 5e-4),
  warm-starting the weights; optionally it also refines the *control* grid (``num_controls``), prolonging
  ``theta`` by evaluating the current interpolant at the new control times (exact when the new grid
  contains the old one, e.g. 2 -> 3 -> 5 evenly spaced points). The paper's schedule is a fixed
  number of epochs per level; ``train_fn`` decides when a level ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..nn.modules import ConcatSquashEvaluation

__all__ = [
    "TimeVaryingConcatSquashMLP",
    "MultilevelLevel",
    "multilevel_schedule",
    "apply_level",
    "multilevel_train",
]

_NAMES = ("W", "b", "gw", "gb", "bw")


class TimeVaryingConcatSquashMLP(ConcatSquashEvaluation, nn.Module):
    """Concatsquash MLP whose weights ``theta(t)`` are interpolated between control times.

    Same interface as :class:`fastode.nn.ConcatSquashMLP` (``forward(t, z)``,
    ``forward_with_trace(t, z, e=None, exact=False)``, ``params(t)``) and the same backends: the
    interpolated parameters are passed to the selected backend's functions. Parameters are stored per
    layer as ``(K, ...)`` tensors (``K`` control times).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh",
                 control_times: Sequence[float] | None = None, num_controls: int = 2, T: float = 1.0,
                 backend: str = "auto", noise: str = "gaussian", init: str = "copy"):
        super().__init__()
        from fastode.nn import ConcatSquashLinear

        if init not in ("copy", "independent"):
            raise ValueError(f"init must be 'copy' or 'independent', got {init!r}")
        dims = self._configure(dim, hidden, activation, backend, noise)
        if control_times is None:
            if int(num_controls) < 1:
                raise ValueError(f"num_controls must be >= 1, got {num_controls}")
            control_times = torch.linspace(0.0, float(T), int(num_controls)).tolist() if num_controls > 1 else [0.0]
        ct = torch.tensor([float(c) for c in control_times], dtype=torch.get_default_dtype())
        if ct.numel() > 1 and not bool((ct[1:] > ct[:-1]).all()):
            raise ValueError(f"control_times must be strictly increasing, got {list(control_times)}")
        self.register_buffer("control_times", ct)
        K = ct.numel()
        self.params_by_layer = nn.ModuleList()
        for a, b in zip(dims[:-1], dims[1:]):
            layers = [ConcatSquashLinear(a, b)]
            for _ in range(K - 1):
                layers.append(ConcatSquashLinear(a, b) if init == "independent" else layers[0])
            holder = nn.Module()
            for j, nm in enumerate(_NAMES):
                stacked = torch.stack([layer.params()[j].detach().clone() for layer in layers])
                holder.register_parameter(nm, nn.Parameter(stacked))
            self.params_by_layer.append(holder)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, activation={self.activation!r}, "
                f"control_times={[round(float(c), 6) for c in self.control_times]}, backend={self.backend!r}")

    @property
    def num_controls(self) -> int:
        return int(self.control_times.numel())

    def interpolation_weights(self, t) -> torch.Tensor:
        """Hat-function weights ``w_k(t)`` (``(K,)``, sum 1): ``theta(t) = sum_k w_k(t) theta_k``;
        differentiable in ``t``, constant outside the control interval."""
        c = self.control_times
        t = torch.as_tensor(t, dtype=c.dtype, device=c.device).reshape(())
        K = c.numel()
        if K == 1:
            return torch.ones(1, dtype=c.dtype, device=c.device) + 0 * t
        tc = torch.minimum(torch.maximum(t, c[0]), c[-1])
        inf = torch.full((1,), float("inf"), dtype=c.dtype, device=c.device)
        rise = torch.cat([inf, (tc - c[:-1]) / (c[1:] - c[:-1])])
        fall = torch.cat([(c[1:] - tc) / (c[1:] - c[:-1]), inf])
        return torch.minimum(rise, fall).clamp(0.0, 1.0)

    def params(self, t=0.0):
        """Per-layer ``(W, b, gw, gb, bw)`` tuples at time ``t``."""
        w = self.interpolation_weights(t)
        out = []
        for holder in self.params_by_layer:
            tup = []
            for nm in _NAMES:
                p = getattr(holder, nm)
                ww = w.to(p.dtype).reshape((-1,) + (1,) * (p.dim() - 1))
                tup.append((ww * p).sum(0))
            out.append(tuple(tup))
        return out

    def params_at(self, t):
        return self.params(t)

    def torch_forward(self, t, z):
        """Pure-PyTorch ``f(t, z)`` (composable with ``torch.func``; used by the TayNODE regulariser)."""
        from fastode.nn import functional as F

        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(())
        return F.concatsquash_mlp(t, z.reshape(-1, self.dim), self.params(t), self.activation).reshape(z.shape)

    @torch.no_grad()
    def refine(self, num_controls: int | None = None, control_times: Sequence[float] | None = None):
        """Prolong ``theta`` to new control times (evenly spaced over the current span when ``num_controls``
        is given) by evaluating the current interpolant there. Replaces the parameters (rebuild the
        optimiser; :func:`apply_level` does). Returns ``self``."""
        c = self.control_times
        if control_times is None:
            if num_controls is None or int(num_controls) < 1:
                raise ValueError("pass num_controls >= 1 or control_times")
            if int(num_controls) == 1:
                new_t = c[:1].clone()
            else:
                new_t = torch.linspace(float(c[0]), float(c[-1]) if c.numel() > 1 else 1.0, int(num_controls),
                                       dtype=c.dtype, device=c.device)
        else:
            new_t = torch.tensor([float(v) for v in control_times], dtype=c.dtype, device=c.device)
            if new_t.numel() > 1 and not bool((new_t[1:] > new_t[:-1]).all()):
                raise ValueError("control_times must be strictly increasing")
        W = torch.stack([self.interpolation_weights(tk) for tk in new_t])  # (K_new, K_old)
        for holder in self.params_by_layer:
            for nm in _NAMES:
                p = getattr(holder, nm)
                new = torch.einsum("nk,k...->n...", W.to(p.dtype), p)
                setattr(holder, nm, nn.Parameter(new.contiguous()))
        self.control_times = new_t
        return self


# --------------------------------------------------------------------------------------------------------
# multilevel training

@dataclass(frozen=True)
class MultilevelLevel:
    """One level: train ``iterations`` steps (or epochs; ``train_fn`` decides) with the given changes to
    every CNF block's *training* solver (``method``, ``step_size``, ``rtol``, ``atol``), learning rate and
    number of control times (time-varying dynamics only). ``None`` keeps the current value."""

    iterations: int
    method: str | None = None
    step_size: float | None = None
    rtol: float | None = None
    atol: float | None = None
    lr: float | None = None
    num_controls: int | None = None


def multilevel_schedule(iterations: Sequence[int], step_sizes: Sequence[float] | None = None,
                        method: str | None = None, tolerances: Sequence[tuple] | None = None,
                        lrs: Sequence[float] | None = None,
                        num_controls: Sequence[int] | None = None) -> list[MultilevelLevel]:
    """Build levels: ``multilevel_schedule((500, 1500), step_sizes=(0.5, 0.25), method="rk4", lrs=(1e-3, 5e-4))``
    (Disc-Opt, the paper's MINIBOONE schedule) or ``tolerances=((1e-3, 1e-5), (1e-6, 1e-8)),
    method="dopri5"`` (Opt-Disc; ``(rtol, atol)`` pairs)."""
    n = len(iterations)
    for nm, seq in (("step_sizes", step_sizes), ("tolerances", tolerances), ("lrs", lrs),
                    ("num_controls", num_controls)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{nm} has {len(seq)} entries but there are {n} levels")
    levels = []
    for i in range(n):
        rtol = atol = None
        if tolerances is not None:
            rtol, atol = tolerances[i]
        levels.append(MultilevelLevel(
            iterations=int(iterations[i]), method=method,
            step_size=None if step_sizes is None else float(step_sizes[i]),
            rtol=rtol, atol=atol, lr=None if lrs is None else float(lrs[i]),
            num_controls=None if num_controls is None else int(num_controls[i])))
    return levels


def apply_level(flow: nn.Module, level: MultilevelLevel, optimizer: torch.optim.Optimizer | None = None):
    """Switch ``flow`` to ``level`` (warm start: weights are kept). Returns the optimiser to use: the same
    one (with ``lr`` updated), or a new one of the same class when the control grid was refined (new
    parameters replace old ones; the optimiser's moments restart)."""
    from .solver import FIXED_GRID_METHODS

    changes = {}
    if level.method is not None:
        changes["method"] = level.method
        if level.method not in FIXED_GRID_METHODS and level.step_size is None:
            changes["step_size"] = None
    if level.step_size is not None:
        changes["step_size"] = level.step_size
    if level.rtol is not None:
        changes["rtol"] = level.rtol
    if level.atol is not None:
        changes["atol"] = level.atol
    if changes:
        flow.set_train_solver(**changes)
    replaced = False
    if level.num_controls is not None:
        before = {id(p) for p in flow.parameters()}
        tv = [m for m in flow.modules() if isinstance(m, TimeVaryingConcatSquashMLP)]
        if not tv:
            raise ValueError("num_controls given but the flow has no TimeVaryingConcatSquashMLP dynamics")
        for m in tv:
            if m.num_controls != level.num_controls:
                m.refine(level.num_controls)
                replaced = True
    if optimizer is None:
        return None
    if replaced:
        old_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in flow.parameters() if id(p) in old_ids or id(p) not in before]
        lr = optimizer.param_groups[0]["lr"]
        optimizer = type(optimizer)(params, **{**optimizer.defaults, "lr": lr})
    if level.lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = level.lr
    return optimizer


def multilevel_train(flow: nn.Module, levels: Sequence[MultilevelLevel], train_fn: Callable,
                     optimizer: torch.optim.Optimizer | None = None):
    """Coarse-to-fine training: for each level, :func:`apply_level` then
    ``train_fn(flow, optimizer, level, index)``. Returns the final optimiser."""
    for i, level in enumerate(levels):
        optimizer = apply_level(flow, level, optimizer)
        train_fn(flow, optimizer, level, i)
    return optimizer
