"""torch.compile and torch.library: fastode's C++ MLP kernels as custom ops, fixed-grid solves without graph breaks.

References: ``torch.library.opcheck`` (schema, fake / meta implementation against the real one, autograd
registration, AOT dispatch with static and dynamic shapes) for every op; the same solve in eager mode for values
and gradients; ``torch._dynamo.explain`` for the graph-break count. Compiled with ``backend="aot_eager"`` (the
AOT autograd graphs, no code generation) so that the tier stays fast on the 2-core CI machine; the inductor
numbers are in bench/bench_compile.py.
"""
import pytest
import torch

import fastode
import fastode.cpp as fc
from fastode.nn import ConcatSquashMLP

needs_ext = pytest.mark.skipif(not fc.available(), reason="the C++ extension fastode._C is not built")
T = torch.tensor([0.0, 0.5])
OPTS = {"step_size": 0.1}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _flat(mlp, dtype, requires_grad=True):
    return [p.detach().to(dtype).clone().requires_grad_(requires_grad) for layer in mlp.params() for p in layer]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [37, 64])  # a partial tile and a whole one
def test_opcheck_every_mlp_op(dtype, B):
    from fastode.cpp import _ops

    torch.manual_seed(0)
    mlp = ConcatSquashMLP(3, (16, 16))
    params = _flat(mlp, dtype)
    z = torch.randn(B, 3, dtype=dtype, requires_grad=True)
    e = torch.randn(B, 3, dtype=dtype, requires_grad=True)
    t = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    tile = _ops.tile_for(z, params)
    torch.library.opcheck(_ops.CPP_MLP.op, (t, z, params, 0, tile, True))
    torch.library.opcheck(_ops.CPP_MLP_PROBE.op, (t, z, e, params, 0, tile, True))
    torch.library.opcheck(_ops.CPP_MLP_PROBE.op, (t, z, None, params, 0, tile, True))
    with torch.no_grad():  # the backward op has no gradient of its own
        zd, ed, td, pd = z.detach(), e.detach(), t.detach(), [p.detach() for p in params]
        f, vjp, *_, save = _ops.CPP_MLP_PROBE.op(td, zd, ed, pd, 0, tile, True)
        g = torch.randn_like(zd)
        gtr = torch.randn(B, dtype=dtype)
        args = (td, zd, ed, True, pd, 0, save, f, vjp, g, None, gtr, None, None, True, True, True, True, tile)
        torch.library.opcheck(_ops.CPP_MLP_PROBE.backward_op, args)


@needs_ext
def test_the_custom_ops_give_the_autograd_functions_gradients():
    """The op path (used when compiling: the custom op, its autograd through the backward op) against the eager
    autograd Function generated from the same declaration."""
    from fastode.cpp import _ops

    torch.manual_seed(1)
    dtype = torch.float64
    mlp = ConcatSquashMLP(2, (8, 8))
    params = _flat(mlp, dtype)
    z = torch.randn(21, 2, dtype=dtype, requires_grad=True)
    e = torch.randn(21, 2, dtype=dtype)
    t = torch.tensor(0.2, dtype=dtype, requires_grad=True)
    tile = _ops.tile_for(z, params)
    f, vjp, tr, kin, fr, _ = _ops.CPP_MLP_PROBE.op(t, z, e, params, 0, tile, True)
    ref = _ops.CPP_MLP_PROBE(t, z, e, params, 0, tile, True)[:5]
    for a, b in zip((f, vjp, tr, kin, fr), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    w = [torch.randn_like(x) for x in ref]
    g_op = torch.autograd.grad(sum((a * b).sum() for a, b in zip((f, vjp, tr, kin, fr), w)), [t, z, *params])
    g_ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(ref, w)), [t, z, *params])
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _solve_fn(func):
    def fn(x):
        return fastode.odeint(func, x, T, method="rk4", options=OPTS)[-1]
    return fn


def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(
            gm, example_inputs)
    return backend, graphs


def _mlp_func():
    torch.manual_seed(0)
    return ConcatSquashMLP(2, (16, 16))


def _torch_func():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return lambda t, y: net(y)


@pytest.mark.parametrize("make", [_mlp_func, _torch_func], ids=["ConcatSquashMLP", "torch.nn"])
def test_a_fixed_grid_odeint_has_no_graph_break(make):
    func = make()
    explanation = torch._dynamo.explain(_solve_fn(func))(torch.randn(8, 2))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    if make is _mlp_func and fc.available():  # one node per network evaluation: 4 stages x 5 steps
        gm = explanation.graphs[0]
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and "cpp_mlp" in str(n.target)]
        assert len(calls) == 4 * 5


@pytest.mark.parametrize("make", [_mlp_func, _torch_func], ids=["ConcatSquashMLP", "torch.nn"])
def test_compiled_fixed_grid_odeint_matches_eager_across_batch_sizes_without_recompiling(make):
    func = make()
    fn = _solve_fn(func)
    backend, graphs = _counting_backend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    params = [p for p in func.parameters()] if isinstance(func, torch.nn.Module) else []
    for B in (16, 37, 5):
        x = torch.randn(B, 2)
        torch._dynamo.mark_dynamic(x, 0)  # the batch size: symbolic in one graph
        x.requires_grad_()
        y = compiled(x)
        g = torch.autograd.grad(y.square().sum(), [x, *params])
        x0 = x.detach().clone().requires_grad_()
        y0 = fn(x0)
        g0 = torch.autograd.grad(y0.square().sum(), [x0, *params])
        torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1  # one dynamic-shape graph for every batch size


def test_a_compiled_solve_refuses_changed_times_and_checks_the_state():
    t = T.clone()

    def solve(x):
        return fastode.odeint(lambda s, y: -y, x, t, method="rk4", options=OPTS)[-1]

    compiled = torch.compile(solve, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 2)
    torch.testing.assert_close(compiled(x), solve(x))
    t[1] = 0.7  # the traced grid is for 0.5
    with pytest.raises(RuntimeError, match="time values are part of the graph"):
        compiled(x)
    t[1] = 0.5
    with pytest.raises(RuntimeError, match="y0 contains NaN or inf"):
        compiled(torch.full((4, 2), float("nan")))


def _cnf():
    from fastode.flows import CNF

    torch.manual_seed(0)
    return CNF(ConcatSquashMLP(2, (16, 16)), T=0.5, method="rk4", step_size=0.1, trace="hutchinson",
               regularizers={"kinetic": 0.01}).train()


@pytest.mark.parametrize("fused", [True, False], ids=["cpp_grid", "odeint"])
def test_a_fixed_grid_cnf_loss_has_no_graph_break(fused):
    """The fused grid solve is one node (fastode::cpp_cnf_grid); the per-stage path one node per evaluation."""
    cnf = _cnf()
    cnf.fused_cpu = fused
    x, e = torch.randn(32, 2), torch.randn(32, 2)
    explanation = torch._dynamo.explain(lambda x: -cnf.log_prob(x, noise=e).mean())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    targets = [str(n.target) for n in explanation.graphs[0].graph.nodes if n.op == "call_function"]
    if fc.available():
        assert cnf.last_solve.engine == ("cpp_grid" if fused else "odeint")
        assert sum("cpp_cnf_grid" in n for n in targets) == (1 if fused else 0)
        assert sum("cpp_mlp" in n for n in targets) == (0 if fused else 4 * 5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_the_fused_grid_solve(dtype):
    from fastode.cpp import _ops
    from fastode.cpp._rk import RATE_CODES, tableau_lists
    from fastode.tableaus import get_tableau

    torch.manual_seed(0)
    params = _flat(ConcatSquashMLP(2, (16, 16)), dtype)
    B = 37
    z0 = torch.randn(B, 2, dtype=dtype, requires_grad=True)
    q0 = torch.zeros(B, 2, dtype=dtype, requires_grad=True)
    e = torch.randn(B, 2, dtype=dtype, requires_grad=True)
    times = [0.0, 0.1, 0.2, 0.35]
    ts_t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    c, a, b, _ = tableau_lists(get_tableau("rk4"))
    rates = [RATE_CODES["trace"], RATE_CODES["kinetic"]]
    tile = _ops.tile_for(z0, params)
    torch.library.opcheck(_ops.CPP_CNF_GRID.op, (ts_t, z0, q0, e, params, times, 0, rates, c, a, b, tile, True))


def test_a_compiled_cnf_training_step_matches_eager():
    """Loss (NLL + kinetic regulariser) and every parameter gradient, compiled vs eager, on two batch sizes."""
    cnf = _cnf()

    def loss_fn(x, e):
        lp, reg = cnf.log_prob_and_reg(x, noise=e)
        return -lp.mean() + sum(v.mean() for v in reg.values())

    backend, graphs = _counting_backend()
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    params = list(cnf.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    for B in (32, 32, 32, 19):
        x, e = torch.randn(B, 2), torch.randn(B, 2)
        lc = compiled(x, e)
        gc = torch.autograd.grad(lc, params)
        le = loss_fn(x, e)
        ge = torch.autograd.grad(le, params)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for p, g in zip(params, gc):  # training moves the parameters: no guard may depend on them
            p.grad = g
        opt.step()
    assert len(graphs) <= 2  # the first batch size, then one dynamic-shape graph; nothing per iteration


def _adaptive_cnf(**kw):
    from fastode.flows import CNF

    torch.manual_seed(0)
    return CNF(ConcatSquashMLP(2, (16, 16)), T=0.5, method="dopri5", rtol=1e-5, atol=1e-5, trace="hutchinson",
               eval_trace="exact", **kw).eval()


@needs_ext
@pytest.mark.parametrize("step_control", ["batch", "per_tile"])
def test_an_adaptive_log_likelihood_compiles_to_one_fused_op(step_control):
    """No gradient: the whole adaptive solve (batch-global or per tile) is fastode::cpp_cnf_adaptive (0 graph breaks),
    the same numbers as the eager engine; a failed solve raises from inside the graph."""
    cnf = _adaptive_cnf(**({"step_control": "per_tile", "step_rows": 8} if step_control == "per_tile" else {}))
    x = torch.randn(32, 2)

    def loglik(x):
        with torch.no_grad():
            return cnf.log_prob(x)

    explanation = torch._dynamo.explain(loglik)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    targets = [str(n.target) for n in explanation.graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("cpp_cnf_adaptive" in n for n in targets) == 1
    torch._dynamo.reset()
    compiled = torch.compile(loglik, backend="aot_eager", fullgraph=True)
    ref = loglik(x)
    assert torch.equal(compiled(x), ref) and cnf.last_solve.engine == "cpp_adaptive"
    torch._dynamo.reset()
    bad = _adaptive_cnf(options={"max_num_steps": 1})
    compiled_bad = torch.compile(lambda x: bad.log_prob(x), backend="aot_eager", fullgraph=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="fused adaptive CNF solve stopped"):
        compiled_bad(x)


@needs_ext
def test_opcheck_the_fused_adaptive_solve():
    from fastode.cpp import _ops
    from fastode.cpp._rk import RATE_CODES, tableau_lists
    from fastode.tableaus import get_tableau

    torch.manual_seed(0)
    dtype = torch.float64
    params = _flat(ConcatSquashMLP(2, (16, 16)), dtype, requires_grad=False)
    z0, q0, e = torch.randn(37, 2, dtype=dtype), torch.zeros(37, 1, dtype=dtype), torch.randn(37, 2, dtype=dtype)
    tab = get_tableau("dopri5")
    c, a, b, b_err = tableau_lists(tab)
    ctl = [1e-6, 1e-6, 0.9, 10.0, 0.2, 0.0, float("inf"), 0.0]
    for rows in (0, 10):
        args = (z0, q0, e, params, 0.0, 0.5, 0, [RATE_CODES["-trace"]], c, a, b, b_err, [float(v) for v in tab.c_mid],
                ctl, 1000, int(tab.order), False, rows, _ops.tile_for(z0, params))
        torch.library.opcheck(_ops.cpp_cnf_adaptive, args)


@needs_ext
def test_torch_export_of_a_fixed_grid_solve():
    """torch.export (strict: traced by dynamo) keeps one custom op per evaluation and gives the eager numbers."""

    class Solve(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = _mlp_func()
            self.register_buffer("t", T.clone())

        def forward(self, x):
            return fastode.odeint(self.f, x, self.t, method="rk4", options=OPTS)[-1]

    m = Solve()
    x = torch.randn(8, 2)
    ep = torch.export.export(m, (x,), strict=True)
    assert sum("cpp_mlp" in str(n.target) for n in ep.graph.nodes) == 4 * 5
    torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)


def _interpreted(module: str):
    """``module`` (a Triton backend) when the Triton interpreter runs its kernels on the CPU, else skip."""
    from fastode.kernels._common import interpreter_active

    if not interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on a machine without CUDA)")
    return pytest.importorskip(module)


def test_opcheck_the_triton_mlp_ops_under_the_interpreter():
    """The Triton concatsquash kernels as custom ops (run by the Triton interpreter on the CPU; tiny sizes)."""
    tm = _interpreted("fastode.triton._mlp")
    torch.manual_seed(0)
    dtype = torch.float64
    params = _flat(ConcatSquashMLP(2, (8,)), dtype)
    z = torch.randn(5, 2, dtype=dtype, requires_grad=True)
    e = torch.randn(5, 2, dtype=dtype, requires_grad=True)
    t = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    for mode, probe in ((tm._K.MODE_F, None), (tm._K.MODE_HUTCH, e), (tm._K.MODE_EXACT, None)):
        torch.library.opcheck(tm.triton_mlp_op, (t, z, probe, params, mode, "tanh"))
    # the op path's gradients against the eager autograd Function
    out = tm.triton_mlp_op(t, z, e, params, tm._K.MODE_HUTCH, "tanh")
    ref = tm.TRITON_MLP(t, z, e, params, tm._K.MODE_HUTCH, "tanh")  # eager: the generated Function
    w = [torch.randn_like(r) for r in ref]
    g_op = torch.autograd.grad(sum((a * b).sum() for a, b in zip(out, w)), [t, z, e, *params])
    g_ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(ref, w)), [t, z, e, *params])
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(g_op, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _rk_inputs(shape, stages, dt, seed, dtype=torch.float64):
    """A state, its stage derivatives and a step size, all requiring gradients."""
    torch.manual_seed(seed)
    y0 = torch.randn(*shape, dtype=dtype, requires_grad=True)
    ks = [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(stages)]
    return y0, ks, torch.tensor(dt, dtype=dtype, requires_grad=True)


def test_opcheck_the_triton_rk_ops_under_the_interpreter():
    """The fused Triton stage, epilogue and error-ratio kernels as custom ops: opcheck, and the op path's values and
    gradients against the eager autograd Functions generated from the same declarations (tiny sizes: the interpreter
    runs them)."""
    tr = _interpreted("fastode.triton._rk")
    y0, ks, dt = _rk_inputs((5, 3), stages=3, dt=0.2, seed=0)
    dtype = y0.dtype
    atol, rtol = torch.tensor(1e-3, dtype=dtype), torch.tensor(1e-2, dtype=dtype)
    b, b_err = [0.25, 0.5, 0.25], [0.1, -0.3, 0.2]
    torch.library.opcheck(tr.triton_rk_stage_op, (y0, ks, [0.5, 0.0, -1.5], dt))
    torch.library.opcheck(tr.triton_rk_stage_op, (None, ks, [0.5, 0.25], dt))
    torch.library.opcheck(tr.triton_rk_epilogue_op, (y0, ks, b, b_err, dt, atol, rtol))
    y1 = (y0 + 0.1 * ks[0]).detach().requires_grad_()
    torch.library.opcheck(tr.triton_rk_error_ratio_op, (ks[1], y0, y1, atol, rtol))

    def agree(op_out, fn_out, inputs, differentiable):
        for a, r in zip(op_out, fn_out):
            torch.testing.assert_close(a, r, rtol=0, atol=0)
        w = [torch.randn_like(op_out[i]) for i in differentiable]
        g_op = torch.autograd.grad(sum((op_out[i] * c).sum() for i, c in zip(differentiable, w)), inputs)
        g_fn = torch.autograd.grad(sum((fn_out[i] * c).sum() for i, c in zip(differentiable, w)), inputs)
        for a, r in zip(g_op, g_fn):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)

    agree([tr.triton_rk_stage_op(y0, ks, [0.5, 0.0, -1.5], dt)],
          [tr.rk_stage(y0, ks, (0.5, 0.0, -1.5), dt)], [y0, dt, *ks], [0])
    agree(tr.triton_rk_epilogue_op(y0, ks, b, b_err, dt, atol, rtol),
          tr.rk_epilogue(y0, ks, b, b_err, dt, 1e-3, 1e-2), [y0, dt, *ks], [0, 1, 2, 4])
    agree(tr.triton_rk_error_ratio_op(ks[1], y0, y1, atol, rtol),
          tr.rk_error_ratio(ks[1], y0, y1, 1e-3, 1e-2), [ks[1], y0, y1], [0, 2])


def test_the_triton_rk_ops_double_backward_through_the_spec():
    """create_graph=True through the op path differentiates the spec (as the eager Functions do)."""
    tr = _interpreted("fastode.triton._rk")
    y0, ks, dt = _rk_inputs((4, 2), stages=2, dt=0.3, seed=1)
    dtype = y0.dtype
    at, rt = torch.tensor(1e-3, dtype=dtype), torch.tensor(1e-2, dtype=dtype)
    fn = lambda y0, k0, k1, dt: tr.triton_rk_epilogue_op(y0, [k0, k1], [0.5, 0.5], [0.2, -0.2], dt, at, rt)[4].sum()  # noqa: E731,E501
    assert torch.autograd.gradgradcheck(fn, (y0, *ks, dt))


def test_a_fixed_grid_odeint_on_the_triton_rk_ops_compiles_without_a_break(monkeypatch):
    """odeint's stage combinations on the fused Triton kernels (forced on the CPU through the interpreter): one
    graph, the custom op in it, the eager solve's values and gradients."""
    _interpreted("fastode.triton._rk")
    import functools

    from fastode.ops import rk as spec
    from fastode.solvers import fixed_grid

    monkeypatch.setattr(fixed_grid, "resolve_rk_ops", functools.partial(spec.resolve_rk_ops, backend="triton"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    fn = _solve_fn(lambda t, y: net(y))
    x = torch.randn(6, 2, requires_grad=True)
    explanation = torch._dynamo.explain(fn)(x)
    assert explanation.graph_break_count == 0
    assert any("triton_rk_stage" in str(n.target) for g in explanation.graphs for n in g.graph.nodes)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, ref = compiled(x), fn(x)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    params = [x, *net.parameters()]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_fixed_grid_cnf_training_step_as_a_cuda_graph_matches_eager():
    """mode="reduce-overhead" (CUDA graphs) over a fixed-grid CNF training step on the Triton kernels: the loss
    and every gradient equal the eager step's, over repeated replays with new data."""
    from fastode.flows import CNF

    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(2, (64, 64, 64)), T=0.5, method="rk4", step_size=0.05, trace="hutchinson",
              regularizers={"kinetic": 0.01}).train().cuda()
    params = list(cnf.parameters())

    def loss_fn(x, e):
        lp, reg = cnf.log_prob_and_reg(x, noise=e)
        return -lp.mean() + sum(v.mean() for v in reg.values())

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, replays
        x, e = torch.randn(256, 2, device="cuda"), torch.randn(256, 2, device="cuda")
        lc = compiled(x, e)
        got = [lc.detach().clone()] + [g.clone() for g in torch.autograd.grad(lc, params)]
        le = loss_fn(x, e)
        ref = [le] + list(torch.autograd.grad(le, params))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
