"""``method="scipy_solver"``: :func:`scipy.integrate.solve_ivp` behind the solver interface.

Same surface as torchdiffeq 0.2.5's ``ScipyWrapperODESolver``::

    options = {"solver": "LSODA",          # any solve_ivp method name (RK45, RK23, DOP853, Radau, BDF, LSODA)
               "min_step": 0.,             # passed to scipy (only LSODA uses it)
               "max_step": inf}

The state is moved to NumPy (float64 for real states; complex128 for complex ones), ``func`` is evaluated under
``torch.no_grad()`` and the result is a fresh tensor: **no autograd flows through** ``odeint(...,
method="scipy_solver")`` (as in torchdiffeq). Gradients are available through :func:`fastode.odeint_adjoint` /
``odeint(..., gradient="adjoint")``, whose backward pass can itself use ``scipy_solver``.

Deliberate differences from torchdiffeq (documented in the README's migration note):

* A failed scipy solve (``sol.success == False``, e.g. a stiff problem with an explicit method hitting its
  step limit) raises :class:`RuntimeError` with scipy's message, instead of returning a truncated array that
  then fails to reshape (or silently returns garbage).
* ``min_step`` is forwarded to scipy only when it has an effect (LSODA) or when the user set it to a non-zero
  value; torchdiffeq always forwards it, which makes scipy warn "The following arguments have no effect for a
  chosen solver: `min_step`" on every non-LSODA solve.
* ``func`` receives ``t`` exactly, in the state's real dtype, for every scipy method. torchdiffeq builds it
  with ``torch.tensor(t)``, which for LSODA (which passes a Python float) rounds it to float32 first, so
  torchdiffeq's LSODA results differ from these in the 7th-8th digit (RK45 etc. agree bit for bit).
* Tolerances given as tensors (per element, or expanded from a tuple state's per-component list) are passed
  to scipy as NumPy arrays.
* ``stats.num_steps``/``num_accepted_steps``/``step_ts``/``step_sizes`` are filled from scipy's own steps
  (scipy does not report rejected steps; ``num_rejected_steps`` stays 0).
* Events (``event_fn``) raise a clear :class:`NotImplementedError` (torchdiffeq fails with an
  ``AttributeError``); callbacks are not supported (``valid_callbacks() == set()``, so ``odeint`` warns).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Solver, real_dtype

__all__ = ["ScipyWrapperODESolver"]

_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


def _tol_to_numpy(tol):
    if isinstance(tol, torch.Tensor):
        if tol.requires_grad:
            tol = tol.detach()
        arr = tol.cpu().numpy().astype(np.float64)
        return float(arr) if arr.ndim == 0 else arr.reshape(-1)
    return tol


class ScipyWrapperODESolver(Solver):
    """Wraps :func:`scipy.integrate.solve_ivp` (``options['solver']`` picks scipy's method, default LSODA)."""

    order = 0
    adaptive = True
    name = "scipy_solver"

    def __init__(self, func, y0, rtol, atol, min_step=0, max_step=float("inf"), solver="LSODA", **unused_kwargs):
        # torchdiffeq silently drops these (they are set by odeint or by old code paths).
        unused_kwargs.pop("norm", None)
        unused_kwargs.pop("grid_points", None)
        unused_kwargs.pop("eps", None)
        super().__init__(func, y0, rtol, atol, **unused_kwargs)
        if isinstance(solver, str):
            if solver not in _METHODS:
                raise ValueError(f'scipy_solver: unknown solver "{solver}"; options["solver"] must be one of '
                                 f'{_METHODS} (a scipy.integrate.solve_ivp method name) or an OdeSolver subclass.')
        self.dtype = y0.dtype
        self.device = y0.device
        self.shape = y0.shape
        self.t_dtype = real_dtype(y0)
        y0_np = y0.detach().cpu().numpy().reshape(-1)
        self._np_dtype = np.complex128 if np.iscomplexobj(y0_np) else np.float64
        self.y0_np = y0_np.astype(self._np_dtype)
        self.rtol_np = _tol_to_numpy(rtol)
        self.atol_np = _tol_to_numpy(atol)
        self.min_step = float(min_step)
        self.max_step = float(max_step)
        self.solver = solver

    # ------------------------------------------------------------------ helpers
    def _np_func(self):
        func, shape, device, dtype, t_dtype = self.func, self.shape, self.device, self.dtype, self.t_dtype

        def np_func(t, y):
            tt = torch.tensor(float(t), dtype=t_dtype, device=device)
            yy = torch.as_tensor(np.asarray(y)).to(device=device, dtype=dtype).reshape(shape)
            with torch.no_grad():
                f = func(tt, yy)
            return f.detach().cpu().numpy().reshape(-1).astype(self._np_dtype, copy=False)

        return np_func

    def _method_class(self):
        """The scipy OdeSolver class, subclassed to record every step into ``self.stats``."""
        from scipy.integrate import _ivp

        base = self.solver
        if isinstance(base, str):
            base = getattr(_ivp, base)
        stats = self.stats

        class _Counting(base):
            def step(self):
                t_before = self.t
                msg = super().step()
                if self.status != "failed" and self.t != t_before:
                    stats.num_steps += 1
                    stats.num_accepted_steps += 1
                    stats.step_ts.append(float(t_before))
                    stats.step_sizes.append(float(self.t - t_before))
                return msg

        _Counting.__name__ = base.__name__
        return _Counting

    # ------------------------------------------------------------------ interface
    def integrate(self, t: torch.Tensor) -> torch.Tensor:
        from scipy.integrate import solve_ivp

        if t.numel() == 1:
            return self.y0.detach().clone()[None]
        t_np = t.detach().cpu().numpy().astype(np.float64)
        options = {"rtol": self.rtol_np, "atol": self.atol_np, "max_step": self.max_step}
        if self.solver == "LSODA" or self.min_step != 0:
            options["min_step"] = self.min_step
        sol = solve_ivp(self._np_func(), t_span=[float(t_np.min()), float(t_np.max())], y0=self.y0_np,
                        t_eval=t_np, method=self._method_class(), **options)
        if not sol.success or sol.y.shape[1] != len(t_np):
            raise RuntimeError(f"scipy_solver ({self.solver}) failed: {sol.message} (status {sol.status}, reached "
                               f"t={sol.t[-1] if len(sol.t) else t_np[0]} of [{t_np[0]}, {t_np[-1]}]). Try a stiff "
                               f"method (options={{'solver': 'Radau'}} / 'BDF' / 'LSODA') or looser tolerances.")
        out = torch.as_tensor(sol.y.T.copy()).to(device=self.device, dtype=self.dtype)
        return out.reshape(len(t_np), *self.shape)

    def integrate_until_event(self, t0, event_fn):
        raise NotImplementedError("scipy_solver does not support event handling (event_fn): scipy's events are "
                                  "not wired into fastode. Use an adaptive Runge-Kutta method such as "
                                  "method='dopri5' for odeint(..., event_fn=...) / odeint_event.")

    @classmethod
    def valid_callbacks(cls) -> set:
        return set()

