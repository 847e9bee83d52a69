"""C++ CPU backend (fastode.cpp / fastode._C): what is specific to it.

Values and gradients against the reference for every activation, dtype, odd shape, output and double backward
are in the backend-conformance suite (tests/test_mlp_conformance.py). Here: gradcheck in float64, 1 vs 2 threads
(bitwise equal), tile sizes, dispatch and "which backend ran", build info and input errors, the pure-Python
fallback without the extension, softplus above its threshold.
"""
import os

import pytest
import torch

import fastode.cpp as fc
from fastode.nn import ACTIVATIONS, ConcatSquashMLP, backends, functional as F

pytestmark = pytest.mark.skipif(not fc.available(), reason=f"C++ extension not built: {fc.build_info()['error']}")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _model(act, dtype, hidden=(16, 16), dim=2, seed=0):
    torch.manual_seed(seed)
    m = ConcatSquashMLP(dim, hidden, activation=act).to(dtype)
    with torch.no_grad():  # non-trivial gates and time biases
        for layer in m.layers:
            layer._hyper_gate.weight.normal_(0, 0.8)
            layer._hyper_gate.bias.normal_(0, 0.5)
            layer._hyper_bias.weight.normal_(0, 0.4)
    return m


def _flat(params):
    return [p for layer in params for p in layer]


def _loss_and_grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs if o is not None)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _close(a, b, dtype, scale=1.0):
    """Elementwise closeness; an unused input's gradient (None) counts as zeros."""
    tol = TOL[dtype]
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        torch.testing.assert_close(x, y, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale * max(1.0, y.abs().max().item()))


def test_gradcheck_float64():
    m = _model("softplus", torch.float64, hidden=(5, 4))
    P = [tuple(p.detach().requires_grad_() for p in layer) for layer in m.params()]
    z = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def hutch(t, z, e, *flat):
        params = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        return fc.concatsquash_mlp_hutchinson(t, z, e, params, "softplus")

    def exact(t, z, *flat):
        params = [flat[i:i + 5] for i in range(0, len(flat), 5)]
        return fc.concatsquash_mlp_exact_trace(t, z, params, "softplus")

    assert torch.autograd.gradcheck(hutch, (t, z, e, *_flat(P)))
    assert torch.autograd.gradcheck(exact, (t, z, *_flat(P)))


def _run_threads(nthreads, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(nthreads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_one_and_two_threads_bitwise_equal():
    m = _model("tanh", torch.float32, hidden=(64, 64, 64))
    P = m.params()
    z = torch.randn(1000, 2, requires_grad=True)  # 16 tiles -> several chunks
    e = torch.randn(1000, 2)

    def run():
        f, vjp, tr, kin, fr = fc.concatsquash_mlp_hutchinson(0.3, z, e, P, "tanh")
        loss = (f * f).sum() + tr.sum() + fr.sum()
        grads = torch.autograd.grad(loss, [z] + _flat(P))
        st = fc.CnfStepper(m, "rk4").step(0.1, 0.05, z, torch.zeros(1000, 1), e)
        gs = torch.autograd.grad(st.z1.sum() + st.q1.sum(), [z] + list(m.parameters()))
        return [f, vjp, tr, fr, *grads, st.z1, st.q1, *gs]

    one = _run_threads(1, run)
    two = _run_threads(2, run)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_tile_size_does_not_change_results(monkeypatch):
    m = _model("tanh", torch.float64, hidden=(32, 32))
    P = m.params()
    z = torch.randn(203, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(203, 2, dtype=torch.float64)
    outs = []
    for tile in ("7", "64", "500"):
        monkeypatch.setenv("FASTODE_CPP_TILE", tile)
        h = fc.concatsquash_mlp_hutchinson(0.3, z, e, P, "tanh")
        outs.append(list(h) + list(_loss_and_grads(h, [z] + _flat(P))))
    for other in outs[1:]:
        _close(other, outs[0], torch.float64)


def test_registry_dispatch():
    m = ConcatSquashMLP(2, (8,))
    z = torch.randn(4, 2)
    m(0.0, z)
    assert m.last_backend == "cpp"
    assert backends.resolve_backend_name("auto", "cpu", (torch.tensor(0.0), z, m.params(), "tanh")) == "cpp"
    assert "cpp" in backends.available_backends()
    with backends.use_backend("torch"):
        m(0.0, z)
        assert m.last_backend == "torch"
    m(0.0, z)
    assert m.last_backend == "cpp"
    forced = ConcatSquashMLP(2, (8,), backend="torch")
    forced(0.0, z)
    assert forced.last_backend == "torch"
    # dtypes the kernels do not take fall back to the reference under "auto"
    half = ConcatSquashMLP(2, (8,)).to(torch.bfloat16)
    half(0.0, z.to(torch.bfloat16))
    assert half.last_backend == "torch"
    with pytest.raises(ValueError, match="cpp"):
        ConcatSquashMLP(2, (8,), backend="cpp").to(torch.bfloat16)(0.0, z.to(torch.bfloat16))


def test_fused_ops_dispatch_and_override():
    m = _model("tanh", torch.float32)
    z, q = torch.randn(5, 2), torch.zeros(5, 1)
    e = torch.randn(5, 2)
    stepper = fc.CnfStepper(m, "rk4")
    assert stepper.backend == "cpp" and fc.resolve_backend("auto", z, e) == "cpp"
    forced = fc.CnfStepper(m, "rk4", backend="torch")
    assert forced.backend == "torch" and fc.resolve_backend("torch", z, e) == "torch"
    torch.testing.assert_close(stepper.step(0.0, 0.1, z, q, e).z1, forced.step(0.0, 0.1, z, q, e).z1)
    with backends.use_backend("torch"):
        assert fc.CnfStepper(m, "rk4").backend == "torch" and fc.resolve_backend("auto", z) == "torch"


def test_build_info():
    info = fc.build_info()
    assert info["available"] and info["error"] is None
    assert info["gemm"] in ("avx512+blas", "avx512+fallback", "blas", "fallback") and info["tile"] >= 1
    assert isinstance(fc.empty_cache(), int)


def test_input_errors_are_clear():
    m = _model("tanh", torch.float32)
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="e has shape"):
        fc.concatsquash_mlp_hutchinson(0.0, z, torch.randn(4, 3), m.params(), "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        fc.concatsquash_mlp(0.0, z, m.params(), "relu6")
    with pytest.raises(ValueError, match="q0 must be"):
        fc.CnfStepper(m, "rk4").step(0.0, 0.1, z, torch.zeros(4, 2))


def test_pure_python_fallback_without_extension(tmp_path):
    """With the extension missing, import works, build_info says why, and everything runs the reference."""
    import subprocess
    import sys
    code = r"""
import sys
sys.modules["fastode._C"] = None          # as if it had not been built
import torch, fastode, fastode.cpp as fc
from fastode.nn import ConcatSquashMLP
info = fc.build_info()
assert not fc.available() and "not built" in info["error"], info
m = ConcatSquashMLP(2, (8,))
m(0.0, torch.randn(3, 2)); assert m.last_backend == "torch"
r = fc.cnf_rk_step(0.0, 0.1, torch.randn(3, 2), torch.zeros(3, 1), m, "rk4", e=torch.randn(3, 2))
assert fc.CnfStepper(m, "rk4").backend == "torch" and r.z1.shape == (3, 2)
print("ok")
"""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_setup_without_compiler_installs_pure_python(tmp_path):
    """A failing compiler prints a clear message and the build still succeeds (pure-Python package)."""
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("setup.py", "csrc", "kernels"):
        src = os.path.join(root, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, tmp_path / name)
    shutil.copytree(os.path.join(root, "fastode"), tmp_path / "fastode",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, CXX="/nonexistent/c++", CC="/nonexistent/cc")
    env.pop("FASTODE_REQUIRE_EXT", None)
    out = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "installing the pure-Python package" in out.stderr
    assert not list((tmp_path / "fastode").glob("_C*.so"))


def test_softplus_above_threshold_matches_reference():
    """torch's softplus is linear above 20; the reference's derivatives follow it, so must the kernels."""
    m = _model("softplus", torch.float64)
    with torch.no_grad():
        m.layers[0]._layer.bias[::2] = 30.0  # half of the first layer's units far above the threshold
        m.layers[0]._hyper_gate.bias[:] = 5.0
    P = m.params()
    z = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    e = torch.randn(9, 2, dtype=torch.float64)
    res = []
    for mod in (fc, F):
        h = mod.concatsquash_mlp_hutchinson(0.3, z, e, P, "softplus")
        res.append(list(h) + list(_loss_and_grads(h, [z] + _flat(P))))
    _close(res[0], res[1], torch.float64)
