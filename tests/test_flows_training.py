"""fastode.flows training accelerators: TO-FLOW end-time optimiser, Disc-Opt time-varying weights,
multilevel training."""
import pytest
import torch

from fastode.flows import (
    CNF,
    EndTimeOptimizer,
    MultilevelLevel,
    SequentialFlow,
    Solver,
    TimeVaryingConcatSquashMLP,
    apply_level,
    build_flow,
    clip_end_time,
    density_loss,
    multilevel_schedule,
    multilevel_train,
)
from fastode.nn import ConcatSquashMLP
from fastode.nn import functional as NF

pytestmark = pytest.mark.usefixtures("float64_default")


# --------------------------------------------------------------------------------------------------------
# TO-FLOW

def _toflow_flow(seed=0, T=0.5):
    torch.manual_seed(seed)
    return SequentialFlow([CNF(ConcatSquashMLP(2, (16, 16), backend="torch"), T=T, learn_T=True,
                               T_parametrization="linear", method="rk4", step_size=0.05)])


def test_clip_function_is_eq17():
    assert clip_end_time(5.0, T0=0.5, t0=0.0, eps=0.1) == pytest.approx(0.9)
    assert clip_end_time(-1.0, T0=0.5, t0=0.0, eps=0.1) == pytest.approx(0.1)
    assert clip_end_time(0.3, T0=0.5, t0=0.0, eps=0.1) == 0.3
    with pytest.raises(ValueError, match="empty"):
        EndTimeOptimizer(_toflow_flow(T=0.1), eps=0.1)


def test_penalty_gradient_and_clip():
    flow = _toflow_flow()
    topt = EndTimeOptimizer(flow, lr=0.01, alpha=0.1, eps=0.1, mode="joint", optimizer="sgd")
    # no loss gradient: one SGD step moves T by -lr * alpha * sign(T)
    topt.zero_grad()
    topt.step()
    assert topt.end_times()[0] == pytest.approx(0.5 - 0.01 * 0.1)
    # a huge step is clipped to 2 T0 - t0 - eps
    flow.end_time_parameters()[0].grad = torch.tensor(-1e4)
    topt.step()
    assert topt.end_times()[0] == pytest.approx(0.9)
    flow.end_time_parameters()[0].grad = torch.tensor(1e4)
    topt.step()
    assert topt.end_times()[0] == pytest.approx(0.1)


def test_alternate_step_updates_only_T_with_the_gradient_at_the_new_weights():
    flow = _toflow_flow(seed=1)
    x, e = torch.randn(32, 2), torch.randn(32, 2)
    net = flow.network_parameters()
    opt = torch.optim.SGD(net, lr=1e-2)
    topt = EndTimeOptimizer(flow, lr=1e-2, alpha=0.0, mode="alternate", optimizer="sgd")
    loss = -flow.log_prob(x, noise=e).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()  # theta step; T untouched by it
    assert topt.end_times()[0] == 0.5
    before = [p.detach().clone() for p in net]
    # expected T gradient at the updated weights, by finite differences
    with torch.no_grad():
        blk = flow.cnf_blocks()[0]
        vals = []
        for s in (1, -1):
            blk.set_T(0.5 + s * 1e-6)
            vals.append(-flow.log_prob(x, noise=e).mean().item())
        blk.set_T(0.5)
    fd = (vals[0] - vals[1]) / 2e-6
    topt.alternate_step(lambda: -flow.log_prob(x, noise=e).mean())
    assert topt.end_times()[0] == pytest.approx(0.5 - 1e-2 * fd, rel=1e-6, abs=1e-10)
    for p, b in zip(net, before):
        assert torch.equal(p, b) and p.requires_grad
    assert all(p.grad is None or torch.equal(p.grad, g.grad) for p, g in zip(net, net))


def test_toflow_training_loop_runs_and_keeps_T_in_the_box():
    flow = _toflow_flow(seed=2)
    opt = torch.optim.Adam(flow.network_parameters(), lr=1e-2)
    topt = EndTimeOptimizer(flow, lr=5e-2, alpha=0.1, eps=0.1, mode="joint")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(64, 2, generator=g) * 0.5 + 1.0
        loss, _ = density_loss(flow, x)
        opt.zero_grad()
        topt.zero_grad()
        loss.backward()
        opt.step()
        topt.step()
        assert 0.1 - 1e-12 <= topt.end_times()[0] <= 0.9 + 1e-12
    assert topt.end_times()[0] != 0.5


# --------------------------------------------------------------------------------------------------------
# Disc-Opt time-varying weights

def test_time_varying_mlp_interpolates_weights():
    torch.manual_seed(3)
    tv = TimeVaryingConcatSquashMLP(2, (8, 8), "tanh", control_times=[0.0, 0.5, 1.0], backend="torch",
                                    init="independent")
    z = torch.randn(5, 2)
    ctrl = [[tuple(getattr(h, nm)[k] for nm in ("W", "b", "gw", "gb", "bw")) for h in tv.params_by_layer]
            for k in range(3)]
    # at a control time: that control's weights; halfway between: the averaged weights; outside: clamped
    for t, params in ((0.5, ctrl[1]), (1.7, ctrl[2]), (-0.3, ctrl[0])):
        torch.testing.assert_close(tv(torch.tensor(t), z), NF.concatsquash_mlp(torch.tensor(t), z, params, "tanh"))
    mid = [tuple(0.5 * (a + b) for a, b in zip(la, lb)) for la, lb in zip(ctrl[0], ctrl[1])]
    torch.testing.assert_close(tv(torch.tensor(0.25), z), NF.concatsquash_mlp(torch.tensor(0.25), z, mid, "tanh"))
    # theta(t) is differentiable in t: d/dt through the weights matches finite differences
    t = torch.tensor(0.3, requires_grad=True)
    (g,) = torch.autograd.grad(tv(t, z).sum(), t)
    fd = (tv(torch.tensor(0.3 + 1e-6), z).sum() - tv(torch.tensor(0.3 - 1e-6), z).sum()) / 2e-6
    assert abs(g.item() - fd.item()) < 1e-6


def test_time_varying_copy_init_equals_stationary_and_refine_preserves_function():
    torch.manual_seed(4)
    tv = TimeVaryingConcatSquashMLP(2, (8,), "softplus", num_controls=2, T=1.0, backend="torch")
    stat = ConcatSquashMLP(2, (8,), "softplus", backend="torch")
    with torch.no_grad():
        for layer, h in zip(stat.layers, tv.params_by_layer):
            for p, nm in zip(layer.params(), ("W", "b", "gw", "gb", "bw")):
                p.copy_(getattr(h, nm)[0])
    z = torch.randn(4, 2)
    for t in (0.0, 0.37, 1.0):
        torch.testing.assert_close(tv(torch.tensor(t), z), stat(torch.tensor(t), z))
    with torch.no_grad():  # make the weights actually time-varying
        for h in tv.params_by_layer:
            h.W[1].add_(0.3)
    ts = [torch.tensor(v) for v in (0.0, 0.2, 0.5, 0.9, 1.0)]
    before = [tv(t, z) for t in ts]
    tv.refine(3)
    assert tv.num_controls == 3 and tv.params_by_layer[0].W.shape[0] == 3
    for t, b in zip(ts, before):
        torch.testing.assert_close(tv(t, z), b)


def test_time_varying_trace_paths():
    torch.manual_seed(5)
    tv = TimeVaryingConcatSquashMLP(2, (8, 8), "tanh", num_controls=3, T=1.0, backend="torch", init="independent")
    flow_tv = CNF(tv, T=1.0, method="rk4", step_size=0.1)

    class Plain(torch.nn.Module):
        dim = 2

        def forward(self, t, z):
            return tv(t, z)

    plain = CNF(Plain(), T=1.0, method="rk4", step_size=0.1)
    x, e = torch.randn(6, 2), torch.randn(6, 2)
    for tr in ("hutchinson", "exact"):
        a, b = flow_tv(x, noise=e, trace=tr), plain(x, noise=e, trace=tr)
        torch.testing.assert_close(a.out, b.out)
        torch.testing.assert_close(a.logdet, b.logdet)
    # TayNODE regulariser works with time-varying weights (pure-torch path for forward mode)
    reg = CNF(tv, T=1.0, method="rk4", step_size=0.1, regularizers=["r2"])
    assert reg(x).reg["r2"].shape == (6,)


# --------------------------------------------------------------------------------------------------------
# multilevel

def test_multilevel_schedule_and_apply_level():
    levels = multilevel_schedule((3, 5), step_sizes=(0.5, 0.25), method="rk4", lrs=(1e-3, 5e-4))
    assert levels[0] == MultilevelLevel(3, "rk4", 0.5, None, None, 1e-3, None)
    flow = build_flow(2, hidden=(8,), T=1.0, learn_T=False, method="dopri5", nn_backend="torch")
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    x = torch.randn(4, 2)
    nfes = []

    def train_fn(f, optimizer, level, i):
        assert optimizer.param_groups[0]["lr"] == level.lr
        for _ in range(level.iterations):
            f.reset_nfe()
            loss, _ = density_loss(f, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        nfes.append(f.nfe)

    multilevel_train(flow, levels, train_fn, opt)
    assert nfes == [2 * 4, 4 * 4]  # rk4: 2 steps of 0.5, then 4 steps of 0.25
    assert flow.cnf_blocks()[0].train_solver == Solver("rk4", step_size=0.25, rtol=1e-5, atol=1e-5)
    # Opt-Disc: tolerances
    lv = multilevel_schedule((1,), tolerances=((1e-3, 1e-5),), method="dopri5")[0]
    apply_level(flow, lv)
    s = flow.cnf_blocks()[0].train_solver
    assert (s.method, s.step_size, s.rtol, s.atol) == ("dopri5", None, 1e-3, 1e-5)


def test_multilevel_refines_controls_and_rebuilds_optimizer():
    flow = build_flow(2, hidden=(8,), T=1.0, learn_T=True, time_varying=2, method="rk4", step_size=0.5,
                      nn_backend="torch")
    opt = torch.optim.Adam(flow.network_parameters(), lr=1e-3)
    x = torch.randn(4, 2)
    with torch.no_grad():
        flow.eval()
        before = flow.log_prob(x, noise=torch.zeros(4, 2))
    new = apply_level(flow, MultilevelLevel(1, num_controls=3, lr=5e-4), opt)
    assert new is not opt and new.param_groups[0]["lr"] == 5e-4
    ids = {id(p) for g in new.param_groups for p in g["params"]}
    assert ids == {id(p) for p in flow.network_parameters()}  # end time still excluded
    with torch.no_grad():
        after = flow.log_prob(x, noise=torch.zeros(4, 2))
    torch.testing.assert_close(after, before)


def test_a_small_flow_learns_a_shifted_gaussian():
    torch.manual_seed(0)
    flow = build_flow(2, hidden=(16, 16), T=1.0, learn_T=True, method="rk4", step_size=0.5, nn_backend="torch",
                      regularizers={"kinetic": 0.01, "jf": 0.01})
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor([2.0, -1.5]), 0.5
    xt = torch.randn(2000, 2, generator=g) * std + mean
    flow.eval()
    with torch.no_grad():
        nll0 = -flow.log_prob(xt).mean().item()
    flow.train()
    for _ in range(30):
        x = torch.randn(128, 2, generator=g) * std + mean
        loss, info = density_loss(flow, x, module=flow)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        nll = -flow.log_prob(xt).mean().item()
    best = 1.0 + torch.log(torch.tensor(2 * torch.pi * std**2)).item()  # entropy of the data distribution
    assert nll0 - best > 2.0
    assert nll < nll0 - 2.0, (nll0, nll, best)
