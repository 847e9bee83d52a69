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
           "cpp_cnf_adaptive", "tile_for"]


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
COUNTS = ("status", "t_status", "nfe", "steps", "accepted", "rejected")


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
        vals = [float(bad[k]) for k in COUNTS]
    else:
        B = z0.shape[0]
        rows = step_rows if step_rows else B
        w = [min(rows, B - i * rows) / max(B, 1) for i in range(len(tiles))]
        vals = [0.0, 0.0] + [sum(wi * s[k] for wi, s in zip(w, tiles)) for k in COUNTS[2:]]
    return zT, qT, torch.tensor(vals, dtype=torch.float64)


@cpp_cnf_adaptive.register_fake
def _(z0, q0, e, params, t0, t1, act, rates, c, a, b, b_err, c_mid, ctl, max_num_steps, order, time_f32, step_rows,
      tile):
    return (z0.new_empty(z0.shape), z0.new_empty((z0.shape[0], len(rates))),
            torch.empty(len(COUNTS), dtype=torch.float64))
