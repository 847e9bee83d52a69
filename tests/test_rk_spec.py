"""The RK spec (fastode/ops/rk.py) and the controller (fastode/solvers/controller.py) against torchdiffeq's
private step functions (an independent implementation) and each other (float vs 0-dim tensor forms)."""
import math

import pytest
import torch

from fastode.norms import max_norm, rms_norm
from fastode.ops import rk as spec
from fastode.solvers.controller import IntegralController
from fastode.tableaus import get_tableau

torchdiffeq = pytest.importorskip("torchdiffeq")
from torchdiffeq._impl import misc as tdq_misc  # noqa: E402
from torchdiffeq._impl import rk_common  # noqa: E402
from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU  # noqa: E402
from torchdiffeq._impl.bosh3 import _BOGACKI_SHAMPINE_TABLEAU  # noqa: E402

D = torch.float64


def _func(t, y):
    return torch.sin(3 * y) * (1 + t) - 0.5 * y


@pytest.mark.parametrize("name,tdq_tab", [("dopri5", _DORMAND_PRINCE_SHAMPINE_TABLEAU),
                                          ("bosh3", _BOGACKI_SHAMPINE_TABLEAU)])
def test_rk_step_and_error_ratio_match_torchdiffeq(name, tdq_tab):
    tab = get_tableau(name)
    y0 = torch.randn(7, 3, dtype=D)
    t0, dt = torch.tensor(0.3, dtype=D), torch.tensor(0.07, dtype=D)
    f0 = _func(t0, y0)
    y1_ref, _f1, err_ref, _k = rk_common._runge_kutta_step(lambda t, y, perturb=None: _func(t, y), y0, f0, t0, dt,
                                                           t0 + dt, tdq_tab)
    step = spec.rk_step(_func, t0, y0, f0, dt, tab, combine=spec.combine_stages_exact)
    torch.testing.assert_close(step.y1, y1_ref, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(step.y_err, err_ref, rtol=1e-12, atol=1e-16)
    for rtol, atol in [(1e-3, 1e-6), (1e-7, 1e-9)]:
        got = spec.error_ratio(step.y_err, y0, step.y1, rtol, atol, rms_norm)
        ref = tdq_misc._compute_error_ratio(err_ref, rtol, atol, y0, y1_ref, tdq_misc._rms_norm)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_error_ratio_keeps_nan():
    e = torch.tensor([1e-3, float("nan")], dtype=D)
    y = torch.ones(2, dtype=D)
    for norm in (rms_norm, max_norm):
        assert math.isnan(float(spec.error_ratio(e, y, y, 1e-3, 1e-6, norm)))
    assert math.isnan(float(spec.sample_error_ratios(e[None], y[None], y[None], 1e-3, 1e-6, "rms")[0]))


def test_sample_error_ratios_are_per_row_norms():
    err, y0, y1 = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    rows = spec.sample_error_ratios(err, y0, y1, 1e-3, 1e-6, "rms")
    for i in range(5):
        torch.testing.assert_close(rows[i], spec.error_ratio(err[i], y0[i], y1[i], 1e-3, 1e-6, rms_norm))
    mx = spec.sample_error_ratios(err, y0, y1, 1e-3, 1e-6, "max")
    torch.testing.assert_close(mx.max(), spec.error_ratio(err, y0, y1, 1e-3, 1e-6, max_norm))
    z = torch.zeros(2, 3, dtype=D, requires_grad=True)  # zero error: finite (zero) gradient, not NaN
    g, = torch.autograd.grad(spec.sample_error_ratios(z, y0[:2, :3], y1[:2, :3], 1e-3, 1e-6).sum(), z)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("order", [3, 4, 5])
def test_initial_step_matches_torchdiffeq(order):
    y0 = torch.randn(6, dtype=D)
    t0 = torch.tensor(0.2, dtype=D)
    f0 = _func(t0, y0)
    ref = tdq_misc._select_initial_step(_func, t0, y0, order, 1e-6, 1e-8, tdq_misc._rms_norm, f0)
    got, _ = spec.initial_step(_func, t0, y0, f0, order, 1e-6, 1e-8, rms_norm)
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)


def test_initial_step_of_a_constant_state():
    y0 = torch.zeros(3, dtype=D)
    dt, _ = spec.initial_step(lambda t, y: torch.zeros_like(y), torch.tensor(0., dtype=D), y0, torch.zeros_like(y0),
                              4, 1e-6, 1e-8, rms_norm)
    assert float(dt) == pytest.approx(1e-6)  # min(100 h0, max(1e-6, 1e-3 h0)) with h0 = 1e-6


RATIOS = [0.0, 1e-9, 0.3, 0.999, 1.0, 1.0001, 7.0, 1e6, float("inf"), float("nan")]


@pytest.mark.parametrize("ctrl", [IntegralController(5), IntegralController(3, safety=0.8, ifactor=5., dfactor=0.1),
                                  IntegralController(5, min_step=1e-3, max_step=0.5)])
def test_controller_float_form_matches_torchdiffeq_and_the_tensor_form(ctrl):
    for dt in (1e-4, 0.01, 0.3, 2.0):
        for r in RATIOS:
            accept, nxt = ctrl.adapt(dt, r)
            if math.isfinite(r):
                ref = tdq_misc._optimal_step_size(torch.tensor(dt, dtype=D), torch.tensor(r, dtype=D),
                                                  *(torch.tensor(v, dtype=D) for v in (ctrl.safety, ctrl.ifactor,
                                                                                        ctrl.dfactor)), ctrl.order)
                assert nxt == pytest.approx(min(max(float(ref), ctrl.min_step), ctrl.max_step), rel=1e-15)
            assert accept == ((r <= 1 and dt <= ctrl.max_step) or dt <= ctrl.min_step)
            ta, tn = ctrl.adapt(torch.tensor(dt, dtype=D), torch.tensor(r, dtype=D))
            assert bool(ta) == accept
            assert float(tn) == pytest.approx(nxt, rel=1e-15)


def test_controller_shrinks_after_nan_and_inf():
    ctrl = IntegralController(5)
    assert ctrl.adapt(1.0, float("nan")) == (False, 0.2)
    assert ctrl.adapt(1.0, float("inf")) == (False, 0.2)
    assert ctrl.adapt(1.0, 0.0) == (True, 10.0)


def test_controller_landed_step_may_exceed_max_step():
    ctrl = IntegralController(5, max_step=0.1)
    assert ctrl.adapt(0.1 + 1e-17 + 1e-12, 0.5)[0] is False
    assert ctrl.adapt(0.1 + 1e-12, 0.5, landed=True)[0] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_size_takes_the_floats_bits_and_the_tensors_gradient(dtype):
    """combine_stages with a StepSize: the float path's values bit for bit (so a solve's values do not depend on
    whether its times require grad), and every derivative of the tensor path: w.r.t. the step, the stages and,
    through the product of both, second order (gradgradcheck in float64)."""
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(7, 3, generator=g, dtype=dtype) for _ in range(4)]
    y0 = torch.randn(7, 3, generator=g, dtype=dtype)
    coeffs = get_tableau("rk4").b
    dt = float(torch.tensor(0.1, dtype=dtype))
    ref = spec.combine_stages(y0, dt, coeffs, k)
    grad = torch.tensor(dt, dtype=dtype, requires_grad=True)
    got = spec.combine_stages(y0, spec.StepSize(dt, grad), coeffs, k)
    assert torch.equal(got, ref) and got.requires_grad
    (d,) = torch.autograd.grad(got.sum(), grad)
    expect = sum(c * kj for c, kj in zip(coeffs, k)).sum()
    assert torch.allclose(d, expect, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    with torch.no_grad():  # no graph asked for: just the float path
        assert torch.equal(spec.combine_stages(y0, spec.StepSize(dt, grad), coeffs, k), ref)
    if dtype == torch.float64:
        def f(step, *ks):
            return spec.combine_stages(None, spec.StepSize(float(step), step), coeffs, ks)
        args = (grad.detach().requires_grad_(), *(kj.detach().requires_grad_() for kj in k))
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


def test_clip_controller_step_t_jump_t_and_landing():
    """ClipController's rules on hand-made cases (the loops' parity with torchdiffeq's step_t / jump_t handling is
    tested end to end in test_parity_torchdiffeq.py)."""
    from fastode.solvers.controller import ClipController

    c = ClipController(step_t=[0.5, 0.05, 1.5], jump_t=[0.7], max_step=1.0, rnd=float)
    c.reset(0.1)  # 0.05 lies behind the start: dropped
    free = c.propose(0.1, 0.3, 0.2)
    assert (free.t1, free.dt, free.why, free.landed, free.on_step_t, free.on_jump_t) == (0.3, 0.2, None, False,
                                                                                       False, False)
    on = c.propose(0.3, 0.9, 0.6)  # step_t 0.5 inside: shortened to it (the jump at 0.7 lies beyond 0.5 now)
    assert (on.t1, on.dt, on.why, on.on_step_t, on.on_jump_t) == (0.5, 0.5 - 0.3, ("const",), True, False)
    c.advance(on)
    jump = c.propose(0.5, 1.4, 0.9)  # next step_t 1.5 outside; the jump at 0.7 inside: shortened, f re-evaluated
    assert (jump.t1, jump.why, jump.on_step_t, jump.on_jump_t) == (0.7, ("const",), False, True)
    assert jump.dt == 0.7 - 0.5
    c.advance(jump)
    passed = c.propose(0.7, 1.2, 0.5, target=(3, 1.0))  # overshoots output 3 at t=1.0: lands on it
    assert (passed.t1, passed.dt, passed.dt_unclipped, passed.why, passed.landed) == (1.0, 1.0 - 0.7, 0.5,
                                                                                      ("target", 3), True)
    near = c.propose(0.7, 0.998, 0.298, target=(3, 1.0))  # 0.7% of the step short of it: stretched onto it
    assert near.landed and near.t1 == 1.0
    short = c.propose(0.7, 0.9, 0.2, target=(3, 1.0))  # well short: left alone
    assert not short.landed and short.t1 == 0.9 and short.why is None
    far = ClipController(None, None, max_step=0.1, rnd=float)
    far.reset(0.0)
    assert not far.propose(0.0, 0.0995, 0.0995, target=(1, 0.1001)).landed  # the stretch would exceed max_step
    with pytest.raises(ValueError, match="repeated"):
        ClipController([0.2], [0.2], 1.0, float).reset(0.0)
