"""The gradient matrix: every method x every gradient mode, gradients w.r.t. y0, t and the parameters of func
(float64, a tiny 2-D problem, a few steps).

* ``"direct"`` and ``"checkpoint"`` differentiate the discrete solve, so ``torch.autograd.gradcheck`` (finite
  differences of the very same discrete map) applies with its default tolerances: fixed-grid and multistep
  methods on a ``step_size`` grid that the output times do not hit (linear interpolation has kinks at grid
  points), adaptive methods with forced constant steps (``first_step = max_step``, huge tolerances: every step
  accepted, so the map is smooth). At a real tolerance the accepted steps depend on the inputs through the
  controller, which the discrete gradient treats as constants (as torchdiffeq); that moves the output by
  O(rtol) per unit change of the inputs, so dopri5/tsit5 are also gradchecked at ``rtol = 1e-9`` with
  ``atol = rtol = 1e-5`` (four orders of headroom; a wrong term would be O(1)).
* ``scipy_solver`` has no autograd through ``odeint``: it is only part of the ``"adjoint"`` column.
* ``"adjoint"`` is the continuous adjoint, which is *not* the derivative of the discrete solve: it converges to
  the exact gradient as the backward solve is refined. It is compared with the exact gradient (``"direct"``
  dopri5 at rtol 1e-12), each method run at a setting where its solution error is ~1e-6 or below; the bound is
  1e-4 relative (1e-3 for the order-2 adaptive methods, 5e-3 for euler at h = 1e-3: their errors would need
  10^4+ steps to get lower).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastode
from fastode.solvers import SOLVERS

pytestmark = pytest.mark.filterwarnings("ignore:Functional iteration did not converge")

ALL_METHODS = tuple(SOLVERS)
DISCRETE_METHODS = tuple(m for m in ALL_METHODS if m != "scipy_solver")
ADAPTIVE = {"dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"}

T_POINTS = (0.0, 0.25, 0.55)   # not on the step_size=0.1 grid (linear interpolation has kinks there)


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
        # forced constant steps (every step accepted, dt clamped to max_step): the discrete map is smooth, so
        # gradcheck's default tolerances apply; test_gradcheck_adaptive_at_real_tolerance covers the controller
        return dict(rtol=1e3, atol=1e3, options={"first_step": 0.05, "max_step": 0.05}), {}
    return dict(options={"step_size": 0.1}), {}


def _solve(method, mode, y0, t, W, b, **kw):
    extra = {"adjoint_params": (W, b)} if mode in ("adjoint", "checkpoint") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # implicit_adams' "Functional iteration did not converge" at loose tol
        return fastode.odeint(_func(W, b), y0, t, method=method, gradient=mode, **kw, **extra)


MULTISTEP = ("explicit_adams", "implicit_adams", "fixed_adams")
# checkpoint mode is for one-step methods (test_checkpoint_rejects_multistep covers Adams)
DISCRETE_CASES = [(m, mode) for m in DISCRETE_METHODS for mode in ("direct", "checkpoint")
                  if not (mode == "checkpoint" and m in MULTISTEP)]


@pytest.mark.parametrize("method,mode", DISCRETE_CASES)
def test_gradcheck_discrete_gradient(method, mode):
    solve_kw, check_kw = _discrete_settings(method)

    def fn(y0, t, W, b):
        return _solve(method, mode, y0, t, W, b, **solve_kw)

    assert torch.autograd.gradcheck(fn, tuple(_inputs()), eps=1e-6, **check_kw)


@pytest.mark.parametrize("method", MULTISTEP)
def test_checkpoint_rejects_multistep(method):
    # a multistep step depends on the whole history, so "one start state per step" is not enough to recompute it:
    # the checkpoint mode refuses with an error that names the alternatives rather than return a wrong gradient
    y0, t, W, b = _inputs()
    with pytest.raises(fastode.errors.InvalidOptionError, match='gradient="direct" or gradient="adjoint"'):
        _solve(method, "checkpoint", y0, t, W, b, options={"step_size": 0.1})


@pytest.mark.parametrize("mode", ["direct", "checkpoint"])
@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_gradcheck_adaptive_at_real_tolerance(method, mode):
    # accepted step sizes depend on the inputs through the controller, which the discrete gradient treats as
    # constants (as torchdiffeq); that dependence moves the output by O(local error) ~ O(rtol) per unit change of
    # the inputs, so at rtol=1e-9 gradcheck with atol=rtol=1e-5 has 4 orders of headroom (a wrong term is O(1)).
    def fn(y0, t, W, b):
        return _solve(method, mode, y0, t, W, b, rtol=1e-9, atol=1e-10)

    assert torch.autograd.gradcheck(fn, tuple(_inputs()), eps=1e-6, atol=1e-5, rtol=1e-5)


def _adjoint_settings(method):
    if method in ("adaptive_heun", "fehlberg2"):   # order 2: tighter tolerances take thousands of steps
        return dict(rtol=1e-6, atol=1e-8), 1e-3
    if method in ADAPTIVE or method == "scipy_solver":
        opts = {"solver": "DOP853"} if method == "scipy_solver" else None
        return dict(rtol=1e-10, atol=1e-12, options=opts), 1e-4
    step = {"euler": 1e-3, "midpoint": 0.01, "heun2": 0.01, "heun3": 0.02}.get(method, 0.05)
    if method in ("explicit_adams", "implicit_adams", "fixed_adams"):
        # AB up to order 11 is unstable for long runs (torchdiffeq's default max_order=12); 12 steps is fine
        step = 0.05
    # euler: O(h) = 1e-3 global error at h = 1e-3 (a tighter bound needs 10^4+ steps)
    return dict(options={"step_size": step}, rtol=1e-10, atol=1e-12), (5e-3 if method == "euler" else 1e-4)


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


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_gradcheck_adjoint_reverse_time(method):
    # gradcheck of the adjoint itself on a decreasing-t solve: at these settings the continuous adjoint is within
    # ~1e-7 of the discrete derivative, so gradcheck with atol=rtol=1e-5 is meaningful (an O(1) error fails).
    # rk4 uses interp="cubic": the backward restarts at every output time, so the forward's O(h^2) linear
    # interpolation error at outputs between grid points would otherwise show up as a 1e-4 mismatch.
    kw = dict(rtol=1e-10, atol=1e-12) if method == "dopri5" else dict(options={"step_size": 0.02,
                                                                                  "interp": "cubic"})

    def fn(y0, t, W, b):
        return _solve(method, "adjoint", y0, t.flip(0), W, b, **kw)

    assert torch.autograd.gradcheck(fn, tuple(_inputs()), eps=1e-6, atol=1e-5, rtol=1e-5)
