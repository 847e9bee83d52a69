"""A re-statement, written for fastode's tests, of the pieces of FFJORD's code (rtqichen/ffjord
``lib/layers/diffeq_layers/basic.py``, ``lib/layers/odefunc.py``) the tests compare with: its concatsquash and squash
layers, its nonlinearities (a learnable-beta swish), its ``ODEnet`` (parameter names ``layers`` /
``activation_fns``, as FFJORD's checkpoints hold them) and its two divergence functions. Shared by
tests/test_nn_modules.py (the network against fastode's) and tests/test_ffjord_checkpoints.py (checkpoints the
scripts would write); FFJORD is not a dependency."""
import torch
from torch import nn


class ConcatSquashLinear(nn.Module):
    """``(W x + b) * sigmoid(w_g t + b_g) + w_b t`` (FFJORD's default layer type)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(t.view(1, 1))


class SquashLinear(nn.Module):
    """``(W x + b) * sigmoid(w t + b_h)``: another of FFJORD's layer types (fastode does not load it)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper(t.view(1, 1)))


class Swish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


NONLINEARITIES = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "swish": Swish, "identity": nn.Identity,
                  "relu": nn.ReLU}
LAYER_TYPES = {"concatsquash": ConcatSquashLinear, "squash": SquashLinear}


class ODEnet(nn.Module):
    """``dim -> hidden... -> dim`` of ``layer_type`` layers with ``act`` after every layer but the last."""

    def __init__(self, dim, hidden, act, layer_type="concatsquash"):
        super().__init__()
        dims = (dim,) + tuple(hidden) + (dim,)
        self.layers = nn.ModuleList(LAYER_TYPES[layer_type](a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation_fns = nn.ModuleList(NONLINEARITIES[act]() for _ in range(len(dims) - 2))

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


def divergence_approx(f, y, e):
    """Hutchinson's estimate ``e^T (df/dy) e`` and the VJP ``e^T df/dy``."""
    e_dzdx = torch.autograd.grad(f, y, e, create_graph=True)[0]
    return (e_dzdx * e).view(y.shape[0], -1).sum(dim=1), e_dzdx


def divergence_bf(dx, y):
    """The exact divergence, one backward pass per dimension."""
    s = 0.0
    for i in range(y.shape[1]):
        s = s + torch.autograd.grad(dx[:, i].sum(), y, create_graph=True)[0][:, i]
    return s
