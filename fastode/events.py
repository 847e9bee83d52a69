"""Event location (torchdiffeq semantics): sign-change detection per step, then bisection on the step's
interpolant to ``ceil(log2((t1 - t0) / tol))`` iterations with ``tol = atol``."""
from __future__ import annotations

import math

import torch

__all__ = ["find_event", "combine_event_functions"]


def find_event(interp_fn, sign0, t0, t1, event_fn, tol):
    """Bisection for the sign change of ``event_fn(t, interp_fn(t))`` inside ``[t0, t1]``.

    Returns ``(event_t, interp_fn(event_t))``; the state is differentiable through the interpolant (as in
    torchdiffeq), the event time is not (``odeint_event`` re-routes its gradient).
    """
    with torch.no_grad():
        tol = float(tol)
        width = float(t1 - t0)
        nitrs = 0 if width <= tol else int(math.ceil(math.log(width / tol) / math.log(2.0)))
        for _ in range(nitrs):
            t_mid = (t1 + t0) / 2.0
            y_mid = interp_fn(t_mid)
            sign_mid = torch.sign(event_fn(t_mid, y_mid))
            same_as_sign0 = (sign0 == sign_mid)
            t0 = torch.where(same_as_sign0, t_mid, t0)
            t1 = torch.where(same_as_sign0, t1, t_mid)
        event_t = (t0 + t1) / 2.0
    return event_t, interp_fn(event_t)


def combine_event_functions(event_fn, t0, y0):
    """Make every component of a multi-output ``event_fn`` initially positive and combine them with ``min``,
    so the solve stops at the first component that changes sign (torchdiffeq)."""
    with torch.no_grad():
        initial_signs = torch.sign(event_fn(t0, y0))

    def combined_event_fn(t, y):
        c = event_fn(t, y)
        return torch.min(c * initial_signs)

    return combined_event_fn
