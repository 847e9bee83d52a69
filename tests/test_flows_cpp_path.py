"""The fused C++ grid engine of a CNF ("cpp_grid", fastode/flows/fused/): what is particular to it -- the
``fused_cpu`` switch, density-loss NFE, fallbacks of settings it does not take, non-finite results, the buffer pool.
Its values, gradients, NFE and stats against "odeint" are in the engine conformance suite
(tests/test_engine_conformance.py).

Reference: the same CNF with ``fused_cpu=False`` (fastode.odeint, one MLP call per RK stage), which the rest
of the flow tests check against torchdiffeq, finite differences and analytic densities.
"""
import pytest
import torch

import fastode.cpp as fc
from fastode.errors import NonFiniteError
from fastode.flows import CNF, Solver, TimeVaryingConcatSquashMLP, build_flow, density_loss
from fastode.nn import ConcatSquashMLP, use_backend

pytestmark = pytest.mark.skipif(not fc.available(), reason="the C++ extension fastode._C is not built")

B, D = 37, 3  # ragged batch (not a multiple of the kernels' tile)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _cnf(dtype, *, T=0.47, method="rk4", step_size=0.05, trace="hutchinson", regs=(), gradient="direct",
         dyn=None, **kw):
    torch.manual_seed(0)
    dyn = dyn if dyn is not None else ConcatSquashMLP(D, (16, 16), "softplus")
    cnf = CNF(dyn, T=T, learn_T=True, method=method, step_size=step_size, trace=trace, regularizers=regs,
              gradient=gradient, **kw)
    return cnf.to(dtype).train()


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g, dtype=dtype), torch.randn(B, D, generator=g, dtype=dtype)


def _run(cnf, x, e, fused, reverse=False, grad=True):
    """Outputs and gradients w.r.t. x, the parameters and T (through the raw end-time parameter)."""
    cnf.fused_cpu = fused
    cnf._counter.n = 0
    xx = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        o = cnf(xx, noise=e, reverse=reverse)
    vals = [o.out, o.logdet] + [o.reg[k] for k in sorted(o.reg)]
    info = (cnf.last_path, cnf._counter.n, cnf.last_stats)
    if not grad:
        return vals, [], info
    w = torch.linspace(0.5, 1.5, B, dtype=x.dtype)
    loss = (o.out ** 2).sum() + (w * o.logdet).sum() + sum(0.3 * v.sum() for v in o.reg.values())
    grads = torch.autograd.grad(loss, [xx] + list(cnf.parameters()))
    return vals, list(grads), info


def _assert_same(a, b, dtype):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **TOL[dtype])


def test_eval_no_grad_and_density_loss_nfe():
    """Evaluation (exact trace, no autograd) and a training iteration's loss / NFE as fastode.train sees them."""
    dtype = torch.float32
    flow = build_flow(D, hidden=(16, 16), activation="tanh", T=0.5, method="rk4", step_size=0.05,
                      regularizers={"kinetic": 0.01, "jf": 0.01}).to(dtype)
    x, e = _data(dtype)
    res = {}
    for fused in (True, False):
        flow.set_fused_cpu(fused)
        flow.train()
        flow.reset_nfe()
        loss, info = density_loss(flow, x, noise=e)
        nfe_f = flow.nfe
        loss.backward()
        nfe_b = flow.nfe - nfe_f
        grads = [p.grad.clone() for p in flow.parameters()]
        flow.zero_grad(set_to_none=True)
        flow.eval()
        with torch.no_grad():
            lp = flow.log_prob(x)
        res[fused] = (loss.detach(), info, nfe_f, nfe_b, grads, lp, flow.last_paths())
    a, b = res[True], res[False]
    assert a[6] == ["fused_cpu"] and b[6] == ["odeint"]
    torch.testing.assert_close(a[0], b[0], **TOL[dtype])
    assert a[1]["nfe"] == b[1]["nfe"] == 40 and set(a[1]) == set(b[1])
    assert (a[2], a[3]) == (b[2], b[3]) == (40, 0)
    _assert_same(a[4], b[4], dtype)
    torch.testing.assert_close(a[5], b[5], **TOL[dtype])


def _path(cnf, dtype=torch.float64, reverse=False, trace=None):
    x, e = _data(dtype)
    o = cnf(x.requires_grad_(), noise=e, reverse=reverse, trace=trace)
    (o.out.sum() + o.logdet.sum()).backward()
    return cnf.last_path, cnf.last_path_reason


@pytest.mark.parametrize("make, why", [
    (lambda: _cnf(torch.float64, method="fehlberg2", step_size=None), "method"),
    (lambda: _cnf(torch.float64, gradient="checkpoint"), "gradient"),
    (lambda: _cnf(torch.float64, gradient="adjoint"), "gradient"),
    (lambda: _cnf(torch.float64, trace="exact", regs={"jf": 0.1}), "regulariser"),
    (lambda: _cnf(torch.float64, regs={"r2": 0.1}), "regulariser"),
    (lambda: _cnf(torch.float64, regs={"local_error": 0.1}), "error-estimate"),
    (lambda: _cnf(torch.float64, dyn=ConcatSquashMLP(D, (16, 16), "softplus", backend="torch")), "backend"),
    (lambda: _cnf(torch.float64, dyn=TimeVaryingConcatSquashMLP(D, (16, 16), "softplus", num_controls=3, T=0.5)),
     "TimeVaryingConcatSquashMLP"),
    (lambda: _cnf(torch.float64, fused_cpu=False), "fused_cpu is off"),
    (lambda: _cnf(torch.float64, options={"interp": "cubic"}), "interp"),
])
def test_ineligible_settings_fall_back(make, why):
    cnf = make()
    path, reason = _path(cnf)
    assert path == "odeint" and why in reason


def test_global_and_env_backend_override(monkeypatch):
    cnf = _cnf(torch.float64)
    assert _path(cnf)[0] == "fused_cpu"
    with use_backend("torch"):
        path, reason = _path(cnf)  # (the adaptive engine adds its own reason after the grid engine's)
        assert path == "odeint" and reason.startswith("the MLP backend resolves to 'torch', not 'cpp'")
    monkeypatch.setenv("FASTODE_NN_BACKEND", "torch")
    assert _path(cnf)[0] == "odeint"
    monkeypatch.setenv("FASTODE_NN_BACKEND", "cpp")
    assert _path(cnf)[0] == "fused_cpu"


def test_trace_none_and_mixed_dtypes_fall_back():
    cnf = _cnf(torch.float64)
    assert _path(cnf, trace="none")[0] == "odeint"
    cnf32 = _cnf(torch.float32)
    x, e = _data(torch.float64)
    with pytest.raises(Exception):  # float64 input with float32 weights fails on the odeint path too
        cnf32(x, noise=e)
    assert cnf32.last_path == "odeint" and "parameter" in cnf32.last_path_reason


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_non_finite_is_reported_like_odeint(poison, monkeypatch):
    """A solve that blows up raises odeint's NonFiniteError (naming the step) on both paths; the fused path's
    re-run on the odeint path is recorded and warned once, never silent."""
    import warnings

    from fastode import errors

    monkeypatch.setattr(errors, "_WARNED", set())
    cnf = _cnf(torch.float64)
    with torch.no_grad():
        cnf.dynamics.layers[-1]._layer.bias[0] = poison  # the first step is not finite
    x, e = _data(torch.float64)
    msgs = []
    for fused in (True, False):
        cnf.fused_cpu = fused
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(NonFiniteError) as info:
                cnf(x, noise=e)
        fallback = [w for w in caught if issubclass(w.category, errors.FallbackWarning)]
        assert len(fallback) == (1 if fused else 0)
        if fused:
            assert cnf.last_path == "odeint" and "NaN/inf" in cnf.last_path_reason
            assert "NaN/inf" in str(fallback[0].message)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1] and "step 0" in msgs[0] and "t=0" in msgs[0]
    cnf.fused_cpu = True
    with warnings.catch_warnings(record=True) as caught:  # warned once per process
        warnings.simplefilter("always")
        with pytest.raises(NonFiniteError):
            cnf(x, noise=e)
    assert not [w for w in caught if issubclass(w.category, errors.FallbackWarning)]


def test_solver_backend_torchdiffeq_runs_the_peer():
    pytest.importorskip("torchdiffeq")
    cnf = _cnf(torch.float64, train_solver=Solver(method="rk4", step_size=0.05, backend="torchdiffeq"))
    path, reason = _path(cnf)
    assert path == "torchdiffeq" and "torchdiffeq" in reason
    assert [n for n, _ in cnf.last_solve.skipped] == ["cpp_grid", "cpp_adaptive", "triton_grid", "triton_adaptive",
                                                      "odeint"] and cnf.last_stats is None


_POOL_DRIFT = """
import torch
import fastode.cpp as fc
from fastode.flows import CNF
from fastode.nn import ConcatSquashMLP

torch.manual_seed(0)
cnf = CNF(ConcatSquashMLP(3, (16, 16), "softplus"), T=0.3, learn_T=True, method="rk4", step_size=0.05).train()
g = torch.Generator().manual_seed(1)
x, e = torch.randn(37, 3, generator=g), torch.randn(37, 3, generator=g)

def iteration(T):
    cnf.set_T(T)
    out = cnf(x, noise=e)
    assert cnf.last_solve.engine == "cpp_grid", cnf.last_solve.describe()
    (out.out.sum() + out.logdet.sum()).backward()

iteration(1.5)  # the largest buffer of the drift, alone
iteration(1.5)
one = fc.cached_bytes()
fc.empty_cache()
most = 0
for T in torch.linspace(0.3, 1.5, 25).tolist():  # 6 .. 30 steps of 0.05
    iteration(T)
    most = max(most, fc.cached_bytes())
print(one, most)
"""


def test_learned_end_time_keeps_the_buffer_pool_bounded():
    """A fixed grid over a learned end time asks for a save buffer whose size follows the step count. The C++ pool
    reuses a slightly larger block and frees blocks a whole iteration did not reuse, so training while T drifts
    keeps about one buffer cached, not one per step count ever seen (which climbed to the 1 GiB cap in long runs).
    In a fresh process: the pool is process-wide, and what other tests keep alive would blur the measure."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _POOL_DRIFT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    one, most = (int(v) for v in out.stdout.split())
    assert one > 0
    assert most <= 3 * one, f"{most / one:.1f}x one solve's cached buffers while T drifted"
