"""odeint_dense vs torchdiffeq, and the tableau dense outputs (interp="dense")."""
import math

import pytest
import torch

import fastode

torchdiffeq = pytest.importorskip("torchdiffeq")
D = torch.float64


def f(t, y):
    return torch.stack([y[1], -y[0]]) * (1 + 0.1 * torch.cos(t))


def test_odeint_dense_matches_torchdiffeq():
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t0, t1 = torch.tensor(0.0, dtype=D), torch.tensor(3.0, dtype=D)
    da = torchdiffeq.odeint_dense(f, y0, t0, t1, rtol=1e-6, atol=1e-8, method="dopri5")
    db = fastode.odeint_dense(f, y0, t0, t1, rtol=1e-6, atol=1e-8, method="dopri5")
    for tv in torch.linspace(0.0, 2.99, 23, dtype=D):
        assert torch.allclose(da(tv), db(tv), atol=1e-12)
    # fastode accepts a vector of times
    tv = torch.linspace(0.0, 3.0, 7, dtype=D)
    out = db(tv)
    assert out.shape == (7, 2)
    ref = fastode.odeint(f, y0, tv, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out, ref, atol=1e-5)


# torchdiffeq's quartic interpolant is crude for long steps (bosh3's midpoint is only 1st order, dopri8's steps
# are long); dopri8 with its own continuous extension is accurate
@pytest.mark.parametrize("method,options,tol", [("dopri8", None, 1e-3), ("dopri8", dict(interp="dense"), 1e-6),
                                                ("tsit5", None, 1e-6), ("bosh3", None, 1e-3),
                                                ("adaptive_heun", None, 1e-4)])
def test_odeint_dense_other_methods_and_reverse(method, options, tol):
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    dense = fastode.odeint_dense(f, y0, 2.0, 0.0, rtol=1e-7, atol=1e-9, method=method, options=options)
    tv = torch.tensor([1.7, 0.9, 0.05], dtype=D)
    ref = fastode.odeint(f, y0, torch.cat([torch.tensor([2.0], dtype=D), tv]), rtol=1e-11, atol=1e-12)[1:]
    assert torch.allclose(dense(tv), ref, atol=tol)
    with pytest.raises(ValueError, match="outside the solved interval"):
        dense(torch.tensor(2.5, dtype=D))


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8"])
def test_interp_dense_more_accurate_than_quartic_for_dopri8(method):
    # at a loose tolerance (long steps), outputs inside steps: the method's own interpolant is at least as
    # accurate as the quartic; for dopri8 it is markedly better
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.linspace(0, 10, 41, dtype=D)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], -1)
    g = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    q = fastode.odeint(g, y0, t, method=method, rtol=1e-6, atol=1e-8)
    d = fastode.odeint(g, y0, t, method=method, rtol=1e-6, atol=1e-8, options=dict(interp="dense"))
    eq, ed = float((q - exact).abs().max()), float((d - exact).abs().max())
    assert ed < 1.5 * eq
    if method == "dopri8":
        assert ed < eq / 3


def test_land_on_end_is_exact_at_t_end_for_dopri8():
    # torchdiffeq's quartic caps dopri8's accuracy at t[-1]; land_on="end" removes the interpolation error there
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    g = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    t = torch.tensor([0.0, 2.0], dtype=D)
    exact = torch.tensor([math.cos(2.0), -math.sin(2.0)], dtype=D)
    a = fastode.odeint(g, y0, t, method="dopri8", rtol=1e-10, atol=1e-12)
    b, st = fastode.odeint(g, y0, t, method="dopri8", rtol=1e-10, atol=1e-12, options=dict(land_on="end"),
                           return_stats=True)
    ea, eb = float((a[-1] - exact).abs().max()), float((b[-1] - exact).abs().max())
    assert eb < 1e-9 and eb < ea / 10
    assert st.step_ts[-1] + st.step_sizes[-1] == 2.0   # the last step ends exactly at t[-1]


def test_land_on_all_hits_every_output_time():
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=D)
    sol, st = fastode.odeint(f, y0, t, options=dict(land_on="all"), return_stats=True)
    ends = {round(a + b, 15) for a, b in zip(st.step_ts, st.step_sizes)}
    assert {0.3, 1.1, 2.0} <= ends
    ref = fastode.odeint(f, y0, t, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sol, ref, atol=1e-6)
