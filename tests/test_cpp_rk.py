"""Fused RK steps of the C++ backend: fastode.cpp.CnfStepper / cnf_rk_step (whole CNF step in one call) and
the generic rk_stage / rk_epilogue, against PyTorch compositions of the reference MLP (fastode.nn.functional)
with the tableaus of fastode.tableaus, and gradcheck."""
import pytest
import torch

import fastode.cpp as fc
from fastode.nn import ConcatSquashMLP
from fastode.tableaus import get_tableau

pytestmark = pytest.mark.skipif(not fc.available(), reason=f"C++ extension not built: {fc.build_info()['error']}")


def _model(dtype, act="tanh", hidden=(16, 16), dim=2, seed=0):
    torch.manual_seed(seed)
    m = ConcatSquashMLP(dim, hidden, activation=act).to(dtype)
    with torch.no_grad():
        for layer in m.layers:
            layer._hyper_gate.weight.normal_(0, 0.8)
            layer._hyper_bias.weight.normal_(0, 0.4)
    return m


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


def _compare(a, b, dtype):
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        tol = _tol(dtype)
        torch.testing.assert_close(x.to(y.dtype), y, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, y.abs().max().item()))


def _step_outputs_and_grads(backend, m, method, dtype, B, exact, rates, fsal_in, seed=3):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(B, 2, generator=g, dtype=dtype).requires_grad_()
    q0 = torch.randn(B, len(rates), generator=g, dtype=dtype).requires_grad_()
    e = None if exact else torch.randn(B, 2, generator=g, dtype=dtype).requires_grad_()
    t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    dt = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    kz0 = torch.randn(B, 2, generator=g, dtype=dtype).requires_grad_() if fsal_in else None
    kq0 = torch.randn(B, len(rates), generator=g, dtype=dtype).requires_grad_() if fsal_in else None
    st = fc.CnfStepper(m, method, rates=rates, atol=1e-4, rtol=1e-3, backend=backend)
    assert st.backend == backend
    r = st.step(t0, dt, z0, q0, e, kz0, kq0, return_stages=True)
    assert fc.last_backend == backend
    outs = [r.z1, r.q1, r.err_z, r.err_q, r.kz, r.kq]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs if o is not None)
    leaves = [t0, dt, z0, q0] + [x for x in (e, kz0, kq0) if x is not None] + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs + [r.error_sumsq], list(grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["rk4", "dopri5", "tsit5"])
@pytest.mark.parametrize("B", [3, 70])
def test_cnf_step_matches_reference(dtype, method, B):
    m = _model(dtype)
    rates = ("-trace", "kinetic", "jac_frob")
    got = _step_outputs_and_grads("cpp", m, method, dtype, B, False, rates, False)
    want = _step_outputs_and_grads("torch", m, method, dtype, B, False, rates, False)
    _compare(got[0][:-1], want[0][:-1], dtype)
    if got[0][-1] is not None and dtype == torch.float64:
        # (in float32 the error estimate dt * sum(b_err_i k_i) at this dt is at the rounding level of k,
        # so its scaled norm is rounding noise in either implementation; err_z/err_q are compared above)
        ss, ref = got[0][-1], want[0][-1]
        torch.testing.assert_close(ss, ref, rtol=1e-6, atol=1e-6 * ref.max().item())
    _compare(got[1], want[1], dtype)


@pytest.mark.parametrize("act", ["tanh", "softplus", "swish"])
def test_cnf_step_exact_trace_and_fsal_input(act):
    dtype = torch.float64
    m = _model(dtype, act=act)
    for exact, fsal in ((True, False), (False, True), (True, True)):
        got = _step_outputs_and_grads("cpp", m, "dopri5", dtype, 9, exact, ("-trace", "jac_frob"), fsal)
        want = _step_outputs_and_grads("torch", m, "dopri5", dtype, 9, exact, ("-trace", "jac_frob"), fsal)
        _compare(got[0][:-1], want[0][:-1], dtype)
        _compare(got[1], want[1], dtype)


def test_cnf_step_gradcheck():
    m = _model(torch.float64, hidden=(5,))
    flat = [p.detach().clone().requires_grad_() for p in m.parameters()]
    z0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    q0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    dt = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def step(t0, dt, z0, q0, e, *ps):
        # nn.Module parameter order of ConcatSquashLinear: _layer (W, b), _hyper_bias (bw), _hyper_gate (gw, gb)
        layers = [(ps[i], ps[i + 1], ps[i + 3].view(-1), ps[i + 4], ps[i + 2].view(-1)) for i in range(0, len(ps), 5)]
        r = fc.cnf_rk_step(t0, dt, z0, q0, layers, "bosh3", activation="tanh", e=e, rates=("-trace", "kinetic"),
                           atol=1e-3, rtol=1e-3, return_stages=True)
        return r.z1, r.q1, r.err_z, r.err_q, r.kz, r.kq

    assert torch.autograd.gradcheck(step, (t0, dt, z0, q0, e, *flat))


def test_rk4_solve_matches_reference_solve():
    """Ten fused rk4 steps (T = 0.5) equal ten reference steps, including the parameter gradient."""
    m = _model(torch.float64, hidden=(32, 32, 32))
    x = torch.randn(50, 2, dtype=torch.float64)
    e = torch.randn(50, 2, dtype=torch.float64)

    def nll(backend):
        st = fc.CnfStepper(m, "rk4", backend=backend)
        z, q = x, torch.zeros(50, 1, dtype=torch.float64)
        for i in range(10):
            r = st.step(0.05 * i, 0.05, z, q, e)
            z, q = r.z1, r.q1
        logp = -0.5 * (z * z).sum(-1) - q[:, 0]
        loss = -logp.mean()
        return [loss] + list(torch.autograd.grad(loss, list(m.parameters())))

    _compare(nll("cpp"), nll("torch"), torch.float64)


def test_fsal_chain_of_steps():
    """dopri5 steps chained through the FSAL stage keep the gradient of the shared stage."""
    m = _model(torch.float64)
    x = torch.randn(8, 2, dtype=torch.float64)
    e = torch.randn(8, 2, dtype=torch.float64)

    def run(backend):
        st = fc.CnfStepper(m, "dopri5", atol=1e-6, rtol=1e-6, backend=backend)
        z, q, kz, kq = x, torch.zeros(8, 1, dtype=torch.float64), None, None
        for i in range(3):
            r = st.step(0.1 * i, 0.1, z, q, e, kz, kq, return_stages=True)
            z, q, kz, kq = r.z1, r.q1, r.kz[-1], r.kq[-1]
        loss = (z ** 2).sum() + q.sum()
        return [loss] + list(torch.autograd.grad(loss, list(m.parameters())))

    _compare(run("cpp"), run("torch"), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(7,), (6, 5), (4, 3, 2)])
def test_rk_stage_and_epilogue_match_reference(dtype, shape):
    tab = get_tableau("dopri5")
    s = len(tab.b)
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    ks = [torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for _ in range(s)]
    dt = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    rtol_t = torch.rand(shape, generator=g, dtype=dtype) * 1e-3 + 1e-4
    for atol, rtol in ((1e-4, 1e-3), (1e-5, rtol_t)):
        res = {}
        for backend in ("cpp", "torch"):
            outs = list(fc.rk_epilogue(y0, ks, tab.b, tab.b_err, dt, atol, rtol, backend=backend))
            outs.append(fc.rk_stage(y0, ks[:5], tab.a[5], dt, backend=backend))
            assert fc.last_backend == backend
            gg = torch.Generator().manual_seed(1)
            diff = [o for i, o in enumerate(outs) if i not in (3, 5)]  # max ratios are not differentiable
            loss = sum((o * torch.randn(o.shape, generator=gg, dtype=o.dtype)).sum() for o in diff)
            grads = torch.autograd.grad(loss, [y0, dt] + ks)
            res[backend] = (outs, grads)
        _compare(res["cpp"][0], res["torch"][0], dtype)
        _compare(res["cpp"][1], res["torch"][1], dtype)
    assert fc.rk_epilogue(y0, ks, tab.b, None, 0.1).shape == y0.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("hidden, B", [((32, 32), 67), ((256, 256), 130)])
def test_grid_solve_matches_reference(dtype, exact, hidden, B):
    """A whole fixed-grid solve in one call (torchdiffeq's rk4 grid with a learned end time T) equals the
    reference steps, gradients included (parameters, x, e and T through the grid). Wide layers use 128-row
    tiles, so B = 130 there is a full tile plus a ragged one."""
    m = _model(dtype, hidden=hidden)
    assert fc._dispatch.mlp_tile_rows(B, m.params()) == (128 if hidden[0] >= 256 else 64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 2, generator=g, dtype=dtype)
    e = None if exact else torch.randn(B, 2, generator=g, dtype=dtype)

    def run(backend):
        xs = x.clone().requires_grad_()
        es = None if e is None else e.clone().requires_grad_()
        T = torch.tensor(0.47, dtype=torch.float64, requires_grad=True)
        ts = torch.cat([torch.arange(0, 0.47, 0.05, dtype=torch.float64), T.reshape(1)])  # last step shorter
        st = fc.CnfStepper(m, "rk4", rates=("-trace", "kinetic"), backend=backend)
        zT, qT = st.solve(ts, xs, torch.zeros(B, 2, dtype=dtype), es)
        assert fc.last_backend == backend
        loss = (zT ** 2).sum() + qT[:, 0].sum() + 0.1 * qT[:, 1].sum()
        leaves = [xs, T] + ([es] if es is not None else []) + list(m.parameters())
        return [zT, qT] + list(torch.autograd.grad(loss, leaves))

    _compare(run("cpp"), run("torch"), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_epilogue_max_ratio_keeps_nan(dtype):
    """NaN in a stage must give a NaN max ratio (std::max drops a NaN argument), like torch.max does."""
    tab = get_tableau("dopri5")
    g = torch.Generator().manual_seed(2)
    y0 = torch.randn(6, 5, generator=g, dtype=dtype)
    ks = [torch.randn(6, 5, generator=g, dtype=dtype) for _ in tab.b]
    ks[3][4, 2] = float("nan")
    outs = {b: fc.rk_epilogue(y0, ks, tab.b, tab.b_err, 0.1, 1e-4, 1e-3, backend=b) for b in ("cpp", "torch")}
    for a, b in zip(outs["cpp"], outs["torch"]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isnan(outs["cpp"][3]) and torch.isnan(outs["cpp"][5][4])
    assert not torch.isnan(outs["cpp"][5][:4]).any()
