"""Continuous normalizing flows (FFJORD-style CNFs), their regularisers and training accelerators.

API contract (used by ``fastode.train``; keep stable)
=====================================================

Conventions
-----------
* Data ``x`` sit at ``t = 0``, the latent ``z`` at ``t = T`` (FFJORD). ``transform`` integrates 0 -> T,
  ``inverse`` integrates T -> 0.
* Every flow returns ``logdet = log|det d(output)/d(input)|`` per sample (normalising-flow convention),
  so ``log p(x) = base.log_prob(z) + logdet`` and log-determinants of stacked blocks add. For a CNF
  block ``logdet = +int_0^T tr(df/dz) dt`` in the forward direction and ``-int_0^T tr(df/dz) dt`` in the
  inverse one.
* Log-densities are in nats, summed over dimensions; the loss is the batch mean.
* Regulariser values are *per sample* tensors ``(B,)`` (RNODE, TayNODE) or per-batch scalars
  ``()`` (error-estimate regularisers), summed over CNF blocks.

Solvers
-------
``Solver(method="dopri5", rtol=1e-5, atol=1e-5, step_size=None, options=None, gradient="direct",
backend="auto")``: one solver configuration. ``step_size`` is a shortcut for ``options["step_size"]``
(fixed-grid methods). ``gradient`` is ``"direct"`` (backprop through the discrete solve =
discretise-optimise), ``"checkpoint"`` (same gradient, less memory) or ``"adjoint"`` (optimise-discretise).
``backend``: ``"auto"``/``"fastode"`` (:func:`fastode.odeint`) or ``"torchdiffeq"`` (torchdiffeq's solvers as
a peer for comparisons, chosen explicitly; never a fallback).
Step-size control sees ``z`` and the log-determinant only (torchdiffeq-style mixed RMS norm passed as
``options["norm"]``); regulariser states never affect step sizes. ``Solver.replace(**changes)`` copies.
Defaults are FFJORD's (dopri5, rtol = atol = 1e-5), not torchdiffeq's.

Building blocks
---------------
``CNF(dynamics, T=0.5, learn_T=False, T_parametrization="sqrt", trace="hutchinson", noise="gaussian",
method="dopri5", rtol=1e-5, atol=1e-5, step_size=None, options=None, gradient="direct", backend="auto",
train_solver=None, eval_solver=None, eval_trace="exact", regularizers=(), base=None, dim=None,
fused_cpu=True, engine="auto", step_control="batch", step_rows=64)``
    ``dynamics``: a :class:`fastode.nn.ConcatSquashMLP`, a :class:`TimeVaryingConcatSquashMLP`, or any
    module ``f(t, z)``; modules with ``forward_with_trace(t, z, e=None, exact=False) -> (f, trace,
    kinetic, jac_frob)`` use it (fused kernels), others go through autograd.
    The keyword solver arguments build ``train_solver`` when it is not given; ``eval_solver`` defaults to
    the train solver. ``module.training`` picks the solver *and* the trace: training uses ``trace``,
    evaluation uses ``eval_trace`` (exact by default; ``None`` = same as training).
    ``regularizers``: names, :class:`Regularizer` objects or a ``{name: weight}`` dict (see below);
    integrated only in training mode and only in the forward (data -> latent) direction.

    * ``forward(x, reverse=False, noise=None, trace=None, compute_reg=None) -> FlowOutput(out, logdet, reg)``
      (a NamedTuple; ``trace`` overrides the mode: ``"hutchinson"``, ``"exact"`` or ``"none"`` = no
      divergence; ``compute_reg`` overrides "training and forward direction").
    * ``transform(x, noise=None) -> (z, logdet)``, ``inverse(z, noise=None) -> (x, logdet)``.
    * ``log_prob(x, noise=None) -> (B,)``; ``log_prob_and_reg(x, noise=None) -> (logp, reg)``.
    * ``sample(n, noise=None, generator=None) -> (n, D)``; ``sample_with_log_prob(n) -> (x, logp)``.
    * ``inverse_error(x) -> scalar``: batch mean of ``||f^-1(f(x)) - x||_2`` (Onken & Ruthotto eq. 17).
    * ``T`` (tensor property), ``set_T(value)``, ``end_time_parameters()``, ``network_parameters()``.
      ``T_parametrization="sqrt"`` (FFJORD, ``T = s**2``) or ``"linear"`` (TO-FLOW); a fixed ``T`` is stored
      as is. dL/dT is the exact derivative of the discrete solve (``direct``/``checkpoint``) or the
      adjoint's moving-speed term (``adjoint``). For fixed-grid methods an end time within round-off of a
      multiple of ``step_size`` is snapped onto it (no spurious tiny last step).
    * ``set_train_solver(...)``, ``set_eval_solver(...)`` (``Solver`` or its keyword arguments),
      ``solver`` (the active one), ``with flow.using_solver(solver, trace=None): ...`` (temporary override,
      e.g. a re-discretisation sweep).
    * ``nfe`` (function evaluations counted since ``reset_nfe()``, including regulariser steps and the
      adjoint's backward evaluations), ``last_stats`` (per block: the latest solve's
      :class:`fastode.SolveStats` with the fastode backend, else ``None``), ``last_local_step`` (dict:
      ``t_reg``, ``dt``, ``u``, ``method``, ``ratio`` of the latest local error step).

    * ``engine`` (argument and attribute, default ``"auto"``) and ``fused_cpu`` (default True;
      ``flow.set_fused_cpu(False)`` for a stack): each solve runs on the first eligible engine of
      :mod:`fastode.flows.engines` -- ``"cpp_grid"`` for solves that :class:`fastode.cpp.CnfStepper` computes
      identically (CPU float32/float64, a plain ``ConcatSquashMLP`` whose backend resolves to ``"cpp"``, a
      fixed-grid one-step RK method, ``gradient="direct"``, trace exact or Hutchinson, kinetic /
      Jacobian-Frobenius (Hutchinson only) regularisers: the whole grid in one C++ call and one backward),
      ``"cpp_adaptive"`` for the adaptive ones (dopri5, tsit5, bosh3; the whole solve and its discrete adjoint in
      C++, batch-global step control as torchdiffeq), on CUDA ``"triton_grid"`` / ``"triton_adaptive"`` (the same
      two engines over the Triton backend, :mod:`fastode.flows.fused`), else ``"odeint"`` (:func:`fastode.odeint`).
      Same values, gradients (dL/dT included), ``nfe`` and stats (``tests/test_engine_conformance.py``).
      ``step_control="per_tile"`` (tiles of ``step_rows`` rows) or ``"per_row"``: each tile its own step size, on
      the fused adaptive engines only.
      ``fused_cpu=False`` excludes the fused engines; a name forces one (``EngineUnavailableError`` saying why
      when it cannot run). ``last_solve`` (per block; ``flow.last_solves()``) records the engine, why earlier
      ones did not run, the stats and the MLP backend; ``last_path`` / ``last_path_reason`` are its older
      names. No double backward on the fused engine.

    ``noise`` (Hutchinson probe vectors): ``None`` draws one vector per sample per solve (Gaussian or
    Rademacher), fixed across every RK stage, step and the backward pass; a tensor of ``x``'s shape uses
    it; a ``torch.Generator`` draws from it.

``SequentialFlow(blocks, base=None, carry_logdet=False)``: stacks CNF blocks (and any flow with the same
``forward`` signature). Same methods as ``CNF``; ``noise`` may be a list with one entry per block (or one tensor
used by every block); ``set_eval_solver``/``set_train_solver``/``using_solver`` apply to every CNF block.
``carry_logdet``: each CNF block's log-density state starts at the change accumulated before it (FFJORD's chain;
it steers step-size control).

``MovingBatchNorm1d(dim, eps=1e-4, decay=0.1, bn_lag=0.0)``: FFJORD's moving batch normalisation as a flow layer.
``load_ffjord(path_or_dict, activation=None)``: a model trained with FFJORD's or RNODE's code, as a fastode flow
(:mod:`fastode.flows.ffjord`; ``python -m fastode.flows.ffjord checkpt.pth flow.pt`` converts once).
``DeployedFlow(flow, what="log_prob" | "sample", method="rk4", steps=None, step_size=None)``: the flow on a fixed grid
with standard operators only; ``export_flow(flow, path, ...)`` writes it with ``torch.export`` (``.pt2``) or to ONNX
(``.onnx``) (:mod:`fastode.flows.deploy`).

``StandardNormal(dim)``: the base distribution (``log_prob(z)``, ``sample(n, generator=None)``).

``build_flow(dim, hidden=(64, 64, 64), activation="tanh", num_blocks=1, T=0.5, learn_T=True,
time_varying=None, nn_backend="auto", **cnf_kwargs) -> SequentialFlow``: FFJORD's ``build_model``;
``time_varying=k`` uses Disc-Opt weights on ``k`` control times (:class:`TimeVaryingConcatSquashMLP`).

Regularisers (each a per-sample integrand integrated as an extra state, or a solver-error term)
--------------------------------------------------------------------------------------------------
``KineticEnergy(weight)`` ``"kinetic"``: ``int_0^T ||f||^2 dt`` (RNODE, paper form: sum over dims, no 1/2).
``JacobianFrobenius(weight)`` ``"jacobian_frobenius"`` (alias ``"jf"``): ``int_0^T ||e^T df/dz||^2 dt`` with
the trace's own probe ``e`` (free with the Hutchinson VJP; an extra VJP when the trace is exact).
``TaylorOrder(order, weight)`` ``"r2"``/``"r3"``: TayNODE ``int_0^T ||d^K z/dt^K||^2 dt`` (exact total
derivatives by nested forward-mode ``torch.func.jvp``).
``GlobalError(weight)`` ``"global_error"``: ``sum_j E_j |dt_j|`` over the accepted steps of the solve
(discretise-optimise through the adaptive solver; needs the fastode backend, ``gradient="direct"``).
``LocalError(weight, mode="unbiased"|"biased", method=None)`` ``"local_error"`` / ``"local_error_biased"``:
Pal et al. (2023), one embedded RK step from ``t_reg``; ``E_est(t_reg) * |dt|``.
``density_loss(flow, x, noise=None, module=None) -> (loss, info)``: ``-mean log p(x) + sum_r weight_r *
mean(reg_r)``; ``info`` holds floats ``nll``, each regulariser's mean, ``nfe``. Under DDP pass
``module=ddp_wrapper`` (the forward must go through the wrapper for its gradient hooks).
``flow.regularizer_weights() -> {name: weight}``; weights live in the regulariser records.

TO-FLOW (learnable end time)
----------------------------
``EndTimeOptimizer(flow, lr=1e-2, alpha=0.1, eps=0.1, mode="alternate"|"joint", t0=0.0)``: Adam on the
end times only, temporal regularisation ``alpha*|T|`` and the clip ``T in [t0+eps, 2*T0-t0-eps]``.
``network_parameters(flow)`` gives every other parameter (build the theta optimiser from it).
Per iteration: ``loss.backward(); opt.step()`` then ``t_opt.step()`` (joint: uses the same backward) or
``t_opt.alternate_step(loss_fn)`` (coordinate descent: a new forward/backward with theta frozen).
``t_opt.state_dict()`` / ``load_state_dict()`` keep the optimiser state and the clip centres ``T0``;
``clip_end_time(T, T0, t0, eps)`` is eq. 17.

Disc-Opt (Onken & Ruthotto)
---------------------------
``TimeVaryingConcatSquashMLP(dim, hidden, activation, control_times=None, num_controls=2, T=1.0,
backend="auto")``: weights ``theta(t)`` given at control times, linearly interpolated (constant outside);
``refine(num_controls)`` prolongs to a finer control grid.
``MultilevelLevel(iterations, method=None, step_size=None, rtol=None, atol=None, lr=None,
num_controls=None)``, ``multilevel_schedule(...)``, ``apply_level(flow, level, optimizer=None)``,
``multilevel_train(flow, levels, train_fn, optimizer=None)``: coarse-to-fine training, warm-started.
"""
from . import regularizers
from .cnf import (
    CNF,
    Flow,
    FlowOutput,
    SequentialFlow,
    StandardNormal,
    build_flow,
    density_loss,
    draw_noise,
    functional_dynamics,
)
from .discopt import (
    MultilevelLevel,
    TimeVaryingConcatSquashMLP,
    apply_level,
    multilevel_schedule,
    multilevel_train,
)
from .end_time import EndTimeOptimizer, clip_end_time, end_time_parameters, network_parameters
from .regularizers import (
    REGULARIZER_NAMES,
    GlobalError,
    JacobianFrobenius,
    KineticEnergy,
    LocalError,
    Regularizer,
    TaylorOrder,
    parse_regularizers,
    taylor_derivative,
)
from .batchnorm import MovingBatchNorm1d
from .engines import EngineUnavailableError, SolveRecord, engine_names, register_engine
from .deploy import DeployedFlow, export_flow
from .ffjord import load_ffjord
from .solver import FIXED_GRID_METHODS, Solver

__all__ = [
    "CNF", "Flow", "FlowOutput", "SequentialFlow", "StandardNormal", "build_flow", "density_loss", "draw_noise",
    "functional_dynamics", "MultilevelLevel", "TimeVaryingConcatSquashMLP", "apply_level", "multilevel_schedule",
    "multilevel_train", "EndTimeOptimizer", "clip_end_time", "end_time_parameters", "network_parameters",
    "REGULARIZER_NAMES", "GlobalError", "JacobianFrobenius", "KineticEnergy", "LocalError", "Regularizer",
    "TaylorOrder", "parse_regularizers", "taylor_derivative", "regularizers", "FIXED_GRID_METHODS", "Solver",
    "EngineUnavailableError", "SolveRecord", "engine_names", "register_engine", "MovingBatchNorm1d", "load_ffjord",
    "DeployedFlow", "export_flow",
]
