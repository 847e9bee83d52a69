"""FFJORD's moving batch normalisation as a flow layer (``lib/layers/normalization.py::MovingBatchNorm1d`` of
FFJORD and RNODE): ``y = (x - mean) / sqrt(var + eps) * exp(weight) + bias`` per feature, with ``log|det dy/dx| =
sum(weight - log(var + eps) / 2)``.

In training mode the forward direction normalises with the batch's mean and (unbiased) variance and moves the running
estimates towards them by ``decay``; in evaluation mode, and always in the inverse direction, it uses the running
estimates. ``bn_lag > 0`` blends the batch statistics with the running ones and removes the blend's bias, as FFJORD
does. Parameters and buffers carry FFJORD's names (``weight``, ``bias``, ``running_mean``, ``running_var``, ``step``),
so its checkpoints load as they are (:func:`fastode.flows.load_ffjord`).
"""
from __future__ import annotations

import torch
from torch import nn

from .cnf import FlowOutput

__all__ = ["MovingBatchNorm1d"]


class MovingBatchNorm1d(nn.Module):
    """Moving batch normalisation of ``dim`` features, a flow layer (``forward(x, reverse=False, ...) ->
    FlowOutput``); the affine ``weight`` is a log-scale, initialised (as ``bias``) to zero."""

    def __init__(self, dim: int, eps: float = 1e-4, decay: float = 0.1, bn_lag: float = 0.0, affine: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not 0.0 <= bn_lag < 1.0:
            raise ValueError(f"bn_lag must be in [0, 1), got {bn_lag}")
        self.dim, self.eps, self.decay, self.bn_lag, self.affine = int(dim), float(eps), float(decay), float(bn_lag), \
            bool(affine)
        self.register_buffer("step", torch.zeros(1))
        self.register_buffer("running_mean", torch.zeros(self.dim))
        self.register_buffer("running_var", torch.ones(self.dim))
        if self.affine:
            self.weight = nn.Parameter(torch.zeros(self.dim))
            self.bias = nn.Parameter(torch.zeros(self.dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, decay={self.decay}, bn_lag={self.bn_lag}, affine={self.affine}"

    def _statistics(self, x: torch.Tensor, reverse: bool):
        """The mean and variance this call normalises with (updating the running ones in a training forward)."""
        mean, var = self.running_mean.detach().clone(), self.running_var.detach().clone()
        if reverse or not self.training:
            return mean, var
        batch_mean, batch_var = x.mean(0), x.var(0)  # (unbiased, as FFJORD's torch.var)
        if self.bn_lag > 0:  # blended with the running estimates, and the blend's start-up bias removed
            debias = 1.0 - self.bn_lag ** (self.step[0] + 1)
            mean = (batch_mean - (1 - self.bn_lag) * (batch_mean - mean)) / debias
            var = (batch_var - (1 - self.bn_lag) * (batch_var - var)) / debias
        else:
            mean, var = batch_mean, batch_var
        with torch.no_grad():
            self.running_mean -= self.decay * (self.running_mean - batch_mean.detach())
            self.running_var -= self.decay * (self.running_var - batch_var.detach())
            self.step += 1
        return mean, var

    def forward(self, x: torch.Tensor, reverse: bool = False, noise=None, trace=None,
                compute_reg=None) -> FlowOutput:
        """Data -> latent (``reverse=False``) or back; ``noise`` / ``trace`` / ``compute_reg`` are a CNF's and
        ignored here. ``logdet``: ``log|det d out / d in|`` per sample."""
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a (batch, {self.dim}) input, got shape {tuple(x.shape)}")
        mean, var = self._statistics(x, reverse)
        log_scale = -0.5 * torch.log(var + self.eps)
        if self.affine:
            log_scale = log_scale + self.weight
        logdet = log_scale.sum().expand(x.shape[0])
        if reverse:
            y = x - self.bias if self.affine else x
            out = y * torch.exp(-log_scale) + mean
            return FlowOutput(out, -logdet, {})
        out = (x - mean) * torch.exp(log_scale) + (self.bias if self.affine else 0.0)
        return FlowOutput(out, logdet, {})
