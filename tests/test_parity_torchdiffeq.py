"""fastode vs torchdiffeq 0.2.5: same values (to tolerance) and the SAME number of function evaluations."""

import pytest
import torch

import fastode
from problems import (TORCHDIFFEQ_ADAPTIVE, TORCHDIFFEQ_FIXED, Counter, construct_problem, rel_error)

torchdiffeq = pytest.importorskip("torchdiffeq")


def _both(func, y0, t, **kw):
    ca, cb = Counter(func), Counter(func)
    a = torchdiffeq.odeint(ca, y0, t, **kw)
    b = fastode.odeint(cb, y0, t, **kw)
    return a, b, ca.n, cb.n


def _maxdiff(a, b):
    if isinstance(a, tuple):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))
    return float((a - b).abs().max())


def _lin(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(4, 4, generator=g) * 0.5).to(dtype)
    return lambda t, y: y @ A.T + torch.cos(t)


def _y0(dtype):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(dtype)


CASES = [(m, d) for m in TORCHDIFFEQ_ADAPTIVE for d in (torch.float32, torch.float64)]


def _tol(dtype, method):
    # values agree to rounding amplified through the step-size controller
    if dtype == torch.float32:
        return 5e-5
    return 1e-11


@pytest.mark.parametrize("method,dtype", CASES)
@pytest.mark.parametrize("variant", ["plain", "reverse", "tuple", "grid_points", "min_max_first", "len1"])
def test_adaptive_parity(method, dtype, variant):
    f, y0 = _lin(dtype), _y0(dtype)
    t = torch.linspace(0, 2, 6, dtype=dtype)
    tol = {"bosh3": 1e-4, "fehlberg2": 1e-3, "adaptive_heun": 1e-3}.get(method, 1e-5)   # keep NFE (runtime) small
    kw = dict(method=method, rtol=tol, atol=tol / 10)
    if variant == "reverse":
        t = t.flip(0)
    elif variant == "tuple":
        f0 = f
        f = lambda t, y: (f0(t, y[0]), -y[1] * t)
        y0 = (y0, y0[0, :2].clone())
    elif variant == "grid_points":
        kw["options"] = dict(step_t=torch.tensor([0.3, 1.1]), jump_t=torch.tensor([0.7]))
    elif variant == "min_max_first":
        kw["options"] = dict(min_step=1e-3, max_step=0.2, first_step=0.01)
    elif variant == "len1":
        t = t[:1]
    a, b, na, nb = _both(f, y0, t, **kw)
    assert nb == na
    assert _maxdiff(a, b) < _tol(dtype, method)
    if variant == "len1":
        assert torch.equal(b, y0[None])


@pytest.mark.parametrize("method", TORCHDIFFEQ_FIXED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["grid_t", "step_size", "short_last", "cubic", "perturb_reverse", "grid_constructor"])
def test_fixed_grid_parity(method, dtype, variant):
    f, y0 = _lin(dtype), _y0(dtype)
    t = torch.linspace(0, 1, 5, dtype=dtype)
    kw = dict(method=method)
    if variant == "step_size":
        kw["options"] = dict(step_size=0.05)
    elif variant == "short_last":
        kw["options"] = dict(step_size=0.3)   # grid 0, .3, .6, .9, 1.0
    elif variant == "cubic":
        kw["options"] = dict(step_size=0.07, interp="cubic")
    elif variant == "perturb_reverse":
        t = t.flip(0)
        kw["options"] = dict(step_size=0.1, perturb=True)
    elif variant == "grid_constructor":
        kw["options"] = dict(grid_constructor=lambda func, y0, t: torch.linspace(float(t[0]), float(t[-1]), 13,
                                                                                  dtype=t.dtype))
    a, b, na, nb = _both(f, y0, t, **kw)
    assert nb == na
    assert _maxdiff(a, b) < (2e-6 if dtype == torch.float32 else 1e-13)


def test_step_size_grid_matches_torchdiffeq_incl_spurious_last_step():
    # torchdiffeq's uniform grid can end with a tiny/zero-length step (e.g. T=1.1, h=0.01 in float32): same grid,
    # hence same NFE
    for T, h, dtype in [(1.1, 0.01, torch.float32), (2.7, 0.3, torch.float64), (1.0, 0.7, torch.float64)]:
        t = torch.tensor([0.0, T], dtype=dtype)
        y0 = torch.ones(2, dtype=dtype)
        a, b, na, nb = _both(lambda t, y: -y, y0, t, method="rk4", options=dict(step_size=h))
        assert na == nb
        assert _maxdiff(a, b) < 1e-5


@pytest.mark.parametrize("ode", ["constant", "linear", "sine"])
@pytest.mark.parametrize("reverse", [False, True])
def test_torchdiffeq_problems_dopri5(ode, reverse):
    for dtype in (torch.float32, torch.float64):
        f, y0, t, sol = construct_problem(ode=ode, reverse=reverse, dtype=dtype)
        a, b, na, nb = _both(f, y0, t)
        assert na == nb
        assert rel_error(sol, b) < (2e-3 if ode == "linear" else 1e-4)
        assert _maxdiff(a, b) < (1e-6 if dtype == torch.float32 else 1e-12) * max(1.0, float(a.abs().max()))


def test_callbacks_called_like_torchdiffeq():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log = []

        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            self.log.append(("step", float(t0), float(dt)))

        def callback_accept_step(self, t0, y0, dt):
            self.log.append(("accept", float(t0), float(dt)))

        def callback_reject_step(self, t0, y0, dt):
            self.log.append(("reject", float(t0), float(dt)))

    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    fa, fb = F(), F()
    torchdiffeq.odeint(fa, y0, t, rtol=1e-6, atol=1e-6, options=dict(first_step=0.9))
    fastode.odeint(fb, y0, t, rtol=1e-6, atol=1e-6, options=dict(first_step=0.9))
    assert [x[0] for x in fa.log] == [x[0] for x in fb.log]
    assert "reject" in [x[0] for x in fb.log]
    for x, y in zip(fa.log, fb.log):
        assert x[1] == pytest.approx(y[1], abs=1e-12) and x[2] == pytest.approx(y[2], abs=1e-12)


def test_float32_state_float64_clock_and_func_sees_state_dtype():
    seen = []

    def f(t, y):
        seen.append((t.dtype, t.dim()))
        return -y

    y0 = torch.ones(3)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = fastode.odeint(f, y0, t)
    assert out.dtype == torch.float32
    assert set(seen) == {(torch.float32, 0)}


def test_c1_stage_evaluated_at_nextafter_t1():
    # dopri5 stages 6 and 7 sit at c = 1: torchdiffeq evaluates them at nextafter(t1, -inf)
    ts = {"a": [], "b": []}

    def mk(key):
        def f(t, y):
            ts[key].append(float(t))
            return -y
        return f

    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torchdiffeq.odeint(mk("a"), y0, t, options=dict(first_step=0.5))
    fastode.odeint(mk("b"), y0, t, options=dict(first_step=0.5))
    assert ts["a"] == ts["b"]
    assert 0.5 not in ts["b"] and float(torch.nextafter(torch.tensor(0.5, dtype=torch.float64),
                                                        torch.tensor(-1.0, dtype=torch.float64))) in ts["b"]


@pytest.mark.parametrize("method,options,rtol", [
    ("rk4", dict(step_size=0.1), 1e-12), ("euler", dict(step_size=0.1), 1e-12), ("heun3", None, 1e-12),
    ("dopri5", dict(first_step=0.05), 1e-12), ("bosh3", dict(first_step=0.05), 1e-12),
    # with the initial-step heuristic torchdiffeq also differentiates the first step size (an O(tol) term)
    ("dopri5", None, 1e-5), ("dopri8", None, 1e-4),
])
def test_direct_gradients_match_torchdiffeq(method, options, rtol):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5)
    grads = []
    for lib in (torchdiffeq, fastode):
        Wp = W.clone().requires_grad_(True)
        y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(True)
        t = torch.tensor([0.0, 0.45, 1.25], dtype=torch.float64, requires_grad=True)   # not on the 0.1 grid
        sol = lib.odeint(lambda t, y: torch.tanh(y @ Wp.T) * torch.cos(t), y0, t, method=method, options=options,
                         rtol=1e-6, atol=1e-8)
        grads.append(torch.autograd.grad((sol ** 2).sum(), (y0, t, Wp)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * float(a.abs().max())), (a - b).abs().max()
