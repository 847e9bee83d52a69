"""The C++ kernels as fused ops, each declared once (:class:`fastode.ops.fused_op.FusedOp`): the eager autograd
Function and the ``torch.library`` custom op that ``torch.compile`` / ``torch.export`` see as one graph node (dynamo
cannot trace into a pybind11 call) run the same forward and backward below.

* :data:`CPP_MLP` ``(t, z, params, act, tile, need_save) -> (f, save)`` (op ``fastode::cpp_mlp``);
* :data:`CPP_MLP_PROBE` ``(t, z, e, params, act, tile, need_save) -> (f, vjp, trace, kinetic, jac_frob, save)``:
  with a Hutchinson probe ``e`` (B, D), or the exact trace (``e`` None; ``vjp`` is then empty);
* :data:`CPP_CNF_GRID` ``(ts_t, z0, q0, e, params, ts, act, rates, c, a, b, tile, need_save) -> (zT, qT, save)``: a
  whole fixed-grid CNF solve (engine ``cpp_grid``);
* ``cpp_cnf_adaptive(z0, q0, e, params, t0, t1, ...) -> (zT, qT, counts)``: a whole adaptive CNF solve without
  gradient (engine ``cpp_adaptive``; a log-likelihood or sampling), a custom op only: with a gradient the adaptive
  solve's tape has a data-dependent length, and it stays eager (:func:`fastode.cpp.cnf_adaptive_solve`).

``save`` holds the activations the backward reads (empty unless ``need_save``). Each backward is also a custom op
(``<name>_backward``; unneeded outputs are empty tensors). The MLP ops' double backward (``create_graph=True``)
differentiates the reference (:mod:`fastode.ops.concatsquash`); the grid solve's gradient is once differentiable.
Under dynamic shapes the tile does not depend on the batch (``tile_for``), so the saved size is an expression
of the symbolic batch size.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..codes import ACTIVATION_NAMES
from ..ops import concatsquash as _ref
from ..ops.fused_op import FusedOp, any_need, masked_grads
from . import _dispatch
from ._loader import ext

__all__ = ["CPP_MLP", "CPP_MLP_PROBE", "CPP_CNF_GRID", "cpp_cnf_adaptive", "tile_for", "COUNTS"]


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


# ------------------------------------------------------------------------------------------------- the MLP
def _mlp_forward(t: Tensor, z: Tensor, params: List[Tensor], act: int, tile: int, need_save: bool
                 ) -> Tuple[Tensor, Tensor]:
    f, save = ext().mlp_forward(float(t), z, list(params), act, need_save, tile)
    return f, save


def _mlp_fake(t, z, params, act, tile, need_save):
    return z.new_empty(z.shape), z.new_empty(_save_values(z, params, act, 1, False, tile) if need_save else 0)


def _probe_forward(t: Tensor, z: Tensor, e: Optional[Tensor], params: List[Tensor], act: int, tile: int,
                   need_save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    f, vjp, tr, kin, fr, save = ext().mlp_probe_forward(float(t), z, e, list(params), act, e is not None, need_save,
                                                        tile)
    return f, (vjp.reshape(z.shape) if e is not None else vjp), tr, kin, fr, save


def _probe_fake(t, z, e, params, act, tile, need_save):
    B, D = z.shape
    K = 1 if e is not None else D
    n = _save_values(z, params, act, K, True, tile) if need_save else 0
    vjp = z.new_empty(z.shape) if e is not None else _empty(z)
    return z.new_empty(z.shape), vjp, z.new_empty(B), z.new_empty(B), z.new_empty(B), z.new_empty(n)


def _mlp_backward(t: Tensor, z: Tensor, e: Optional[Tensor], probes: bool, params: List[Tensor], act: int,
                  save: Tensor, f: Optional[Tensor], vjp: Optional[Tensor], gf: Optional[Tensor],
                  gvjp: Optional[Tensor], gtrace: Optional[Tensor], gkin: Optional[Tensor],
                  gfrob: Optional[Tensor], need_z: bool, need_e: bool, need_params: bool, need_t: bool,
                  tile: int) -> Tuple[Tensor, Tensor, List[Tensor], Tensor]:
    gz, ge, gp, gt = ext().mlp_backward(float(t), z, e, probes, list(params), act, save, f, vjp, gf, gvjp, gtrace,
                                        gkin, gfrob, need_z, need_e, need_params, need_t, tile)
    return (gz if gz is not None else _empty(z), ge if ge is not None else _empty(z), list(gp) if gp else [],
            gt.to(t.dtype).reshape(t.shape) if need_t and gt is not None else _empty(t))


def _mlp_backward_fake(t, z, e, probes, params, act, save, f, vjp, gf, gvjp, gtrace, gkin, gfrob, need_z, need_e,
                       need_params, need_t, tile):
    gz = z.new_empty(z.shape) if need_z else _empty(z)
    ge = e.new_empty(e.shape) if need_e and e is not None else _empty(z)
    gp = [p.new_empty(p.shape) for p in params] if need_params else []
    return gz, ge, gp, t.new_empty(t.shape) if need_t else _empty(t)


def _mlp_grads(args, extra, attrs, gouts, needs, backward):
    t, z, params, act, tile, _ = args
    (save,) = extra
    need_t, need_z, need_p = bool(needs[0]), bool(needs[1]), needs[2]
    gz, _, gp, gt = backward(t, z, None, False, params, act, save, None, None, gouts[0], None, None, None, None,
                             need_z, False, any_need(need_p), need_t, tile)
    return gt if need_t else None, gz if need_z else None, masked_grads(gp, need_p), None, None, None


def _probe_grads(args, extra, attrs, gouts, needs, backward):
    t, z, e, params, act, tile, _ = args
    f, vjp, save = extra
    gf, gvjp, gtrace, gkin, gfrob, _ = gouts
    hutch = e is not None
    need_t, need_z, need_p = bool(needs[0]), bool(needs[1]), needs[3]
    need_e = hutch and bool(needs[2])
    gz, ge, gp, gt = backward(t, z, e, True, params, act, save, f if hutch else None, vjp if hutch else None, gf,
                              gvjp if hutch else None, gtrace, gkin if hutch else None, gfrob if hutch else None,
                              need_z, need_e, any_need(need_p), need_t, tile)
    return (gt if need_t else None, gz if need_z else None, ge if need_e else None, masked_grads(gp, need_p), None, None,
            None)


def _mlp_reference(t, z, params, act, tile, need_save):
    return (_ref.concatsquash_mlp(t, z, _ref.layer_params(params), ACTIVATION_NAMES[act]),)


def _probe_reference(t, z, e, params, act, tile, need_save):
    if e is not None:
        return _ref.concatsquash_mlp_hutchinson(t, z, e, _ref.layer_params(params), ACTIVATION_NAMES[act])
    return _ref.concatsquash_mlp_exact_trace(t, z, _ref.layer_params(params), ACTIVATION_NAMES[act])


CPP_MLP = FusedOp("cpp_mlp", forward=_mlp_forward, fake=_mlp_fake, backward=_mlp_backward,
                  backward_fake=_mlp_backward_fake, setup=lambda args, out: ([out[1]], None), grads=_mlp_grads,
                  reference=_mlp_reference, non_differentiable=(1,))
CPP_MLP_PROBE = FusedOp("cpp_mlp_probe", forward=_probe_forward, fake=_probe_fake, backward=_mlp_backward,
                        backward_fake=_mlp_backward_fake, setup=lambda args, out: ([out[0], out[1], out[5]], None),
                        grads=_probe_grads, reference=_probe_reference, non_differentiable=(5,),
                        differentiable_outputs=lambda args: (0, 1, 2, 3, 4) if args[2] is not None else (0, 2))


# ------------------------------------------------------------------------------------------- fixed-grid CNF solve
def _grid_save_values(z0, params, act, K, nrates, stages, nsteps, tile):
    dims = [int(z0.shape[1])] + [int(W.shape[0]) for W in params[0::5]]
    per_tile = ext().cnf_step_save_size(dims, act, K, nrates, stages, tile, tile)
    return nsteps * ((z0.shape[0] + tile - 1) // tile) * per_tile


def _grid_forward(ts_t: Optional[Tensor], z0: Tensor, q0: Tensor, e: Optional[Tensor], params: List[Tensor],
                  ts: List[float], act: int, rates: List[int], c: List[float], a: List[float], b: List[float],
                  tile: int, need_save: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """A whole fixed-grid CNF solve over the times ``ts`` (``ts_t``: the same times as a tensor, for their
    gradient, or None): ``(zT, qT, save)``."""
    return ext().cnf_grid_forward(list(ts), z0, q0, e, list(params), act, list(rates), list(c), list(a), list(b),
                                  need_save, tile)


def _grid_fake(ts_t, z0, q0, e, params, ts, act, rates, c, a, b, tile, need_save):
    K = 1 if e is not None else z0.shape[1]
    n = _grid_save_values(z0, params, act, K, len(rates), len(c), len(ts) - 1, tile) if need_save else 0
    return z0.new_empty(z0.shape), z0.new_empty((z0.shape[0], len(rates))), z0.new_empty(n)


def _grid_backward(ts_t: Optional[Tensor], z0: Tensor, e: Optional[Tensor], params: List[Tensor], ts: List[float],
                   act: int, rates: List[int], c: List[float], a: List[float], b: List[float], save: Tensor,
                   gzT: Optional[Tensor], gqT: Optional[Tensor], need_z0: bool, need_q0: bool, need_e: bool,
                   need_params: bool, need_ts: bool, tile: int
                   ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], Tensor]:
    gz0, gq0, ge, gp, gts = ext().cnf_grid_backward(list(ts), z0, e, list(params), act, list(rates), list(c),
                                                    list(a), list(b), save, gzT, gqT, need_z0, need_q0, need_e,
                                                    need_params, need_ts, tile)
    like_t = ts_t if ts_t is not None else z0.new_empty(0, dtype=torch.float64)
    return (gz0 if gz0 is not None else _empty(z0), gq0 if gq0 is not None else _empty(z0),
            ge if ge is not None else _empty(z0), list(gp) if gp else [],
            torch.tensor(gts, dtype=like_t.dtype) if gts is not None else _empty(like_t))


def _grid_backward_fake(ts_t, z0, e, params, ts, act, rates, c, a, b, save, gzT, gqT, need_z0, need_q0, need_e,
                        need_params, need_ts, tile):
    B = z0.shape[0]
    like_t = ts_t if ts_t is not None else z0.new_empty(0, dtype=torch.float64)
    return (z0.new_empty(z0.shape) if need_z0 else _empty(z0),
            z0.new_empty((B, len(rates))) if need_q0 else _empty(z0),
            z0.new_empty(z0.shape) if need_e and e is not None else _empty(z0),
            [p.new_empty(p.shape) for p in params] if need_params else [],
            like_t.new_empty(len(ts)) if need_ts else _empty(like_t))


def _grid_grads(args, extra, attrs, gouts, needs, backward):
    ts_t, z0, q0, e, params, ts, act, rates, c, a, b, tile, _ = args
    (save,) = extra
    need_ts = ts_t is not None and bool(needs[0])
    need_z0, need_q0, need_p = bool(needs[1]), bool(needs[2]), needs[4]
    need_e = e is not None and bool(needs[3])
    gz0, gq0, ge, gp, gts = backward(ts_t, z0, e, params, ts, act, rates, c, a, b, save, gouts[0], gouts[1],
                                     need_z0, need_q0, need_e, any_need(need_p), need_ts, tile)
    return ((gts if need_ts else None, gz0 if need_z0 else None, gq0 if need_q0 else None, ge if need_e else None,
             masked_grads(gp, need_p)) + (None,) * 8)


CPP_CNF_GRID = FusedOp("cpp_cnf_grid", forward=_grid_forward, fake=_grid_fake, backward=_grid_backward,
                       backward_fake=_grid_backward_fake, setup=lambda args, out: ([out[2]], None), grads=_grid_grads,
                       non_differentiable=(2,))


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
