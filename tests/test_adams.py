"""explicit_adams / implicit_adams / fixed_adams: coefficients, accuracy vs analytic solutions, parity with
torchdiffeq 0.2.5 (values and NFE), warnings and option errors."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import fastode
from fastode.errors import InvalidOptionError
from fastode.solvers import SOLVERS
from fastode.solvers.adams import (AdamsBashforth, AdamsBashforthMoulton, bashforth_coefficients,
                                   bashforth_fractions, moulton_coefficients, moulton_fractions)

from problems import ConstantODE, Counter, ExpDecay, MatrixODE, TupleODE, construct_problem, rel_error

torchdiffeq = pytest.importorskip("torchdiffeq")

ADAMS = ("explicit_adams", "implicit_adams")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("k", range(1, 13))
def test_coefficients_are_exact_quadrature(k):
    # an order-k Adams formula integrates every polynomial of degree < k exactly over one step
    ab, am = bashforth_fractions(k), moulton_fractions(k)
    for m in range(k):
        exact = Fraction(1, m + 1)                      # int_0^1 s^m ds
        assert sum(b * Fraction(-j) ** m for j, b in enumerate(ab)) == exact
        assert sum(b * Fraction(1 - j) ** m for j, b in enumerate(am)) == exact


def test_coefficients_match_known_values_and_torchdiffeq_tables():
    assert bashforth_fractions(4) == tuple(Fraction(x, 24) for x in (55, -59, 37, -9))
    assert moulton_fractions(4) == tuple(Fraction(x, 24) for x in (9, 19, -5, 1))
    from torchdiffeq._impl import fixed_adams as tfa
    for k in range(1, 13):
        assert list(bashforth_coefficients(k)) == tfa._BASHFORTH_DIVISOR[k].tolist()
        if k >= 2:   # torchdiffeq's order-1 Moulton entry is 1/11 (a divisor typo; never used)
            assert list(moulton_coefficients(k)) == tfa._MOULTON_DIVISOR[k].tolist()


def test_registry_and_alias():
    assert SOLVERS["explicit_adams"] is AdamsBashforth
    assert SOLVERS["implicit_adams"] is AdamsBashforthMoulton
    assert SOLVERS["fixed_adams"] is AdamsBashforthMoulton
    assert AdamsBashforth.order == 4 and AdamsBashforthMoulton.order == 4
    assert not AdamsBashforth.adaptive


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("method", ADAMS)
@pytest.mark.parametrize("reverse", [False, True])
def test_constant_problem_like_torchdiffeq_suite(method, reverse):
    f, y0, t, sol = construct_problem(ode="constant", reverse=reverse)
    y = _quiet(fastode.odeint, f, y0, t, method=method)
    assert rel_error(sol, y) < 3e-4


@pytest.mark.parametrize("method", ADAMS)
def test_rotation_decay_vs_analytic(method):
    f = ExpDecay(k=0.3, omega=1.0).double()
    y0 = torch.tensor([[1.0, 0.5], [-0.2, 0.3]], dtype=torch.float64)
    t = torch.linspace(0.0, 3.0, 7, dtype=torch.float64)
    y = _quiet(fastode.odeint, f, y0, t, method=method, options={"step_size": 0.01, "max_order": 6})
    assert (y - f.y_exact(t, y0)).abs().max() < 1e-8


@pytest.mark.parametrize("method,max_order,expected", [("explicit_adams", 5, 4), ("implicit_adams", 4, 4),
                                                       ("implicit_adams", 6, 5)])
def test_convergence_order(method, max_order, expected):
    # the multistep part has order len(history) (AB) / len(history) + 1 (AM); the two rk4 start-up steps add a
    # fixed number of O(h^5) local errors, which cap the observed global order at 5
    prob = MatrixODE(dim=3, seed=1)
    func, y0, T = prob.func(), torch.tensor(prob.y0), 1.0
    errs = []
    for n in (40, 80):
        t = torch.tensor([0.0, T], dtype=torch.float64)
        y = _quiet(fastode.odeint, func, y0, t, method=method,
                   options={"step_size": T / n, "max_order": max_order, "max_iters": 20},
                   rtol=1e-13, atol=1e-15)
        errs.append(np.abs(y[-1].numpy() - prob.exact(T)).max())
    rate = math.log2(errs[0] / errs[1])
    assert abs(rate - expected) < 0.6, (errs, rate)


def test_fixed_adams_equals_implicit_adams():
    f, y0, t, _ = construct_problem(ode="sine")
    a = _quiet(fastode.odeint, f, y0, t, method="fixed_adams", options={"step_size": 0.1})
    b = _quiet(fastode.odeint, f, y0, t, method="implicit_adams", options={"step_size": 0.1})
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- parity
PARITY_OPTIONS = [
    {},
    {"step_size": 0.07},
    {"step_size": 0.07, "interp": "cubic", "perturb": True},
    {"step_size": 0.05, "max_order": 5, "max_iters": 2},
]


def _forced_oscillator():
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64)
    return lambda t, y: y @ A.T + torch.sin(t)


@pytest.mark.parametrize("method", ADAMS)
@pytest.mark.parametrize("opt_index", range(len(PARITY_OPTIONS)))
@pytest.mark.parametrize("reverse", [False, True])
def test_parity_with_torchdiffeq(method, opt_index, reverse):
    options = PARITY_OPTIONS[opt_index]
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.linspace(0.0, 1.5, 16, dtype=torch.float64)
    if reverse:
        t = t.flip(0)
    ours, theirs = Counter(_forced_oscillator()), Counter(_forced_oscillator())
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        y = fastode.odeint(ours, y0, t, method=method, options=dict(options))
    with warnings.catch_warnings(record=True) as w_theirs:
        warnings.simplefilter("always")
        y_ref = torchdiffeq.odeint(theirs, y0, t, method=method, options=dict(options))
    assert ours.n == theirs.n
    assert (y - y_ref).abs().max() < 1e-12
    msg = "Functional iteration did not converge"
    assert sum(msg in str(w.message) for w in w_ours) == sum(msg in str(w.message) for w in w_theirs)


@pytest.mark.parametrize("method", ADAMS)
def test_parity_float32_and_tuple_state(method):
    f = TupleODE()
    y0 = (torch.linspace(-1, 1, 6).reshape(2, 3), torch.tensor(0.5))
    t = torch.linspace(0.0, 1.0, 5)
    # max_order=6: with the default 12, explicit_adams reaches AB11, which is unstable here (torchdiffeq's error
    # vs the exact solution is 2e-3 even in float64 at h=0.05), so float32 rounding differences get amplified.
    opts = {"step_size": 0.05, "max_order": 6}
    a = _quiet(fastode.odeint, f, y0, t, method=method, options=opts, rtol=1e-4, atol=1e-5)
    b = _quiet(torchdiffeq.odeint, f, y0, t, method=method, options=opts, rtol=1e-4, atol=1e-5)
    for x, y in zip(a, b):
        assert x.dtype == torch.float32 and x.shape == y.shape
        assert (x - y).abs().max() < 1e-6


@pytest.mark.parametrize("method", ADAMS)
def test_event_parity(method):
    f = ConstantODE().double()
    t0 = torch.tensor(1.0, dtype=torch.float64)
    y0 = f.y_exact(t0).detach()                   # y = 0.2 t + 3 exactly

    def event_fn(t, y):
        return y - 3.5

    kw = dict(event_fn=event_fn, method=method, options={"step_size": 0.01, "interp": "cubic"})
    et, sol = _quiet(fastode.odeint_event, f, y0, t0, **kw)
    et_ref, sol_ref = _quiet(torchdiffeq.odeint_event, f, y0, t0, **kw)
    et, et_ref = float(et.detach()), float(et_ref.detach())
    assert abs(et - et_ref) < 1e-9
    assert abs(et - 2.5) < 1e-4                   # y = 3.5 at t = 2.5
    assert (sol - sol_ref).abs().max() < 1e-9


# ---------------------------------------------------------------------------------------------- warnings/errors
def test_nonconvergence_warning_at_default_tolerances():
    f, y0, t, _ = construct_problem(ode="sine")
    with pytest.warns(UserWarning, match="Functional iteration did not converge. Solution may be incorrect."):
        fastode.odeint(f, y0, t, method="implicit_adams")


def test_max_order_below_4_warns_and_is_rk4():
    f, y0, t, _ = construct_problem(ode="sine")
    with pytest.warns(UserWarning, match="max_order is below 4, so the solver reduces to `rk4`."):
        y = fastode.odeint(f, y0, t, method="explicit_adams", options={"max_order": 3, "step_size": 0.1})
    y_rk4 = fastode.odeint(f, y0, t, method="rk4", options={"step_size": 0.1})
    assert (y - y_rk4).abs().max() < 1e-9 * y_rk4.abs().max()
    with pytest.warns(UserWarning, match="max_order is below 4"):
        y1 = fastode.odeint(f, y0, t, method="explicit_adams", options={"max_order": 1, "step_size": 0.1})
    assert torch.allclose(y1, y_rk4, rtol=1e-12, atol=0)   # torchdiffeq crashes (IndexError) here


@pytest.mark.parametrize("options,match", [
    ({"max_order": 13}, "max_order must be at most 12"),
    ({"max_order": 0}, "max_order must be at least 1"),
    ({"max_iters": 0}, "max_iters must be at least 1"),
])
def test_bad_options(options, match):
    f, y0, t, _ = construct_problem()
    with pytest.raises(InvalidOptionError, match=match):
        fastode.odeint(f, y0, t, method="implicit_adams", options=options)
    # torchdiffeq-style catches keep working
    with pytest.raises((AssertionError, ValueError)):
        fastode.odeint(f, y0, t, method="implicit_adams", options=options)


def test_unknown_option_warns_like_torchdiffeq():
    f, y0, t, _ = construct_problem()
    with pytest.warns(UserWarning, match=r"AdamsBashforth: Unexpected arguments \{'foo': 1\}"):
        _quiet_except_unexpected = fastode.odeint(f, y0, t, method="explicit_adams", options={"foo": 1})
    assert _quiet_except_unexpected.shape == (10,)


def test_stats_count_steps_and_fevals():
    f = Counter(_forced_oscillator())
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    y, stats = fastode.odeint(f, y0, t, method="explicit_adams", options={"step_size": 0.1}, return_stats=True)
    # 10 steps: two rk4 start-up steps (4 NFE each) then 8 Adams-Bashforth steps (1 NFE each)
    assert stats.num_steps == stats.num_accepted_steps == 10
    assert stats.num_fevals == f.n == 2 * 4 + 8
