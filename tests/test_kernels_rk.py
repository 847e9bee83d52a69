"""Fused RK stage-combination / step-epilogue kernels vs independent references.

The independent reference is torchdiffeq 0.2.5 itself: its Dormand-Prince tableau, ``_runge_kutta_step``
and ``_compute_error_ratio``; gradients are checked against autograd of the plain formulas.
"""
import pytest
import torch

from _kernels_env import KDEV, KMARK, SKIP_REASON

pytestmark = [KMARK, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

if SKIP_REASON is None:
    from fastode.kernels import _common as KC
    from fastode.kernels import rk as K
    from fastode.triton._rk import rk_epilogue, rk_error_ratio, rk_stage

tdq_rk = pytest.importorskip("torchdiffeq._impl.rk_common")
tdq_misc = pytest.importorskip("torchdiffeq._impl.misc")
tdq_dopri5 = pytest.importorskip("torchdiffeq._impl.dopri5")
TAB = tdq_dopri5._DORMAND_PRINCE_SHAMPINE_TABLEAU
ALPHA = [float(x) for x in TAB.alpha]
BETA = [[float(x) for x in row] for row in TAB.beta]
B_SOL = [float(x) for x in TAB.c_sol]
B_ERR = [float(x) for x in TAB.c_error]


@pytest.fixture(autouse=True)
def _poisoned():
    KC.set_poison(True)
    yield
    KC.set_poison(False)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)


def rhs(t, y, perturb=None):
    return torch.sin(y) * (1 + t) - 0.3 * y * y.roll(1, -1)


def kernel_step(y0, f0, t0, dt, atol, rtol):
    ks = [f0]
    for a, beta in zip(ALPHA, BETA):
        yi = rk_stage(y0, ks, beta, dt)
        ks.append(rhs(t0 + a * dt, yi))
    return rk_epilogue(y0, ks, B_SOL, B_ERR, dt, atol, rtol), ks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(37, 3), (4, 5, 6), (50,)])
def test_dopri5_step_matches_torchdiffeq(dtype, shape):
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV)
    t0 = torch.tensor(0.2, dtype=torch.float64, device=KDEV)
    dt = torch.tensor(0.3, dtype=torch.float64, device=KDEV)
    f0 = rhs(t0.to(dtype), y0)
    rtol, atol = 1e-4, 1e-6
    tab = tdq_rk._ButcherTableau(alpha=TAB.alpha.to(dtype), beta=[b.to(dtype) for b in TAB.beta],
                                 c_sol=TAB.c_sol.to(dtype), c_error=TAB.c_error.to(dtype))  # as the solver does
    y1_ref, _f1, err_ref, _k = tdq_rk._runge_kutta_step(rhs, y0, f0, t0, dt, t0 + dt, tab)
    ratio_ref = tdq_misc._compute_error_ratio(err_ref, rtol, atol, y0, y1_ref, tdq_misc._rms_norm)
    (y1, err, rms, mx, rms_s, mx_s), _ = kernel_step(y0, f0, t0.to(dtype), dt.to(dtype), atol, rtol)
    torch.testing.assert_close(y1, y1_ref, **tol(dtype))
    torch.testing.assert_close(err, err_ref, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=2e-6 if dtype == torch.float32 else 1e-15)
    # fp64: the whole chain agrees with torchdiffeq; fp32: the error estimate itself is rounding-dominated,
    # so the reductions are checked on the kernel's own err/y1 and the ratio only loosely against torchdiffeq
    loose = 5e-2 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(rms, ratio_ref.to(dtype), rtol=loose, atol=0)
    ratio = (err / (atol + rtol * torch.max(y0.abs(), y1.abs()))).reshape(y0.shape[0] if y0.dim() > 1 else 1, -1)
    exact = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(rms, tdq_misc._compute_error_ratio(err, rtol, atol, y0, y1, tdq_misc._rms_norm),
                               rtol=exact, atol=0)
    torch.testing.assert_close(mx, ratio.abs().max(), rtol=exact, atol=0)
    torch.testing.assert_close(rms_s, ratio.pow(2).mean(1).sqrt(), rtol=exact, atol=0)
    torch.testing.assert_close(mx_s, ratio.abs().amax(1), rtol=exact, atol=0)


def ref_epilogue(y0, ks, b, berr, dt, atol, rtol):
    sb = sum(bi * k for bi, k in zip(b, ks))
    se = sum(ei * k for ei, k in zip(berr, ks))
    y1 = y0 + dt * sb
    err = dt * se
    r = err / (atol + rtol * torch.max(y0.abs(), y1.abs()))
    rr = r.reshape(y0.shape[0] if y0.dim() > 1 else 1, -1)
    return y1, err, r.pow(2).mean().sqrt(), r.abs().max(), rr.pow(2).mean(1).sqrt(), rr.abs().amax(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("split", [None, (4, 16, 32)])
def test_epilogue_values_and_grads(dtype, split):
    g = torch.Generator().manual_seed(1)
    shape = (11, 70)  # ragged: 11 rows, 70 columns (3 column splits of 32 with split=(4, 16, 32))
    mk = lambda: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV)  # noqa: E731
    y0 = mk().requires_grad_()
    ks = [mk().requires_grad_() for _ in B_SOL]
    dt = torch.tensor(0.1, dtype=dtype, device=KDEV, requires_grad=True)
    atol = 1e-3
    rtol = (torch.rand(shape, generator=g, dtype=torch.float64) * 1e-2).to(dtype=dtype, device=KDEV)  # per element
    ref = ref_epilogue(y0, ks, B_SOL, B_ERR, dt, atol, rtol)
    if split is None:
        got = rk_epilogue(y0, ks, B_SOL, B_ERR, dt, atol, rtol)
    else:
        got = K.rk_epilogue(y0, ks, B_SOL, B_ERR, dt, atol, rtol, grid_split=split)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b.detach(), **tol(dtype))
    if split is not None:
        return
    ws = [torch.randn_like(ref[0]), torch.randn_like(ref[1]), torch.tensor(0.7, dtype=dtype, device=KDEV), None,
          torch.randn_like(ref[4]), None]
    loss = lambda outs: sum((o * w).sum() for o, w in zip(outs, ws) if w is not None)  # noqa: E731
    leaves = [y0, dt] + ks
    g1 = torch.autograd.grad(loss(got), leaves)
    g2 = torch.autograd.grad(loss(ref), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol(dtype)["rtol"] * 10, atol=tol(dtype)["atol"] * 10 * b.abs().max().item())


def test_epilogue_fixed_step_has_no_error_outputs():
    y0 = torch.randn(5, 3, device=KDEV)
    ks = [torch.randn(5, 3, device=KDEV) for _ in range(4)]
    b = [1 / 8, 3 / 8, 3 / 8, 1 / 8]
    y1 = rk_epilogue(y0, ks, b, None, 0.2)
    torch.testing.assert_close(y1, y0 + 0.2 * sum(c * k for c, k in zip(b, ks)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_values_and_grads(dtype):
    g = torch.Generator().manual_seed(2)
    mk = lambda: torch.randn(3000, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV)  # noqa: E731
    y = mk().requires_grad_()
    ks = [mk().requires_grad_() for _ in range(5)]
    dt = torch.tensor(0.3, dtype=dtype, device=KDEV, requires_grad=True)
    co = BETA[4]  # 5 coefficients of a real tableau row
    got = rk_stage(y, ks, co, dt)
    ref = y + dt * sum(c * k for c, k in zip(co, ks))
    torch.testing.assert_close(got, ref, **tol(dtype))
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((got * w).sum(), [y, dt] + ks)
    g2 = torch.autograd.grad((ref * w).sum(), [y, dt] + ks)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol(dtype)["rtol"], atol=tol(dtype)["atol"] * max(1, b.abs().max().item()))


def test_stage_skips_zero_coefficients_and_float_dt():
    y = torch.randn(10, device=KDEV)
    ks = [torch.randn(10, device=KDEV) for _ in range(3)]
    out = rk_stage(y, ks, [0.5, 0.0, -1.0], 0.25)
    torch.testing.assert_close(out, y + 0.25 * (0.5 * ks[0] - ks[2]))
    assert rk_stage(y, ks, [0.0, 0.0, 0.0], 0.25) is y


def test_every_fastode_tableau():
    tableaus = pytest.importorskip("fastode.tableaus")
    y0 = torch.randn(6, 4, dtype=torch.float64, device=KDEV)
    for name, tab in tableaus.TABLEAUS.items():
        ks = [torch.randn_like(y0) for _ in tab.b]
        for i, row in enumerate(tab.a):
            if i and any(row):
                torch.testing.assert_close(rk_stage(y0, ks[:i], row, 0.1),
                                           y0 + 0.1 * sum(c * k for c, k in zip(row, ks)), **tol(torch.float64))
        got = rk_epilogue(y0, ks, tab.b, tab.b_err, 0.1, 1e-6, 1e-5)
        berr = tab.b_err if tab.b_err is not None else [0.0] * len(tab.b)
        ref = ref_epilogue(y0, ks, tab.b, berr, 0.1, 1e-6, 1e-5)
        if tab.b_err is None:
            torch.testing.assert_close(got, ref[0], **tol(torch.float64), msg=name)
        else:
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, **tol(torch.float64), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_ratio_alone_values_and_grads(dtype):
    g = torch.Generator().manual_seed(3)
    mk = lambda: torch.randn(9, 40, generator=g, dtype=torch.float64).to(dtype=dtype, device=KDEV).requires_grad_()  # noqa
    y_err, y0, y1 = mk(), mk(), mk()
    atol = (torch.rand(9, 40, generator=g, dtype=torch.float64) + 0.1).to(dtype=dtype, device=KDEV)
    rtol = 1e-2
    got = rk_error_ratio(y_err, y0, y1, atol, rtol)
    r = y_err / (atol + rtol * torch.max(y0.abs(), y1.abs()))
    ref = (r.pow(2).mean().sqrt(), r.abs().max(), r.pow(2).mean(1).sqrt(), r.abs().amax(1))
    torch.testing.assert_close(got[0], tdq_misc._compute_error_ratio(y_err, rtol, atol, y0, y1, tdq_misc._rms_norm))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol(dtype))
    w = torch.randn(9, dtype=dtype, device=KDEV)
    g1 = torch.autograd.grad(got[0] * 0.3 + (got[2] * w).sum(), [y_err, y0, y1])
    g2 = torch.autograd.grad(ref[0] * 0.3 + (ref[2] * w).sum(), [y_err, y0, y1])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol(dtype)["rtol"] * 10, atol=tol(dtype)["atol"] * 10)


def test_stage_without_y_is_the_error_estimate():
    ks = [torch.randn(33, 2, device=KDEV, requires_grad=True) for _ in range(3)]
    got = rk_stage(None, ks, [0.5, -0.25], 0.1)
    torch.testing.assert_close(got, 0.1 * (0.5 * ks[0] - 0.25 * ks[1]))
    (g,) = torch.autograd.grad(got.sum(), ks[0])
    torch.testing.assert_close(g, torch.full_like(g, 0.05))


def test_double_backward_through_stage_and_epilogue():
    y0 = torch.randn(6, 3, dtype=torch.float64, device=KDEV, requires_grad=True)
    ks = [torch.randn(6, 3, dtype=torch.float64, device=KDEV, requires_grad=True) for _ in B_SOL]
    dt = torch.tensor(0.2, dtype=torch.float64, device=KDEV, requires_grad=True)

    def go(stage, epi):
        yi = stage(y0, ks[:3], BETA[2], dt)
        out = epi(y0, ks[:-1] + [yi * yi], B_SOL, B_ERR, dt, 1e-3, 1e-2)
        loss = (out[0] ** 2).sum() + out[2]
        (g,) = torch.autograd.grad(loss, dt, create_graph=True)
        return torch.autograd.grad(g, [y0, dt] + ks[:-1])

    ref_stage = lambda y, kk, c, d: y + d * sum(ci * k for ci, k in zip(c, kk))  # noqa: E731
    got = go(rk_stage, rk_epilogue)
    ref = go(ref_stage, ref_epilogue)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("split", [None, (2, 16, 16)])
def test_error_ratio_never_drops_nan(split):
    """A NaN (or inf) error estimate must reach both norms: GPU max reductions drop NaN (the interpreter's NumPy
    does not, so this test also pins the explicit NaN rule in the kernel), and a dropped NaN would let a step
    through the max norm. Rows 2 (NaN) and 5 (inf) poisoned; several column splits and row programs."""
    g = torch.Generator().manual_seed(4)
    mk = lambda: torch.randn(7, 40, generator=g, dtype=torch.float64).to(device=KDEV)  # noqa: E731
    y_err, y0, y1 = mk(), mk(), mk()
    y_err[2, 17] = float("nan")
    y_err[5, 3] = float("inf")
    got = K.rk_error_ratio(y_err, y0, y1, 1e-3, 1e-2, grid_split=split)
    r = y_err / (1e-3 + 1e-2 * torch.max(y0.abs(), y1.abs()))
    ref = (r.pow(2).mean().sqrt(), r.abs().max(), r.pow(2).mean(1).sqrt(), r.abs().amax(1))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isnan(got[1]) and torch.isnan(got[3][2]) and torch.isinf(got[3][5])
