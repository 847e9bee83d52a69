"""Fused explicit Runge-Kutta kernels for any tableau: stage combination and step epilogue (+ backward).

* :func:`rk_stage`: ``y_i = y + dt * sum_j a_ij k_j`` in one launch.
* :func:`rk_epilogue`: in one launch ``y1 = y0 + dt * sum_i b_i k_i``, ``err = dt * sum_i b_err_i k_i`` and the
  error ratio ``r = err / (atol + rtol * max(|y0|, |y1|))`` reduced to its RMS (torchdiffeq's norm) and
  max, over the whole batch and per sample (row of the leading dimension). atol / rtol are scalars or
  per-element tensors.

No host synchronisation: ``dt`` is read from a device tensor; the batch-wide reduction is finished by
the last program to arrive (an atomic *ticket* decides which program that is; the partial sums
themselves are combined in a fixed order, so the result is deterministic). Accept/reject and the next
``dt`` can then be computed on the device from the returned 0-dim tensors.

Tableau coefficients arrive as Python floats from :mod:`fastode.tableaus` (through the caller) and are
compiled in as ``constexpr`` tuples (full double precision; zero coefficients skip their loads). One
compiled variant per tableau row, none of them written down here.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fastode.launch_count import launched

from ._common import empty, empty_like, max_programs


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def rk_stage_kernel(y_ptr, ks, dt_ptr, out_ptr, N, COEFS: tl.constexpr, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    """out = y + dt * sum_j COEFS[j] * k_j (without y when HAS_Y is False)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    dt = tl.load(dt_ptr)
    # torchdiffeq's rounding: weights fl(a_j * dt) in the state dtype, then sum_j k_j * w_j, then + y
    acc = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for j in tl.static_range(len(ks)):
        acc += tl.load(ks[j] + offs, mask=m, other=0.0) * (COEFS[j] * dt)
    if HAS_Y:
        out = tl.load(y_ptr + offs, mask=m, other=0.0) + acc
    else:
        out = acc
    tl.store(out_ptr + offs, out, mask=m)


@triton.jit
def rk_stage_bwd_kernel(g_ptr, ks, dt_ptr, gks, part_ptr, N, COEFS: tl.constexpr, NEED_DT: tl.constexpr,
                        BLOCK: tl.constexpr):
    """gk_j = dt * a_j * g; per-program partial of dLoss/ddt = sum(g * sum_j a_j k_j)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    dt = tl.load(dt_ptr)
    acc = tl.zeros((BLOCK,), dtype=g_ptr.dtype.element_ty)
    for j in tl.static_range(len(ks)):
        tl.store(gks[j] + offs, (dt * COEFS[j]) * g, mask=m)
        if NEED_DT:
            acc += COEFS[j] * tl.load(ks[j] + offs, mask=m, other=0.0)
    if NEED_DT:
        tl.store(part_ptr + pid, tl.sum(acc * g, axis=0))


@triton.jit
def _tolerance(y0, y1, atol_ptr, rtol_ptr, offs, m, ATOL_T: tl.constexpr, RTOL_T: tl.constexpr):
    if ATOL_T:
        atol = tl.load(atol_ptr + offs, mask=m, other=1.0)
    else:
        atol = tl.load(atol_ptr)
    if RTOL_T:
        rtol = tl.load(rtol_ptr + offs, mask=m, other=0.0)
    else:
        rtol = tl.load(rtol_ptr)
    return atol + rtol * tl.maximum(tl.abs(y0), tl.abs(y1)), rtol


@triton.jit
def _combos(ks, offs, m, dt, BCOEF: tl.constexpr, ECOEF: tl.constexpr, dtype: tl.constexpr, BR: tl.constexpr,
            BC: tl.constexpr, SCALED: tl.constexpr):
    """sum_j c_j k_j for both weight sets; SCALED: sum_j k_j * fl(c_j * dt) (torchdiffeq's rounding)."""
    sb = tl.zeros((BR, BC), dtype=dtype)
    se = tl.zeros((BR, BC), dtype=dtype)
    for j in tl.static_range(len(ks)):
        kj = tl.load(ks[j] + offs, mask=m, other=0.0)
        if BCOEF[j] != 0.0:
            if SCALED:
                sb += kj * (BCOEF[j] * dt)
            else:
                sb += BCOEF[j] * kj
        if ECOEF[j] != 0.0:
            if SCALED:
                se += kj * (ECOEF[j] * dt)
            else:
                se += ECOEF[j] * kj
    return sb, se


@triton.jit
def rk_epilogue_kernel(y0_ptr, ks, dt_ptr, atol_ptr, rtol_ptr, y1_ptr, err_ptr,
                       psq_ptr, pmax_ptr, rms_s_ptr, max_s_ptr, rms_b_ptr, max_b_ptr, cnt_ptr,
                       B, M, split_w,
                       BCOEF: tl.constexpr, ECOEF: tl.constexpr, ATOL_T: tl.constexpr, RTOL_T: tl.constexpr,
                       HAS_ERR: tl.constexpr, PRECOMP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                       RB: tl.constexpr):
    """Grid (row blocks, column splits). y viewed as (B, M).

    PRECOMP: ks = (y1, err) are given (the error-ratio reduction only; nothing is stored but the ratios).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    dtype = y0_ptr.dtype.element_ty
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    dt = tl.load(dt_ptr)
    sq = tl.zeros((BR,), dtype=dtype)
    mx = tl.zeros((BR,), dtype=dtype)
    c_start = pid_c * split_w
    c_end = tl.minimum(c_start + split_w, M)
    for c0 in range(c_start, c_end, BC):
        cols = c0 + tl.arange(0, BC)
        m = rmask[:, None] & (cols < c_end)[None, :]
        offs = rows64[:, None] * M + cols[None, :]
        y0 = tl.load(y0_ptr + offs, mask=m, other=0.0)
        if PRECOMP:
            y1 = tl.load(ks[0] + offs, mask=m, other=0.0)
            err = tl.load(ks[1] + offs, mask=m, other=0.0)
        else:
            sb, err = _combos(ks, offs, m, dt, BCOEF, ECOEF, dtype, BR, BC, True)
            y1 = y0 + sb
            tl.store(y1_ptr + offs, y1, mask=m)
            if HAS_ERR:
                tl.store(err_ptr + offs, err, mask=m)
        if HAS_ERR:
            tol, rtol = _tolerance(y0, y1, atol_ptr, rtol_ptr, offs, m, ATOL_T, RTOL_T)
            r = tl.where(m, err / tol, 0.0)
            sq += tl.sum(r * r, axis=1)
            mx = tl.maximum(mx, tl.max(tl.abs(r), axis=1))
    if HAS_ERR:
        # On a GPU tl.max / tl.maximum drop NaN (fmax semantics; the interpreter's NumPy keeps it), which would
        # let a NaN error estimate through the max norm as a finite ratio. A sum keeps NaN, so a row whose sum
        # of squares is NaN gets a NaN max: the step is rejected exactly as with torch.max.
        mx = tl.where(sq != sq, sq, mx)
        n_split = tl.num_programs(1)
        tl.store(psq_ptr + pid_c * B + rows, sq, mask=rmask)
        tl.store(pmax_ptr + pid_c * B + rows, mx, mask=rmask)
        tl.debug_barrier()
        total = tl.num_programs(0) * n_split
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if ticket == total - 1:
            # last program: fixed-order reduction of all partials (L2 reads: other SMs wrote them)
            bs = tl.zeros((RB,), dtype=dtype)
            bm = tl.zeros((RB,), dtype=dtype)
            for r0 in range(0, B, RB):
                rr = r0 + tl.arange(0, RB)
                rm = rr < B
                s = tl.zeros((RB,), dtype=dtype)
                mm = tl.zeros((RB,), dtype=dtype)
                for sp in range(0, n_split):
                    s += tl.load(psq_ptr + sp * B + rr, mask=rm, other=0.0, cache_modifier=".cg")
                    mm = tl.maximum(mm, tl.load(pmax_ptr + sp * B + rr, mask=rm, other=0.0, cache_modifier=".cg"))
                mm = tl.where(s != s, s, mm)  # (NaN-dropping maximum: see above)
                tl.store(rms_s_ptr + rr, tl.sqrt(s / M), mask=rm)
                tl.store(max_s_ptr + rr, mm, mask=rm)
                bs += s
                bm = tl.maximum(bm, mm)
            total_sq = tl.sum(bs, axis=0)
            tl.store(rms_b_ptr, tl.sqrt(total_sq / (B * M)))
            tl.store(max_b_ptr, tl.where(total_sq != total_sq, total_sq, tl.max(bm, axis=0)))
            tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def rk_epilogue_bwd_kernel(y0_ptr, ks, dt_ptr, atol_ptr, rtol_ptr, g1_ptr, ge_ptr, grb_ptr, grs_ptr,
                           rms_b_ptr, rms_s_ptr, gy0_ptr, gks, part_ptr,
                           B, M, split_w,
                           BCOEF: tl.constexpr, ECOEF: tl.constexpr, ATOL_T: tl.constexpr, RTOL_T: tl.constexpr,
                           HAS_G1: tl.constexpr, HAS_GE: tl.constexpr, HAS_GRB: tl.constexpr,
                           HAS_GRS: tl.constexpr, NEED_DT: tl.constexpr, PRECOMP: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
    """Backward of rk_epilogue_kernel w.r.t. y0, every k_i and dt (RMS outputs; max outputs are not differentiable).

    PRECOMP: ks = (y1, err) were inputs; gks = (dLoss/dy1, dLoss/derr), gy0 gets the tolerance term only.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    dtype = y0_ptr.dtype.element_ty
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    dt = tl.load(dt_ptr)
    N = B * M
    if HAS_GRB:
        rb = tl.load(rms_b_ptr)
        cb = tl.where(rb > 0, tl.load(grb_ptr) / (N * tl.where(rb > 0, rb, 1.0)), 0.0)
    if HAS_GRS:
        rs = tl.load(rms_s_ptr + rows, mask=rmask, other=1.0)
        cs = tl.where(rs > 0, tl.load(grs_ptr + rows, mask=rmask, other=0.0) / (M * tl.where(rs > 0, rs, 1.0)), 0.0)
    pdt = tl.zeros((BR, BC), dtype=dtype)
    c_start = pid_c * split_w
    c_end = tl.minimum(c_start + split_w, M)
    for c0 in range(c_start, c_end, BC):
        cols = c0 + tl.arange(0, BC)
        m = rmask[:, None] & (cols < c_end)[None, :]
        offs = rows64[:, None] * M + cols[None, :]
        y0 = tl.load(y0_ptr + offs, mask=m, other=0.0)
        if PRECOMP:
            y1 = tl.load(ks[0] + offs, mask=m, other=0.0)
            err = tl.load(ks[1] + offs, mask=m, other=0.0)
        else:
            sbt, err = _combos(ks, offs, m, dt, BCOEF, ECOEF, dtype, BR, BC, True)
            y1 = y0 + sbt
            if NEED_DT:
                sb, se = _combos(ks, offs, m, dt, BCOEF, ECOEF, dtype, BR, BC, False)
        gy1 = tl.zeros((BR, BC), dtype=dtype)
        gerr = tl.zeros((BR, BC), dtype=dtype)
        gy0 = tl.zeros((BR, BC), dtype=dtype)
        if HAS_G1:
            gy1 += tl.load(g1_ptr + offs, mask=m, other=0.0)
        if HAS_GE:
            gerr += tl.load(ge_ptr + offs, mask=m, other=0.0)
        if HAS_GRB or HAS_GRS:
            tol, rtol = _tolerance(y0, y1, atol_ptr, rtol_ptr, offs, m, ATOL_T, RTOL_T)
            r = tl.where(m, err / tol, 0.0)
            gr = tl.zeros((BR, BC), dtype=dtype)
            if HAS_GRB:
                gr += cb * r
            if HAS_GRS:
                gr += cs[:, None] * r
            gerr += gr / tol
            gtol = -gr * r / tol
            a0 = tl.abs(y0)
            a1 = tl.abs(y1)
            w0 = tl.where(a0 > a1, 1.0, tl.where(a0 == a1, 0.5, 0.0))
            sg0 = tl.where(y0 > 0, 1.0, tl.where(y0 < 0, -1.0, 0.0))
            sg1 = tl.where(y1 > 0, 1.0, tl.where(y1 < 0, -1.0, 0.0))
            gy1 += gtol * rtol * (1.0 - w0) * sg1
            gy0 += gtol * rtol * w0 * sg0
        if PRECOMP:
            tl.store(gy0_ptr + offs, gy0, mask=m)
            tl.store(gks[0] + offs, gy1, mask=m)
            tl.store(gks[1] + offs, gerr, mask=m)
        else:
            gy0 += gy1
            tl.store(gy0_ptr + offs, gy0, mask=m)
            for j in tl.static_range(len(ks)):
                tl.store(gks[j] + offs, dt * (BCOEF[j] * gy1 + ECOEF[j] * gerr), mask=m)
            if NEED_DT:
                pdt += gy1 * sb + gerr * se
    if NEED_DT:
        pid = pid_r * tl.num_programs(1) + pid_c
        tl.store(part_ptr + pid, tl.sum(tl.sum(pdt, axis=1), axis=0))


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
_STAGE_BLOCK = 1024
_SCALARS: dict = {}
_COUNTERS: dict = {}


def as_device_scalar(x, like: torch.Tensor) -> torch.Tensor:
    """``x`` as a 0-dim tensor of ``like``'s dtype/device; python numbers are cached (no per-step H2D copy)."""
    if isinstance(x, torch.Tensor):
        return x.reshape(()).to(dtype=like.dtype, device=like.device)
    key = (float(x), like.dtype, like.device)
    out = _SCALARS.get(key)
    if out is None:
        out = torch.full((), float(x), dtype=like.dtype, device=like.device)
        if len(_SCALARS) > 256:
            _SCALARS.clear()
        _SCALARS[key] = out
    return out


def _counter(device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    c = _COUNTERS.get(key)
    if c is None:
        c = torch.zeros((), dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


def _nonzero(ks, coefs):
    pairs = [(k, float(c)) for k, c in zip(ks, coefs) if float(c) != 0.0]
    return tuple(p[0].contiguous() for p in pairs), tuple(p[1] for p in pairs)


def rk_stage(y, ks: Sequence[torch.Tensor], coefs: Sequence[float], dt) -> torch.Tensor:
    """``y + dt * sum_j coefs[j] * ks[j]`` (one launch; zero coefficients skipped); ``y=None`` drops the ``y``
    term (an error estimate). ``dt``: 0-dim tensor or float."""
    kk, cc = _nonzero(ks, coefs)
    like = ks[0] if y is None else y
    if not kk:
        return torch.zeros_like(like) if y is None else y.clone()
    y = y.contiguous() if y is not None else None
    dt_t = as_device_scalar(dt, like)
    out = empty_like(like)
    N = like.numel()
    launched("rk_stage_kernel")
    rk_stage_kernel[(triton.cdiv(N, _STAGE_BLOCK),)](y if y is not None else out, kk, dt_t, out, N, COEFS=cc,
                                                     HAS_Y=y is not None, BLOCK=_STAGE_BLOCK)
    return out


def rk_stage_backward(g, ks, coefs, dt, need_dt: bool):
    """Gradients of :func:`rk_stage`: ``([dt * c_j * g for each k_j], dLoss/ddt or None)`` (all ks, zeros kept)."""
    g = g.contiguous()
    dt_t = as_device_scalar(dt, g)
    idx = [j for j, c in enumerate(coefs) if float(c) != 0.0]
    gks = [None] * len(ks)
    if not idx:
        return [torch.zeros_like(g) for _ in ks], (torch.zeros((), dtype=g.dtype, device=g.device) if need_dt else None)
    kk = tuple(ks[j].contiguous() for j in idx)
    cc = tuple(float(coefs[j]) for j in idx)
    outs = tuple(empty_like(g) for _ in idx)
    N = g.numel()
    nprog = triton.cdiv(N, _STAGE_BLOCK)
    part = empty((nprog,), g) if need_dt else g
    launched("rk_stage_bwd_kernel")
    rk_stage_bwd_kernel[(nprog,)](g, kk, dt_t, outs, part, N, COEFS=cc, NEED_DT=need_dt, BLOCK=_STAGE_BLOCK)
    for j, o in zip(idx, outs):
        gks[j] = o
    for j in range(len(ks)):
        if gks[j] is None:
            gks[j] = torch.zeros_like(g)
    return gks, (part.sum() if need_dt else None)


def _active(ks, b, b_err):
    """Stages with a nonzero solution or error weight: (indices, ks, b, b_err) restricted to them."""
    bb = [float(x) for x in b]
    ee = [float(x) for x in b_err] if b_err is not None else [0.0] * len(bb)
    if not (len(ks) == len(bb) == len(ee)):
        raise ValueError(f"{len(ks)} stages but {len(bb)} weights b and {len(ee)} error weights; they must match")
    idx = [j for j in range(len(bb)) if bb[j] != 0.0 or ee[j] != 0.0]
    return idx, tuple(ks[j] for j in idx), tuple(bb[j] for j in idx), tuple(ee[j] for j in idx)


def _layout(y: torch.Tensor):
    """(B, M): per-sample rows = the leading dimension (a 0/1-dim state is one sample)."""
    if y.dim() <= 1:
        return 1, max(1, y.numel())
    return y.shape[0], y.numel() // max(1, y.shape[0])


def _tol_arg(x, y):
    if isinstance(x, torch.Tensor) and x.numel() > 1:
        return x.to(dtype=y.dtype, device=y.device).expand_as(y).contiguous(), True
    return as_device_scalar(x, y), False


def _epi_grid(B: int, M: int, device, BR: int, BC: int):
    n_r = triton.cdiv(B, BR)
    target = max(1, 4 * max_programs(device)) if device.type == "cuda" else 4
    n_c = max(1, min(triton.cdiv(M, BC), target // n_r if n_r < target else 1))
    split_w = triton.cdiv(triton.cdiv(M, n_c), BC) * BC
    n_c = triton.cdiv(M, split_w)
    return n_r, n_c, split_w


def _epi_blocks(M: int, dtype=torch.float32):
    # 1024 float32 / 512 float64 elements per tile (8 / 4 per thread at 4 warps): the backward keeps ~10
    # tile-sized temporaries live; larger tiles spill on sm_90 (bench/results/kernels_sm90_registers.json)
    n = 512 if dtype == torch.float64 else 1024
    BC = min(256, max(16, triton.next_power_of_2(M)))
    BR = max(1, min(64, n // BC))
    return BR, BC


def _grid_for(y0, grid_split):
    B, M = _layout(y0)
    BR, BC = _epi_blocks(M, y0.dtype) if grid_split is None else grid_split[:2]
    if grid_split is None:
        n_r, n_c, split_w = _epi_grid(B, M, y0.device, BR, BC)
    else:
        split_w = grid_split[2]
        n_r, n_c = triton.cdiv(B, BR), triton.cdiv(M, split_w)
    return B, M, BR, BC, n_r, n_c, split_w


def _ratio_buffers(B, n_c, y0):
    return (empty((n_c, B), y0), empty((n_c, B), y0), empty((B,), y0), empty((B,), y0), empty((), y0),
            empty((), y0))


def rk_error_ratio(y_err, y0, y1, atol=0.0, rtol=0.0, *, grid_split=None):
    """One launch: ``r = y_err / (atol + rtol * max(|y0|, |y1|))`` reduced to
    ``(ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)`` (torchdiffeq's RMS norm, and the max)."""
    y0, y1, y_err = y0.contiguous(), y1.contiguous(), y_err.contiguous()
    B, M, BR, BC, n_r, n_c, split_w = _grid_for(y0, grid_split)
    at, at_t = _tol_arg(atol, y0)
    rt, rt_t = _tol_arg(rtol, y0)
    psq, pmax, rms_s, max_s, rms_b, max_b = _ratio_buffers(B, n_c, y0)
    launched("rk_epilogue_kernel")
    rk_epilogue_kernel[(n_r, n_c)](
        y0, (y1, y_err), as_device_scalar(1.0, y0), at, rt, y0, y0, psq, pmax, rms_s, max_s, rms_b, max_b,
        _counter(y0.device), B, M, split_w, BCOEF=(0.0, 0.0), ECOEF=(0.0, 0.0), ATOL_T=at_t, RTOL_T=rt_t,
        HAS_ERR=True, PRECOMP=True, BR=BR, BC=BC, RB=256,
    )
    return rms_b, max_b, rms_s, max_s


def rk_error_ratio_backward(y_err, y0, y1, atol, rtol, rms_b, rms_s, grb=None, grs=None, grid_split=None):
    """Gradients of the RMS ratios of :func:`rk_error_ratio`: ``(g_y_err, g_y0, g_y1)``."""
    y0, y1, y_err = y0.contiguous(), y1.contiguous(), y_err.contiguous()
    B, M, BR, BC, n_r, n_c, split_w = _grid_for(y0, grid_split)
    at, at_t = _tol_arg(atol, y0)
    rt, rt_t = _tol_arg(rtol, y0)
    gy0, gy1, gerr = empty_like(y0), empty_like(y0), empty_like(y0)
    c = lambda g: g.contiguous() if g is not None else y0  # noqa: E731
    launched("rk_epilogue_bwd_kernel")
    rk_epilogue_bwd_kernel[(n_r, n_c)](
        y0, (y1, y_err), as_device_scalar(1.0, y0), at, rt, y0, y0, c(grb), c(grs), c(rms_b), c(rms_s), gy0,
        (gy1, gerr), y0, B, M, split_w, BCOEF=(0.0, 0.0), ECOEF=(0.0, 0.0), ATOL_T=at_t, RTOL_T=rt_t,
        HAS_G1=False, HAS_GE=False, HAS_GRB=grb is not None, HAS_GRS=grs is not None, NEED_DT=False, PRECOMP=True,
        BR=BR, BC=BC,
    )
    return gerr, gy0, gy1


def rk_epilogue(y0, ks, b, b_err, dt, atol=0.0, rtol=0.0, *, grid_split=None):
    """One launch: ``(y1, err, ratio_rms, ratio_max, ratio_rms_sample, ratio_max_sample)``.

    ``ratio_*`` are 0-dim (whole batch), ``*_sample`` are ``(B,)`` over the leading dimension. With
    ``b_err=None`` only ``y1`` is computed (the rest is None). ``grid_split`` (tests) forces
    ``(row_block, column_block, column_split_width)``.
    """
    y0 = y0.contiguous()
    ks = tuple(k.contiguous() for k in ks)
    B, M, BR, BC, n_r, n_c, split_w = _grid_for(y0, grid_split)
    has_err = b_err is not None
    idx, ks, bc, ec = _active(ks, b, b_err)
    dt_t = as_device_scalar(dt, y0)
    at, at_t = _tol_arg(atol, y0)
    rt, rt_t = _tol_arg(rtol, y0)
    y1 = empty_like(y0)
    if has_err:
        err = empty_like(y0)
        psq, pmax, rms_s, max_s, rms_b, max_b = _ratio_buffers(B, n_c, y0)
    else:
        err = psq = pmax = rms_s = max_s = rms_b = max_b = y1
    launched("rk_epilogue_kernel")
    rk_epilogue_kernel[(n_r, n_c)](
        y0, ks, dt_t, at, rt, y1, err, psq, pmax, rms_s, max_s, rms_b, max_b, _counter(y0.device),
        B, M, split_w, BCOEF=bc, ECOEF=ec, ATOL_T=at_t, RTOL_T=rt_t, HAS_ERR=has_err, PRECOMP=False, BR=BR, BC=BC,
        RB=256,
    )
    if not has_err:
        return y1, None, None, None, None, None
    return y1, err, rms_b, max_b, rms_s, max_s


def rk_epilogue_backward(y0, ks, b, b_err, dt, atol, rtol, rms_b, rms_s, g1=None, ge=None, grb=None, grs=None,
                         need_dt=False, grid_split=None):
    """Gradients of :func:`rk_epilogue` through ``y1``, ``err`` and the RMS ratios: ``(gy0, [gk_i], gdt)``."""
    y0 = y0.contiguous()
    ks = tuple(k.contiguous() for k in ks)
    B, M, BR, BC, n_r, n_c, split_w = _grid_for(y0, grid_split)
    n_stages = len(ks)
    idx, ks, bc, ec = _active(ks, b, b_err)
    dt_t = as_device_scalar(dt, y0)
    at, at_t = _tol_arg(atol, y0)
    rt, rt_t = _tol_arg(rtol, y0)
    gy0 = empty_like(y0)
    gks = tuple(empty_like(y0) for _ in ks)
    part = empty((n_r * n_c,), y0) if need_dt else y0
    c = lambda g: g.contiguous() if g is not None else y0  # noqa: E731
    launched("rk_epilogue_bwd_kernel")
    rk_epilogue_bwd_kernel[(n_r, n_c)](
        y0, ks, dt_t, at, rt, c(g1), c(ge), c(grb), c(grs),
        rms_b if rms_b is not None else y0, rms_s if rms_s is not None else y0, gy0, gks, part,
        B, M, split_w, BCOEF=bc, ECOEF=ec, ATOL_T=at_t, RTOL_T=rt_t,
        HAS_G1=g1 is not None, HAS_GE=ge is not None, HAS_GRB=grb is not None, HAS_GRS=grs is not None,
        NEED_DT=need_dt, PRECOMP=False, BR=BR, BC=BC,
    )
    all_gks = [None] * n_stages
    for j, g in zip(idx, gks):
        all_gks[j] = g
    all_gks = [g if g is not None else torch.zeros_like(y0) for g in all_gks]
    return gy0, all_gks, (part.sum() if need_dt else None)
