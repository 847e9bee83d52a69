"""method="scipy_solver": every scipy method vs analytic solutions, torchdiffeq parity, no autograd through
odeint, gradients through odeint_adjoint, clear errors."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastode
from fastode.grad.adjoint import odeint_adjoint

from problems import Counter, ExpDecay, TupleODE, construct_problem, rel_error

SCIPY_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


@pytest.mark.parametrize("solver", SCIPY_METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scipy_methods_vs_analytic(solver, reverse):
    f, y0, t, sol = construct_problem(ode="sine", reverse=reverse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # no "arguments have no effect: min_step" noise (torchdiffeq has it)
        y = fastode.odeint(f, y0, t, method="scipy_solver", options={"solver": solver})
    assert y.shape == sol.shape and y.dtype == sol.dtype
    assert rel_error(sol, y) < 1e-3   # torchdiffeq's threshold for this test


@pytest.mark.parametrize("solver", ["RK45", "DOP853", "BDF"])
def test_tight_tolerance_decay_vs_analytic(solver):
    f = ExpDecay(k=0.5, omega=1.5).double()
    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    y = fastode.odeint(f, y0, t, method="scipy_solver", rtol=1e-10, atol=1e-12, options={"solver": solver})
    assert (y - f.y_exact(t, y0)).abs().max() < 1e-7


def test_matches_torchdiffeq_exactly_for_rk45():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f, y0, t, _ = construct_problem(ode="linear")
    a, b = Counter(f), Counter(f)
    y = fastode.odeint(a, y0, t, method="scipy_solver", options={"solver": "RK45"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_ref = torchdiffeq.odeint(b, y0, t, method="scipy_solver", options={"solver": "RK45"})
    assert torch.equal(y, y_ref)
    assert a.n == b.n


def test_tuple_state_float32_and_per_component_tolerances():
    f = TupleODE()
    y0 = (torch.linspace(-1, 1, 6).reshape(2, 3), torch.tensor(0.5))
    t = torch.linspace(0.0, 1.0, 4)
    y = fastode.odeint(f, y0, t, method="scipy_solver", rtol=[1e-7, 1e-8], atol=[1e-9, 1e-10],
                       options={"solver": "DOP853"})
    ex = f.y_exact(t, y0)
    for a, b in zip(y, ex):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).abs().max() < 1e-5


def test_single_time_point_and_stats():
    f, y0, t, _ = construct_problem(ode="sine")
    y = fastode.odeint(f, y0, t[:1], method="scipy_solver")
    assert y.shape == (1,) and torch.equal(y[0], y0.detach())
    y, stats = fastode.odeint(Counter(f), y0, t, method="scipy_solver", options={"solver": "RK45"},
                              return_stats=True)
    assert stats.num_steps == stats.num_accepted_steps == len(stats.step_ts) > 0
    assert stats.num_fevals > stats.num_steps
    assert abs(sum(stats.step_sizes) - (8.0 - 1.0)) < 1e-9
    assert stats.step_ts[0] == 1.0


def test_no_autograd_through_odeint():
    f, y0, t, _ = construct_problem(ode="sine")
    y = fastode.odeint(f, y0, t, method="scipy_solver")
    assert not y.requires_grad and y.grad_fn is None


@pytest.mark.parametrize("solver", ["LSODA", "RK45"])
def test_gradients_through_odeint_adjoint(solver):
    f = ExpDecay(k=0.4, omega=1.0).double()
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.5], dtype=torch.float64)
    y = odeint_adjoint(f, y0, t, method="scipy_solver", rtol=1e-9, atol=1e-11, options={"solver": solver})
    y[-1].sum().backward()
    # exact: y(T) = exp(-k T) R(omega T) y0 => d sum y(T) / d y0 = exp(-kT) R^T 1 ; d/dk = -T sum y(T)
    T, k, w = 1.5, 0.4, 1.0
    c, s = torch.cos(torch.tensor(w * T, dtype=torch.float64)), torch.sin(torch.tensor(w * T, dtype=torch.float64))
    e = torch.exp(torch.tensor(-k * T, dtype=torch.float64))
    grad_y0 = e * torch.stack([c + s, -s + c])
    assert (y0.grad - grad_y0).abs().max() < 1e-6
    assert abs(float(f.k.grad) - (-T * float(y[-1].detach().sum()))) < 1e-6


def test_failure_raises_with_scipy_message():
    def blowup(t, y):
        return y ** 2
    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)   # y = 1/(1 - t) blows up at t = 1
    with pytest.raises(RuntimeError, match="scipy_solver .* failed"):
        fastode.odeint(blowup, y0, t, method="scipy_solver", options={"solver": "RK45"})


def test_event_fn_is_a_clear_error():
    f, y0, t, _ = construct_problem(ode="sine")
    with pytest.raises(NotImplementedError, match="scipy_solver does not support event handling"):
        fastode.odeint(f, y0, t[:2], method="scipy_solver", event_fn=lambda t, y: y - 10.0)


def test_unknown_solver_and_unknown_option():
    f, y0, t, _ = construct_problem(ode="sine")
    with pytest.raises(ValueError, match='unknown solver "RK99"'):
        fastode.odeint(f, y0, t, method="scipy_solver", options={"solver": "RK99"})
    with pytest.warns(UserWarning, match=r"ScipyWrapperODESolver: Unexpected arguments \{'foo': 1\}"):
        fastode.odeint(f, y0, t, method="scipy_solver", options={"foo": 1})


def test_max_step_is_respected():
    f, y0, t, _ = construct_problem(ode="sine")
    _, stats = fastode.odeint(f, y0, t, method="scipy_solver", options={"solver": "RK45", "max_step": 0.1},
                              return_stats=True)
    assert max(stats.step_sizes) <= 0.1 + 1e-12
    assert stats.num_steps >= 70
