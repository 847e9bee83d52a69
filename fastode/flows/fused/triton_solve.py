"""The solve driver of the Triton backend (:mod:`.triton`): the order of a whole solve's launches, its tape, the
interpolation at the end time and its adjoint, and the one read-back -- what the C++ backend does inside
``csrc/cnf_adaptive.cpp``. The kernels and their one-launch launchers are in ``kernels/`` (:mod:`fastode.kernels.
cnf_step`, :mod:`fastode.kernels.cnf_solve`); this is solver code over them.

* :meth:`TritonCnfSolver.adaptive`: a batch-global adaptive solve with torchdiffeq's semantics (the first step by
  the Hairer-Norsett-Wanner heuristic of the RK spec, :func:`fastode.ops.rk.initial_step`, run on the device with
  the fused MLP; then one launch per step attempt, the controller on the device; overshoot and torchdiffeq's
  quartic interpolation at the end time, queued on the device). The host reads the control block only every
  ``sync_every`` launches (0: once at the end, after launching as many attempts as the previous solve needed --
  launches after the end are no-ops -- and more only if those did not suffice).
* :meth:`TritonCnfSolver.grid`: a fixed-grid solve, one launch per step and no host read (a CUDA graph can capture
  it).
* :meth:`TritonCnfSolver.per_tile`: every tile of rows solved with its own step size, in one launch.

Each has its backward (``*_backward``): the exact gradient of the discrete solve, which also reports the network
evaluations it recomputed (odeint's checkpoint mode counts them).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastode.kernels import cnf_step as K
from fastode.kernels._common import empty
from fastode.kernels.cnf_solve import control_blocks, options

from ...codes import Status
from ...interp import quartic_coefficients, quartic_eval
from ...launch_count import host_read
from ...ops.rk import initial_step
from .base import mean_tile_counts

__all__ = ["TritonCnfSolver", "MAX_RECORDED_STEPS"]

#: at most this many accepted steps are recorded (step_ts / step_sizes) per solve
MAX_RECORDED_STEPS = 100_000


class TritonCnfSolver:
    """The solve driver over one :class:`~fastode.kernels.cnf_solve.CnfLauncher` (``k``): what to launch in which
    order, the tape, the interpolation at the end time and its adjoint, and the read-back."""

    _expected_attempts: dict = {}

    def __init__(self, launcher):
        self.k = launcher

    def _start(self, z0, q0, e, time_dtype):
        """What every adaptive solve sets up first: ``(device, dtype, B, D, z0, q0, the probe argument, float32
        times, float64 on the device, state buffers)`` (contiguous inputs; the kernels take ``z0`` for an absent
        probe)."""
        z0, q0 = z0.contiguous(), q0.contiguous()
        B, D = z0.shape
        return (z0.device, z0.dtype, B, D, z0, q0, e.contiguous() if e is not None else z0,
                time_dtype == torch.float32, dict(dtype=torch.float64, device=z0.device), self.k.buffers(z0, q0))

    # -------------------------------------------------------------------------------------------- fixed grid
    def grid(self, grid: torch.Tensor, z0: torch.Tensor, q0: torch.Tensor, e: Optional[torch.Tensor],
             tape: bool = False):
        """``(zT, qT, saved)`` after one RK step per grid interval (``grid``: 1-D times, at least two). ``tape``: keep
        every step's start (``saved``, what :meth:`grid_backward` needs; else None)."""
        B, D = z0.shape
        n = grid.numel() - 1
        time_f32 = grid.dtype == torch.float32
        g64 = grid.detach().to(torch.float64).contiguous()
        bufs = self.k.buffers(z0.contiguous(), q0.contiguous(), n + 1 if tape else 2)
        n_tiles, nprog = self.k.programs(B, z0.device)
        scr = self.k.scratch(nprog, z0)
        e_arg = e.contiguous() if e is not None else z0
        dummy = g64
        for i in range(n):
            self.k.step(bufs, e_arg, dummy, dummy, dummy, dummy, (dummy,) * 3, 0, g64, i, bufs[0] if tape else None,
                              scr, B, D, n_tiles, nprog, time_f32)
        Z, Q = bufs[0], bufs[1]
        last = n if tape else n % 2
        saved = None
        if tape:
            t0s = g64[:-1].contiguous()
            dts = g64[1:] - g64[:-1]
            if time_f32:
                dts = dts.to(torch.float32).to(torch.float64)
            saved = {"tape": Z, "t0s": t0s, "dts": dts.contiguous(), "steps": n, "e": e_arg, "time_f32": time_f32}
        return Z[last], Q[last, :, : self.k.nq], saved

    # -------------------------------------------------------------------------------------------- adaptive
    def adaptive(self, t0: torch.Tensor, t1: torch.Tensor, z0: torch.Tensor, q0: torch.Tensor,
                 e: Optional[torch.Tensor], *, rtol: float, atol: float, safety: float, ifactor: float,
                 dfactor: float, min_step: float, max_step: float, first_step: Optional[float], max_num_steps: int,
                 time_dtype: torch.dtype, sync_every: int = 0, tape: bool = False):
        """A batch-global adaptive solve from ``t0`` to ``t1`` (0-dim tensors, any device): ``(zT, qT, record)``.

        ``record``: a dict of the solve's counts (``status``, ``t_status``, ``nfe``, ``steps``, ``accepted``,
        ``rejected``, ``step_ts``, ``step_sizes``, ``finite``) read back once at the end (and every
        ``sync_every`` launches while running). ``tape``: keep what :meth:`adaptive_backward` needs
        (``record["saved"]``): each accepted step's start, its time and step, and the last step's interpolation
        data.
        """
        dev, dtype, B, D, z0, q0, e_arg, time_f32, f64, bufs = self._start(z0, q0, e, time_dtype)
        Z, Q, F, FQ, MID, MIDQ = bufs
        # ---- the clock and the first evaluation, on the device
        t0d, dirn, tau0, tend, rnd = _clock(t0, t1, time_f32)
        f0, fq0 = self.k.evaluate(t0d.to(dtype), z0, e)
        F[0] = f0
        if self.k.nq:
            FQ[0] = fq0
        nfe0 = 1.0
        if first_step is not None:
            dtp = rnd(torch.full((), float(first_step), **f64))
        else:
            dtp = self._first_step(tau0, dirn, z0, q0, f0, fq0, e, rtol, atol, time_dtype).to(torch.float64)
            nfe0 = 2.0
        ctl = control_blocks(1, tau0, tend, dirn, dtp, nfe0)[0]
        opt = options(dev, rtol, atol, safety, ifactor, dfactor, min_step, max_step, max_num_steps)
        self.k.prepare(ctl, opt, z0, time_f32)
        n_tiles, nprog = self.k.programs(B, dev)
        scr = self.k.scratch(nprog, z0)
        part = torch.zeros((2 * nprog,), **f64)
        cnt = torch.zeros((), dtype=torch.int32, device=dev)
        cap = int(min(max_num_steps, MAX_RECORDED_STEPS))
        steps = tuple(torch.zeros((cap,), **f64) for _ in range(3))  # t0, width, the kernel's dt of accepted steps
        ztape = None
        # ---- the attempts: launches queue up; the host looks at `done` only between chunks
        key = (self.k.spec, B, D, self.k.nq)
        chunk = sync_every if sync_every > 0 else self._expected_attempts.get(key, 16)
        launches = 0
        while True:
            n = min(chunk, max_num_steps + 1 - launches)
            if tape:  # room for every attempt of this chunk to be accepted (accepted <= launches)
                ztape = _grown(ztape, launches + n, z0)
            for _ in range(n):
                self.k.step(bufs, e_arg, ctl, opt, part, cnt, steps, cap, opt, 0, ztape, scr, B, D,
                                  n_tiles, nprog, time_f32)
            launches += n
            host_read("solve status")
            if bool(ctl[K.C_DONE.value] != 0) or launches > max_num_steps:
                break
            chunk = sync_every if sync_every > 0 else max(16, launches)
        # ---- output at the end time inside the last accepted step (queued on the device)
        cur = ctl[K.C_CUR.value].to(torch.long).reshape(1)
        x, _, dt = _end_coordinate(ctl, time_f32, dtype)
        zT, qT = self._interpolate(bufs, 1 - cur, cur, x, dt, ctl[K.C_ACC.value] > 0, z0, q0)
        finite = torch.isfinite(zT).all() & torch.isfinite(qT).all()
        host_read("solve record")
        back = torch.cat([ctl, finite.to(torch.float64).reshape(1), steps[0], steps[1]]).cpu()
        c = back[: K.NCTL.value].tolist()
        acc = int(c[K.C_ACC.value])
        nrec = min(acc, cap)
        record = {"status": int(c[K.C_STATUS.value]), "t_status": c[K.C_TSTAT.value], "nfe": int(c[K.C_NFE.value]),
                  "steps": int(c[K.C_ATT.value]), "accepted": acc, "rejected": int(c[K.C_REJ.value]),
                  "finite": bool(back[K.NCTL.value] != 0),
                  "step_ts": back[K.NCTL.value + 1: K.NCTL.value + 1 + nrec].tolist(),
                  "step_sizes": back[K.NCTL.value + 1 + cap: K.NCTL.value + 1 + cap + nrec].tolist(),
                  "launches": launches + 1}
        self._expected_attempts[key] = max(1, record["steps"] + 1)
        if tape:
            record["saved"] = {"tape": ztape, "t0s": steps[0], "dts": steps[2], "steps": nrec, "bufs": bufs,
                               "ctl": ctl, "e": e_arg, "time_f32": time_f32}
        return zT, qT, record

    # -------------------------------------------------------------------------------------------- per tile
    def per_tile(self, t0: torch.Tensor, t1: torch.Tensor, z0: torch.Tensor, q0: torch.Tensor,
                 e: Optional[torch.Tensor], *, rtol: float, atol: float, safety: float, ifactor: float,
                 dfactor: float, min_step: float, max_step: float, first_step: Optional[float], max_num_steps: int,
                 time_dtype: torch.dtype, tape: bool = False):
        """Every tile of ``BM`` rows solved to ``t1`` with its own step size, in one launch: ``(zT, qT, tiles, saved)``
        (``tiles``: each tile's counts and status, read back once at the end; ``saved``: with ``tape``, what
        :meth:`per_tile_backward` needs -- each tile's accepted step starts, times and steps -- else None). The tape
        holds as many steps per tile as the previous solve of this configuration needed (32 at first); a tile that
        needs more stops, and the solve runs again with a tape twice as long."""
        key = ("tile", self.k.spec, z0.shape, self.k.nq)
        cap = max(1, self._expected_attempts.get(key, 32)) if tape else 0
        while True:
            zT, qT, tiles, saved = self._per_tile_once(
                t0, t1, z0, q0, e, cap, tape, rtol=rtol, atol=atol, safety=safety, ifactor=ifactor, dfactor=dfactor,
                min_step=min_step, max_step=max_step, first_step=first_step, max_num_steps=max_num_steps,
                time_dtype=time_dtype)
            if not any(t_["status"] == Status.TAPE_FULL for t_ in tiles):
                break
            cap *= 2
        if tape:
            self._expected_attempts[key] = max(t_["accepted"] for t_ in tiles) + 1
        return zT, qT, tiles, saved

    def _per_tile_once(self, t0, t1, z0, q0, e, cap, tape, *, rtol, atol, safety, ifactor, dfactor, min_step,
                       max_step, first_step, max_num_steps, time_dtype):
        dev, dtype, B, D, z0, q0, e_arg, time_f32, f64, bufs = self._start(z0, q0, e, time_dtype)
        n_tiles, nprog = self.k.programs(B, dev)
        _, dirn, tau0, tend, rnd = _clock(t0, t1, time_f32)
        # (the kernel computes each tile's first step and counts its evaluations unless first_step is given)
        dtp = rnd(torch.full((), float(first_step), **f64)) if first_step is not None else torch.zeros((), **f64)
        ctl = control_blocks(n_tiles, tau0, tend, dirn, dtp, 0.0)
        opt = options(dev, rtol, atol, safety, ifactor, dfactor, min_step, max_step, max_num_steps)
        steps = torch.zeros((3, max(1, n_tiles * cap)), **f64)  # per tile: t0, width, dt of its accepted steps
        ztape = empty((max(1, cap), B, D), z0) if tape else None
        self.k.tile_solve(bufs, e_arg, ctl, opt, steps, cap, ztape, B, D, n_tiles, nprog, time_f32,
                          first_step is not None)
        # ---- each row's tile's interpolation at the end time (queued on the device)
        tile_of = torch.arange(B, device=dev) // self.k.BM
        c = ctl[tile_of]
        cur = c[:, K.C_CUR.value].to(torch.long)
        x, _, dt = _end_coordinate(c, time_f32, dtype)
        zT, qT = self._interpolate(bufs, 1 - cur, cur, x[:, None], dt[:, None], (c[:, K.C_ACC.value] > 0)[:, None],
                                   z0, q0)
        finite = torch.isfinite(zT).all() & torch.isfinite(qT).all()
        host_read("solve record")
        back = torch.cat([ctl.reshape(-1), finite.to(torch.float64).reshape(1)]).cpu()
        cc = back[:-1].reshape(n_tiles, K.NCTL.value).tolist()
        tiles = [{"status": int(r[K.C_STATUS.value]), "t_status": r[K.C_TSTAT.value], "nfe": int(r[K.C_NFE.value]),
                  "steps": int(r[K.C_ATT.value]), "accepted": int(r[K.C_ACC.value]),
                  "rejected": int(r[K.C_REJ.value]), "step_ts": [], "step_sizes": []} for r in cc]
        if not bool(back[-1] != 0):
            bad = next((i for i in range(n_tiles)
                        if not bool(torch.isfinite(zT[tile_of == i]).all() & torch.isfinite(qT[tile_of == i]).all())),
                       0)
            tiles[bad]["status"] = tiles[bad]["status"] or int(Status.NONFINITE)
        saved = None
        if tape:
            saved = {"tape": ztape, "steps_t": steps[0], "steps_h": steps[2], "cap": cap, "ctl": ctl, "bufs": bufs,
                     "e": e_arg, "time_f32": time_f32, "steps": sum(t_["accepted"] for t_ in tiles),
                     "mean_accepted": mean_tile_counts(tiles, B, self.k.BM)["accepted"]}
        return zT, qT, tiles, saved

    def per_tile_backward(self, saved, gzT, gqT, want_t: bool):
        """The exact gradient of :meth:`per_tile` in one launch (every tile walks its own steps in reverse):
        ``(gz0, gq0, g_t or None, param grads)``, as :meth:`adaptive_backward` per tile."""
        B, D = gzT.shape
        dev, dtype = gzT.device, gzT.dtype
        dw, dv, scr, nprog = self.k.backward_buffers(gzT)
        ctl = saved["ctl"]
        c = ctl[torch.arange(B, device=dev) // self.k.BM]
        cur = c[:, K.C_CUR.value].to(torch.long)
        x, width, dts = _end_coordinate(c, saved["time_f32"], dtype)
        gy1, gq_last, gq_before, (sk, skq, gzx), g_x = self._interpolation_adjoint(
            saved["bufs"], 1 - cur, cur, x[:, None], dts[:, None], gzT, gqT, want_t)
        gb = empty((4, B, D), gzT)
        gb[2] = gy1
        qb = torch.stack([gq_last, gq_before]).contiguous()
        self.k.tile_backward(saved["tape"], saved["e"], ctl, saved["steps_t"], saved["steps_h"], saved["cap"], gb, qb,
                             sk, skq, gzx, dw, dv, scr, saved["time_f32"])
        moved = c[:, K.C_ACC.value] > 0
        gz = torch.where(moved[:, None], gb[3], gzT)
        gq = torch.where(moved[:, None], gq_before, gqT) if self.k.nq else gqT
        g_t = None
        if want_t:  # per row: its tile's coordinate; every stage time of every tile is t0 + constant
            g_x = torch.where(moved, g_x[:, 0].to(torch.float64) * c[:, K.C_DIR.value] / width, 0.0).sum()
            g_t = torch.stack([dv[:, :, 4].sum().to(torch.float64) - g_x, g_x])
        return gz, gq, g_t, self.k.param_grads(dw, dv), self.k.spec.S * saved["mean_accepted"]

    # -------------------------------------------------------------------------------------------- backward
    def _step_backward(self, saved, n, gz1, gq1, seeds, dw, dv, scr, nprog):
        """One step's backward launch from the tape in ``saved``."""
        return self.k.step_backward(saved["tape"], saved["e"], saved["t0s"], saved["dts"], saved["time_f32"], n, gz1,
                                    gq1, seeds, dw, dv, scr, nprog)


    def grid_backward(self, saved, gzT, gqT, want_t: bool = False):
        """The exact gradient of :meth:`grid` (its tape): ``(gz0, gq0, None, param grads)`` (the grid's times are
        constants: the engine declines a differentiable ``t``)."""
        dw, dv, scr, nprog = self.k.backward_buffers(gzT)
        gz = gzT.contiguous()
        gq = (gqT if self.k.nq else gzT.new_zeros(gzT.shape[0], 1)).contiguous()
        for n in reversed(range(saved["steps"])):
            gz = self._step_backward(saved, n, gz, gq, None, dw, dv, scr, nprog)
        return gz, gqT, None, self.k.param_grads(dw, dv), self.k.spec.S * saved["steps"]

    def _interpolation_adjoint(self, bufs, prev, cur, x, dts, gzT, gqT, want_x: bool):
        """The quartic interpolant's adjoint (PyTorch autograd on a few tensor ops, once per solve): the last
        step's cotangents ``(gy1, gq_last, gq_before, seeds (sk, skq, gzx), g_x)``. ``prev`` / ``cur`` index the
        state slots per row (shape (1,) or (B,)), ``x`` / ``dts`` are 0-dim or (B, 1)."""
        B = gzT.shape[0]
        nq = self.k.nq
        zparts, qparts = self._last_step(bufs, prev, cur, B)
        with torch.enable_grad():
            x = x.detach().requires_grad_(want_x)
            leaves = [p.detach().requires_grad_() for p in zparts]
            outs, gouts = [_quartic(*leaves, dts, x)], [gzT]
            if nq:
                qleaves = [p.detach().requires_grad_() for p in qparts]
                outs.append(_quartic(*qleaves, dts, x))
                gouts.append(gqT)
                leaves = leaves + qleaves
            grads = torch.autograd.grad(outs, leaves + ([x] if want_x else []), gouts)
        S = self.k.spec.S
        w = [torch.full((), c, dtype=gzT.dtype, device=gzT.device) * dts for c in self.k.spec.CM]  # fl(c) fl(dt)

        def seeds(ym, f0, f1):
            return torch.stack([ym * w[i] + (f0 if i == 0 else 0) + (f1 if i == S - 1 else 0)
                                for i in range(S)]).contiguous()

        gy0, gy1, gym, gf0, gf1 = grads[:5]
        sk = seeds(gym, gf0, gf1)
        if nq:
            qy0, qy1, qym, qf0, qf1 = grads[5:10]
            skq, gq_last, gq_before = seeds(qym, qf0, qf1), qy1.contiguous(), (qy1 + qy0 + qym).contiguous()
        else:
            gq_last = gq_before = gzT.new_zeros(B, 1)
            skq = gzT.new_zeros(S, B, 1)
        return gy1.contiguous(), gq_last, gq_before, (sk, skq, (gy0 + gym).contiguous()), (grads[-1] if want_x
                                                                                             else None)

    def adaptive_backward(self, saved, gzT, gqT, want_t: bool):
        """The exact gradient of :meth:`adaptive`: ``(gz0, gq0, g_t or None, param grads)``. Step sizes are constants
        and the clock is ``t0 + constant``: ``t1`` enters through the interpolation coordinate, ``t0`` through every
        stage time and the coordinate (``g_t``: the gradients of both, float64)."""
        n_acc = saved["steps"]
        dw, dv, scr, nprog = self.k.backward_buffers(gzT)
        if n_acc == 0:  # t0 == t1: the identity
            return gzT, gqT, (gzT.new_zeros(2, dtype=torch.float64) if want_t else None), self.k.param_grads(dw, dv), 0
        ctl = saved["ctl"]
        cur = ctl[K.C_CUR.value].to(torch.long).reshape(1)
        x, width, dts = _end_coordinate(ctl, saved["time_f32"], gzT.dtype)
        gy1, gq_last, gq_before, seeds, g_x = self._interpolation_adjoint(saved["bufs"], 1 - cur, cur, x, dts, gzT,
                                                                         gqT, want_t)
        gz = self._step_backward(saved, n_acc - 1, gy1, gq_last, seeds, dw, dv, scr, nprog)
        for n in reversed(range(n_acc - 1)):
            gz = self._step_backward(saved, n, gz.contiguous(), gq_before, None, dw, dv, scr, nprog)
        g_t = None
        if want_t:  # x = (dir * t1 - taup) / width, taup = dir * t0 + constant; every stage time is t0 + constant
            g_x = g_x.to(torch.float64) * ctl[K.C_DIR.value] / width
            g_t = torch.stack([dv[:, :, 4].sum().to(torch.float64) - g_x, g_x])
        return gz, (gq_before if self.k.nq else gqT), g_t, self.k.param_grads(dw, dv), self.k.spec.S * n_acc

    def _first_step(self, tau0, dirn, z0, q0, f0, fq0, e, rtol, atol, time_dtype):
        """The RK spec's initial step on the device, in odeint's tau = dir * t (its state: z and q flattened)."""
        B, D = z0.shape
        nqn = self.k.nq_norm
        dtype = z0.dtype
        sign = dirn.to(dtype)

        def flat(z, q):
            return torch.cat([z.reshape(-1), q.t().reshape(-1)])

        def norm(x):
            parts = [x[: B * D]] + [x[B * D + j * B: B * D + (j + 1) * B] for j in range(nqn)]
            return torch.stack([p.abs().pow(2).mean().sqrt() for p in parts]).max()

        def call(tt, y):
            zz = y[: B * D].reshape(B, D)
            f, q = self.k.evaluate((dirn * tt.to(torch.float64)).to(dtype), zz, e)
            return flat(f, q) * sign

        dt, _ = initial_step(call, tau0.to(time_dtype), flat(z0, q0), flat(f0, fq0) * sign, self.k.spec.ORDER - 1,
                             rtol, atol, norm, step_dtype=dtype)
        return dt.to(time_dtype)

    def _last_step(self, bufs, prev, cur, B: int):
        """Each row's last accepted step as the interpolant needs it: ``[y0, y1, y_mid, f0, f1]`` for z and (sliced to
        the NQ rates) for q; ``prev`` / ``cur``: the slots of the step's start and end, shape (1,) or (B,)."""
        Z, Q, F, FQ, MID, MIDQ = bufs
        rows = torch.arange(B, device=Z.device)
        prev, cur = prev.expand(B), cur.expand(B)
        slots = (prev, cur, cur, prev, cur)
        zparts = [X[i, rows] for X, i in zip((Z, Z, MID, F, F), slots)]
        qparts = [X[i, rows][:, : self.k.nq] for X, i in zip((Q, Q, MIDQ, FQ, FQ), slots)] if self.k.nq else []
        return zparts, qparts

    def _interpolate(self, bufs, prev, cur, x, dt, moved, z0, q0):
        """torchdiffeq's quartic interpolant of each row's last accepted step at the end time (no host read):
        ``(zT, qT)``; rows whose solve took no step (``moved`` False: t0 == t1) keep their start."""
        zparts, qparts = self._last_step(bufs, prev, cur, z0.shape[0])
        zT = torch.where(moved, _quartic(*zparts, dt, x), z0)
        qT = torch.where(moved, _quartic(*qparts, dt, x), q0) if self.k.nq else q0
        return zT, qT



def _quartic(y0, y1, ym, f0, f1, dt, x):
    """torchdiffeq's quartic interpolant of a step from its ends, midpoint and end slopes, at fraction ``x``."""
    return quartic_eval(quartic_coefficients(y0, y1, ym, f0, f1, dt), x)


def _grown(buf: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    """A tape of at least ``n`` states like ``like`` holding ``buf``'s (grown geometrically: one copy per doubling)."""
    if buf is not None and buf.shape[0] >= n:
        return buf
    out = empty((max(n, 2 * (buf.shape[0] if buf is not None else 0)),) + tuple(like.shape), like)
    if buf is not None:
        out[: buf.shape[0]] = buf
    return out



def _end_coordinate(ctl: torch.Tensor, time_f32: bool, dtype: torch.dtype):
    """``(x, width, dt)`` of the last accepted step from control blocks ``ctl`` (``(NCTL,)`` or ``(n, NCTL)``): the end
    time's fraction of the step (odeint's ``_interpolate``), the step's width in tau and its signed state step."""
    tau, taup, tend = ctl[..., K.C_TAU.value], ctl[..., K.C_TAUP.value], ctl[..., K.C_TEND.value]
    width = tau - taup
    if time_f32:  # RKAdaptiveSolver._x: each operation rounded to float32
        width = width.to(torch.float32).to(torch.float64)
        x = ((tend - taup).to(torch.float32).to(torch.float64) / width).to(torch.float32)
    else:
        x = (tend - taup) / width
    return x.to(dtype), width, (ctl[..., K.C_DIR.value] * ctl[..., K.C_HP.value]).to(dtype)


def _clock(t0: torch.Tensor, t1: torch.Tensor, time_f32: bool):
    """``(t0, dir, tau0, tau_end, rnd)`` on the device (float64): odeint integrates ``tau = dir * t`` forwards,
    its times rounded as the time dtype (``rnd``)."""
    rnd = (lambda x: x.to(torch.float32).to(torch.float64)) if time_f32 else (lambda x: x)
    t0d = t0.detach().to(torch.float64).reshape(())
    t1d = t1.detach().to(device=t0d.device, dtype=torch.float64).reshape(())
    dirn = torch.where(t1d < t0d, -1.0, 1.0).to(torch.float64)
    return t0d, dirn, rnd(dirn * t0d), rnd(dirn * t1d), rnd
