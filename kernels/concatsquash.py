"""Fused concatsquash-MLP kernels: forward, Hutchinson VJP / exact trace, and their backward.

Math (see ``fastode/nn/functional.py``, the executable spec): layer ``l`` computes
``a_l = W_l h_l + b_l``, ``u_l = a_l * s_l + c_l`` with ``s_l = sigmoid(gw_l t + gb_l)``, ``c_l = bw_l t``;
``h_{l+1} = act(u_l)`` except after the last layer, ``f = u_{L-1}``.

Kernel layout
-------------
* Parameters are packed once (per parameter version) into zero-padded buffers: ``W (L, P, P)``,
  ``V (L, 4, P)`` = ``[b, gw, gb, bw]`` and ``dims (L+1,) int32`` = ``[D, h_1, ..., D]``. Zero padding makes
  padded lanes contribute exactly nothing, so only the ``D``-wide global tensors need masks.
* Each program is persistent: it loops over row tiles of ``BM`` rows (``tile = pid, pid + nprog, ...``).
* Layers are unrolled (``L`` is a ``constexpr``); every matmul is chunked (``CH`` columns for hidden
  widths, ``CD`` for the ``D``-wide input/output side, both >= 16 so ``tl.dot`` is legal on every GPU:
  input widths such as 2 are zero-padded and masked up to 16).
* Activations of the tile are staged through a per-program global scratch area (``BM x P`` slots; it
  stays in L1/L2), separated by CTA barriers. This is what lets any depth and widths up to (at least)
  512 run without register spills.
* Dots use ``input_precision="ieee"`` (exact FP32), never TF32.
* Parameter gradients: each program accumulates its own partial ``dW (L, P, P)`` / ``dV (L, 3, P)``
  (``[db, sbar, cbar]``: gradients w.r.t. ``b``, the gate output ``s`` and the time bias ``c``); the launcher
  reduces the per-program partials with a fixed-order sum. No atomics anywhere: results are bitwise
  reproducible for a given launch configuration.

Modes (``MODE`` constexpr): 0 = ``f`` only; 1 = Hutchinson with caller-supplied ``e``: ``f, vjp = e^T J,
trace = <vjp, e>, kinetic = |f|^2, frob = |vjp|^2``; 2 = exact trace by ``D`` one-hot probes (``trace =
tr J``, ``frob = |J|_F^2``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastode.launch_count import launched

from ._common import ACT_CODES, DOT_PRECISION, act_d1, act_d2, act_fwd, empty as _empty, max_programs

MODE_F, MODE_HUTCH, MODE_EXACT = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# device helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _gate(v_l, cn, t, P: tl.constexpr):
    b = tl.load(v_l + cn)
    gw = tl.load(v_l + P + cn)
    gb = tl.load(v_l + 2 * P + cn)
    bw = tl.load(v_l + 3 * P + cn)
    s = tl.sigmoid(gw * t + gb)
    return b, s, bw * t


@triton.jit
def _mm_fwd(x_ptr, x_rs, x_cols, xrm, w_l, n0, n_in, g, dw_l,
            P: tl.constexpr, BM: tl.constexpr, KC: tl.constexpr, NC: tl.constexpr,
            GRADW: tl.constexpr, PREC: tl.constexpr):
    """acc[BM, NC] = X[:, :n_in] @ W[n0:n0+NC, :n_in]^T; if GRADW also dW[n0:, :] += g^T X (g: BM x NC)."""
    r = tl.arange(0, BM)
    ck = tl.arange(0, KC)
    cn = n0 + tl.arange(0, NC)
    acc = tl.zeros((BM, NC), dtype=w_l.dtype.element_ty)
    for k0 in range(0, n_in, KC):
        kk = k0 + ck
        x = tl.load(x_ptr + r[:, None] * x_rs + kk[None, :], mask=xrm[:, None] & (kk < x_cols)[None, :], other=0.0)
        w = tl.load(w_l + cn[None, :] * P + kk[:, None])
        acc += tl.dot(x, w, input_precision=PREC)
        if GRADW:
            dptr = dw_l + cn[:, None] * P + kk[None, :]
            tl.store(dptr, tl.load(dptr) + tl.dot(tl.trans(g), x, input_precision=PREC))
    return acc


@triton.jit
def _mm_bwd(g_ptr, w_l, k0, n_out, h, dw_l,
            P: tl.constexpr, BM: tl.constexpr, KC: tl.constexpr, NC: tl.constexpr,
            GRADW: tl.constexpr, PREC: tl.constexpr):
    """acc[BM, KC] = G[:, :n_out] @ W[:n_out, k0:k0+KC] (G in scratch); if GRADW also dW[:, k0:] += G^T h."""
    r = tl.arange(0, BM)
    cn = tl.arange(0, NC)
    kk = k0 + tl.arange(0, KC)
    acc = tl.zeros((BM, KC), dtype=w_l.dtype.element_ty)
    for n0 in range(0, n_out, NC):
        nn = n0 + cn
        g = tl.load(g_ptr + r[:, None] * P + nn[None, :])
        w = tl.load(w_l + nn[:, None] * P + kk[None, :])
        acc += tl.dot(g, w, input_precision=PREC)
        if GRADW:
            dptr = dw_l + nn[:, None] * P + kk[None, :]
            tl.store(dptr, tl.load(dptr) + tl.dot(tl.trans(g), h, input_precision=PREC))
    return acc


@triton.jit
def _probe(e_ptr, rows64, rmask, cn, D, i, MODE: tl.constexpr):
    """The probe vector chunk: e (MODE 1) or the one-hot e_i (MODE 2); zero outside the batch/D."""
    m = rmask[:, None] & (cn < D)[None, :]
    if MODE == 1:
        ev = tl.load(e_ptr + rows64[:, None] * D + cn[None, :], mask=m, other=0.0)
    else:
        ev = tl.where(m & (cn == i)[None, :], 1.0, 0.0).to(e_ptr.dtype.element_ty)
    return ev


@triton.jit
def _fwd_layer(x_ptr, x_rs, x_cols, xrm, w_l, v_l, n_in, n_out, t, pre_ptr, h_ptr, f_ptr, f_rs, rows64, rmask, D,
               kin, P: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, CD: tl.constexpr,
               FIRST: tl.constexpr, LAST: tl.constexpr, ACT: tl.constexpr, PRE: tl.constexpr,
               WRITE_F: tl.constexpr, PREC: tl.constexpr):
    """One forward layer for one tile. PRE: 0 store nothing, 1 store u (pre-activation), 2 store a.
    ``f`` (last layer) goes to ``f_ptr + rows64 * f_rs`` (a global output or a per-program scratch slot)."""
    if FIRST:
        KC: tl.constexpr = CD
    else:
        KC: tl.constexpr = CH
    if LAST:
        NC: tl.constexpr = CD
    else:
        NC: tl.constexpr = CH
    r = tl.arange(0, BM)
    for n0 in range(0, n_out, NC):
        cn = n0 + tl.arange(0, NC)
        acc = _mm_fwd(x_ptr, x_rs, x_cols, xrm, w_l, n0, n_in, 0, w_l, P, BM, KC, NC, False, PREC)
        b, s, c = _gate(v_l, cn, t, P)
        a = acc + b[None, :]
        u = a * s[None, :] + c[None, :]
        loc = r[:, None] * P + cn[None, :]
        if PRE == 1:
            tl.store(pre_ptr + loc, u)
        if PRE == 2:
            tl.store(pre_ptr + loc, a)
        if LAST:
            if WRITE_F:
                fm = rmask[:, None] & (cn < D)[None, :]
                tl.store(f_ptr + rows64[:, None] * f_rs + cn[None, :], u, mask=fm)
                kin += tl.sum(tl.where(fm, u * u, 0.0), axis=1)
        else:
            tl.store(h_ptr + loc, act_fwd(u, ACT))
    return kin


# ------------------------------------------------------------------------------------------------
# forward kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _vjp_layer_fwd(scr, w_ptr, v_ptr, dims_ptr, e_ptr, vjp_ptr, rows64, rmask, D, t, i, tr, fr,
                   l: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr,
                   CD: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, WRITE_VJP: tl.constexpr,
                   PREC: tl.constexpr):
    """beta_l = alpha_l @ W_l; then alpha_{l-1} = beta_l * act'(u_{l-1}) * s_{l-1}, or the outputs at l = 0."""
    if l == 0:
        KC: tl.constexpr = CD
    else:
        KC: tl.constexpr = CH
    if l == L - 1:
        NC: tl.constexpr = CD
    else:
        NC: tl.constexpr = CH
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    n_in = tl.load(dims_ptr + l)
    n_out = tl.load(dims_ptr + l + 1)
    g_in = scr + (2 * L - 1 + l % 2) * SL
    for k0 in range(0, n_in, KC):
        ck = k0 + tl.arange(0, KC)
        beta = _mm_bwd(g_in, w_ptr + l * P * P, k0, n_out, 0, w_ptr, P, BM, KC, NC, False, PREC)
        if l == 0:
            vm = rmask[:, None] & (ck < D)[None, :]
            if WRITE_VJP:
                tl.store(vjp_ptr + rows64[:, None] * D + ck[None, :], beta, mask=vm)
            ev = _probe(e_ptr, rows64, rmask, ck, D, i, MODE)
            tr += tl.sum(beta * ev, axis=1)
            fr += tl.sum(tl.where(vm, beta * beta, 0.0), axis=1)
        else:
            loc = r[:, None] * P + ck[None, :]
            u = tl.load(scr + (L - 1 + l - 1) * SL + loc)
            b, s, c = _gate(v_ptr + (l - 1) * 4 * P, ck, t, P)
            tl.store(scr + (2 * L - 1 + (l - 1) % 2) * SL + loc, beta * act_d1(u, ACT) * s[None, :])
    return tr, fr


@triton.jit
def _fwd_layers(scr, x_ptr, x_rs, xrm, w_ptr, v_ptr, dims_ptr, t, f_ptr, f_rs, f_rows, rmask, D,
                L: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, CD: tl.constexpr,
                ACT: tl.constexpr, PRE: tl.constexpr, WRITE_F: tl.constexpr, PREC: tl.constexpr):
    """Every layer's forward for one tile (inputs of the hidden layers in scratch slots 0..L-2, pre-activations per
    ``PRE`` in slots L-1..2L-2); ``f`` written when ``WRITE_F``. Returns ``|f|^2`` per row (when written)."""
    SL: tl.constexpr = BM * P
    allr = tl.arange(0, BM) < BM
    kin = tl.zeros((BM,), dtype=w_ptr.dtype.element_ty)
    for l in tl.static_range(L):
        n_in = tl.load(dims_ptr + l)
        n_out = tl.load(dims_ptr + l + 1)
        if l == 0:
            kin = _fwd_layer(x_ptr, x_rs, D, xrm, w_ptr, v_ptr, n_in, n_out, t, scr + (L - 1) * SL, scr, f_ptr, f_rs,
                             f_rows, rmask, D, kin, P, BM, CH, CD, True, L == 1, ACT, PRE, WRITE_F, PREC)
        else:
            kin = _fwd_layer(scr + (l - 1) * SL, P, P, allr, w_ptr + l * P * P, v_ptr + l * 4 * P, n_in, n_out, t,
                             scr + (L - 1 + l) * SL, scr + l * SL, f_ptr, f_rs, f_rows, rmask, D, kin, P, BM, CH, CD,
                             False, l == L - 1, ACT, PRE, WRITE_F, PREC)
        tl.debug_barrier()
    return kin


@triton.jit
def mlp_tile_forward(scr, x_ptr, x_rs, xrm, f_ptr, f_rs, f_rows, rows64, rmask, e_ptr, vjp_ptr, w_ptr, v_ptr,
                     dims_ptr, D, t,
                     L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                     CH: tl.constexpr, CD: tl.constexpr, WRITE_VJP: tl.constexpr, PREC: tl.constexpr):
    """The MLP (and, MODE > 0, its VJP / trace) of one tile: ``(kinetic, trace, frob)`` per row.

    Input rows ``x_ptr + r * x_rs`` (``D`` wide, rows where ``xrm``); ``f`` to ``f_ptr + f_rows * f_rs``; ``rows64``
    index ``e`` / ``vjp`` (global rows). Scratch slots (BM x P each): H_{l} (l=1..L-1) at l-1; U_l at L-1+l;
    alpha ping-pong at 2L-1, 2L. Shared by the MLP kernel and the fused RK step kernels.
    """
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    kin = _fwd_layers(scr, x_ptr, x_rs, xrm, w_ptr, v_ptr, dims_ptr, t, f_ptr, f_rs, f_rows, rmask, D, L, P, BM, CH,
                      CD, ACT, (MODE > 0) * 1, True, PREC)
    tr = tl.zeros((BM,), dtype=w_ptr.dtype.element_ty)
    fr = tl.zeros((BM,), dtype=w_ptr.dtype.element_ty)
    if MODE > 0:
        if MODE == 1:
            nprobe = 1
        else:
            nprobe = D
        for i in range(0, nprobe):
            g_last = scr + (2 * L - 1 + (L - 1) % 2) * SL
            for n0 in range(0, D, CD):
                cn = n0 + tl.arange(0, CD)
                b, s, c = _gate(v_ptr + (L - 1) * 4 * P, cn, t, P)
                ev = _probe(e_ptr, rows64, rmask, cn, D, i, MODE)
                tl.store(g_last + r[:, None] * P + cn[None, :], ev * s[None, :])
            tl.debug_barrier()
            for j in tl.static_range(L):
                tr, fr = _vjp_layer_fwd(scr, w_ptr, v_ptr, dims_ptr, e_ptr, vjp_ptr, rows64, rmask, D, t, i,
                                        tr, fr, L - 1 - j, L, P, BM, CH, CD, ACT, MODE, WRITE_VJP, PREC)
                tl.debug_barrier()
    return kin, tr, fr


@triton.jit
def csq_fwd_kernel(t_ptr, z_ptr, e_ptr, w_ptr, v_ptr, dims_ptr,
                   f_ptr, vjp_ptr, tr_ptr, kin_ptr, frob_ptr, scr_ptr,
                   B, D, n_tiles,
                   L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
                   BM: tl.constexpr, CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr):
    """One persistent program per group of row tiles; each tile runs :func:`mlp_tile_forward`."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    SL: tl.constexpr = BM * P
    NS: tl.constexpr = 2 * L + 1
    scr = scr_ptr + pid.to(tl.int64) * (NS * SL)
    t = tl.load(t_ptr)
    r = tl.arange(0, BM)
    for tile in range(pid, n_tiles, nprog):
        rows = tile * BM + r
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        z_tile = z_ptr + tl.cast(tile, tl.int64) * BM * D
        kin, tr, fr = mlp_tile_forward(scr, z_tile, D, rmask, f_ptr, D, rows64, rows64, rmask, e_ptr, vjp_ptr,
                                       w_ptr, v_ptr, dims_ptr, D, t, L, P, ACT, MODE, BM, CH, CD, MODE == 1, PREC)
        tl.store(kin_ptr + rows, kin, mask=rmask)
        if MODE > 0:
            tl.store(tr_ptr + rows, tr, mask=rmask)
            tl.store(frob_ptr + rows, fr, mask=rmask)


# ------------------------------------------------------------------------------------------------
# backward kernel
# ------------------------------------------------------------------------------------------------
# Scratch slots of the backward kernel (each BM x P); see _bwd_slots() for the Python mirror.
#   H_l    (l = 1..L-1)  inputs of the layers                         slot l - 1
#   A_l    (l = 0..L-1)  a_l = W_l h_l + b_l                          slot L - 1 + l
#   DL_l   (l = 0..L-1)  delta_l: VJP adjoint w.r.t. u_l              slot 2L - 1 + l
#   AL_l   (l = 0..L-1)  alpha_l = delta_l * s_l                      slot 3L - 1 + l
#   BE_l   (l = 0..L-1)  beta_l = W_l^T alpha_l  (beta_0 = vjp)        slot 4L - 1 + l
#   U2_l   (l = 0..L-2)  second-order contribution to dLoss/du_l      slot 5L - 1 + l
#   R      ping-pong     rho_l = dLoss/dbeta_l                         slots 6L - 2, 6L - 1
#   AB     ping-pong     abar_l = dLoss/da_l                           slots 6L, 6L + 1
@triton.jit
def _vjp_layer_bwd(scr, w_ptr, v_ptr, dims_ptr, t,
                   l: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr,
                   CD: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr):
    """Step 2 (reverse over l): beta_l = alpha_l @ W_l, delta_{l-1}, alpha_{l-1}."""
    if l == 0:
        KC: tl.constexpr = CD
    else:
        KC: tl.constexpr = CH
    if l == L - 1:
        NC: tl.constexpr = CD
    else:
        NC: tl.constexpr = CH
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    n_in = tl.load(dims_ptr + l)
    n_out = tl.load(dims_ptr + l + 1)
    for k0 in range(0, n_in, KC):
        ck = k0 + tl.arange(0, KC)
        loc = r[:, None] * P + ck[None, :]
        beta = _mm_bwd(scr + (3 * L - 1 + l) * SL, w_ptr + l * P * P, k0, n_out, 0, w_ptr, P, BM, KC, NC,
                       False, PREC)
        tl.store(scr + (4 * L - 1 + l) * SL + loc, beta)
        if l > 0:
            a = tl.load(scr + (L - 1 + l - 1) * SL + loc)
            b, s, c = _gate(v_ptr + (l - 1) * 4 * P, ck, t, P)
            u = a * s[None, :] + c[None, :]
            delta = beta * act_d1(u, ACT)
            tl.store(scr + (2 * L - 1 + l - 1) * SL + loc, delta)
            tl.store(scr + (3 * L - 1 + l - 1) * SL + loc, delta * s[None, :])


@triton.jit
def _vjp_adj_layer(scr, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, t, ge_ptr, gtr_ptr, io, rows64, rmask, D,
                   l: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr,
                   CD: tl.constexpr, ACT: tl.constexpr, NEED_GE: tl.constexpr, HAS_GTR: tl.constexpr,
                   CONV: tl.constexpr, PREC: tl.constexpr):
    """Step 3 (forward over l): abar_l = rho_l @ W_l^T, dW_l += alpha_l^T rho_l, sbar, rho_{l+1}, U2_l."""
    if l == 0:
        KC: tl.constexpr = CD
    else:
        KC: tl.constexpr = CH
    if l == L - 1:
        NC: tl.constexpr = CD
    else:
        NC: tl.constexpr = CH
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    n_in = tl.load(dims_ptr + l)
    n_out = tl.load(dims_ptr + l + 1)
    rho = scr + (6 * L - 2 + l % 2) * SL
    for n0 in range(0, n_out, NC):
        cn = n0 + tl.arange(0, NC)
        loc = r[:, None] * P + cn[None, :]
        alpha = tl.load(scr + (3 * L - 1 + l) * SL + loc)
        abar = _mm_fwd(rho, P, P, r < BM, w_ptr + l * P * P, n0, n_in, alpha, dw_p + l * P * P,
                       P, BM, KC, NC, True, PREC)
        b, s, c = _gate(v_ptr + l * 4 * P, cn, t, P)
        dbar = abar * s[None, :]
        delta = tl.load(scr + (2 * L - 1 + l) * SL + loc)
        _gate_grads(dv_p + l * (3 + 2 * CONV) * P, v_ptr + l * 4 * P, cn, tl.sum(abar * delta, axis=0), s, t, P,
                    CONV)
        if l < L - 1:
            a = tl.load(scr + (L - 1 + l) * SL + loc)
            u = a * s[None, :] + c[None, :]
            tl.store(scr + (6 * L - 2 + (l + 1) % 2) * SL + loc, dbar * act_d1(u, ACT))
            beta_next = tl.load(scr + (4 * L - 1 + l + 1) * SL + loc)
            u2_ptr = scr + (5 * L - 1 + l) * SL + loc
            tl.store(u2_ptr, tl.load(u2_ptr) + dbar * beta_next * act_d2(u, ACT))
        else:
            if NEED_GE:
                m = rmask[:, None] & (cn < D)[None, :]
                ge = dbar
                if HAS_GTR:
                    gtr = tl.load(gtr_ptr + io, mask=rmask, other=0.0)
                    ge += gtr[:, None] * tl.load(scr + (4 * L - 1) * SL + loc)
                tl.store(ge_ptr + rows64[:, None] * D + cn[None, :], ge, mask=m)


@triton.jit
def _fwd_adj_layer(scr, x_ptr, x_rs, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, t, gz_ptr, io, io_rs, rmask, D,
                   l: tl.constexpr, L: tl.constexpr, P: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr,
                   CD: tl.constexpr, ACT: tl.constexpr, SECOND: tl.constexpr, CONV: tl.constexpr,
                   PREC: tl.constexpr):
    """Step 4 (reverse over l): hbar_l = abar_l @ W_l, dW_l += abar_l^T h_l, then abar_{l-1} or gz."""
    if l == 0:
        KC: tl.constexpr = CD
    else:
        KC: tl.constexpr = CH
    if l == L - 1:
        NC: tl.constexpr = CD
    else:
        NC: tl.constexpr = CH
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    n_in = tl.load(dims_ptr + l)
    n_out = tl.load(dims_ptr + l + 1)
    ab = scr + (6 * L + l % 2) * SL
    for k0 in range(0, n_in, KC):
        ck = k0 + tl.arange(0, KC)
        loc = r[:, None] * P + ck[None, :]
        if l == 0:
            h = tl.load(x_ptr + r[:, None] * x_rs + ck[None, :], mask=rmask[:, None] & (ck < D)[None, :], other=0.0)
        else:
            h = tl.load(scr + (l - 1) * SL + loc)
        hbar = _mm_bwd(ab, w_ptr + l * P * P, k0, n_out, h, dw_p + l * P * P, P, BM, KC, NC, True, PREC)
        if l > 0:
            a = tl.load(scr + (L - 1 + l - 1) * SL + loc)
            b, s, c = _gate(v_ptr + (l - 1) * 4 * P, ck, t, P)
            u = a * s[None, :] + c[None, :]
            ubar = hbar * act_d1(u, ACT)
            if SECOND:
                ubar += tl.load(scr + (5 * L - 1 + l - 1) * SL + loc)
            _vec_grads(dv_p + (l - 1) * (3 + 2 * CONV) * P, v_ptr + (l - 1) * 4 * P, ck, ubar, a, s, t, P, CONV)
            tl.store(scr + (6 * L + (l - 1) % 2) * SL + loc, ubar * s[None, :])
        else:
            m = rmask[:, None] & (ck < D)[None, :]
            tl.store(gz_ptr + io[:, None] * io_rs + ck[None, :], hbar, mask=m)


@triton.jit
def _gate_grads(dv_l, v_l, cn, sbar, s, t, P: tl.constexpr, CONV: tl.constexpr):
    """Add ``sbar`` (dLoss/ds summed over rows) to the layer's gradients: as is (``CONV=0``, slot 1 of
    ``[db, sbar, cbar]``) or converted at this ``t`` (``CONV=1``, slots 1, 2 and 4 of ``[db, dgw, dgb, dbw, dt]``: the
    fused solve's backward evaluates the MLP at many times, so it accumulates the parameter gradients and the
    gradient w.r.t. the evaluation time directly)."""
    if CONV:
        dpre = sbar * s * (1.0 - s)
        p1 = dv_l + P + cn
        tl.store(p1, tl.load(p1) + dpre * t)
        p2 = dv_l + 2 * P + cn
        tl.store(p2, tl.load(p2) + dpre)
        p4 = dv_l + 4 * P + cn
        tl.store(p4, tl.load(p4) + dpre * tl.load(v_l + P + cn))
    else:
        p1 = dv_l + P + cn
        tl.store(p1, tl.load(p1) + sbar)


@triton.jit
def _vec_grads(dv_l, v_l, cn, ubar, a, s, t, P: tl.constexpr, CONV: tl.constexpr):
    """Accumulate db = sum(ubar * s), sbar = sum(ubar * a), cbar = sum(ubar) over the tile's rows (``CONV``: as
    the gradients of gw, gb, bw and the time at this ``t``, see :func:`_gate_grads`)."""
    p0 = dv_l + cn
    tl.store(p0, tl.load(p0) + tl.sum(ubar * s[None, :], axis=0))
    _gate_grads(dv_l, v_l, cn, tl.sum(ubar * a, axis=0), s, t, P, CONV)
    p2 = dv_l + (2 + CONV) * P + cn
    if CONV:
        cbar = tl.sum(ubar, axis=0)
        tl.store(p2, tl.load(p2) + cbar * t)
        p4 = dv_l + 4 * P + cn
        tl.store(p4, tl.load(p4) + cbar * tl.load(v_l + 3 * P + cn))
    else:
        tl.store(p2, tl.load(p2) + tl.sum(ubar, axis=0))


@triton.jit
def mlp_tile_backward(scr, x_ptr, x_rs, rows64, rmask, io, io_rs, e_ptr, gf_ptr, gv_ptr, gtr_ptr, gkin_ptr,
                      gfrob_ptr, gz_ptr, ge_ptr, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, D, t,
                      L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                      CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, HAS_GF: tl.constexpr,
                      HAS_GV: tl.constexpr, HAS_GTR: tl.constexpr, HAS_GKIN: tl.constexpr, HAS_GFROB: tl.constexpr,
                      NEED_GE: tl.constexpr, SECOND: tl.constexpr, CONV: tl.constexpr):
    """The backward of :func:`mlp_tile_forward` for one tile: ``gz`` and the tile's parameter gradients added to
    the program's partials ``dw_p`` / ``dv_p``.

    Input rows ``x_ptr + r * x_rs``; ``e``, ``gv``, ``ge`` at global rows ``rows64`` (stride D); ``gf`` and ``gz`` at
    rows ``io`` with stride ``io_rs``, the per-row cotangents ``gtr``, ``gkin``, ``gfrob`` at ``io`` (a global output
    or a per-program scratch slot). SECOND: the loss depends on the VJP outputs (trace / vjp / frob), so steps
    2-3 run. CONV: parameter gradients of the gate and time bias, and the gradient w.r.t. ``t``, accumulated
    directly (``dv_p`` rows ``[db, dgw, dgb, dbw, dt]`` per layer) rather than as ``[db, sbar, cbar]``.
    """
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    # ---- step 1: forward, storing a_l and h_l ----
    _fwd_layers(scr, x_ptr, x_rs, rmask, w_ptr, v_ptr, dims_ptr, t, w_ptr, D, rows64, rmask, D, L, P, BM, CH, CD, ACT,
                2, False, PREC)
    # ---- steps 2 + 3: VJP and its adjoint, once per probe ----
    if SECOND:
        for l in tl.static_range(L - 1):
            n_out = tl.load(dims_ptr + l + 1)
            for n0 in range(0, n_out, CH):
                cn = n0 + tl.arange(0, CH)
                tl.store(scr + (5 * L - 1 + l) * SL + r[:, None] * P + cn[None, :],
                         tl.zeros((BM, CH), dtype=w_ptr.dtype.element_ty))
        if MODE == 1:
            nprobe = 1
        else:
            nprobe = D
        for i in range(0, nprobe):
            # seed delta_{L-1} = e, alpha_{L-1} = e * s_{L-1}
            for n0 in range(0, D, CD):
                cn = n0 + tl.arange(0, CD)
                loc = r[:, None] * P + cn[None, :]
                b, s, c = _gate(v_ptr + (L - 1) * 4 * P, cn, t, P)
                ev = _probe(e_ptr, rows64, rmask, cn, D, i, MODE)
                tl.store(scr + (3 * L - 2) * SL + loc, ev)
                tl.store(scr + (4 * L - 2) * SL + loc, ev * s[None, :])
            tl.debug_barrier()
            for j in tl.static_range(L):
                _vjp_layer_bwd(scr, w_ptr, v_ptr, dims_ptr, t, L - 1 - j, L, P, BM, CH, CD, ACT, PREC)
                tl.debug_barrier()
            # rho_0 = gv + gtr * e + 2 * gfrob * vjp
            for k0 in range(0, D, CD):
                ck = k0 + tl.arange(0, CD)
                loc = r[:, None] * P + ck[None, :]
                m = rmask[:, None] & (ck < D)[None, :]
                rho = tl.zeros((BM, CD), dtype=w_ptr.dtype.element_ty)
                if HAS_GTR:
                    gtr = tl.load(gtr_ptr + io, mask=rmask, other=0.0)
                    rho += gtr[:, None] * _probe(e_ptr, rows64, rmask, ck, D, i, MODE)
                if MODE == 1:
                    if HAS_GV:
                        rho += tl.load(gv_ptr + rows64[:, None] * D + ck[None, :], mask=m, other=0.0)
                    if HAS_GFROB:
                        gfr = tl.load(gfrob_ptr + io, mask=rmask, other=0.0)
                        rho += 2.0 * gfr[:, None] * tl.load(scr + (4 * L - 1) * SL + loc)
                tl.store(scr + (6 * L - 2) * SL + loc, rho)
            tl.debug_barrier()
            for l in tl.static_range(L):
                _vjp_adj_layer(scr, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, t, ge_ptr, gtr_ptr, io, rows64,
                               rmask, D, l, L, P, BM, CH, CD, ACT, NEED_GE, HAS_GTR, CONV, PREC)
                tl.debug_barrier()
    else:
        if NEED_GE:
            # e enters only through the trace: dLoss/de = gtr * vjp (vjp = beta_0 is not computed here)
            for k0 in range(0, D, CD):
                ck = k0 + tl.arange(0, CD)
                tl.store(ge_ptr + rows64[:, None] * D + ck[None, :],
                         tl.zeros((BM, CD), dtype=w_ptr.dtype.element_ty),
                         mask=rmask[:, None] & (ck < D)[None, :])
    # ---- step 4: ubar_{L-1} = gf + 2 gkin f, then the ordinary backward pass ----
    for n0 in range(0, D, CD):
        cn = n0 + tl.arange(0, CD)
        loc = r[:, None] * P + cn[None, :]
        m = rmask[:, None] & (cn < D)[None, :]
        a = tl.load(scr + (2 * L - 2) * SL + loc)
        b, s, c = _gate(v_ptr + (L - 1) * 4 * P, cn, t, P)
        ubar = tl.zeros((BM, CD), dtype=w_ptr.dtype.element_ty)
        if HAS_GF:
            ubar += tl.load(gf_ptr + io[:, None] * io_rs + cn[None, :], mask=m, other=0.0)
        if HAS_GKIN:
            gk = tl.load(gkin_ptr + io, mask=rmask, other=0.0)
            ubar += tl.where(m, 2.0 * gk[:, None] * (a * s[None, :] + c[None, :]), 0.0)
        _vec_grads(dv_p + (L - 1) * (3 + 2 * CONV) * P, v_ptr + (L - 1) * 4 * P, cn, ubar, a, s, t, P, CONV)
        tl.store(scr + (6 * L + (L - 1) % 2) * SL + loc, ubar * s[None, :])
    tl.debug_barrier()
    for j in tl.static_range(L):
        _fwd_adj_layer(scr, x_ptr, x_rs, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, t, gz_ptr, io, io_rs, rmask, D,
                       L - 1 - j, L, P, BM, CH, CD, ACT, SECOND, CONV, PREC)
        tl.debug_barrier()


@triton.jit
def csq_bwd_kernel(t_ptr, z_ptr, e_ptr, w_ptr, v_ptr, dims_ptr,
                   gf_ptr, gv_ptr, gtr_ptr, gkin_ptr, gfrob_ptr,
                   gz_ptr, ge_ptr, dw_ptr, dv_ptr, scr_ptr,
                   B, D, n_tiles,
                   L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
                   BM: tl.constexpr, CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
                   HAS_GF: tl.constexpr, HAS_GV: tl.constexpr, HAS_GTR: tl.constexpr,
                   HAS_GKIN: tl.constexpr, HAS_GFROB: tl.constexpr, NEED_GE: tl.constexpr,
                   SECOND: tl.constexpr):
    """One persistent program per group of row tiles; each tile runs :func:`mlp_tile_backward`."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    SL: tl.constexpr = BM * P
    NS: tl.constexpr = 6 * L + 2
    scr = scr_ptr + pid.to(tl.int64) * (NS * SL)
    dw_p = dw_ptr + pid.to(tl.int64) * (L * P * P)
    dv_p = dv_ptr + pid.to(tl.int64) * (L * 3 * P)
    t = tl.load(t_ptr)
    r = tl.arange(0, BM)
    for tile in range(pid, n_tiles, nprog):
        rows = tile * BM + r
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        z_tile = z_ptr + tl.cast(tile, tl.int64) * BM * D
        mlp_tile_backward(scr, z_tile, D, rows64, rmask, rows64, D, e_ptr, gf_ptr, gv_ptr, gtr_ptr, gkin_ptr,
                          gfrob_ptr, gz_ptr, ge_ptr, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, D, t, L, P, ACT, MODE, BM,
                          CH, CD, PREC, HAS_GF, HAS_GV, HAS_GTR, HAS_GKIN, HAS_GFROB, NEED_GE, SECOND, 0)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_config(D: int, widths, dtype=torch.float32) -> dict:
    """Tile sizes: BM rows per tile, CH hidden chunk, CD chunk of the D-wide side (all >= 16).

    BM=32/CH=32 keeps the float32 kernels at <= 168 registers with (almost) no spills on sm_90
    (bench/results/kernels_sm90_registers.json; BM=64/CH=64 spills ~16 KB in the backward); float64
    needs twice the registers per value, hence BM=16.
    """
    CH = 32 if max(widths) > 16 else 16
    CD = min(max(16, _next_pow2(D)), CH)
    return {"BM": 16 if dtype == torch.float64 else 32, "CH": CH, "CD": CD}


class PackedParams:
    """Zero-padded parameter buffers of a concatsquash MLP (see module docstring)."""

    def __init__(self, params, CH: int, CD: int):
        W0 = params[0][0]
        self.L = len(params)
        self.D = W0.shape[1]
        widths = [W0.shape[1]] + [p[0].shape[0] for p in params]
        self.widths = widths
        P = max(16, *(math.ceil(w / CD) * CD if i in (0, self.L) else math.ceil(w / CH) * CH
                      for i, w in enumerate(widths)))
        self.P = P
        self.CH, self.CD = CH, CD
        dev, dt = W0.device, W0.dtype
        with torch.no_grad():
            W = torch.zeros(self.L, P, P, dtype=dt, device=dev)
            V = torch.zeros(self.L, 4, P, dtype=dt, device=dev)
            for l, (w, b, gw, gb, bw) in enumerate(params):
                o, i = w.shape
                W[l, :o, :i] = w
                V[l, 0, :o] = b
                V[l, 1, :o] = gw
                V[l, 2, :o] = gb
                V[l, 3, :o] = bw
        self.W, self.V = W, V
        self.dims = torch.tensor(widths, dtype=torch.int32, device=dev)


def _grid(n_tiles: int, device, max_progs):
    cap = max_programs(device) if max_progs is None else max_progs
    return max(1, min(n_tiles, cap))


def concatsquash_fwd(t, z, e, packed: PackedParams, activation: str, mode: int, BM=32, max_progs=None,
                     num_warps=4):
    """Launch the forward kernel. Returns ``(f, vjp, trace, kinetic, frob)`` (entries unused by ``mode`` are None)."""
    B, D = z.shape
    L, P = packed.L, packed.P
    n_tiles = triton.cdiv(B, BM)
    nprog = _grid(n_tiles, z.device, max_progs)
    f = _empty((B, D), z)
    kin = _empty((B,), z)
    vjp = _empty((B, D), z) if mode == MODE_HUTCH else None
    tr = _empty((B,), z) if mode != MODE_F else None
    fr = _empty((B,), z) if mode != MODE_F else None
    scr = _empty((nprog, 2 * L + 1, BM, P), z)
    e_arg = e if e is not None else z
    launched("csq_fwd_kernel")
    csq_fwd_kernel[(nprog,)](
        t, z, e_arg, packed.W, packed.V, packed.dims,
        f, vjp if vjp is not None else f, tr if tr is not None else kin, kin, fr if fr is not None else kin, scr,
        B, D, n_tiles,
        L=L, P=P, ACT=ACT_CODES[activation], MODE=mode, BM=BM, CH=packed.CH, CD=packed.CD,
        PREC=DOT_PRECISION, num_warps=num_warps,
    )
    return f, vjp, tr, kin, fr


def concatsquash_bwd(t, z, e, packed: PackedParams, activation: str, mode: int, gf=None, gv=None, gtr=None,
                     gkin=None, gfrob=None, need_ge=False, BM=32, max_progs=None, num_warps=4):
    """Launch the backward kernel. Returns ``(gz, ge, dW (L, P, P), dV (L, 3, P))``.

    ``dV[:, 0]`` = dLoss/db, ``dV[:, 1]`` = dLoss/ds (gate output), ``dV[:, 2]`` = dLoss/dc (time bias);
    per-program partials are reduced here in a fixed order.
    """
    B, D = z.shape
    L, P = packed.L, packed.P
    n_tiles = triton.cdiv(B, BM)
    nprog = _grid(n_tiles, z.device, max_progs)
    gz = _empty((B, D), z)
    ge = _empty((B, D), z) if need_ge else None
    dw = torch.zeros((nprog, L, P, P), dtype=z.dtype, device=z.device)
    dv = torch.zeros((nprog, L, 3, P), dtype=z.dtype, device=z.device)
    scr = _empty((nprog, 6 * L + 2, BM, P), z)
    if mode != MODE_HUTCH:
        gv = gfrob = None
    if mode == MODE_F:
        gtr = None
    dummy = z
    second = (mode != MODE_F and gtr is not None) or (mode == MODE_HUTCH and (gv is not None or gfrob is not None))
    launched("csq_bwd_kernel")
    csq_bwd_kernel[(nprog,)](
        t, z, e if e is not None else dummy, packed.W, packed.V, packed.dims,
        gf if gf is not None else dummy, gv if gv is not None else dummy, gtr if gtr is not None else dummy,
        gkin if gkin is not None else dummy, gfrob if gfrob is not None else dummy,
        gz, ge if ge is not None else gz, dw, dv, scr,
        B, D, n_tiles,
        L=L, P=P, ACT=ACT_CODES[activation], MODE=mode, BM=BM, CH=packed.CH, CD=packed.CD, PREC=DOT_PRECISION,
        HAS_GF=gf is not None, HAS_GV=gv is not None, HAS_GTR=gtr is not None, HAS_GKIN=gkin is not None,
        HAS_GFROB=gfrob is not None, NEED_GE=need_ge,
        SECOND=second, num_warps=num_warps,
    )
    # fixed-order reduction of the per-program partials (deterministic; no atomics)
    return gz, ge, dw.sum(0), dv.sum(0)
