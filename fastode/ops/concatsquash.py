"""PyTorch reference math of the concatsquash MLP: the executable spec every backend must match.

Layer ``l`` (FFJORD ``ConcatSquashLinear``)::

    a_l = h_l @ W_l^T + b_l
    u_l = a_l * sigmoid(gw_l * t + gb_l) + bw_l * t
    h_{l+1} = act(u_l)            (every layer but the last)
    f = u_{L-1}                   (the last layer has no activation)

Parameters of one layer, in this order: ``W (out, in), b (out,), gw (out,), gb (out,), bw (out,)``.

Everything here is written with plain differentiable torch ops and a *closed-form* vector-Jacobian
product (no ``torch.autograd.grad`` inside), so that

* the functions are differentiable to any order by ordinary autograd (gradients through the trace and
  the RNODE terms ``kinetic`` / ``jac_frob`` need the second-order terms of the MLP);
* the same formulas are what the Triton and C++ backends implement, term by term.

Shapes: ``t`` a 0-dim tensor (a python number or a 1-element tensor is accepted), ``z (B, D)``,
``e (B, D)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..codes import ACTIVATION_NAMES

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "activation_grad",
    "check_inputs",
    "concatsquash_mlp",
    "concatsquash_mlp_hutchinson",
    "concatsquash_mlp_exact_trace",
    "flat_params",
    "layer_params",
]

ACTIVATIONS = ACTIVATION_NAMES  # (fastode.codes: the kernels' and the C++ core's codes follow this order)
"""Activations every backend supports. ``swish = x * sigmoid(x)`` (beta fixed at 1); ``elu`` has alpha 1;
``softplus`` is torch's (beta 1)."""

Params = Sequence[Sequence[torch.Tensor]]


def flat_params(params: Params) -> list:
    """The per-layer ``(W, b, gw, gb, bw)`` tuples as one list, in the kernels' order."""
    return [p for layer in params for p in layer]


def layer_params(flat: Sequence[torch.Tensor]) -> list:
    """:func:`flat_params` undone: the flat list regrouped into per-layer ``[W, b, gw, gb, bw]``."""
    return [list(flat[i:i + 5]) for i in range(0, len(flat), 5)]


def apply_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the activation ``name`` (one of :data:`ACTIVATIONS`)."""
    if name == "tanh":
        return torch.tanh(x)
    if name == "softplus":
        return F.softplus(x)
    if name == "elu":
        return F.elu(x)
    if name == "swish":
        return x * torch.sigmoid(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def activation_grad(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Derivative of the activation at pre-activation ``x`` (``y = activation(name, x)``), differentiable."""
    if name == "tanh":
        return 1.0 - y * y
    if name == "softplus":
        # torch's softplus is linear above its threshold (20): derivative exactly 1 there
        return torch.where(x > 20.0, torch.ones_like(x), torch.sigmoid(x))
    if name == "elu":
        return torch.where(x > 0, torch.ones_like(x), y + 1.0)  # exp(x) = elu(x) + 1 for x <= 0
    if name == "swish":
        s = torch.sigmoid(x)
        return s + x * s * (1.0 - s)
    if name == "identity":
        return torch.ones_like(x)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def _as_time(t, z: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        return torch.tensor(float(t), dtype=z.dtype, device=z.device)
    if t.numel() != 1:
        raise ValueError(
            f"the concatsquash MLP takes a scalar time t, got a tensor of shape {tuple(t.shape)}; "
            "pass one time for the whole batch"
        )
    return t.reshape(()).to(dtype=z.dtype, device=z.device)


def check_inputs(t, z: torch.Tensor, params: Params, activation_name: str, e: torch.Tensor | None = None):
    """Validate the common arguments of the concatsquash functions; returns ``t`` as a 0-dim tensor.

    Shared by every backend so that they reject the same inputs with the same messages.
    """
    if activation_name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation_name!r}; choose one of {ACTIVATIONS}")
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a (batch, dim) tensor, got {shape}; flatten leading dimensions first")
    if len(params) == 0:
        raise ValueError("params is empty: the MLP needs at least one layer (W, b, gw, gb, bw)")
    width = z.shape[1]
    for i, layer in enumerate(params):
        if len(layer) != 5:
            raise ValueError(f"layer {i} has {len(layer)} tensors; each layer is (W, b, gw, gb, bw)")
        W, b, gw, gb, bw = layer
        if W.dim() != 2 or W.shape[1] != width:
            raise ValueError(
                f"layer {i}: W has shape {tuple(W.shape)} but its input width is {width}; W must be (out, {width})"
            )
        out = W.shape[0]
        for nm, v in (("b", b), ("gw", gw), ("gb", gb), ("bw", bw)):
            if v.shape != (out,):
                raise ValueError(f"layer {i}: {nm} has shape {tuple(v.shape)}, expected ({out},)")
        width = out
    if width != z.shape[1]:
        raise ValueError(f"the last layer outputs {width} features but z has {z.shape[1]}; f must have z's shape")
    if e is not None and e.shape != z.shape:
        raise ValueError(f"e has shape {tuple(e.shape)} but z has {tuple(z.shape)}; they must match")
    return _as_time(t, z)


def _forward(t: torch.Tensor, z: torch.Tensor, params: Params, act: str):
    """Forward pass; returns f and, per layer, (pre-activation u_l, output h_{l+1}, gate s_l)."""
    h = z
    cache = []
    n = len(params)
    for i, (W, b, gw, gb, bw) in enumerate(params):
        s = torch.sigmoid(gw * t + gb)
        u = (h @ W.t() + b) * s + bw * t
        h = apply_activation(act, u) if i < n - 1 else u
        cache.append((u, h, s))
    return h, cache


def concatsquash_mlp(t, z: torch.Tensor, params: Params, activation: str) -> torch.Tensor:
    """``f(t, z)`` of the concatsquash MLP; ``z (B, D)`` -> ``f (B, D)``."""
    t = check_inputs(t, z, params, activation)
    return _forward(t, z, params, activation)[0]


def concatsquash_mlp_hutchinson(t, z: torch.Tensor, e: torch.Tensor, params: Params, activation: str):
    """Dynamics plus the Hutchinson quantities for the noise ``e`` (supplied by the caller).

    Returns ``(f, vjp, trace, kinetic, jac_frob)``: ``vjp = e^T df/dz (B, D)``, ``trace = sum(vjp * e, -1)``,
    ``kinetic = sum(f * f, -1)``, ``jac_frob = sum(vjp * vjp, -1)`` (all ``(B,)``).
    """
    t = check_inputs(t, z, params, activation, e)
    f, cache = _forward(t, z, params, activation)
    n = len(params)
    g = e  # gradient w.r.t. u_{n-1} = f
    for i in range(n - 1, -1, -1):
        u, h, s = cache[i]
        if i < n - 1:
            g = g * activation_grad(activation, u, h)
        g = (g * s) @ params[i][0]
    vjp = g
    trace = (vjp * e).sum(-1)
    kinetic = (f * f).sum(-1)
    jac_frob = (vjp * vjp).sum(-1)
    return f, vjp, trace, kinetic, jac_frob


def concatsquash_mlp_exact_trace(t, z: torch.Tensor, params: Params, activation: str):
    """Dynamics and the exact divergence ``tr(df/dz)`` (cost ~D times a forward pass; for small D).

    The Jacobian is propagated forward through the layers: ``J_{l+1} = act'(u_l) * s_l * (J_l W_l^T)``
    with ``J_0 = I``; ``J_l`` is ``(B, D, width_l)`` (row i = derivative along input direction i).
    Returns ``(f, trace)`` with ``trace (B,)``.
    """
    t = check_inputs(t, z, params, activation)
    B, D = z.shape
    n = len(params)
    h = z
    J = torch.eye(D, dtype=z.dtype, device=z.device).expand(B, D, D)
    for i, (W, b, gw, gb, bw) in enumerate(params):
        s = torch.sigmoid(gw * t + gb)
        u = (h @ W.t() + b) * s + bw * t
        J = (J @ W.t()) * s
        if i < n - 1:
            h = apply_activation(activation, u)
            J = J * activation_grad(activation, u, h).unsqueeze(1)
        else:
            h = u
    trace = torch.diagonal(J, dim1=-2, dim2=-1).sum(-1)
    return h, trace

