"""Fused CNF Runge-Kutta step kernels: every stage's concatsquash MLP and trace, the step's end, its error norm and
(adaptive) the step-size controller, in one launch.

The augmented state is ``z`` (B, D) and ``q`` (B, NQ): the log-density change and the regulariser integrals. Their
rates per stage are ``f`` (the MLP) and, per ``q`` column, a rate code of ``RATES``: 0 ``-trace``, 2 kinetic
``|f|^2``, 3 Jacobian-Frobenius ``|e^T J|^2`` (the codes of the C++ stepper).

Kernel layout
-------------
* One persistent program per group of row tiles (``BM`` rows); each tile runs all ``S`` stages with the stage
  inputs and derivatives in the program's scratch slots (``BM x P`` each; they stay in L1/L2): the MLP of
  :func:`fastode.kernels.concatsquash.mlp_tile_forward`, then the stage combination ``z + sum_j k_j fl(a_ij dt)``
  (torchdiffeq's rounding), then the end ``z1 = z0 + sum_i k_i fl(b_i dt)``, the error ``sum_i k_i fl(e_i dt)``,
  the midpoint ``z0 + sum_i k_i fl(cmid_i dt)`` (torchdiffeq's quartic interpolant needs it) and the FSAL stage.
* Tableau coefficients are ``constexpr`` tuples from :mod:`fastode.tableaus` (through the launcher); zero ones
  skip their loads. Nothing here writes a coefficient down.
* Batch-global step control (torchdiffeq's semantics): each program writes its partial sums of squared error
  ratios (float64, NaN kept: sums propagate NaN, unlike ``tl.max``); the last program to arrive (an atomic ticket)
  reduces them in a fixed order -- deterministic -- into the CNF's norm ``max(RMS_z, RMS_q[:NQN])`` and runs the
  controller of :mod:`fastode.solvers.controller` on the device: accept/reject, the next step, the clock, counts,
  status, the accepted step's time and size, and the next attempt's ``t0, dt``. The state is double-buffered
  (slot ``cur`` holds the step start, ``1 - cur`` the candidate; acceptance flips ``cur``), so a launch never
  reads what it writes, and a launch after the end (``done``) does nothing: the host can queue launches without
  reading anything back.
* Fixed grid (``ADAPTIVE=False``): step ``i`` of a device grid, buffers by ``i % 2``; no controller, no ticket.
* The controller (:func:`prepare_attempt`, ``_control``) reads and writes a control block in memory, so a per-tile
  solve (one block per tile, a loop of attempts inside one persistent launch) can reuse it as it is.

Control block ``ctl`` (float64, indices ``C_*``) and options ``opt`` (float64, indices ``O_*``) are device
tensors; the launcher (:mod:`fastode.kernels.cnf_solve`) builds them, the solve driver
(:mod:`fastode.flows.fused.triton_solve`) reads them back.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastode.codes import RATE_CODES, Status

from .concatsquash import mlp_tile_backward, mlp_tile_forward

# control block fields (float64)
C_TAU = tl.constexpr(0)         # the integration variable tau = dir * t (rounded as the time dtype)
C_DTP = tl.constexpr(1)         # the proposed step size (unsigned)
C_TAUP = tl.constexpr(2)        # tau at the start of the last accepted step
C_HP = tl.constexpr(3)          # the last accepted step's size (state-rounded, unsigned)
C_TNEW = tl.constexpr(4)        # tau at the end of the current attempt
C_H = tl.constexpr(5)           # the current attempt's size (clamped, unsigned)
C_T0 = tl.constexpr(6)          # the current attempt's start time t (signed)
C_DT = tl.constexpr(7)          # the current attempt's step in t (signed, state-rounded)
C_CUR = tl.constexpr(8)         # buffer slot of the step start
C_DONE = tl.constexpr(9)        # 1: the solve has ended (success or failure); launches are no-ops
C_STATUS = tl.constexpr(10)     # a fastode.codes.Status: 0 solved, else why the solve stopped
C_TSTAT = tl.constexpr(11)      # t where the solve stopped (status != 0)
C_ATT = tl.constexpr(12)        # attempts (max_num_steps counts these)
C_ACC = tl.constexpr(13)        # accepted steps
C_REJ = tl.constexpr(14)        # rejected steps
C_NFE = tl.constexpr(15)        # network evaluations
C_TEND = tl.constexpr(16)       # tau at the end time
C_DIR = tl.constexpr(17)        # +1 / -1: direction of time
C_SEEN = tl.constexpr(18)       # a non-finite attempt since the last acceptance (an underflow then is NaN/inf)
C_RATIO = tl.constexpr(19)      # the last attempt's error ratio
NCTL = tl.constexpr(20)

# options (float64)
O_RTOL = tl.constexpr(0)
O_ATOL = tl.constexpr(1)
O_SAFETY = tl.constexpr(2)
O_IFACTOR = tl.constexpr(3)
O_DFACTOR = tl.constexpr(4)
O_MIN = tl.constexpr(5)
O_MAX = tl.constexpr(6)
O_MAXN = tl.constexpr(7)

# the rate codes (fastode.codes.RATE_CODES; the last one, jac_frob, is each branch's else)
RATE_NEG_TRACE = tl.constexpr(RATE_CODES["-trace"])
RATE_TRACE = tl.constexpr(RATE_CODES["trace"])
RATE_KINETIC = tl.constexpr(RATE_CODES["kinetic"])

# the status codes (fastode.codes.Status), as float constexprs: the control block is float64
ST_MAX_STEPS = tl.constexpr(float(Status.MAX_STEPS))
ST_UNDERFLOW = tl.constexpr(float(Status.UNDERFLOW))
ST_NONFINITE = tl.constexpr(float(Status.NONFINITE))
ST_TAPE_FULL = tl.constexpr(float(Status.TAPE_FULL))


# ------------------------------------------------------------------------------------------------
# the controller (scalars, float64): fastode.solvers.controller.IntegralController on the device
# ------------------------------------------------------------------------------------------------
@triton.jit
def _round_time(x, TIME_F32: tl.constexpr):
    """A time as the host loop holds it: float64, rounded to float32 for a float32 time tensor."""
    if TIME_F32:
        x = x.to(tl.float32).to(tl.float64)
    return x


@triton.jit
def _finite(x):
    return (x - x) == 0.0  # False for NaN and +-inf


@triton.jit
def _factor(r, safety, ifactor, dfactor, ORDER: tl.constexpr):
    """IntegralController.factor: safety / r^(1/order) limited to [1 or dfactor, ifactor]; NaN / inf / 0 cases."""
    fin = _finite(r)
    safe = tl.where(fin & (r > 0.0), r, 1.0)
    lower = tl.where(r < 1.0, 1.0, dfactor)
    f = tl.minimum(tl.maximum(safety / tl.exp(tl.log(safe) / ORDER), lower), ifactor)
    f = tl.where(r == 0.0, ifactor, f)
    f = tl.where((r == r) & (fin == 0), tl.minimum(ifactor, tl.maximum(0.0, dfactor)), f)
    return tl.where(r != r, tl.minimum(dfactor, 1.0), f)


@triton.jit
def _initial_trial_step(d0, d1):
    """fastode.ops.rk.initial_step's trial step h0 from d0 = |y0/s| and d1 = |f0/s| (the C++ initial_trial_step)."""
    return tl.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)


@triton.jit
def _initial_step_size(h0, d1, d2, ORDER: tl.constexpr):
    """fastode.ops.rk.initial_step's proposed first step min(100 h0, h1) in h0's dtype, from d1 and
    d2 = |(f1 - f0)/s| / h0 (the C++ initial_step_size; ORDER: the tableau's order, exponent 1/ORDER)."""
    h1 = tl.where((d1 <= 1e-15) & (d2 <= 1e-15), tl.maximum(h0 * 1e-3, 1e-6),
                  tl.exp(tl.log(0.01 / tl.maximum(d1, d2)) / ORDER))
    return tl.minimum(100.0 * h0, tl.abs(h1).to(h0.dtype))


@triton.jit
def _state_round(x, DT_DTYPE: tl.constexpr):
    return x.to(DT_DTYPE).to(tl.float64)


@triton.jit
def prepare_attempt(ctl, opt, TIME_F32: tl.constexpr, DT_DTYPE: tl.constexpr):
    """Set up the next attempt (or end the solve): odeint's checks before a step -- the end time reached, then
    max_num_steps, then the step-size underflow -- and the attempt's ``h``, ``t0``, ``dt``."""
    tau = tl.load(ctl + C_TAU)
    tend = tl.load(ctl + C_TEND)
    att = tl.load(ctl + C_ATT)
    dtp = tl.load(ctl + C_DTP)
    dirn = tl.load(ctl + C_DIR)
    seen = tl.load(ctl + C_SEEN)
    mn = tl.load(opt + O_MIN)
    mx = tl.load(opt + O_MAX)
    h = tl.where(_finite(dtp), dtp, mn)
    h = tl.minimum(tl.maximum(h, mn), mx)
    tnew = _round_time(tau + h, TIME_F32)
    running = tend > tau
    over = running & (att >= tl.load(opt + O_MAXN))
    under = running & (over == 0) & ((tnew > tau) == 0)
    # an underflow after a non-finite attempt, or from a non-finite proposed step (only the first step's heuristic
    # gives one: its norms of a NaN/inf state or slope), is NaN/inf, as odeint reports it
    nonfinite = (seen > 0.0) | (_finite(dtp) == 0)
    status = tl.where(over, ST_MAX_STEPS, tl.where(under, tl.where(nonfinite, ST_NONFINITE, ST_UNDERFLOW), 0.0))
    go = running & (status == 0.0)
    hs = _state_round(h, DT_DTYPE)
    tl.store(ctl + C_H, h)
    tl.store(ctl + C_TNEW, tnew)
    tl.store(ctl + C_T0, dirn * tau)
    tl.store(ctl + C_DT, dirn * hs)
    tl.store(ctl + C_STATUS, status)
    tl.store(ctl + C_TSTAT, dirn * tau)
    tl.store(ctl + C_DONE, tl.where(go, 0.0, 1.0))


@triton.jit
def _control(ctl, opt, ratio, steps_t, steps_dt, steps_h, cap, NFE_PER: tl.constexpr, ORDER: tl.constexpr,
             TIME_F32: tl.constexpr, DT_DTYPE: tl.constexpr):
    """After an attempt with error ratio ``ratio``: IntegralController.adapt, the bookkeeping of
    fastode.solvers.rk_adaptive._adaptive_step (counts, the clock, the accepted step's record), then
    :func:`prepare_attempt`."""
    h = tl.load(ctl + C_H)
    mn = tl.load(opt + O_MIN)
    mx = tl.load(opt + O_MAX)
    fin = _finite(ratio)
    accept = (ratio <= 1.0) & (h <= mx)
    accept = accept | (h <= mn)
    f = _factor(ratio, tl.load(opt + O_SAFETY), tl.load(opt + O_IFACTOR), tl.load(opt + O_DFACTOR), ORDER)
    dt_next = tl.minimum(tl.maximum(h * f, mn), mx)
    forced_nan = (h <= mn) & (fin == 0)
    tau = tl.load(ctl + C_TAU)
    dirn = tl.load(ctl + C_DIR)
    acc = tl.load(ctl + C_ACC)
    cur = tl.load(ctl + C_CUR)
    tnew = tl.load(ctl + C_TNEW)
    # the accepted step's record (the stats' step_ts / step_sizes, the backward's tape)
    slot = acc.to(tl.int64)
    ok = accept & (forced_nan == 0)
    tl.store(steps_t + slot, dirn * tau, mask=ok & (slot < cap))
    tl.store(steps_dt + slot, dirn * (tnew - tau), mask=ok & (slot < cap))
    tl.store(steps_h + slot, tl.load(ctl + C_DT), mask=ok & (slot < cap))  # the step the kernel took (signed)
    tl.store(ctl + C_RATIO, ratio)
    tl.store(ctl + C_ATT, tl.load(ctl + C_ATT) + 1.0)
    tl.store(ctl + C_NFE, tl.load(ctl + C_NFE) + NFE_PER)
    tl.store(ctl + C_ACC, tl.where(ok, acc + 1.0, acc))
    tl.store(ctl + C_REJ, tl.load(ctl + C_REJ) + tl.where(accept, 0.0, 1.0))
    tl.store(ctl + C_TAUP, tl.where(ok, tau, tl.load(ctl + C_TAUP)))
    tl.store(ctl + C_HP, tl.where(ok, _state_round(h, DT_DTYPE), tl.load(ctl + C_HP)))
    tl.store(ctl + C_TAU, tl.where(ok, tnew, tau))
    tl.store(ctl + C_CUR, tl.where(ok, 1.0 - cur, cur))
    tl.store(ctl + C_SEEN, tl.where(ok, 0.0, tl.where(fin, tl.load(ctl + C_SEEN), 1.0)))
    tl.store(ctl + C_DTP, dt_next)
    if forced_nan:  # odeint: NonFiniteError when dt <= min_step and the ratio is not finite
        tl.store(ctl + C_STATUS, ST_NONFINITE)
        tl.store(ctl + C_TSTAT, dirn * tau)
        tl.store(ctl + C_DONE, 1.0)
    else:
        prepare_attempt(ctl, opt, TIME_F32, DT_DTYPE)


@triton.jit
def _mixed_norm(sz, sq, B, D, NQN: tl.constexpr):
    """The CNF's norm from sums of squares: max(RMS of z, RMS of the first NQN q columns), NaN-propagating."""
    r = tl.sqrt(sz / (tl.cast(B, tl.float64) * D))
    if NQN > 0:
        rq = tl.sqrt(sq / (tl.cast(B, tl.float64) * NQN))
        r = tl.where((rq > r) | (rq != rq), rq, r)
    return r


# ------------------------------------------------------------------------------------------------
# one step of one tile
# ------------------------------------------------------------------------------------------------
@triton.jit
def _rate(kin, tr, fr, code: tl.constexpr):
    if code == RATE_NEG_TRACE:
        v = -tr
    elif code == RATE_TRACE:
        v = tr
    elif code == RATE_KINETIC:
        v = kin
    else:
        v = fr
    return v


@triton.jit
def _tile_step(z0_ptr, q0_ptr, f0_ptr, fq0_ptr, z1_ptr, q1_ptr, f1_ptr, fq1_ptr, mid_ptr, midq_ptr,
               e_ptr, w_ptr, v_ptr, dims_ptr, scr, rows, rmask, B, D, t0, dt, rtol, atol,
               L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
               CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
               S: tl.constexpr, C: tl.constexpr, A: tl.constexpr, BW: tl.constexpr, EW: tl.constexpr,
               CM: tl.constexpr, FSAL: tl.constexpr, ADAPTIVE: tl.constexpr, RATES: tl.constexpr,
               NQ: tl.constexpr, NQN: tl.constexpr, TIME_F32: tl.constexpr):
    """All stages and the end of one step of one tile (rows ``rows``; global pointers are the tile's slots).

    Returns the tile's sums of squared error ratios ``(sz, sq)`` (float64; zero without ``ADAPTIVE``).
    Scratch: the MLP's 2L+1 slots, then the stage input, then S stage derivatives (BM x P each), then S x NQ
    per-row q rates (BM each).
    """
    SL: tl.constexpr = BM * P
    dtype = w_ptr.dtype.element_ty
    r = tl.arange(0, BM)
    allr = r < BM
    rows64 = rows.to(tl.int64)
    # torchdiffeq's rounding (fastode.ops.rk.combine_stages_exact): weights fl(c) * fl(dt) in the state dtype,
    # products summed in stage order
    dts = dt.to(dtype)
    zin = scr + (2 * L + 1) * SL
    kz = zin + SL
    kq = kz + S * SL
    for i in tl.static_range(S):
        if i == 0 and FSAL:
            # k_0 = f(t0, z0): the previous step's last stage (or the first evaluation)
            for n0 in range(0, D, CD):
                cn = n0 + tl.arange(0, CD)
                m = rmask[:, None] & (cn < D)[None, :]
                k = tl.load(f0_ptr + rows64[:, None] * D + cn[None, :], mask=m, other=0.0)
                tl.store(kz + r[:, None] * P + cn[None, :], k)
            for j in tl.static_range(NQ):
                tl.store(kq + j * BM + r, tl.load(fq0_ptr + rows64 * NQ + j, mask=rmask, other=0.0))
        else:
            for n0 in range(0, D, CD):
                cn = n0 + tl.arange(0, CD)
                m = rmask[:, None] & (cn < D)[None, :]
                acc = tl.zeros((BM, CD), dtype=dtype)
                for j in tl.static_range(i):
                    if A[i * S + j] != 0.0:
                        kj = tl.load(kz + j * SL + r[:, None] * P + cn[None, :], mask=m, other=0.0)
                        acc += kj * (dts * A[i * S + j])
                y = tl.load(z0_ptr + rows64[:, None] * D + cn[None, :], mask=m, other=0.0) + acc
                tl.store(zin + r[:, None] * P + cn[None, :], tl.where(m, y, 0.0))
            tl.debug_barrier()
            ti = _round_time(t0 + C[i] * dt, TIME_F32).to(dtype)
            kin, tr, fr = mlp_tile_forward(scr, zin, P, allr, kz + i * SL, P, r.to(tl.int64), rows64, rmask, e_ptr,
                                           e_ptr, w_ptr, v_ptr, dims_ptr, D, ti, L, P, ACT, MODE, BM, CH, CD,
                                           False, PREC)
            for j in tl.static_range(NQ):
                tl.store(kq + (i * NQ + j) * BM + r, _rate(kin, tr, fr, RATES[j]))
        tl.debug_barrier()
    # ---- the step's end, error, midpoint and FSAL stage
    sz = tl.zeros((BM,), dtype=tl.float64)
    sq = tl.zeros((BM,), dtype=tl.float64)
    for n0 in range(0, D, CD):
        cn = n0 + tl.arange(0, CD)
        m = rmask[:, None] & (cn < D)[None, :]
        g = rows64[:, None] * D + cn[None, :]
        y0 = tl.load(z0_ptr + g, mask=m, other=0.0)
        sb = tl.zeros((BM, CD), dtype=dtype)
        se = tl.zeros((BM, CD), dtype=dtype)
        sm = tl.zeros((BM, CD), dtype=dtype)
        for j in tl.static_range(S):
            if BW[j] != 0.0 or EW[j] != 0.0 or CM[j] != 0.0 or (j == S - 1):
                kj = tl.load(kz + j * SL + r[:, None] * P + cn[None, :], mask=m, other=0.0)
                if BW[j] != 0.0:
                    sb += kj * (dts * BW[j])
                if EW[j] != 0.0:
                    se += kj * (dts * EW[j])
                if CM[j] != 0.0:
                    sm += kj * (dts * CM[j])
                if ADAPTIVE and (j == S - 1):
                    tl.store(f1_ptr + g, kj, mask=m)
        y1 = y0 + sb
        tl.store(z1_ptr + g, y1, mask=m)
        if ADAPTIVE:
            tl.store(mid_ptr + g, y0 + sm, mask=m)
            tol = atol + rtol * tl.maximum(tl.abs(y0), tl.abs(y1))
            ratio = tl.where(m, se / tol, 0.0).to(tl.float64)
            sz += tl.sum(ratio * ratio, axis=1)
    for j in tl.static_range(NQ):
        y0 = tl.load(q0_ptr + rows64 * NQ + j, mask=rmask, other=0.0)
        sb = tl.zeros((BM,), dtype=dtype)
        se = tl.zeros((BM,), dtype=dtype)
        sm = tl.zeros((BM,), dtype=dtype)
        for i in tl.static_range(S):
            ki = tl.load(kq + (i * NQ + j) * BM + r)
            if BW[i] != 0.0:
                sb += ki * (dts * BW[i])
            if EW[i] != 0.0:
                se += ki * (dts * EW[i])
            if CM[i] != 0.0:
                sm += ki * (dts * CM[i])
            if ADAPTIVE and (i == S - 1):
                tl.store(fq1_ptr + rows64 * NQ + j, ki, mask=rmask)
        y1 = y0 + sb
        tl.store(q1_ptr + rows64 * NQ + j, y1, mask=rmask)
        if ADAPTIVE:
            tl.store(midq_ptr + rows64 * NQ + j, y0 + sm, mask=rmask)
            if j < NQN:
                tol = atol + rtol * tl.maximum(tl.abs(y0), tl.abs(y1))
                ratio = tl.where(rmask, se / tol, 0.0).to(tl.float64)
                sq += ratio * ratio
    tl.debug_barrier()
    return tl.sum(sz, axis=0), tl.sum(sq, axis=0)


@triton.jit
def _checkpoint_start(dst, src, rows64, rmask, D, CD: tl.constexpr):
    """Copy the attempt's start rows (``src``, a state slot) to the tape slot ``dst`` (kept if it is accepted)."""
    for n0 in range(0, D, CD):
        cn = n0 + tl.arange(0, CD)
        m = rmask[:, None] & (cn < D)[None, :]
        g = rows64[:, None] * D + cn[None, :]
        tl.store(dst + g, tl.load(src + g, mask=m), mask=m)


# ------------------------------------------------------------------------------------------------
# batch-global step (adaptive: with the controller) and fixed-grid step
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["cap", "step_i", "B", "D", "n_tiles"])
def cnf_step_kernel(z_ptr, q_ptr, f_ptr, fq_ptr, mid_ptr, midq_ptr, e_ptr, w_ptr, v_ptr, dims_ptr,
                    ctl, opt, part_ptr, cnt_ptr, steps_t, steps_dt, steps_h, cap, grid_ptr, step_i, tape_ptr, scr_ptr,
                    B, D, n_tiles,
                    L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                    CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
                    S: tl.constexpr, C: tl.constexpr, A: tl.constexpr, BW: tl.constexpr, EW: tl.constexpr,
                    CM: tl.constexpr, FSAL: tl.constexpr, ADAPTIVE: tl.constexpr, RATES: tl.constexpr,
                    NQ: tl.constexpr, NQN: tl.constexpr, ORDER: tl.constexpr, TIME_F32: tl.constexpr,
                    TAPE: tl.constexpr):
    """One step attempt of the whole batch. State buffers are ``(2, B, ...)``: slot ``cur`` is read, ``1 - cur``
    written. Adaptive: ``t0, dt, cur`` from ``ctl``, the last program runs the controller; ``TAPE``: the attempt's
    start ``z`` is written to ``tape_ptr[accepted]`` (the backward's checkpoint of the step, kept if it is accepted).
    Fixed grid: step ``step_i`` of ``grid_ptr`` (float64 times); ``TAPE``: the state buffer holds every step
    (``(n + 1, B, D)``: read ``step_i``, write ``step_i + 1``), else ``cur = step_i % 2``."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dtype = w_ptr.dtype.element_ty
    SL: tl.constexpr = BM * P
    NS: tl.constexpr = (2 * L + 2 + S) * SL + S * NQ * BM
    scr = scr_ptr + pid.to(tl.int64) * NS
    if ADAPTIVE:
        done = tl.load(ctl + C_DONE)
        cur = tl.load(ctl + C_CUR).to(tl.int64)
        t0 = tl.load(ctl + C_T0)
        dt = tl.load(ctl + C_DT)
        rtol = tl.load(opt + O_RTOL).to(dtype)
        atol = tl.load(opt + O_ATOL).to(dtype)
    else:
        done = 0.0
        if TAPE:
            cur = tl.cast(step_i, tl.int64)
        else:
            cur = tl.cast(step_i % 2, tl.int64)
        t0 = tl.load(grid_ptr + step_i)
        dt = _round_time(tl.load(grid_ptr + step_i + 1) - t0, TIME_F32)
        rtol = tl.zeros((), dtype=dtype)
        atol = tl.zeros((), dtype=dtype) + 1.0
    if done == 0.0:
        if ADAPTIVE or (TAPE == 0):
            nxt = 1 - cur
        else:
            nxt = cur + 1
        BD = tl.cast(B, tl.int64) * D
        BQ = tl.cast(B, tl.int64) * NQ
        psz = tl.zeros((), dtype=tl.float64)
        psq = tl.zeros((), dtype=tl.float64)
        for tile in range(pid, n_tiles, nprog):
            rows = tile * BM + tl.arange(0, BM)
            rmask = rows < B
            if ADAPTIVE and TAPE:
                _checkpoint_start(tape_ptr + tl.load(ctl + C_ACC).to(tl.int64) * BD, z_ptr + cur * BD,
                                  rows.to(tl.int64), rmask, D, CD)
            sz, sq = _tile_step(z_ptr + cur * BD, q_ptr + cur * BQ, f_ptr + cur * BD, fq_ptr + cur * BQ,
                                z_ptr + nxt * BD, q_ptr + nxt * BQ, f_ptr + nxt * BD, fq_ptr + nxt * BQ,
                                mid_ptr + nxt * BD, midq_ptr + nxt * BQ, e_ptr, w_ptr, v_ptr, dims_ptr, scr, rows,
                                rmask, B, D, t0, dt, rtol, atol, L, P, ACT, MODE, BM, CH, CD, PREC, S, C, A, BW,
                                EW, CM, FSAL, ADAPTIVE, RATES, NQ, NQN, TIME_F32)
            psz += sz
            psq += sq
        if ADAPTIVE:
            tl.store(part_ptr + 2 * pid, psz)
            tl.store(part_ptr + 2 * pid + 1, psq)
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
            if ticket == nprog - 1:
                # the last program: fixed-order reduction of every program's partials (L2 reads), the controller
                tz = tl.zeros((), dtype=tl.float64)
                tq = tl.zeros((), dtype=tl.float64)
                for p in range(0, nprog):
                    tz += tl.load(part_ptr + 2 * p, cache_modifier=".cg")
                    tq += tl.load(part_ptr + 2 * p + 1, cache_modifier=".cg")
                ratio = _mixed_norm(tz, tq, B, D, NQN)
                _control(ctl, opt, ratio, steps_t, steps_dt, steps_h, cap, S - 1, ORDER, TIME_F32, dtype)
                tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def cnf_prepare_kernel(ctl, opt, like_ptr, TIME_F32: tl.constexpr):
    """One program: the first attempt's set-up (after the first step size is on the device); ``like_ptr``: a
    tensor of the state's dtype (the step is rounded to it)."""
    prepare_attempt(ctl, opt, TIME_F32, like_ptr.dtype.element_ty)


# ------------------------------------------------------------------------------------------------
# the backward of one step (the fused discrete adjoint)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _rows_flag(flag, rows64):
    """A scalar condition as a per-row mask (masks combine element-wise, in the interpreter too)."""
    return (rows64 * 0 + flag.to(tl.int64)) != 0


@triton.jit
def _stage_adjoint(i, seed, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr, t0, dt, dts_, gz1_ptr, gq1_ptr,
                   sk_ptr, skq_ptr, dw_p, dv_p, scr, zin, gzs, kb, gq, rows64, rmask, BD, BQ, D, seed_on,
                   L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                   CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, RATES: tl.constexpr,
                   NQ: tl.constexpr, HAS_SEED: tl.constexpr, HAS_TR: tl.constexpr, HAS_KIN: tl.constexpr,
                   HAS_FR: tl.constexpr, TIME_F32: tl.constexpr):
    """Stage ``i`` (a runtime index) of a step's adjoint: ``kbar_i = fl(b_i) fl(dt) gz1 [+ seed_i] + sum_{j>i}
    fl(a_ji) fl(dt) Zbar_j`` over the stages ``j`` that ran, and ``qbar_i``, through the MLP's backward at
    ``(t_i, Z_i)`` to ``Zbar_i`` (slot ``i`` of ``gzs``). ``seed``: the per-row mask of the seeded (last) step."""
    dtype = w_ptr.dtype.element_ty
    SL: tl.constexpr = BM * P
    r = tl.arange(0, BM)
    rl = r.to(tl.int64)
    b_i = tl.load(tab_ptr + S + S * S + i)
    wb = dts_ * b_i.to(dtype)  # the forward's weight fl(b_i) * fl(dt)
    for n0 in range(0, D, CD):
        cn = n0 + tl.arange(0, CD)
        m = rmask[:, None] & (cn < D)[None, :]
        g = rows64[:, None] * D + cn[None, :]
        kbar = tl.load(gz1_ptr + g, mask=m, other=0.0) * wb
        if HAS_SEED:
            kbar += tl.load(sk_ptr + i * BD + g, mask=m & seed[:, None], other=0.0)
        for j in range(i + 1, S):
            a_ji = tl.load(tab_ptr + S + j * S + i)
            ran = (tl.load(needs_ptr + j) != 0) | ((tl.load(needs_ptr + S + j) != 0) & seed_on)
            kbar += tl.load(gzs + j * SL + r[:, None] * P + cn[None, :],
                            mask=m & _rows_flag(ran & (a_ji != 0.0), rows64)[:, None], other=0.0) * (dts_ * a_ji.to(dtype))
        tl.store(kb + r[:, None] * P + cn[None, :], tl.where(m, kbar, 0.0))
    gtr = tl.zeros((BM,), dtype=dtype)
    gkin = tl.zeros((BM,), dtype=dtype)
    gfr = tl.zeros((BM,), dtype=dtype)
    for c in tl.static_range(NQ):
        qbar = tl.load(gq1_ptr + rows64 * NQ + c, mask=rmask, other=0.0) * wb
        if HAS_SEED:
            qbar += tl.load(skq_ptr + i * BQ + rows64 * NQ + c, mask=rmask & seed, other=0.0)
        if RATES[c] == RATE_NEG_TRACE:
            gtr -= qbar
        elif RATES[c] == RATE_TRACE:
            gtr += qbar
        elif RATES[c] == RATE_KINETIC:
            gkin += qbar
        else:
            gfr += qbar
    tl.store(gq + r, gtr)
    tl.store(gq + BM + r, gkin)
    tl.store(gq + 2 * BM + r, gfr)
    tl.debug_barrier()
    ti = _round_time(t0 + tl.load(tab_ptr + i) * dt, TIME_F32).to(dtype)
    mlp_tile_backward(scr, zin + i * SL, P, rows64, rmask, rl, P, e_ptr, kb, kb, gq, gq + BM, gq + 2 * BM,
                      gzs + i * SL, kb, w_ptr, v_ptr, dims_ptr, dw_p, dv_p, D, ti, L, P, ACT, MODE, BM, CH, CD, PREC,
                      True, False, HAS_TR and (MODE > 0), HAS_KIN, HAS_FR and (MODE == 1), False,
                      (MODE > 0) and (HAS_TR or HAS_FR), 1)
    tl.debug_barrier()


@triton.jit
def _tile_step_bwd(z0_ptr, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr, t0, dt, seed_on, gz1_ptr, gq1_ptr,
                   sk_ptr, skq_ptr, gzx_ptr, gz0_ptr, dw_p, dv_p, scr, rows, rmask, B, D,
                   L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                   CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, RATES: tl.constexpr,
                   NQ: tl.constexpr, HAS_SEED: tl.constexpr, HAS_TR: tl.constexpr, HAS_KIN: tl.constexpr,
                   HAS_FR: tl.constexpr, TIME_F32: tl.constexpr):
    """The exact backward of one step of one tile (start ``z0_ptr``, time ``t0``, step ``dt``; rows ``rows``):
    the stages are recomputed on chip from the checkpointed start, then walked in reverse:
    ``kbar_i = fl(b_i dt) gz1 [+ seed_i] + sum_{j>i} fl(a_ji dt) Zbar_j`` and ``qbar_i = fl(b_i dt) gq1 [+ seed_i]``
    go through the MLP's backward at ``(t_i, Z_i)`` (second-order terms of the trace / RNODE rates included) to
    ``Zbar_i``; ``gz0 = gz1 + sum_i Zbar_i [+ gzx]``. Parameter gradients are added to the program's partials
    ``dw_p`` / ``dv_p`` (``dv`` rows ``[db, dgw, dgb, dbw, dt]``, converted at each stage's time; ``dt``: the stage
    times' gradient).

    The stage loops run at run time (one copy of the MLP's forward and backward in the compiled kernel: unrolling
    them over the stages made the dopri5 backward take tens of minutes to compile): the tableau comes from
    ``tab_ptr`` (float64 ``[c (S), a (S x S), b (S)]``, :mod:`fastode.tableaus`' numbers by the launcher) and the
    stages to run from ``needs_ptr`` (int32 ``[NEED_U, NEED_S, KNEED_S]``, S each): stage i has a cotangent in an
    unseeded step / in the seeded last step (per-stage cotangents ``sk`` (S, B, D) / ``skq`` (S, B, NQ) and ``gzx``
    (B, D) from the interpolant, added when ``HAS_SEED`` and the runtime ``seed_on``), and its derivative enters a
    later stage's input. ``HAS_TR`` / ``HAS_KIN`` / ``HAS_FR``: which rates ``RATES`` holds.
    """
    dtype = w_ptr.dtype.element_ty
    SL: tl.constexpr = BM * P
    MS: tl.constexpr = (6 * L + 2) * SL            # the MLP backward's scratch
    zin = scr + MS                                 # S stage inputs
    kz = zin + S * SL                              # S stage derivatives
    gzs = kz + S * SL                              # S stage-input cotangents
    kb = gzs + S * SL                              # the current stage's kbar
    gq = kb + SL                                   # per-row cotangents of trace, kinetic, frob
    dts_ = dt.to(dtype)
    r = tl.arange(0, BM)
    allr = r < BM
    rl = r.to(tl.int64)
    BD = tl.cast(B, tl.int64) * D
    BQ = tl.cast(B, tl.int64) * NQ
    rows64 = rows.to(tl.int64)
    son = (tl.zeros((), dtype=tl.int32) + seed_on) != 0  # (a scalar: whether this is the seeded step)
    seed = (rows64 * 0 + seed_on) != 0             # (a per-row mask: the seeded step's loads)
    # ---- recompute the stage inputs (and the derivatives later stages need)
    for i in range(0, S):
        kneed = tl.load(needs_ptr + 2 * S + i) != 0
        if (tl.load(needs_ptr + S + i) != 0) | kneed:
            for n0 in range(0, D, CD):
                cn = n0 + tl.arange(0, CD)
                m = rmask[:, None] & (cn < D)[None, :]
                acc = tl.zeros((BM, CD), dtype=dtype)
                for j in range(0, i):
                    a_ij = tl.load(tab_ptr + S + i * S + j)
                    kj = tl.load(kz + j * SL + r[:, None] * P + cn[None, :],
                                 mask=m & _rows_flag(a_ij != 0.0, rows64)[:, None], other=0.0)
                    acc += kj * (dts_ * a_ij.to(dtype))
                y = tl.load(z0_ptr + rows64[:, None] * D + cn[None, :], mask=m, other=0.0) + acc
                tl.store(zin + i * SL + r[:, None] * P + cn[None, :], tl.where(m, y, 0.0))
            tl.debug_barrier()
            if kneed:
                ti = _round_time(t0 + tl.load(tab_ptr + i) * dt, TIME_F32).to(dtype)
                mlp_tile_forward(scr, zin + i * SL, P, allr, kz + i * SL, P, rl, rows64, rmask, e_ptr, e_ptr,
                                 w_ptr, v_ptr, dims_ptr, D, ti, L, P, ACT, 0, BM, CH, CD, False, PREC)
                tl.debug_barrier()
    # ---- the stages in reverse
    for ii in range(0, S):
        i = S - 1 - ii
        run = (tl.load(needs_ptr + i) != 0) | ((tl.load(needs_ptr + S + i) != 0) & son)
        if run:
            _stage_adjoint(i, seed, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr, t0, dt, dts_, gz1_ptr,
                           gq1_ptr, sk_ptr, skq_ptr, dw_p, dv_p, scr, zin, gzs, kb, gq, rows64, rmask, BD, BQ, D,
                           son, L, P, ACT, MODE, BM, CH, CD, PREC, S, RATES, NQ, HAS_SEED, HAS_TR, HAS_KIN,
                           HAS_FR, TIME_F32)
    # ---- the step start's cotangent
    for n0 in range(0, D, CD):
        cn = n0 + tl.arange(0, CD)
        m = rmask[:, None] & (cn < D)[None, :]
        g = rows64[:, None] * D + cn[None, :]
        acc = tl.load(gz1_ptr + g, mask=m, other=0.0)
        if HAS_SEED:  # the interpolant's direct dependence on the step start (its y0 and midpoint terms)
            acc += tl.load(gzx_ptr + g, mask=m & seed[:, None], other=0.0)
        for i in range(0, S):
            ran = (tl.load(needs_ptr + i) != 0) | ((tl.load(needs_ptr + S + i) != 0) & son)
            acc += tl.load(gzs + i * SL + r[:, None] * P + cn[None, :], mask=m & _rows_flag(ran, rows64)[:, None],
                           other=0.0)
        tl.store(gz0_ptr + g, acc, mask=m)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["step_i", "B", "D", "n_tiles"])
def cnf_step_bwd_kernel(ztape_ptr, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr, t0s, dts, step_i, gz1_ptr,
                        gq1_ptr, sk_ptr, skq_ptr, gzx_ptr, gz0_ptr, dw_ptr, dv_ptr, scr_ptr, B, D, n_tiles,
                        L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                        CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr,
                        RATES: tl.constexpr, NQ: tl.constexpr, HAS_SEED: tl.constexpr, HAS_TR: tl.constexpr,
                        HAS_KIN: tl.constexpr, HAS_FR: tl.constexpr, TIME_F32: tl.constexpr):
    """The backward of step ``step_i`` of a batch-global or grid solve (start ``ztape[step_i]``, time
    ``t0s[step_i]``, step ``dts[step_i]``) for the whole batch: :func:`_tile_step_bwd` per tile (``HAS_SEED``: the
    last step of an adaptive solve). Each program owns the same tiles in every launch, so the host's fixed-order
    sum of the programs' partials is deterministic."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    SL: tl.constexpr = BM * P
    NS: tl.constexpr = (6 * L + 2) * SL + (3 * S + 1) * SL + 3 * BM
    scr = scr_ptr + pid.to(tl.int64) * NS
    dw_p = dw_ptr + pid.to(tl.int64) * (L * P * P)
    dv_p = dv_ptr + pid.to(tl.int64) * (L * 5 * P)
    t0 = tl.load(t0s + step_i)
    dt = tl.load(dts + step_i)
    z0_ptr = ztape_ptr + tl.cast(step_i, tl.int64) * (tl.cast(B, tl.int64) * D)
    for tile in range(pid, n_tiles, nprog):
        rows = tile * BM + tl.arange(0, BM)
        _tile_step_bwd(z0_ptr, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr, t0, dt, HAS_SEED, gz1_ptr,
                       gq1_ptr, sk_ptr, skq_ptr, gzx_ptr, gz0_ptr, dw_p, dv_p, scr, rows, rows < B, B, D, L, P, ACT,
                       MODE, BM, CH, CD, PREC, S, RATES, NQ, HAS_SEED, HAS_TR, HAS_KIN, HAS_FR, TIME_F32)


# ------------------------------------------------------------------------------------------------
# a per-tile adaptive solve in one launch
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tile_rates(scr, x_ptr, x_rs, xrm, f_ptr, f_rs, f_rows, fq_ptr, rows64, rmask, e_ptr, w_ptr, v_ptr, dims_ptr, D,
                t, L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, RATES: tl.constexpr, NQ: tl.constexpr):
    """f of one tile into ``f_ptr`` and its q rates into ``fq_ptr + rows64 * NQ`` (global rows)."""
    kin, tr, fr = mlp_tile_forward(scr, x_ptr, x_rs, xrm, f_ptr, f_rs, f_rows, rows64, rmask, e_ptr, e_ptr, w_ptr,
                                   v_ptr, dims_ptr, D, t, L, P, ACT, MODE, BM, CH, CD, False, PREC)
    for j in tl.static_range(NQ):
        tl.store(fq_ptr + rows64 * NQ + j, _rate(kin, tr, fr, RATES[j]), mask=rmask)
    tl.debug_barrier()


@triton.jit
def _scaled_sums(a_ptr, aq_ptr, b_ptr, bq_ptr, y_ptr, yq_ptr, rows64, rmask, D, rtol, atol, sign,
                 BM: tl.constexpr, CD: tl.constexpr, NQ: tl.constexpr, NQN: tl.constexpr):
    """Sums of squares of ``(a - sign * b) / (atol + rtol |y|)`` over the tile's rows (the z part, the first NQN q
    columns): the initial-step heuristic's ``d0`` (a = y), ``d1`` (a = f0) with ``sign = 0``, ``d2`` (f1 - f0)."""
    sz = tl.zeros((BM,), dtype=tl.float64)
    sq = tl.zeros((BM,), dtype=tl.float64)
    for n0 in range(0, D, CD):
        cn = n0 + tl.arange(0, CD)
        m = rmask[:, None] & (cn < D)[None, :]
        g = rows64[:, None] * D + cn[None, :]
        y = tl.load(y_ptr + g, mask=m, other=0.0)
        v = tl.load(a_ptr + g, mask=m, other=0.0) - sign * tl.load(b_ptr + g, mask=m, other=0.0)
        r = tl.where(m, v / (atol + tl.abs(y) * rtol), 0.0).to(tl.float64)
        sz += tl.sum(r * r, axis=1)
    for j in tl.static_range(NQN):
        y = tl.load(yq_ptr + rows64 * NQ + j, mask=rmask, other=0.0)
        v = tl.load(aq_ptr + rows64 * NQ + j, mask=rmask, other=0.0) - \
            sign * tl.load(bq_ptr + rows64 * NQ + j, mask=rmask, other=0.0)
        r = tl.where(rmask, v / (atol + tl.abs(y) * rtol), 0.0).to(tl.float64)
        sq += r * r
    return tl.sum(sz, axis=0), tl.sum(sq, axis=0)


@triton.jit(do_not_specialize=["cap", "B", "D", "n_tiles"])
def cnf_tile_solve_kernel(z_ptr, q_ptr, f_ptr, fq_ptr, mid_ptr, midq_ptr, e_ptr, w_ptr, v_ptr, dims_ptr,
                          ctl_ptr, opt, steps_t, steps_dt, steps_h, cap, tape_ptr, scr_ptr, B, D, n_tiles,
                          L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                          CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
                          S: tl.constexpr, C: tl.constexpr, A: tl.constexpr, BW: tl.constexpr, EW: tl.constexpr,
                          CM: tl.constexpr, RATES: tl.constexpr, NQ: tl.constexpr, NQN: tl.constexpr,
                          ORDER: tl.constexpr, TIME_F32: tl.constexpr, FIRST_GIVEN: tl.constexpr,
                          TAPE: tl.constexpr):
    """Every tile of ``BM`` rows integrated to the end time with its own step size, in one launch (opt-in per-tile
    control: each tile is its own batch-global problem, as the C++ engine's per-tile mode). Tile ``k`` has its own
    control block ``ctl_ptr + k * NCTL`` (set up by the launcher: the clock and the counts; with ``FIRST_GIVEN`` the
    first step) and step records ``steps_* + k * cap``. Per tile: the first evaluation, the first step by the RK
    spec's heuristic on the tile's norm (:func:`fastode.ops.rk.initial_step`), then attempts until the end time or
    a failure, each one :func:`_tile_step` and the device controller. Slot ``cur`` of the state buffers is per tile.
    ``TAPE``: each attempt's start rows go to ``tape_ptr[accepted]`` (``cap`` states per tile; a tile that needs more
    stops with status 4 and the launcher runs the solve again with a larger tape).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dtype = w_ptr.dtype.element_ty
    SL: tl.constexpr = BM * P
    NS: tl.constexpr = (2 * L + 2 + S) * SL + S * NQ * BM
    scr = scr_ptr + pid.to(tl.int64) * NS
    zin = scr + (2 * L + 1) * SL
    rtol = tl.load(opt + O_RTOL).to(dtype)
    atol = tl.load(opt + O_ATOL).to(dtype)
    BD = tl.cast(B, tl.int64) * D
    BQ = tl.cast(B, tl.int64) * NQ
    r = tl.arange(0, BM)
    allr = r < BM
    for tile in range(pid, n_tiles, nprog):
        ctl = ctl_ptr + tl.cast(tile, tl.int64) * NCTL
        rows = tile * BM + r
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        n_rows = tl.minimum(B - tile * BM, BM)
        dirn = tl.load(ctl + C_DIR)
        tau0 = tl.load(ctl + C_TAU)
        sign = dirn.to(dtype)
        # ---- the first evaluation (slot 0) and the first step
        z_tile = z_ptr + tl.cast(tile, tl.int64) * BM * D  # (the MLP reads its input rows from the tile's start)
        _tile_rates(scr, z_tile, D, rmask, f_ptr, D, rows64, fq_ptr, rows64, rmask, e_ptr, w_ptr, v_ptr, dims_ptr, D,
                    (dirn * tau0).to(dtype), L, P, ACT, MODE, BM, CH, CD, PREC, RATES, NQ)
        if FIRST_GIVEN == 0:
            s0z, s0q = _scaled_sums(z_ptr, q_ptr, z_ptr, q_ptr, z_ptr, q_ptr, rows64, rmask, D, rtol, atol, 0.0, BM,
                                    CD, NQ, NQN)
            s1z, s1q = _scaled_sums(f_ptr, fq_ptr, f_ptr, fq_ptr, z_ptr, q_ptr, rows64, rmask, D, rtol, atol, 0.0, BM,
                                    CD, NQ, NQN)
            d0 = _mixed_norm(s0z, s0q, n_rows, D, NQN).to(dtype)
            d1 = _mixed_norm(s1z, s1q, n_rows, D, NQN).to(dtype)
            h0 = _initial_trial_step(d0, d1).to(dtype)
            # the trial Euler step y0 + h0 * (dir f0) into slot 1 (overwritten by the first attempt)
            for n0 in range(0, D, CD):
                cn = n0 + tl.arange(0, CD)
                m = rmask[:, None] & (cn < D)[None, :]
                g = rows64[:, None] * D + cn[None, :]
                y = tl.load(z_ptr + g, mask=m, other=0.0) + h0 * (sign * tl.load(f_ptr + g, mask=m, other=0.0))
                tl.store(zin + r[:, None] * P + cn[None, :], tl.where(m, y, 0.0))
            tl.debug_barrier()
            t_trial = dirn * _round_time(tau0 + h0.to(tl.float64), TIME_F32)
            _tile_rates(scr, zin, P, allr, f_ptr + BD, D, rows64, fq_ptr + BQ, rows64, rmask, e_ptr, w_ptr, v_ptr,
                        dims_ptr, D, t_trial.to(dtype), L, P, ACT, MODE, BM, CH, CD, PREC, RATES, NQ)
            s2z, s2q = _scaled_sums(f_ptr + BD, fq_ptr + BQ, f_ptr, fq_ptr, z_ptr, q_ptr, rows64, rmask, D, rtol, atol,
                                    1.0, BM, CD, NQ, NQN)
            d2 = (_mixed_norm(s2z, s2q, n_rows, D, NQN).to(dtype) / h0)
            dt0 = _initial_step_size(h0, d1, d2, ORDER)
            tl.store(ctl + C_DTP, _round_time(dt0.to(tl.float64), TIME_F32))
            tl.store(ctl + C_NFE, 2.0)
        else:
            tl.store(ctl + C_NFE, 1.0)
        tl.debug_barrier()
        prepare_attempt(ctl, opt, TIME_F32, dtype)
        tl.debug_barrier()
        # ---- the attempts
        done = tl.load(ctl + C_DONE)
        while done == 0.0:
            cur = tl.load(ctl + C_CUR).to(tl.int64)
            nxt = 1 - cur
            t0 = tl.load(ctl + C_T0)
            dt = tl.load(ctl + C_DT)
            if TAPE:
                acc = tl.load(ctl + C_ACC).to(tl.int64)
                keep = rmask & ((rows64 * 0 + acc) < cap)  # (a full tape stops the tile after this attempt)
                _checkpoint_start(tape_ptr + acc * BD, z_ptr + cur * BD, rows64, keep, D, CD)
            sz, sq = _tile_step(z_ptr + cur * BD, q_ptr + cur * BQ, f_ptr + cur * BD, fq_ptr + cur * BQ,
                                z_ptr + nxt * BD, q_ptr + nxt * BQ, f_ptr + nxt * BD, fq_ptr + nxt * BQ,
                                mid_ptr + nxt * BD, midq_ptr + nxt * BQ, e_ptr, w_ptr, v_ptr, dims_ptr, scr, rows,
                                rmask, B, D, t0, dt, rtol, atol, L, P, ACT, MODE, BM, CH, CD, PREC, S, C, A, BW,
                                EW, CM, True, True, RATES, NQ, NQN, TIME_F32)
            ratio = _mixed_norm(sz, sq, n_rows, D, NQN)
            _control(ctl, opt, ratio, steps_t + tl.cast(tile, tl.int64) * cap, steps_dt + tl.cast(tile, tl.int64) * cap,
                     steps_h + tl.cast(tile, tl.int64) * cap, cap, S - 1, ORDER, TIME_F32, dtype)
            tl.debug_barrier()
            if TAPE:
                if (tl.load(ctl + C_ACC).to(tl.int64) > cap) & (tl.load(ctl + C_STATUS) == 0.0):
                    tl.store(ctl + C_STATUS, ST_TAPE_FULL)  # an accepted step whose start the tape could not keep
                    tl.store(ctl + C_DONE, 1.0)
                tl.debug_barrier()
            done = tl.load(ctl + C_DONE)


@triton.jit(do_not_specialize=["cap", "B", "D", "n_tiles"])
def cnf_tile_bwd_kernel(ztape_ptr, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr, ctl_ptr, steps_t, steps_h, cap,
                        gb_ptr, qb_ptr, sk_ptr, skq_ptr, gzx_ptr, dw_ptr, dv_ptr, scr_ptr, B, D, n_tiles,
                        L: tl.constexpr, P: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr,
                        CH: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr,
                        RATES: tl.constexpr, NQ: tl.constexpr, HAS_TR: tl.constexpr, HAS_KIN: tl.constexpr,
                        HAS_FR: tl.constexpr, TIME_F32: tl.constexpr):
    """The backward of a per-tile solve in one launch: every tile walks its own accepted steps in reverse
    (:func:`_tile_step_bwd`; the first of them, the last step, with the interpolant's seeds). ``gb`` (4, B, D):
    slots 0-1 ping-pong, 2 the last step's end cotangent (set by the launcher), 3 the result; ``qb`` (2, B, NQ): the
    q cotangent at the last step's end and before it."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    SL: tl.constexpr = BM * P
    NS: tl.constexpr = (6 * L + 2) * SL + (3 * S + 1) * SL + 3 * BM
    scr = scr_ptr + pid.to(tl.int64) * NS
    dw_p = dw_ptr + pid.to(tl.int64) * (L * P * P)
    dv_p = dv_ptr + pid.to(tl.int64) * (L * 5 * P)
    BD = tl.cast(B, tl.int64) * D
    BQ = tl.cast(B, tl.int64) * NQ
    for tile in range(pid, n_tiles, nprog):
        rows = tile * BM + tl.arange(0, BM)
        rmask = rows < B
        acc = tl.load(ctl_ptr + tl.cast(tile, tl.int64) * NCTL + C_ACC).to(tl.int64)
        base = tl.cast(tile, tl.int64) * cap
        for k in range(0, acc):  # the tile's steps in reverse; the first of them (the last step) is seeded
            n = acc - 1 - k
            src = tl.where(k == 0, 2, (n + 1) % 2)
            dst = tl.where(n == 0, 3, n % 2)
            _tile_step_bwd(ztape_ptr + n * BD, tab_ptr, needs_ptr, e_ptr, w_ptr, v_ptr, dims_ptr,
                           tl.load(steps_t + base + n), tl.load(steps_h + base + n), k == 0, gb_ptr + src * BD,
                           qb_ptr + tl.where(k == 0, 0, 1) * BQ, sk_ptr, skq_ptr, gzx_ptr, gb_ptr + dst * BD, dw_p,
                           dv_p, scr, rows, rmask, B, D, L, P, ACT, MODE, BM, CH, CD, PREC, S, RATES, NQ, True,
                           HAS_TR, HAS_KIN, HAS_FR, TIME_F32)
