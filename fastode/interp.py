"""Dense output between the two ends of a step.

* :func:`quartic_fit` / :func:`quartic_eval` -- torchdiffeq's 4th-order interpolant through ``y0``, ``y1`` and
  ``y_mid = y0 + dt * sum_i c_mid_i k_i`` with end slopes ``f0``, ``f1`` (the default of every adaptive
  solver; same arithmetic as torchdiffeq so the outputs agree to rounding);
* :func:`tableau_dense` -- the method's own continuous extension ``y0 + dt * sum_i b_i(theta) k_i``
  (``interp="dense"``; tsit5, dopri5, dopri8);
* :func:`hermite_cubic` and :func:`linear` -- fixed-grid ``interp="cubic"`` / ``"linear"``.

``theta`` / ``x`` is a Python float or a 0-dim tensor (differentiable w.r.t. output times).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

from .ops.rk import combine_stages, combine_stages_exact
from .tableaus import ButcherTableau, dense_weights

__all__ = ["quartic_fit", "quartic_coefficients", "quartic_eval", "tableau_dense", "hermite_cubic", "linear"]

Scalar = Union[float, torch.Tensor]


def quartic_fit(y0, y1, k: Sequence[torch.Tensor], dt: Scalar, c_mid) -> List[torch.Tensor]:
    """Coefficients ``[e, d, c, b, a]`` of ``p(x) = e + d x + c x^2 + b x^3 + a x^4`` on ``x in [0, 1]``."""
    return quartic_coefficients(y0, y1, combine_stages_exact(y0, dt, c_mid, k), k[0], k[-1], dt)


def quartic_coefficients(y0, y1, y_mid, f0, f1, dt: Scalar) -> List[torch.Tensor]:
    """:func:`quartic_fit` from the step's ends, its midpoint ``y_mid`` and end slopes ``f0``, ``f1`` (a fused step
    computes the midpoint itself)."""
    a = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    b = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    c = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    d = dt * f0
    e = y0
    return [e, d, c, b, a]


def quartic_eval(coefficients: Sequence[torch.Tensor], x: Scalar) -> torch.Tensor:
    """Evaluate :func:`quartic_fit`'s polynomial at ``x`` (torchdiffeq's ``_interp_evaluate`` order)."""
    total = coefficients[0] + x * coefficients[1]
    x_power = x
    for coefficient in coefficients[2:]:
        x_power = x_power * x
        total = total + x_power * coefficient
    return total


def tableau_dense(tab: ButcherTableau, y0, k: Sequence[torch.Tensor], dt: Scalar, theta: Scalar) -> torch.Tensor:
    """``y0 + dt * sum_i b_i(theta) k_i`` with the tableau's own dense output."""
    return combine_stages(y0, dt, dense_weights(tab, theta), k)


def hermite_cubic(y0, f0, y1, f1, dt: Scalar, h: Scalar) -> torch.Tensor:
    """Cubic Hermite interpolation at fraction ``h`` of a step (torchdiffeq's fixed-grid ``interp="cubic"``)."""
    h00 = (1 + 2 * h) * (1 - h) * (1 - h)
    h10 = h * (1 - h) * (1 - h)
    h01 = h * h * (3 - 2 * h)
    h11 = h * h * (h - 1)
    return h00 * y0 + h10 * dt * f0 + h01 * y1 + h11 * dt * f1


def linear(y0, y1, slope: Scalar) -> torch.Tensor:
    """``y0 + slope * (y1 - y0)``."""
    return y0 + slope * (y1 - y0)
