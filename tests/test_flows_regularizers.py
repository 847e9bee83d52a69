"""fastode.flows regularisers against independent computations.

RNODE / TayNODE integrals: a separate augmented ODE integrated by torchdiffeq at tight tolerances, with
Jacobians from reverse-mode autograd and time derivatives from finite differences or closed forms (not
the forward-mode code under test). Error regularisers: torchdiffeq's own RK step, initial-step heuristic
and error ratio.
"""
import pytest
import torch
import torchdiffeq
from torch import nn

from fastode.flows import CNF, GlobalError, JacobianFrobenius, KineticEnergy, LocalError, TaylorOrder
from fastode.flows import density_loss, taylor_derivative
from fastode.nn import ConcatSquashMLP
from fastode.nn import functional as NF

pytestmark = pytest.mark.usefixtures("float64_default")


def mlp(dim=2, hidden=(16, 16), act="tanh", seed=0, backend="torch"):
    torch.manual_seed(seed)
    return ConcatSquashMLP(dim, hidden, act, backend=backend)


def fn_of(m):
    return lambda t, z: NF.concatsquash_mlp(t, z, m.params(), m.activation)


def jacobian_rows(f, z):
    """J[b, i, j] = d f_i / d z_j by D reverse-mode passes."""
    rows = [torch.autograd.grad(f[:, i].sum(), z, create_graph=True, retain_graph=True)[0] for i in range(f.shape[1])]
    return torch.stack(rows, 1)


def reference_integrals(fn, x, T, e, dt_fn=None):
    """int_0^T of ||f||^2, ||e^T J||^2, ||J f + df/dt||^2 along dz/dt = f (tight dopri5, all states controlled)."""

    def aug(t, s):
        z = s[0]
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True) if not z.requires_grad else z
            f = fn(t, zz)
            J = jacobian_rows(f, zz)
        eJ = torch.einsum("bi,bij->bj", e, J)
        h = 1e-5
        dtf = (fn(t + h, z) - fn(t - h, z)) / (2 * h) if dt_fn is None else dt_fn(t, z)
        d2 = torch.einsum("bij,bj->bi", J, f) + dtf
        return f, (f * f).sum(-1), (eJ * eJ).sum(-1), (d2 * d2).sum(-1)

    B = x.shape[0]
    zeros = torch.zeros(B)
    sol = torchdiffeq.odeint(aug, (x, zeros, zeros, zeros), torch.tensor([0.0, T]), rtol=1e-10, atol=1e-10)
    return {"kinetic": sol[1][-1], "jacobian_frobenius": sol[2][-1], "r2": sol[3][-1]}


BACKENDS = ["torchdiffeq", "fastode"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trace", ["hutchinson", "exact"])
def test_rnode_and_r2_integrals_match_reference(trace, backend):
    m = mlp(seed=1)
    flow = CNF(m, T=0.6, method="dopri5", rtol=1e-10, atol=1e-10, trace=trace, backend=backend,
               regularizers=[KineticEnergy(), JacobianFrobenius(), TaylorOrder(order=2)]).train()
    x, e = torch.randn(6, 2), torch.randn(6, 2)
    out = flow(x, noise=e)
    ref = reference_integrals(fn_of(m), x, 0.6, e)
    for k in ("kinetic", "jacobian_frobenius", "r2"):
        assert out.reg[k].shape == (6,)
        torch.testing.assert_close(out.reg[k], ref[k], rtol=1e-7, atol=1e-9)


def test_regularizer_states_do_not_change_the_main_solve():
    m = mlp(seed=2)
    x, e = torch.randn(6, 2), torch.randn(6, 2)
    plain = CNF(m, T=0.6, method="dopri5", rtol=1e-5, atol=1e-5)
    reg = CNF(m, T=0.6, method="dopri5", rtol=1e-5, atol=1e-5, regularizers=["kinetic", "jf", "r2"])
    plain.reset_nfe(), reg.reset_nfe()
    a, b = plain(x, noise=e), reg(x, noise=e)
    assert plain.nfe == reg.nfe  # excluded from step-size control
    assert torch.equal(a.out, b.out) and torch.equal(a.logdet, b.logdet)


class Affine(nn.Module):
    """f(t, z) = z A^T + b t: d2 = (A f + b), d3 = A d2 in closed form."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b, self.dim = nn.Parameter(A), nn.Parameter(b), A.shape[0]

    def forward(self, t, z):
        return z @ self.A.t() + self.b * t


def test_taylor_r2_r3_on_affine_dynamics_closed_form():
    A = torch.tensor([[0.2, -0.9], [0.6, -0.3]])  # non-symmetric: J f != J^T f
    b = torch.tensor([0.5, -0.25])
    dyn = Affine(A, b)
    flow = CNF(dyn, T=0.8, method="dopri5", rtol=1e-10, atol=1e-10, regularizers=["r2", "r3"])
    x = torch.randn(5, 2)
    out = flow(x)

    def aug(t, s):
        z = s[0]
        f = z @ A.t() + b * t
        d2 = f @ A.t() + b
        d3 = d2 @ A.t()
        return f, (d2 * d2).sum(-1), (d3 * d3).sum(-1)

    zeros = torch.zeros(5)
    sol = torchdiffeq.odeint(aug, (x, zeros, zeros), torch.tensor([0.0, 0.8]), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(out.reg["r2"], sol[1][-1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.reg["r3"], sol[2][-1], rtol=1e-8, atol=1e-10)
    # and its gradient w.r.t. A matches finite differences
    (gA,) = torch.autograd.grad(out.reg["r3"].sum(), dyn.A)
    eps = 1e-6
    with torch.no_grad():
        dyn.A[0, 1] += eps
        hi = flow(x).reg["r3"].sum()
        dyn.A[0, 1] -= 2 * eps
        lo = flow(x).reg["r3"].sum()
        dyn.A[0, 1] += eps
    assert abs(gA[0, 1].item() - (hi - lo).item() / (2 * eps)) < 1e-6 * max(1, abs(gA[0, 1].item()))


@pytest.mark.parametrize("order", [2, 3])
def test_taylor_derivative_matches_trajectory_finite_differences(order):
    m = mlp(seed=3, act="softplus")
    fn = fn_of(m)
    t0, z0 = 0.3, torch.randn(4, 2)
    h = 2e-3
    ts = torch.tensor([t0 + k * h for k in (-2, -1, 0, 1, 2)])
    # integrate outward from t0 in both directions
    fwd = torchdiffeq.odeint(fn, z0, ts[2:], rtol=1e-13, atol=1e-13)
    bwd = torchdiffeq.odeint(fn, z0, ts[:3].flip(0), rtol=1e-13, atol=1e-13).flip(0)
    Z = torch.cat([bwd[:2], fwd])  # z at t0 - 2h ... t0 + 2h
    if order == 2:
        fd = (Z[3] - 2 * Z[2] + Z[1]) / h**2
    else:
        fd = (Z[4] - 2 * Z[3] + 2 * Z[1] - Z[0]) / (2 * h**3)
    d = taylor_derivative(fn, torch.tensor(t0), z0, order)
    rel = (d - fd).norm() / d.norm()
    assert rel < (1e-5 if order == 2 else 1e-3), rel.item()


def test_density_loss_weights():
    m = mlp(seed=4)
    flow = CNF(m, T=0.5, method="rk4", step_size=0.25, regularizers={"kinetic": 0.5, "jf": 0.25})
    x, e = torch.randn(6, 2), torch.randn(6, 2)
    loss, info = density_loss(flow, x, noise=e)
    logp, reg = flow.log_prob_and_reg(x, noise=e)
    ref = -logp.mean() + 0.5 * reg["kinetic"].mean() + 0.25 * reg["jacobian_frobenius"].mean()
    torch.testing.assert_close(loss, ref)
    assert set(info) == {"nll", "kinetic", "jacobian_frobenius", "nfe"} and info["nfe"] == 8
    # evaluation mode: no regularisers
    flow.eval()
    assert flow.log_prob_and_reg(x)[1] == {}


# ---------------------------------------------------------------------------------------------------------
# error-estimate regularisers

def _reference_step(m, e, u, dt, t_reg, rtol, atol):
    """torchdiffeq's dopri5 step + error ratio on (z, logdet) with an autograd Hutchinson trace."""
    from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU as TAB
    from torchdiffeq._impl.misc import _compute_error_ratio, _mixed_norm
    from torchdiffeq._impl.rk_common import _runge_kutta_step

    fn = fn_of(m)
    D = u[0].shape[1]
    B = u[0].shape[0]

    def func(t, v, perturb=None):  # torchdiffeq passes perturb=; stage times unperturbed
        z = v[: B * D].reshape(B, D)
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            f = fn(t, zz)
            vjp = torch.autograd.grad(f, zz, e, create_graph=True)[0]
        return torch.cat([f.reshape(-1), (vjp * e).sum(-1)])

    v0 = torch.cat([u[0].reshape(-1), u[1]])
    f0 = func(t_reg, v0).detach()
    y1, _, err, _ = _runge_kutta_step(func, v0, f0, t_reg, dt, t_reg + dt, TAB)

    def norm(v):
        return _mixed_norm((v[: B * D], v[B * D:]))

    return _compute_error_ratio(err, rtol, atol, v0, y1, norm), func, v0, f0, norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_error_equals_the_solvers_embedded_estimate_for_that_step(backend):
    m = mlp(seed=5)
    T = 0.7
    flow = CNF(m, T=T, method="dopri5", rtol=1e-4, atol=1e-4, backend=backend, regularizers=[LocalError(weight=1.0)])
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    torch.manual_seed(123)
    out = flow(x, noise=e)
    info = flow.last_local_step
    t_reg, dt, u = info["t_reg"], info["dt"], info["u"]
    assert 0 <= t_reg.item() < T and 0 < dt.item() <= T - t_reg.item() + 1e-15
    # u(t_reg) is the main solve's state at t_reg (to its tolerance)
    ref_u = torchdiffeq.odeint(lambda t, z: fn_of(m)(t, z), x, torch.stack([torch.tensor(0.0), t_reg]),
                               rtol=1e-10, atol=1e-10)[-1]
    assert (u[0] - ref_u).abs().max() < 1e-3
    ratio, func, v0, f0, norm = _reference_step(m, e, u, dt, t_reg, 1e-4, 1e-4)
    torch.testing.assert_close(out.reg["local_error"], ratio * dt, rtol=1e-10, atol=1e-14)
    # dt is the Hairer initial step at (t_reg, u(t_reg)) (unless clamped to T - t_reg)
    from torchdiffeq._impl.misc import _select_initial_step

    h0 = _select_initial_step(func, t_reg, v0, 5, 1e-4, 1e-4, norm, f0)
    torch.testing.assert_close(dt, torch.minimum(h0, T - t_reg))
    # gradients reach the weights only through the stages of that step: same as the reference's
    g = torch.autograd.grad(out.reg["local_error"], list(m.parameters()))
    g_ref = torch.autograd.grad(ratio * dt, list(m.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-14)
    assert sum(a.abs().sum() for a in g) > 0


def test_local_error_equals_fastode_solver_first_step_error():
    import fastode

    m = mlp(seed=6)
    flow = CNF(m, T=0.7, method="dopri5", rtol=1e-4, atol=1e-4, backend="fastode", regularizers=["local_error"])
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    out = flow(x, noise=e)
    info = flow.last_local_step
    from fastode.flows.cnf import _AugmentedDynamics, _Counter
    from fastode.flows.solver import state_norm

    func = _AugmentedDynamics(m, e, "hutchinson", (), _Counter())
    t = torch.stack([info["t_reg"], info["t_reg"] + info["dt"]])
    _, stats = fastode.odeint(func, info["u"], t, rtol=1e-4, atol=1e-4, method="dopri5",
                              options={"first_step": float(info["dt"]), "norm": state_norm(2)}, return_stats=True)
    assert stats.num_rejected_steps == 0 and stats.step_sizes[0] == pytest.approx(float(info["dt"]), rel=1e-12)
    torch.testing.assert_close(stats.step_errors[0] * abs(stats.step_sizes[0]), out.reg["local_error"].detach(),
                               rtol=1e-9, atol=1e-14)


def test_biased_local_error_samples_an_accepted_step_time():
    m = mlp(seed=7)
    flow = CNF(m, T=0.5, method="rk4", step_size=0.125, rtol=1e-4, atol=1e-4, regularizers=["local_error_biased"])
    x = torch.randn(8, 2)
    seen = set()
    for _ in range(12):
        out = flow(x)
        t = flow.last_local_step["t_reg"].item()
        seen.add(round(t, 12))
        assert out.reg["local_error_biased"].item() > 0
    assert seen <= {0.0, 0.125, 0.25, 0.375} and len(seen) >= 2


def test_global_error_equals_sum_of_recomputed_step_errors():
    from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU as TAB
    from torchdiffeq._impl.misc import _compute_error_ratio, _mixed_norm
    from torchdiffeq._impl.rk_common import _runge_kutta_step

    m = mlp(seed=8)
    flow = CNF(m, T=0.6, method="dopri5", rtol=1e-5, atol=1e-5, backend="fastode", regularizers=[GlobalError()])
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    out = flow(x, noise=e)
    stats = flow.last_stats
    assert stats.num_accepted_steps >= 2
    # replay the accepted steps with torchdiffeq's RK step
    fn = fn_of(m)
    B, D = x.shape

    def func(t, v, perturb=None):  # torchdiffeq passes perturb=; stage times unperturbed
        z = v[: B * D].reshape(B, D)
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            f = fn(t, zz)
            vjp = torch.autograd.grad(f, zz, e, create_graph=True)[0]
        return torch.cat([f.reshape(-1), (vjp * e).sum(-1)])

    def norm(v):
        return _mixed_norm((v[: B * D], v[B * D:]))

    v = torch.cat([x.reshape(-1), torch.zeros(B)])
    total = 0
    for t0, h in zip(stats.step_ts, stats.step_sizes):
        t0, h = torch.tensor(t0), torch.tensor(h)
        y1, _, err, _ = _runge_kutta_step(func, v, func(t0, v), t0, h, t0 + h, TAB)
        total = total + _compute_error_ratio(err, 1e-5, 1e-5, v, y1, norm) * h.abs()
        v = y1
    torch.testing.assert_close(out.reg["global_error"], total, rtol=1e-6, atol=1e-12)
    g = torch.autograd.grad(out.reg["global_error"], list(m.parameters()))
    g_ref = torch.autograd.grad(total, list(m.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_global_error_needs_step_errors():
    flow = CNF(mlp(), T=0.5, method="rk4", step_size=0.25, backend="torchdiffeq", regularizers=["global_error"])
    with pytest.raises(ValueError, match="step_errors|adaptive"):
        flow(torch.randn(4, 2))


@pytest.mark.parametrize("solver", [dict(method="rk4", step_size=0.125), dict(method="dopri5", rtol=1e-6, atol=1e-6)])
def test_checkpoint_gradient_equals_direct_with_regularizers(solver):
    pytest.importorskip("fastode.grad.checkpoint", reason="fastode's checkpoint gradient is not available yet")
    m = mlp(seed=9)
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    grads = []
    for gradient in ("direct", "checkpoint"):
        flow = CNF(m, T=0.6, learn_T=True, backend="fastode", gradient=gradient,
                   regularizers={"kinetic": 0.1, "jf": 0.1, "r2": 0.01}, **solver)
        loss, _ = density_loss(flow, x, noise=e)
        grads.append(torch.autograd.grad(loss, list(m.parameters()) + [flow._T_raw]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_biased_local_error_with_adaptive_solver_uses_accepted_step_starts():
    m = mlp(seed=10)
    flow = CNF(m, T=0.6, method="dopri5", rtol=1e-6, atol=1e-6, backend="fastode",
               regularizers=[LocalError(mode="biased")])
    x, e = torch.randn(8, 2), torch.randn(8, 2)
    out = flow(x, noise=e)
    starts = flow.last_stats.step_ts
    info = flow.last_local_step
    assert len(starts) >= 3 and any(abs(info["t_reg"].item() - s) < 1e-12 for s in starts)
    # u(t_reg) is the solution there (detached re-solve), and the value is the reference step's
    if info["t_reg"].item() > 0:
        ref_u = torchdiffeq.odeint(fn_of(m), x, torch.tensor([0.0, info["t_reg"].item()]), rtol=1e-10,
                                   atol=1e-10)[-1]
        assert (info["u"][0] - ref_u).abs().max() < 1e-4
    ratio, *_ = _reference_step(m, e, info["u"], info["dt"], info["t_reg"], 1e-6, 1e-6)
    torch.testing.assert_close(out.reg["local_error_biased"], ratio * info["dt"], rtol=1e-9, atol=1e-14)
