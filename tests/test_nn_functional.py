"""The PyTorch reference (fastode.nn.functional) against independent references: autograd VJPs,
torch.func.jacrev, and finite differences (gradcheck) for the gradients through trace / RNODE terms."""
import pytest
import torch
from torch.func import jacrev, vmap

from fastode.nn import functional as F

ACTS = F.ACTIVATIONS


def make(D=3, hidden=(7, 5), dtype=torch.float64, seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    dims = (D,) + hidden + (D,)
    params = []
    for i, o in zip(dims[:-1], dims[1:]):
        params.append(tuple(torch.randn(s, generator=g, dtype=dtype) * sc
                            for s, sc in (((o, i), i ** -0.5), ((o,), 0.5), ((o,), 1.0), ((o,), 1.0), ((o,), 0.5))))
    z = torch.randn(B, D, generator=g, dtype=dtype)
    e = torch.randn(B, D, generator=g, dtype=dtype)
    t = torch.tensor(0.3, dtype=dtype)
    return t, z, e, params


def ffjord_layer(t, x, W, b, gw, gb, bw):
    """FFJORD ConcatSquashLinear written with nn.functional.linear, as in its code."""
    tt = t.view(1, 1)
    return torch.nn.functional.linear(x, W, b) * torch.sigmoid(torch.nn.functional.linear(tt, gw[:, None], gb)) \
        + torch.nn.functional.linear(tt, bw[:, None])


ACT_MODULES = {"tanh": torch.nn.Tanh(), "softplus": torch.nn.Softplus(), "elu": torch.nn.ELU(),
               "swish": lambda x: x * torch.sigmoid(x), "identity": lambda x: x}


def ffjord_mlp(t, z, params, act):
    h = z
    for i, p in enumerate(params):
        h = ffjord_layer(t, h, *p)
        if i < len(params) - 1:
            h = ACT_MODULES[act](h)
    return h


@pytest.mark.parametrize("act", ACTS)
def test_forward_and_vjp_vs_autograd(act):
    t, z, e, params = make()
    z.requires_grad_()
    f, vjp, tr, kin, frob = F.concatsquash_mlp_hutchinson(t, z, e, params, act)
    f_ref = ffjord_mlp(t, z, params, act)
    (vjp_ref,) = torch.autograd.grad(f_ref, z, e)
    torch.testing.assert_close(f, f_ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(vjp, vjp_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(tr, (vjp_ref * e).sum(-1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(kin, (f_ref ** 2).sum(-1))
    torch.testing.assert_close(frob, (vjp_ref ** 2).sum(-1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(F.concatsquash_mlp(t, z, params, act), f_ref, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("act", ACTS)
def test_exact_trace_vs_jacrev(act):
    t, z, e, params = make()
    f, tr = F.concatsquash_mlp_exact_trace(t, z, params, act)
    J = vmap(jacrev(lambda zz: ffjord_mlp(t, zz[None], params, act)[0]))(z)
    torch.testing.assert_close(tr, torch.diagonal(J, dim1=-2, dim2=-1).sum(-1), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(f, ffjord_mlp(t, z, params, act), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("act", ["tanh", "softplus", "elu", "swish"])
def test_gradients_through_trace_and_rnode_terms_gradcheck(act):
    # second-order terms of the MLP: finite differences of all Hutchinson outputs w.r.t. t, z and params
    t, z, e, params = make(D=2, hidden=(4,), B=3)
    flat = [p for layer in params for p in layer]

    def fn(t, z, *flat):
        ps = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        return F.concatsquash_mlp_hutchinson(t, z, e, ps, act)

    inputs = [x.clone().requires_grad_() for x in [t, z] + flat]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_exact_trace_gradcheck():
    t, z, e, params = make(D=2, hidden=(4,), B=3)
    flat = [p for layer in params for p in layer]

    def fn(t, z, *flat):
        ps = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        return F.concatsquash_mlp_exact_trace(t, z, ps, "tanh")

    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in [t, z] + flat], eps=1e-6, atol=1e-6)


def test_softplus_threshold_matches_torch():
    x = torch.tensor([-30.0, -1.0, 0.0, 19.9, 20.0, 20.1, 40.0], dtype=torch.float64, requires_grad=True)
    y = F.apply_activation("softplus", x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, torch.nn.functional.softplus(x), rtol=0, atol=0)
    torch.testing.assert_close(F.activation_grad("softplus", x, y), g, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("act", ACTS)
def test_activation_grad_matches_autograd(act):
    x = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    y = F.apply_activation(act, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(F.activation_grad(act, x, y), g, rtol=1e-14, atol=1e-14)


def test_input_errors_say_what_to_do():
    t, z, e, params = make()
    with pytest.raises(ValueError, match="unknown activation"):
        F.concatsquash_mlp(t, z, params, "relu6")
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        F.concatsquash_mlp(t, z[0], params, "tanh")
    with pytest.raises(ValueError, match="e has shape"):
        F.concatsquash_mlp_hutchinson(t, z, e[:, :2], params, "tanh")
    with pytest.raises(ValueError, match="scalar time"):
        F.concatsquash_mlp(torch.zeros(2), z, params, "tanh")
    bad = [params[0], params[1][:4]] + params[2:]
    with pytest.raises(ValueError, match="each layer is"):
        F.concatsquash_mlp(t, z, bad, "tanh")
    with pytest.raises(ValueError, match="W must be"):
        F.concatsquash_mlp(t, z[:, :2], params, "tanh")


def test_python_float_time():
    t, z, e, params = make()
    torch.testing.assert_close(F.concatsquash_mlp(0.3, z, params, "tanh"), F.concatsquash_mlp(t, z, params, "tanh"))
