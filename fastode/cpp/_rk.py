"""Fused Runge-Kutta steps: one call per CNF step (C++), with PyTorch references of the same maths.

Tableau coefficients are never written here: they come from :mod:`fastode.tableaus` (a tableau object
with ``c``, ``a``, ``b``, ``b_err``, or its name) and are passed to C++ as arguments.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..compiling import check, host_floats
from ..codes import RATE_CODES
from ..ops import concatsquash as _ref
from ..ops import rk as rk_spec
from ..tableaus import get_tableau
from . import _dispatch, _ops
from ._loader import ext
from ._mlp import _ACT_CODES

__all__ = ["RATE_CODES", "CnfStep", "CnfStepper", "cnf_rk_step", "cnf_adaptive_solve", "tableau_lists"]


# ---------------------------------------------------------------------------------------------------
def tableau_lists(tableau):
    """(c, a (s*s row-major), b, b_err or []) as python floats from a tableau object or name (cached: tableaus are
    immutable)."""
    if isinstance(tableau, str):
        tableau = get_tableau(tableau)
    return _tableau_lists_cached(tableau)


@functools.lru_cache(maxsize=64)
def _tableau_lists_cached(tableau):
    c = [float(x) for x in tableau.c]
    s = len(c)
    a = [0.0] * (s * s)
    for i, row in enumerate(tableau.a):
        for j, v in enumerate(row):
            a[i * s + j] = float(v)
    b = [float(x) for x in tableau.b]
    b_err = [float(x) for x in tableau.b_err] if getattr(tableau, "b_err", None) is not None else []
    if len(b) != s or (b_err and len(b_err) != s) or len(tableau.a) > s:
        raise ValueError(f"tableau {getattr(tableau, 'name', '?')!r} has inconsistent sizes")
    for i in range(s):
        for j in range(i, s):
            if a[i * s + j] != 0.0:
                raise ValueError("only explicit tableaus (strictly lower-triangular a) can be fused")
    return tuple(c), tuple(a), tuple(b), tuple(b_err)


def _per_column(v, n: int, name: str) -> list[float]:
    if v is None:
        raise ValueError(f"{name} is needed for the error estimate of an embedded tableau")
    if isinstance(v, (int, float)):
        return [float(v)] * n
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return [float(v)] * n
    vals = [float(x) for x in v]
    if len(vals) != n:
        raise ValueError(f"{name} must be a number or one value per state column ({n}), got {len(vals)}")
    return vals


class CnfStep(NamedTuple):
    """Result of :func:`cnf_rk_step`.

    ``z1 (B, D)``, ``q1 (B, NQ)``: the state after the step. ``err_z``, ``err_q``: the error estimate
    ``dt * sum(b_err_i k_i)`` (None for tableaus without one). ``kz (s, B, D)``, ``kq (s, B, NQ)``: every
    stage (only with ``return_stages=True``; ``kz[-1], kq[-1]`` are the next step's first stage for FSAL
    tableaus). ``error_sumsq (D + NQ,)`` float64, not differentiable: per column of ``[z | q]``, the sum
    over the batch of ``(err / (atol + rtol * max(|y0|, |y1|)))**2`` (None without error estimate).
    """

    z1: torch.Tensor
    q1: torch.Tensor
    err_z: torch.Tensor | None
    err_q: torch.Tensor | None
    kz: torch.Tensor | None
    kq: torch.Tensor | None
    error_sumsq: torch.Tensor | None


class _CnfStepFn(torch.autograd.Function):
    """Inputs: t0, dt (floats or 0-dim tensors), z0, q0, e, kz0, kq0, spec, *params (5 per layer)."""

    @staticmethod
    def forward(ctx, t0, dt, z0, q0, e, kz0, kq0, spec, *params):
        act, rates, c, a, b, b_err, atol, rtol, want_stages, tile = spec
        need = any(ctx.needs_input_grad)
        z1, q1, ez, eq, kz, kq, ss, save = ext().cnf_step_forward(
            float(t0), float(dt), z0, q0, e, kz0, kq0, list(params), act, rates, c, a, b, b_err, atol, rtol,
            want_stages, need, tile)
        if need:
            ctx.save_for_backward(z0, q0, e, kz0, kq0, *params)
            ctx.times = (float(t0), float(dt), t0, dt)
            ctx.buf = save
        ctx.spec = spec
        ctx.mark_non_differentiable(ss)
        ctx.set_materialize_grads(False)
        return z1, q1, ez, eq, kz, kq, ss

    @staticmethod
    @once_differentiable
    def backward(ctx, gz1, gq1, gez, geq, gkz, gkq, _gss):
        act, rates, c, a, b, b_err, atol, rtol, want_stages, tile = ctx.spec
        z0, q0, e, kz0, kq0, *params = ctx.saved_tensors
        t0f, dtf, t0, dt = ctx.times
        n = ctx.needs_input_grad
        gz0, gq0, ge, gkz0, gkq0, gp, gt0, gdt = ext().cnf_step_backward(
            t0f, dtf, z0, q0, e, kz0, kq0, params, act, rates, c, a, b, b_err, ctx.buf, gz1, gq1, gez,
            geq, gkz, gkq, n[2], n[3], n[4], n[5] or n[6], any(n[8:]), n[0], n[1], tile)
        gt0 = torch.tensor(gt0, dtype=t0.dtype) if n[0] else None
        gdt = torch.tensor(gdt, dtype=dt.dtype) if n[1] else None
        grads = [g if n[8 + i] else None for i, g in enumerate(gp)] if gp else [None] * len(params)
        return (gt0, gdt, gz0 if n[2] else None, gq0 if n[3] else None, ge if n[4] else None,
                gkz0 if n[5] else None, gkq0 if n[6] else None, None, *grads)


class _CnfAdaptiveFn(torch.autograd.Function):
    """A whole adaptive CNF solve (batch-global control, or per tile) and its exact discrete gradient (a checkpointed
    discrete adjoint over the recorded steps). Inputs: t (the 2 output times, tensor), z0, q0, e, run (dict: the
    settings, and ``count_backward``: None or ``f(n)`` called with the backward's network evaluations), *params.
    Outputs: zT, qT and the solve's record (a dict of counts; per tile, a list of them). Step sizes are constants,
    the clock is t[0] + a constant: dL/dt[1] comes through the interpolation coordinate, dL/dt[0] through every
    stage time."""

    @staticmethod
    def forward(ctx, t, z0, q0, e, run, *params):
        tt = t.detach().to("cpu", torch.float64).tolist()
        need = any(ctx.needs_input_grad)
        zT, qT, st, tape = ext().cnf_adaptive_forward(
            tt[0], tt[1], z0, q0, e, list(params), run["act"], run["rates"], *run["tableau"], run["c_mid"],
            run["ctl"], run["max_num_steps"], run["order"], run["time_f32"], 1, need, run.get("step_rows", 0),
            run["tile"])
        ok = all(s_["status"] == 0 for s_ in st) if isinstance(st, list) else st["status"] == 0
        if need and ok:
            ctx.save_for_backward(z0, e, *params)
            ctx.tape, ctx.run, ctx.t_dtype = tape, run, t.dtype
        ctx.set_materialize_grads(False)
        return zT, qT, st

    @staticmethod
    @once_differentiable
    def backward(ctx, gzT, gqT, _grecord):
        z0, e, *params = ctx.saved_tensors
        run, tape = ctx.run, ctx.tape
        n = ctx.needs_input_grad
        gz0, gq0, ge, gp, g_anchor, g_x, nfe = ext().cnf_adaptive_backward(
            z0, e, params, run["act"], run["rates"], *run["tableau"], run["c_mid"], tape, gzT, gqT, n[3], any(n[5:]),
            run.get("step_rows", 0), run["tile"])
        if run.get("count_backward") is not None:
            run["count_backward"](nfe)
        gt = None
        if n[0]:  # per tile: the tiles' own clocks all start at t[0] and end at t[1]
            tapes = tape if isinstance(tape, list) else [tape]
            ga = g_anchor if isinstance(g_anchor, list) else [g_anchor]
            gx = g_x if isinstance(g_x, list) else [g_x]
            g_out = sum(x_ / (tp["width"] or 1.0) for x_, tp in zip(gx, tapes))
            gt = torch.tensor([sum(ga) - g_out, g_out], dtype=ctx.t_dtype)
        grads = [g if n[5 + i] else None for i, g in enumerate(gp)] if gp else [None] * len(params)
        return (gt, gz0 if n[1] else None, gq0 if n[2] else None, ge if n[3] else None, None, *grads)


def cnf_adaptive_solve(t, z0, q0, e, params, run):
    """``(zT, qT, record)`` of a whole adaptive CNF solve (``run``: the settings that
    :class:`fastode.flows.fused.cpp.CppBackend` builds). Eagerly the autograd Function :class:`_CnfAdaptiveFn`
    (``record``: the counts); under torch.compile, without a gradient, the custom op ``fastode::cpp_cnf_adaptive``
    (``record``: ``{"counts": {name: 0-dim tensor}}``, data-dependent, kept in the graph, a failed solve checked
    there)."""
    if not torch.compiler.is_compiling():
        return _CnfAdaptiveFn.apply(t, z0, q0, e, run, *params)
    t0, t1 = host_floats(t.detach())
    c, a, b, b_err = run["tableau"]
    zT, qT, counts = _ops.cpp_cnf_adaptive(z0, q0, e, list(params), t0, t1, run["act"], run["rates"], c, a, b,
                                           b_err, run["c_mid"], run["ctl"], run["max_num_steps"], run["order"],
                                           run["time_f32"], run["step_rows"], run["tile"])
    check(counts[0] == 0, lambda: RuntimeError(
        "the fused adaptive CNF solve stopped (max_num_steps exceeded, step-size underflow or NaN/inf); call it "
        "eagerly for the error naming the time"))
    return zT, qT, {"counts": dict(zip(_ops.COUNTS, counts.unbind()))}


def _mlp_params(params, activation):
    """(reference layer tuples, raw tensors for the C++ kernels, activation).

    For a ConcatSquashMLP the kernels get the parameters themselves (the (out, 1) gate and time-bias
    weights need no reshaping: the kernels read them as vectors), which keeps view nodes out of the graph.
    """
    raw = None
    if hasattr(params, "params") and callable(params.params):  # a ConcatSquashMLP
        activation = activation or params.activation
        layers = getattr(params, "layers", None)
        try:
            raw = [p for l in layers for p in (l._layer.weight, l._layer.bias, l._hyper_gate.weight,
                                               l._hyper_gate.bias, l._hyper_bias.weight)]
        except (AttributeError, TypeError):
            raw = None
        params = params.params()
    if activation is None:
        raise ValueError("activation is required when params is a list of layer tuples")
    if raw is None:
        raw = _ref.flat_params(params)
    return params, raw, activation


class CnfStepper:
    """Fused RK steps of one CNF solve, prepared once (the per-step call does no re-validation).

    ``params``: a :class:`fastode.nn.ConcatSquashMLP` (its activation is used) or per-layer
    ``(W, b, gw, gb, bw)`` tuples with ``activation``; they are read when the stepper is made, so make one
    per solve. ``tableau``: a :class:`fastode.tableaus.ButcherTableau` or its name. ``rates``: names from
    :data:`RATE_CODES`, one per column of ``q``. ``atol, rtol``: numbers or one per column of ``[z | q]``,
    for ``error_sumsq`` (embedded tableaus only). ``backend``: "auto", "cpp", "torch" (see
    :mod:`fastode.cpp`); :attr:`backend` is the one chosen.

    :meth:`step` takes one step; :meth:`solve` a whole fixed grid in one C++ call (and one backward).
    """

    def __init__(self, params, tableau, *, activation: str | None = None, rates: Sequence[str] = ("-trace",),
                 atol=None, rtol=None, backend: str = "auto"):
        params, raw, activation = _mlp_params(params, activation)
        if not params:
            raise ValueError("params is empty: the MLP needs at least one layer (W, b, gw, gb, bw)")
        W0 = params[0][0]
        D = W0.shape[1]
        _ref.check_inputs(0.0, W0.new_empty(0, D), params, activation)
        self.rates = list(rates)
        for r in self.rates:
            if r not in RATE_CODES:
                raise ValueError(f"unknown rate {r!r}; choose from {list(RATE_CODES)}")
        self.params, self.raw, self.activation, self.dim = params, raw, activation, D
        self.tab = get_tableau(tableau) if isinstance(tableau, str) else tableau
        self.tableau = tableau_lists(self.tab)
        c, a, b, b_err = self.tableau
        ncol = D + len(self.rates)
        self.atol = _per_column(atol, ncol, "atol") if b_err else []
        self.rtol = _per_column(rtol, ncol, "rtol") if b_err else []
        self.backend = _dispatch.choose(backend, *raw)
        if activation not in _ACT_CODES:
            self.backend = "torch"
        self._dtype, self._device = W0.dtype, W0.device
        self._codes = (_ACT_CODES.get(activation), [RATE_CODES[r] for r in self.rates])

    def _check(self, z0, q0, e):
        if z0.dim() != 2 or z0.shape[1] != self.dim:
            raise ValueError(f"z0 must be (batch, {self.dim}), got shape {tuple(z0.shape)}")
        B = z0.shape[0]
        if q0.shape != (B, len(self.rates)):
            raise ValueError(f"q0 must be (batch, len(rates)) = ({B}, {len(self.rates)}), got {tuple(q0.shape)}")
        if e is not None and e.shape != z0.shape:
            raise ValueError(f"e has shape {tuple(e.shape)} but z0 has {tuple(z0.shape)}; they must match")
        return self.backend == "cpp" and z0.dtype == self._dtype and z0.device == self._device

    def step(self, t0, dt, z0: torch.Tensor, q0: torch.Tensor, e: torch.Tensor | None = None, kz0=None, kq0=None,
             return_stages: bool = False) -> CnfStep:
        """One step from ``(z0 (B, D), q0 (B, NQ))`` at time ``t0`` with step ``dt`` (floats or 0-dim tensors).

        ``e (B, D)``: Hutchinson noise (keep it fixed over the solve, as FFJORD does); ``None`` gives the
        exact trace (D basis-vector VJPs). ``kz0, kq0``: the first stage when already known (FSAL: the
        previous step's last stage). Differentiable (once) in ``t0, dt, z0, q0, e, kz0, kq0`` and the
        parameters. Returns :class:`CnfStep`.
        """
        use_cpp = self._check(z0, q0, e)
        if (kz0 is None) != (kq0 is None):
            raise ValueError("give both kz0 and kq0 (the first stage) or neither")
        if use_cpp:
            c, a, b, b_err = self.tableau
            spec = (self._codes[0], self._codes[1], c, a, b, b_err, self.atol, self.rtol, bool(return_stages),
                    _dispatch.mlp_tile_rows(z0.shape[0], self.params))
            z1, q1, ez, eq, kz, kq, ss = _CnfStepFn.apply(t0, dt, z0, q0, e, kz0, kq0, spec, *self.raw)
            if not b_err:
                ez = eq = ss = None
            if not return_stages:
                kz = kq = None
            return CnfStep(z1, q1, ez, eq, kz, kq, ss)
        return _cnf_step_torch(t0, dt, z0, q0, self.params, self.activation, self.tab, e, self.rates, kz0, kq0,
                               self.atol, self.rtol, return_stages)

    def solve(self, ts, z0: torch.Tensor, q0: torch.Tensor, e: torch.Tensor | None = None):
        """Steps between consecutive times of the grid ``ts`` (a sequence of floats or a 1-D tensor, which
        may require grad); returns ``(zT, qT)`` at ``ts[-1]``. On the C++ backend the whole solve is one
        call forward and one backward (no error estimate; use :meth:`step` for adaptive solves)."""
        use_cpp = self._check(z0, q0, e)
        ts_t = ts if isinstance(ts, torch.Tensor) else None
        times = [float(x) for x in (host_floats(ts.detach().reshape(-1)) if ts_t is not None else ts)]
        if len(times) < 1:
            raise ValueError("the time grid needs at least one time")
        if use_cpp:  # one fused op: its Function eagerly, the custom op fastode::cpp_cnf_grid when compiling
            c, a, b, _ = self.tableau
            tile = _ops.tile_for(z0, self.raw)
            if torch.compiler.is_compiling():
                t_in = ts_t.reshape(-1) if ts_t is not None else torch.tensor(times, dtype=torch.float64)
            else:  # the times' tensor only when its gradient is wanted
                t_in = ts_t.reshape(-1) if ts_t is not None and ts_t.requires_grad else None
            need = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                   for x in (t_in, z0, q0, e, *self.raw))
            zT, qT, _ = _ops.CPP_CNF_GRID(t_in, z0, q0, e, list(self.raw), times, self._codes[0], self._codes[1], c, a,
                                          b, tile, need)
            return zT, qT
        z, q = z0, q0
        for i in range(len(times) - 1):
            t0 = ts_t.reshape(-1)[i] if ts_t is not None else times[i]
            dt = (ts_t.reshape(-1)[i + 1] - ts_t.reshape(-1)[i]) if ts_t is not None else times[i + 1] - times[i]
            r = self.step(t0, dt, z, q, e)
            z, q = r.z1, r.q1
        return z, q


def cnf_rk_step(t0, dt, z0: torch.Tensor, q0: torch.Tensor, params, tableau, *, activation: str | None = None,
                e: torch.Tensor | None = None, rates: Sequence[str] = ("-trace",), kz0=None, kq0=None, atol=None,
                rtol=None, return_stages: bool = False, backend: str = "auto") -> CnfStep:
    """One explicit RK step of the CNF dynamics ``dz/dt = f(t, z)``, ``dq_j/dt = rate_j`` (fused on CPU).

    A one-off :class:`CnfStepper` (see it for the arguments); for the steps of a solve make the stepper
    once and call :meth:`CnfStepper.step`, which avoids re-validating and re-packing the parameters.
    """
    stepper = CnfStepper(params, tableau, activation=activation, rates=rates, atol=atol, rtol=rtol, backend=backend)
    return stepper.step(t0, dt, z0, q0, e, kz0, kq0, return_stages)


def _cnf_rates_torch(t, z, params, activation, e, rates):
    """Reference stage: f and the (B, NQ) rates, from fastode.ops.concatsquash."""
    B, D = z.shape
    if e is None:  # exact: basis probes, as the C++ kernels do
        probes = [torch.zeros_like(z).index_fill_(1, torch.tensor([k]), 1.0) for k in range(D)]
    else:
        probes = [e]
    trace = frob = 0
    for p in probes:
        f, _vjp, tr, kin, fr = _ref.concatsquash_mlp_hutchinson(t, z, p, params, activation)
        trace, frob = trace + tr, frob + fr
    cols = {"-trace": -trace, "trace": trace, "kinetic": kin, "jac_frob": frob}
    q = torch.stack([cols[r] for r in rates], -1) if rates else z.new_zeros(B, 0)
    return f, q


def _cnf_step_torch(t0, dt, z0, q0, params, activation, tab, e, rates, kz0, kq0, atol, rtol, return_stages):
    """The PyTorch path of :meth:`CnfStepper.step`: the RK spec's step (:func:`fastode.ops.rk.rk_step`) on the
    concatenated state ``[z | q]`` (the q columns do not feed back into the dynamics)."""
    D = z0.shape[1]

    def func(t, y):
        f, q = _cnf_rates_torch(t, y[:, :D], params, activation, e, rates)
        return torch.cat([f, q], 1)

    y0 = torch.cat([z0, q0], 1)
    f0 = None if kz0 is None else torch.cat([kz0, kq0], 1)
    step = rk_spec.rk_step(func, t0, y0, f0, dt, tab)
    z1, q1 = step.y1[:, :D], step.y1[:, D:]
    ez = eq = ss = None
    if step.y_err is not None:
        ez, eq = step.y_err[:, :D], step.y_err[:, D:]
        f64 = dict(dtype=torch.float64)
        sc = rk_spec.error_tolerance(y0.detach().double(), step.y1.detach().double(), torch.tensor(rtol, **f64),
                                     torch.tensor(atol, **f64))
        ss = ((step.y_err.detach().double() / sc) ** 2).sum(0)
    if return_stages:
        k = torch.stack(step.k)
        return CnfStep(z1, q1, ez, eq, k[:, :, :D], k[:, :, D:], ss)
    return CnfStep(z1, q1, ez, eq, None, None, ss)
