"""The Triton device controller's named pieces (kernels/cnf_step.py) against the spec they mirror, each through a
one-program probe kernel under the Triton interpreter (compiled on CUDA): ``_factor`` against
``IntegralController._factor_host`` over ordinary, edge, NaN and inf ratios, and the first step's
``_initial_trial_step`` / ``_initial_step_size`` around one trial evaluation against ``fastode.ops.rk.initial_step``
(the C++ copies have the same test in tests/test_cpp_control.py)."""
import math
import random

import pytest
import torch

from _kernels_env import KDEV, KMARK, SKIP_REASON
from problems import InitialStepCase

pytestmark = [KMARK, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

if SKIP_REASON is None:
    import triton
    import triton.language as tl

    from fastode.kernels import cnf_step as K

    @triton.jit
    def _factor_probe(r_ptr, opt_ptr, out_ptr, n, ORDER: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        r = tl.load(r_ptr + i, mask=i < n, other=1.0)
        safety, ifactor, dfactor = tl.load(opt_ptr), tl.load(opt_ptr + 1), tl.load(opt_ptr + 2)  # float64, as the
        tl.store(out_ptr + i, K._factor(r, safety, ifactor, dfactor, ORDER), mask=i < n)  # kernels' options block

    @triton.jit
    def _first_step_probe(d_ptr, out_ptr, ORDER: tl.constexpr, STEP: tl.constexpr):
        d0 = tl.load(d_ptr)
        d1 = tl.load(d_ptr + 1)
        if STEP:
            tl.store(out_ptr, K._initial_step_size(tl.load(d_ptr + 3), d1, tl.load(d_ptr + 2), ORDER))
        else:
            tl.store(out_ptr, K._initial_trial_step(d0, d1).to(out_ptr.dtype.element_ty))


@pytest.mark.parametrize("order, safety, ifactor, dfactor", [(5, 0.9, 10.0, 0.2), (3, 0.8, 5.0, 0.1),
                                                             (2, 0.95, 2.0, 1.5)])
def test_factor_is_the_integral_controllers(order, safety, ifactor, dfactor):
    from fastode.solvers.controller import IntegralController

    spec = IntegralController(order, safety, ifactor, dfactor)
    rng = random.Random(0)
    ratios = [0.0, 1e-300, 0.5, 1.0, 1.0 + 1e-15, 2.0, 1e6, math.inf, math.nan] + [rng.uniform(0, 3) for _ in range(23)]
    r = torch.tensor(ratios, dtype=torch.float64, device=KDEV)
    out = torch.full_like(r, math.nan)  # poisoned: every entry must be written
    opt = torch.tensor([safety, ifactor, dfactor], dtype=torch.float64, device=KDEV)
    _factor_probe[(1,)](r, opt, out, len(ratios), ORDER=order, BLOCK=32)
    got = out.cpu().tolist()
    for x, g in zip(ratios, got):
        want = spec._factor_host(x)
        assert g == pytest.approx(want, rel=1e-14, abs=0), (x, g, want)  # (exp/log against the host's pow)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", InitialStepCase.CASES)
def test_initial_step_is_the_specs(dtype, case):
    """The batch solve runs the spec itself on the device; the per-tile kernel these two formulas around its trial
    evaluation: the same step (float64: to the kernel's exp/log against the host's pow; float32: one rounding)."""
    p = InitialStepCase(case, dtype)
    d = torch.tensor([p.d0, p.d1, 0.0, 0.0], dtype=dtype, device=KDEV)
    out = torch.full((1,), math.nan, dtype=dtype, device=KDEV)
    _first_step_probe[(1,)](d, out, ORDER=p.ORDER, STEP=False)
    h0 = float(out[0])
    d[2], d[3] = p.d2_of(h0), h0
    _first_step_probe[(1,)](d, out, ORDER=p.ORDER, STEP=True)
    assert float(out[0]) == pytest.approx(p.dt, rel=1e-14 if dtype == torch.float64 else 3e-7)
