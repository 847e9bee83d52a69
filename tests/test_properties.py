"""Property-based tests (hypothesis) of the public solver API.

Random state shapes (tensors and tuples), dtypes, the devices available, increasing and decreasing time grids,
methods and their options, gradient modes, and NaN/inf injected into the dynamics from a random time on. The
properties: every solve ends (finite ``max_num_steps``, a bounded deadline per case), returns the right
shapes and dtypes, agrees with the analytic solution of ``dy/dt = -a * y``, and never returns NaN silently:
a solve that meets a non-finite value either raises one of fastode's error classes with a message, or (when
the poisoned region was never needed) returns finite values.

``FASTODE_HYPOTHESIS_EXAMPLES`` raises the number of cases per property (the CI default keeps the file at a
few seconds); the case counts of a long run are in the closing note of the issue that added this file.
"""
import math
import os

import pytest
import torch

import fastode
from fastode.errors import FastodeError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("FASTODE_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ADAPTIVE = ["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun"]
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic", "explicit_adams", "implicit_adams"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COUNT = {"cases": 0, "raised": 0}


@st.composite
def problems(draw):
    """A random (method, options, states, rates, times, dtype, device, poison time) case."""
    method = draw(st.sampled_from(ADAPTIVE + FIXED))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    device = draw(st.sampled_from(DEVICES))
    n_comp = draw(st.integers(1, 3))
    tuple_state = n_comp > 1 or draw(st.booleans())
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))) for _ in range(n_comp)]
    rates = [draw(st.floats(0.1, 2.0)) for _ in range(n_comp)]
    n_t = draw(st.integers(1, 5))
    t0 = draw(st.floats(-2.0, 2.0))
    gaps = draw(st.lists(st.floats(0.05, 0.6), min_size=n_t - 1, max_size=n_t - 1))
    sign = draw(st.sampled_from([1.0, -1.0]))
    times = [t0]
    for g in gaps:
        times.append(times[-1] + sign * g)
    options = {}
    if method in FIXED:
        options["step_size"] = draw(st.sampled_from([0.01, 0.05, 0.1]))
    if method in ADAPTIVE and draw(st.booleans()):
        options["land_on"] = draw(st.sampled_from(["end", "all"]))
    # poison: from this fraction of the span on (in the solve's direction), func returns NaN or inf
    poison = draw(st.one_of(st.none(), st.tuples(st.floats(0.05, 0.9), st.sampled_from([math.nan, math.inf]))))
    return dict(method=method, dtype=dtype, device=device, tuple_state=tuple_state, shapes=shapes, rates=rates,
                times=times, options=options, poison=poison)


def _func(case, t_poison, bad_value):
    rates = case["rates"]
    span_sign = 1.0 if len(case["times"]) < 2 or case["times"][1] > case["times"][0] else -1.0

    def f(t, y):
        ys = y if case["tuple_state"] else (y,)
        out = [-r * yi for r, yi in zip(rates, ys)]
        if t_poison is not None and float(span_sign * (t.detach() - t_poison)) >= 0:
            out = [o + bad_value for o in out]
        return tuple(out) if case["tuple_state"] else out[0]

    return f


def _y0(case, requires_grad=False):
    g = torch.Generator().manual_seed(len(case["shapes"]) + 7)
    ys = [(torch.rand(s, generator=g, dtype=torch.float64) + 0.5).to(case["dtype"]).to(case["device"])
          .requires_grad_(requires_grad) for s in case["shapes"]]
    return tuple(ys) if case["tuple_state"] else ys[0]


def _poison_time(case):
    if case["poison"] is None or len(case["times"]) < 2:
        return None, None
    frac, value = case["poison"]
    ta, tb = case["times"][0], case["times"][-1]
    return ta + frac * (tb - ta), value


def _tol(case):
    """Relative error bound by method (fixed steps up to 0.1 with rates up to 2 and linear interpolation between
    grid points, which alone costs ~h^2 a^2 / 8; adaptive methods at rtol 1e-6)."""
    m = case["method"]
    if m == "euler":
        return 0.5
    if m in FIXED:
        return 1e-2 if m in ("rk4", "rk4_classic", "heun3") else 5e-2
    if m in ("fehlberg2", "adaptive_heun", "bosh3"):
        return 5e-2  # low order: their error estimates are loose at rtol 1e-6
    if m == "dopri8" and "land_on" not in case["options"]:
        return 2e-3  # torchdiffeq's quartic interpolant (the default) is far less accurate than dopri8's steps
    return 2e-3 if case["dtype"] == torch.float32 else 1e-4


@SETTINGS
@given(problems())
def test_solves_end_with_right_shapes_values_or_a_clear_error(case):
    COUNT["cases"] += 1
    t_poison, bad = _poison_time(case)
    f = _func(case, t_poison, bad)
    y0 = _y0(case)
    t = torch.tensor(case["times"], dtype=torch.float64 if case["dtype"] == torch.float64 else torch.float32,
                     device=case["device"])
    try:
        sol = fastode.odeint(f, y0, t, method=case["method"], options=dict(case["options"]) or None,
                             rtol=1e-6, atol=1e-8)
    except FastodeError as exc:
        COUNT["raised"] += 1
        assert t_poison is not None, f"a clean problem raised {type(exc).__name__}: {exc}"
        assert "t=" in str(exc) and len(str(exc)) > 40
        return
    outs = sol if case["tuple_state"] else (sol,)
    ins = y0 if case["tuple_state"] else (y0,)
    assert len(outs) == len(ins)
    for o, i, r in zip(outs, ins, case["rates"]):
        assert o.shape == (len(case["times"]),) + i.shape and o.dtype == i.dtype and o.device == i.device
        assert torch.isfinite(o).all(), "a non-finite solution was returned without an error"
        if t_poison is None:
            dt = torch.tensor(case["times"], dtype=torch.float64) - case["times"][0]
            exact = i.double().cpu()[None] * torch.exp(-r * dt).reshape((-1,) + (1,) * i.dim())
            assert torch.allclose(o.double().cpu(), exact, rtol=_tol(case), atol=_tol(case) * 1e-2)
    if t_poison is not None:
        # finite despite the poison: legitimate only if the poisoned region lies beyond what the solve needed
        # (a fixed grid can end before it, an adaptive solve can land on t[-1] or reject the overshoot); the
        # values must then be the clean solution's
        clean = fastode.odeint(_func(case, None, None), y0, t, method=case["method"],
                               options=dict(case["options"]) or None, rtol=1e-6, atol=1e-8)
        clean = clean if case["tuple_state"] else (clean,)
        for o, c in zip(outs, clean):
            assert torch.equal(o, c)


@settings(max_examples=max(EXAMPLES // 3, 10), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["direct", "checkpoint", "adjoint"]))
def test_gradients_finite_and_agree_across_modes(case, gradient):
    """Without poison, every gradient mode returns finite gradients of the right shapes; checkpoint equals
    direct (the same exact gradient of the discrete solve); the adjoint is close for accurate methods."""
    if case["method"] in ("explicit_adams", "implicit_adams") and gradient == "checkpoint":
        return  # refused with a clear error (tested in test_checkpoint.py)
    case["dtype"] = torch.float64
    f = _func(case, None, None)
    t = torch.tensor(case["times"], dtype=torch.float64, device=case["device"])
    grads = {}
    for mode in ("direct", gradient):
        y0 = _y0(case, requires_grad=True)
        extra = {} if mode == "direct" else {"adjoint_params": ()}  # f is a plain function: no parameters
        sol = fastode.odeint(f, y0, t, method=case["method"], options=dict(case["options"]) or None, rtol=1e-8,
                             atol=1e-10, gradient=mode, **extra)
        outs = sol if case["tuple_state"] else (sol,)
        loss = sum((o * o).sum() for o in outs)
        ins = y0 if case["tuple_state"] else (y0,)
        grads[mode] = torch.autograd.grad(loss, ins)
    for a, b, i in zip(grads["direct"], grads[gradient], _y0(case) if case["tuple_state"] else (_y0(case),)):
        assert a.shape == i.shape and torch.isfinite(b).all()
        if gradient == "checkpoint":
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        elif case["method"] in ("dopri5", "tsit5", "dopri8", "rk4", "rk4_classic"):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_report_case_counts():
    """Prints how many cases the properties above tried (run with ``-s`` to see it)."""
    print(f"\nhypothesis: {COUNT['cases']} solve cases, {COUNT['raised']} raised a fastode error")
    assert COUNT["cases"] == 0 or COUNT["cases"] >= min(EXAMPLES, 10)
