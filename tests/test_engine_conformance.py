"""One conformance suite for every CNF engine in the registry (``engine_names()``): the same values, gradients, NFE,
stats and errors as the ``"odeint"`` engine, and the documented reason when an engine declines a solve.

References: every engine is compared with the ``"odeint"`` engine (fastode.odeint, one network call per RK stage),
and ``"odeint"`` itself with the torchdiffeq peer (``"torchdiffeq"``, torchdiffeq's solvers on the same augmented
state). float64: the same steps and NFE and the values to rounding; float32: the native engines sum in their own
order, so values agree to the solve's tolerance and a step whose error estimate is rounding noise may go the other way.

Engines run where they can: the C++ ones when the extension is built, the Triton ones compiled on CUDA or under the
Triton interpreter (tiny shapes, a ragged batch of 37 rows on two programs, outputs and scratch NaN-poisoned before
the kernels write them, and only the cases marked ``light``: the interpreter is slow). An engine that is not
available here is skipped with the reason.
"""
import dataclasses
import warnings

import pytest
import torch

import fastode.cpp as fc
from _kernels_env import KDEV, SKIP_REASON as TRITON_SKIP, small_poisoned_mlp_kernels
from fastode.errors import FallbackWarning, MaxStepsExceededError, NonFiniteError
from fastode.flows import CNF, EngineUnavailableError, TimeVaryingConcatSquashMLP, engine_names
from fastode.nn import ConcatSquashMLP

B = 37  # ragged: not a multiple of any tile
ENGINES = engine_names()
KIND = {"cpp_grid": "grid", "triton_grid": "grid", "cpp_adaptive": "adaptive", "triton_adaptive": "adaptive"}


@dataclasses.dataclass(frozen=True)
class Env:
    """Where an engine runs: ``device``, the MLP backend of its dynamics, the reference engine and the MLP backend
    the reference evaluates with, the problem size (``dim``, ``hidden``), whether only light cases run."""

    device: str
    backend: str
    ref: str
    ref_backend: str
    dim: int
    hidden: tuple
    light_only: bool
    peer: bool = False  # the engine is torchdiffeq (the solver asks for the peer)


def _env(name):
    if name.startswith("cpp_"):
        if not fc.available():
            pytest.skip("the C++ extension fastode._C is not built")
        return Env("cpu", "auto", "odeint", "auto", 3, (16, 16), False)
    if name.startswith("triton_"):
        if TRITON_SKIP is not None:
            pytest.skip(TRITON_SKIP)
        return Env(KDEV, "triton", "odeint", "torch", 2, (16,), KDEV == "cpu")
    if name == "odeint":
        pytest.importorskip("torchdiffeq")
        return Env("cpu", "auto", "torchdiffeq", "auto", 3, (16, 16), False)
    if name == "torchdiffeq":
        pytest.importorskip("torchdiffeq")
        return Env("cpu", "auto", "odeint", "auto", 3, (16, 16), False, peer=True)
    pytest.skip(f"no conformance environment for engine {name!r}")  # a newly registered engine: add one


@pytest.fixture(autouse=True)
def _small_poisoned_triton():
    if TRITON_SKIP is not None:
        yield
        return
    with small_poisoned_mlp_kernels():
        yield


def _cnf(env, dtype, method, *, tol=1e-5, T=0.47, trace="hutchinson", regs=(), **kw):
    torch.manual_seed(0)
    dyn = kw.pop("dyn", None) or ConcatSquashMLP(env.dim, env.hidden, "tanh", backend=env.backend)
    cnf = CNF(dyn, T=T, method=method, rtol=tol, atol=tol, trace=trace, eval_trace=trace, regularizers=regs, **kw)
    return cnf.to(dtype=dtype, device=env.device)


def _data(env, dtype, scale=1.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, env.dim, generator=g, dtype=dtype) * scale
    e = torch.randn(B, env.dim, generator=g, dtype=dtype)
    return x.to(env.device), e.to(env.device)


def _use(cnf, env, engine):
    """Point ``cnf`` at ``engine`` (the engine under test or its reference) in ``env``: the MLP backend, and the
    solvers' backend (the torchdiffeq peer runs when the solver asks for it; as a reference it takes "checkpoint" as
    "direct", the same gradient)."""
    if not hasattr(cnf, "_conformance_solvers"):
        cnf._conformance_solvers = (cnf.train_solver, cnf.eval_solver)
    ref = engine == env.ref
    cnf.engine = engine
    cnf.dynamics.backend = env.ref_backend if ref else env.backend
    solvers = []
    for solver in cnf._conformance_solvers:
        if engine == "torchdiffeq":
            solver = solver.replace(backend="torchdiffeq")
            if ref and solver.gradient == "checkpoint":
                solver = solver.replace(gradient="direct")
        solvers.append(solver)
    cnf.train_solver, cnf.eval_solver = solvers
    cnf._counter.n = 0


def _solve(cnf, env, engine, x, e, reverse=False, compute_reg=None):
    _use(cnf, env, engine)
    with torch.no_grad():
        out = cnf(x, noise=e, reverse=reverse, compute_reg=compute_reg)
    return out, cnf.last_solve, cnf._counter.n


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)


def _same_stats(a, b, dtype):
    keys = ("num_fevals", "num_steps", "num_accepted_steps", "num_rejected_steps", "method")
    if dtype == torch.float32:  # a borderline float32 step may go the other way
        assert abs(a.num_steps - b.num_steps) <= 1
        return
    for k in keys:
        assert getattr(a, k) == getattr(b, k), k
    assert a.step_ts == pytest.approx(b.step_ts, rel=1e-9, abs=1e-12)
    assert a.step_sizes == pytest.approx(b.step_sizes, rel=1e-9, abs=1e-12)


def _peer_methods() -> tuple:
    try:
        from torchdiffeq._impl.odeint import SOLVERS
    except Exception:  # torchdiffeq missing: the two engines that need it skip in _env
        return ()
    return tuple(SOLVERS)


PEER_METHODS = _peer_methods()


def _pairs(cases, engines=ENGINES, method_at=4):
    """``(engine, case)`` for the cases each engine runs: its kind (grid or adaptive), and methods torchdiffeq has
    when torchdiffeq is the engine or its reference."""
    return [pytest.param(name, case, id=f"{name}-{case[0]}") for name in engines for case in cases
            if KIND.get(name, case[1]) == case[1]
            and not (name in ("odeint", "torchdiffeq") and PEER_METHODS and case[method_at] not in PEER_METHODS)]


def _applies(env, light):
    if env.light_only and not light:
        pytest.skip("the Triton interpreter runs the light cases only")


# ------------------------------------------------------------------------------------------------------------
# values, NFE and stats

KIN_JF = {"kinetic": 0.1, "jf": 0.1}
VALUE_CASES = [  # (id, kind, light, dtype, method, CNF settings, solve settings)
    ("dopri5-exact", "adaptive", True, torch.float64, "dopri5", dict(trace="exact"), {}),
    ("tsit5-reverse", "adaptive", True, torch.float64, "tsit5", {}, dict(reverse=True)),
    ("bosh3-integrals", "adaptive", True, torch.float64, "bosh3", dict(regs=KIN_JF), dict(compute_reg=True)),
    ("dopri5-f32-exact", "adaptive", True, torch.float32, "dopri5", dict(trace="exact"), {}),
    ("rejections-and-max-step", "adaptive", True, torch.float64, "dopri5",
     dict(tol=2e-8, regs=KIN_JF, options={"first_step": 0.5, "max_step": 0.4}), dict(compute_reg=True, scale=2.0)),
    ("dopri5-f32-hutchinson", "adaptive", False, torch.float32, "dopri5", {}, {}),
    ("tsit5-f32-exact-reverse", "adaptive", False, torch.float32, "tsit5", dict(trace="exact"), dict(reverse=True)),
    ("bosh3-f32-exact", "adaptive", False, torch.float32, "bosh3", dict(trace="exact"), {}),
    ("dopri5-max-step", "adaptive", False, torch.float64, "dopri5", dict(options={"max_step": 0.1}), {}),
    ("rk4-integrals", "grid", True, torch.float64, "rk4", dict(step_size=0.25, regs=KIN_JF), dict(compute_reg=True)),
    ("rk4_classic-f32-exact", "grid", True, torch.float32, "rk4_classic",
     dict(step_size=0.25, trace="exact", regs={"kinetic": 0.1}), dict(compute_reg=True)),
    ("rk4-T-on-the-grid", "grid", False, torch.float64, "rk4", dict(step_size=0.05, T=0.5), {}),
    ("rk4_classic-no-step-size", "grid", False, torch.float64, "rk4_classic", dict(T=0.3), {}),
    ("heun3", "grid", False, torch.float64, "heun3", dict(step_size=0.1), {}),
    ("midpoint-reverse-f32", "grid", False, torch.float32, "midpoint", dict(step_size=0.1), dict(reverse=True)),
]


@pytest.mark.parametrize("name, case", _pairs(VALUE_CASES))
def test_values_nfe_and_stats(name, case):
    _, kind, light, dtype, method, settings, run = case
    env = _env(name)
    _applies(env, light)
    run = dict(run)
    x, e = _data(env, dtype, run.pop("scale", 1.0))
    cnf = _cnf(env, dtype, method, **settings).eval()
    o1, r1, n1 = _solve(cnf, env, name, x, e, **run)
    o0, r0, n0 = _solve(cnf, env, env.ref, x, e, **run)
    assert (r1.engine, r0.engine) == (name, env.ref)
    if name in KIND:
        assert r1.mlp_backend == name.split("_")[0]
    tol = _tol(dtype)
    torch.testing.assert_close(o1.out, o0.out, **tol)
    torch.testing.assert_close(o1.logdet, o0.logdet, **tol)
    assert set(o1.reg) == set(o0.reg)
    for k in o0.reg:
        torch.testing.assert_close(o1.reg[k], o0.reg[k], **tol)
    if not env.peer and env.ref != "torchdiffeq":  # torchdiffeq leaves no stats
        assert n1 == r1.stats.num_fevals > 0
        _same_stats(r1.stats, r0.stats, dtype)
    if dtype == torch.float64 or kind == "grid":
        assert n1 == n0


# ------------------------------------------------------------------------------------------------------------
# gradients

GRAD_CASES = [  # (id, kind, light, dtype, method, CNF settings, solve settings)
    ("dopri5-direct-T", "adaptive", True, torch.float64, "dopri5",
     dict(learn_T=True, regs=KIN_JF, gradient="direct"), {}),
    ("bosh3-checkpoint-T", "adaptive", True, torch.float64, "bosh3",
     dict(learn_T=True, regs=KIN_JF, gradient="checkpoint"), {}),
    ("tsit5-f32-direct", "adaptive", True, torch.float32, "tsit5", dict(learn_T=True, gradient="direct"), {}),
    ("dopri5-exact-reverse-T", "adaptive", False, torch.float64, "dopri5",
     dict(learn_T=True, trace="exact", gradient="direct"), dict(reverse=True)),
    ("tsit5-f32-exact-T", "adaptive", False, torch.float32, "tsit5", dict(learn_T=True, trace="exact"), {}),
    ("rk4-direct", "grid", True, torch.float64, "rk4", dict(step_size=0.25, regs={"kinetic": 0.1}), {}),
    ("rk4-direct-T", "grid", False, torch.float64, "rk4", dict(step_size=0.05, learn_T=True, regs=KIN_JF), {}),
    ("heun3-f32-exact-T", "grid", False, torch.float32, "heun3",
     dict(step_size=0.1, learn_T=True, trace="exact", regs={"kinetic": 0.1}), {}),
    ("midpoint-reverse-T", "grid", False, torch.float64, "midpoint", dict(step_size=0.1, learn_T=True),
     dict(reverse=True)),
    ("rk4-checkpoint", "grid", True, torch.float64, "rk4",
     dict(step_size=0.25, gradient="checkpoint", regs={"kinetic": 0.1}), {}),
    ("dopri5-adjoint", "adaptive", True, torch.float64, "dopri5", dict(gradient="adjoint"), {}),
    ("rk4-adjoint", "grid", True, torch.float64, "rk4", dict(step_size=0.25, gradient="adjoint"), {}),
]

#: (engine, case) -> the reason it declines (checked: an explicit request raises it, "auto" records it)
DECLINES = {
    ("cpp_grid", "rk4-checkpoint"): "gradient='checkpoint'",
    ("triton_grid", "rk4-direct-T"): "output times require a gradient",
    ("triton_grid", "heun3-f32-exact-T"): "output times require a gradient",
    ("triton_grid", "midpoint-reverse-T"): "output times require a gradient",
    ("torchdiffeq", "bosh3-checkpoint-T"): "no checkpointed discrete adjoint",
    ("torchdiffeq", "rk4-checkpoint"): "no checkpointed discrete adjoint",
    ("cpp_adaptive", "dopri5-adjoint"): "gradient='adjoint'",
    ("triton_adaptive", "dopri5-adjoint"): "gradient='adjoint'",
    ("cpp_grid", "rk4-adjoint"): "gradient='adjoint'",
    ("triton_grid", "rk4-adjoint"): "gradient='adjoint'",
}


def _grads(cnf, env, engine, x, e, reverse=False):
    """A training loss's gradients w.r.t. the input and every CNF parameter (the end time included)."""
    _use(cnf, env, engine)
    xx = x.clone().requires_grad_()
    o = cnf(xx, noise=e, reverse=reverse, compute_reg=True)
    w = torch.linspace(0.5, 1.5, B, dtype=x.dtype, device=x.device)
    loss = (o.out ** 2).sum() + (w * o.logdet).sum() + sum(0.3 * v.sum() for v in o.reg.values())
    grads = torch.autograd.grad(loss, [xx] + list(cnf.parameters()))
    return loss.detach(), grads, cnf.last_solve


@pytest.mark.parametrize("name, case", _pairs(GRAD_CASES))
def test_gradients(name, case):
    """The engine's gradient is the exact gradient of the same discrete solve: w.r.t. the input, the probe-weighted
    log-density, the integrals, every MLP parameter and the learned end time; checkpoint mode counts the backward's
    evaluations as odeint's does."""
    cid, kind, light, dtype, method, settings, run = case
    env = _env(name)
    _applies(env, light)
    cnf = _cnf(env, dtype, method, tol=1e-6, **settings).train()
    x, e = _data(env, dtype)
    why = DECLINES.get((name, cid))
    if why is not None:
        with pytest.raises((EngineUnavailableError, ValueError), match=why):
            _grads(cnf, env, name, x, e, **run)
        return
    l1, g1, r1 = _grads(cnf, env, name, x, e, **run)
    l0, g0, r0 = _grads(cnf, env, env.ref, x, e, **run)
    assert (r1.engine, r0.engine) == (name, env.ref)
    torch.testing.assert_close(l1, l0, **_tol(dtype))
    rel = 1e-9 if dtype == torch.float64 else 3e-3  # float32: the steps' rounding, relative to each gradient's size
    if "torchdiffeq" in (name, env.ref) and kind == "adaptive":
        rel = 1e-4  # torchdiffeq differentiates through its step-size choice; fastode's steps are constants
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        assert (a - b).abs().max() <= rel * max(1.0, b.abs().max().item())
    if settings.get("learn_T"):
        assert abs(float(g1[1])) > 0  # dL/dT (the raw end-time parameter) is there
    if not env.peer and env.ref != "torchdiffeq":
        _same_stats(r1.stats, r0.stats, dtype)
        if settings.get("gradient") == "checkpoint":  # never more than odeint's (the C++ reuses FSAL stages)
            assert 0 < r1.stats.num_fevals_backward <= r0.stats.num_fevals_backward


# ------------------------------------------------------------------------------------------------------------
# errors

ERROR_CASES = [  # (id, kind, method, CNF settings, what to do to the input, the error odeint raises)
    ("max-num-steps", "adaptive", "dopri5", dict(tol=1e-9, options={"max_num_steps": 2}), None,
     MaxStepsExceededError),
    ("nan-input-adaptive", "adaptive", "dopri5", {}, "nan", NonFiniteError),
    ("nan-input-grid", "grid", "rk4", dict(step_size=0.25), "nan", NonFiniteError),
]


@pytest.mark.parametrize("name, case", _pairs(ERROR_CASES, [n for n in ENGINES if n != "torchdiffeq"], method_at=2))
def test_errors_are_odeints(name, case):  # (the peer raises its own errors)
    """A solve that cannot finish raises the error ``odeint`` raises (its class, naming the step or time): a fused
    engine's failed solve is re-run on ``"odeint"``, whose error it is (the re-run warned once)."""
    _, kind, method, settings, poison, error = case
    env = _env(name)
    cnf = _cnf(env, torch.float64, method, **settings).eval()
    x, e = _data(env, torch.float64)
    if poison == "nan":
        x[5, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(error, match="t="):
            _solve(cnf, env, name, x, e)
    if env.ref != "torchdiffeq":  # the reference raises the same class (the peer raises its own)
        with pytest.raises(error):
            _solve(cnf, env, env.ref, x, e)


# ------------------------------------------------------------------------------------------------------------
# declines

SKIP_CASES = [  # (id, CNF settings, {engine or kind: the reason's words})
    ("error-regulariser", dict(method="dopri5", regs={"global_error": 0.1}),
     {"adaptive": "error-estimate regularisers"}),
    ("not-fsal", dict(method="fehlberg2"), {"adaptive": "FSAL"}),
    ("dense-interp", dict(method="dopri5", options={"interp": "dense"}), {"adaptive": "interp"}),
    ("adaptive-method", dict(method="dopri5"), {"grid": "this engine runs fixed grids"}),
    ("multistep", dict(method="implicit_adams", step_size=0.1), {"grid": "not a one-step explicit RK method"}),
    ("per-tile", dict(method="rk4", step_size=0.1, step_control="per_tile", step_rows=16),
     {"grid": "per-tile step control", "odeint": "per-tile step control"}),
    ("time-varying-adaptive", dict(method="dopri5", dyn="time-varying"), {"adaptive": "not a plain ConcatSquashMLP"}),
    ("time-varying-grid", dict(method="rk4", step_size=0.1, dyn="time-varying"),
     {"grid": "not a plain ConcatSquashMLP"}),
    ("the-peer", dict(method="dopri5"), {"torchdiffeq": "runs only when the solver asks for it"}),
]


@pytest.mark.parametrize("name, case", [pytest.param(n, c, id=f"{n}-{c[0]}") for n in ENGINES for c in SKIP_CASES
                                        if n in c[2] or KIND.get(n) in c[2]])
def test_declines_say_why(name, case):
    """An explicitly requested engine that cannot run a solve raises :class:`EngineUnavailableError` with the reason
    (before any work), and the reason is the one ``engine="auto"`` records for it."""
    _, settings, reasons = case
    why = reasons.get(name, reasons.get(KIND.get(name, "")))
    env = _env(name)
    settings = dict(settings)
    if settings.get("dyn") == "time-varying":
        settings["dyn"] = TimeVaryingConcatSquashMLP(env.dim, env.hidden, "tanh", num_controls=2, T=0.47,
                                                     backend=env.backend)
    cnf = _cnf(env, torch.float64, settings.pop("method"), **settings).train()  # (regularisers on)
    x, e = _data(env, torch.float64)
    cnf.engine = name
    with pytest.raises(EngineUnavailableError, match=why):
        with torch.no_grad():
            cnf(x, noise=e)
    if not env.light_only:  # "auto" skips it with the same reason (the interpreter would run the per-stage fallback)
        cnf.engine = "auto"
        try:
            with torch.no_grad():
                cnf(x, noise=e)
        except EngineUnavailableError as exc:  # no engine runs it: the message lists every reason
            assert f"{name}: " in str(exc) and why in str(exc)
        else:
            skipped = dict(cnf.last_solve.skipped)
            if name in skipped:
                assert why in skipped[name]
            else:  # tried after the engine that ran
                assert ENGINES.index(name) > ENGINES.index(cnf.last_solve.engine)
