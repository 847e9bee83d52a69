"""The gradient matrix: every method x every gradient mode, gradients w.r.t. y0, t and the parameters of func
(float64, a tiny 2-D problem, a few steps).

* ``"direct"`` and ``"checkpoint"`` differentiate the discrete solve, so ``torch.autograd.gradcheck`` (finite
  differences of the very same discrete map) applies. For fixed-grid and multistep methods the discrete map is
  smooth and the default gradcheck tolerances are used. For adaptive methods the accepted step sizes depend
  on the inputs through the error controller, which the discrete gradient treats as constants (as torchdiffeq);
  that dependence changes the output by O(local error) ~ O(rtol) per unit change of the inputs, so gradcheck
  gets ``atol = rtol = 1e-5`` with the solve run at ``rtol = 1e-9`` (four orders of magnitude of headroom
  while still catching any wrong term, which would be O(1)).
* ``scipy_solver`` has no autograd through ``odeint``: it is only part of the ``"adjoint"`` column.
* ``"adjoint"`` is the continuous adjoint, which is *not* the derivative of the discrete solve: it converges to
  the exact gradient as the backward solve is refined. It is compared with the exact gradient (``"direct"``
  dopri5 at rtol 1e-12), each method run at a setting where its solution error is ~1e-6 or below; the bound is
  1e-4 relative (1e-3 for euler, whose O(h) error would need 10^4+ steps to get lower).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastode
from fastode.solvers import SOLVERS

ALL_METHODS = tuple(SOLVERS)
DISCRETE_METHODS = tuple(m for m in ALL_METHODS if m != "scipy_solver")
ADAPTIVE = {"dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"}

T_POINTS = (0.0, 0.3, 0.6)


def _inputs():
    g = torch.Generator().manual_seed(0)
    y0 = torch.tensor([0.4, -0.7], dtype=torch.float64)
    W = torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(2, generator=g, dtype=torch.float64) * 0.3
    t = torch.tensor(T_POINTS, dtype=torch.float64)
    return [x.clone().requires_grad_(True) for x in (y0, t, W, b)]


def _func(W, b):
    def f(t, y):
        return torch.tanh(y @ W.T + b) + 0.5 * torch.sin(2 * t) * y
    return f


def _discrete_settings(method):
    if method in ADAPTIVE:
        return dict(rtol=1e-9, atol=1e-10), dict(atol=1e-5, rtol=1e-5)
    return dict(options={"step_size": 0.1}), {}


def _solve(method, mode, y0, t, W, b, **kw):
    extra = {"adjoint_params": (W, b)} if mode == "adjoint" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # implicit_adams' "Functional iteration did not converge" at loose tol
        return fastode.odeint(_func(W, b), y0, t, method=method, gradient=mode, **kw, **extra)


@pytest.mark.parametrize("mode", ["direct", "checkpoint"])
@pytest.mark.parametrize("method", DISCRETE_METHODS)
def test_gradcheck_discrete_gradient(method, mode):
    solve_kw, check_kw = _discrete_settings(method)

    def fn(y0, t, W, b):
        return _solve(method, mode, y0, t, W, b, **solve_kw)

    assert torch.autograd.gradcheck(fn, tuple(_inputs()), eps=1e-6, **check_kw)


def _adjoint_settings(method):
    if method in ADAPTIVE or method == "scipy_solver":
        opts = {"solver": "DOP853"} if method == "scipy_solver" else None
        return dict(rtol=1e-10, atol=1e-12, options=opts), 1e-4
    step = {"euler": 1e-3, "midpoint": 0.01, "heun2": 0.01, "heun3": 0.02}.get(method, 0.05)
    if method in ("explicit_adams", "implicit_adams", "fixed_adams"):
        # AB up to order 11 is unstable for long runs (torchdiffeq's default max_order=12); 12 steps is fine
        step = 0.05
    return dict(options={"step_size": step}, rtol=1e-10, atol=1e-12), (1e-3 if method == "euler" else 1e-4)


@pytest.fixture(scope="module")
def exact_gradient():
    y0, t, W, b = _inputs()
    y = fastode.odeint(_func(W, b), y0, t, rtol=1e-12, atol=1e-14)
    loss = (y * torch.tensor([[0.3, -1.2]], dtype=torch.float64)).sum() + (y ** 2).sum()
    return y.detach(), torch.autograd.grad(loss, (y0, t, W, b))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_adjoint_gradient_converges_to_exact(method, exact_gradient):
    y_ref, g_ref = exact_gradient
    kw, tol = _adjoint_settings(method)
    y0, t, W, b = _inputs()
    y = _solve(method, "adjoint", y0, t, W, b, **kw)
    assert (y.detach() - y_ref).abs().max() < tol
    loss = (y * torch.tensor([[0.3, -1.2]], dtype=torch.float64)).sum() + (y ** 2).sum()
    grads = torch.autograd.grad(loss, (y0, t, W, b))
    for name, g, gr in zip(("y0", "t", "W", "b"), grads, g_ref):
        err = ((g - gr).abs().max() / gr.abs().max()).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "implicit_adams"])
def test_gradcheck_adjoint_reverse_time(method):
    # gradcheck of the adjoint itself on a decreasing-t solve: at these settings the continuous adjoint is within
    # ~1e-7 of the discrete derivative, so gradcheck with atol=rtol=1e-5 is meaningful (an O(1) error fails)
    kw = dict(rtol=1e-10, atol=1e-12) if method == "dopri5" else dict(options={"step_size": 0.02})

    def fn(y0, t, W, b):
        return _solve(method, "adjoint", y0, t.flip(0), W, b, **kw)

    assert torch.autograd.gradcheck(fn, tuple(_inputs()), eps=1e-6, atol=1e-5, rtol=1e-5)
