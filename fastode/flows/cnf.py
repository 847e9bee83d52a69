"""CNF blocks (FFJORD), stacking, the base distribution and the density loss.

See :mod:`fastode.flows` for the API contract. Conventions: data at ``t = 0``, latent at ``t = T``;
``forward`` returns ``FlowOutput(out, logdet, reg)`` with ``logdet = log|det d out / d in|`` per sample.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..compiling import host_floats
from ..nn.modules import BoundEvaluation
from . import regularizers as R
from .engines import CnfSolve, engine_names, integrate, run_solve
from .solver import Solver, as_solver, local_error_step, method_tableau, state_norm

__all__ = [
    "FlowOutput",
    "StandardNormal",
    "Flow",
    "CNF",
    "SequentialFlow",
    "build_flow",
    "density_loss",
    "draw_noise",
]

_TRACES = ("hutchinson", "exact")
_LEGACY_PATHS = {"cpp_grid": "fused_cpu"}  # CNF.last_path predates the engine registry
_STEP_CONTROLS = ("batch", "per_tile", "per_row")
_NOISES = ("gaussian", "rademacher")


class FlowOutput(NamedTuple):
    """``out``: transformed batch; ``logdet``: ``(B,)`` log|det d out/d in|; ``reg``: name -> value."""

    out: torch.Tensor
    logdet: torch.Tensor
    reg: dict


class StandardNormal(nn.Module):
    """Standard normal base distribution on ``R^dim``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
        return torch.randn(int(n), self.dim, generator=generator, dtype=dtype or torch.get_default_dtype(),
                           device=device)


def draw_noise(like: torch.Tensor, kind: str = "gaussian", generator: torch.Generator | None = None):
    """Hutchinson probe vectors of ``like``'s shape: ``"gaussian"`` N(0, I) or ``"rademacher"`` +-1."""
    if kind == "rademacher":
        e = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return e.to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    raise ValueError(f"noise must be one of {_NOISES}, got {kind!r}")


class _Counter:
    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def add(self, k: int) -> None:
        """Count ``k`` evaluations -- not inside a compiled graph, which would guard on the count and recompile
        every call (the solve's SolveStats still count them)."""
        if not torch.compiler.is_compiling():
            self.n += k


def functional_dynamics(dynamics):
    """A ``torch.func``-composable ``(t, z) -> f`` for ``dynamics`` (pure PyTorch ops).

    Fused kernels (Triton, C++) have no forward-mode AD, so modules exposing the PyTorch reference
    (``ConcatSquashMLP``: :func:`fastode.nn.functional.concatsquash_mlp`; modules with a
    ``torch_forward`` method) use it; any other module is called as is.
    """
    fn = getattr(dynamics, "torch_forward", None)
    if fn is not None:
        return fn
    try:
        from fastode.nn import ConcatSquashMLP
        from fastode.nn import functional as F
    except Exception:  # pragma: no cover
        ConcatSquashMLP = None
    if ConcatSquashMLP is not None and isinstance(dynamics, ConcatSquashMLP):
        def fn(t, z):
            return F.concatsquash_mlp(t, z.reshape(-1, dynamics.dim), dynamics.params(),
                                      dynamics.activation).reshape(z.shape)

        return fn
    return dynamics


class _AugmentedDynamics(nn.Module):
    """The ODE right-hand side of one solve: state ``(z, logdet, *reg_integrals)``.

    Returns ``(f, tr(df/dz), *integrands)``. Built per solve (it carries that solve's probe ``e``), so the
    backward pass of an adjoint solve sees the same configuration and noise as the forward pass.
    """

    def __init__(self, dynamics, e, trace: str, integrands: Sequence, counter: _Counter):
        super().__init__()
        self.dynamics = dynamics
        self.e = e
        self.trace = trace  # "hutchinson" | "exact" | "none"
        self.integrands = tuple(integrands)  # regulariser records
        self.need_jf = any(isinstance(r, R.JacobianFrobenius) for r in self.integrands)
        self.counter = counter
        self._fn = None
        # the dynamics bound for this solve (backend and inputs settled at the first call); kept out of the
        # module's children (it may be the dynamics itself)
        self.__dict__["_net"] = None

    @property
    def mlp_backend(self):
        """The MLP backend this solve's network evaluations ran on: the bound network's (chosen once, at the first
        call), else the module's record of its latest call; None before the first call or for other networks."""
        net = self.__dict__["_net"]
        if isinstance(net, BoundEvaluation):
            return net.backend
        return getattr(net, "last_backend", None)

    def _bound(self, z):
        net = self.__dict__["_net"]
        if net is None:
            bind = getattr(self.dynamics, "bind", None)
            net = self.__dict__["_net"] = bind(z) if callable(bind) else self.dynamics
        return net

    def _generic(self, t, z):
        dyn = self.dynamics
        create = torch.is_grad_enabled()
        want_exact = self.trace == "exact"
        want_vjp = self.trace == "hutchinson" or self.need_jf
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            f = dyn(t, zz)
            tr = jf = None
            if want_exact:
                cols = []
                for i in range(z.shape[-1]):
                    g = torch.autograd.grad(f[..., i].sum(), zz, create_graph=create, retain_graph=True,
                                            allow_unused=True)[0]
                    cols.append(torch.zeros_like(z[..., i]) if g is None else g[..., i])
                tr = torch.stack(cols, -1).sum(-1)
            if want_vjp:
                vjp = torch.autograd.grad(f, zz, self.e, create_graph=create, retain_graph=True,
                                          allow_unused=True)[0]
                if vjp is None:
                    vjp = torch.zeros_like(z)
                if not want_exact:
                    tr = (vjp * self.e).sum(-1)
                jf = (vjp * vjp).sum(-1)
        if not create:
            f = f.detach()
            tr = None if tr is None else tr.detach()
            jf = None if jf is None else jf.detach()
        return f, tr, None, jf

    def _evaluate(self, t, z):
        dyn = self._bound(z)
        if self.trace == "none":
            return dyn(t, z), torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device), None, None
        if not hasattr(dyn, "forward_with_trace"):
            return self._generic(t, z)
        if self.trace == "exact":
            f, tr, ke, _ = dyn.forward_with_trace(t, z, exact=True)
            jf = None
            if self.need_jf:
                _, _, _, jf = dyn.forward_with_trace(t, z, e=self.e)
            return f, tr, ke, jf
        return dyn.forward_with_trace(t, z, e=self.e)

    def forward(self, t, state):
        self.counter.add(1)
        z = state[0]
        if isinstance(t, torch.Tensor):
            t = t.to(z.dtype)
        f, tr, ke, jf = self._evaluate(t, z)
        out = [f, tr]
        for reg in self.integrands:
            if isinstance(reg, R.KineticEnergy):
                out.append(ke if ke is not None else (f * f).sum(-1))
            elif isinstance(reg, R.JacobianFrobenius):
                out.append(jf)
            elif isinstance(reg, R.TaylorOrder):
                if self._fn is None:
                    self._fn = functional_dynamics(self.dynamics)
                tt = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=z.dtype, device=z.device)
                d = R.taylor_derivative(self._fn, tt.reshape(()), z, reg.order)
                out.append((d * d).sum(-1))
            else:  # pragma: no cover
                raise RuntimeError(f"{reg!r} is not an integrand regulariser")
        return tuple(out)


class Flow(nn.Module):
    """Base class of flows: subclasses implement ``forward(x, reverse=False, noise=None, trace=None)``."""

    base: nn.Module

    # --- density ----------------------------------------------------------------------------------------
    def log_prob_and_reg(self, x: torch.Tensor, noise=None):
        """``(log p(x) (B,), reg dict)`` (regularisers are non-empty in training mode only)."""
        out = self(x, noise=noise)
        return self.base.log_prob(out.out) + out.logdet, out.reg

    def log_prob(self, x: torch.Tensor, noise=None) -> torch.Tensor:
        """``log p(x)`` per sample in nats. Evaluation mode uses the evaluation solver and trace."""
        return self.log_prob_and_reg(x, noise=noise)[0]

    def transform(self, x: torch.Tensor, noise=None, trace=None):
        """Data -> latent: ``(z, logdet)``."""
        o = self(x, noise=noise, trace=trace)
        return o.out, o.logdet

    def inverse(self, z: torch.Tensor, noise=None, trace=None):
        """Latent -> data: ``(x, logdet)`` with ``logdet = log|det dx/dz|``."""
        o = self(z, reverse=True, noise=noise, trace=trace)
        return o.out, o.logdet

    def sample(self, n: int, noise=None, generator: torch.Generator | None = None, z: torch.Tensor | None = None):
        """``n`` samples ``x = f^-1(z)``, ``z`` from the base (or given). No divergence is integrated."""
        if z is None:
            z = self.base.sample(n, generator=generator, dtype=self._dtype(), device=self._device())
        return self(z, reverse=True, noise=noise, trace="none").out

    def sample_with_log_prob(self, n: int, noise=None, generator: torch.Generator | None = None,
                             z: torch.Tensor | None = None):
        """``(x, log p(x))`` for ``n`` samples (the divergence is integrated along the inverse map)."""
        if z is None:
            z = self.base.sample(n, generator=generator, dtype=self._dtype(), device=self._device())
        x, logdet = self.inverse(z, noise=noise)
        return x, self.base.log_prob(z) - logdet

    def inverse_error(self, x: torch.Tensor, noise=None) -> torch.Tensor:
        """Batch mean of ``||f^-1(f(x)) - x||_2`` with the active solver (wrap in ``torch.no_grad()``)."""
        z = self(x, noise=noise, trace="none").out
        xr = self(z, reverse=True, noise=noise, trace="none").out
        return (xr - x).norm(dim=-1).mean()

    # --- helpers ----------------------------------------------------------------------------------------
    def _dtype(self):
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def _device(self):
        for p in self.parameters():
            return p.device
        return None

    def cnf_blocks(self):
        return [m for m in self.modules() if isinstance(m, CNF)]

    @property
    def nfe(self) -> int:
        """Function evaluations of all CNF blocks since :meth:`reset_nfe` (regulariser steps included)."""
        return sum(b._counter.n for b in self.cnf_blocks())

    def reset_nfe(self):
        for b in self.cnf_blocks():
            b._counter.n = 0

    def set_train_solver(self, solver=None, **kwargs):
        for b in self.cnf_blocks():
            b.set_train_solver(solver, **kwargs)

    def set_eval_solver(self, solver=None, **kwargs):
        for b in self.cnf_blocks():
            b.set_eval_solver(solver, **kwargs)

    @contextlib.contextmanager
    def using_solver(self, solver=None, trace=None, **kwargs):
        """Temporarily use ``solver`` (a :class:`Solver`, a method name, or Solver keyword arguments applied to
        the active solver) in both modes, and optionally ``trace``, in every CNF block."""
        with contextlib.ExitStack() as stack:
            for b in self.cnf_blocks():
                stack.enter_context(b._using_solver(solver, trace, **kwargs))
            yield self

    def end_time_parameters(self):
        """The learnable end-time parameters of all CNF blocks."""
        return [b._T_raw for b in self.cnf_blocks() if isinstance(b._T_raw, nn.Parameter)]

    def network_parameters(self):
        """Every parameter except the end times (for the theta optimiser of TO-FLOW)."""
        ids = {id(p) for p in self.end_time_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def regularizer_weights(self) -> dict:
        """``{name: weight}`` over all CNF blocks (blocks must agree on a regulariser's weight)."""
        out = {}
        for b in self.cnf_blocks():
            for r in b.regularizers:
                if r.name in out and out[r.name] != r.weight:
                    raise ValueError(f"CNF blocks disagree on the weight of {r.name!r}: {out[r.name]} vs {r.weight}")
                out[r.name] = r.weight
        return out

    def last_stats(self):
        """The latest solve's :class:`fastode.SolveStats` of every CNF block (None entries for torchdiffeq)."""
        return [b.last_stats for b in self.cnf_blocks()]

    def last_solves(self):
        """Per CNF block, the :class:`~fastode.flows.engines.SolveRecord` of its latest solve (None before any)."""
        return [b.last_solve for b in self.cnf_blocks()]

    def set_fused_cpu(self, enabled: bool = True):
        """Allow (default) or forbid the fused CPU path (:mod:`fastode.flows.engines`) in every CNF block."""
        for b in self.cnf_blocks():
            b.fused_cpu = bool(enabled)

    def last_paths(self):
        """Per CNF block, :attr:`CNF.last_path` (the older name of ``last_solve.engine``)."""
        return [b.last_path for b in self.cnf_blocks()]


class CNF(Flow):
    """One FFJORD CNF block ``dz/dt = f(t, z)`` on ``[0, T]`` (see :mod:`fastode.flows` for the contract).

    ``T_parametrization``: ``"sqrt"`` stores ``s`` with ``T = s^2`` (FFJORD's ``sqrt_end_time``);
    ``"linear"`` stores ``T`` itself (TO-FLOW optimises ``T`` directly; use it with
    :class:`~fastode.flows.EndTimeOptimizer`). With ``learn_T=False`` the end time is a buffer.

    dL/dT is the exact derivative of the discrete solve (the last step length / final interpolation
    depends on ``T``) for ``gradient="direct"``/``"checkpoint"``, and the adjoint's moving-speed formula
    ``a(T) . F(T)`` for ``gradient="adjoint"``.

    Engines (:mod:`fastode.flows.engines`): ``engine="auto"`` (default) runs each solve on the first eligible
    engine of the registry -- the fused C++ grid solve (``"cpp_grid"``: CPU float32/float64, a plain
    ``ConcatSquashMLP`` on the C++ backend, a fixed-grid RK method, ``gradient="direct"``, kinetic/Jacobian-Frobenius
    regularisers at most: the whole grid in one C++ call and one backward), the fused C++ adaptive solve
    (``"cpp_adaptive"``: dopri5 / tsit5 / bosh3 with batch-global step control and its discrete adjoint, same
    conditions, ``gradient="direct"`` when a gradient is wanted), else :func:`fastode.odeint` with a network call
    per stage (``"odeint"``). Same values and gradients (dL/dT included), NFE and stats. A name forces
    that engine (:class:`~fastode.flows.engines.EngineUnavailableError` with the reason when it cannot run);
    ``fused_cpu=False`` (or setting the attribute) excludes the fused engines. ``last_solve`` (a
    :class:`~fastode.flows.engines.SolveRecord`) says which engine ran, why the earlier ones did not, the stats and
    the MLP backend; ``last_stats``, ``last_path`` and ``last_path_reason`` are read-only views of it.

    ``step_control``: ``"batch"`` (default; one step size for the batch, torchdiffeq's semantics), ``"per_tile"``
    (tiles of ``step_rows`` rows each with their own step size, accept/reject and status, so that a batch whose rows
    differ in stiffness costs the mean number of steps rather than the maximum; opt-in, not bit-identical to
    torchdiffeq) or ``"per_row"`` (``step_rows = 1``). Per-tile control runs only on the fused adaptive engine; a
    solve it cannot take raises :class:`~fastode.flows.engines.EngineUnavailableError` with the reasons.
    """

    def __init__(self, dynamics: nn.Module, T: float = 0.5, learn_T: bool = False, T_parametrization: str = "sqrt",
                 trace: str = "hutchinson", noise: str = "gaussian", method: str = "dopri5", rtol: float = 1e-5,
                 atol: float = 1e-5, step_size: float | None = None, options: dict | None = None,
                 gradient: str = "direct", backend: str = "auto", train_solver=None, eval_solver=None,
                 eval_trace: str | None = "exact", regularizers=(), base: nn.Module | None = None,
                 dim: int | None = None, fused_cpu: bool = True, engine: str = "auto", step_control: str = "batch",
                 step_rows: int = 64):
        super().__init__()
        if trace not in _TRACES:
            raise ValueError(f"trace must be one of {_TRACES}, got {trace!r}")
        if eval_trace is not None and eval_trace not in _TRACES:
            raise ValueError(f"eval_trace must be one of {_TRACES} or None, got {eval_trace!r}")
        if noise not in _NOISES:
            raise ValueError(f"noise must be one of {_NOISES}, got {noise!r}")
        if T_parametrization not in ("sqrt", "linear"):
            raise ValueError(f"T_parametrization must be 'sqrt' or 'linear', got {T_parametrization!r}")
        if not float(T) > 0:
            raise ValueError(f"the end time T must be positive, got {T!r}")
        if engine != "auto" and engine not in engine_names():
            raise ValueError(f"engine must be 'auto' or one of {list(engine_names())}, got {engine!r}")
        if step_control not in _STEP_CONTROLS:
            raise ValueError(f"step_control must be one of {_STEP_CONTROLS}, got {step_control!r}")
        if step_control == "per_tile" and not (isinstance(step_rows, int) and step_rows >= 1):
            raise ValueError(f"step_rows must be a positive int (rows per tile), got {step_rows!r}")
        self.dynamics = dynamics
        self.dim = int(dim if dim is not None else getattr(dynamics, "dim", 0))
        if self.dim <= 0:
            raise ValueError("cannot infer the dimension from the dynamics; pass dim=")
        self.trace = trace
        self.eval_trace = eval_trace
        self.noise = noise
        # a fixed end time is stored as is (no sqrt round-off, so T = k * step_size stays exact)
        self.T_parametrization = T_parametrization if learn_T else "linear"
        raw = math.sqrt(float(T)) if self.T_parametrization == "sqrt" else float(T)
        raw_t = torch.tensor(raw, dtype=torch.get_default_dtype())
        if learn_T:
            self._T_raw = nn.Parameter(raw_t)
        else:
            self.register_buffer("_T_raw", raw_t)
        default = Solver(method=method, rtol=rtol, atol=atol, step_size=step_size, options=options,
                         gradient=gradient, backend=backend)
        self.train_solver = as_solver(train_solver, default)
        self.eval_solver = as_solver(eval_solver, self.train_solver)
        self.regularizers = R.parse_regularizers(regularizers)
        self.base = base if base is not None else StandardNormal(self.dim)
        self._counter = _Counter()
        self._override = None  # (solver, trace) from using_solver
        self.fused_cpu = bool(fused_cpu)  # may the fused C++ engines run (fastode/flows/fused/)
        self.engine = engine
        self.step_control, self.step_rows = step_control, int(step_rows)
        self.last_solve = None            # SolveRecord of the latest solve

    # --- what ran the latest solve (views of last_solve) --------------------------------------------------------
    @property
    def last_stats(self):
        """:class:`fastode.SolveStats` of the latest solve (None before any, or from the torchdiffeq peer)."""
        return None if self.last_solve is None else self.last_solve.stats

    @property
    def last_path(self) -> str | None:
        """The engine of the latest solve under its older name (``"fused_cpu"`` for ``"cpp_grid"``)."""
        if self.last_solve is None:
            return None
        return _LEGACY_PATHS.get(self.last_solve.engine, self.last_solve.engine)

    @property
    def last_path_reason(self) -> str | None:
        """Why the engines before the one that ran did not (None when the first one ran)."""
        return None if self.last_solve is None else self.last_solve.reason

    def _started(self, record):
        self.last_solve = record

    def extra_repr(self) -> str:
        regs = ", ".join(f"{r.name}={r.weight:g}" for r in self.regularizers)
        return (f"dim={self.dim}, T={float(self.T.detach()):.4g}, learn_T={isinstance(self._T_raw, nn.Parameter)}, "
                f"trace={self.trace!r}, eval_trace={self.eval_trace!r}, noise={self.noise!r}, "
                f"train_solver={self.train_solver.describe()}, eval_solver={self.eval_solver.describe()}"
                + (f", regularizers=[{regs}]" if regs else ""))

    # --- end time ------------------------------------------------------------------------------------------
    @property
    def T(self) -> torch.Tensor:
        return self._T_raw * self._T_raw if self.T_parametrization == "sqrt" else self._T_raw

    @torch.no_grad()
    def set_T(self, value: float):
        if not float(value) > 0:
            raise ValueError(f"the end time must be positive, got {value!r}")
        self._T_raw.fill_(math.sqrt(float(value)) if self.T_parametrization == "sqrt" else float(value))

    @staticmethod
    def _snap_to_grid(T: torch.Tensor, solver: Solver) -> torch.Tensor:
        """For fixed-grid methods, an end time within round-off (1e-9 relative) of a multiple of the step
        size is moved onto it, keeping dT/dT = 1; otherwise the grid would end with a spurious tiny step
        (e.g. ``T = s**2`` with ``s = sqrt(0.5)``)."""
        h = solver.full_options().get("step_size") if solver.fixed_grid else None
        if not h:
            return T
        (T_value,) = host_floats(T.detach().reshape(1))  # traced and guarded under torch.compile
        k = round(T_value / float(h))
        snapped = k * float(h)
        if k >= 1 and abs(T_value - snapped) <= 1e-9 * snapped:
            return T - (T.detach() - snapped)
        return T

    # --- solvers -----------------------------------------------------------------------------------------
    @property
    def solver(self) -> Solver:
        if self._override is not None and self._override[0] is not None:
            return self._override[0]
        return self.train_solver if self.training else self.eval_solver

    @property
    def active_trace(self) -> str:
        if self._override is not None and self._override[1] is not None:
            return self._override[1]
        if self.training or self.eval_trace is None:
            return self.trace
        return self.eval_trace

    def _build_solver(self, base: Solver, solver=None, **kwargs) -> Solver:
        s = as_solver(solver, base)
        return s.replace(**kwargs) if kwargs else s

    def set_train_solver(self, solver=None, **kwargs):
        """Replace the training solver: a :class:`Solver`, a method name, and/or field changes
        (``set_train_solver(step_size=0.25)`` keeps the rest)."""
        self.train_solver = self._build_solver(self.train_solver, solver, **kwargs)

    def set_eval_solver(self, solver=None, trace: str | None = "keep", **kwargs):
        """Replace the evaluation solver (re-discretisation at inference); ``trace`` optionally sets
        ``eval_trace``."""
        self.eval_solver = self._build_solver(self.eval_solver, solver, **kwargs)
        if trace != "keep":
            if trace is not None and trace not in _TRACES:
                raise ValueError(f"trace must be one of {_TRACES} or None, got {trace!r}")
            self.eval_trace = trace

    @contextlib.contextmanager
    def _using_solver(self, solver=None, trace=None, **kwargs):
        if trace is not None and trace not in _TRACES + ("none",):
            raise ValueError(f"trace must be one of {_TRACES + ('none',)}, got {trace!r}")
        new = None
        if solver is not None or kwargs:
            new = self._build_solver(self.solver, solver, **kwargs)
        old = self._override
        self._override = (new, trace)
        try:
            yield self
        finally:
            self._override = old

    # --- the solve ---------------------------------------------------------------------------------------
    def _noise(self, x: torch.Tensor, noise):
        if noise is None:
            return draw_noise(x, self.noise)
        if isinstance(noise, torch.Generator):
            return draw_noise(x, self.noise, generator=noise)
        if isinstance(noise, torch.Tensor):
            if noise.shape != x.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)} but the input has {tuple(x.shape)}")
            return noise.to(dtype=x.dtype, device=x.device)
        raise ValueError(f"noise must be None, a tensor of the input's shape or a torch.Generator, got {type(noise)}")

    def forward(self, x: torch.Tensor, reverse: bool = False, noise=None, trace: str | None = None,
                compute_reg: bool | None = None, logdet0: torch.Tensor | None = None) -> FlowOutput:
        """Integrate ``x`` over ``[0, T]`` (``reverse=True``: ``[T, 0]``). ``trace`` overrides the trace mode
        (``"hutchinson"``, ``"exact"``, or ``"none"`` = no divergence, ``logdet`` zero). ``compute_reg``
        overrides when regularisers are integrated (default: training mode, forward direction). ``logdet0``: the
        log-density change accumulated before this block, the start of its log-density state (as FFJORD's chain
        carries it: the state's size enters the step-size control); ``logdet`` is still this block's own."""
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a (batch, {self.dim}) input, got shape {tuple(x.shape)}")
        trace = trace if trace is not None else self.active_trace
        if trace not in _TRACES + ("none",):
            raise ValueError(f"trace must be one of {_TRACES + ('none',)}, got {trace!r}")
        solver = self.solver
        if compute_reg is None:
            compute_reg = self.training and not reverse and trace != "none"
        regs = self.regularizers if compute_reg else ()
        integrands = [r for r in regs if r.kind == "integrand"]
        errors = [r for r in regs if r.kind == "error"]
        if trace == "none" and regs:
            raise ValueError("regularisers need the divergence; do not combine trace='none' with regularisers")
        need_e = trace == "hutchinson" or any(isinstance(r, R.JacobianFrobenius) for r in integrands)
        e = self._noise(x, noise) if need_e else None
        func = _AugmentedDynamics(self.dynamics, e, trace, integrands, self._counter)

        T = self._snap_to_grid(self.T.to(dtype=x.dtype, device=x.device), solver)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        local = [r for r in errors if isinstance(r, R.LocalError)]
        if len(local) > 1:
            raise ValueError("use at most one LocalError regulariser per CNF")
        t_reg = None
        if local and local[0].mode == "unbiased":
            if reverse:
                raise ValueError("error regularisers are only defined for the forward (data -> latent) solve")
            # U(0, 1) kept away from the ends so that the output times stay strictly increasing
            u01 = torch.rand((), dtype=x.dtype, device=x.device).clamp(1e-6, 1 - 1e-6)
            t_reg = u01 * T.detach()
            times = [zero, t_reg, T]
        else:
            times = [T, zero] if reverse else [zero, T]
        t = torch.stack(times)
        q0 = torch.zeros(x.shape[0], 1 + len(integrands), dtype=x.dtype, device=x.device)  # log-density, integrals
        if logdet0 is not None and trace != "none":
            q0 = torch.cat([logdet0.reshape(-1, 1).to(q0), q0[:, 1:]], 1)
        norm = state_norm(2)
        request = CnfSolve(func, x, q0, t, self.dynamics, e, trace, tuple(integrands), tuple(errors), solver, norm,
                           self._counter, allow_fused=self.fused_cpu,
                           step_rows={"batch": 0, "per_tile": self.step_rows, "per_row": 1}[self.step_control])
        result, self.last_solve = run_solve(request, self.engine, started=self._started)
        (out, q), stats = result.end, result.stats
        logdet = q[:, 0] if logdet0 is None or trace == "none" else q[:, 0] - logdet0.reshape(-1)
        reg = {r.name: q[:, 1 + i] for i, r in enumerate(integrands)}
        for r in errors:
            if isinstance(r, R.GlobalError):
                reg[r.name] = self._global_error(stats, solver)
            else:
                u_reg = None if t_reg is None else (result.mid[0], result.mid[1][:, 0])
                reg[r.name] = self._local_error(r, x, e, trace, T, t_reg, u_reg, stats, solver, norm)
        return FlowOutput(out, logdet, reg)

    # --- error-estimate regularisers ------------------------------------------------------------------------
    def _global_error(self, stats, solver: Solver) -> torch.Tensor:
        if stats is None:
            raise ValueError("the global error regulariser needs per-step error estimates (SolveStats.step_errors) "
                             "from fastode.odeint; the torchdiffeq backend does not expose them")
        if solver.gradient != "direct":
            raise ValueError("the global error regulariser is differentiated through the solve; use gradient='direct'")
        if solver.fixed_grid:
            raise ValueError(f"the global error regulariser needs an adaptive method, got {solver.method!r}")
        errs = getattr(stats, "step_errors", None)
        sizes = getattr(stats, "step_sizes", None)
        if not errs:
            raise RuntimeError("SolveStats.step_errors is empty; the solver recorded no error estimates")
        total = 0
        for E, h in zip(errs, sizes):
            total = total + E * abs(float(h))
        return total

    def _local_error(self, reg: R.LocalError, x, e, trace, T, t_reg, u_reg, stats, solver: Solver, norm):
        method = reg.method or ("dopri5" if solver.fixed_grid else solver.method)
        method_tableau(method)  # (refuses a method without an error estimate before any work)
        rtol = solver.rtol if reg.rtol is None else reg.rtol
        atol = solver.atol if reg.atol is None else reg.atol
        step_func = _AugmentedDynamics(self.dynamics, e, trace, (), self._counter)
        T_d = T.detach()
        if reg.mode == "biased":
            starts = None
            if stats is not None and getattr(stats, "step_ts", None):
                starts = [float(s) for s in stats.step_ts]
            elif solver.fixed_grid:
                h = solver.full_options().get("step_size")
                if h is None:
                    raise ValueError("biased local error with a fixed-grid method needs step_size")
                n = max(1, math.ceil(float(T_d) / float(h) - 1e-12))
                starts = [i * float(h) for i in range(n)]
            if not starts:
                raise ValueError("the biased local error regulariser needs the accepted step times "
                                 "(SolveStats.step_ts from fastode.odeint, or a fixed-grid method)")
            idx = int(torch.randint(len(starts), ()).item())
            t_reg = torch.tensor(starts[idx], dtype=x.dtype, device=x.device)
            with torch.no_grad():
                if float(t_reg) == 0.0:
                    u = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
                else:
                    aux = _AugmentedDynamics(self.dynamics, e, trace, (), _Counter())
                    tt = torch.stack([torch.zeros_like(t_reg), t_reg])
                    s, _ = integrate(aux, (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)), tt,
                                     solver.replace(gradient="direct"), norm)
                    u = (s[0][-1], s[1][-1])
        else:
            u = u_reg
        u = tuple(v.detach() for v in u)
        t_reg = t_reg.detach()
        with torch.no_grad():
            f0 = tuple(v.detach() for v in step_func(t_reg, u))
        ratio, dt, _ = local_error_step(step_func, t_reg, u, f0, method, rtol, atol, norm, T_d)
        self.last_local_step = {"t_reg": t_reg, "dt": dt, "u": u, "f0": f0, "method": method, "rtol": rtol,
                                "atol": atol, "ratio": ratio.detach()}
        return ratio * dt.abs()


class SequentialFlow(Flow):
    """A stack of flows applied in order (data -> latent); the inverse applies them in reverse order.

    ``carry_logdet`` (default False): each CNF block starts its log-density state at the change accumulated by the
    blocks before it, as FFJORD's ``SequentialFlow`` does; the state's size takes part in step-size control, so a
    model trained with FFJORD's code takes the same steps (:func:`fastode.flows.load_ffjord` turns it on). Off, each
    block starts at zero (the blocks' steps do not depend on each other)."""

    def __init__(self, blocks: Sequence[nn.Module], base: nn.Module | None = None, carry_logdet: bool = False):
        super().__init__()
        self.carry_logdet = bool(carry_logdet)
        if len(blocks) == 0:
            raise ValueError("SequentialFlow needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        dims = {getattr(b, "dim", None) for b in blocks} - {None}
        if len(dims) > 1:
            raise ValueError(f"blocks have different dimensions {sorted(dims)}")
        self.dim = dims.pop() if dims else None
        if base is None:
            if self.dim is None:
                raise ValueError("pass base= (the blocks do not say their dimension)")
            base = StandardNormal(self.dim)
        self.base = base

    def _block_noise(self, noise, i):
        if noise is None or isinstance(noise, (torch.Tensor, torch.Generator)):
            return noise
        if isinstance(noise, (list, tuple)):
            if len(noise) != len(self.blocks):
                raise ValueError(f"got {len(noise)} noise tensors for {len(self.blocks)} blocks")
            return noise[i]
        raise ValueError("noise must be None, a tensor, a torch.Generator or a list with one entry per block")

    def forward(self, x: torch.Tensor, reverse: bool = False, noise=None, trace: str | None = None,
                compute_reg: bool | None = None) -> FlowOutput:
        order = range(len(self.blocks) - 1, -1, -1) if reverse else range(len(self.blocks))
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        reg: dict = {}
        h = x
        for i in order:
            carry = {"logdet0": logdet} if self.carry_logdet and isinstance(self.blocks[i], CNF) else {}
            o = self.blocks[i](h, reverse=reverse, noise=self._block_noise(noise, i), trace=trace,
                               compute_reg=compute_reg, **carry)
            h = o.out
            logdet = logdet + o.logdet
            for k, v in o.reg.items():
                reg[k] = reg[k] + v if k in reg else v
        return FlowOutput(h, logdet, reg)


def density_loss(flow: Flow, x: torch.Tensor, noise=None, module: nn.Module | None = None):
    """``loss = -mean log p(x) + sum_r weight_r * mean(reg_r)``. Returns ``(loss, info)`` with float entries
    ``nll``, each regulariser's batch mean, and ``nfe`` (of this call).

    ``module``: what to call for the forward pass instead of ``flow`` -- pass the
    ``DistributedDataParallel`` wrapper of ``flow`` so that its gradient hooks run (``flow`` is still used
    for the base distribution, the weights and the NFE count).
    """
    n0 = flow.nfe
    out = (module if module is not None else flow)(x, noise=noise)
    logp, reg = flow.base.log_prob(out.out) + out.logdet, out.reg
    nll = -logp.mean()
    loss = nll
    weights = flow.regularizer_weights()
    info = {"nll": float(nll.detach())}
    for name, v in reg.items():
        m = v.mean()
        loss = loss + weights.get(name, 1.0) * m
        info[name] = float(m.detach())
    info["nfe"] = flow.nfe - n0
    return loss, info


def build_flow(dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh", num_blocks: int = 1,
               T: float = 0.5, learn_T: bool = True, time_varying: int | None = None, nn_backend: str = "auto",
               **cnf_kwargs) -> SequentialFlow:
    """FFJORD's model: ``num_blocks`` CNF blocks with concatsquash MLP dynamics ``dim -> hidden -> dim``.

    ``time_varying=k`` uses :class:`~fastode.flows.TimeVaryingConcatSquashMLP` with ``k`` control times on
    ``[0, T]`` (Onken & Ruthotto's Disc-Opt setting). Remaining keyword arguments go to :class:`CNF`.
    """
    from fastode.nn import ConcatSquashMLP

    from .discopt import TimeVaryingConcatSquashMLP

    blocks = []
    for _ in range(int(num_blocks)):
        if time_varying:
            dyn = TimeVaryingConcatSquashMLP(dim, hidden, activation, num_controls=int(time_varying), T=T,
                                             backend=nn_backend)
        else:
            dyn = ConcatSquashMLP(dim, hidden, activation, backend=nn_backend)
        blocks.append(CNF(dyn, T=T, learn_T=learn_T, **cnf_kwargs))
    return SequentialFlow(blocks)
