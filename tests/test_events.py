"""Event handling: odeint(event_fn=...) and odeint_event vs torchdiffeq and analytic event times/gradients."""
import math

import pytest
import torch

import fastode

torchdiffeq = pytest.importorskip("torchdiffeq")
D = torch.float64
G = 9.81


def ball(t, y):
    return torch.stack([y[1], torch.full_like(y[1], -G)])


def _exact_hit(h0, v0, reverse=False):
    s = math.sqrt(v0 * v0 + 2 * G * h0)
    return (v0 - s) / G if reverse else (v0 + s) / G


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method,options", [("dopri5", None), ("bosh3", None), ("dopri8", None),
                                            ("rk4", dict(step_size=0.01)), ("euler", dict(step_size=0.01)),
                                            ("midpoint", dict(step_size=0.02, interp="cubic")),
                                            ("explicit_adams", dict(step_size=0.01)),
                                            ("implicit_adams", dict(step_size=0.01)),
                                            ("fixed_adams", dict(step_size=0.01, interp="cubic"))])
def test_event_time_matches_torchdiffeq_and_analytic(method, options, reverse):
    y0 = torch.tensor([10.0, 1.5], dtype=D)
    t0 = torch.tensor(0.0, dtype=D)
    kw = dict(event_fn=lambda t, y: y[0], reverse_time=reverse, method=method, options=options, atol=1e-9,
              rtol=1e-9)
    ea, sa = torchdiffeq.odeint_event(ball, y0, t0, **kw)
    eb, sb = fastode.odeint_event(ball, y0, t0, **kw)
    assert float(eb) == pytest.approx(float(ea), abs=1e-12)
    assert torch.allclose(sa, sb, atol=1e-8)
    assert sb.shape == (2, 2) and torch.equal(sb[0], y0)
    if method == "bosh3":
        # bosh3 is exact for this quadratic trajectory, so its error estimate is ~0 and its steps grow tenfold per
        # step; the event is then located on torchdiffeq's crude bosh3 interpolant (1st-order midpoint): only
        # agreement with torchdiffeq is meaningful
        return
    tol = {"euler": 2e-2}.get(method, 1e-7 if options is None else 1e-4)
    assert float(eb) == pytest.approx(_exact_hit(10.0, 1.5, reverse), abs=tol)


@pytest.mark.parametrize("reverse", [False, True])
def test_event_time_gradient_implicit_function(reverse):
    y0 = torch.tensor([10.0, 1.5], dtype=D, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=D)
    et, sol = fastode.odeint_event(ball, y0, t0, event_fn=lambda t, y: y[0], reverse_time=reverse, atol=1e-10,
                                   rtol=1e-10)
    g = torch.autograd.grad(et, y0)[0]
    h0, v0 = 10.0, 1.5
    s = math.sqrt(v0 * v0 + 2 * G * h0)
    sign = -1.0 if reverse else 1.0
    assert float(g[0]) == pytest.approx(sign * 1 / s, rel=1e-6)
    assert float(g[1]) == pytest.approx((1 + sign * v0 / s) / G, rel=1e-6)
    # and the state at the event: v(t*) = v0 - G t*  ->  d v(t*)/d v0 = 1 - G dt*/dv0
    y0b = y0.detach().clone().requires_grad_(True)
    et, sol = fastode.odeint_event(ball, y0b, t0, event_fn=lambda t, y: y[0], reverse_time=reverse, atol=1e-10,
                                   rtol=1e-10)
    gv = torch.autograd.grad(sol[-1][1], y0b)[0]
    assert float(gv[1]) == pytest.approx(1 - G * (1 + sign * v0 / s) / G, abs=1e-6)


def test_event_multi_output_and_tuple_state():
    # stops at the first component that changes sign (torchdiffeq semantics)
    y0 = torch.tensor([10.0, 1.5], dtype=D)
    t0 = torch.tensor(0.0, dtype=D)
    ev = lambda t, y: torch.stack([y[0] - 5.0, y[0] - 8.0])  # noqa: E731
    ea, _ = torchdiffeq.odeint_event(ball, y0, t0, event_fn=ev)
    eb, _ = fastode.odeint_event(ball, y0, t0, event_fn=ev)
    assert float(eb) == pytest.approx(float(ea), abs=1e-10)
    # tuple state through odeint(event_fn=...)
    fy = lambda t, y: (y[1], torch.full_like(y[1], -G))  # noqa: E731
    y0t = (torch.tensor(10.0, dtype=D), torch.tensor(0.0, dtype=D))
    t = torch.tensor([0.0, 1.0], dtype=D)
    ea, sa = torchdiffeq.odeint(fy, y0t, t, event_fn=lambda t, y: y[0] - 5.0)
    eb, sb = fastode.odeint(fy, y0t, t, event_fn=lambda t, y: y[0] - 5.0)
    assert float(eb) == pytest.approx(float(ea), abs=1e-12)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(sa, sb))
    assert float(eb) == pytest.approx(math.sqrt(2 * 5.0 / G), abs=1e-6)


def test_event_with_stats_and_state_dtype():
    y0 = torch.tensor([10.0, 0.0])
    t = torch.tensor([0.0, 1.0])
    et, sol, stats = fastode.odeint(ball, y0, t, event_fn=lambda t, y: y[0], return_stats=True)
    assert et.dtype == torch.float32 and sol.dtype == torch.float32 and sol.shape == (2, 2)
    assert stats.num_accepted_steps > 0 and stats.num_fevals > 0
    assert float(et) == pytest.approx(math.sqrt(2 * 10.0 / G), abs=1e-5)


def test_event_at_initial_time_returns_immediately():
    y0 = torch.tensor([0.0, 1.0], dtype=D)
    et, sol = fastode.odeint(ball, y0, torch.tensor([0.0, 1.0], dtype=D), event_fn=lambda t, y: y[0])
    assert float(et) == 0.0 and torch.equal(sol[-1], y0)
