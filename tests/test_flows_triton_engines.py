"""The fused Triton CNF engines ("triton_grid", "triton_adaptive"; fastode/flows/fused/triton*.py,
kernels/cnf_step.py, kernels/cnf_solve.py), under the Triton interpreter on the CPU (compiled on CUDA): what is
particular to them -- launches and host reads, failures, per-tile control. Their values, gradients, NFE, stats and
declines against "odeint" are in tests/test_engine_conformance.py.

Reference: the same CNF on the "odeint" engine (fastode.odeint with one network call per stage, checked against
torchdiffeq elsewhere): the same steps, NFE and stats and the same values (float64: to rounding; float32: to the
solve's tolerance -- the kernels sum in their own order). Tiny shapes: a ragged batch of 37 rows in tiles of 16 on
two persistent programs (so one program runs two tiles and the last tile is partial), one hidden layer of 16, loose
tolerances (few steps); outputs and scratch NaN-poisoned before the kernels write them.
"""
import warnings

import pytest
import torch

from _kernels_env import KDEV, KMARK, SKIP_REASON, small_poisoned_mlp_kernels

pytestmark = [KMARK, pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]

if SKIP_REASON is None:
    from fastode.errors import FallbackWarning
    from fastode.flows import CNF
    from fastode.nn import ConcatSquashMLP
    from fastode.launch_count import counting

B, D = 37, 2
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=2e-3, atol=2e-4)}


@pytest.fixture(autouse=True)
def _small_poisoned():
    with small_poisoned_mlp_kernels():
        yield


def _cnf(dtype, method="dopri5", trace="hutchinson", tol=1e-4, regs=(), **kw):
    torch.manual_seed(0)
    dyn = ConcatSquashMLP(D, (16,), "tanh", backend="triton")
    cnf = CNF(dyn, T=0.6, method=method, rtol=tol, atol=tol, trace=trace, eval_trace=trace, regularizers=regs, **kw)
    return cnf.to(dtype=dtype, device=KDEV).eval()


def _data(dtype, scale=1.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=dtype) * scale
    e = torch.randn(B, D, generator=g, dtype=dtype)
    return x.to(KDEV), e.to(KDEV)


def _solve(cnf, x, e, engine, reverse=False, compute_reg=None):
    """One solve on ``engine``; the "odeint" reference evaluates the network with the PyTorch backend (the Triton
    MLP kernels per stage are tested elsewhere and slow in the interpreter)."""
    cnf.engine = engine
    cnf._counter.n = 0
    cnf.dynamics.backend = "torch" if engine == "odeint" else "triton"
    with torch.no_grad():
        o = cnf(x, noise=e, reverse=reverse, compute_reg=compute_reg)
    return o, cnf.last_solve, cnf._counter.n


def test_launches_and_host_reads_per_solve():
    """One launch per step attempt and one host read at the end (sync_every=0, after a first solve of the same
    configuration told the launcher how many attempts to queue); sync_every=K reads every K launches."""
    from fastode.flows.engines import get_engine

    cnf = _cnf(torch.float64)
    x, e = _data(torch.float64)
    _solve(cnf, x, e, "triton_adaptive")  # learns the attempt count
    with counting() as c:
        _, r, _ = _solve(cnf, x, e, "triton_adaptive")
    attempts = r.stats.num_steps
    assert c.launches["cnf_step_kernel"] == attempts + 1  # + one no-op launch after the end
    assert c.launches["csq_fwd_kernel"] == 2  # the first evaluation and the first-step heuristic's trial
    assert c.host_reads["solve status"] == 1 and c.total_host_reads == 2  # + the record, read once at the end
    eng = get_engine("triton_adaptive").backend
    eng.sync_every = 2
    try:
        with counting() as c:
            _solve(cnf, x, e, "triton_adaptive")
    finally:
        eng.sync_every = 0
    assert c.host_reads["solve status"] == -(-attempts // 2)  # the last attempt ends the solve
    with counting() as c:  # the per-stage path: a host read of the error ratio per attempt
        _, r0, _ = _solve(cnf, x, e, "odeint")
    assert c.host_reads["error ratio"] == r0.stats.num_steps


@pytest.mark.parametrize("options, error", [
    ({"first_step": 0.1, "min_step": 0.1}, "NonFiniteError"),  # forced acceptance of a NaN step: status NaN/inf
    ({"first_step": 0.1, "max_num_steps": 2}, "MaxStepsExceededError"),  # rejected and shrunk until the budget
])
def test_nan_stage_reruns_on_odeint_which_raises_its_error(options, error, monkeypatch):
    """A non-finite stage (a NaN probe entry makes one row's trace NaN; sums keep NaN, so the batch norm is NaN):
    the device controller rejects (NaN factor) or, at min_step, stops with status NaN/inf; forced or automatic, the
    solve is re-run on odeint (warned, recorded), which raises the error it raises on its own, naming the time."""
    import fastode.errors as E

    monkeypatch.setattr(E, "_WARNED", set())
    cnf = _cnf(torch.float64, options=options)
    x, e = _data(torch.float64)
    e[3, 0] = float("nan")
    with pytest.raises(getattr(E, error)) as direct:
        _solve(cnf, x, e, "odeint")
    for engine in ("triton_adaptive", "auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(getattr(E, error)) as got:
                _solve(cnf, x, e, engine)
        assert str(got.value) == str(direct.value) and "t=" in str(got.value)
        assert cnf.last_solve.engine == "odeint" and "triton_adaptive" in dict(cnf.last_solve.skipped)
    why = dict(cnf.last_solve.skipped)["triton_adaptive"]
    assert ("NaN/inf" if error == "NonFiniteError" else "max_num_steps") in why
    assert [w for w in caught if issubclass(w.category, FallbackWarning)] == []  # warned once per process


@pytest.mark.parametrize("engine, method", [("triton_adaptive", "dopri5"), ("triton_grid", "rk4")])
def test_nan_input_row_raises_odeints_non_finite_error(engine, method):
    """A NaN in one input row: the adaptive first step is NaN, which the device reports as NaN/inf (not as a step-size
    underflow); the grid's result is NaN. Forced, each raises odeint's NonFiniteError for the initial time."""
    from fastode.errors import NonFiniteError

    cnf = _cnf(torch.float64, method=method, **({"step_size": 0.3} if method == "rk4" else {}))
    x, e = _data(torch.float64)
    x[5, 1] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NonFiniteError, match=r"NaN or inf values \(the solution at the initial time t=0\)"):
            _solve(cnf, x, e, engine)
    why = dict(cnf.last_solve.skipped)[engine]
    assert "NaN/inf" in why and "underflow" not in why
    assert not caught or all("NaN/inf" in str(w.message) for w in caught if issubclass(w.category, FallbackWarning))


def _grads(cnf, x, e, engine):
    """A training loss's gradients w.r.t. the input and every CNF parameter (the end time included)."""
    cnf.engine = engine
    cnf.dynamics.backend = "torch" if engine == "odeint" else "triton"
    cnf._counter.n = 0
    cnf.zero_grad()
    xx = x.clone().requires_grad_()
    o = cnf(xx, noise=e, compute_reg=True)
    loss = (o.out ** 2).sum() + 0.3 * o.logdet.sum() + sum(v.sum() for v in o.reg.values())
    loss.backward()
    return [xx.grad] + [p.grad.clone() for p in cnf.parameters()], cnf.last_solve


def test_per_tile_is_the_batch_solve_of_each_tile():
    """Per-tile control in one launch: each tile of 16 rows takes the steps odeint takes on that tile's rows alone
    (its own first step, accept/reject and norm), the same values; the rows are scaled so that the tiles need
    different step counts; stats are the row-weighted means and every tile's counts."""
    dtype = torch.float64
    cnf = _cnf(dtype, method="bosh3", tol=1e-6, step_control="per_tile", step_rows=16)
    x, e = _data(dtype)
    x = x * torch.linspace(0.3, 3.0, B, dtype=dtype, device=KDEV)[:, None]
    o, r, n = _solve(cnf, x, e, "triton_adaptive")
    tiles = r.stats.tiles
    assert r.engine == "triton_adaptive" and len(tiles) == 3 and len({t["nfe"] for t in tiles}) > 1
    ref = _cnf(dtype, method="bosh3", tol=1e-6)
    for k, tile in enumerate(tiles):
        rows = slice(16 * k, min(B, 16 * (k + 1)))
        o0, r0, _ = _solve(ref, x[rows], e[rows], "odeint")
        torch.testing.assert_close(o.out[rows], o0.out, **TOL[dtype])
        torch.testing.assert_close(o.logdet[rows], o0.logdet, **TOL[dtype])
        assert (tile["nfe"], tile["steps"], tile["rejected"], tile["status"]) == (
            r0.stats.num_fevals, r0.stats.num_steps, r0.stats.num_rejected_steps, 0)
    weights = [16 / B, 16 / B, 5 / B]
    assert r.stats.num_fevals == round(sum(w * t["nfe"] for w, t in zip(weights, tiles))) == n


def test_per_tile_failure_raises_odeints_error_naming_the_tile():
    """No other engine runs per-tile control on this device, so a failed tile raises here: the error class odeint
    raises (a NaN probe entry in row 20 makes tile 1's norm NaN; at min_step the NaN step stops it)."""
    from fastode.errors import NonFiniteError

    cnf = _cnf(torch.float64, step_control="per_tile", step_rows=16, options={"first_step": 0.1, "min_step": 0.1})
    x, e = _data(torch.float64)
    e[20, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"tile 1 \(rows 16\.\.31\)"):
        _solve(cnf, x, e, "triton_adaptive")


def test_per_tile_gradient_is_each_tiles_discrete_one(monkeypatch):
    """The per-tile backward in one launch: each tile's discrete adjoint; the loss is a sum over rows, so the
    reference gradient is the sum of odeint's gradients on each tile's rows alone (the end time's and the parameters'),
    and each tile's input gradient. The tape starts at 4 steps per tile, so the forward runs again with longer tapes
    until every tile's steps fit."""
    from fastode.flows.fused.triton_solve import TritonCnfSolver

    class Four(dict):
        def get(self, key, default=None):
            return 4

    monkeypatch.setattr(TritonCnfSolver, "_expected_attempts", Four())
    dtype = torch.float64
    kw = dict(method="bosh3", tol=1e-5, learn_T=True, regs={"kinetic": 0.1})
    cnf = _cnf(dtype, step_control="per_tile", step_rows=16, **kw).train()
    x, e = _data(dtype)
    x = x * torch.linspace(0.3, 3.0, B, dtype=dtype, device=KDEV)[:, None]
    with counting() as c:
        g1, r1 = _grads(cnf, x, e, "triton_adaptive")
    assert r1.engine == "triton_adaptive" and len({t["nfe"] for t in r1.stats.tiles}) > 1
    assert max(t["accepted"] for t in r1.stats.tiles) > 4 and c.launches["cnf_tile_solve_kernel"] >= 2
    assert c.launches["cnf_tile_bwd_kernel"] == 1
    ref = _cnf(dtype, **kw).train()
    total = None
    for k in range(3):
        rows = slice(16 * k, min(B, 16 * (k + 1)))
        g0, _ = _grads(ref, x[rows], e[rows], "odeint")
        torch.testing.assert_close(g1[0][rows], g0[0], rtol=1e-9, atol=1e-11)
        total = g0[1:] if total is None else [a + b for a, b in zip(total, g0[1:])]
    for a, b in zip(g1[1:], total):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
