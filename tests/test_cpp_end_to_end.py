"""End to end: fastode.odeint and the CNF give the same results (to rounding) whether the concatsquash MLP
runs on the C++ backend or on the PyTorch reference."""
import pytest
import torch

import fastode
import fastode.cpp as fc
from fastode.nn import ConcatSquashMLP, backends

pytestmark = pytest.mark.skipif(not fc.available(), reason=f"C++ extension not built: {fc.build_info()['error']}")

fastode_odeint = getattr(fastode, "odeint", None)


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def _run_both(fn):
    out = {}
    for name in ("cpp", "torch"):
        with backends.use_backend(name):
            out[name] = fn(name)
    return out["cpp"], out["torch"]


def _assert_all_close(a, b, dtype):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **_tol(dtype))


@pytest.mark.skipif(fastode_odeint is None, reason="fastode.odeint is not available")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method,options", [("rk4", {"step_size": 0.05}), ("dopri5", None)])
def test_odeint_same_on_either_backend(dtype, method, options):
    torch.manual_seed(0)
    mlp = ConcatSquashMLP(2, (32, 32), "tanh").to(dtype)
    y0 = torch.randn(40, 2, dtype=dtype)
    t = torch.tensor([0.0, 0.3, 0.5], dtype=dtype)

    # float32 error estimates at 1e-6 are rounding noise (the accepted steps could legitimately differ)
    tol = 1e-6 if dtype == torch.float64 else 1e-3

    def run(name):
        sol = fastode_odeint(mlp, y0, t, method=method, options=options, rtol=tol, atol=tol)
        assert mlp.last_backend == name
        loss = (sol[-1] ** 2).sum()
        return [sol] + list(torch.autograd.grad(loss, list(mlp.parameters())))

    a, b = _run_both(run)
    _assert_all_close(a, b, dtype)


def _flow(dtype, method, step_size=None):
    from fastode.flows import CNF

    torch.manual_seed(1)
    mlp = ConcatSquashMLP(2, (32, 32, 32), "tanh").to(dtype)
    return CNF(mlp, T=0.5, method=method, step_size=step_size, rtol=1e-5, atol=1e-5).to(dtype), mlp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cnf_training_loss_and_gradients_same_on_either_backend(dtype):
    pytest.importorskip("fastode.flows")
    flow, mlp = _flow(dtype, "rk4", step_size=0.05)
    flow.train()
    x = torch.randn(64, 2, dtype=dtype)
    noise = torch.randn(64, 2, dtype=dtype)

    def run(name):
        logp = flow.log_prob(x, noise=noise)
        assert flow.last_solve.mlp_backend == name
        loss = -logp.mean()
        return [logp] + list(torch.autograd.grad(loss, list(flow.parameters()), allow_unused=True))

    a, b = _run_both(run)
    a = [x for x in a if x is not None]
    b = [x for x in b if x is not None]
    _assert_all_close(a, b, dtype)


def test_cnf_eval_log_likelihood_same_on_either_backend():
    pytest.importorskip("fastode.flows")
    flow, mlp = _flow(torch.float64, "dopri5")
    flow.eval()
    x = torch.randn(64, 2, dtype=torch.float64)

    def run(name):
        with torch.no_grad():
            logp = flow.log_prob(x)
        assert flow.last_solve.mlp_backend == name
        return [logp]

    a, b = _run_both(run)
    _assert_all_close(a, b, torch.float64)
