"""Bijective preprocessing with exact log-determinants, so that NLLs can be stated in the data space.

Every transform maps data-space ``x`` (N, D) to model-space ``z`` and returns the per-sample
``log|det dz/dx|``. A density model ``p_Z`` on ``z`` then gives the data-space density

    log p_X(x) = log p_Z(z(x)) + log|det dz/dx|,     i.e.  NLL_x = NLL_z - logdet.

Transforms take and return torch tensors (numpy arrays are converted; the computation is float64 unless the
input is already a floating tensor), are differentiable, and have an ``inverse`` (used to map samples back).
Dequantisation (adding uniform noise to integer data) is *not* a bijection and lives in
:func:`fastode.data.tabular.dequantize`; see there for what it means for the NLL.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["Transform", "Standardize", "LogOffset", "Logit", "Compose", "as_tensor"]


def as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.double()
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


class Transform:
    """Base class: ``forward(x) -> (z, logdet)`` and ``inverse(z) -> x``; parameters are numpy float64."""

    def forward(self, x):
        raise NotImplementedError

    def inverse(self, z):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def state(self) -> dict:
        """JSON-friendly description (type and parameters)."""
        return {"type": type(self).__name__}

    def _p(self, v, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(v, dtype=like.dtype, device=like.device)


class Standardize(Transform):
    """``z = (x - mu) / s`` per column; ``logdet = -sum(log s)`` (the same for every sample)."""

    def __init__(self, mu, s):
        self.mu = np.asarray(mu, dtype=np.float64)
        self.s = np.asarray(s, dtype=np.float64)
        if np.any(self.s <= 0):
            raise ValueError("Standardize needs positive scales; a column is constant (drop it first)")

    def forward(self, x):
        x = as_tensor(x)
        z = (x - self._p(self.mu, x)) / self._p(self.s, x)
        logdet = torch.full(x.shape[:-1], -float(np.log(self.s).sum()), dtype=x.dtype, device=x.device)
        return z, logdet

    def inverse(self, z):
        z = as_tensor(z)
        return z * self._p(self.s, z) + self._p(self.mu, z)

    def state(self):
        return {"type": "Standardize", "mu": self.mu.tolist(), "s": self.s.tolist()}


class LogOffset(Transform):
    """``z = log(x + c)`` per column (for positive, heavy-tailed data); ``logdet = -sum(log(x + c))``."""

    def __init__(self, c):
        self.c = np.asarray(c, dtype=np.float64)

    def forward(self, x):
        x = as_tensor(x)
        y = x + self._p(self.c, x)
        z = torch.log(y)
        return z, -z.sum(-1)

    def inverse(self, z):
        z = as_tensor(z)
        return torch.exp(z) - self._p(self.c, z)

    def state(self):
        return {"type": "LogOffset", "c": self.c.tolist()}


class Logit(Transform):
    """RealNVP/FFJORD's logit transform of data in ``[0, scale]``:
    ``p = alpha + (1 - 2 alpha) x / scale``, ``z = log p - log(1 - p)``;
    ``logdet = sum(log((1 - 2 alpha) / scale) - log p - log(1 - p))``."""

    def __init__(self, scale: float, alpha: float = 1e-6):
        if not 0 <= alpha < 0.5:
            raise ValueError(f"Logit alpha must be in [0, 0.5), got {alpha}")
        self.scale = float(scale)
        self.alpha = float(alpha)

    def forward(self, x):
        x = as_tensor(x)
        a = self.alpha
        p = a + (1 - 2 * a) * x / self.scale
        lp, l1p = torch.log(p), torch.log1p(-p)
        z = lp - l1p
        logdet = (math.log((1 - 2 * a) / self.scale) - lp - l1p).sum(-1)
        return z, logdet

    def inverse(self, z):
        z = as_tensor(z)
        return (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha) * self.scale

    def state(self):
        return {"type": "Logit", "scale": self.scale, "alpha": self.alpha}


class Compose(Transform):
    """Apply ``transforms`` in order; log-determinants add up."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def forward(self, x):
        z = as_tensor(x)
        total = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for t in self.transforms:
            z, ld = t.forward(z)
            total = total + ld
        return z, total

    def inverse(self, z):
        x = as_tensor(z)
        for t in reversed(self.transforms):
            x = t.inverse(x)
        return x

    def state(self):
        return {"type": "Compose", "transforms": [t.state() for t in self.transforms]}
