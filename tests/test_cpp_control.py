"""The C++ adaptive solve's step control, named as the spec it mirrors, checked against that spec: the integral
controller (fastode.solvers.controller.IntegralController.adapt_host) and the output's coordinate in the last step
(RKAdaptiveSolver._x), over ordinary, edge, NaN and inf values."""
import math
import random

import numpy as np
import pytest

import fastode.cpp as fc
from fastode.solvers.controller import IntegralController
from problems import InitialStepCase

pytestmark = pytest.mark.skipif(not fc.available(), reason="the C++ extension fastode._C is not built")


def _ext():
    from fastode.cpp._loader import ext
    return ext()


@pytest.mark.parametrize("order, safety, ifactor, dfactor, min_step, max_step", [
    (5, 0.9, 10.0, 0.2, 0.0, math.inf), (3, 0.8, 5.0, 0.1, 1e-3, 0.5), (2, 0.95, 2.0, 1.5, 0.0, 1.0)])
def test_adapt_step_is_the_integral_controller(order, safety, ifactor, dfactor, min_step, max_step):
    spec = IntegralController(order, safety, ifactor, dfactor, min_step, max_step)
    ctl = [1e-6, 1e-7, safety, ifactor, dfactor, min_step, max_step, 0.0]
    rng = random.Random(0)
    ratios = [0.0, 1e-300, 0.5, 1.0, 1.0 + 1e-15, 2.0, 1e6, math.inf, math.nan] + [rng.uniform(0, 3) for _ in range(50)]
    steps = [min_step, max_step if math.isfinite(max_step) else 7.0, 0.25, 1e-9, 0.6]
    for h in steps:
        for r in ratios:
            accept, dt_next = _ext().adapt_step(ctl, order, h, r)
            want = spec.adapt_host(h, r)
            assert accept == want[0] and (dt_next == want[1]), (h, r, (accept, dt_next), want)


@pytest.mark.parametrize("time_f32", [False, True])
def test_interp_coordinate_is_the_solvers(time_f32):
    from fastode.solvers.rk_adaptive import RKAdaptiveSolver

    rnd = (lambda v: float(np.float32(v))) if time_f32 else float
    spec = RKAdaptiveSolver._x.__get__(type("S", (), {"_round": staticmethod(rnd),
                                                     "rdtype": __import__("torch").float64})())
    rng = random.Random(1)
    for _ in range(200):
        t0 = rnd(rng.uniform(-3, 3))
        t1 = rnd(t0 + rng.uniform(1e-4, 1.0))
        t = rnd(rng.uniform(t0, t1))
        assert _ext().interp_coordinate(t, t0, t1, time_f32) == spec(t, t0, t1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", InitialStepCase.CASES)
def test_initial_step_is_the_specs(dtype, case):
    """The C++ first-step formulas (initial_trial_step, initial_step_size) around one trial evaluation give the
    spec's step (fastode.ops.rk.initial_step with the adaptive solver's order - 1): exactly in float64, to one float32
    rounding in float32 (the C++ forms 0.01 d0 / d1 in double, then rounds)."""
    import torch

    p = InitialStepCase(case, getattr(torch, dtype))
    _, dt = _ext().initial_step(p.d0, p.d1, p.d2_of, p.ORDER, dtype == "float32")
    if dtype == "float64":
        assert dt == p.dt
    else:
        assert dt == pytest.approx(p.dt, rel=3e-7)
