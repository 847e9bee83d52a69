"""Backend "cpp" of the concatsquash MLP: autograd Functions over the fused C++ kernels.

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
from ..ops.reference_grad import reference_backward
from . import _dispatch, _ops
from ._loader import ext

__all__ = ["concatsquash_mlp", "concatsquash_mlp_hutchinson", "concatsquash_mlp_exact_trace", "supports", "bind"]

_ACT_NAMES, _ACT_CODES = ACTIVATION_NAMES, ACTIVATION_CODES  # the C++ core's codes (pinned by tests/test_codes.py)


def _flat(params):
    return [p for layer in params for p in layer]


def _layers(flat):
    return [flat[i:i + 5] for i in range(0, len(flat), 5)]



def _param_grads(ctx, gp, first):
    """Gradients for the flat parameter inputs starting at input index ``first``."""
    n = len(ctx.needs_input_grad) - first
    if not gp:
        return [None] * n
    return [g if ctx.needs_input_grad[first + i] else None for i, g in enumerate(gp)]


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, z, act, tile, *flat):
        need = any(ctx.needs_input_grad[:2]) or any(ctx.needs_input_grad[4:])
        f, save = ext().mlp_forward(float(t), z, list(flat), act, need, tile)
        if need:
            ctx.save_for_backward(t, z, *flat)
            ctx.buf = save
        ctx.act, ctx.tile = act, tile
        return f

    @staticmethod
    def backward(ctx, gf):
        t, z, *flat = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            act = _ACT_NAMES[ctx.act]
            g = reference_backward(lambda t, z, *fl: _ref.concatsquash_mlp(t, z, _layers(fl), act), [t, z, *flat],
                                   (gf,), [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                           *ctx.needs_input_grad[4:]])
            return (g[0], g[1], None, None, *g[2:])
        nt, nz = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        npar = any(ctx.needs_input_grad[4:])
        gz, _, gp, gt = ext().mlp_backward(float(t), z, None, False, flat, ctx.act, ctx.buf, None, None, gf, None,
                                           None, None, None, nz, False, npar, nt, ctx.tile)
        return (gt, gz, None, None, *_param_grads(ctx, gp, 4))


class _Hutchinson(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, z, e, act, tile, *flat):
        need = any(ctx.needs_input_grad[:3]) or any(ctx.needs_input_grad[5:])
        f, vjp, trace, kinetic, jac_frob, save = ext().mlp_probe_forward(float(t), z, e, list(flat), act, True, need,
                                                                         tile)
        vjp = vjp.view_as(z)
        if need:
            ctx.save_for_backward(t, z, e, f, vjp, *flat)
            ctx.buf = save
        ctx.act, ctx.tile = act, tile
        ctx.set_materialize_grads(False)
        return f, vjp, trace, kinetic, jac_frob

    @staticmethod
    def backward(ctx, gf, gvjp, gtrace, gkin, gfrob):
        t, z, e, f, vjp, *flat = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            act = _ACT_NAMES[ctx.act]
            n = ctx.needs_input_grad
            g = reference_backward(
                lambda t, z, e, *fl: _ref.concatsquash_mlp_hutchinson(t, z, e, _layers(fl), act), [t, z, e, *flat],
                (gf, gvjp, gtrace, gkin, gfrob), [n[0], n[1], n[2], *n[5:]])
            return (g[0], g[1], g[2], None, None, *g[3:])
        nt, nz, ne = ctx.needs_input_grad[:3]
        npar = any(ctx.needs_input_grad[5:])
        if all(g is None for g in (gf, gvjp, gtrace, gkin, gfrob)):
            return (None,) * len(ctx.needs_input_grad)
        gz, ge, gp, gt = ext().mlp_backward(float(t), z, e, True, flat, ctx.act, ctx.buf, f, vjp, gf, gvjp, gtrace,
                                            gkin, gfrob, nz, ne, npar, nt, ctx.tile)
        return (gt, gz, ge, None, None, *_param_grads(ctx, gp, 5))


class _ExactTrace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, z, act, tile, *flat):
        need = any(ctx.needs_input_grad[:2]) or any(ctx.needs_input_grad[4:])
        f, _, trace, _, _, save = ext().mlp_probe_forward(float(t), z, None, list(flat), act, False, need, tile)
        if need:
            ctx.save_for_backward(t, z, *flat)
            ctx.buf = save
        ctx.act, ctx.tile = act, tile
        ctx.set_materialize_grads(False)
        return f, trace

    @staticmethod
    def backward(ctx, gf, gtrace):
        t, z, *flat = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            act = _ACT_NAMES[ctx.act]
            n = ctx.needs_input_grad
            g = reference_backward(
                lambda t, z, *fl: _ref.concatsquash_mlp_exact_trace(t, z, _layers(fl), act), [t, z, *flat],
                (gf, gtrace), [n[0], n[1], *n[4:]])
            return (g[0], g[1], None, None, *g[2:])
        nt, nz = ctx.needs_input_grad[:2]
        npar = any(ctx.needs_input_grad[4:])
        if gf is None and gtrace is None:
            return (None,) * len(ctx.needs_input_grad)
        gz, _, gp, gt = ext().mlp_backward(float(t), z, None, True, flat, ctx.act, ctx.buf, None, None, gf, None,
                                           gtrace, None, None, nz, False, npar, nt, ctx.tile)
        return (gt, gz, None, None, *_param_grads(ctx, gp, 4))


def supports(t, z, params, activation) -> str | None:
    """None when the C++ kernels can run this call, else why not (used by the backend registry)."""
    if activation not in _ACT_CODES:
        return f"unknown activation {activation!r}"
    return _dispatch.cpp_unsupported(z, *(_flat(params) if params is not None else ()))


def _use_cpp(t, z, params, activation, e=None) -> bool:
    return activation in _ACT_CODES and _dispatch.prefer_cpp(t, z, e, *_flat(params)) == "cpp"


# Under torch.compile the calls go through the custom ops of fastode.cpp._ops (one graph node each); eager calls
# keep the autograd Functions above (less overhead per call).
def _compiled_forward(t, z, flat, act):
    return _ops.cpp_mlp(t, z, flat, act, _ops.tile_for(z, flat), _wants_grad(t, z, None, flat))[0]


def _compiled_hutchinson(t, z, e, flat, act):
    return _ops.cpp_mlp_probe(t, z, e, flat, act, _ops.tile_for(z, flat), _wants_grad(t, z, e, flat))[:5]


def _compiled_exact_trace(t, z, flat, act):
    f, _, trace, _, _, _ = _ops.cpp_mlp_probe(t, z, None, flat, act, _ops.tile_for(z, flat),
                                              _wants_grad(t, z, None, flat))
    return f, trace


def _wants_grad(t, z, e, flat) -> bool:
    return torch.is_grad_enabled() and (z.requires_grad or (e is not None and e.requires_grad)
                                        or (isinstance(t, torch.Tensor) and t.requires_grad)
                                        or any(p.requires_grad for p in flat))


def concatsquash_mlp(t, z: torch.Tensor, params, activation: str) -> torch.Tensor:
    """``f(t, z)`` (see :func:`fastode.nn.functional.concatsquash_mlp`)."""
    t = _ref.check_inputs(t, z, params, activation)
    if not _use_cpp(t, z, params, activation):
        return _ref.concatsquash_mlp(t, z, params, activation)
    if torch.compiler.is_compiling():
        return _compiled_forward(t, z, _flat(params), _ACT_CODES[activation])
    tile = _dispatch.mlp_tile_rows(z.shape[0], params)
    return _MLP.apply(t, z, _ACT_CODES[activation], tile, *_flat(params))


def concatsquash_mlp_hutchinson(t, z: torch.Tensor, e: torch.Tensor, params, activation: str):
    """``(f, vjp, trace, kinetic, jac_frob)`` (see :func:`fastode.nn.functional.concatsquash_mlp_hutchinson`)."""
    t = _ref.check_inputs(t, z, params, activation, e)
    if not _use_cpp(t, z, params, activation, e):
        return _ref.concatsquash_mlp_hutchinson(t, z, e, params, activation)
    if torch.compiler.is_compiling():
        return _compiled_hutchinson(t, z, e, _flat(params), _ACT_CODES[activation])
    tile = _dispatch.mlp_tile_rows(z.shape[0], params)
    return _Hutchinson.apply(t, z, e, _ACT_CODES[activation], tile, *_flat(params))


def concatsquash_mlp_exact_trace(t, z: torch.Tensor, params, activation: str):
    """``(f, trace)`` with the exact divergence, from D basis-vector VJPs sharing one forward pass."""
    t = _ref.check_inputs(t, z, params, activation)
    if not _use_cpp(t, z, params, activation):
        return _ref.concatsquash_mlp_exact_trace(t, z, params, activation)
    if torch.compiler.is_compiling():
        return _compiled_exact_trace(t, z, _flat(params), _ACT_CODES[activation])
    tile = _dispatch.mlp_tile_rows(z.shape[0], params)
    return _ExactTrace.apply(t, z, _ACT_CODES[activation], tile, *_flat(params))


def bind(params, activation: str, like: torch.Tensor) -> BoundMLP:
    """``mlp.bind`` of the C++ backend (the registry checked ``supports`` and the inputs once, for ``like``).

    Per call it only converts ``t``; a call that needs no gradient (grad mode off, or nothing requiring grad) runs
    the kernels directly, one that does goes through the autograd Functions above."""
    flat = _flat(params)
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
        if torch.compiler.is_compiling():
            return _compiled_forward(_ref._as_time(t, z), z, flat, act)
        if grad_wanted(t, z):
            return _MLP.apply(_ref._as_time(t, z), z, act, tile_for(z), *flat)
        return x.mlp_forward(float(t), z, flat, act, False, tile_for(z))[0]

    def hutchinson(t, z, e):
        if torch.compiler.is_compiling():
            return _compiled_hutchinson(_ref._as_time(t, z), z, e, flat, act)
        if grad_wanted(t, z, e):
            return _Hutchinson.apply(_ref._as_time(t, z), z, e, act, tile_for(z), *flat)
        f, vjp, trace, kinetic, jac_frob, _ = x.mlp_probe_forward(float(t), z, e, flat, act, True, False, tile_for(z))
        return f, vjp.view_as(z), trace, kinetic, jac_frob

    def exact_trace(t, z):
        if torch.compiler.is_compiling():
            return _compiled_exact_trace(_ref._as_time(t, z), z, flat, act)
        if grad_wanted(t, z):
            return _ExactTrace.apply(_ref._as_time(t, z), z, act, tile_for(z), *flat)
        f, _, trace, _, _, _ = x.mlp_probe_forward(float(t), z, None, flat, act, False, False, tile_for(z))
        return f, trace

    return BoundMLP("cpp", forward, hutchinson, exact_trace)
