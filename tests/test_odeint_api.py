"""Public API behaviour: shapes, dtypes, tuple states, reversed time, len(t) == 1, stats, gradient modes."""
import inspect

import pytest
import torch

import fastode
from fastode.stats import SolveStats
from problems import ADAPTIVE_METHODS, FIXED_METHODS, TupleODE

D = torch.float64


def test_signatures_match_torchdiffeq():
    td = pytest.importorskip("torchdiffeq")
    for name in ("odeint", "odeint_event", "odeint_dense"):
        ours = inspect.signature(getattr(fastode, name)).parameters
        theirs = inspect.signature(getattr(td, name)).parameters
        for pname, p in theirs.items():
            assert pname in ours, (name, pname)
            assert ours[pname].kind == p.kind, (name, pname)
            if pname != "odeint_interface":   # (defaults to each library's own odeint)
                assert ours[pname].default == p.default, (name, pname)
    sig = inspect.signature(fastode.odeint).parameters
    assert sig["gradient"].default == "direct" and sig["return_stats"].default is False
    assert list(sig)[:3] == ["func", "y0", "t"]


def test_public_names():
    for name in ("odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "SolveStats", "__version__"):
        assert name in fastode.__all__
    assert fastode.SolveStats is SolveStats


@pytest.mark.parametrize("method", ADAPTIVE_METHODS + FIXED_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_reverse(method, dtype):
    y0 = torch.randn(2, 3, dtype=dtype)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    opts = dict(step_size=0.05) if method in FIXED_METHODS else None
    out = fastode.odeint(lambda t, y: -y, y0, t, method=method, rtol=1e-6, atol=1e-8, options=opts)
    assert out.shape == (3, 2, 3) and out.dtype == dtype and torch.equal(out[0], y0)
    back = fastode.odeint(lambda t, y: -y, out[-1], t.flip(0), method=method, rtol=1e-6, atol=1e-8, options=opts)
    assert torch.allclose(back[-1], y0, atol=0.2 if method == "euler" else 2e-3)
    exact = y0 * torch.exp(-t.to(dtype)).reshape(-1, 1, 1)
    tol = {"euler": 0.1, "midpoint": 2e-3, "heun2": 2e-3}.get(method, 2e-3)
    assert torch.allclose(out, exact, atol=tol)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "tsit5"])
def test_len1_returns_y0(method):
    y0 = torch.randn(3)
    out = fastode.odeint(lambda t, y: -y, y0, torch.tensor([0.3]), method=method)
    assert out.shape == (1, 3) and torch.equal(out[0], y0)


def test_tuple_state_and_tuple_tolerances():
    f = TupleODE()
    x0 = torch.randn(2, 3, dtype=D)
    z0 = torch.tensor(0.5, dtype=D)
    t = torch.linspace(0, 2, 5, dtype=D)
    x, z = fastode.odeint(f, (x0, z0), t, rtol=[1e-8, 1e-9], atol=[1e-9, 1e-10])
    xe, ze = f.y_exact(t, (x0, z0))
    assert x.shape == (5, 2, 3) and z.shape == (5,)
    assert torch.allclose(x, xe, atol=1e-7) and torch.allclose(z, ze, atol=1e-7)
    # tuple state with a user norm (receives the tuple)
    seen = []

    def norm(tup):
        seen.append(tuple(v.shape for v in tup))
        return max(v.abs().max() for v in tup)

    fastode.odeint(f, (x0, z0), t, options=dict(norm=norm))
    assert seen and seen[0] == ((2, 3), ())


def test_complex_state():
    y0 = torch.tensor([1.0 + 0.0j], dtype=torch.complex128)
    t = torch.tensor([0.0, 1.0], dtype=D)
    out = fastode.odeint(lambda t, y: 1j * y, y0, t, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out[-1], torch.exp(torch.tensor(1j, dtype=torch.complex128)), atol=1e-8)


def test_plain_solve_emits_no_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))
        fastode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4",
                       options=dict(step_size=0.1))


def test_stats_adaptive():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(3, dtype=D, requires_grad=True)
    t = torch.tensor([1.0, 0.0], dtype=D)
    sol, st = fastode.odeint(f, y0, t, rtol=1e-6, atol=1e-8, return_stats=True, options=dict(first_step=0.9))
    assert st.method == "dopri5"
    assert st.num_steps == st.num_accepted_steps + st.num_rejected_steps and st.num_rejected_steps >= 1
    assert st.num_fevals == 1 + 6 * st.num_steps          # f0 + 6 per attempt (first_step given: no heuristic NFE)
    assert len(st.step_ts) == len(st.step_sizes) == len(st.step_errors) == st.num_accepted_steps
    assert st.step_ts[0] == 1.0 and all(s < 0 for s in st.step_sizes)   # user's (decreasing) orientation
    assert sum(st.step_sizes) <= -1.0 + 1e-12                           # the steps cover [0, 1] (overshoot allowed)
    assert all(0 <= float(e.detach()) <= 1 for e in st.step_errors)
    # step errors are differentiable (global error regulariser)
    g = torch.autograd.grad(st.total_step_error(), y0)[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert st.num_fevals_backward == 0


def test_stats_fixed_grid():
    sol, st = fastode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="rk4",
                             options=dict(step_size=0.3), return_stats=True)
    assert st.num_steps == st.num_accepted_steps == 4 and st.num_fevals == 16 and st.step_errors == []
    assert st.step_sizes == pytest.approx([0.3, 0.3, 0.3, 0.1], abs=1e-7)


def test_no_stats_means_no_error_graph():
    # without return_stats the error ratio is computed outside autograd (no extra graph memory)
    y0 = torch.ones(3, dtype=D, requires_grad=True)
    fastode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=D))


def test_gradient_modes_dispatch():
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="gradient must be one of"):
        fastode.odeint(lambda t, y: -y, y0, t, gradient="magic")
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastode.odeint(lambda t, y: -y, y0, t, adjoint_foo=1)
    # adjoint-only keywords are accepted by every mode
    out = fastode.odeint(lambda t, y: -y, y0, t, adjoint_params=())
    assert out.shape == (2, 2)


def test_adjoint_mode_delegates():
    try:
        from fastode.grad.adjoint import odeint_adjoint  # noqa: F401
    except Exception:
        pytest.skip("fastode.grad.adjoint not available")
    f = torch.nn.Linear(2, 2).double()
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    a = fastode.odeint(lambda t, y: f(y), y0, t, gradient="adjoint", adjoint_params=tuple(f.parameters()))
    b = fastode.odeint_adjoint(lambda t, y: f(y), y0, t, adjoint_params=tuple(f.parameters()))
    assert torch.equal(a, b)


def test_func_sees_t_in_state_dtype_and_grid_dtype_for_fixed():
    seen = set()

    def f(t, y):
        seen.add(t.dtype)
        return -y

    fastode.odeint(f, torch.ones(2), torch.tensor([0.0, 1.0], dtype=D), method="rk4", options=dict(step_size=0.25))
    fastode.odeint(f, torch.ones(2), torch.tensor([0.0, 1.0], dtype=D))
    assert seen == {torch.float32}


def test_time_dtype_option_float32_clock():
    out = fastode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]),
                         options=dict(dtype=torch.float32))
    assert torch.allclose(out[-1], torch.exp(torch.tensor(-1.0)) * torch.ones(2), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,options", [("dopri5", None), ("tsit5", dict(interp="dense", land_on="end")),
                                            ("rk4", dict(step_size=0.1)), ("dopri8", None)])
@pytest.mark.parametrize("mode", ["direct", "checkpoint"])
def test_cuda_matches_cpu(method, options, mode):
    import copy
    f = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    fc = copy.deepcopy(f).cuda()
    y0 = torch.randn(8, 3, dtype=D)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=D)
    outs, grads, stats = [], [], []
    for mod, dev in ((f, "cpu"), (fc, "cuda")):
        y = y0.to(dev).requires_grad_(True)
        sol, st = fastode.odeint(lambda t, y, m=mod: m(y), y, t.to(dev), method=method, options=options,
                                 rtol=1e-7, atol=1e-9, gradient=mode, adjoint_params=tuple(mod.parameters()),
                                 return_stats=True)
        assert sol.device.type == dev
        grads.append(torch.autograd.grad(sol.square().sum(), y)[0].cpu())
        outs.append(sol.detach().cpu())
        stats.append(st)
    assert torch.allclose(outs[0], outs[1], rtol=1e-9, atol=1e-10)
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-9)
    assert stats[0].num_fevals == stats[1].num_fevals
