"""The compiled engine: ``odeint(..., compile=True)``, :class:`CompiledOdeint` and ``FASTODE_COMPILE=1``.

One program per (func, shapes, dtypes, device, method, options, what is recorded): the whole adaptive solve of
:class:`~fastode.compiled.loop.AdaptiveLoop` as one ``while_loop`` under ``torch.compile(fullgraph=True)``, read
once at the end (status, counts); a bad status raises the eager loop's error class naming the time. Gradients
(``"direct"`` and ``"checkpoint"``: both the discrete solve's exact gradient) come from a second compiled
program, the reverse loop of :mod:`fastode.compiled.adjoint`, inside one ``torch.autograd.Function``; nothing is
recompiled per training iteration. The continuous adjoint, events and step callbacks are not compiled: a call
that needs them runs the eager loop (with the reason recorded, see :attr:`CompiledOdeint.reason`).

A ``func`` that cannot be traced whole (a graph break, data-dependent Python) raises :class:`CompileError` naming
the break when compiling was asked for explicitly; under ``FASTODE_COMPILE=1`` (code written for torchdiffeq) the
solve falls back to the eager loop with one :class:`~fastode.errors.FallbackWarning`.

This module imports ``torch._dynamo`` and inductor; :mod:`fastode.odeint` imports it only when compiling.
"""
from __future__ import annotations

import itertools
import types
import weakref
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..codes import Status
from ..driver import build_solver, finish, gradient_parameters
from ..driver import solve as solve_eager
from ..errors import FastodeError, NonFiniteError, StepSizeUnderflowError, warn_fallback_once
from ..inputs import check_inputs
from ..solvers import RK_SOLVERS, SOLVERS
from ..solvers.base import _null_callback
from ..solvers.fixed_grid import FixedGridSolver
from ..solvers.rk_adaptive import RKAdaptiveSolver
from ..stats import SolveStats
from .adjoint import AdjointLoop, FuncModule
from .grid_loop import GridLoop, GridState
from .loop import INIT_FAILED, AdaptiveLoop, LoopState

__all__ = ["CompiledOdeint", "CompileError", "compiled_odeint", "solve", "decline_adjoint"]

_FIRST_CAPACITY = 64
CUDA_CHUNK = 4


class CompileError(FastodeError, RuntimeError):
    """A solve asked to be compiled cannot be (the message names the reason and what to change)."""


class _Program:
    """One compiled forward (and, when gradients are wanted, backward) program: an adaptive loop (with its tape
    capacity) or a fixed-grid loop (``n_steps`` grid steps, the grid an input)."""

    def __init__(self, owner: "CompiledOdeint", norm, solver, module, names, record: bool, record_states: bool,
                 t_grad: bool, t0: float, grid: Optional[torch.Tensor]):
        self.owner, self.solver, self.base = owner, solver, norm.func.base
        self.base_device = norm.y0.device.type
        self.module, self.names = module, names
        self.record, self.record_states, self.t_grad, self.t0 = record, record_states, t_grad, t0
        self.grid_steps = None if grid is None else grid.shape[0] - 1
        self.grid_dtype = None if grid is None else grid.dtype
        self.capacity = _FIRST_CAPACITY if record else 0
        self._build()

    def _build(self):
        from torch._higher_order_ops import while_loop

        t0 = self.t0
        if self.grid_steps is None:
            chunk = self.owner.chunk or (CUDA_CHUNK if self.base_device == "cuda" else 1)
            loop = AdaptiveLoop(self.solver, self.base, capacity=self.capacity, record_states=self.record_states,
                                chunk=chunk)
            self.state_type = LoopState

            def forward(y0, t_out, grid):
                return tuple(loop.solve(y0, t_out, t0, while_loop))
        else:
            loop = GridLoop(self.solver, self.base, self.grid_dtype, self.grid_steps,
                            record_states=self.record_states)
            self.state_type = GridState

            def forward(y0, t_out, grid):
                return tuple(loop.solve(y0, t_out, grid, while_loop))

        self.loop = loop
        self.forward = self.owner._compile(forward)
        self.backward = None
        if self.record_states:
            adj = AdjointLoop(loop, FuncModule(self.module, self.base), self.names, self.t_grad)
            state_type = self.state_type

            def backward(state, t_out, grid, g_ys, *params):
                return adj.run(state_type(*state), grid, t_out, g_ys, params, while_loop)

            self.backward = self.owner._compile(backward)

    def run(self, y0, t_out, grid):
        """The forward solve (no autograd), re-run with a larger tape while an adaptive loop's tape overflows."""
        while True:
            with torch.no_grad():
                st = self.state_type(*self.owner._call(self.forward, y0, t_out, grid))
            if self.grid_steps is not None or int(st.status) != Status.TAPE_FULL:
                return st
            self.capacity *= 4
            self._build()


class _Solve(torch.autograd.Function):
    """The compiled forward and its compiled discrete adjoint as one autograd node."""

    @staticmethod
    def forward(ctx, program: _Program, box: list, y0, t_out, grid, *params):
        st = program.run(y0, t_out, grid)
        box.append(st)
        # the backward program of the tape this forward filled (a later call may grow the tape and rebuild)
        ctx.owner, ctx.backward_fn, ctx.state = program.owner, program.backward, st
        ctx.save_for_backward(t_out, grid, *params)
        return st.ys

    @staticmethod
    def backward(ctx, g_ys):
        t_out, grid, *params = ctx.saved_tensors
        with torch.no_grad():
            g_y0, g_t, g_p = ctx.owner._call(ctx.backward_fn, tuple(ctx.state), t_out, grid, g_ys.contiguous(),
                                             *params)
        return (None, None, g_y0, g_t.to(t_out.dtype) if ctx.needs_input_grad[3] else None, None, *g_p)


class CompiledOdeint:
    """``odeint`` compiled once for ``func`` and these settings: call it as ``solve(y0, t)`` (-> the solution,
    shaped as ``odeint``'s) in a training loop; each new shape, dtype or device compiles one more program, later
    calls reuse it.

    Args:
        func, rtol, atol, method, options: as :func:`fastode.odeint` (explicit adaptive Runge-Kutta methods).
        gradient: ``"direct"`` or ``"checkpoint"`` (the same exact gradient of the discrete solve, from a
            compiled reverse loop: two states stored per accepted step). The continuous adjoint is not compiled
            (``odeint_adjoint(..., compile=True)`` runs it eagerly, with one warning).
        adjoint_params: the tensors to differentiate (default: ``func``'s parameters; ``func`` must be an
            ``nn.Module`` for gradients to reach parameters).
        backend: ``torch.compile``'s backend (``"inductor"``; ``"eager"`` / ``"aot_eager"`` trace without
            generating code, e.g. to check that ``func`` traces).
        cpp_wrapper: inductor's C++ wrapper, which runs the loop itself natively (default: on for CPU
            tensors); the Python wrapper pays the interpreter once per attempt.
        fallback: if True, a solve that cannot be compiled runs the eager loop with one warning (the reason in
            :attr:`reason`) instead of raising :class:`CompileError`.
        dynamic_batch: batched tensor states (2 dimensions or more) of every batch size share one program:
            the first batch size compiles a static program, the second recompiles it once with a symbolic
            batch dimension (False: one static program per batch size).
        chunk: step attempts per iteration of the adaptive loop (default: 1 on the CPU, where the C++ wrapper runs
            the loop natively; :data:`CUDA_CHUNK` on CUDA, where the loop's condition is read on the host once per
            iteration: one read per chunk).

    Attributes:
        reason: why the last call ran the eager loop (None if it ran compiled).
        compiles: how many programs were built (a test counts recompilations with it and a counting backend).
    """

    def __init__(self, func, *, rtol=1e-7, atol=1e-9, method=None, options=None, gradient="direct",
                 adjoint_params=None, backend="inductor", cpp_wrapper: Optional[bool] = None, fallback=False,
                 chunk: Optional[int] = None, dynamic_batch: bool = True):
        if gradient not in ("direct", "checkpoint"):
            raise ValueError(f"gradient must be 'direct' or 'checkpoint' (the compiled discrete adjoint), got "
                             f"{gradient!r}; the continuous adjoint is not compiled: use fastode.odeint_adjoint")
        self.func, self.rtol, self.atol, self.method = func, rtol, atol, method
        self.options = None if options is None else dict(options)
        self.gradient, self.adjoint_params = gradient, adjoint_params
        self.backend, self.cpp_wrapper, self.fallback, self.chunk = backend, cpp_wrapper, fallback, chunk
        self.dynamic_batch = bool(dynamic_batch)
        self.reason: Optional[str] = None
        self.compiles = 0
        self._programs: Dict[tuple, _Program] = {}
        self._failed: Dict[tuple, str] = {}     # keys whose program could not be compiled, and why
        self._fast: Dict[tuple, tuple] = {}      # _prekey -> (program, solver, params) of a compiled adaptive solve
        self._device_type = "cpu"

    # ------------------------------------------------------------------------------------------ compiling
    def _compile(self, fn):
        import torch._dynamo  # noqa: F401  (only a compiled solve pays for it)

        self.compiles += 1
        fn = _own_code(fn)
        # dynamic=None: a program first compiles for the shapes it meets; when a batch size changes, dynamo
        # recompiles it once with that dimension symbolic, and later batch sizes reuse it
        kwargs = dict(fullgraph=True, dynamic=None if self.dynamic_batch else False, backend=self.backend)
        if self.backend == "inductor":
            cpp = self._device_type == "cpu" if self.cpp_wrapper is None else self.cpp_wrapper
            kwargs["options"] = {"cpp_wrapper": bool(cpp)}
        return torch.compile(fn, **kwargs)

    def _call(self, fn, *args):
        import torch._dynamo.exc as exc

        try:
            return fn(*args)
        except (exc.TorchDynamoException, exc.BackendCompilerFailed) as e:
            raise CompileError(self._break_message(e)) from e

    @staticmethod
    def _break_message(e: Exception) -> str:
        text = str(e).strip().splitlines()
        head = "\n".join(text[:12])
        return ("fastode: this solve cannot be compiled as one program: torch.compile could not trace func "
                f"whole ({type(e).__name__}):\n{head}\nfunc must be traceable without graph breaks: no .item() / "
                "float() / print / numpy on tensors, no Python branches on tensor values (use torch.where), no "
                "side effects. Fix func, or call without compile=True (or pass fallback=True to run the eager "
                "loop).")

    # ------------------------------------------------------------------------------------------ calls
    def __call__(self, y0, t, *, return_stats: bool = False):
        norm = check_inputs(self.func, y0, t, self.rtol, self.atol, self.method, self.options, None, SOLVERS)
        pre = self._prekey(norm, return_stats)
        hit = self._fast.get(pre)
        if hit is not None:   # a training loop's later calls: the program, its solver and parameters are known
            program, solver, params = hit
            return self._run(norm, solver, program, params, None, return_stats)
        solver = build_solver(norm)
        params, names, reason = self._gradient_setup(norm, solver)
        if reason is None:
            reason = self._decline(norm, solver)
        if reason is not None:
            return self._eager(y0, t, reason, return_stats)
        self.reason = None
        self._device_type = norm.y0.device.type
        adaptive = isinstance(solver, RKAdaptiveSolver)
        grid = g_host = None
        if adaptive:
            t_out = norm.t.to(solver.time_dtype)
        else:   # the grid is built on the host, as the eager loop builds it; its length is part of the program
            t_out = norm.t
            ctx = solver.prepare(norm.t.detach())
            grid, g_host = ctx.grid.detach(), ctx.g_host
        need_grad = names is not None
        t_grad = need_grad and t_out.requires_grad
        t0 = float(t_out[0]) if adaptive and (solver.step_t or solver.jump_t) else 0.0
        key = (self._shape_key(norm), norm.y0.dtype, str(norm.y0.device), None if norm.shapes is None else
               tuple(tuple(s) for s in norm.shapes), norm.t_is_reversed, tuple(t_out.shape), t_out.dtype,
               return_stats, need_grad, t_grad, names, t0, None if grid is None else (grid.shape[0], grid.dtype))
        if key in self._failed:
            return self._eager(y0, t, self._failed[key], return_stats)
        program = self._programs.get(key)
        try:
            if program is None:
                program = _Program(self, norm, solver, self._module(), names, record=return_stats or need_grad,
                                   record_states=need_grad, t_grad=t_grad, t0=t0, grid=grid)
                self._programs[key] = program
            out = self._run(norm, solver, program, params, grid, return_stats, g_host)
        except CompileError as e:
            if not self.fallback:
                raise
            self._programs.pop(key, None)
            self._failed[key] = str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
            return self._eager(y0, t, self._failed[key], return_stats)
        if adaptive and not (solver.step_t or solver.jump_t):   # nothing in the key depends on t's values
            self._fast[self._prekey(norm, return_stats)] = (program, solver, params)
        return out

    def _prekey(self, norm, return_stats: bool) -> tuple:
        """What selects a program, read from the normalised inputs alone (without building a solver)."""
        module = self._module()
        grads = () if module is None else tuple(p.requires_grad for p in module.parameters())
        return (self._shape_key(norm), norm.y0.dtype, norm.y0.device, None if norm.shapes is None else
                tuple(tuple(s) for s in norm.shapes), norm.t_is_reversed, tuple(norm.t.shape), norm.t.dtype,
                return_stats, torch.is_grad_enabled(), norm.y0.requires_grad, norm.t.requires_grad, grads)

    def _shape_key(self, norm) -> tuple:
        """The state's shape as it selects a program: a batched tensor state's leading dimension left out when
        batch sizes share programs (``dynamic_batch``)."""
        shape = tuple(norm.y0.shape)
        if self.dynamic_batch and norm.shapes is None and len(shape) >= 2:
            return ("batch",) + shape[1:]
        return shape

    def _run(self, norm, solver, program: _Program, params, grid, return_stats, g_host=None):
        """Run ``program`` on the normalised inputs; the one host read; the user's structure back."""
        t_out = norm.t if grid is not None else norm.t.to(solver.time_dtype)
        aux = grid if grid is not None else t_out.detach()
        box: list = []
        if program.record_states:
            ys = _Solve.apply(program, box, norm.y0, t_out, aux, *params)
            st = box[0]
        else:
            st = program.run(norm.y0, t_out, aux)
            ys = st.ys
        self._check(st, program, norm, solver, g_host)
        if return_stats:
            self._fill_stats(norm.stats, st, program, g_host)
        return finish(norm, ys, return_stats=return_stats)

    def _module(self):
        return self.func if isinstance(self.func, nn.Module) else None

    def _gradient_setup(self, norm, solver):
        """``(params, names, reason)``: the tensors the backward differentiates and their names in ``func``
        (``names`` None: no gradient wanted), or the reason the compiled engine cannot give this gradient."""
        if not torch.is_grad_enabled():
            return (), None, None
        module = self._module()
        if module is None:
            if self.adjoint_params or norm.y0.requires_grad or norm.t.requires_grad:
                return (), None, ("gradients through a compiled solve need func to be an nn.Module (the backward "
                                  "differentiates its parameters); wrap func in a module")
            return (), None, None
        params = tuple(p for p in gradient_parameters(module, self.adjoint_params, "") if p.requires_grad)
        if not params and not norm.y0.requires_grad and not norm.t.requires_grad:
            return (), None, None
        by_id = {id(p): name for name, p in module.named_parameters()}
        if any(id(p) not in by_id for p in params):
            return (), None, "adjoint_params holds tensors that are not parameters of func"
        if not isinstance(solver, RKAdaptiveSolver):
            if norm.t.requires_grad:
                return (), None, "gradients w.r.t. t of a fixed-grid solve are not compiled"
        elif norm.t.requires_grad and (solver.step_t or solver.jump_t or solver.land_on):
            return (), None, "gradients w.r.t. t with step_t, jump_t or land_on are not compiled"
        elif solver.jump_t:
            return (), None, "gradients with jump_t are not compiled"
        return params, tuple("user." + by_id[id(p)] for p in params), None

    def _decline(self, norm, solver) -> Optional[str]:
        if norm.method not in RK_SOLVERS or not isinstance(solver, (RKAdaptiveSolver, FixedGridSolver)):
            return f"method {norm.method!r} is not an explicit Runge-Kutta method (the compiled loops')"
        if norm.y0.is_complex():
            return "complex states are not compiled"
        f = norm.func
        if any(getattr(f, n) is not _null_callback for n in ("callback_step", "callback_accept_step",
                                                             "callback_reject_step")):
            return "func has step callbacks (host Python, called every step)"
        return None

    def _eager(self, y0, t, reason: str, return_stats: bool):
        """The eager loop of the same gradient mode (the driver's solve or the checkpointed one)."""
        self.reason = reason
        if not self.fallback:
            raise CompileError(f"fastode: this solve cannot be compiled: {reason}. Call without compile=True, or "
                               f"pass fallback=True to run the eager loop.")
        warn_fallback_once("compile:" + reason, f"fastode: odeint(compile=True) runs the eager loop: {reason}")
        kw = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=self.options, return_stats=return_stats)
        if self.gradient == "checkpoint":
            from ..grad.checkpoint import odeint_checkpoint

            return odeint_checkpoint(self.func, y0, t, adjoint_params=self.adjoint_params, **kw)
        return solve_eager(self.func, y0, t, **kw)

    # ------------------------------------------------------------------------------------------ results
    def _check(self, st, program: _Program, norm, solver, g_host):
        """The one host read: a bad status becomes the eager loop's error class, naming the time."""
        if g_host is not None:
            first = int(st.first_bad)
            if first != len(g_host) - 1:
                raise solver._first_bad_error(first, g_host)
            return
        code = int(st.status)
        if code == 0:
            return
        where = f"at t={float(norm.func.describe_time(float(st.t_fail)))}"
        if code == INIT_FAILED:
            raise (NonFiniteError if not bool(torch.isfinite(st.f).all()) else StepSizeUnderflowError)(
                f"could not select an initial step {where}; pass options={{'first_step': ...}} or check func "
                f"(it returned NaN/inf: {not bool(torch.isfinite(st.f).all())})")
        raise Status(code).error(where + " (compiled solve)", solver.rtol, solver.atol, solver.max_num_steps)

    @staticmethod
    def _fill_stats(stats: SolveStats, st, program: _Program, g_host):
        stats.num_fevals = int(program.loop.num_fevals(st))
        if g_host is not None:
            stats.num_steps = stats.num_accepted_steps = len(g_host) - 1
            stats.step_ts = list(g_host[:-1])
            stats.step_sizes = [b - a for a, b in zip(g_host[:-1], g_host[1:])]
            return
        n = int(st.n_accepted)
        stats.num_steps = int(st.n_attempts)
        stats.num_accepted_steps = n
        stats.num_rejected_steps = int(st.n_rejected)
        stats.step_ts = st.tape_t[:n].tolist()
        stats.step_sizes = [b - a for a, b in zip(stats.step_ts, stats.step_ts[1:] + [float(st.t)])]


_PROGRAM_IDS = itertools.count()


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo caches compiled graphs per code object, with a limit on how
    many (``torch._dynamo.config.recompile_limit``, 8) before ``fullgraph=True`` fails hard; every program
    built from one ``def`` would share that budget across handles and shapes. Each program gets its own."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_PROGRAM_IDS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _settings_key(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.detach().reshape(-1).tolist()))
    if isinstance(value, dict):
        return tuple(sorted((k, _settings_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_settings_key(v) for v in value)
    if isinstance(value, (int, float, str, bool, type(None), torch.dtype)):
        return value
    return ("id", id(value))


def compiled_odeint(func, **settings) -> CompiledOdeint:
    """The :class:`CompiledOdeint` that ``odeint(func, ..., compile=True, **settings)`` uses: one per func and
    settings, kept while ``func`` lives (a bound method is keyed by its object and function)."""
    owner, inner = (func.__self__, func.__func__) if hasattr(func, "__self__") and hasattr(func, "__func__") \
        else (func, None)
    key = (inner, _settings_key(settings))
    try:
        table = _HANDLES.setdefault(owner, {})
    except TypeError:   # not weakly referenceable: no reuse across calls
        return CompiledOdeint(func, **settings)
    handle = table.get(key)
    if handle is None:
        handle = table[key] = CompiledOdeint(func, **settings)
    return handle


def decline_adjoint() -> None:
    """The continuous adjoint is not compiled: say so once; the caller runs it eagerly."""
    warn_fallback_once("compile:adjoint", "fastode: the continuous adjoint (odeint_adjoint / gradient='adjoint') is "
                       "not compiled and runs eagerly; odeint(..., gradient='checkpoint', compile=True) is the "
                       "compiled exact gradient of the discrete solve")


def solve(func, y0, t, *, fallback: bool, return_stats: bool, **settings):
    """``odeint(..., compile=True)``'s body."""
    return compiled_odeint(func, fallback=fallback, **settings)(y0, t, return_stats=return_stats)

