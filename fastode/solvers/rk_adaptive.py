"""Adaptive explicit Runge-Kutta loop (dopri8, dopri5, tsit5, bosh3, fehlberg2, adaptive_heun).

With default options a solve takes exactly torchdiffeq 0.2.5's steps (same NFE): Hairer-Norsett-Wanner
initial step, error ratio ``rms(err / (atol + rtol*max(|y0|, |y1|)))``, step factor
``min(ifactor, max(safety / r**(1/order), 1 if r < 1 else dfactor))``, stages at ``c == 1`` evaluated at
``nextafter(t1, -inf)`` in the state dtype, the last stage reused as the next step's first (for every method,
as torchdiffeq does), overshoot of output times and torchdiffeq's quartic interpolation.

The clock (``t0``, ``dt``, ``t1``) is kept on the host as Python floats rounded to the time dtype (option
``dtype``, default float64), so step-size control costs one host synchronisation per step (reading the error
ratio) and no device-side scalar bookkeeping. Step sizes are constants of the computation (not
differentiated); the clock is ``t[0] + constant`` so gradients w.r.t. ``t`` are exact for the discrete solve.

Options (torchdiffeq's): ``first_step``, ``safety``, ``ifactor``, ``dfactor``, ``min_step``, ``max_step``,
``max_num_steps``, ``step_t``, ``jump_t``, ``dtype``, ``norm``. fastode additions (opt-in):

* ``max_num_steps``: default :data:`DEFAULT_MAX_NUM_STEPS` (= 10000) step attempts per output interval
  (torchdiffeq: 2**31 - 1, which in practice hangs); exceeding it raises
  :class:`~fastode.errors.MaxStepsExceededError`.
* ``interp="quartic"`` (default, torchdiffeq's) or ``"dense"``: the method's own continuous extension
  (tsit5, dopri5, dopri8) for output times inside a step.
* ``land_on=None`` (default: overshoot and interpolate), ``"end"`` (shorten the last step to land exactly on
  ``t[-1]``) or ``"all"`` (land exactly on every output time; no interpolation).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..compiling import host_floats
from ..errors import (InvalidOptionError, MaxStepsExceededError, NonFiniteError, StepSizeUnderflowError,
                      STEP_FAILURE_REMEDIES, STIFF_REMEDIES)
from ..events import find_event
from ..interp import quartic_eval, quartic_fit, tableau_dense
from ..launch_count import host_read
from ..ops.rk import combine_stages_exact, resolve_rk_ops, rk_step
from ..tableaus import TABLEAUS, ButcherTableau
from .base import Perturb, Solver, _null_callback, number_option, real_dtype, state_time_value, time_tensor
from .controller import ClipController, IntegralController

__all__ = ["RKAdaptiveSolver", "DEFAULT_MAX_NUM_STEPS", "StepRecord", "DenseStep"]

DEFAULT_MAX_NUM_STEPS = 10_000


def _tvals(name, value, cls):
    """step_t / jump_t as a sorted host list of floats."""
    if value is None:
        return None
    try:
        arr = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
    except Exception:
        raise InvalidOptionError(f"{cls.__name__}: option {name!r} must be a 1-D tensor or a sequence of times, "
                                 f"got {value!r}") from None
    return arr.tolist()


class RKAdaptiveSolver(Solver):
    """Adaptive RK solver for any tableau with an error estimate (``tableau.b_err``)."""

    adaptive = True
    tableau: ButcherTableau

    def __init__(self, func, y0, rtol, atol, min_step=0, max_step=float('inf'), first_step=None, step_t=None,
                 jump_t=None, safety=0.9, ifactor=10.0, dfactor=0.2, max_num_steps=DEFAULT_MAX_NUM_STEPS,
                 dtype=torch.float64, interp="quartic", land_on=None, norm=None, **unused_kwargs):
        super().__init__(func, y0, rtol, atol, norm=norm, **unused_kwargs)
        cls = type(self)
        self.rdtype = real_dtype(y0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidOptionError(f"{cls.__name__}: option 'dtype' must be a floating torch.dtype (the dtype of "
                                     f"time-like quantities), got {dtype!r}")
        self.time_dtype = torch.promote_types(dtype, self.rdtype)
        self.rtol = self._tol(rtol)
        self.atol = self._tol(atol)
        self.min_step = number_option(cls.__name__, "min_step", min_step)
        self.max_step = number_option(cls.__name__, "max_step", max_step)
        self.first_step = None if first_step is None else number_option(cls.__name__, "first_step", first_step)
        self.safety = number_option(cls.__name__, "safety", safety)
        self.ifactor = number_option(cls.__name__, "ifactor", ifactor)
        self.dfactor = number_option(cls.__name__, "dfactor", dfactor)
        if not (self.min_step >= 0 and self.max_step > 0 and self.min_step <= self.max_step):
            raise InvalidOptionError(f"{cls.__name__}: need 0 <= min_step <= max_step and max_step > 0, got "
                                     f"min_step={self.min_step}, max_step={self.max_step}")
        if self.first_step is not None and not (self.first_step > 0 and math.isfinite(self.first_step)):
            raise InvalidOptionError(f"{cls.__name__}: first_step must be a positive finite number, got "
                                     f"{self.first_step} (for decreasing t give its magnitude)")
        if not (self.safety > 0 and self.ifactor > 0 and self.dfactor > 0):
            raise InvalidOptionError(f"{cls.__name__}: safety, ifactor and dfactor must be positive, got "
                                     f"safety={self.safety}, ifactor={self.ifactor}, dfactor={self.dfactor}")
        if isinstance(max_num_steps, torch.Tensor):
            max_num_steps = max_num_steps.item()
        if max_num_steps is None or not (max_num_steps >= 1):
            raise InvalidOptionError(f"{cls.__name__}: max_num_steps must be a positive integer, got {max_num_steps!r}")
        self.max_num_steps = max_num_steps
        self.step_t = _tvals("step_t", step_t, cls)
        self.jump_t = _tvals("jump_t", jump_t, cls)
        if interp not in ("quartic", "dense"):
            raise InvalidOptionError(f"{cls.__name__}: interp must be 'quartic' (torchdiffeq's interpolant) or "
                                     f"'dense' (the method's own continuous extension), got {interp!r}")
        if interp == "dense" and self.tableau.dense is None:
            have = [n for n, t in TABLEAUS.items() if t.dense is not None]
            raise InvalidOptionError(f"{cls.__name__}: interp='dense' needs a method with its own dense output "
                                     f"({', '.join(have)}); use interp='quartic' with this method")
        self.interp = interp
        if land_on not in (None, "end", "all"):
            raise InvalidOptionError(f"{cls.__name__}: land_on must be None (overshoot and interpolate, as "
                                     f"torchdiffeq), 'end' (land exactly on t[-1]) or 'all' (land on every output "
                                     f"time), got {land_on!r}")
        self.land_on = land_on
        self.order = self.tableau.order
        self.controller = IntegralController(self.order, self.safety, self.ifactor, self.dfactor, self.min_step,
                                             self.max_step)
        self.ops = resolve_rk_ops(y0, self.norm)   # once per solve: the stage loop calls these directly
        # 0-dim real states: torchdiffeq's 0-dim float64 tolerances promote the error ratio and the initial-step
        # heuristic to float64; reproduced so that scalar problems take the same steps
        self._promote_0dim = y0.dim() == 0 and not y0.is_complex()
        if self.time_dtype == torch.float64:
            self._round = float
        else:
            np_t = np.float32 if self.time_dtype == torch.float32 else None
            if np_t is not None:
                self._round = lambda v: float(np_t(v))
            else:
                td = self.time_dtype
                self._round = lambda v: float(torch.tensor(v, dtype=td))

    @classmethod
    def valid_callbacks(cls):
        return {'callback_step', 'callback_accept_step', 'callback_reject_step'}

    def _tol(self, tol):
        if isinstance(tol, torch.Tensor):
            if tol.numel() == 1 and tol.dim() == 0:
                return float(tol)
            return tol.to(device=self.y0.device, dtype=torch.promote_types(self.time_dtype, tol.dtype)
                          if tol.is_floating_point() else self.time_dtype)
        return float(tol)

    # ------------------------------------------------------------------------------------------ time helpers
    def _time(self, value, perturb=0, c=0.0):
        """Tensor ``func`` sees for clock value ``value`` (state real dtype, differentiable w.r.t. t)."""
        out = torch.full((), state_time_value(value, self.rdtype, perturb), dtype=self.rdtype,
                         device=self.y0.device)
        g = self._grad_offset(c)
        return out if g is None else out + g.to(self.rdtype)

    def _grad_offset(self, c=0.0):
        """Zero-valued tensor carrying d(clock + c*dt)/d(t) for the current step (None without t-gradients).

        The clock is ``anchor + constant``: the anchor is ``t[0]`` until a step is shortened to land on an output
        time ``t[i]`` (then ``t[i]``) or on a constant ``step_t``/``jump_t`` point (then no anchor); step sizes are
        constants except for such shortened steps, whose ``dt = end - clock(t0)`` is differentiable.
        """
        g = None
        if self._anchor is not None:
            g = self._anchor - self._anchor.detach()
        if c and self._dt_grad is not None:
            d = c * (self._dt_grad - self._dt_grad.detach())
            g = d if g is None else g + d
        return g

    def _clock(self, value):
        """Clock value as a time-dtype tensor (differentiable w.r.t. t[0])."""
        out = torch.full((), value, dtype=self.time_dtype, device=self.y0.device)
        if self._anchor is not None:
            out = out + (self._anchor - self._anchor.detach()).to(self.time_dtype)
        return out

    def _stage_value(self, t0, dt, c):
        """``t0 + c*dt`` computed in the state's real dtype (torchdiffeq computes stage times there)."""
        if self.rdtype == torch.float64:
            return t0 + c * dt
        if self.rdtype == torch.float32:
            f = np.float32
            return float(f(t0) + f(c) * f(dt))
        td = self.rdtype
        return float(torch.tensor(t0, dtype=td) + torch.tensor(c, dtype=td) * torch.tensor(dt, dtype=td))

    def _set_anchor(self, spec):
        self._anchor_spec = spec
        self._anchor = None if (spec is None or self._t_tensor is None) else self._t_tensor[spec[1]]

    def _describe(self, t):
        return float(self.func.describe_time(t))

    # ------------------------------------------------------------------------------------------ integration
    def _setup_time(self, t):
        self._anchor = None
        self._t_tensor = None
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            self._t_tensor = t.to(self.time_dtype)
        self._set_anchor(("t", 0))
        self._dt_grad = None
        return [self._round(v) for v in host_floats(t.detach().reshape(-1))]

    def integrate(self, t):
        t_host = self._setup_time(t)
        self._before_integrate(t_host[0])
        solution = [self.y0]
        n = len(t_host)
        for i in range(1, n):
            target = None
            if self.land_on == "all" or (self.land_on == "end" and i == n - 1):
                target = i
            solution.append(self._advance(t_host, i, target))
        return torch.stack(solution)

    def _before_integrate(self, t0):
        self.t0 = self.t1 = t0
        self.y = self.y0
        self.f = self.func(self._time(t0), self.y0)
        if self.first_step is None:
            self.dt = self._select_initial_step(t0, self.y0, self.f)
        else:
            self.dt = self._round(self.first_step)
        self.last = None
        self._interp_cache = None
        self._nonfinite = None
        self._f0_kind = ("init",)
        self.clipper = ClipController(self.step_t, self.jump_t, self.max_step, self._round)
        self.clipper.reset(t0)

    def _select_initial_step(self, t0, y0, f0):
        """The controller's first step (torchdiffeq's Hairer-Norsett-Wanner heuristic); one host sync."""
        y0, f0 = y0.detach(), f0.detach()
        if self._promote_0dim:
            # torchdiffeq: 0-dim float64 tolerances promote a 0-dim state's heuristic to float64 (func even
            # receives the float64 trial state); reproduced for identical steps
            y0, f0 = y0.to(self.time_dtype), f0.to(self.time_dtype)
            call = lambda t, y: self.func.call_raw(t, y).to(y.dtype)  # noqa: E731
            step_dtype = y0.dtype
        else:
            call = lambda t, y: self.func(t.to(self.rdtype), y)  # noqa: E731
            step_dtype = self.rdtype
        t0_t = torch.full((), t0, dtype=self.time_dtype, device=y0.device)
        dt, f1 = self.controller.init(call, t0_t, y0, f0, self.rtol, self.atol, self.norm, step_dtype=step_dtype)
        dt = float(dt.to(self.time_dtype))
        if not math.isfinite(dt) or dt <= 0:
            self._raise_initial_step_failure(t0, y0, f0, f1, dt)
        return self._round(dt)

    def _raise_initial_step_failure(self, t0, y0, f0, f1, dt):
        tu = self._describe(t0)
        if not bool(torch.isfinite(f0).all()):
            raise NonFiniteError(f"func returned NaN/inf at the initial time t={tu} (y0 is finite). Check func "
                                 f"for divisions by zero, log of non-positive numbers or overflowing exponentials.")
        if not bool(torch.isfinite(f1).all()):
            raise NonFiniteError(f"func returned NaN/inf while selecting the initial step near t={tu}. "
                                 f"Pass options={{'first_step': ...}} or check func. " + STEP_FAILURE_REMEDIES)
        raise StepSizeUnderflowError(f"could not select an initial step at t={tu} (got {dt}); pass "
                                     f"options={{'first_step': ...}}. " + STEP_FAILURE_REMEDIES)

    def _advance(self, t_host, i, target):
        next_t = t_host[i]
        n_steps = 0
        while next_t > self.t1:
            if n_steps >= self.max_num_steps:
                self._raise_max_steps(t_host[i - 1], next_t)
            self._adaptive_step(t_host, target)
            n_steps += 1
        return self._interpolate(next_t, i)

    def _raise_max_steps(self, ta, tb):
        raise MaxStepsExceededError(
            f"max_num_steps exceeded ({self.max_num_steps}>={self.max_num_steps}): {self.max_num_steps} step attempts "
            f"did not reach t={self._describe(tb)} from t={self._describe(ta)}; the solver is at "
            f"t={self._describe(self.t1)} with step size {self.dt:.3g}. If the problem genuinely needs more steps, "
            f"raise options={{'max_num_steps': ...}} (it counts attempts per output interval); otherwise the "
            f"problem is likely stiff or func is rough. " + STIFF_REMEDIES + " " + STEP_FAILURE_REMEDIES)

    def _adaptive_step(self, t_host, target):
        """One attempt from ``(self.t1, self.y, self.f)`` with the proposed size ``self.dt``: clipped
        (:class:`~fastode.solvers.controller.ClipController`: step_t / jump_t, landing on output ``target``), taken,
        and accepted or rejected by the integral controller, which proposes the next size."""
        t0, y0, f0 = self.t1, self.y, self.f
        dt = self.controller.clamp(self.dt if math.isfinite(self.dt) else self.min_step)
        if self.func.callback_step is not _null_callback:
            self.func.callback_step(self._clock(t0), y0, self._dt_tensor(dt))
        t1 = self._round(t0 + dt)
        if not t1 > t0:
            self._raise_underflow(t0, dt)
        clip = self.clipper.propose(t0, t1, dt, None if target is None else (target, t_host[target]))
        step, dt_arg, dt_state = self._compute_step(t0, clip.t1, clip.dt, clip.why, y0, f0)
        ratio = self._error_ratio(step, y0)
        r = float(ratio.detach())
        # (a landed step can exceed max_step by an ulp of rounding: not a reason to reject it)
        accept, dt_next = self.controller.adapt_host(clip.dt, r, landed=clip.landed)
        if not math.isfinite(r):
            if clip.dt <= self.min_step:
                self._raise_nonfinite(t0, clip.dt, y0, step, forced=True)
            if self._nonfinite is None:
                self._nonfinite = (t0, clip.dt, y0, step)
        self.stats.num_steps += 1
        if accept:
            self._accept(t0, y0, clip, step, dt_arg, dt_state, ratio)
            if clip.landed:  # landing shortened the step; the next one grows from the unlanded size
                dt_next = self.controller.clamp(max(dt_next, clip.dt_unclipped))
        else:
            if self.func.callback_reject_step is not _null_callback:
                self.func.callback_reject_step(self._clock(t0), y0, self._dt_tensor(clip.dt))
            self.stats.num_rejected_steps += 1
        self.dt = dt_next

    def _dt_tensor(self, dt: float) -> torch.Tensor:
        return torch.tensor(dt, dtype=self.time_dtype, device=self.y0.device)

    def _error_ratio(self, step, y0) -> torch.Tensor:
        """The attempt's error ratio (the caller reads it: one host sync per attempt)."""
        y_err, e0, e1 = step.y_err, y0, step.y1
        if self._promote_0dim:
            # torchdiffeq keeps its tolerances as 0-dim float64 tensors, which promote a 0-dim state's error
            # computation to float64; reproduce that so scalar problems take the same steps
            y_err, e0, e1 = y_err.to(self.time_dtype), e0.to(self.time_dtype), e1.to(self.time_dtype)
        if torch.is_grad_enabled() and not any(o.wants_error_graph for o in self.observers):
            with torch.no_grad():   # the ratio only decides the step, unless an observer differentiates it
                ratio = self.ops.error_ratio(y_err, e0, e1, self.rtol, self.atol, self.norm)
        else:
            ratio = self.ops.error_ratio(y_err, e0, e1, self.rtol, self.atol, self.norm)
        host_read("error ratio")
        return ratio

    def _accept(self, t0, y0, clip, step, dt_arg, dt_state, ratio) -> None:
        """An accepted attempt: the dense step, the record for observers, the clock's anchor, the next first stage
        (FSAL, stored, or re-evaluated past a jump_t discontinuity), the clipping points passed, the stats."""
        t1 = clip.t1
        if self.func.callback_accept_step is not _null_callback:
            self.func.callback_accept_step(self._clock(t0), y0, self._dt_tensor(clip.dt))
        f1 = step.k[-1]
        self.last = DenseStep(t0, t1, y0, step.y1, step.k, dt_arg, dt_state, self._dt_grad, self._anchor)
        self._interp_cache = None
        record = None
        if self.observers:
            record = StepRecord(t0, t1, clip.dt, clip.why, self._f0_kind, self._anchor_spec, y0.detach(),
                                self.f.detach() if self._f0_kind[0] == "stored" else None)
        self._f0_kind = ("jump",) if clip.on_jump_t else (("fsal",) if self.tableau.fsal else ("stored",))
        if clip.why is not None:
            self._set_anchor(clip.why if clip.why[0] == "target" else None)
        self.clipper.advance(clip)
        if clip.on_jump_t:  # just passed a discontinuity of f: re-evaluate f on the far side of it
            self._dt_grad = None
            f1 = self.func(self._time(t1, Perturb.NEXT), step.y1)
        self.t0, self.t1, self.y, self.f = t0, t1, step.y1, f1
        self._nonfinite = None
        stats = self.stats
        stats.num_accepted_steps += 1
        stats.step_ts.append(t0)
        stats.step_sizes.append(t1 - t0)
        if self.observers:
            self._notify_accepted(record, self.last, ratio)
        else:
            self._n_accepted += 1

    def _compute_step(self, t0, t1, dt, clip, y0, f0):
        """The RK step from ``(t0, y0, f0)`` to ``t1`` (shared by the solve and the checkpointed backward)."""
        # differentiable step size when t requires grad and the step was shortened to a time point
        self._dt_grad = self._dt_grad_for(t0, t1, clip)
        dt_state = state_time_value(dt, self.rdtype)
        if self._dt_grad is not None:
            dt_arg = torch.full((), dt_state, dtype=self.rdtype, device=y0.device) + \
                (self._dt_grad - self._dt_grad.detach()).to(self.rdtype)
        else:
            dt_arg = dt_state
        tc = [None] + [self._stage_time(t0, dt, t1, c) for c in self.tableau.c[1:]]  # k[0] = f0 is reused
        step = rk_step(self.func, t0, y0, f0, dt_arg, self.tableau, tc=tc, combine=combine_stages_exact)
        return step, dt_arg, dt_state

    def _dt_grad_for(self, t0, t1, clip):
        if self._t_tensor is None or clip is None:
            return None
        end = self._t_tensor[clip[1]] if clip[0] == "target" else \
            torch.full((), t1, dtype=self.time_dtype, device=self.y0.device)
        return end - self._clock(t0)

    # ------------------------------------------------------------------------------------------ replay
    def replay(self, record: "StepRecord", y0: torch.Tensor):
        """Recompute the accepted step ``record`` (from a :class:`~fastode.solvers.observers.Tape`) from the
        start state ``y0`` with the solve's exact clock, stage times and stage reuse: ``(step, f0)``.

        ``f0`` is recomputed from ``y0`` (for methods whose reused stage is ``f(t1, y1)``) or is a fresh leaf holding
        the recorded stage (fehlberg2, adaptive_heun). Afterwards :meth:`output` evaluates outputs in this step.
        Used by the checkpointed backward; call :meth:`begin_replay` with the times first."""
        kind = record.f0_kind
        self._set_anchor(record.anchor)
        self._dt_grad = None
        if kind[0] == "init":
            f0 = self.func(self._time(record.t0), y0)
        elif kind[0] == "jump":
            f0 = self.func(self._time(record.t0, Perturb.NEXT), y0)
        elif kind[0] == "fsal":
            # = the previous step's last stage, evaluated at nextafter(t1, -inf) on exactly this state
            f0 = self.func(self._time(record.t0, Perturb.PREV), y0)
        else:
            f0 = record.f0.detach().requires_grad_(True)
        step, dt_arg, dt_state = self._compute_step(record.t0, record.t1, record.dt, record.clip, y0, f0)
        self.last = DenseStep(record.t0, record.t1, y0, step.y1, step.k, dt_arg, dt_state, self._dt_grad,
                              self._anchor)
        self._interp_cache = None
        return step, f0

    def begin_replay(self, t: torch.Tensor) -> list:
        """Set up the clock for :meth:`replay` over the output times ``t`` (a leaf when ``d/dt`` is wanted);
        returns the host times."""
        return self._setup_time(t)

    def output(self, t_host: list, i: int) -> torch.Tensor:
        """Output ``i`` (time ``t_host[i]``) from the latest accepted or replayed step."""
        return self._interpolate(t_host[i], i)

    def evaluate(self, step: "DenseStep", x) -> torch.Tensor:
        """The solution at fraction ``x`` (float or 0-dim tensor) of the recorded step ``step`` (the solver's
        interpolant: quartic or the method's dense output). Used by :func:`fastode.odeint_dense`."""
        return self._eval_step(step, x)

    def _stage_time(self, t0, dt, t1, c):
        if c == 1.0:
            # always evaluate just before the end of the step, in case of a discontinuity there
            return self._time(t1, Perturb.PREV, c)
        return self._time(self._stage_value(t0, dt, c), 0, c)

    def _raise_underflow(self, t0, dt):
        if self._nonfinite is not None:
            t0n, dtn, y0n, stepn = self._nonfinite
            self._raise_nonfinite(t0n, dtn, y0n, stepn, forced=False)
        raise StepSizeUnderflowError(
            f"underflow in dt {dt}: the adaptive step size became too small to advance time at "
            f"t={self._describe(t0)} (rtol={self.rtol}, atol={self.atol}). " + STEP_FAILURE_REMEDIES)

    def _raise_nonfinite(self, t0, dt, y0, step, forced):
        tu = self._describe(t0)
        if not bool(torch.isfinite(y0).all()):
            raise NonFiniteError(f"non-finite values in state `y` at t={tu}. " + STEP_FAILURE_REMEDIES)
        where = ""
        for i, k in enumerate(step.k):
            if not bool(torch.isfinite(k).all()):
                where = (f" func returned NaN/inf in stage {i} of the step from t={tu} (stage time "
                         f"t={self._describe(self._stage_value(t0, dt, self.tableau.c[i]))}).")
                break
        how = ("it was accepted because dt <= min_step" if forced else
               "shrinking the step did not help until the step size underflowed")
        raise NonFiniteError(f"the solution became NaN/inf in the step from t={tu} with dt={dt:.3g} ({how}).{where} "
                             + STEP_FAILURE_REMEDIES)

    # ------------------------------------------------------------------------------------------ dense output
    def _interpolate(self, next_t, i):
        self._notify_output(i)
        last = self.last
        t0, t1, y1 = last.t0, last.t1, last.y1
        if self.land_on is not None and next_t == t1:
            return y1
        # a 0-dim tensor, as torchdiffeq's (a Python float would take the polynomial's powers in float64); with time
        # gradients it carries them, with the same value
        d = None
        if self._t_tensor is not None:
            c0, width = self._step_frame(last)
            d = (self._t_tensor[i] - c0) / width
        return self._eval_step(self.last, time_tensor(self._x(next_t, t0, t1), self.y0, anchor=d))

    def _step_frame(self, last):
        """``(start, width)`` of the accepted step ``last`` as time-dtype tensors that carry the time gradients:
        the clock's anchor (d/dt[anchor]) and, for a step shortened to a time point, its differentiable dt.
        The interpolation coordinate ``(t - start) / width`` then depends on the times as torchdiffeq's does
        (its step times are tensors computed from t)."""
        c0 = torch.full((), last.t0, dtype=self.time_dtype, device=self.y0.device)
        if last.anchor is not None:
            c0 = c0 + (last.anchor - last.anchor.detach()).to(self.time_dtype)
        width = last.dt_grad if last.dt_grad is not None else \
            torch.full((), last.t1 - last.t0, dtype=self.time_dtype, device=self.y0.device)
        return c0, width

    def _x(self, t, t0, t1):
        """The interpolation coordinate ``(t - t0) / (t1 - t0)``, each operation rounded to the time dtype (as
        torchdiffeq's tensors, and as :meth:`_interpolate`'s differentiable coordinate: the same value)."""
        rnd = self._round
        return state_time_value(rnd(rnd(t - t0) / rnd(t1 - t0)), self.rdtype)

    def _eval_step(self, last, x):
        y0, y1, k, dt_arg = last.y0, last.y1, last.k, last.dt_arg
        if self.interp == "dense":
            return tableau_dense(self.tableau, y0, k, dt_arg, x)
        grad = torch.is_grad_enabled()
        if self._interp_cache is None or self._interp_cache[0] is not last or self._interp_cache[1] != grad:
            # (coefficients fitted under no_grad, e.g. during event bisection, must not be reused with grad)
            self._interp_cache = (last, grad, quartic_fit(y0, y1, k, dt_arg, self.tableau.c_mid))
        return quartic_eval(self._interp_cache[2], x)

    # ------------------------------------------------------------------------------------------ events
    def integrate_until_event(self, t0, event_fn):
        t0 = t0.reshape(-1)
        t_host = self._setup_time(t0)
        self._before_integrate(t_host[0])
        event_t, y1 = self._advance_until_event(event_fn)
        return event_t, torch.stack([self.y0, y1], dim=0)

    def _advance_until_event(self, event_fn):
        tt = lambda v: torch.full((), v, dtype=self.time_dtype, device=self.y0.device)
        if event_fn(tt(self.t1), self.y) == 0:
            return tt(self.t1), self.y
        n_steps = 0
        sign0 = torch.sign(event_fn(tt(self.t1), self.y))
        start = self.t1
        while sign0 == torch.sign(event_fn(tt(self.t1), self.y)):
            if n_steps >= self.max_num_steps:
                raise MaxStepsExceededError(
                    f"max_num_steps exceeded ({n_steps}>={self.max_num_steps}): the event did not occur within "
                    f"{self.max_num_steps} step attempts after t={self._describe(start)} (the solver reached "
                    f"t={self._describe(self.t1)}). Raise options={{'max_num_steps': ...}} or check event_fn: it "
                    f"must change sign at the event.")
            self._adaptive_step(None, None)
            n_steps += 1
        last = self.last
        lt0, lt1 = last.t0, last.t1
        # the state at the event keeps its dependence on t0 through the step's frame (the bisection itself runs
        # under no_grad, where the frame's gradients cost nothing)
        c0, width = self._step_frame(last)

        def interp_fn(t):
            x = ((t - c0) / width).to(self.rdtype)
            return self._eval_step(last, x)

        atol = self.atol if isinstance(self.atol, float) else float(torch.as_tensor(self.atol).min())
        return find_event(interp_fn, sign0, tt(lt0), tt(lt1), event_fn, atol)


class DenseStep(NamedTuple):
    """An accepted step: what dense output needs (:meth:`RKAdaptiveSolver.evaluate`)."""
    t0: float
    t1: float
    y0: torch.Tensor
    y1: torch.Tensor
    k: list
    dt_arg: object             # float, or a 0-dim tensor when differentiable
    dt_state: float
    dt_grad: Optional[torch.Tensor]
    anchor: Optional[torch.Tensor]


class StepRecord(NamedTuple):
    """One accepted step as stored by ``gradient="checkpoint"``: enough to recompute it exactly."""
    t0: float
    t1: float
    dt: float
    clip: Optional[tuple]      # None | ("target", output index) | ("const",)  (why the step was shortened)
    f0_kind: tuple             # ("init",) | ("fsal",) | ("jump",) | ("stored",)
    anchor: Optional[tuple]    # ("t", index): the clock is t[index] + const; None: the clock is constant
    y0: torch.Tensor
    f0: Optional[torch.Tensor]  # only for ("stored",): methods whose reused stage is not f(t1, y1)
