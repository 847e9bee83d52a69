"""The CNF engine registry (fastode/flows/engines.py): eligibility from solver metadata, the written selection rules,
one record per solve, and new engines plugging in.

References: the odeint engine is checked against torchdiffeq elsewhere (tests/test_flows*.py); here engines are
checked against each other (same values) and the records against what each engine did (its counters, stats).
"""
import pytest
import torch

import fastode.cpp as fc
from fastode.flows import CNF, EngineUnavailableError, FIXED_GRID_METHODS, engine_names, register_engine
from fastode.flows import engines as E
from fastode.nn import ConcatSquashMLP
from fastode.solvers import SOLVERS, method_info
from fastode.tableaus import TABLEAUS

needs_cpp = pytest.mark.skipif(not fc.available(), reason="the C++ extension fastode._C is not built")
D = 2


def _cnf(method="rk4", step_size=0.1, **kw):
    torch.manual_seed(0)
    return CNF(ConcatSquashMLP(D, (8,), "tanh"), T=0.5, method=method, step_size=step_size, **kw).double().train()


def _x(b=5):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, D, generator=g, dtype=torch.float64), torch.randn(b, D, generator=g, dtype=torch.float64)


def test_method_info_reads_the_solver_classes():
    assert FIXED_GRID_METHODS == ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic", "explicit_adams",
                                  "implicit_adams", "fixed_adams")
    for name in ("euler", "midpoint", "heun2", "heun3", "rk4", "rk4_classic"):
        info = method_info(name)
        assert info.fixed_grid and not info.adaptive and info.rk_tableau is TABLEAUS[name]
        assert info.options["interp"] == "linear" and info.options["perturb"] is False
        assert info.options["step_size"] is None and info.options["check_finite"] is True
    for name in ("explicit_adams", "implicit_adams"):  # the rk4 start-up tableau is not their step
        assert method_info(name).fixed_grid and method_info(name).rk_tableau is None
    for name in ("dopri5", "tsit5", "bosh3"):
        info = method_info(name)
        assert info.adaptive and not info.fixed_grid and info.rk_tableau is TABLEAUS[name]
        assert info.options["max_num_steps"] > 0
    assert method_info("scipy_solver").adaptive and method_info("scipy_solver").rk_tableau is None
    assert set(FIXED_GRID_METHODS) <= set(SOLVERS)


@needs_cpp
@pytest.mark.parametrize("method, why", [
    ("dopri5", "is adaptive"), ("implicit_adams", "not a one-step explicit RK method"),
    ("heun2", None), ("midpoint", None), ("euler", None),
])
def test_grid_engine_eligibility_follows_the_method(method, why):
    cnf = _cnf(method, step_size=None if method == "dopri5" else 0.1)
    x, e = _x()
    cnf(x, noise=e)
    rec = cnf.last_solve
    if why is None:
        assert rec.engine == "cpp_grid" and rec.skipped == () and rec.reason is None
    else:  # dopri5 then runs on the fused adaptive engine, implicit_adams on odeint
        assert rec.engine == ("cpp_adaptive" if method == "dopri5" else "odeint")
        assert rec.skipped[0][0] == "cpp_grid" and why in rec.skipped[0][1]


@needs_cpp
def test_record_says_what_ran():
    cnf = _cnf()
    x, e = _x()
    cnf._counter.n = 0
    cnf(x, noise=e)
    rec = cnf.last_solve
    assert rec.engine == "cpp_grid" and rec.mlp_backend == "cpp" and cnf.last_path == "fused_cpu"
    assert rec.stats is cnf.last_stats and rec.stats.num_steps == 5 and rec.stats.num_fevals == 20 == cnf._counter.n
    cnf.fused_cpu = False
    cnf(x, noise=e)
    rec = cnf.last_solve
    assert rec.engine == "odeint" == cnf.last_path
    cpp = rec.skipped[:2]
    assert cpp == (("cpp_grid", "fused_cpu is off"), ("cpp_adaptive", "fused_cpu is off"))
    # the Triton engines come next and say why not (a CPU input, or under the interpreter the 'cpp' MLP backend)
    assert [n for n, _ in rec.skipped[2:]] == ["triton_grid", "triton_adaptive"] and all(r for _, r in rec.skipped)
    assert rec.reason.startswith("fused_cpu is off; ") and rec.reason.count("fused_cpu is off") == 1  # each once
    assert rec.describe().startswith("odeint (cpp_grid not taken: fused_cpu is off; cpp_adaptive not taken: "
                                     "fused_cpu is off; triton_grid not taken: ")
    with pytest.raises(AttributeError):
        cnf.last_path = "x"  # a read-only view of last_solve


@needs_cpp
def test_explicit_engine_runs_or_raises_with_the_reason():
    x, e = _x()
    auto = _cnf()(x, noise=e)
    forced = _cnf(engine="odeint")
    o = forced(x, noise=e)
    assert forced.last_solve.engine == "odeint" and forced.last_solve.skipped == ()
    torch.testing.assert_close(o.out, auto.out, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(o.logdet, auto.logdet, rtol=1e-12, atol=1e-13)
    bad = _cnf("dopri5", step_size=None, engine="cpp_grid")
    with pytest.raises(EngineUnavailableError, match="'cpp_grid' cannot run this solve: method 'dopri5' is adaptive"):
        bad(x, noise=e)
    with pytest.raises(ValueError, match="engine must be 'auto' or one of"):
        _cnf(engine="cpp_adaptive_typo")


@needs_cpp
@pytest.mark.parametrize("engine", ["cpp_grid", "auto"])
@pytest.mark.parametrize("where", ["weights", "input row"])
def test_grid_engine_on_a_non_finite_solve_raises_odeints_error(engine, where, monkeypatch):
    """Forced or automatic, a NaN in the fused grid solve raises odeint's NonFiniteError naming the step (the
    grid solve is re-run on odeint, as the warning says), never an EngineUnavailableError."""
    from fastode import errors

    monkeypatch.setattr(errors, "_WARNED", set())
    cnf = _cnf(engine=engine)
    x, e = _x()
    if where == "weights":
        with torch.no_grad():
            cnf.dynamics.layers[-1]._layer.bias[0] = float("nan")
    else:
        x[3, 1] = float("nan")
    # odeint names the step of a NaN from the weights, the initial time of a NaN input (also an InvalidStateError)
    named = r"NaN/inf in the step from t=0.0 to t=0.1 \(RK4, step 0" if where == "weights" else \
        r"y0 contains NaN or inf values \(the solution at the initial time t=0\)"
    with pytest.warns(errors.FallbackWarning, match="fused C\\+\\+ grid solve produced NaN/inf; re-running"):
        with pytest.raises(errors.NonFiniteError, match=named):
            cnf(x, noise=e)
    rec = cnf.last_solve
    assert rec.engine == "odeint" and "produced NaN/inf" in dict(rec.skipped)["cpp_grid"]


class _Spy(E.Engine):
    """Runs the odeint engine, or declines at run time, and counts what it was asked."""

    name = "spy"

    def __init__(self, decline=None):
        self.decline, self.runs = decline, 0

    def plan(self, solve):
        return E.Skip("adaptive only") if solve.solver.method != "dopri5" else "plan"

    def run(self, solve, plan):
        assert plan == "plan"
        self.runs += 1
        if self.decline:
            return E.Skip(self.decline)
        return E.OdeintEngine().run(solve, None)


@pytest.fixture
def spy_registry():
    saved = list(E._ENGINES)
    yield
    E._ENGINES[:] = saved


@pytest.mark.parametrize("decline", [None, "declined at run time"])
def test_a_new_engine_plugs_in_at_the_front(spy_registry, decline):
    spy = _Spy(decline)
    register_engine(spy, before="cpp_grid")
    assert engine_names()[0] == "spy"
    x, e = _x()
    ref = _cnf("dopri5", step_size=None, engine="odeint")(x, noise=e)
    cnf = _cnf("dopri5", step_size=None)
    o = cnf(x, noise=e)
    torch.testing.assert_close(o.out, ref.out, rtol=0, atol=0)
    assert spy.runs == 1
    rec = cnf.last_solve
    if decline is None:
        assert rec.engine == "spy" and rec.stats.num_steps > 0
    else:  # declined: the next eligible engine ran
        assert rec.engine in ("cpp_adaptive", "odeint") and rec.skipped[0] == ("spy", decline)
    rk4 = _cnf()
    rk4(x, noise=e)
    assert spy.runs == 1 and rk4.last_solve.engine in ("cpp_grid", "odeint")
    assert rk4.last_solve.skipped[0] == ("spy", "adaptive only")  # asked first, and it said why not
    with pytest.raises(ValueError, match="unknown engine"):
        register_engine(_Spy(), before="nope")
