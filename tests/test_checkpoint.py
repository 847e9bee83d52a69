"""gradient="checkpoint": the same gradients as gradient="direct" (to rounding), gradcheck, analytic t-gradients."""
import pytest
import torch

import fastode
from fastode.errors import InvalidOptionError
from problems import ExpDecay, TimeDependent, TupleODE

D = torch.float64


class MLP(torch.nn.Module):
    def __init__(self, dim=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(dim + 1, 8).double()
        self.l2 = torch.nn.Linear(8, dim).double()

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1).to(y)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))


def _grads(func, y0, t, params, mode, **kw):
    sol, stats = fastode.odeint(func, y0, t, gradient=mode, return_stats=True, **kw)
    sol_t = sol if isinstance(sol, torch.Tensor) else torch.cat([s.reshape(len(t), -1) for s in sol], -1)
    w = torch.linspace(-1, 1, sol_t.numel(), dtype=sol_t.dtype).reshape(sol_t.shape)
    loss = (sol_t * w).sum() + (sol_t ** 2).sum()
    inputs = [x for x in (list(y0) if isinstance(y0, tuple) else [y0]) + [t] + list(params) if x.requires_grad]
    return sol_t.detach(), torch.autograd.grad(loss, inputs), stats


CONFIGS = [
    ("dopri5", {}), ("dopri8", {}), ("tsit5", {}), ("bosh3", {}), ("fehlberg2", {}), ("adaptive_heun", {}),
    ("euler", dict(step_size=0.1)), ("midpoint", {}), ("heun2", dict(step_size=0.25)), ("heun3", dict(step_size=0.2)),
    ("rk4", dict(step_size=0.1)), ("rk4_classic", dict(step_size=0.3, interp="cubic")),
    ("rk4", dict(step_size=0.1, perturb=True)),
    ("dopri5", dict(land_on="all")), ("dopri5", dict(land_on="end", interp="dense")),
    ("dopri5", dict(step_t=torch.tensor([0.35]), jump_t=torch.tensor([0.8]))),
    ("dopri5", dict(first_step=0.7)),   # forces a rejected first step
]


@pytest.mark.parametrize("method,options", CONFIGS)
@pytest.mark.parametrize("reverse", [False, True])
def test_checkpoint_equals_direct(method, options, reverse):
    f = MLP()
    y0 = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    t = torch.tensor([0.0, 0.3, 0.9, 1.5], dtype=D, requires_grad=True)
    tt = t.flip(0) if reverse else t
    kw = dict(method=method, rtol=1e-4, atol=1e-5, options=options)
    sd, gd, sdst = _grads(f, y0, tt, f.parameters(), "direct", **kw)
    sc, gc, scst = _grads(f, y0, tt, f.parameters(), "checkpoint", **kw)
    assert torch.allclose(sd, sc, rtol=1e-13, atol=1e-14)  # (t requiring grad changes the arithmetic slightly)
    assert sdst.num_fevals == scst.num_fevals and sdst.num_accepted_steps == scst.num_accepted_steps
    assert scst.num_fevals_backward > 0 and sdst.num_fevals_backward == 0
    for a, b in zip(gd, gc):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


def test_checkpoint_tuple_state_and_adjoint_params():
    f = TupleODE()
    x0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    z0 = torch.tensor(0.5, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    kw = dict(method="dopri5", rtol=1e-6, atol=1e-8)
    _, gd, _ = _grads(f, (x0, z0), t, (), "direct", **kw)
    _, gc, _ = _grads(f, (x0, z0), t, (), "checkpoint", **kw)
    for a, b in zip(gd, gc):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_checkpoint_plain_function_needs_adjoint_params():
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="adjoint_params"):
        fastode.odeint(lambda t, y: -y, y0, t, gradient="checkpoint")
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    sol = fastode.odeint(lambda t, y: -k * y, y0, t, gradient="checkpoint", adjoint_params=(k,), rtol=1e-10,
                         atol=1e-10)
    gy0, gk = torch.autograd.grad(sol[-1].sum(), (y0, k))
    assert torch.allclose(gy0, torch.exp(-k.detach()) * torch.ones(2, dtype=D), rtol=1e-8)
    assert torch.allclose(gk, -(torch.exp(-k.detach()) * 2), rtol=1e-8)


def test_checkpoint_unsupported():
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(InvalidOptionError, match="event_fn"):
        fastode.odeint(lambda t, y: -y, y0, t, gradient="checkpoint", adjoint_params=(),
                       event_fn=lambda t, y: y[0] - 0.5)
    with pytest.raises(ValueError, match="gradient must be one of"):
        fastode.odeint(lambda t, y: -y, y0, t, gradient="bogus")


def test_checkpoint_memory_is_one_state_per_step():
    # the recorded tape holds one state per accepted step (two only for fehlberg2/adaptive_heun)
    from fastode.grad import checkpoint as C
    seen = {}
    orig = C._CheckpointFn.forward

    def spy(ctx, solver, *args):
        out = orig(ctx, solver, *args)
        seen["tape"] = ctx.tape.records
        return out

    f = MLP()
    y0 = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.5], dtype=D)
    C._CheckpointFn.forward = staticmethod(spy)
    try:
        for method, per_step in [("dopri8", 1), ("dopri5", 1), ("fehlberg2", 2)]:
            _, stats = fastode.odeint(f, y0, t, method=method, gradient="checkpoint", return_stats=True, rtol=1e-5,
                                      atol=1e-6)
            tape = seen["tape"]
            assert len(tape) == stats.num_accepted_steps
            n_tensors = sum(1 + (r.f0 is not None) for r in tape)
            assert n_tensors == len(tape) + (per_step - 1) * (len(tape) - 1)   # the first f0 is recomputed
    finally:
        C._CheckpointFn.forward = orig


@pytest.mark.parametrize("method,options", [("rk4", dict(step_size=0.25)), ("midpoint", dict(step_size=0.2,
                                                                                               interp="cubic")),
                                            ("dopri5", dict(first_step=0.2, min_step=0.2, max_step=0.2)),
                                            ("tsit5", dict(first_step=0.3, min_step=0.3, max_step=0.3,
                                                           land_on="end"))])
@pytest.mark.parametrize("mode", ["checkpoint", "direct"])
def test_gradcheck(method, options, mode):
    f = MLP(dim=2)
    y0 = torch.randn(2, 2, dtype=D, requires_grad=True)
    t = torch.tensor([0.1, 0.45, 1.0], dtype=D, requires_grad=True)

    def fn(y0_, t_, w, b):
        with torch.no_grad():
            f.l1.weight.copy_(w.detach())
            f.l1.bias.copy_(b.detach())
        # gradients w.r.t. w, b flow through the module's parameters
        return fastode.odeint(f, y0_, t_, method=method, options=options, gradient=mode)

    def wrapped(y0_, t_):
        return fastode.odeint(f, y0_, t_, method=method, options=options, gradient=mode)

    assert torch.autograd.gradcheck(wrapped, (y0, t), eps=1e-6, atol=1e-6, rtol=1e-4)
    # parameters: compare to finite differences on one weight entry
    sol = wrapped(y0, t)
    g = torch.autograd.grad(sol.sum(), f.l1.weight)[0][0, 0]
    with torch.no_grad():
        eps = 1e-6
        f.l1.weight[0, 0] += eps
        up = wrapped(y0, t).sum()
        f.l1.weight[0, 0] -= 2 * eps
        down = wrapped(y0, t).sum()
        f.l1.weight[0, 0] += eps
    assert float(g) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("mode", ["direct", "checkpoint"])
@pytest.mark.parametrize("land_on", [None, "end", "all"])
def test_time_gradients_analytic(mode, land_on):
    # y' = cos(t) y: y(T) = y0 exp(sin T - sin t0); dy(T)/dT = cos(T) y(T); dy(T)/dt0 = -cos(t0) y(T)
    f = TimeDependent()
    y0 = torch.tensor([0.7, -1.2], dtype=D)
    t = torch.tensor([0.2, 0.9, 1.7], dtype=D, requires_grad=True)
    sol = fastode.odeint(f, y0, t, rtol=1e-11, atol=1e-12, gradient=mode, adjoint_params=(),
                         options=dict(land_on=land_on))
    exact = f.y_exact(t.detach(), y0, t0=0.2)
    assert torch.allclose(sol, exact, rtol=1e-8)
    g = torch.autograd.grad(sol[-1].sum(), t, retain_graph=True)[0]
    yT = exact[-1].sum()
    assert float(g[2]) == pytest.approx(float(torch.cos(t[2].detach()) * yT), rel=1e-6)
    assert float(g[0]) == pytest.approx(float(-torch.cos(t[0].detach()) * yT), rel=1e-6)
    assert abs(float(g[1])) < 1e-6
    g1 = torch.autograd.grad(sol[1].sum(), t)[0]
    y1 = exact[1].sum()
    assert float(g1[1]) == pytest.approx(float(torch.cos(t[1].detach()) * y1), rel=1e-6)


@pytest.mark.parametrize("mode", ["direct", "checkpoint"])
def test_parameter_gradients_analytic(mode):
    f = ExpDecay().double()
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.3], dtype=D)
    sol = fastode.odeint(f, y0, t, rtol=1e-11, atol=1e-12, gradient=mode)
    gk, gy0 = torch.autograd.grad(sol[-1].sum(), (f.k, y0))
    exact = f.y_exact(t, y0.detach())[-1]
    assert float(gk) == pytest.approx(float(-1.3 * exact.sum().detach()), rel=1e-7)
    # d sum(y(T)) / d y0 = (exp(-kT) R(wT))^T 1
    k, w = float(f.k.detach()), float(f.omega.detach())
    c, s = torch.cos(torch.tensor(w * 1.3, dtype=D)), torch.sin(torch.tensor(w * 1.3, dtype=D))
    e = torch.exp(torch.tensor(-k * 1.3, dtype=D))
    expected = e * torch.stack([c + s, c - s]).expand(2, 2)
    assert torch.allclose(gy0, expected, rtol=1e-8)
