"""The "triton" backend of the concatsquash MLP: the fused kernels as one fused op (:data:`TRITON_MLP`, declared
once: an autograd Function eagerly, the custom op ``fastode::triton_mlp`` under torch.compile).

Kernel -> launcher -> Function: the kernels and launchers live in ``fastode.kernels.concatsquash``; this
module decides what to save (only the inputs ``t, z, e`` and the parameters: the backward kernel recomputes
the forward in registers/scratch) and turns the kernel's packed gradients into per-parameter gradients.

Importing this module registers the backend on the ops registry (:mod:`fastode.ops.mlp` imports it lazily); it
fails to import when Triton is missing, which makes the backend unavailable and ``"auto"`` fall back.

Gradients: the backward kernel contains the second-order terms of the MLP, so gradients through the trace
and the RNODE terms take one backward launch. When a graph of the backward itself is requested
(``create_graph=True``, e.g. FFJORD-style ``autograd.grad(f, z, e, create_graph=True)`` on
:func:`concatsquash_mlp`), the backward is instead computed by differentiating the PyTorch reference, so
higher derivatives are always available (at reference speed). Parameter packing is cached per parameter
version; parameters must be changed in place through autograd-visible ops (optimizers do), not through
``.data``.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch

from fastode.kernels import concatsquash as _K
from fastode.kernels._common import interpreter_active

from ..ops import concatsquash as _F
from ..ops.mlp import register_backend
from ..ops.fused_op import FusedOp, masked_grads

__all__ = [
    "concatsquash_mlp",
    "concatsquash_mlp_hutchinson",
    "concatsquash_mlp_exact_trace",
    "supports",
    "configure",
    "clear_cache",
]

MAX_WIDTH = 1024

CONFIG = {"BM": None, "CH": None, "max_programs": None, "num_warps": 4}


def configure(**kw) -> None:
    """Override launch parameters (``BM``, ``CH``, ``max_programs``, ``num_warps``); None = default."""
    for k, v in kw.items():
        if k not in CONFIG:
            raise ValueError(f"unknown triton backend option {k!r}; options are {sorted(CONFIG)}")
        CONFIG[k] = v


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 8


def clear_cache() -> None:
    _CACHE.clear()


def launch_config(D: int, widths, dtype):
    cfg = _K.default_config(D, widths, dtype)
    if CONFIG["BM"] is not None:
        cfg["BM"] = CONFIG["BM"]
    if CONFIG["CH"] is not None:
        cfg["CH"] = CONFIG["CH"]
        cfg["CD"] = min(cfg["CD"], CONFIG["CH"])
    return cfg


def packed_params(params, CH: int, CD: int) -> _K.PackedParams:
    # The cache entry keeps the tensors alive, so an equal data_ptr means the same storage; the version
    # counter (shared by views) changes whenever the storage is modified in place.
    key = tuple((p.data_ptr(), p._version, tuple(p.shape), tuple(p.stride())) for layer in params for p in layer)
    key = key + (CH, CD, params[0][0].dtype, params[0][0].device)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[0]
    packed = _K.PackedParams(params, CH, CD)
    _CACHE[key] = (packed, [p for layer in params for p in layer])
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return packed


def supports(t, z, params, activation) -> str | None:
    """None if the Triton kernels can run this call, else the reason."""
    if z.dtype not in (torch.float32, torch.float64):
        return f"dtype {z.dtype} (the kernels support float32 and float64)"
    if z.device.type != "cuda" and not (z.device.type == "cpu" and interpreter_active()):
        return (f"Triton kernels need CUDA tensors (got {z.device}); set TRITON_INTERPRET=1 before importing "
                f"Triton to run them on the CPU")
    for layer in params:
        for p in layer:
            if p.dtype != z.dtype or p.device != z.device:
                return f"parameters ({p.dtype}, {p.device}) differ from z ({z.dtype}, {z.device})"
    widest = max(max(layer[0].shape) for layer in params)
    if widest > MAX_WIDTH:
        return f"width {widest} > {MAX_WIDTH}"
    return None


def _unpack_grads(packed: _K.PackedParams, params, t, dW, dV, needs, need_t):
    """Per-parameter gradients from the kernel's dW (L, P, P) and dV = [db, dLoss/ds, dLoss/dc] (L, 3, P)."""
    V = packed.V
    s = torch.sigmoid(V[:, 1] * t + V[:, 2])
    dpre = dV[:, 1] * s * (1 - s)  # dLoss/d(gw t + gb)
    out = []
    for l, (W, *_rest) in enumerate(params):
        o, i = W.shape
        grads = (dW[l, :o, :i], dV[l, 0, :o], dpre[l, :o] * t, dpre[l, :o], dV[l, 2, :o] * t)
        out.extend(g if n else None for g, n in zip(grads, needs[5 * l: 5 * l + 5]))
    gt = None
    if need_t:
        gt = ((dpre * V[:, 1]).sum() + (dV[:, 2] * V[:, 3]).sum()).reshape(t.shape)
    return out, gt



def _setup(z, layers):
    """The launch configuration and the packed parameters of a call."""
    cfg = launch_config(z.shape[1], [p[0].shape[0] for p in layers], z.dtype)
    return cfg, packed_params(layers, cfg["CH"], cfg["CD"])


def _launch_forward(mode, activation, t, z, e, layers):
    """The forward kernel on contiguous ``z`` / ``e``: ``((f, vjp, trace, kinetic, jac_frob), cfg, packed)``."""
    cfg, packed = _setup(z, layers)
    outs = _K.concatsquash_fwd(t, z, e, packed, activation, mode, BM=cfg["BM"], max_progs=CONFIG["max_programs"],
                               num_warps=CONFIG["num_warps"])
    return outs, cfg, packed


def _launch_backward(mode, activation, t, z, e, cfg, packed, gf, gv, gtr, gkin, gfrob, need_ge):
    """The backward kernel: ``(gz, ge, dW, dV)`` (packed gradients; see :func:`_unpack_grads`)."""
    c = lambda g: g.contiguous() if g is not None else None  # noqa: E731
    return _K.concatsquash_bwd(t, z, e, packed, activation, mode, gf=c(gf), gv=c(gv), gtr=c(gtr), gkin=c(gkin),
                               gfrob=c(gfrob), need_ge=need_ge, BM=cfg["BM"], max_progs=CONFIG["max_programs"],
                               num_warps=CONFIG["num_warps"])



# ---------------------------------------------------------------------------------------------- the fused op
# One declaration (fastode.ops.fused_op): the eager Function and the custom op (what torch.compile sees, one node
# per call) run the same launches. Outputs a mode does not produce are empty.


def _mlp_forward(t: torch.Tensor, z: torch.Tensor, e: Optional[torch.Tensor], params: List[torch.Tensor], mode: int,
                 activation: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (f, vjp, tr, kin, fr), _, _ = _launch_forward(mode, activation, t, z.contiguous(),
                                                  e.contiguous() if e is not None else None, _F.layer_params(list(params)))
    hutch = mode == _K.MODE_HUTCH
    empty = lambda: z.new_empty(0)  # noqa: E731  (one per output: outputs may not alias each other)
    return (f, vjp if hutch else empty(), tr if mode != _K.MODE_F else empty(), kin if hutch else empty(),
            fr if hutch else empty())


def _mlp_fake(t, z, e, params, mode, activation):
    B = z.shape[0]
    hutch = mode == _K.MODE_HUTCH
    empty = lambda: z.new_empty(0)  # noqa: E731
    return (z.new_empty(z.shape), z.new_empty(z.shape) if hutch else empty(),
            z.new_empty(B) if mode != _K.MODE_F else empty(), z.new_empty(B) if hutch else empty(),
            z.new_empty(B) if hutch else empty())


def _mlp_backward(t: torch.Tensor, z: torch.Tensor, e: Optional[torch.Tensor], params: List[torch.Tensor], mode: int,
                  activation: str, gf: Optional[torch.Tensor], gv: Optional[torch.Tensor], gtr: Optional[torch.Tensor],
                  gkin: Optional[torch.Tensor], gfrob: Optional[torch.Tensor], need_ge: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], torch.Tensor]:
    layers = _F.layer_params(list(params))
    cfg, packed = _setup(z, layers)
    gz, ge, dW, dV = _launch_backward(mode, activation, t, z.contiguous(), e.contiguous() if e is not None else None,
                                      cfg, packed, gf, gv, gtr, gkin, gfrob, need_ge)
    pgrads, gt = _unpack_grads(packed, layers, t, dW, dV, [True] * len(params), True)
    # the per-parameter gradients are views of the packed dW / dV: clones, as outputs may not alias each other
    return gz, ge if need_ge and ge is not None else z.new_empty(0), [g.clone() for g in pgrads], gt.clone()


def _mlp_backward_fake(t, z, e, params, mode, activation, gf, gv, gtr, gkin, gfrob, need_ge):
    return (z.new_empty(z.shape), e.new_empty(e.shape) if need_ge and e is not None else z.new_empty(0),
            [p.new_empty(p.shape) for p in params], t.new_empty(t.shape))


def _mlp_grads(args, extra, attrs, gouts, needs, backward):
    t, z, e, params, mode, activation = args
    keep = lambda g: g if g is not None and g.numel() else None  # noqa: E731  (empty outputs of this mode)
    need_ge = mode == _K.MODE_HUTCH and bool(needs[2])
    gz, ge, gp, gt = backward(t, z, e, params, mode, activation, *(keep(g) for g in gouts), need_ge)
    return (gt if needs[0] else None, gz if needs[1] else None, ge if need_ge else None, masked_grads(gp, needs[3]),
            None, None)


def _mlp_reference(t, z, e, params, mode, activation):
    layers = _F.layer_params(list(params))
    if mode == _K.MODE_F:
        return (_F.concatsquash_mlp(t, z, layers, activation),)
    if mode == _K.MODE_HUTCH:
        return _F.concatsquash_mlp_hutchinson(t, z, e, layers, activation)
    return _F.concatsquash_mlp_exact_trace(t, z, layers, activation)


_OUTPUTS = {_K.MODE_F: (0,), _K.MODE_HUTCH: (0, 1, 2, 3, 4), _K.MODE_EXACT: (0, 2)}

TRITON_MLP = FusedOp("triton_mlp", forward=_mlp_forward, fake=_mlp_fake, backward=_mlp_backward,
                     backward_fake=_mlp_backward_fake, setup=lambda args, out: ([], None), grads=_mlp_grads,
                     reference=_mlp_reference, differentiable_outputs=lambda args: _OUTPUTS[args[4]])
triton_mlp_op = TRITON_MLP.op  # the custom op itself (opcheck, graphs)


def _call(mode, activation, t, z, e, params):
    f, vjp, tr, kin, fr = TRITON_MLP(t, z, e, _F.flat_params(params), mode, activation)
    if mode == _K.MODE_F:
        return f
    if mode == _K.MODE_HUTCH:
        return f, vjp, tr, kin, fr
    return f, tr


def _fallback(z) -> bool:
    return z.shape[0] == 0


def concatsquash_mlp(t, z, params, activation):
    t = _F.check_inputs(t, z, params, activation)
    if _fallback(z):
        return _F.concatsquash_mlp(t, z, params, activation)
    return _call(_K.MODE_F, activation, t, z, None, params)


def concatsquash_mlp_hutchinson(t, z, e, params, activation):
    t = _F.check_inputs(t, z, params, activation, e)
    if _fallback(z):
        return _F.concatsquash_mlp_hutchinson(t, z, e, params, activation)
    return _call(_K.MODE_HUTCH, activation, t, z, e, params)


def concatsquash_mlp_exact_trace(t, z, params, activation):
    t = _F.check_inputs(t, z, params, activation)
    if _fallback(z):
        return _F.concatsquash_mlp_exact_trace(t, z, params, activation)
    return _call(_K.MODE_EXACT, activation, t, z, None, params)


def _devices():
    return ("cuda", "cpu") if interpreter_active() else ("cuda",)


register_backend("triton", sys.modules[__name__], devices=_devices,
                 hint="set TRITON_INTERPRET=1 before importing Triton to run the kernels on the CPU")
