"""The adaptive RK solve as one pure tensor loop: what ``odeint(..., compile=True)`` hands to ``torch.compile``.

:class:`AdaptiveLoop` restates :class:`~fastode.solvers.rk_adaptive.RKAdaptiveSolver`'s attempt with tensors only
(no host read, no Python branch on a value), so that the whole solve is the body of one
``torch._higher_order_ops.while_loop``. It computes with the same specification, not a copy of it: the stages,
the solution and the embedded error are :func:`fastode.ops.rk.rk_step` with torchdiffeq's stage arithmetic
(:func:`~fastode.ops.rk.combine_stages_exact`), the error ratio is :func:`~fastode.ops.rk.error_ratio` under the
solve's norm, accept/reject and the next step are :meth:`IntegralController.adapt` in its tensor form, the first
step is :meth:`IntegralController.init`, and outputs come from the same interpolants (:mod:`fastode.interp`). What
the eager loop decides with Python ``if``s (the ``step_t`` / ``jump_t`` clipping, landing on output times, which
outputs an accepted step covers, ``max_num_steps`` per output interval, underflow, non-finite steps) is written
here with ``torch.where``; ``tests/test_compiled_loop.py`` runs this loop without compiling it and checks that it
takes the eager solver's steps.

The clock is float64 (holding values rounded to the solver's time dtype), as the eager loop's Python floats.
Outputs are filled for every requested time an accepted step covers, vectorised over the output times (a step
costs ``O(len(t) * numel(y))`` extra for it). A bad :class:`~fastode.codes.Status` stops the loop; the caller
reads it once, at the end.

``chunk`` attempts run per iteration of the loop (attempts past the end change nothing): the loop's condition is
read on the host once per iteration where inductor keeps the loop on the host (CUDA), so a chunk of attempts costs
one read; on the CPU the C++ wrapper runs the loop natively and ``chunk=1``.

With ``record=True`` each accepted step's start ``(t0, dt, y0, f0)`` is written to a tape of fixed capacity (the
discrete adjoint's checkpoints, :mod:`fastode.compiled.adjoint`); a full tape stops the loop with
``Status.TAPE_FULL`` and the caller re-runs with a larger one.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ..codes import Status
from ..interp import quartic_eval, quartic_fit, tableau_dense
from ..ops.rk import combine_stages_exact, error_ratio, rk_step
from ..solvers.controller import ClipController

__all__ = ["AdaptiveLoop", "LoopState", "INIT_FAILED", "state_time", "unaliased", "python_loop"]

INIT_FAILED = 16   # the first-step heuristic gave a non-finite or non-positive step (a status of this loop only)

_F64 = torch.float64


def state_time(v: torch.Tensor, dtype: torch.dtype, perturb: int = 0) -> torch.Tensor:
    """The 0-dim time ``func`` sees for clock value ``v`` in the state's real ``dtype`` (the tensor form of
    ``state_time_value``: rounded, and nudged one ulp towards +-inf for ``perturb``)."""
    out = v.to(dtype)
    if perturb:
        out = torch.nextafter(out, torch.full((), math.inf if perturb > 0 else -math.inf, dtype=dtype,
                                              device=out.device))
    return out


class LoopState(NamedTuple):
    """The carried values of the loop (all tensors; shapes and dtypes fixed across iterations)."""
    t: torch.Tensor          # clock: end of the last accepted step (float64)
    dt: torch.Tensor         # the next attempt's proposed size (float64, unrounded as the eager loop's)
    y: torch.Tensor          # state at t
    f: torch.Tensor          # the next step's first stage (FSAL: the last stage of the last accepted step)
    ys: torch.Tensor         # (len(t_out), *y.shape) outputs
    n_attempts: torch.Tensor
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    n_interval: torch.Tensor  # attempts since the last output was passed (max_num_steps counts these)
    n_jumps: torch.Tensor     # re-evaluations of f past a jump_t point
    status: torch.Tensor
    t_fail: torch.Tensor      # where the loop stopped for a bad status
    nonfinite: torch.Tensor   # the last attempt's ratio was NaN/inf (an underflow then reports it)
    i_step: torch.Tensor      # pointers into step_t / jump_t
    i_jump: torch.Tensor
    tape_t: torch.Tensor      # (cap + 1,) accepted steps' start times (the last row is scratch)
    tape_dt: torch.Tensor     # (cap + 1,) their sizes
    tape_y: torch.Tensor      # (cap + 1, *y.shape) their start states (1 scratch row unless recording states)
    tape_f: torch.Tensor      # (cap + 1, *y.shape) their first stages


class AdaptiveLoop:
    """The attempt of an :class:`~fastode.solvers.rk_adaptive.RKAdaptiveSolver` as tensor functions.

    Built from a configured eager solver (its validated options, tolerances, controller, rounding and clipping
    points are read from it, so options are validated once, by the solver) and the solver's ``func`` without its
    counting wrapper (``base(t, y)``): counts are tensors of the loop."""

    def __init__(self, solver, base: Callable, *, capacity: int = 0, record_states: bool = False, chunk: int = 1):
        self.s = solver
        self.base = base
        self.tab = solver.tableau
        self.rdtype = solver.rdtype
        self.tdtype = solver.time_dtype
        self.capacity = int(capacity)
        self.record_states = bool(record_states) and self.capacity > 0
        self.chunk = max(1, int(chunk))

    # ------------------------------------------------------------------------------------------ rounding
    def rnd(self, v: torch.Tensor) -> torch.Tensor:
        """A float64 clock value rounded to the time dtype (as the eager loop's ``_round``)."""
        return v if self.tdtype == _F64 else v.to(self.tdtype).to(_F64)

    def state_time(self, v: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        return state_time(v, self.rdtype, perturb)

    def stage_time(self, t0: torch.Tensor, dt: torch.Tensor, t1: torch.Tensor, c: float) -> torch.Tensor:
        """``t0 + c dt`` in the state's real dtype; ``nextafter(t1, -inf)`` at ``c == 1`` (the eager rules)."""
        if c == 1.0:
            return self.state_time(t1, -1)
        if self.rdtype == _F64:
            return t0 + c * dt
        return t0.to(self.rdtype) + torch.full((), c, dtype=self.rdtype, device=t0.device) * dt.to(self.rdtype)

    # ------------------------------------------------------------------------------------------ pieces
    def ratio(self, y_err, y0, y1) -> torch.Tensor:
        s = self.s
        if s._promote_0dim:
            y_err, y0, y1 = y_err.to(s.time_dtype), y0.to(s.time_dtype), y1.to(s.time_dtype)
        return error_ratio(y_err, y0, y1, s.rtol, s.atol, s.norm).to(_F64)

    def step(self, t0, dt, t1, y0, f0, *, func=None):
        """The RK step of size ``dt`` from ``(t0, y0, f0)`` ending at ``t1``: ``(RKStep, dt in the state dtype)``."""
        dt_arg = dt.to(self.rdtype)
        tc = [None] + [self.stage_time(t0, dt, t1, c) for c in self.tab.c[1:]]
        return rk_step(func or self.base, None, y0, f0, dt_arg, self.tab, tc=tc, combine=combine_stages_exact), dt_arg

    def interpolate(self, y0, y1, k, dt_arg, x):
        """The solver's interpolant at the fractions ``x`` (a ``(T,)`` tensor): ``(T, *y0.shape)``."""
        xs = x.to(self.rdtype).reshape((-1,) + (1,) * y0.dim())
        if self.s.interp == "dense":
            return tableau_dense(self.tab, y0, k, dt_arg, xs)
        return quartic_eval(quartic_fit(y0, y1, k, dt_arg, self.tab.c_mid), xs)

    def first_step(self, t0: torch.Tensor, y0, f0) -> torch.Tensor:
        s = self.s
        if s.first_step is not None:
            return torch.full((), s._round(s.first_step), dtype=_F64, device=y0.device)
        if s._promote_0dim:
            yy, ff = y0.to(s.time_dtype), f0.to(s.time_dtype)
            call = lambda t, y: self.base(t, y).to(y.dtype)  # noqa: E731
            step_dtype = yy.dtype
        else:
            yy, ff = y0, f0
            call = lambda t, y: self.base(t.to(self.rdtype), y)  # noqa: E731
            step_dtype = self.rdtype
        dt, _ = s.controller.init(call, t0.to(s.time_dtype), yy, ff, s.rtol, s.atol, s.norm, step_dtype=step_dtype)
        return self.rnd(dt.to(s.time_dtype).to(_F64))

    # ------------------------------------------------------------------------------------------ the loop
    def init(self, y0: torch.Tensor, t_out: torch.Tensor, clip=(None, 0, None, 0)) -> LoopState:
        """The state before the first attempt: ``f0``, the first step, outputs ``[y0, poison...]``, zero counts."""
        dev = y0.device
        t0 = t_out[0]
        f0 = self.base(self.state_time(t0), y0)
        dt = self.first_step(t0, y0, f0)
        bad_dt = ~(torch.isfinite(dt) & (dt > 0))
        i64 = lambda v: torch.full((), v, dtype=torch.int64, device=dev)  # noqa: E731
        ys = torch.full((t_out.shape[0],) + tuple(y0.shape), math.nan, dtype=y0.dtype, device=dev)
        ys = torch.cat([y0[None], ys[1:]])
        cap = self.capacity + 1
        rows = cap if self.record_states else 1   # (zero-size tensors would look aliased to while_loop)
        return LoopState(
            t=t0, dt=dt, y=y0, f=f0, ys=ys, n_attempts=i64(0), n_accepted=i64(0), n_rejected=i64(0),
            n_interval=i64(0), n_jumps=i64(0), status=torch.where(bad_dt, i64(INIT_FAILED), i64(0)), t_fail=t0,
            nonfinite=torch.zeros((), dtype=torch.bool, device=dev), i_step=i64(clip[1]),
            i_jump=i64(clip[3]),
            tape_t=torch.zeros(cap, dtype=_F64, device=dev), tape_dt=torch.zeros(cap, dtype=_F64, device=dev),
            tape_y=y0.new_zeros((rows,) + tuple(y0.shape)), tape_f=y0.new_zeros((rows,) + tuple(y0.shape)))

    # ------------------------------------------------------------------------------------------ carried values
    # The loop carries few tensors: the float64 scalars stacked in one, the counters in another, then the
    # state, its first stage, the outputs and (when recording) the tape. Each carried tensor is a buffer the
    # compiled loop allocates per iteration, which on tiny problems costs more than the arithmetic.
    _CLOCK = ("t", "dt", "t_fail")
    _COUNTS = ("n_attempts", "n_accepted", "n_rejected", "n_interval", "n_jumps", "status", "nonfinite", "i_step",
               "i_jump")

    def pack(self, st: LoopState) -> tuple:
        """The tensors the loop carries for the logical state ``st``."""
        clock = torch.stack([getattr(st, n) for n in self._CLOCK])
        counts = torch.stack([getattr(st, n).to(torch.int64) for n in self._COUNTS])
        out = (clock, counts, st.y, st.f, st.ys)
        if self.capacity:
            out += (st.tape_t, st.tape_dt) + ((st.tape_y, st.tape_f) if self.record_states else ())
        return out

    def unpack(self, carried, scratch: LoopState) -> LoopState:
        """The logical state from the carried tensors (``scratch``: the initial state, for what is not carried)."""
        clock, counts, y, f, ys, *tape = carried
        fields = {n: clock[i] for i, n in enumerate(self._CLOCK)}
        fields.update({n: counts[i] for i, n in enumerate(self._COUNTS)})
        fields["nonfinite"] = fields["nonfinite"] != 0
        tape_t, tape_dt, tape_y, tape_f = scratch.tape_t, scratch.tape_dt, scratch.tape_y, scratch.tape_f
        if self.capacity:
            tape_t, tape_dt = tape[0], tape[1]
            if self.record_states:
                tape_y, tape_f = tape[2], tape[3]
        return LoopState(y=y, f=f, ys=ys, tape_t=tape_t, tape_dt=tape_dt, tape_y=tape_y, tape_f=tape_f, **fields)

    def cond(self, t_out: torch.Tensor):
        # (indexes t_out inside: a view of it captured beside it would alias two of the loop's inputs)
        status, t = self._COUNTS.index("status"), self._CLOCK.index("t")

        def cond(clock, counts, *rest):
            return (counts[status] == 0) & (clock[t] < t_out[-1])
        return cond

    def attempt(self, t_out: torch.Tensor, step_pts, jump_pts, scratch: LoopState):
        """The loop body: one attempt from the carried state (see the module docstring)."""
        s, ctl = self.s, self.s.controller
        n_out = t_out.shape[0]
        land = s.land_on
        i64 = torch.int64

        def one(*carried):
            st = self.unpack(carried, scratch)
            t, y, f = st.t, st.y, st.f
            # an attempt of a chunk that starts after the loop's end (or a failure) changes nothing
            active = (st.status == 0) & (t < t_out[-1]) if self.chunk > 1 else torch.ones_like(st.nonfinite)
            dt = ctl.clamp(torch.where(torch.isfinite(st.dt), st.dt, torch.full_like(st.dt, s.min_step)))
            t_end = self.rnd(t + dt)
            underflow = active & ~(t_end > t)
            maxed = active & (st.n_interval >= s.max_num_steps)
            # ---- ClipController.propose, with where() for its ifs
            on_st = on_jt = landed = torch.zeros((), dtype=torch.bool, device=t.device)
            if step_pts is not None:
                nst = step_pts[st.i_step]
                on_st = (t < nst) & (nst < t_end)
                t_end = torch.where(on_st, nst, t_end)
                dt = torch.where(on_st, self.rnd(nst - t), dt)
            if jump_pts is not None:
                njt = jump_pts[st.i_jump]
                on_jt = (t < njt) & (njt < t + dt)
                on_st = on_st & ~on_jt
                t_end = torch.where(on_jt, njt, t_end)
                dt = torch.where(on_jt, self.rnd(njt - t), dt)
            dt_unclipped = dt
            if land is not None:
                oi = (t_out <= t).sum().clamp(max=n_out - 1)
                tt = t_out[oi]
                has_target = torch.ones_like(on_st) if land == "all" else (oi == n_out - 1)
                landed = has_target & ((t_end >= tt) | ((tt - t_end <= 0.01 * dt) & (tt - t <= s.max_step)))
                t_end = torch.where(landed, tt, t_end)
                dt = torch.where(landed, self.rnd(tt - t), dt)
            # ---- the step, its error, the controller
            step, dt_arg = self.step(t, dt, t_end, y, f)
            r = self.ratio(step.y_err, y, step.y1)
            accept, dt_next = ctl.adapt(dt, r, landed=landed)
            accept = accept & active
            nonfinite = active & ~torch.isfinite(r)
            forced_nonfinite = nonfinite & (dt <= s.min_step)
            bad = maxed | underflow | forced_nonfinite
            code = lambda v: torch.full((), int(v), dtype=i64, device=t.device)  # noqa: E731
            status = torch.where(maxed, code(Status.MAX_STEPS), torch.where(
                underflow, torch.where(st.nonfinite, code(Status.NONFINITE), code(Status.UNDERFLOW)),
                torch.where(forced_nonfinite, code(Status.NONFINITE), code(0))))
            accept = accept & ~bad
            if land is not None:
                dt_next = torch.where(landed & accept, ctl.clamp(torch.maximum(dt_next, dt_unclipped)), dt_next)
            # ---- outputs covered by the accepted step
            covered = accept & (t_out > t) & (t_out <= t_end)
            x = self.rnd(self.rnd(t_out - t) / self.rnd(t_end - t))
            vals = self.interpolate(y, step.y1, step.k, dt_arg, x)
            if land is not None:
                vals = torch.where((t_out == t_end).reshape((-1,) + (1,) * y.dim()), step.y1[None], vals)
            ys = torch.where(covered.reshape((-1,) + (1,) * y.dim()), vals, st.ys)
            # ---- the next first stage: FSAL, or f re-evaluated past a jump_t point
            f1 = step.k[-1]
            n_jumps = st.n_jumps
            if jump_pts is not None:
                jumped = accept & on_jt
                f1 = torch.cond(jumped, lambda yy, tt_, ff: self.base(self.state_time(tt_, 1), yy),
                                lambda yy, tt_, ff: ff.clone(), (step.y1, t_end, f1))
                n_jumps = n_jumps + jumped.to(i64)
            # ---- the tape of accepted steps
            tape_t, tape_dt, tape_y, tape_f = st.tape_t, st.tape_dt, st.tape_y, st.tape_f
            full = torch.zeros_like(accept)
            if self.capacity:
                full = accept & (st.n_accepted >= self.capacity)
                row = torch.where(accept & ~full, st.n_accepted, torch.full_like(st.n_accepted, self.capacity))
                row = row.reshape(1)
                tape_t = tape_t.index_copy(0, row, t.reshape(1))
                tape_dt = tape_dt.index_copy(0, row, dt.reshape(1))
                if self.record_states:
                    tape_y = tape_y.index_copy(0, row, y[None])
                    tape_f = tape_f.index_copy(0, row, f[None])
                status = torch.where(full & (status == 0), torch.full_like(status, Status.TAPE_FULL), status)
                accept = accept & ~full
            keep = lambda new, old: torch.where(accept, new, old)  # noqa: E731
            i_step, i_jump = st.i_step, st.i_jump
            if step_pts is not None:
                i_step = i_step + (accept & on_st & (i_step != step_pts.shape[0] - 1)).to(i64)
            if jump_pts is not None:
                i_jump = i_jump + (accept & on_jt & (i_jump != jump_pts.shape[0] - 1)).to(i64)
            attempted = active & ~(maxed | underflow)
            out = LoopState(
                t=keep(t_end, t), dt=torch.where(bad | ~active, st.dt, dt_next), y=keep(step.y1, y),
                f=keep(f1, f), ys=ys,
                n_attempts=st.n_attempts + attempted.to(i64), n_accepted=st.n_accepted + accept.to(i64),
                n_rejected=st.n_rejected + (attempted & ~accept & ~full).to(i64),
                n_interval=torch.where(covered.any(), torch.zeros_like(st.n_interval), st.n_interval + active.to(i64)),
                n_jumps=n_jumps, status=torch.where(active, status, st.status),
                t_fail=torch.where(active & (status != 0), t, st.t_fail),
                nonfinite=torch.where(active, ~accept & (st.nonfinite | nonfinite), st.nonfinite),
                i_step=i_step, i_jump=i_jump, tape_t=tape_t, tape_dt=tape_dt, tape_y=tape_y, tape_f=tape_f)
            return self.pack(out)

        def body(*carried):
            out = carried
            for _ in range(self.chunk):
                out = one(*out)
            return unaliased(out, carried)
        return body

    def clipping(self, t0: float, dev):
        """``(step points, pointer, jump points, pointer)`` ahead of the host start time ``t0``: the eager
        :class:`~fastode.solvers.controller.ClipController`'s :meth:`reset` (its checks included), as tensors."""
        s = self.s
        if not (s.step_t or s.jump_t):
            return None, 0, None, 0
        clip = ClipController(s.step_t, s.jump_t, s.max_step, s._round)
        clip.reset(t0)
        as_t = lambda v: torch.tensor(v, dtype=_F64, device=dev) if v else None  # noqa: E731
        return as_t(clip._step_ts), clip._next_step, as_t(clip._jump_ts), clip._next_jump

    def solve(self, y0: torch.Tensor, t_out: torch.Tensor, t0: float, loop: Callable) -> LoopState:
        """The whole solve from ``y0`` at ``t_out[0]`` (``t0``: its host value, for the clipping points);
        ``loop(cond, body, state)`` is ``while_loop`` (compiled or not) or :func:`python_loop`."""
        t_out = t_out.to(_F64)
        clip = self.clipping(t0, y0.device)
        state = self.init(y0, t_out, clip)
        if t_out.shape[0] == 1:
            return state
        # distinct tensors (y0 is the caller's): a loop's inputs may not alias
        out = loop(self.cond(t_out), self.attempt(t_out, clip[0], clip[2], state),
                   tuple(x.clone() for x in self.pack(state)))
        return self.unpack(out, state)

    # ------------------------------------------------------------------------------------------ for the adjoint
    fsal = True   # the first stage is carried from step to step (its cotangent too)

    def fraction(self, t_out, t0, t1) -> torch.Tensor:
        """Where each output time lies in the step, ``(t - t0) / (t1 - t0)`` rounded as the clock (``_x``)."""
        return self.rnd(self.rnd(t_out - t0) / self.rnd(t1 - t0)).to(self.rdtype)

    def record(self, st: LoopState, aux, j: torch.Tensor):
        """Accepted step ``j`` from the tape: ``(t0, t1, y0, f0, dt)`` (its end is the next step's start)."""
        idx = j.reshape(1)
        nxt = (j + 1).clamp(max=self.capacity).reshape(1)
        t1 = torch.where(j == st.n_accepted - 1, st.t, st.tape_t.index_select(0, nxt)[0])
        return (st.tape_t.index_select(0, idx)[0], t1, st.tape_y.index_select(0, idx)[0],
                st.tape_f.index_select(0, idx)[0], st.tape_dt.index_select(0, idx)[0])

    def steps_taken(self, st: LoopState) -> torch.Tensor:
        return st.n_accepted

    def replay(self, dt, t0, t1, y0, f0, t_out, covered, x, func):
        """``(y1, k_last, outputs)`` of the accepted step: the map the adjoint differentiates."""
        step, dt_arg = self.step(t0, dt, t1, y0, f0, func=func)
        vals = self.interpolate(y0, step.y1, step.k, dt_arg, x)
        if self.s.land_on is not None:
            vals = torch.where((t_out == t1).reshape((-1,) + (1,) * y0.dim()), step.y1[None], vals)
        return step.y1, step.k[-1], vals

    def num_fevals(self, st: LoopState) -> torch.Tensor:
        """Evaluations of ``func`` (the eager ``ODEFunc``'s count): ``f0``, the first-step trial, ``stages - 1``
        per attempt (the first stage is reused), the re-evaluations past ``jump_t`` points."""
        init = 1 + (1 if self.s.first_step is None else 0)
        return init + st.n_attempts * (self.tab.stages - 1) + st.n_jumps


def unaliased(out, inputs) -> tuple:
    """``out`` with every tensor that is one of ``inputs`` cloned: a ``while_loop`` body may not return its
    inputs (higher-order ops do not support aliasing)."""
    ids = {id(x) for x in inputs}
    return tuple(o.clone() if id(o) in ids else o for o in out)


def python_loop(cond, body, state):
    """``while_loop``'s semantics as a plain Python loop (one host read per attempt): for tests and debugging."""
    while bool(cond(*state)):
        state = tuple(body(*state))
    return state
