"""ConcatSquashMLP (torch path) vs an independent re-implementation of FFJORD's ODEnet/ConcatSquashLinear,
its divergence functions (Hutchinson via autograd.grad, brute force), and torch.func.jacrev."""
import math

import pytest
import torch
from torch.func import jacrev, vmap

from fastode.nn import ConcatSquashLinear, ConcatSquashMLP
from ffjord_reference import ODEnet as FfjordODEnet, divergence_approx, divergence_bf


def pair(dim, hidden, act, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    ours = ConcatSquashMLP(dim, hidden, act, backend="torch").to(dtype)
    ref = FfjordODEnet(dim, hidden, act).to(dtype)
    ref.layers.load_state_dict(ours.layers.state_dict())  # same submodule names as FFJORD
    return ours, ref


@pytest.mark.parametrize("act", ["tanh", "softplus", "elu", "swish", "identity"])
def test_forward_and_hutchinson_match_ffjord(act):
    ours, ref = pair(2, (16, 16, 16), act)
    y = torch.randn(10, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(10, 2, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    f, tr, kin, frob = ours.forward_with_trace(t, y, e)
    f_ref = ref(t, y)
    tr_ref, vjp_ref = divergence_approx(f_ref, y, e)
    torch.testing.assert_close(f, f_ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ours(t, y), f_ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(tr, tr_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(kin, (f_ref ** 2).sum(1))
    torch.testing.assert_close(frob, (vjp_ref ** 2).sum(1), rtol=1e-12, atol=1e-13)
    # gradients of an RNODE-style loss w.r.t. the parameters match through autograd of FFJORD's graph
    loss = (f ** 2).mean() + tr.mean() + 0.1 * kin.mean() + 0.1 * frob.mean()
    loss_ref = (f_ref ** 2).mean() + tr_ref.mean() + 0.1 * (f_ref ** 2).sum(1).mean() + 0.1 * (vjp_ref ** 2).sum(1).mean()
    g = torch.autograd.grad(loss, list(ours.parameters()))
    g_ref = torch.autograd.grad(loss_ref, list(ref.layers.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("act", ["tanh", "softplus"])
def test_exact_trace_vs_jacrev_and_brute_force(act):
    ours, ref = pair(3, (8, 8), act)
    y = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(-0.2, dtype=torch.float64)
    f, tr, kin, frob = ours.forward_with_trace(t, y, exact=True)
    assert frob is None
    J = vmap(jacrev(lambda yy: ref(t, yy[None])[0]))(y)
    torch.testing.assert_close(tr, torch.diagonal(J, dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(tr, divergence_bf(ref(t, y), y), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(kin, (f ** 2).sum(-1))


def test_initialisation_is_ffjords():
    torch.manual_seed(123)
    ours = ConcatSquashMLP(2, (64, 64, 64))
    torch.manual_seed(123)
    ref = FfjordODEnet(2, (64, 64, 64), "tanh")
    for (n1, p1), (n2, p2) in zip(ours.layers.named_parameters(), ref.layers.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2)
    W = ours.layers[1]._layer.weight
    assert W.abs().max() <= 1 / math.sqrt(64)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert ours.layers[0]._hyper_gate.weight.abs().max() <= 1.0


def test_usable_as_odeint_func_and_leading_dims():
    m = ConcatSquashMLP(2, (8,))
    z = torch.randn(3, 4, 2)
    out = m(torch.tensor(0.5), z)
    assert out.shape == z.shape
    torch.testing.assert_close(out.reshape(-1, 2), m(0.5, z.reshape(-1, 2)))
    f, tr, kin, frob = m.forward_with_trace(0.5, z)
    assert f.shape == z.shape and tr.shape == (3, 4) and kin.shape == (3, 4) and frob.shape == (3, 4)
    torchdiffeq = pytest.importorskip("torchdiffeq")
    sol = torchdiffeq.odeint(m, torch.randn(5, 2), torch.tensor([0.0, 0.5]), method="rk4", options={"step_size": 0.1})
    assert sol.shape == (2, 5, 2)


def test_rademacher_noise_and_errors():
    m = ConcatSquashMLP(2, (8,), noise="rademacher")
    e = m.sample_noise(torch.zeros(100, 2))
    assert set(e.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="built for dim=2"):
        m(0.0, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        ConcatSquashMLP(2, activation="relu")
    with pytest.raises(ValueError, match="e has shape"):
        m.forward_with_trace(0.0, torch.zeros(3, 2), torch.zeros(3, 1))


def test_concatsquash_linear_layer_formula():
    torch.manual_seed(0)
    layer = ConcatSquashLinear(3, 4)
    x = torch.randn(5, 3)
    t = torch.tensor(0.7)
    ref = layer._layer(x) * torch.sigmoid(layer._hyper_gate(t.view(1, 1))) + layer._hyper_bias(t.view(1, 1))
    torch.testing.assert_close(layer(t, x), ref)


def test_params_follow_parametrizations_and_replaced_parameters():
    """params() reads the parameter dicts for speed; a parametrized weight (torch.nn.utils.parametrize) or a
    replaced parameter must still be what the network uses."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, W):
            return 2 * W

    torch.manual_seed(0)
    m = ConcatSquashMLP(2, (6,), "tanh", backend="torch")
    z = torch.randn(4, 2)
    layer = m.layers[0]
    W0 = layer._layer.weight.detach().clone()
    parametrize.register_parametrization(layer._layer, "weight", Double())
    assert torch.equal(layer.params()[0], 2 * W0)
    torch.testing.assert_close(m(0.3, z), m.layers[1](0.3, torch.tanh(layer(0.3, z))))
    parametrize.remove_parametrizations(layer._layer, "weight", leave_parametrized=False)
    new = torch.nn.Parameter(torch.randn(6, 2))
    layer._layer.weight = new
    assert layer.params()[0] is new
