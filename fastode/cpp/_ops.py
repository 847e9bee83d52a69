"""The C++ concatsquash-MLP kernels as ``torch.library`` custom ops, so that ``torch.compile`` and ``torch.export``
see each call as one graph node (dynamo cannot trace into a pybind11 call: it would break the graph).

Ops (namespace ``fastode``), each with a fake (shape) implementation and, for the forwards, an autograd formula
that calls the backward op:

* ``cpp_mlp(t, z, params, act, tile, need_save) -> (f, save)``
* ``cpp_mlp_probe(t, z, e, params, act, tile, need_save) -> (f, vjp, trace, kinetic, jac_frob, save)``: with a
  Hutchinson probe ``e`` (B, D), or the exact trace (``e`` None; ``vjp`` is then empty)
* ``cpp_mlp_backward(...) -> (gz, ge, gparams, gt)`` (unneeded outputs are empty tensors)
* ``cpp_cnf_grid(ts_t, z0, q0, e, params, ts, ...) -> (zT, qT, save)``: a whole fixed-grid CNF solve (engine
  ``cpp_grid``), and ``cpp_cnf_grid_backward``
* ``cpp_cnf_adaptive(z0, q0, e, params, t0, t1, ...) -> (zT, qT, counts)``: a whole adaptive CNF solve without
  gradient (engine ``cpp_adaptive``; a log-likelihood or sampling)
* ``cpp_rk_stage(y, ks, coefs, dt) -> y + dt sum coefs_j k_j`` (:func:`fastode.cpp.rk_stage`) and
  ``cpp_rk_epilogue(y0, ks, b, b_err, dt, ...) -> (y1, err, ss, mx)`` (:func:`fastode.cpp.rk_epilogue` with an error
  estimate; a closed-form backward)

``save`` holds the activations the backward reads (empty unless ``need_save``). The gradient is once
differentiable (a graph of the backward, e.g. FFJORD's ``create_graph=True``, needs the PyTorch backend). Eager
calls keep the lighter autograd Functions of :mod:`fastode.cpp._mlp`; these ops are what a compiled graph calls.
Under dynamic shapes the tile does not depend on the batch (``tile_for``), so the saved size is an expression
of the symbolic batch size.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from ._loader import ext

__all__ = ["cpp_mlp", "cpp_mlp_probe", "cpp_mlp_backward", "cpp_cnf_grid", "cpp_cnf_grid_backward",
           "cpp_cnf_adaptive", "cpp_rk_stage", "cpp_rk_epilogue",
           "tile_for"]


def tile_for(z: Tensor, params: List[Tensor]) -> int:
    """The kernels' tile for a compiled call: the eager rule for a static batch, else the width rule alone."""
    width = max(p.shape[0] for p in params[0::5])
    B = z.shape[0]
    return _dispatch.tile_rows(B if isinstance(B, int) else None, width)


def _save_values(z: Tensor, params: List[Tensor], act: int, K: int, probes: bool, tile: int):
    """The saved activations' size: whole tiles of ``tile`` rows (a SymInt expression under dynamic shapes)."""
    dims = [int(z.shape[1])] + [int(W.shape[0]) for W in params[0::5]]
    per_tile = ext().mlp_save_size(dims, act, tile, K, probes, tile)
    return (z.shape[0] + tile - 1) // tile * per_tile


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ------------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("fastode::cpp_mlp", mutates_args=())
def cpp_mlp(t: Tensor, z: Tensor, params: List[Tensor], act: int, tile: int, need_save: bool) -> Tuple[Tensor, Tensor]:
    f, save = ext().mlp_forward(float(t), z, list(params), act, need_save, tile)
    return f, save


@cpp_mlp.register_fake
def _(t, z, params, act, tile, need_save):
    return z.new_empty(z.shape), z.new_empty(_save_values(z, params, act, 1, False, tile) if need_save else 0)


@torch.library.custom_op("fastode::cpp_mlp_probe", mutates_args=())
def cpp_mlp_probe(t: Tensor, z: Tensor, e: Optional[Tensor], params: List[Tensor], act: int, tile: int,
                  need_save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    f, vjp, tr, kin, fr, save = ext().mlp_probe_forward(float(t), z, e, list(params), act, e is not None, need_save,
                                                        tile)
    return f, (vjp.reshape(z.shape) if e is not None else vjp), tr, kin, fr, save


@cpp_mlp_probe.register_fake
def _(t, z, e, params, act, tile, need_save):
    B, D = z.shape
    K = 1 if e is not None else D
    n = _save_values(z, params, act, K, True, tile) if need_save else 0
    vjp = z.new_empty(z.shape) if e is not None else _empty(z)
    return z.new_empty(z.shape), vjp, z.new_empty(B), z.new_empty(B), z.new_empty(B), z.new_empty(n)


# ------------------------------------------------------------------------------------------------- backward
@torch.library.custom_op("fastode::cpp_mlp_backward", mutates_args=())
def cpp_mlp_backward(t: Tensor, z: Tensor, e: Optional[Tensor], probes: bool, params: List[Tensor], act: int,
                     save: Tensor, f: Optional[Tensor], vjp: Optional[Tensor], gf: Optional[Tensor],
                     gvjp: Optional[Tensor], gtrace: Optional[Tensor], gkin: Optional[Tensor],
                     gfrob: Optional[Tensor], need_z: bool, need_e: bool, need_params: bool, need_t: bool,
                     tile: int) -> Tuple[Tensor, Tensor, List[Tensor], Tensor]:
    gz, ge, gp, gt = ext().mlp_backward(float(t), z, e, probes, list(params), act, save, f, vjp, gf, gvjp, gtrace,
                                        gkin, gfrob, need_z, need_e, need_params, need_t, tile)
    return (gz if gz is not None else _empty(z), ge if ge is not None else _empty(z), list(gp),
            gt.to(t.dtype).reshape(t.shape) if gt is not None else t.new_zeros(t.shape))


@cpp_mlp_backward.register_fake
def _(t, z, e, probes, params, act, save, f, vjp, gf, gvjp, gtrace, gkin, gfrob, need_z, need_e, need_params,
      need_t, tile):
    gz = z.new_empty(z.shape) if need_z else _empty(z)
    ge = e.new_empty(e.shape) if need_e and e is not None else _empty(z)
    gp = [p.new_empty(p.shape) for p in params] if need_params else []
    return gz, ge, gp, t.new_empty(t.shape)


def _grads(ctx, t, z, e, probes, params, save, f, vjp, gf, gvjp, gtrace, gkin, gfrob):
    n = ctx.needs_input_grad
    need_t, need_z = bool(n[0]), bool(n[1])
    need_e = e is not None and bool(n[2])
    need_p = True  # a list input: its entries' needs are not told apart here
    gz, ge, gp, gt = cpp_mlp_backward(t, z, e, probes, params, ctx.act, save, f, vjp, gf, gvjp, gtrace, gkin, gfrob,
                                      need_z, need_e, need_p, need_t, ctx.tile)
    return (gt if need_t else None, gz if need_z else None, ge if need_e else None, gp)


def _setup_mlp(ctx, inputs, output):
    t, z, params, act, tile, _ = inputs
    ctx.save_for_backward(t, z, output[1], *params)
    ctx.act, ctx.tile = act, tile


def _backward_mlp(ctx, gf, _gsave):
    t, z, save, *params = ctx.saved_tensors
    gt, gz, _, gp = _grads(ctx, t, z, None, False, params, save, None, None, gf, None, None, None, None)
    return gt, gz, gp, None, None, None


def _setup_probe(ctx, inputs, output):
    t, z, e, params, act, tile, _ = inputs
    f, vjp = output[0], output[1]
    ctx.save_for_backward(t, z, e, f, vjp, output[5], *params)
    ctx.act, ctx.tile = act, tile


def _backward_probe(ctx, gf, gvjp, gtrace, gkin, gfrob, _gsave):
    t, z, e, f, vjp, save, *params = ctx.saved_tensors
    hutch = e is not None
    gt, gz, ge, gp = _grads(ctx, t, z, e, True, params, save, f if hutch else None, vjp if hutch else None, gf,
                            gvjp if hutch else None, gtrace, gkin if hutch else None, gfrob if hutch else None)
    return gt, gz, ge, gp, None, None, None


torch.library.register_autograd("fastode::cpp_mlp", _backward_mlp, setup_context=_setup_mlp)
torch.library.register_autograd("fastode::cpp_mlp_probe", _backward_probe, setup_context=_setup_probe)


# ------------------------------------------------------------------------------------------- fixed-grid CNF solve
def _grid_save_values(z0, params, act, K, nrates, stages, nsteps, tile):
    dims = [int(z0.shape[1])] + [int(W.shape[0]) for W in params[0::5]]
    per_tile = ext().cnf_step_save_size(dims, act, K, nrates, stages, tile, tile)
    return nsteps * ((z0.shape[0] + tile - 1) // tile) * per_tile


@torch.library.custom_op("fastode::cpp_cnf_grid", mutates_args=())
def cpp_cnf_grid(ts_t: Tensor, z0: Tensor, q0: Tensor, e: Optional[Tensor], params: List[Tensor], ts: List[float],
                 act: int, rates: List[int], c: List[float], a: List[float], b: List[float], tile: int,
                 need_save: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """A whole fixed-grid CNF solve over the times ``ts`` (``ts_t``: the same times as a tensor, for their
    gradient): ``(zT, qT, save)``."""
    return ext().cnf_grid_forward(list(ts), z0, q0, e, list(params), act, list(rates), list(c), list(a), list(b),
                                  need_save, tile)


@cpp_cnf_grid.register_fake
def _(ts_t, z0, q0, e, params, ts, act, rates, c, a, b, tile, need_save):
    K = 1 if e is not None else z0.shape[1]
    n = _grid_save_values(z0, params, act, K, len(rates), len(c), len(ts) - 1, tile) if need_save else 0
    return z0.new_empty(z0.shape), z0.new_empty((z0.shape[0], len(rates))), z0.new_empty(n)


@torch.library.custom_op("fastode::cpp_cnf_grid_backward", mutates_args=())
def cpp_cnf_grid_backward(ts_t: Tensor, z0: Tensor, e: Optional[Tensor], params: List[Tensor], ts: List[float],
                          act: int, rates: List[int], c: List[float], a: List[float], b: List[float], save: Tensor,
                          gzT: Optional[Tensor], gqT: Optional[Tensor], need_z0: bool, need_q0: bool, need_e: bool,
                          need_params: bool, need_ts: bool, tile: int
                          ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], Tensor]:
    gz0, gq0, ge, gp, gts = ext().cnf_grid_backward(list(ts), z0, e, list(params), act, list(rates), list(c),
                                                    list(a), list(b), save, gzT, gqT, need_z0, need_q0, need_e,
                                                    need_params, need_ts, tile)
    return (gz0 if gz0 is not None else _empty(z0), gq0 if gq0 is not None else _empty(z0),
            ge if ge is not None else _empty(z0), list(gp),
            torch.tensor(gts, dtype=ts_t.dtype) if gts is not None else _empty(ts_t))


@cpp_cnf_grid_backward.register_fake
def _(ts_t, z0, e, params, ts, act, rates, c, a, b, save, gzT, gqT, need_z0, need_q0, need_e, need_params, need_ts,
      tile):
    B = z0.shape[0]
    return (z0.new_empty(z0.shape) if need_z0 else _empty(z0),
            z0.new_empty((B, len(rates))) if need_q0 else _empty(z0),
            z0.new_empty(z0.shape) if need_e and e is not None else _empty(z0),
            [p.new_empty(p.shape) for p in params] if need_params else [],
            ts_t.new_empty(len(ts)) if need_ts else _empty(ts_t))


def _setup_grid(ctx, inputs, output):
    ts_t, z0, q0, e, params, ts, act, rates, c, a, b, tile, _ = inputs
    ctx.save_for_backward(ts_t, z0, e, output[2], *params)
    ctx.static = (list(ts), act, list(rates), list(c), list(a), list(b), tile)


def _backward_grid(ctx, gzT, gqT, _gsave):
    ts_t, z0, e, save, *params = ctx.saved_tensors
    ts, act, rates, c, a, b, tile = ctx.static
    n = ctx.needs_input_grad
    need_ts, need_z0, need_q0 = bool(n[0]), bool(n[1]), bool(n[2])
    need_e = e is not None and bool(n[3])
    gz0, gq0, ge, gp, gts = cpp_cnf_grid_backward(ts_t, z0, e, params, ts, act, rates, c, a, b, save, gzT, gqT,
                                                  need_z0, need_q0, need_e, True, need_ts, tile)
    return (gts if need_ts else None, gz0 if need_z0 else None, gq0 if need_q0 else None, ge if need_e else None,
            gp) + (None,) * 8


torch.library.register_autograd("fastode::cpp_cnf_grid", _backward_grid, setup_context=_setup_grid)


# ------------------------------------------------------------------------------- adaptive CNF solve, no gradient
_COUNTS = ("status", "t_status", "nfe", "steps", "accepted", "rejected")


@torch.library.custom_op("fastode::cpp_cnf_adaptive", mutates_args=())
def cpp_cnf_adaptive(z0: Tensor, q0: Tensor, e: Optional[Tensor], params: List[Tensor], t0: float, t1: float,
                     act: int, rates: List[int], c: List[float], a: List[float], b: List[float], b_err: List[float],
                     c_mid: List[float], ctl: List[float], max_num_steps: int, order: int, time_f32: bool,
                     step_rows: int, tile: int) -> Tuple[Tensor, Tensor, Tensor]:
    """A whole adaptive CNF solve without gradient (engine ``cpp_adaptive``): ``(zT, qT, counts)``, ``counts`` a
    float64 tensor of status, the time it stopped at, NFE, steps, accepted, rejected (per tile: the first failed
    tile's, else the row-weighted means). Its step count is data-dependent, so a solve that needs a gradient (and
    so a tape of every step) stays eager."""
    zT, qT, st, _ = ext().cnf_adaptive_forward(t0, t1, z0, q0, e, list(params), act, list(rates), list(c), list(a),
                                               list(b), list(b_err), list(c_mid), list(ctl), max_num_steps, order,
                                               time_f32, 1, False, step_rows, tile)
    tiles = st if isinstance(st, list) else [st]
    bad = next((s for s in tiles if s["status"]), None)
    if bad is not None:
        vals = [float(bad[k]) for k in _COUNTS]
    else:
        B = z0.shape[0]
        rows = step_rows if step_rows else B
        w = [min(rows, B - i * rows) / max(B, 1) for i in range(len(tiles))]
        vals = [0.0, 0.0] + [sum(wi * s[k] for wi, s in zip(w, tiles)) for k in _COUNTS[2:]]
    return zT, qT, torch.tensor(vals, dtype=torch.float64)


@cpp_cnf_adaptive.register_fake
def _(z0, q0, e, params, t0, t1, act, rates, c, a, b, b_err, c_mid, ctl, max_num_steps, order, time_f32, step_rows,
      tile):
    return (z0.new_empty(z0.shape), z0.new_empty((z0.shape[0], len(rates))),
            torch.empty(len(_COUNTS), dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ RK stage input
@torch.library.custom_op("fastode::cpp_rk_stage", mutates_args=())
def cpp_rk_stage(y: Tensor, ks: List[Tensor], coefs: List[float], dt: Tensor) -> Tensor:
    """``y + dt * sum_j coefs[j] * ks[j]`` in one pass (:func:`fastode.cpp.rk_stage`)."""
    return ext().rk_combine(y, list(ks), list(coefs), float(dt))


@cpp_rk_stage.register_fake
def _(y, ks, coefs, dt):
    return torch.empty_like(y)


def _setup_stage(ctx, inputs, output):
    _, ks, coefs, dt = inputs
    ctx.coefs = list(coefs)
    ctx.save_for_backward(dt, *ks)


def _backward_stage(ctx, g):
    dt, *ks = ctx.saved_tensors
    gdt = sum(c * (g * k).sum() for c, k in zip(ctx.coefs, ks)).to(dt.dtype).reshape(dt.shape)
    scale = dt.to(g.dtype)
    return g, [g * (scale * c) for c in ctx.coefs], None, gdt


torch.library.register_autograd("fastode::cpp_rk_stage", _backward_stage, setup_context=_setup_stage)


# ----------------------------------------------------------------------------------------------- RK step epilogue
@torch.library.custom_op("fastode::cpp_rk_epilogue", mutates_args=())
def cpp_rk_epilogue(y0: Tensor, ks: List[Tensor], b: List[float], b_err: List[float], dt: Tensor,
                    atol_t: Optional[Tensor], atol: float, rtol_t: Optional[Tensor], rtol: float
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y1, err, ss, mx)`` of :func:`fastode.cpp.rk_epilogue` with an error estimate: ``ss`` / ``mx`` (float64,
    one per row) the sum of squares and the max of ``r = err / (atol + rtol max(|y0|, |y1|))``."""
    y1, err, ss, mx = ext().rk_epilogue(y0, list(ks), list(b), list(b_err), float(dt), atol_t, atol, rtol_t, rtol)
    return y1, err, ss, mx


@cpp_rk_epilogue.register_fake
def _(y0, ks, b, b_err, dt, atol_t, atol, rtol_t, rtol):
    B = 1 if y0.dim() <= 1 else y0.shape[0]
    f64 = dict(dtype=torch.float64, device=y0.device)
    return torch.empty_like(y0), torch.empty_like(y0), torch.empty(B, **f64), torch.empty(B, **f64)


def _setup_epilogue(ctx, inputs, output):
    y0, ks, b, b_err, dt, atol_t, atol, rtol_t, rtol = inputs
    ctx.b, ctx.b_err, ctx.atol, ctx.rtol = list(b), list(b_err), atol, rtol
    ctx.save_for_backward(y0, dt, output[0], output[1], atol_t, rtol_t, *ks)


def _backward_epilogue(ctx, g_y1, g_err, g_ss, _g_mx):
    """Closed form (the tolerances and the max are not differentiated): y1 = y0 + dt sum b k, err = dt sum b_err k,
    ss = sum over a row of (err / tol)^2 with tol = atol + rtol max(|y0|, |y1|) (torch.maximum's tie rule)."""
    y0, dt, y1, err, atol_t, rtol_t, *ks = ctx.saved_tensors
    zeros = torch.zeros_like(y0)
    g_y1 = zeros if g_y1 is None else g_y1
    g_err = zeros if g_err is None else g_err
    g_y0 = zeros
    if g_ss is not None:
        atol = atol_t if atol_t is not None else ctx.atol
        rtol = rtol_t if rtol_t is not None else ctx.rtol
        a0, a1 = y0.abs(), y1.abs()
        tol = atol + rtol * torch.maximum(a0, a1)
        r = err / tol
        rows = 1 if y0.dim() <= 1 else y0.shape[0]
        G = g_ss.to(y0.dtype).reshape((rows,) + (1,) * max(y0.dim() - 1, 0)) if y0.dim() > 1 else g_ss.to(y0.dtype)
        g_err = g_err + G * 2 * r / tol
        g_m = -G * 2 * r * r / tol * rtol
        half = torch.where(a0 == a1, 0.5, 1.0).to(y0.dtype)
        g_y0 = g_m * half * (a0 >= a1).to(y0.dtype) * torch.sign(y0)
        g_y1 = g_y1 + g_m * half * (a1 >= a0).to(y0.dtype) * torch.sign(y1)
    g_y0 = g_y0 + g_y1
    per_k = [bi * g_y1 + ei * g_err for bi, ei in zip(ctx.b, ctx.b_err)]
    scale = dt.to(y0.dtype)
    g_ks = [scale * p for p in per_k]
    g_dt = sum((p * k).sum() for p, k in zip(per_k, ks)).to(dt.dtype).reshape(dt.shape)
    return g_y0, g_ks, None, None, g_dt, None, None, None, None


torch.library.register_autograd("fastode::cpp_rk_epilogue", _backward_epilogue, setup_context=_setup_epilogue)
