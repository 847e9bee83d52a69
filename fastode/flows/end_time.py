"""TO-FLOW (Du et al., CVPR 2022): the end time ``T`` as an optimisation variable.

:class:`EndTimeOptimizer` owns the learnable end times of a flow's CNF blocks. Each step it adds the
temporal regularisation ``alpha * |T|`` (eq. 15) to the loss gradient, takes an optimiser step on ``T``
(Adam, lr 1e-2 in the paper) and applies the clip of eq. 17, ``T <- min(max(T, t0 + eps), 2 T0 - t0 - eps)``
with ``T0`` the initial end time (paper: alpha = 0.1, eps = 0.1, T0 = 0.5 toy / 1.0 images).

Two modes (``mode``):

* ``"alternate"`` (TO-FLOW's coordinate descent, Algorithm 1): after the theta step, a *new*
  forward/backward at the updated weights with theta frozen gives ``dL/dT`` (:meth:`alternate_step`).
  Only the parts of the graph that depend on ``T`` are differentiated (the last step / the final
  interpolation for ``gradient="direct"``), so the second backward is cheap; the second forward is not.
* ``"joint"``: ``T`` is updated from the same backward pass as theta (:meth:`step`), i.e. simultaneous
  gradient descent with TO-FLOW's penalty and clip (FFJORD's ``train_T`` plus those two).

Choices: the penalty is applied to ``T`` itself whatever the parametrisation (with
``T_parametrization="sqrt"`` the optimiser acts on ``s = sqrt(T)``; TO-FLOW's Adam-on-``T`` needs
``"linear"``); the loss whose ``T``-gradient is used is whatever the caller's loss is (the paper's is the NLL;
pass a loss without regularisers to match it). The paper's alpha is relative to a bits/dim loss; for a
nats-total NLL the same strength is ``alpha * D * ln 2``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["EndTimeOptimizer", "network_parameters", "end_time_parameters", "clip_end_time"]


def end_time_parameters(flow: nn.Module):
    """The learnable end-time parameters of ``flow``'s CNF blocks."""
    return flow.end_time_parameters()


def network_parameters(flow: nn.Module):
    """Every parameter of ``flow`` except the end times (build the theta optimiser from these)."""
    return flow.network_parameters()


def clip_end_time(T: float, T0: float, t0: float = 0.0, eps: float = 0.1) -> float:
    """TO-FLOW's eq. 17: clamp ``T`` to ``[t0 + eps, 2 T0 - t0 - eps]``."""
    lo, hi = t0 + eps, 2 * T0 - t0 - eps
    return min(max(float(T), lo), hi)


class EndTimeOptimizer:
    """Optimiser of the end times of ``flow``'s CNF blocks with TO-FLOW's penalty and clip.

    ``optimizer``: ``"adam"`` or ``"sgd"``, or a callable ``params -> torch.optim.Optimizer``.
    ``clip=False`` disables the clip (``T`` is then only kept positive, >= 1e-6).
    """

    def __init__(self, flow: nn.Module, lr: float = 1e-2, alpha: float = 0.1, eps: float = 0.1, t0: float = 0.0,
                 mode: str = "alternate", optimizer="adam", clip: bool = True):
        if mode not in ("alternate", "joint"):
            raise ValueError(f"mode must be 'alternate' or 'joint', got {mode!r}")
        self.flow = flow
        self.blocks = [b for b in flow.cnf_blocks() if isinstance(b._T_raw, nn.Parameter)]
        if not self.blocks:
            raise ValueError("the flow has no learnable end time; build its CNF blocks with learn_T=True")
        self.alpha, self.eps, self.t0, self.mode, self.clip = float(alpha), float(eps), float(t0), mode, bool(clip)
        self.T0 = [float(b.T.detach()) for b in self.blocks]
        if self.clip:
            for T0 in self.T0:
                if not (self.t0 + self.eps < 2 * T0 - self.t0 - self.eps):
                    raise ValueError(f"the clip interval [t0+eps, 2*T0-t0-eps] = [{self.t0 + self.eps}, "
                                     f"{2 * T0 - self.t0 - self.eps}] is empty for T0={T0}; use a smaller eps")
        params = [b._T_raw for b in self.blocks]
        if callable(optimizer):
            self.optimizer = optimizer(params)
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=lr)
        else:
            raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable, got {optimizer!r}")

    @property
    def parameters(self):
        return [b._T_raw for b in self.blocks]

    def end_times(self) -> list[float]:
        return [float(b.T.detach()) for b in self.blocks]

    def penalty(self) -> torch.Tensor:
        """Temporal regularisation ``alpha * sum_b |T_b|`` (differentiable)."""
        return self.alpha * sum(b.T.abs() for b in self.blocks)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def clip_(self):
        for b, T0 in zip(self.blocks, self.T0):
            T = float(b.T.detach())
            if self.clip:
                T = clip_end_time(T, T0, self.t0, self.eps)
            else:
                T = max(T, 1e-6)
            b.set_T(T)

    def step(self):
        """Add the penalty's gradient to the end times' ``.grad``, step the optimiser, clip."""
        if self.alpha:
            with torch.enable_grad():
                grads = torch.autograd.grad(self.penalty(), self.parameters)
            for p, g in zip(self.parameters, grads):
                p.grad = g.clone() if p.grad is None else p.grad + g
        self.optimizer.step()
        self.clip_()

    def state_dict(self) -> dict:
        """Optimiser state plus the clip centres ``T0`` (so that a resumed run keeps the same clip box)."""
        return {"optimizer": self.optimizer.state_dict(), "T0": list(self.T0)}

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        if len(state["T0"]) != len(self.T0):
            raise ValueError(f"state has {len(state['T0'])} end times but the flow has {len(self.T0)}")
        self.T0 = [float(v) for v in state["T0"]]

    def alternate_step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Coordinate-descent step on ``T``: with every other parameter frozen, ``loss = loss_fn()``,
        backward, :meth:`step`. Returns the (detached) loss."""
        net = self.flow.network_parameters()
        saved = [p.requires_grad for p in net]
        for p in net:
            p.requires_grad_(False)
        try:
            self.zero_grad()
            loss = loss_fn()
            if isinstance(loss, tuple):
                loss = loss[0]
            loss.backward()
        finally:
            for p, s in zip(net, saved):
                p.requires_grad_(s)
        self.step()
        self.zero_grad()
        return loss.detach()
