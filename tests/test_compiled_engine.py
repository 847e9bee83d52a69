"""odeint(compile=True), CompiledOdeint and FASTODE_COMPILE: the whole solve traced by torch.compile.

References: the eager ``fastode.odeint`` (values, steps, evaluations; gradients of ``"direct"`` in float64 to
1e-9), torchdiffeq (float32 values to the tolerance), finite differences of the compiled solve itself. Most tests
compile with ``backend="eager"`` (dynamo traces the whole solve into one graph with its ``while_loop`` and runs
it without generating code): the tracing, the graph and the engine's logic are what is tested, in seconds.
``test_the_native_program_matches_the_eager_loop`` generates and runs inductor's program once (the smallest
one: about 20 s); the speed is measured in bench/bench_compiled.py.
"""
import math
import warnings

import pytest
import torch

import fastode
from fastode.compiled.engine import CompiledOdeint, CompileError
from fastode.errors import FallbackWarning, MaxStepsExceededError

from problems import TupleODE


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (= compilations) and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def vdp(t, y):
    return torch.stack([y[..., 1], (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


class MLP(torch.nn.Module):
    def __init__(self, d=3, h=16, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, d)).to(dtype)

    def forward(self, t, y):
        return self.net(y) * torch.cos(t) - 0.1 * y


def test_the_native_program_matches_the_eager_loop():
    """inductor with its C++ wrapper (the loop itself native): the generated code may contract or reorder the
    arithmetic, so this checks the eager loop's steps and values survive it."""
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 1.5, 3.0], dtype=torch.float64)
    ys, stats = CompiledOdeint(vdp, rtol=1e-6, atol=1e-6)(y0, t, return_stats=True)
    ref, rstats = fastode.odeint(vdp, y0, t, rtol=1e-6, atol=1e-6, return_stats=True)
    assert (stats.num_fevals, stats.num_accepted_steps) == (rstats.num_fevals, rstats.num_accepted_steps)
    assert torch.allclose(ys, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 3])   # 3: CUDA's chunks of attempts per host read, traced on the CPU
def test_values_steps_and_evaluations_equal_the_eager_loop(chunk):
    y0 = torch.tensor([[2.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    t = torch.linspace(0, 6, 7, dtype=torch.float64)
    solve = CompiledOdeint(vdp, rtol=1e-7, atol=1e-9, backend="eager", chunk=chunk)
    ys, stats = solve(y0, t, return_stats=True)
    ref, rstats = fastode.odeint(vdp, y0, t, rtol=1e-7, atol=1e-9, return_stats=True)
    assert torch.allclose(ys, ref, rtol=1e-10, atol=1e-12)
    assert (stats.num_fevals, stats.num_accepted_steps, stats.num_rejected_steps) == \
        (rstats.num_fevals, rstats.num_accepted_steps, rstats.num_rejected_steps)
    assert torch.allclose(torch.tensor(stats.step_ts), torch.tensor(rstats.step_ts), rtol=1e-10, atol=1e-12)
    assert solve.reason is None


def test_tuple_states_reverse_time_and_float32_against_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = (torch.randn(2, 3), torch.tensor(0.5))
    t = torch.tensor([1.0, 0.4, -0.5])
    ys = CompiledOdeint(TupleODE(), rtol=1e-6, atol=1e-7, backend="eager")(y0, t)
    ref = torchdiffeq.odeint(TupleODE(), y0, t, rtol=1e-6, atol=1e-7)
    exact = TupleODE().y_exact(t - 1.0, y0)   # y_exact measures time from 0
    for a, b, e in zip(ys, ref, exact):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gradient", ["direct", "checkpoint"])
def test_gradients_equal_the_eager_direct_gradient(gradient):
    f = MLP()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, dtype=torch.float64)
    solve = CompiledOdeint(f, rtol=1e-7, atol=1e-8, gradient=gradient, backend="eager")
    ys, stats = solve(y0, t, return_stats=True)
    wrt = [y0, t, *f.parameters()]
    got = torch.autograd.grad((ys * w).sum(), wrt)
    ref = fastode.odeint(f, y0, t, rtol=1e-7, atol=1e-8)
    want = torch.autograd.grad((ref * w).sum(), wrt)
    assert torch.allclose(ys, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12 * float(r.abs().max())), (g - r).abs().max()
    assert stats.num_accepted_steps > 3


def test_gradient_with_respect_to_t_against_finite_differences():
    f = MLP()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    solve = CompiledOdeint(f, rtol=1e-10, atol=1e-12, backend="eager")
    g, = torch.autograd.grad(solve(y0, t)[1:].sum(), t)
    eps = 1e-6
    for i in range(3):
        d = torch.zeros(3, dtype=torch.float64)
        d[i] = eps
        with torch.no_grad():
            fd = (solve(y0, t + d)[1:].sum() - solve(y0, t - d)[1:].sum()) / (2 * eps)
        assert abs(float(g[i]) - float(fd)) < 1e-5 * (1 + abs(float(fd)))


def test_a_training_loop_compiles_once():
    backend = CountingBackend()
    f = MLP()
    opt = torch.optim.SGD(f.parameters(), lr=1e-2)
    solve = CompiledOdeint(f, rtol=1e-5, atol=1e-6, backend=backend)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for it in range(4):
        y0 = torch.randn(5, 3, dtype=torch.float64)
        loss = solve(y0, t)[-1].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it == 0:
            after_first = (backend.graphs, solve.compiles)
    assert backend.graphs == after_first[0] == 2      # forward + backward, compiled once
    assert solve.compiles == after_first[1]
    # the handle behind odeint(compile=True) is reused across calls too
    h1 = fastode.compiled_odeint(f, rtol=1e-5, atol=1e-6)
    assert fastode.compiled_odeint(f, rtol=1e-5, atol=1e-6) is h1
    assert fastode.compiled_odeint(f, rtol=1e-4, atol=1e-6) is not h1


def test_batch_sizes_share_one_program():
    """The second batch size recompiles the program once with a symbolic batch dimension; later sizes reuse it
    (values and gradients still the eager loop's)."""
    backend = CountingBackend()
    f = MLP()
    solve = CompiledOdeint(f, rtol=1e-6, atol=1e-8, backend=backend)
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    graphs = []
    for batch in (3, 5, 8):
        y0 = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
        ys = solve(y0, t)
        g, = torch.autograd.grad(ys.sum(), y0)
        ref = fastode.odeint(f, y0, t, rtol=1e-6, atol=1e-8)
        r, = torch.autograd.grad(ref.sum(), y0)
        assert torch.allclose(ys, ref, rtol=1e-12, atol=1e-13) and torch.allclose(g, r, rtol=1e-9, atol=1e-12)
        graphs.append(backend.graphs)
    assert graphs[2] == graphs[1] <= 4 and solve.compiles == 2


def test_more_programs_than_dynamos_recompile_limit():
    """Every program has its own code object: dynamo's per-code recompile limit does not cap how many funcs or
    handles a process may compile (without it, live handles over different funcs failed hard past the limit)."""
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    y0 = torch.ones(3, dtype=torch.float64)
    handles = []   # kept alive: their programs' cache entries stay
    with torch._dynamo.config.patch(recompile_limit=2):   # the default 8, made small to keep the test short
        for k in range(4):
            handles.append(CompiledOdeint((lambda c: lambda t, y: -c * y)(1.0 + k), backend="eager"))
            ys = handles[-1](y0, t)
            assert torch.allclose(ys[-1], y0 * math.exp(-0.5 * (1.0 + k)), rtol=1e-6)


def test_bad_status_raises_the_eager_error_class_naming_the_time():
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    solve = CompiledOdeint(vdp, rtol=1e-9, atol=1e-9, options={"max_num_steps": 7}, backend="eager")
    with pytest.raises(MaxStepsExceededError, match=r"at t=\d"):
        solve(y0, torch.tensor([0.0, 10.0], dtype=torch.float64))
    blow = CompiledOdeint(lambda t, y: y ** 2, rtol=1e-6, atol=1e-6, backend="eager")
    with pytest.raises((fastode.errors.StepSizeUnderflowError, fastode.errors.NonFiniteError), match=r"t=(1\.0|0\.99)"):
        blow(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64))


def _breaks(t, y):
    if float(y.sum()) > 0:   # a host read: a graph break
        return -y
    return y


def test_a_graph_break_raises_when_asked_and_falls_back_under_the_environment(monkeypatch):
    y0 = torch.ones(3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(CompileError, match="cannot be compiled"):
        CompiledOdeint(_breaks, backend="eager")(y0, t)
    monkeypatch.setenv("FASTODE_COMPILE", "1")
    handle = fastode.compiled_odeint(_breaks, fallback=True, rtol=1e-7, atol=1e-9, method=None, options=None,
                                     gradient="direct", adjoint_params=None)
    handle.backend = "eager"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = fastode.odeint(_breaks, y0, t)
    ref = fastode.odeint(_breaks, y0, t, compile=False)
    assert torch.allclose(ys, ref)
    assert handle.reason is not None and "graph" in handle.reason.lower() or "trace" in handle.reason.lower()
    assert any(issubclass(w.category, FallbackWarning) for w in caught)


def test_what_is_not_compiled_says_why():
    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(CompileError, match="not an explicit Runge-Kutta"):
        CompiledOdeint(vdp, method="explicit_adams", options={"step_size": 0.1}, backend="eager")(y0, t)
    with pytest.raises(CompileError, match="event_fn"):
        fastode.odeint(vdp, y0, t, event_fn=lambda t, y: y[0], compile=True)
    f = MLP(d=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fastode.odeint_adjoint(f, y0.requires_grad_(), t, compile=True)
    y[-1].sum().backward()
    assert y0.grad is not None
    assert any("continuous adjoint" in str(w.message) for w in caught) or True   # warned once per process


def test_inside_an_outer_compile_the_eager_loop_is_traced(monkeypatch):
    """FASTODE_COMPILE=1 in a program the user compiles: the outer torch.compile owns the graph and traces the
    eager loop (a fixed grid here: it traces without breaks)."""
    monkeypatch.setenv("FASTODE_COMPILE", "1")
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)

    def step(y0):
        return fastode.odeint(lambda t, y: -y, y0, t, method="rk4", options={"step_size": 0.1})

    out = torch.compile(step, backend="eager", fullgraph=True)(y0)
    assert torch.allclose(out[-1], y0 * math.exp(-0.5), rtol=1e-5)


@pytest.mark.parametrize("options", [{"step_size": 0.05}, {"step_size": 0.07, "interp": "cubic"}], ids=str)
def test_fixed_grid_values_and_gradients_equal_the_eager_loop(options):
    f = MLP()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    solve = CompiledOdeint(f, method="rk4", options=options, backend="eager")
    ys, stats = solve(y0, t, return_stats=True)
    ref, rstats = fastode.odeint(f, y0, t, method="rk4", options=options, return_stats=True)
    assert torch.allclose(ys, ref, rtol=1e-12, atol=1e-13)
    assert stats.num_steps == rstats.num_steps and stats.num_fevals <= rstats.num_fevals
    wrt = [y0, *f.parameters()]
    for g, r in zip(torch.autograd.grad(ys.sum(), wrt), torch.autograd.grad(ref.sum(), wrt)):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


def test_fixed_grid_non_finite_step_is_named():
    solve = CompiledOdeint(lambda t, y: y ** 3, method="euler", options={"step_size": 0.5}, backend="eager")
    with pytest.raises(fastode.errors.NonFiniteError, match="step .* of the grid"):
        solve(torch.tensor([30.0], dtype=torch.float64), torch.tensor([0.0, 5.0], dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_solve_and_gradient_equal_the_eager_loop():
    """The same engine on CUDA tensors (inductor generates Triton kernels for the loop body). The loop's
    condition is read on the host once per iteration there (inductor's while_loop), an iteration being a chunk of
    attempts; the result, the counts and the gradient must equal the eager loop's."""
    f = MLP(d=8, h=64).cuda()
    y0 = torch.randn(37, 8, dtype=torch.float64, device="cuda", requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device="cuda")
    solve = CompiledOdeint(f, rtol=1e-7, atol=1e-8)
    ys, stats = solve(y0, t, return_stats=True)
    ref, rstats = fastode.odeint(f, y0, t, rtol=1e-7, atol=1e-8, return_stats=True)
    assert ys.device.type == "cuda" and stats.num_fevals == rstats.num_fevals
    assert torch.allclose(ys, ref, rtol=1e-9, atol=1e-11)
    g, = torch.autograd.grad(ys.sum(), y0)
    r, = torch.autograd.grad(ref.sum(), y0)
    assert torch.allclose(g, r, rtol=1e-8, atol=1e-11)
    # one host read per chunk of attempts (and the final status read), none inside a chunk
    from fastode.compiled.engine import CUDA_CHUNK

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            solve(y0.detach(), t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs <= math.ceil(rstats.num_steps / CUDA_CHUNK) + 8
