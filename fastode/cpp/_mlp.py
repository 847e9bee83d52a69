"""Backend "cpp" of the concatsquash MLP: the fused C++ kernels as fused ops (:mod:`fastode.cpp._ops`: an autograd
Function eagerly, a custom op under torch.compile, declared once).

Same signatures, outputs and input checks as :mod:`fastode.nn.functional` (the executable spec). Each
function is one C++ call forward and one backward; the backward pass covers the gradients through the
trace / kinetic / Jacobian-Frobenius outputs (second-order terms of the MLP) for the parameters, z, e
and t. When a graph of the backward is requested (``create_graph=True``, e.g. FFJORD's
``autograd.grad(f, z, e, create_graph=True)``), the backward differentiates the PyTorch reference instead,
so higher derivatives are available (at reference speed), as in the "triton" backend. ``torch.func``
transforms (jvp/vmap) are not supported; use backend "torch" for those (e.g. TayNODE's nested jvp).

:func:`bind` (op ``mlp.bind``) fixes the flattened parameters, activation code and tile for a solve and calls the
extension directly, without an autograd Function, when no gradient is wanted (e.g. log-likelihood evaluation).

When called directly for tensors the C++ kernels cannot take (not CPU, other dtypes, or the extension
is not built) they run the PyTorch reference instead; :func:`fastode.cpp.resolve_backend` says which runs.
"""
from __future__ import annotations

import torch

from ..codes import ACTIVATION_CODES, ACTIVATION_NAMES
from ..ops import concatsquash as _ref
from ..ops.mlp import BoundMLP
from . import _dispatch, _ops
from ._loader import ext

__all__ = ["concatsquash_mlp", "concatsquash_mlp_hutchinson", "concatsquash_mlp_exact_trace", "supports", "bind"]

_ACT_NAMES, _ACT_CODES = ACTIVATION_NAMES, ACTIVATION_CODES  # the C++ core's codes (pinned by tests/test_codes.py)




def supports(t, z, params, activation) -> str | None:
    """None when the C++ kernels can run this call, else why not (used by the backend registry)."""
    if activation not in _ACT_CODES:
        return f"unknown activation {activation!r}"
    return _dispatch.cpp_unsupported(z, *(_ref.flat_params(params) if params is not None else ()))


def _use_cpp(t, z, params, activation, e=None) -> bool:
    return activation in _ACT_CODES and _dispatch.prefer_cpp(t, z, e, *_ref.flat_params(params)) == "cpp"


# Each call is one fused op of fastode.cpp._ops: its autograd Function eagerly, its custom op under torch.compile.
def _forward(t, z, flat, act):
    return _ops.CPP_MLP(t, z, flat, act, _ops.tile_for(z, flat), _wants_grad(t, z, None, flat))[0]


def _hutchinson(t, z, e, flat, act):
    return _ops.CPP_MLP_PROBE(t, z, e, flat, act, _ops.tile_for(z, flat), _wants_grad(t, z, e, flat))[:5]


def _exact_trace(t, z, flat, act):
    out = _ops.CPP_MLP_PROBE(t, z, None, flat, act, _ops.tile_for(z, flat), _wants_grad(t, z, None, flat))
    return out[0], out[2]


def _wants_grad(t, z, e, flat) -> bool:
    return torch.is_grad_enabled() and (z.requires_grad or (e is not None and e.requires_grad)
                                        or (isinstance(t, torch.Tensor) and t.requires_grad)
                                        or any(p.requires_grad for p in flat))


def concatsquash_mlp(t, z: torch.Tensor, params, activation: str) -> torch.Tensor:
    """``f(t, z)`` (see :func:`fastode.nn.functional.concatsquash_mlp`)."""
    t = _ref.check_inputs(t, z, params, activation)
    if not _use_cpp(t, z, params, activation):
        return _ref.concatsquash_mlp(t, z, params, activation)
    return _forward(t, z, _ref.flat_params(params), _ACT_CODES[activation])


def concatsquash_mlp_hutchinson(t, z: torch.Tensor, e: torch.Tensor, params, activation: str):
    """``(f, vjp, trace, kinetic, jac_frob)`` (see :func:`fastode.nn.functional.concatsquash_mlp_hutchinson`)."""
    t = _ref.check_inputs(t, z, params, activation, e)
    if not _use_cpp(t, z, params, activation, e):
        return _ref.concatsquash_mlp_hutchinson(t, z, e, params, activation)
    return _hutchinson(t, z, e, _ref.flat_params(params), _ACT_CODES[activation])


def concatsquash_mlp_exact_trace(t, z: torch.Tensor, params, activation: str):
    """``(f, trace)`` with the exact divergence, from D basis-vector VJPs sharing one forward pass."""
    t = _ref.check_inputs(t, z, params, activation)
    if not _use_cpp(t, z, params, activation):
        return _ref.concatsquash_mlp_exact_trace(t, z, params, activation)
    return _exact_trace(t, z, _ref.flat_params(params), _ACT_CODES[activation])


def bind(params, activation: str, like: torch.Tensor) -> BoundMLP:
    """``mlp.bind`` of the C++ backend (the registry checked ``supports`` and the inputs once, for ``like``).

    Per call it only converts ``t``; a call that needs no gradient (grad mode off, or nothing requiring grad) runs
    the kernels directly, one that does goes through the fused ops above."""
    flat = _ref.flat_params(params)
    act = _ACT_CODES[activation]
    x = ext()
    params_grad = any(p.requires_grad for p in flat)
    tiles = {like.shape[0]: _dispatch.mlp_tile_rows(like.shape[0], params)}

    def tile_for(z):
        n = z.shape[0]
        tile = tiles.get(n)
        if tile is None:
            tile = tiles[n] = _dispatch.mlp_tile_rows(n, params)
        return tile

    def grad_wanted(t, z, e=None):
        return torch.is_grad_enabled() and (params_grad or z.requires_grad or (e is not None and e.requires_grad)
                                            or (isinstance(t, torch.Tensor) and t.requires_grad))

    def forward(t, z):
        if torch.compiler.is_compiling() or grad_wanted(t, z):
            return _forward(_ref._as_time(t, z), z, flat, act)
        return x.mlp_forward(float(t), z, flat, act, False, tile_for(z))[0]

    def hutchinson(t, z, e):
        if torch.compiler.is_compiling() or grad_wanted(t, z, e):
            return _hutchinson(_ref._as_time(t, z), z, e, flat, act)
        f, vjp, trace, kinetic, jac_frob, _ = x.mlp_probe_forward(float(t), z, e, flat, act, True, False, tile_for(z))
        return f, vjp.view_as(z), trace, kinetic, jac_frob

    def exact_trace(t, z):
        if torch.compiler.is_compiling() or grad_wanted(t, z):
            return _exact_trace(_ref._as_time(t, z), z, flat, act)
        f, _, trace, _, _, _ = x.mlp_probe_forward(float(t), z, None, flat, act, False, False, tile_for(z))
        return f, trace

    return BoundMLP("cpp", forward, hutchinson, exact_trace)
