"""Fixed-grid linear multistep solvers: ``explicit_adams``, ``implicit_adams`` and its alias ``fixed_adams``.

Semantics are torchdiffeq 0.2.5's ``AdamsBashforth`` / ``AdamsBashforthMoulton`` (``fixed_adams.py``):

* The grid, ``step_size``, ``grid_constructor``, ``interp`` ("linear"/"cubic") and ``perturb`` options behave
  exactly as for the fixed-grid RK methods (:class:`~fastode.solvers.fixed_grid.FixedGridSolver`).
* Every step evaluates ``f0 = func(t0, y0)`` and pushes it onto a history of past derivatives (newest first,
  at most ``max_order - 1`` entries; a step that starts at the same time as the previous one, i.e. a zero-length
  grid step, does not push). With fewer than 3 entries the step is a Runge-Kutta 3/8-rule step (``rk4``,
  reusing ``f0``: 3 more evaluations); otherwise it is an Adams-Bashforth step of order
  ``k = len(history)`` (so 3 at the third step, growing to ``max_order - 1 = 11`` by default):
  ``y1 = y0 + dt * sum_j beta_j f_{n-j}`` (one evaluation per step).
* ``implicit_adams`` then corrects with Adams-Moulton of order ``k + 1`` by functional iteration:
  ``dy <- dt * beta*_0 f(t1, y0 + dy) + dt * sum_{j>=1} beta*_j f_{n-j+1}``, at most ``max_iters`` (default 4)
  times, stopping when ``max |dy_new - dy_old| / (atol + rtol * max(|dy_old|, |dy_new|)) < 1`` (an L-infinity
  ratio relative to the *increments*, as in torchdiffeq). If it does not converge it warns
  ``"Functional iteration did not converge. Solution may be incorrect."`` and drops the *oldest* history
  entry (so the order stops growing). The corrector's last evaluation at ``t1`` is not reused: the next step
  evaluates ``f(t1, y1)`` afresh (torchdiffeq's ``_update_history(t0, f)`` is a no-op).
  Through ``odeint`` the corrector uses odeint's ``rtol``/``atol`` (defaults 1e-7/1e-9), so at default
  tolerances the iteration usually "fails" and warns -- torchdiffeq behaves the same way.
* ``max_order < 4`` warns ``"max_order is below 4, so the solver reduces to `rk4`."``; ``max_order > 12`` is an
  error. ``order`` (class attribute) is 4, as in torchdiffeq.

Coefficients are not tabulated: :func:`bashforth_coefficients` / :func:`moulton_coefficients` integrate the
Lagrange basis polynomials exactly with :class:`fractions.Fraction` and round once to float64 (they equal
torchdiffeq's stored integer/divisor tables to the last bit; ``tests/test_adams.py`` checks this).

Deliberate differences from torchdiffeq (all for inputs on which torchdiffeq crashes or misbehaves):

* ``max_order`` outside ``1..12`` and ``max_iters < 1`` raise :class:`~fastode.errors.InvalidOptionError`
  (torchdiffeq: ``AssertionError`` for ``> 12``; ``IndexError``/``UnboundLocalError``/``ValueError`` from inside the
  loop for the others). ``max_order`` in ``1..3`` works (pure ``rk4``) instead of crashing for ``1``.
* torchdiffeq passes ``atol=rtol`` to its base class (``super().__init__(..., atol=rtol)``); it then
  overwrites ``self.atol`` with the right value, so the bug has no observable effect and there is nothing to
  reproduce: here ``atol`` is simply ``atol``.
* ``gradient="checkpoint"`` is not available (a multistep step cannot be recomputed on its own: class attribute
  ``multistep = True``; replaying a step out of order raises :class:`~fastode.errors.InvalidOptionError`). Use
  ``gradient="direct"`` (exact gradient of the discrete solve) or ``"adjoint"``.
* NaN/inf states raise :class:`~fastode.errors.NonFiniteError` (``check_finite=True``, the fixed-grid default;
  ``options={'check_finite': False}`` restores silent propagation).
"""
from __future__ import annotations

import warnings
from collections import deque
from fractions import Fraction
from functools import lru_cache
from typing import List, Tuple

import torch

from ..errors import InvalidOptionError
from ..tableaus import TABLEAUS
from .fixed_grid import FixedGridSolver
from ..ops.rk import RKStep, combine_stages, rk_step

__all__ = ["AdamsBashforthMoulton", "AdamsBashforth", "bashforth_coefficients", "moulton_coefficients",
           "MIN_ORDER", "MAX_ORDER", "MAX_ITERS"]

MIN_ORDER = 4
MAX_ORDER = 12
MAX_ITERS = 4


# ----------------------------------------------------------------------------------------------- coefficients
def _poly_mul_linear(p: List[Fraction], shift: Fraction, scale: Fraction) -> List[Fraction]:
    """``p(s) * (s + shift) * scale`` for a polynomial given by its coefficients in increasing degree."""
    out = [Fraction(0)] * (len(p) + 1)
    for i, c in enumerate(p):
        out[i] += c * shift * scale
        out[i + 1] += c * scale
    return out


def _lagrange_integrals(nodes: Tuple[Fraction, ...]) -> Tuple[Fraction, ...]:
    """``int_0^1 l_j(s) ds`` for the Lagrange basis ``l_j`` on ``nodes`` (step units: ``t = t_n + s h``)."""
    out = []
    for j, xj in enumerate(nodes):
        p = [Fraction(1)]
        for m, xm in enumerate(nodes):
            if m != j:
                p = _poly_mul_linear(p, -xm, 1 / (xj - xm))
        out.append(sum(c / (k + 1) for k, c in enumerate(p)))
    return tuple(out)


@lru_cache(maxsize=None)
def bashforth_fractions(order: int) -> Tuple[Fraction, ...]:
    """Exact Adams-Bashforth weights of ``order`` (``order`` past values ``f_n, f_{n-1}, ...``, newest first)."""
    if order < 1:
        raise ValueError("Adams-Bashforth order must be >= 1")
    return _lagrange_integrals(tuple(Fraction(-m) for m in range(order)))


@lru_cache(maxsize=None)
def moulton_fractions(order: int) -> Tuple[Fraction, ...]:
    """Exact Adams-Moulton weights of ``order`` for ``f_{n+1}, f_n, f_{n-1}, ...`` (``order`` values)."""
    if order < 1:
        raise ValueError("Adams-Moulton order must be >= 1")
    return _lagrange_integrals(tuple(Fraction(1 - m) for m in range(order)))


def bashforth_coefficients(order: int) -> Tuple[float, ...]:
    """Adams-Bashforth weights (float64, correctly rounded), newest value first."""
    return tuple(float(c) for c in bashforth_fractions(order))


def moulton_coefficients(order: int) -> Tuple[float, ...]:
    """Adams-Moulton weights (float64, correctly rounded); entry 0 multiplies ``f_{n+1}``."""
    return tuple(float(c) for c in moulton_fractions(order))


# ----------------------------------------------------------------------------------------------- solver
class AdamsBashforthMoulton(FixedGridSolver):
    """``implicit_adams`` / ``fixed_adams``: AB predictor + AM corrector (see the module docstring)."""

    tableau = TABLEAUS["rk4"]      # start-up steps: Kutta's 3/8 rule (torchdiffeq's rk4_alt_step_func)
    order = 4
    multistep = True               # steps cannot be recomputed independently (no gradient="checkpoint")
    name = "implicit_adams"
    implicit = True

    def __init__(self, func, y0, rtol=1e-3, atol=1e-4, implicit=True, max_iters=MAX_ITERS, max_order=MAX_ORDER,
                 **kwargs):
        if rtol is None:
            rtol = 1e-3
        if atol is None:
            atol = 1e-4
        super().__init__(func, y0, rtol, atol, **kwargs)
        self.order = 4
        cls = type(self).__name__
        try:
            max_order = int(max_order)
        except (TypeError, ValueError):
            raise InvalidOptionError(f"{cls}: max_order must be an integer in 1..{MAX_ORDER}, got "
                                     f"{max_order!r}") from None
        if max_order > MAX_ORDER:
            raise InvalidOptionError(f"max_order must be at most {MAX_ORDER} (got {max_order})")
        if max_order < 1:
            raise InvalidOptionError(f"{cls}: max_order must be at least 1 (got {max_order}); values below "
                                     f"{MIN_ORDER} make the solver reduce to `rk4`")
        if max_order < MIN_ORDER:
            warnings.warn("max_order is below {}, so the solver reduces to `rk4`.".format(MIN_ORDER))
        self.implicit = bool(implicit)
        try:
            max_iters = int(max_iters)
        except (TypeError, ValueError):
            raise InvalidOptionError(f"{cls}: max_iters must be a positive integer, got {max_iters!r}") from None
        if self.implicit and max_iters < 1:
            raise InvalidOptionError(f"{cls}: max_iters must be at least 1 (got {max_iters})")
        self.max_iters = max_iters
        self.max_order = max_order
        self.rtol = torch.as_tensor(rtol, dtype=y0.dtype, device=y0.device)
        self.atol = torch.as_tensor(atol, dtype=y0.dtype, device=y0.device)
        self.bashforth = [()] + [bashforth_coefficients(k) for k in range(1, MAX_ORDER)]
        self.moulton = [()] + [moulton_coefficients(k) for k in range(1, MAX_ORDER + 1)]
        self._reset_history()

    # ---- history (torchdiffeq: deque(maxlen=max_order - 1), appendleft, prev_t check)
    def _reset_history(self):
        self.prev_f = deque(maxlen=max(self.max_order - 1, 1))
        self.prev_t = None

    def _update_history(self, t, f):
        if self.prev_t is None or self.prev_t != t:
            self.prev_f.appendleft(f)
            self.prev_t = t

    def _has_converged(self, dy_old, dy):
        error_tol = self.atol + self.rtol * torch.max(dy_old.abs(), dy.abs())
        return bool(((dy_old - dy).abs() / error_tol).max() < 1)

    def _step(self, t0_key, y0, dt_arg, tc):
        """One Adams step. ``tc``: the 4 stage times of the rk4 tableau (tc[0] = t0, tc[-1] = t1, perturbed as
        requested). Returns ``(y1, f0)``."""
        f0 = self.func(tc[0], y0)
        self._update_history(t0_key, f0)
        order = min(len(self.prev_f), self.max_order - 1)
        if order < MIN_ORDER - 1:
            step = rk_step(self.func, None, y0, self.prev_f[0], dt_arg, self.tableau, tc=tc)
            return step.y1, f0
        hist = list(self.prev_f)
        dy = combine_stages(None, dt_arg, self.bashforth[order], hist).type_as(y0)
        if self.implicit:
            moulton = self.moulton[order + 1]
            delta = combine_stages(None, dt_arg, moulton[1:], hist).type_as(y0)
            converged = False
            for _ in range(self.max_iters):
                dy_old = dy
                f = self.func(tc[-1], y0 + dy)
                dy = combine_stages(None, dt_arg, moulton[:1], [f]).type_as(y0) + delta
                converged = self._has_converged(dy_old, dy)
                if converged:
                    break
            if not converged:
                warnings.warn('Functional iteration did not converge. Solution may be incorrect.')
                self.prev_f.pop()
        return y0 + dy, f0

    # ---- the grid loop: FixedGridSolver.integrate calls grid_step(ctx, i, y0) for i = 0, 1, ... in order
    def integrate(self, t, grid=None):
        self._reset_history()
        self._next_step = 0
        return super().integrate(t, grid)

    def grid_step(self, ctx, i, y0):
        """Grid step ``i`` from ``y0``. Multistep: valid only in order (i = 0, 1, ...) within one solve."""
        if i != getattr(self, "_next_step", 0):
            raise InvalidOptionError(
                f"{type(self).__name__} is a multistep method: its steps depend on the derivatives of the previous "
                f"steps, so they cannot be recomputed one at a time (step {i} requested out of order). "
                f"gradient='checkpoint' does not support Adams methods; use gradient='direct' or 'adjoint'.")
        self._next_step = i + 1
        tc, dt_arg = self.step_times(ctx, i)
        t0 = ctx.g_host[i]
        y1, f0 = self._step(t0, y0, dt_arg, tc)
        return RKStep(y1, None, [f0], None)

    def _event_step(self, t0, y0, dt, tc):
        return self._step(float(t0.detach()), y0, dt, tc)

    def integrate_until_event(self, t0, event_fn):
        self._reset_history()
        return super().integrate_until_event(t0, event_fn)


class AdamsBashforth(AdamsBashforthMoulton):
    """``explicit_adams``: Adams-Bashforth only (``rtol``/``atol`` are unused except as the event tolerance)."""

    name = "explicit_adams"
    implicit = False

    def __init__(self, func, y0, rtol=1e-3, atol=1e-4, **kwargs):
        if "implicit" in kwargs:
            raise InvalidOptionError("AdamsBashforth: `implicit` cannot be set for explicit_adams; use "
                                     "method='implicit_adams' for the predictor-corrector")
        super().__init__(func, y0, rtol, atol, implicit=False, **kwargs)
