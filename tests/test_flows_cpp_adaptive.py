"""The fused adaptive C++ engine of a CNF ("cpp_adaptive", fastode/flows/fused/cpp.py, csrc/cnf_adaptive.cpp): what is
particular to it -- thread determinism, checkpoint counting, kept step activations, failures, per-tile control. Its
values, gradients, NFE, stats and declines against "odeint" are in tests/test_engine_conformance.py.

Reference: the same CNF on the "odeint" engine (fastode.odeint, one network call per stage; checked against
torchdiffeq in tests/test_flows_cnf.py and tests/test_parity_torchdiffeq.py): the same steps, NFE and stats, and the
same values (float64: to rounding; float32: to the solve's tolerance, the C++ sums round differently).
"""
import warnings

import pytest
import torch

import fastode.cpp as fc
from fastode.errors import FallbackWarning, MaxStepsExceededError, NonFiniteError
from fastode.flows import CNF, EngineUnavailableError
from fastode.nn import ConcatSquashMLP

pytestmark = pytest.mark.skipif(not fc.available(), reason="the C++ extension fastode._C is not built")

B, D = 37, 3  # ragged batch
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=5e-5)}


def _cnf(dtype, method="dopri5", trace="exact", tol=1e-5, regs=(), hidden=(16, 16), **kw):
    torch.manual_seed(0)
    dyn = ConcatSquashMLP(D, hidden, "tanh")
    cnf = CNF(dyn, T=0.47, method=method, rtol=tol, atol=tol, trace=trace, eval_trace=trace, regularizers=regs,
              **kw)
    return cnf.to(dtype).eval()


def _data(dtype, scale=1.0):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, D, generator=g, dtype=dtype) * scale,
            torch.randn(B, D, generator=g, dtype=dtype))


def _solve(cnf, x, e, engine, reverse=False, compute_reg=None):
    cnf.engine = engine
    cnf._counter.n = 0
    with torch.no_grad():
        o = cnf(x, noise=e, reverse=reverse, compute_reg=compute_reg)
    return o, cnf.last_solve, cnf._counter.n


def test_one_and_two_threads_give_the_same_bits():
    cnf = _cnf(torch.float32, trace="hutchinson")
    x, e = _data(torch.float32)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_solve(cnf, x, e, "cpp_adaptive")[0])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0].out, outs[1].out) and torch.equal(outs[0].logdet, outs[1].logdet)


def test_checkpoint_mode_runs_it_with_the_same_gradient_and_counts_the_backward():
    dtype = torch.float64
    res = {}
    for gradient, engine in (("checkpoint", "auto"), ("checkpoint", "odeint"), ("direct", "auto")):
        cnf = _cnf(dtype, tol=1e-6, learn_T=True, gradient=gradient, engine=engine).train()
        x, e = _data(dtype)
        cnf._counter.n = 0
        o = cnf(x, noise=e)
        n_fwd = cnf._counter.n
        grads = torch.autograd.grad(o.logdet.sum() + (o.out ** 2).sum(), list(cnf.parameters()))
        st = cnf.last_stats
        res[(gradient, cnf.last_solve.engine)] = (grads, n_fwd, cnf._counter.n - n_fwd, st)
    g1, nf1, nb1, st1 = res[("checkpoint", "cpp_adaptive")]
    g0, nf0, nb0, st0 = res[("checkpoint", "odeint")]
    gd, _, nbd, _ = res[("direct", "cpp_adaptive")]
    for a, b, c in zip(g1, g0, gd):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(a, c, rtol=0, atol=0)  # the same computation
    s = 7  # dopri5's stages: s - 1 per accepted step and the first stage (odeint recomputes s per step)
    assert nf1 == nf0 and nb1 == st1.num_fevals_backward == (s - 1) * st1.num_accepted_steps + 1
    assert nb0 == st0.num_fevals_backward == s * st0.num_accepted_steps and nbd == 0


def _fused_tapes(out):
    """The tapes the fused solve's autograd node holds (a dict, or one per tile)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "tape"):
            return node.tape if isinstance(node.tape, list) else [node.tape]
        todo.extend(f for f, _ in node.next_functions)
    raise AssertionError("no fused adaptive node in the graph")


@pytest.mark.parametrize("step_control", ["batch", "per_tile"])
def test_direct_keeps_the_step_activations_and_gives_the_checkpoint_gradient(monkeypatch, step_control):
    """gradient="direct" keeps every accepted step's activations (or as many as the budget holds; the rest are
    recomputed), "checkpoint" none: the gradients are the same numbers."""
    from fastode.flows.fused import cpp as engines

    dtype = torch.float64
    x, e = _data(dtype)
    res = {}
    for gradient, budget in (("checkpoint", False), ("direct", False), ("direct", True)):
        if budget:  # room for two steps of the first (largest) tile
            per_step = res[("direct", False)][3]
            tiles = -(-B // 10) if step_control == "per_tile" else 1
            monkeypatch.setattr(engines, "STORED_STEPS_BYTES", 2 * per_step * 8 * tiles)
        cnf = _cnf(dtype, trace="hutchinson", tol=1e-7, learn_T=True, regs={"kinetic": 0.1}, gradient=gradient,
                   step_control=step_control, step_rows=10).train()
        o = cnf(x, noise=e, compute_reg=True)
        tapes = _fused_tapes(o.logdet)
        loss = (o.out ** 2).sum() + o.logdet.sum() + o.reg["kinetic"].sum()
        grads = torch.autograd.grad(loss, list(cnf.parameters()))
        res[(gradient, budget)] = (grads, [tp["kept_steps"] for tp in tapes], [len(tp["t0"]) for tp in tapes],
                                   tapes[0]["kept_step_values"])
    (gc, kc, steps, _), (gd, kd, _, _), (gb, kb, _, _) = res.values()
    assert min(steps) > 2 and kc == [0] * len(steps) and kd == steps
    assert kb[0] == 2 and all(0 < k < n for k, n in zip(kb, steps))
    for a, b, c in zip(gc, gd, gb):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_adjoint_mode_keeps_the_odeint_engine():
    for gradient in ("adjoint",):
        cnf = _cnf(torch.float64, gradient=gradient).train()
        x, e = _data(torch.float64)
        out = cnf(x, noise=e)
        assert cnf.last_solve.engine == "odeint"
        assert "gradient" in dict(cnf.last_solve.skipped)["cpp_adaptive"]
        out.logdet.sum().backward()
        assert cnf.dynamics.layers[0]._layer.weight.grad is not None


def test_the_fused_backward_is_once_differentiable():
    cnf = _cnf(torch.float64).train()
    x, e = _data(torch.float64)
    xx = x.clone().requires_grad_()
    o = cnf(xx, noise=e)
    assert cnf.last_solve.engine == "cpp_adaptive"
    (g,) = torch.autograd.grad(o.logdet.sum(), xx, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_failures_rerun_on_odeint_and_raise_its_error(monkeypatch):
    from fastode import errors

    monkeypatch.setattr(errors, "_WARNED", set())
    cnf = _cnf(torch.float64, options={"max_num_steps": 1}, tol=1e-9)
    x, e = _data(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MaxStepsExceededError, match="max_num_steps exceeded"):
            _solve(cnf, x, e, "auto")
    assert [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert cnf.last_solve.engine == "odeint" and "max_num_steps" in dict(cnf.last_solve.skipped)["cpp_adaptive"]
    with pytest.raises(Exception, match="max_num_steps"):  # asked for by name: the reason, no silent fallback
        _solve(cnf, x, e, "cpp_adaptive")
    cnf = _cnf(torch.float64)
    with torch.no_grad():
        cnf.dynamics.layers[-1]._layer.bias[0] = float("nan")
    with pytest.raises(NonFiniteError):
        _solve(cnf, x, e, "auto")


def test_log_prob_and_sampling_take_it():
    cnf = _cnf(torch.float32)
    x, _ = _data(torch.float32)
    with torch.no_grad():
        lp = cnf.log_prob(x)
        assert cnf.last_solve.engine == "cpp_adaptive" and torch.isfinite(lp).all()
        g = torch.Generator().manual_seed(0)
        s = cnf.sample(5, generator=g)
        assert cnf.last_solve.engine == "cpp_adaptive" and s.shape == (5, D)
        cnf.fused_cpu = False
        s0 = cnf.sample(5, generator=torch.Generator().manual_seed(0))
        assert cnf.last_solve.engine == "odeint"
    torch.testing.assert_close(s, s0, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------- per tile
def _tile_loss(cnf, x, e):
    o = cnf(x, noise=e)
    return (o.out ** 2).sum() + (torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)[: x.shape[0]] * o.logdet).sum()


def test_per_tile_is_the_batch_solve_of_each_tile():
    """Reference: the batch-global solve of each tile's rows on their own (a separate CNF call per tile): the same
    values, NFE per tile, and gradients (the loss is a sum over rows: the tiles' gradients add up), dL/dT included."""
    dtype, rows = torch.float64, 10
    cnf = _cnf(dtype, trace="hutchinson", tol=1e-9, learn_T=True).train()
    x, e = _data(dtype, scale=2.0)
    x = x * torch.cat([torch.ones(20, 1), 4 * torch.ones(B - 20, 1)]).to(dtype)  # rows of different stiffness
    cnf.step_control, cnf.step_rows = "per_tile", rows
    loss = _tile_loss(cnf, x, e)
    g_tile = torch.autograd.grad(loss, list(cnf.parameters()))
    tiles = cnf.last_stats.tiles
    assert cnf.last_solve.engine == "cpp_adaptive" and len(tiles) == 4
    cnf.step_control = "batch"
    w = torch.linspace(0.5, 1.5, B, dtype=dtype)
    total, g_ref, nfes = 0, None, []
    for i in range(4):
        sl = slice(i * rows, min(B, (i + 1) * rows))
        o = cnf(x[sl], noise=e[sl])
        part = (o.out ** 2).sum() + (w[sl] * o.logdet).sum()
        g = torch.autograd.grad(part, list(cnf.parameters()))
        g_ref = g if g_ref is None else [a + b for a, b in zip(g_ref, g)]
        total = total + part.detach()
        nfes.append(cnf.last_stats.num_fevals)
    assert [t["nfe"] for t in tiles] == nfes and len(set(nfes)) > 1  # the tiles really took different steps
    torch.testing.assert_close(loss.detach(), total, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_tile, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_per_tile_and_per_row_do_not_depend_on_the_thread_count():
    cnf = _cnf(torch.float32, trace="hutchinson", learn_T=True, step_control="per_row").train()
    x, e = _data(torch.float32)
    old = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = _tile_loss(cnf, x, e)
            got.append([loss.detach()] + list(torch.autograd.grad(loss, list(cnf.parameters()))))
    finally:
        torch.set_num_threads(old)
    assert len(cnf.last_stats.tiles) == B
    for a, b in zip(*got):
        assert torch.equal(a, b)


def test_one_tile_is_the_batch_solve_and_other_engines_refuse_per_tile():
    cnf = _cnf(torch.float64)
    x, e = _data(torch.float64)
    ref, _, _ = _solve(cnf, x, e, "auto")
    cnf.step_control, cnf.step_rows = "per_tile", 4 * B
    o, rec, _ = _solve(cnf, x, e, "auto")
    assert rec.engine == "cpp_adaptive" and torch.equal(o.out, ref.out) and torch.equal(o.logdet, ref.logdet)
    cnf.set_eval_solver("rk4", step_size=0.1)
    with pytest.raises(EngineUnavailableError, match="per-tile step control runs only on"):
        _solve(cnf, x, e, "auto")
    with pytest.raises(ValueError, match="step_control must be one of"):
        _cnf(torch.float64, step_control="tiles")


def test_per_row_per_tile_and_batch_agree_at_a_tight_tolerance():
    """Different step grids, the same ODE: at rtol = atol = 1e-10 every mode is within its global error of a
    reference solved at 1e-13 on the odeint engine (batch-global), and so within it of each other."""
    dtype = torch.float64
    cnf = _cnf(dtype, trace="hutchinson", tol=1e-10)
    x, e = _data(dtype, scale=2.0)
    x = x * torch.cat([torch.ones(20, 1), 4 * torch.ones(B - 20, 1)]).to(dtype)
    ref_cnf = _cnf(dtype, trace="hutchinson", tol=1e-13)
    ref, _, _ = _solve(ref_cnf, x, e, "odeint")
    outs, nfes = {}, {}
    for mode, rows in (("batch", 64), ("per_tile", 8), ("per_row", 1)):
        cnf.step_control, cnf.step_rows = mode, rows
        o, rec, _ = _solve(cnf, x, e, "auto")
        assert rec.engine == "cpp_adaptive"
        outs[mode] = torch.cat([o.out, o.logdet[:, None]], 1)
        nfes[mode] = [t_["nfe"] for t_ in rec.stats.tiles] if mode != "batch" else [rec.stats.num_fevals]
        torch.testing.assert_close(outs[mode], torch.cat([ref.out, ref.logdet[:, None]], 1), rtol=0, atol=1e-8)
    assert len(set(nfes["per_row"])) > 1 and len(set(nfes["per_tile"])) > 1  # each on its own grid
    for mode in ("per_tile", "per_row"):
        diff = (outs[mode] - outs["batch"]).abs().max().item()
        assert 0 < diff < 2e-8, mode  # different grids (not the same numbers), the same solution


def test_per_tile_failures_raise_odeints_error_naming_the_tile():
    """Only the tiles that need the most steps run out of them; the error is odeint's class and names the time, the
    first such tile and its rows."""
    dtype = torch.float64
    x, e = _data(dtype, scale=2.0)
    x = x * torch.cat([torch.ones(20, 1), 6 * torch.ones(B - 20, 1)]).to(dtype)
    cnf = _cnf(dtype, trace="hutchinson", tol=1e-9, step_control="per_tile", step_rows=10)
    _, rec, _ = _solve(cnf, x, e, "auto")
    steps = [t_["steps"] for t_ in rec.stats.tiles]
    assert min(steps) < max(steps)
    i = steps.index(max(steps))
    cnf.set_eval_solver("dopri5", rtol=1e-9, atol=1e-9, options={"max_num_steps": max(steps) - 1})
    rows = rf"rows {10 * i}\.\.{min(B, 10 * i + 10) - 1}"
    with pytest.raises(MaxStepsExceededError, match=rf"max_num_steps exceeded .* in tile {i} \({rows}\)"):
        _solve(cnf, x, e, "auto")
    cnf = _cnf(dtype, trace="hutchinson", step_control="per_row")
    with torch.no_grad():
        cnf.dynamics.layers[-1]._layer.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN/inf at t=0 in tile 0 \(rows 0\.\.0\)"):
        _solve(cnf, x, e, "auto")
