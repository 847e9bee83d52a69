"""Convergence orders of every method with forced constant steps, against a matrix-exponential reference."""

import numpy as np
import pytest
import torch

import fastode
from fastode.ops.rk import rk_step
from fastode.tableaus import TABLEAUS
from problems import ADAPTIVE_METHODS, FIXED_METHODS, MatrixODE

ORDERS = {name: tab.order for name, tab in TABLEAUS.items()}
T_END = 1.0
# step counts per method: errors well above float64 rounding, well inside the asymptotic regime
STEPS = {1: (32, 64, 128), 2: (16, 32, 64), 3: (8, 16, 32), 4: (8, 16, 32), 5: (4, 8, 16), 8: (3, 5, 8)}


def _slope(hs, errs):
    return np.polyfit(np.log(hs), np.log(errs), 1)[0]


def _solve(method, n, prob, T=T_END):
    h = T / n
    y0 = torch.tensor(prob.y0)
    t = torch.tensor([0.0, T], dtype=torch.float64)
    if method in ADAPTIVE_METHODS:
        opts = dict(first_step=h, min_step=h, max_step=h, land_on="end")
    else:
        opts = dict(step_size=h)
    return fastode.odeint(prob.func(), y0, t, method=method, options=opts)[-1].numpy()


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + FIXED_METHODS)
def test_convergence_order_public_api(method):
    prob = MatrixODE()
    p = ORDERS[method]
    T, ns = (4.0, (4, 6, 8)) if p == 8 else (T_END, STEPS[p])   # dopri8 is at rounding level at T=1
    exact = prob.exact(T)
    errs = [np.abs(_solve(method, n, prob, T) - exact).max() for n in ns]
    slope = _slope([T / n for n in ns], errs)
    assert p - 0.35 < slope < p + 0.9, (method, slope, errs)


@pytest.mark.parametrize("method", list(TABLEAUS))
def test_convergence_order_rk_step_nonlinear_time_dependent(method):
    # y' = cos(t) * y - 0.3 y^2: nonlinear and non-autonomous, so every order condition matters;
    # reference: the same problem at 8x finer steps with dopri8 (exact to ~1e-15)
    tab = TABLEAUS[method]
    f = lambda t, y: torch.cos(t) * y - 0.3 * y * y

    def solve(tab_, n):
        y = torch.tensor([0.8, 1.3], dtype=torch.float64)
        h = T_END / n
        for i in range(n):
            y = rk_step(f, i * h, y, None, h, tab_).y1
        return y

    ref = solve(TABLEAUS["dopri8"], 256)
    ns = STEPS[tab.order]
    errs = [float((solve(tab, n) - ref).abs().max()) for n in ns]
    slope = _slope([T_END / n for n in ns], errs)
    assert tab.order - 0.35 < slope < tab.order + 0.6, (method, slope, errs)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_dense_output_order(method):
    # the method's own continuous extension, evaluated mid-step, converges at its dense order
    dense_order = {"dopri5": 4, "tsit5": 4, "dopri8": 5}[method]
    prob = MatrixODE()
    errs, hs = [], []
    for n in (4, 8, 16):
        h = T_END / n
        t = torch.tensor([0.0, T_END - 0.5 * h], dtype=torch.float64)   # last output half-way through a step
        y = fastode.odeint(prob.func(), torch.tensor(prob.y0), t, method=method,
                           options=dict(first_step=h, min_step=h, max_step=h, interp="dense"))[-1]
        errs.append(np.abs(y.numpy() - prob.exact(T_END - 0.5 * h)).max())
        hs.append(h)
    slope = _slope(hs, errs)
    # the local dense error is O(h^(q+1)), so the global error is O(h^min(q+1, p))
    assert slope > dense_order + 0.5, (method, slope, errs)
