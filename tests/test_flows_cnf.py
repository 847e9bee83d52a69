"""fastode.flows: CNF densities, traces, inverses, end-time gradients, solver switching, stacking.

References are independent: analytic densities of linear flows, a 2-D quadrature of exp(log p), autograd
Jacobians, finite differences, and torchdiffeq.
"""
import math

import pytest
import torch
from torch import nn

from fastode.flows import CNF, KineticEnergy, SequentialFlow, Solver, StandardNormal, build_flow
from fastode.nn import ConcatSquashMLP

pytestmark = pytest.mark.usefixtures("float64_default")

# ODE backends every solver-sensitive test runs on (fastode's own odeint once its solver core is importable)
BACKENDS = ["torchdiffeq", "fastode"]


class Linear(nn.Module):
    """f(t, z) = z A^T (generic module: traces go through autograd)."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.dim = A.shape[0]

    def forward(self, t, z):
        return z @ self.A.t()


class Diagonal(nn.Module):
    """f(t, z) = tanh(a * z + b t): a diagonal Jacobian."""

    def __init__(self, dim):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1.0, 1.5, dim))
        self.b = nn.Parameter(torch.linspace(0.3, -0.7, dim))
        self.dim = dim

    def forward(self, t, z):
        return torch.tanh(self.a * z + self.b * t)


def mlp(dim=2, hidden=(16, 16), act="tanh", seed=0, backend="torch"):
    torch.manual_seed(seed)
    return ConcatSquashMLP(dim, hidden, act, backend=backend)


def test_density_integrates_to_one_on_grid():
    flow = CNF(mlp(seed=1), T=0.5, method="dopri5", rtol=1e-8, atol=1e-8, eval_trace="exact").eval()
    n, L = 81, 6.5
    g = torch.linspace(-L, L, n)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    with torch.no_grad():
        p = flow.log_prob(pts).exp().reshape(n, n)
    h = (g[1] - g[0]).item()
    mass = torch.trapezoid(torch.trapezoid(p, dx=h), dx=h).item()
    assert abs(mass - 1.0) < 2e-3, mass
    # and the flow is not the identity (the check is not vacuous)
    assert (p - StandardNormal(2).log_prob(pts).exp().reshape(n, n)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_flow_matches_analytic_density(reverse, backend):
    A = torch.tensor([[0.3, -1.1], [0.7, -0.4]])
    T = 0.8
    flow = CNF(Linear(A), T=T, method="dopri5", rtol=1e-10, atol=1e-10, eval_trace="exact", backend=backend).eval()
    x = torch.randn(7, 2)
    M = torch.linalg.matrix_exp(A * T)
    with torch.no_grad():
        if reverse:
            out, logdet = flow.inverse(x)
            M = torch.linalg.inv(M)
            ref_logdet = -T * torch.trace(A)
        else:
            out, logdet = flow.transform(x)
            ref_logdet = T * torch.trace(A)
            lp = flow.log_prob(x)
            ref_lp = StandardNormal(2).log_prob(x @ M.t()) + ref_logdet
            torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-8)
    torch.testing.assert_close(out, x @ M.t(), rtol=0, atol=1e-8)
    torch.testing.assert_close(logdet, ref_logdet.expand(7), rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_hutchinson_is_unbiased_for_the_exact_trace(backend):
    # fixed grid: the trajectory does not depend on the probe, so the Hutchinson log-determinant is
    # e^T M e for one fixed matrix M whose trace is the exact (discrete) log-determinant.
    flow = CNF(mlp(seed=2, backend=backend), T=0.6, method="rk4", step_size=0.1, trace="hutchinson")
    x0 = torch.randn(3, 2)
    N = 4000
    x = x0.repeat_interleave(N, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, ld_h = flow.transform(x, noise=gen)
        _, ld_e = flow.transform(x0, trace="exact")
    ld_h = ld_h.reshape(3, N)
    mean, se = ld_h.mean(1), ld_h.std(1) / math.sqrt(N)
    assert (se > 1e-4).all()  # the estimator really is noisy for this Jacobian
    assert ((mean - ld_e).abs() < 5 * se).all(), (mean, ld_e, se)


def test_rademacher_hutchinson_is_exact_for_diagonal_jacobians():
    for dyn in (Diagonal(3), mlp(dim=1, seed=3)):  # generic autograd path and the fused MLP path (D = 1)
        flow = CNF(dyn, T=0.7, method="dopri5", rtol=1e-9, atol=1e-9, trace="hutchinson", noise="rademacher")
        x = torch.randn(5, dyn.dim)
        with torch.no_grad():
            z_h, ld_h = flow.transform(x)
            z_e, ld_e = flow.transform(x, trace="exact")
        torch.testing.assert_close(ld_h, ld_e, rtol=0, atol=1e-9)
    # Gaussian probes are not exact
    flow = CNF(Diagonal(3), T=0.7, method="rk4", step_size=0.1, noise="gaussian")
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert (flow.transform(x)[1] - flow.transform(x, trace="exact")[1]).abs().max() > 1e-3


def test_fused_and_autograd_paths_agree():
    dyn = mlp(seed=4, act="softplus")

    class Plain(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.dim = m.dim

        def forward(self, t, z):
            return self.m(t, z)

    x = torch.randn(6, 2)
    e = torch.randn(6, 2)
    for trace in ("hutchinson", "exact"):
        a = CNF(dyn, T=0.5, method="rk4", step_size=0.125, trace=trace)
        b = CNF(Plain(dyn), T=0.5, method="rk4", step_size=0.125, trace=trace)
        oa, ob = a(x, noise=e), b(x, noise=e)
        torch.testing.assert_close(oa.out, ob.out)
        torch.testing.assert_close(oa.logdet, ob.logdet)


def test_sample_log_prob_round_trip_and_inverse():
    flow = CNF(mlp(seed=5), T=0.5, method="dopri5", rtol=1e-9, atol=1e-9).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x, lp_s = flow.sample_with_log_prob(64, generator=gen)
        lp = flow.log_prob(x)
        torch.testing.assert_close(lp, lp_s, rtol=0, atol=1e-7)
        z = StandardNormal(2).sample(64, generator=torch.Generator().manual_seed(2))
        xs = flow.sample(64, z=z)
        torch.testing.assert_close(flow.transform(xs)[0], z, rtol=0, atol=1e-7)


def test_inverse_error_small_for_fine_solver_and_larger_for_coarse():
    torch.manual_seed(6)
    flow = CNF(ConcatSquashMLP(2, (32, 32), "tanh", backend="torch"), T=1.0,
               method="rk4", step_size=0.5, eval_solver=Solver("dopri5", rtol=1e-9, atol=1e-9))
    with torch.no_grad():  # make the dynamics non-trivial
        for p in flow.dynamics.parameters():
            p.mul_(3.0)
    x = torch.randn(200, 2)
    flow.regularizers = (KineticEnergy(),)  # ignored by inverse_error (no divergence integrated)
    with torch.no_grad():
        coarse = flow.train().inverse_error(x).item()
        fine = flow.eval().inverse_error(x).item()
    assert fine < 1e-6, fine
    assert coarse > 100 * fine, (coarse, fine)


def _loss(flow, x, e):
    return -flow.log_prob(x, noise=e).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param", ["sqrt", "linear"])
@pytest.mark.parametrize("solver", [dict(method="rk4", step_size=0.1), dict(method="dopri5", rtol=1e-6, atol=1e-6),
                                    dict(method="dopri5", rtol=1e-7, atol=1e-7, gradient="adjoint")])
def test_dL_dT_matches_finite_differences(param, solver, backend):
    if backend == "fastode" and solver.get("gradient") == "adjoint":
        pytest.importorskip("fastode.grad.adjoint", reason="fastode's adjoint is not available yet")
    flow = CNF(mlp(seed=7), T=0.55, learn_T=True, T_parametrization=param, trace="hutchinson", backend=backend,
               **solver)
    x = torch.randn(16, 2)
    e = torch.randn(16, 2)
    loss = _loss(flow, x, e)
    (g,) = torch.autograd.grad(loss, flow._T_raw)
    dL_dT = g.item() / (2 * flow._T_raw.item()) if param == "sqrt" else g.item()
    eps = 1e-5
    vals = []
    with torch.no_grad():
        for s in (1, -1):
            flow.set_T(0.55 + s * eps)
            vals.append(_loss(flow, x, e).item())
    fd = (vals[0] - vals[1]) / (2 * eps)
    tol = 1e-6 if solver.get("gradient") != "adjoint" else 1e-4
    assert abs(dL_dT - fd) < tol * max(1.0, abs(fd)), (dL_dT, fd)
    assert abs(fd) > 1e-3


def test_train_and_eval_solvers_and_traces_switch_with_mode():
    flow = CNF(mlp(seed=8), T=1.0, method="rk4", step_size=0.25,
               eval_solver=Solver("rk4", step_size=0.05), eval_trace="exact")
    x = torch.randn(4, 2)
    flow.train()
    flow.reset_nfe()
    flow(x)
    assert flow.nfe == 4 * 4
    flow.eval()
    flow.reset_nfe()
    with torch.no_grad():
        flow(x)
    assert flow.nfe == 20 * 4
    assert flow.active_trace == "exact" and flow.train().active_trace == "hutchinson"
    # re-discretisation without rebuilding the model
    flow.eval()
    flow.set_eval_solver(method="dopri5", step_size=None, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        ref = flow.log_prob(x)
        with flow.using_solver(Solver("rk4", step_size=0.01)):
            close = flow.log_prob(x)
    torch.testing.assert_close(close, ref, rtol=0, atol=1e-8)


def test_sequential_flow_composes_blocks_and_noise_per_block():
    b1 = CNF(mlp(seed=9), T=0.4, method="dopri5", rtol=1e-9, atol=1e-9)
    b2 = CNF(mlp(seed=10), T=0.3, method="dopri5", rtol=1e-9, atol=1e-9)
    flow = SequentialFlow([b1, b2])
    x = torch.randn(5, 2)
    e1, e2 = torch.randn(5, 2), torch.randn(5, 2)
    with torch.no_grad():
        o = flow(x, noise=[e1, e2])
        o1 = b1(x, noise=e1)
        o2 = b2(o1.out, noise=e2)
        torch.testing.assert_close(o.out, o2.out)
        torch.testing.assert_close(o.logdet, o1.logdet + o2.logdet)
        flow.eval()
        xr, ld_r = flow.inverse(o.out)
        torch.testing.assert_close(xr, x, rtol=0, atol=1e-7)
        z, ld = flow.transform(x)
        torch.testing.assert_close(ld_r, -ld, rtol=0, atol=1e-7)
        lp = flow.log_prob(x)
        torch.testing.assert_close(lp, StandardNormal(2).log_prob(z) + ld)


def test_explicit_noise_is_reproducible_and_fixed_through_the_backward_pass():
    # the adjoint backward re-evaluates the dynamics; if the probe were redrawn there, its gradient would
    # not match the direct (backprop) gradient of the same noisy objective.
    kw = dict(T=0.5, trace="hutchinson", method="dopri5", rtol=1e-9, atol=1e-9)
    d = mlp(seed=11)
    direct = CNF(d, gradient="direct", **kw)
    adj = CNF(d, gradient="adjoint", **kw)
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    l1 = _loss(direct, x, e)
    assert l1.item() == _loss(direct, x, e).item()
    g1 = torch.autograd.grad(l1, list(d.parameters()))
    g2 = torch.autograd.grad(_loss(adj, x, e), list(d.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # generator-drawn noise is reproducible
    a = direct.log_prob(x, noise=torch.Generator().manual_seed(3))
    b = direct.log_prob(x, noise=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_build_flow_and_input_validation():
    flow = build_flow(3, hidden=(8,), num_blocks=2, T=0.5, method="rk4", step_size=0.25, nn_backend="torch")
    assert len(flow.cnf_blocks()) == 2 and len(flow.end_time_parameters()) == 2
    assert len(flow.network_parameters()) == len(list(flow.parameters())) - 2
    with pytest.raises(ValueError, match="batch"):
        flow(torch.randn(4, 2))
    with pytest.raises(ValueError, match="trace"):
        CNF(mlp(), trace="brute")
    with pytest.raises(ValueError, match="norm"):
        Solver(options={"norm": None})
    with pytest.raises(ValueError, match="noise"):
        flow(torch.randn(4, 3), noise=torch.randn(4, 2))


def _fused_backends():
    from fastode.nn import available_backends

    out = []
    if "cpp" in available_backends():
        out.append("cpp")
    if torch.cuda.is_available() and "triton" in available_backends():
        out.append(pytest.param("triton", marks=pytest.mark.gpu))
    return out


@pytest.mark.parametrize("backend", _fused_backends())
@pytest.mark.parametrize("time_varying", [False, True])
def test_fused_nn_backends_match_reference_through_flow_and_regularizers(backend, time_varying):
    from fastode.flows import TimeVaryingConcatSquashMLP

    dev = "cuda" if backend == "triton" else "cpu"
    dt = torch.float32 if backend == "triton" else torch.float64
    x, e = torch.randn(8, 2, dtype=dt, device=dev), torch.randn(8, 2, dtype=dt, device=dev)
    res = []
    for b in ("torch", backend):
        torch.manual_seed(1)
        m = (TimeVaryingConcatSquashMLP(2, (16, 16), num_controls=2, backend=b, init="independent") if time_varying
             else ConcatSquashMLP(2, (16, 16), backend=b)).to(dev, dt)
        flow = CNF(m, T=0.5, method="rk4", step_size=0.25, regularizers=["kinetic", "jf", "r2"]).to(dev, dt)
        o = flow(x, noise=e)
        loss = -(flow.base.log_prob(o.out) + o.logdet).mean() + sum(v.mean() for v in o.reg.values())
        res.append((loss, torch.autograd.grad(loss, list(m.parameters())), m.last_backend))
    assert res[1][2] == backend
    tol = dict(rtol=1e-4, atol=1e-5) if dt == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res[1][0], res[0][0], **tol)
    for a, b in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(a, b, **tol)
