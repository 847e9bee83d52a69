"""Every method against analytic solutions and scipy.integrate.solve_ivp."""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import fastode
from problems import ADAPTIVE_METHODS, FIXED_METHODS, ExpDecay, TimeDependent, construct_problem, rel_error

D = torch.float64
FIXED_STEP = {"euler": 1e-3, "midpoint": 1e-2, "heun2": 1e-2, "heun3": 2e-2, "rk4": 5e-2, "rk4_classic": 5e-2}
FIXED_TOL = {"euler": 5e-3, "midpoint": 1e-4, "heun2": 1e-4, "heun3": 1e-5, "rk4": 5e-6, "rk4_classic": 5e-6}


LOW_ORDER = ("bosh3", "fehlberg2", "adaptive_heun")


def _kw(method, tol=1e-9):
    if method in FIXED_METHODS:
        return dict(method=method, options=dict(step_size=FIXED_STEP[method]))
    if method in LOW_ORDER:
        tol = max(tol, 1e-6)   # keep the step count (runtime) small
    return dict(method=method, rtol=tol, atol=tol)


def _tol(method, adaptive_tol):
    return FIXED_TOL.get(method, adaptive_tol)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + FIXED_METHODS)
def test_analytic_rotation_decay(method):
    f = ExpDecay().double()
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=D)
    t = torch.linspace(0, 2, 5, dtype=D)
    with torch.no_grad():
        out = fastode.odeint(f, y0, t, **_kw(method))
        exact = f.y_exact(t, y0)
    assert float((out - exact).abs().max()) < _tol(method, 1e-3 if method in LOW_ORDER else 1e-5)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + FIXED_METHODS)
def test_analytic_time_dependent_reverse(method):
    f = TimeDependent()
    y0 = torch.tensor([0.7, -1.2], dtype=D)
    t = torch.tensor([2.0, 1.2, 0.1], dtype=D)
    out = fastode.odeint(f, y0, t, **_kw(method))
    exact = f.y_exact(t, y0, t0=2.0)
    assert float((out - exact).abs().max()) < _tol(method, 1e-3 if method in LOW_ORDER else 1e-5)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
@pytest.mark.parametrize("ode", ["constant", "sine"])
def test_torchdiffeq_problems(method, ode):
    f, y0, t, sol = construct_problem(ode=ode, dtype=D)
    if ode == "sine" and method in ("fehlberg2", "adaptive_heun"):
        t = t[:3]   # (thousands of steps at the default tolerances: keep the runtime small)
        sol = sol[:3]
    with torch.no_grad():
        y = fastode.odeint(f, y0, t, method=method)
    eps = {"adaptive_heun": 4e-3, "bosh3": 3e-3}.get(method, 1e-4)
    assert rel_error(sol, y) < eps


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + FIXED_METHODS)
def test_against_scipy_van_der_pol(method):
    mu = 1.5

    def f_np(t, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    def f(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    t_eval = np.linspace(0, 4, 9)
    ref = solve_ivp(f_np, (0, 4), [2.0, 0.0], method="DOP853", t_eval=t_eval, rtol=1e-12, atol=1e-12).y.T
    out = fastode.odeint(f, torch.tensor([2.0, 0.0], dtype=D), torch.tensor(t_eval), **_kw(method)).numpy()
    tol = _tol(method, 3e-4 if method in LOW_ORDER else 1e-6) * 20
    assert np.abs(out - ref).max() < tol
